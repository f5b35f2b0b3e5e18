//! Policy engine benchmarks: a 10,000-rule DNS rule set (domain sets, a 100,000-domain list,
//! categories, identity), a 1,000-rule egress rule set, parsing plus compiling, and the memory of
//! the big list (counted by a global allocator that tracks live bytes).
//!
//! Run: `cargo bench -p waygate-policy --bench policy -- --warm-up-time 1 --measurement-time 3`.
// A benchmark is a shell: it reads the clock. is_multiple_of is newer than the MSRV.
#![allow(clippy::disallowed_methods, clippy::manual_is_multiple_of)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{criterion_group, Criterion};
use waygate_policy::compile::CompiledLists;
use waygate_policy::fields::{FieldId, Stage};
use waygate_policy::input::Input;
use waygate_policy::ruleset::{Lists, Policy, RuleSet};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BIG_LIST: usize = 100_000;
const LIST_ID: &str = "5a1d0f4e-3c2b-4a19-8e7d-6f5c4b3a2910";

fn big_domain(i: usize) -> String {
    format!("tracker{i}.adnet{}.example", i % 997)
}

fn lists_json() -> String {
    let items: Vec<String> = (0..BIG_LIST).map(big_domain).collect();
    serde_json::json!([{"id": LIST_ID, "name": "ad-trackers", "type": "DOMAIN", "items": items}])
        .to_string()
}

fn dns_rule(i: usize) -> serde_json::Value {
    let (traffic, identity, action) = match i % 20 {
        // 14 in 20: domain sets.
        0..=13 => (
            format!(
                "any(dns.domains[*] in {{\"site{i}.example\" \"www.site{i}.example\" \"cdn{i}.example.net\"}})"
            ),
            String::new(),
            if i % 3 == 0 { "allow" } else { "block" },
        ),
        // Categories for a group.
        14 | 15 => (
            format!("any(dns.content_category[*] in {{{} {}}})", 2 + i % 30, 100 + i % 80),
            format!("any(identity.groups.name[*] == \"group{}\")", i % 500),
            "block",
        ),
        // Per-user host rules.
        16 | 17 => (
            format!("dns.fqdn == \"app{i}.corp.example\""),
            format!("identity.email == \"user{i}@example.com\""),
            "allow",
        ),
        // Record types on one domain.
        18 => (
            format!("dns.query_rtype == \"TXT\" and any(dns.domains[*] == \"txt{i}.example\")"),
            String::new(),
            "block",
        ),
        // The big list, a few times with other conditions.
        _ if i % 2000 == 19 => (
            format!("any(dns.domains[*] in ${LIST_ID})"),
            String::new(),
            "block",
        ),
        _ => (
            format!("dns.src.geo.country == \"C{}\" and dns.query_rtype == \"AAAA\"", i % 200),
            String::new(),
            "block",
        ),
    };
    serde_json::json!({"id": format!("00000000-0000-4000-8000-{i:012}"), "name": format!("dns {i}"),
        "precedence": i * 10, "enabled": true, "action": action, "filters": ["dns"],
        "traffic": traffic, "identity": identity, "device_posture": ""})
}

fn dns_rules_json(n: usize) -> String {
    let mut rules: Vec<_> = (0..n).map(dns_rule).collect();
    // A handful of rules no index can serve: they run for every query.
    for (k, re) in ["^ads[0-9]+\\.", "\\.onion$", "(?i)^malware"]
        .iter()
        .enumerate()
    {
        rules.push(serde_json::json!({"name": format!("regex {k}"), "precedence": 1_000_000 + k,
            "action": "block", "filters": ["dns"], "traffic": format!("dns.fqdn matches \"{re}\"")}));
    }
    serde_json::Value::Array(rules).to_string()
}

