//! The resolver core's work per query, without sockets: the query mix of scripts/bench-dns.sh
//! (half blocked by a 1,000,000-domain list, half allowed names answered from the cache) through
//! `Resolver::handle_query` with the real rule engine. What this measures is the userspace part
//! of a query's cost; bench-dns.sh measures it together with the kernel's.
//!
//! The second group does the same with activity logs on: every query's `dns.jsonl` line is
//! encoded as the runtime's sink does (into a buffer the log writer would take), so the
//! difference between the groups is what logging costs the resolving thread.
//!
//! Run: `cargo bench -p waygate-dns --bench dns_query -- --warm-up-time 1 --measurement-time 3`.
//! Instructions per query, unaffected by a busy machine: run the bench binary under
//! `valgrind --tool=callgrind --toggle-collect='*Resolver*handle_query*'` with
//! `--profile-time 2 'logs off'` (or `'logs on'`) and divide Ir by the calls.
//! The queries come from a `dns.listen` client (no device) as in bench-dns.sh;
//! `BENCH_DEVICE=1` sends them as a tunnel device's, whose lines carry its identity fields.
// A benchmark is a shell: it reads the clock.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use waygate_dns::rules::DnsRules;
use waygate_dns::testkit;
use waygate_dns::{ClientCtx, Handled, Resolver, ResolverConfig, Transport};
use waygate_model::activity::DnsActivity;
use waygate_observe::record::{Clock, Encoder};
use waygate_policy::ruleset::{Lists, RuleSet};
use waygate_stages::policy::Loaded;

const DOMAINS: usize = 1_000_000;
const ALLOWED: usize = 1_000;
const MIX: usize = 1 << 14;

fn blocked(i: usize) -> String {
    format!("b{i}.block{}.test", i % 997)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    testkit::dns_query(id, name, RecordType::A)
}

fn answer(up_query: &[u8]) -> Vec<u8> {
    let q = Message::from_vec(up_query).expect("upstream query");
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_response_code(ResponseCode::NoError)
        .add_query(q.queries()[0].clone());
    m.add_answer(Record::from_rdata(
        q.queries()[0].name().clone(),
        86_400,
        RData::A(A(Ipv4Addr::new(203, 0, 113, 10))),
    ));
    m.to_vec().expect("answer")
}

/// The list's size: `BENCH_DOMAINS` (a smaller list loads faster under callgrind; a query's
/// instructions hardly depend on it), else [`DOMAINS`].
fn domains() -> usize {
    std::env::var("BENCH_DOMAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DOMAINS)
}

fn resolver() -> Resolver<DnsRules> {
    let names: Vec<String> = (0..domains()).map(blocked).collect();
    let lists =
        serde_json::json!([{"id": "bench", "name": "Bench", "type": "DOMAIN", "items": names}]);
    let rules = serde_json::json!([{"id": "block", "name": "Block list", "action": "block",
        "filters": ["dns"], "traffic": "any(dns.domains[*] in $bench)"}]);
    let set = RuleSet::from_json(&rules.to_string()).expect("rules");
    let lists = Lists::from_json(&lists.to_string()).expect("lists");
    let loaded = Loaded::compile(&set, &lists).expect("compile");
    let rules = DnsRules::new(Arc::new(loaded), None, None);
    Resolver::new(rules, ResolverConfig::default(), 7)
}

fn bench(c: &mut Criterion) {
    let mut r = resolver();
    let mut client = ClientCtx::from_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    if std::env::var_os("BENCH_DEVICE").is_some() {
        client.device = Some(
            waygate_model::testkit::device()
                .name("ada-laptop")
                .vnet("6f1d0f3e-1b0c-4f5e-9a3b-2d8c5e7f9a10")
                .arc(),
        );
    }
    let now = Instant::now();
    let mut out = Vec::with_capacity(1232);
    for i in 0..ALLOWED {
        let q = query(1, &format!("ok{i}.allowed.test"));
        let Handled::Upstream(ticket) = r.handle_query(&client, &q, Transport::Udp, now, &mut out)
        else {
            panic!("an allowed name goes upstream first");
        };
        let resp = answer(&out);
        assert_eq!(
            r.handle_upstream(ticket, Some(&resp), "bench", now, &mut out),
            Handled::Answer
        );
    }
    // The same pseudo-random mix as the script: half blocked, half cached.
    let mut seed = 7u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let domains = domains();
    let mix: Vec<Vec<u8>> = (0..MIX)
        .map(|i| {
            let id = i as u16;
            if next() % 2 == 0 {
                query(id, &blocked(next() as usize % domains))
            } else {
                query(id, &format!("ok{}.allowed.test", next() as usize % ALLOWED))
            }
        })
        .collect();
    let before = r.stats();
    for q in &mix {
        assert_eq!(
            r.handle_query(&client, q, Transport::Udp, now, &mut out),
            Handled::Answer
        );
    }
    // Every query of the mix takes the fast path: replayed from the cache or blocked locally.
    let after = r.stats();
    assert_eq!(
        (after.replayed - before.replayed) + (after.local - before.local),
        MIX as u64
    );

    let mut group = c.benchmark_group("dns query");
    group.throughput(Throughput::Elements(MIX as u64));
    group.bench_function(
        "1M-domain block list, half blocked, half cached, logs off",
        |b| {
            b.iter(|| {
                for q in &mix {
                    black_box(r.handle_query(&client, black_box(q), Transport::Udp, now, &mut out));
                }
            })
        },
    );
    let mut encoder = Encoder::new(Clock {
        instant: now,
        wall: SystemTime::now(),
    });
    let mut lines = Vec::with_capacity(1 << 22);
    r.set_activity_sink(Box::new(move |a: &DnsActivity<'_>| {
        // The writer takes the buffer about every 10 ms; clearing stands in for that.
        if lines.len() > (1 << 22) - 4096 {
            lines.clear();
        }
        encoder.encode_dns(a, &mut lines);
    }));
    group.bench_function(
        "1M-domain block list, half blocked, half cached, logs on",
        |b| {
            b.iter(|| {
                for q in &mix {
                    black_box(r.handle_query(&client, black_box(q), Transport::Udp, now, &mut out));
                }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
