//! The per-flow decision: a new flow's policy fields (with GeoIP lookups of the device's public
//! address and the destination), the egress stage and the network stage, over 1,000 rules.
//!
//! Run: `cargo bench -p waygate-stages --bench flow_decision -- --warm-up-time 1 --measurement-time 3`.
// A benchmark is a shell: it reads the clock.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use waygate_geoip::{build_from_csv, GeoIp};
use waygate_model::testkit;
use waygate_policy::fields::Stage;
use waygate_policy::input::Input;
use waygate_policy::ruleset::{Lists, Policy, RuleSet};
use waygate_stages::policy::{egress_choice, flow_input, l4_verdict};

const COUNTRIES: [&str; 8] = ["US", "DE", "JP", "BR", "FR", "GB", "IN", "T1"];

/// 500 egress and 500 network rules over every kind of selector; none matches the measured
/// flow until the catch-all at the bottom, so every stage does its whole work.
fn rules() -> String {
    let mut rules = Vec::new();
    for i in 0..500 {
        let traffic = match i % 5 {
            0 => format!(
                "net.dst.geo.country == \"{}\" and net.dst.port == {}",
                COUNTRIES[i % 8],
                1000 + i
            ),
            1 => format!(
                "net.src.geo.continent == \"EU\" and net.dst.ip in {{198.18.{}.0/24}}",
                i % 256
            ),
            2 => format!("net.vnet_id == \"vnet-{i}\""),
            3 => format!(
                "net.dst.port in {{{}..{}}} and net.protocol == \"udp\"",
                2000 + i,
                2010 + i
            ),
            _ => format!("net.src.ip == 192.0.2.{}", i % 250),
        };
        rules.push(serde_json::json!({
            "id": format!("egress-{i}"), "action": "egress", "filters": ["egress"],
            "precedence": i, "traffic": traffic,
            "identity": if i % 3 == 0 { format!("identity.email == \"user{i}@example.com\"") } else { String::new() },
            "rule_settings": {"egress": {"ipv4": format!("192.0.2.{}", 10 + i % 200), "ipv6": "", "ipv4_fallback": "0.0.0.0"}}
        }));
        let l4 = match i % 4 {
            0 => format!("net.dst.port == {}", 3000 + i),
            1 => format!(
                "net.dst.ip == 203.0.{}.0/24 and net.dst.port == 22",
                i % 113
            ),
            2 => format!("any(identity.groups.name[*] == \"group-{i}\")"),
            _ => format!(
                "net.dst.geo.continent == \"AF\" and net.dst.port == {}",
                4000 + i
            ),
        };
        rules.push(serde_json::json!({
            "id": format!("l4-{i}"), "action": "block", "filters": ["l4"],
            "precedence": 1000 + i, "traffic": l4
        }));
    }
    rules.push(serde_json::json!({
        "id": "catch-all", "action": "egress", "filters": ["egress"], "precedence": 5000,
        "traffic": "net.dst.ip == 0.0.0.0/0",
        "rule_settings": {"egress": {"ipv4": "192.0.2.250", "ipv6": "", "ipv4_fallback": "0.0.0.0"}}
    }));
    serde_json::Value::Array(rules).to_string()
}

fn geo() -> GeoIp {
    let mut csv = String::new();
    for i in 0..=255u32 {
        csv.push_str(&format!(
            "198.51.{i}.0/24,{},NA\n",
            COUNTRIES[i as usize % 8]
        ));
        csv.push_str(&format!("203.0.{i}.0/24,JP,AS\n"));
    }
    GeoIp::from_bytes(build_from_csv(csv.as_bytes()).expect("csv")).expect("database")
}

fn bench(c: &mut Criterion) {
    let set = RuleSet::from_json(&rules()).expect("rules");
    let policy = Policy::compile(&set, &Lists::new(Vec::new())).expect("compile");
    let geo = geo();
    let ada = testkit::device()
        .id("d1")
        .user_name("Ada")
        .groups(&["eng", "ops"]);
    let ctx = testkit::flow()
        .device(ada)
        .device_public("198.51.100.11:40000")
        .dst("203.0.113.10:443")
        .build();
    let target: SocketAddr = ctx.dst;
    let mut input = Input::new();
    // The measured flow ends at the catch-all: check it once.
    flow_input(&mut input, &ctx, target, Some(&geo));
    let rule = policy
        .stage(Stage::Egress)
        .evaluate(&input)
        .expect("a match");
    assert_eq!(rule.id, "catch-all");
    assert!(policy.stage(Stage::L4).evaluate(&input).is_none());
    c.bench_function(
        "flow decision: fields + geo + egress + l4, 1,000 rules",
        |b| {
            b.iter(|| {
                flow_input(&mut input, black_box(&ctx), black_box(target), Some(&geo));
                let egress = policy.stage(Stage::Egress).evaluate(&input);
                let choice = egress.and_then(egress_choice);
                let l4 = l4_verdict(policy.stage(Stage::L4).evaluate(&input), target);
                black_box((choice, l4))
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