fn egress_rules_json(n: usize) -> String {
    let mut rules: Vec<_> = (0..n - 1)
        .map(|i| {
            let traffic = match i % 4 {
                0 => format!("net.dst.ip == 203.0.113.{}", i % 250),
                1 => format!("net.dst.ip in {{198.18.{}.0/24}} and net.dst.port in {{443 8443}}", i % 250),
                2 => format!("net.src.geo.country == \"C{}\"", i % 200),
                _ => format!("any(identity.groups.name[*] == \"team{i}\")"),
            };
            serde_json::json!({"name": format!("egress {i}"), "precedence": i, "action": "egress",
                "filters": ["egress"], "traffic": traffic,
                "rule_settings": {"egress": {"ipv4": format!("192.0.2.{}", 10 + i % 200), "ipv6": "2001:db8:1::/64", "ipv4_fallback": "0.0.0.0"}}})
        })
        .collect();
    rules.push(
        serde_json::json!({"name": "catch-all", "precedence": 100_000, "action": "egress",
        "filters": ["egress"], "traffic": "net.protocol in {\"tcp\" \"udp\" \"icmp\"}"}),
    );
    serde_json::Value::Array(rules).to_string()
}

fn dns_queries() -> Vec<Input> {
    let mut out = Vec::new();
    for k in 0..64usize {
        let mut i = Input::new();
        let name = match k % 8 {
            0 => format!("www.site{}.example", k * 131 % 10_000 / 20 * 20 + 1),
            1 => big_domain(k * 1543 % BIG_LIST),
            2 => format!("sub.{}", big_domain(k * 7 % BIG_LIST)),
            3 => format!("app{}.corp.example", k * 20 + 16),
            4 => format!("ads{k}.example.org"),
            _ => format!("miss{k}.nowhere{k}.test"),
        };
        i.set_host(FieldId::DnsFqdn, &name);
        i.set_ints(FieldId::DnsContentCategory, [3 + k as i64 % 20]);
        i.set_str(
            FieldId::IdentityEmail,
            &format!("user{}@example.com", k * 20 + 16),
        );
        i.set_strs(
            FieldId::IdentityGroupsName,
            ["everyone", &format!("group{}", k % 600)],
        );
        i.set_str(
            FieldId::DnsQueryRtype,
            if k % 3 == 0 { "AAAA" } else { "A" },
        );
        i.set_str(FieldId::DnsSrcGeoCountry, &format!("C{}", k % 250));
        out.push(i);
    }
    out
}

fn egress_flows() -> Vec<Input> {
    (0..64usize)
        .map(|k| {
            let mut i = Input::new();
            let dst = match k % 4 {
                0 => format!("203.0.113.{}", k * 3 % 250),
                1 => format!("198.18.{}.7", k % 250),
                _ => format!("198.51.100.{k}"),
            };
            i.set_ip(FieldId::NetDstIp, dst.parse().unwrap());
            i.set_ip(FieldId::NetSrcIp, "100.96.0.2".parse().unwrap());
            i.set_int(FieldId::NetDstPort, if k % 2 == 0 { 443 } else { 80 });
            i.set_int(FieldId::NetSrcPort, 40_000 + k as i64);
            i.set_str(FieldId::NetProtocol, if k % 5 == 0 { "udp" } else { "tcp" });
            i.set_str(FieldId::NetSrcGeoCountry, &format!("C{}", k % 300));
            i.set_strs(
                FieldId::IdentityGroupsName,
                [format!("team{}", k * 13 % 1200).as_str()],
            );
            i
        })
        .collect()
}

fn percentiles(mut ns: Vec<f64>) -> (f64, f64) {
    ns.sort_by(f64::total_cmp);
    (ns[ns.len() / 2], ns[ns.len() * 99 / 100])
}

/// Times each evaluation (batches of 16 to amortize the clock) and prints p50 and p99.
fn latency(label: &str, stage: Stage, policy: &Policy, inputs: &[Input]) {
    let s = policy.stage(stage);
    let mut samples = Vec::new();
    for round in 0..20_000 {
        let t = Instant::now();
        for k in 0..16 {
            black_box(s.evaluate(black_box(&inputs[(round * 16 + k) % inputs.len()])));
        }
        samples.push(t.elapsed().as_nanos() as f64 / 16.0);
    }
    let (p50, p99) = percentiles(samples);
    let matched = inputs.iter().filter(|i| s.evaluate(i).is_some()).count();
    let calls = CALLS.load(Ordering::Relaxed);
    for i in inputs.iter().cycle().take(100_000) {
        black_box(s.evaluate(black_box(i)));
    }
    let allocs = CALLS.load(Ordering::Relaxed) - calls;
    println!(
        "{label}: p50 {p50:.0} ns, p99 {p99:.0} ns per evaluation ({matched} of {} inputs match a rule; {allocs} allocations in 100,000 evaluations)",
        inputs.len()
    );
}

