//! What one activity line costs the thread that reports it: a DNS record encoded into a
//! sender's buffer, as the resolver does for every query while `logs.dir` is set (the writer
//! thread only swaps the buffers out and writes them). `cargo bench -p waygate-observe`.

use std::hint::black_box;
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use waygate_model::activity::{DnsActivity, ResolverDecision, RuleRef};
use waygate_observe::record::{Clock, Encoder};

#[allow(clippy::disallowed_methods)] // a benchmark: any clock will do
fn bench(c: &mut Criterion) {
    let device = waygate_model::testkit::device().arc();
    let rule = RuleRef::new("6d8f1a52-2f4e-4f8e-9a57-0c8f3f1b9a11", "Block list");
    let now = Instant::now();
    let ips = ["203.0.113.10".parse().unwrap()];
    let allowed = DnsActivity {
        at: now,
        device: Some(&device),
        location: None,
        src_ip: "100.96.0.2".parse().unwrap(),
        query_name: "ok737.allowed.test",
        query_type: 1,
        query_type_name: "A",
        rcode: 0,
        resolved_ips: &ips,
        decision: ResolverDecision::AllowedOnNoPolicyMatch,
        policy: None,
        protocol: "udp",
        cache_hit: true,
        upstream_latency: None,
        query_categories: &[],
        matched_categories: &[],
        resolved_ip_categories: &[],
    };
    let blocked = DnsActivity {
        query_name: "b76862.block93.test",
        rcode: 5,
        resolved_ips: &[],
        decision: ResolverDecision::BlockedByQueryName,
        policy: Some(&rule),
        cache_hit: false,
        device: None,
        location: Some("office"),
        ..allowed
    };
    let mut enc = Encoder::new(Clock {
        instant: now,
        wall: SystemTime::now(),
    });
    let mut out = Vec::with_capacity(1 << 20);
    let mut g = c.benchmark_group("dns_line");
    g.throughput(Throughput::Elements(2));
    g.bench_function("encode_allowed_and_blocked", |b| {
        b.iter(|| {
            if out.len() > (1 << 20) - 2048 {
                out.clear();
            }
            enc.encode_dns(black_box(&allowed), &mut out);
            enc.encode_dns(black_box(&blocked), &mut out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