fn setup() -> (String, Lists, Policy, Policy) {
    let lists_text = lists_json();
    let lists = Lists::from_json(&lists_text).expect("lists");
    let dns = Policy::compile(
        &RuleSet::from_json(&dns_rules_json(10_000)).expect("dns rules"),
        &lists,
    )
    .expect("dns compiles");
    let egress = Policy::compile(
        &RuleSet::from_json(&egress_rules_json(1_000)).expect("egress rules"),
        &Lists::default(),
    )
    .expect("egress compiles");
    (lists_text, lists, dns, egress)
}

fn report() {
    let before = LIVE.load(Ordering::Relaxed);
    let text = lists_json();
    let with_text = LIVE.load(Ordering::Relaxed);
    let lists = Lists::from_json(&text).expect("lists");
    drop(text);
    let parsed = LIVE.load(Ordering::Relaxed);
    let compiled = CompiledLists::new(&lists);
    let with_compiled = LIVE.load(Ordering::Relaxed);
    println!(
        "100,000-domain list: JSON text {:.1} MB; parsed items {:.1} MB; compiled set {:.1} MB; total live {:.1} MB",
        (with_text - before) as f64 / 1e6,
        (parsed - before) as f64 / 1e6,
        (with_compiled - parsed) as f64 / 1e6,
        (with_compiled - before) as f64 / 1e6,
    );
    drop(compiled);
    drop(lists);

    let (_, _, dns, egress) = setup();
    let d = dns.stage(Stage::Dns);
    println!(
        "DNS rule set: {} rules, {} evaluated for every query",
        d.rules().len(),
        d.unindexed()
    );
    latency("DNS 10,000 rules", Stage::Dns, &dns, &dns_queries());
    latency(
        "egress 1,000 rules",
        Stage::Egress,
        &egress,
        &egress_flows(),
    );
}

fn benches(c: &mut Criterion) {
    let (lists_text, lists, dns, egress) = setup();
    let queries = dns_queries();
    let mut k = 0;
    c.bench_function("dns_10k_rules_query", |b| {
        b.iter(|| {
            k = (k + 1) % queries.len();
            black_box(dns.stage(Stage::Dns).evaluate(black_box(&queries[k])))
        })
    });
    let flows = egress_flows();
    c.bench_function("egress_1k_rules_flow", |b| {
        b.iter(|| {
            k = (k + 1) % flows.len();
            black_box(egress.stage(Stage::Egress).evaluate(black_box(&flows[k])))
        })
    });
    let mut input = Input::new();
    c.bench_function("dns_query_build_input_and_evaluate", |b| {
        b.iter(|| {
            k = (k + 1) % 1000;
            input.clear();
            input.set_host(
                FieldId::DnsFqdn,
                if k % 2 == 0 {
                    "www.site1001.example"
                } else {
                    "tracker77.adnet77.example"
                },
            );
            input.set_ints(FieldId::DnsContentCategory, [7]);
            input.set_str(FieldId::IdentityEmail, "user36@example.com");
            black_box(dns.stage(Stage::Dns).evaluate(&input).is_some())
        })
    });
    let rules_text = dns_rules_json(10_000);
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("parse_and_compile_10k_dns_rules", |b| {
        b.iter(|| {
            let set = RuleSet::from_json(&rules_text).expect("rules");
            black_box(Policy::compile(&set, &lists).expect("compiles"))
        })
    });
    g.bench_function("parse_and_compile_100k_domain_list", |b| {
        b.iter(|| {
            let l = Lists::from_json(&lists_text).expect("lists");
            black_box(CompiledLists::new(&l))
        })
    });
    g.finish();
}

criterion_group!(policy, benches);

fn main() {
    report();
    policy();
    Criterion::default().configure_from_args().final_summary();
}
