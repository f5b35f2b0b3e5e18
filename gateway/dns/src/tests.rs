//! The resolver core with a fake clock and a scripted upstream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{A, AAAA, HTTPS, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use proptest::prelude::*;

use super::*;

fn client() -> ClientCtx {
    ClientCtx::from_ip(IpAddr::V4(Ipv4Addr::new(100, 96, 0, 2)))
}

use crate::testkit::{self, dns_query as query};

/// The upstream's answer to the query the core wrote.
fn upstream_answer(
    up_query: &[u8],
    rcode: ResponseCode,
    records: Vec<Record>,
    authority: Vec<Record>,
) -> Vec<u8> {
    let q = Message::from_vec(up_query).unwrap();
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_response_code(rcode)
        .add_query(q.queries()[0].clone());
    m.insert_answers(records);
    m.insert_name_servers(authority);
    m.to_vec().unwrap()
}

fn a(name: &str, ip: [u8; 4], ttl: u32) -> Record {
    Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        ttl,
        RData::A(A(Ipv4Addr::from(ip))),
    )
}

fn answer_of(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).unwrap()
}

type Policy = fn(&QueryInfo<'_>) -> PolicyVerdict;

fn resolver(policy: Policy) -> Resolver<Policy> {
    Resolver::new(policy, ResolverConfig::default(), 7)
}

fn allow(_: &QueryInfo<'_>) -> PolicyVerdict {
    Decision::Resolve.into()
}

#[test]
fn answers_come_from_upstream_then_from_the_cache_until_the_ttl_ends() {
    let mut r = resolver(allow);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let h = r.handle_query(
        &client(),
        &query(1, "a.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    let Handled::Upstream(ticket) = h else {
        panic!("{h:?}")
    };
    let resp = upstream_answer(
        &out,
        ResponseCode::NoError,
        vec![a("a.example.", [203, 0, 113, 10], 60)],
        vec![],
    );
    assert_eq!(
        r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out),
        Handled::Answer
    );
    let m = answer_of(&out);
    assert_eq!((m.id(), m.answers().len()), (1, 1));

    // Cached: answered at once, TTL counting down.
    let later = t0 + Duration::from_secs(20);
    let h = r.handle_query(
        &client(),
        &query(2, "A.EXAMPLE.", RecordType::A),
        Transport::Udp,
        later,
        &mut out,
    );
    assert_eq!(h, Handled::Answer);
    let m = answer_of(&out);
    assert_eq!(m.id(), 2);
    assert_eq!(m.answers()[0].ttl(), 40);
    assert_eq!(r.stats().cache_hits, 1);

    // Expired: upstream again.
    let expired = t0 + Duration::from_secs(61);
    let h = r.handle_query(
        &client(),
        &query(3, "a.example.", RecordType::A),
        Transport::Udp,
        expired,
        &mut out,
    );
    assert!(matches!(h, Handled::Upstream(_)));
}

#[test]
fn negative_answers_are_cached_for_the_soa_minimum() {
    let mut r = resolver(allow);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let Handled::Upstream(ticket) = r.handle_query(
        &client(),
        &query(1, "nx.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    ) else {
        panic!()
    };
    let soa = SOA::new(
        Name::from_ascii("ns.example.").unwrap(),
        Name::from_ascii("admin.example.").unwrap(),
        1,
        60,
        60,
        60,
        30,
    );
    let soa = Record::from_rdata(Name::from_ascii("example.").unwrap(), 30, RData::SOA(soa));
    let resp = upstream_answer(&out, ResponseCode::NXDomain, vec![], vec![soa]);
    r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
    assert_eq!(answer_of(&out).response_code(), ResponseCode::NXDomain);
    let h = r.handle_query(
        &client(),
        &query(2, "nx.example.", RecordType::A),
        Transport::Udp,
        t0 + Duration::from_secs(10),
        &mut out,
    );
    assert_eq!(h, Handled::Answer);
    assert_eq!(answer_of(&out).response_code(), ResponseCode::NXDomain);
    let h = r.handle_query(
        &client(),
        &query(3, "nx.example.", RecordType::A),
        Transport::Udp,
        t0 + Duration::from_secs(31),
        &mut out,
    );
    assert!(matches!(h, Handled::Upstream(_)));
}

#[test]
fn blocks_and_overrides_are_answered_locally() {
    fn policy(q: &QueryInfo<'_>) -> PolicyVerdict {
        match format!("{}.", q.name).as_str() {
            "blocked.example." => Decision::Block(BlockMode::Refused).into(),
            "zero.example." => Decision::Block(BlockMode::ZeroIp).into(),
            "moved.example." => {
                Decision::OverrideIps(vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 99))]).into()
            }
            _ => Decision::Resolve.into(),
        }
    }
    let mut r = resolver(policy);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let mut ask = |name: &str, t: RecordType| {
        let h = r.handle_query(&client(), &query(9, name, t), Transport::Udp, t0, &mut out);
        assert_eq!(h, Handled::Answer, "{name}");
        answer_of(&out)
    };
    assert_eq!(
        ask("blocked.example.", RecordType::A).response_code(),
        ResponseCode::Refused
    );
    let zero = ask("zero.example.", RecordType::AAAA);
    assert_eq!(
        zero.answers()[0].data(),
        &RData::AAAA(AAAA(Ipv6Addr::UNSPECIFIED))
    );
    let moved = ask("moved.example.", RecordType::A);
    assert_eq!(
        moved.answers()[0].data(),
        &RData::A(A(Ipv4Addr::new(203, 0, 113, 99)))
    );
    assert_eq!(
        moved.answers()[0].ttl(),
        ResolverConfig::default().local_ttl
    );
    assert_eq!(
        ask("moved.example.", RecordType::MX).response_code(),
        ResponseCode::Refused
    );
}

#[test]
fn safesearch_answers_the_cname_then_the_targets_records() {
    fn policy(q: &QueryInfo<'_>) -> PolicyVerdict {
        rules::safe_search(q.name)
            .unwrap_or(Decision::Resolve)
            .into()
    }
    let mut r = resolver(policy);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let Handled::Upstream(ticket) = r.handle_query(
        &client(),
        &query(4, "www.google.com.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    ) else {
        panic!()
    };
    let up = answer_of(&out);
    assert_eq!(
        up.queries()[0].name().to_ascii(),
        "forcesafesearch.google.com."
    );
    let resp = upstream_answer(
        &out,
        ResponseCode::NoError,
        vec![a("forcesafesearch.google.com.", [203, 0, 113, 61], 300)],
        vec![],
    );
    r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
    let m = answer_of(&out);
    assert_eq!(m.queries()[0].name().to_ascii(), "www.google.com.");
    assert!(
        matches!(m.answers()[0].data(), RData::CNAME(c) if c.0.to_ascii() == "forcesafesearch.google.com.")
    );
    assert_eq!(
        m.answers()[1].data(),
        &RData::A(A(Ipv4Addr::new(203, 0, 113, 61)))
    );
}

#[test]
fn a_blocked_family_loses_its_hints_in_https_answers() {
    fn policy(q: &QueryInfo<'_>) -> PolicyVerdict {
        if q.qtype == RecordType::AAAA {
            Decision::Block(BlockMode::Refused).into()
        } else {
            Decision::Resolve.into()
        }
    }
    let mut r = resolver(policy);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let Handled::Upstream(ticket) = r.handle_query(
        &client(),
        &query(5, "h.example.", RecordType::HTTPS),
        Transport::Udp,
        t0,
        &mut out,
    ) else {
        panic!()
    };
    let svcb = SVCB::new(
        1,
        Name::root(),
        vec![
            (
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::new(203, 0, 113, 10))])),
            ),
            (
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(vec![AAAA(Ipv6Addr::LOCALHOST)])),
            ),
        ],
    );
    let rec = Record::from_rdata(
        Name::from_ascii("h.example.").unwrap(),
        300,
        RData::HTTPS(HTTPS(svcb)),
    );
    let resp = upstream_answer(&out, ResponseCode::NoError, vec![rec], vec![]);
    r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
    let m = answer_of(&out);
    let RData::HTTPS(h) = m.answers()[0].data() else {
        panic!("{m:?}")
    };
    let keys: Vec<_> = h.svc_params().iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, vec![SvcParamKey::Ipv4Hint]);
}

#[test]
fn malformed_queries_get_formerr_and_responses_are_dropped() {
    let mut r = resolver(allow);
    let t0 = test_epoch();
    let mut out = Vec::new();
    // A header with a question count but no question.
    let h = r.handle_query(
        &client(),
        &[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        Transport::Udp,
        t0,
        &mut out,
    );
    assert_eq!(h, Handled::Answer);
    let m = answer_of(&out);
    assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::FormErr));
    // Too short for an id: nothing to answer.
    assert_eq!(
        r.handle_query(&client(), &[7], Transport::Udp, t0, &mut out),
        Handled::Drop
    );
    // A response sent as a query is never answered (no ping-pong between resolvers).
    let mut resp = query(1, "a.example.", RecordType::A);
    resp[2] |= 0x80;
    assert_eq!(
        r.handle_query(&client(), &resp, Transport::Udp, t0, &mut out),
        Handled::Drop
    );
    // An upstream answer for an unknown ticket or with the wrong id is not trusted.
    assert_eq!(
        r.handle_upstream(999, Some(&resp), "up", t0, &mut out),
        Handled::Drop
    );
}

proptest! {
    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut r = resolver(allow);
        let mut out = Vec::new();
        let t0 = test_epoch();
        if let Handled::Upstream(ticket) = r.handle_query(&client(), &bytes, Transport::Udp, t0, &mut out) {
            let _ = r.handle_upstream(ticket, Some(&bytes), "up", t0, &mut out);
        }
    }

    #[test]
    fn mutated_queries_never_panic(flips in proptest::collection::vec((0usize..40, any::<u8>()), 1..6)) {
        let mut q = query(1, "www.a.example.", RecordType::A);
        for (i, b) in flips {
            if let Some(x) = q.get_mut(i) {
                *x = b;
            }
        }
        let mut r = resolver(allow);
        let mut out = Vec::new();
        let t0 = test_epoch();
        match r.handle_query(&client(), &q, Transport::Udp, t0, &mut out) {
            Handled::Answer => prop_assert!(Message::from_vec(&out).is_ok()),
            Handled::Upstream(ticket) => {
                let resp = q.clone();
                let _ = r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
            }
            Handled::Drop => {}
        }
    }
}

#[test]
fn the_fast_path_answers_byte_for_byte_like_the_full_path() {
    let mut r = resolver(allow);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let ask = |r: &mut Resolver<Policy>, q: &[u8], out: &mut Vec<u8>| {
        r.handle_query(&client(), q, Transport::Udp, t0, out)
    };
    let q = query(7, "a.example.", RecordType::A);
    let Handled::Upstream(ticket) = ask(&mut r, &q, &mut out) else {
        panic!("not sent upstream")
    };
    let resp = upstream_answer(
        &out,
        ResponseCode::NoError,
        vec![
            a("a.example.", [203, 0, 113, 10], 60),
            a("a.example.", [203, 0, 113, 11], 60),
        ],
        vec![],
    );
    r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
    let full = out.clone();
    // Same question at the same instant: replayed from the bytes just sent.
    assert_eq!(ask(&mut r, &q, &mut out), Handled::Answer);
    assert_eq!(out, full);
    assert_eq!(r.stats().cache_hits, 1);
    assert_eq!(r.stats().replayed, 1, "answered on the fast path");

    // A block answered from the query's bytes reads like one built by the full parser.
    fn block(q: &QueryInfo<'_>) -> PolicyVerdict {
        match q.name {
            "zero.example" => Decision::Block(BlockMode::ZeroIp).into(),
            "page.example" => {
                Decision::Block(BlockMode::Address(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 80)))).into()
            }
            _ => Decision::Block(BlockMode::NxDomain).into(),
        }
    }
    let mut r = resolver(block);
    for (name, qtype, rcode, answers) in [
        ("zero.example.", RecordType::AAAA, ResponseCode::NoError, 1),
        ("zero.example.", RecordType::MX, ResponseCode::NoError, 0),
        ("gone.example.", RecordType::A, ResponseCode::NXDomain, 0),
        ("page.example.", RecordType::A, ResponseCode::NoError, 1),
        ("page.example.", RecordType::AAAA, ResponseCode::NoError, 0),
    ] {
        let mut m = Message::from_vec(&query(9, name, qtype)).unwrap();
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
        let h = ask(&mut r, &m.to_vec().unwrap(), &mut out);
        assert_eq!(h, Handled::Answer);
        let got = answer_of(&out);
        assert_eq!(
            (got.id(), got.response_code(), got.answers().len()),
            (9, rcode, answers),
            "{name}"
        );
        assert_eq!(got.queries()[0].query_type(), qtype);
        if name == "page.example." && qtype == RecordType::A {
            assert_eq!(
                got.answers()[0].data(),
                &RData::A(A(Ipv4Addr::new(192, 0, 2, 80)))
            );
        }
        assert!(got.extensions().is_some(), "EDNS answered with EDNS");
    }
}

#[test]
fn the_policy_decides_each_query_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static DECIDED: AtomicUsize = AtomicUsize::new(0);
    fn counting(_: &QueryInfo<'_>) -> PolicyVerdict {
        DECIDED.fetch_add(1, Ordering::Relaxed);
        Decision::Resolve.into()
    }
    let mut r = resolver(counting);
    let mut out = Vec::new();
    let q = query(3, "miss.example.", RecordType::A);
    // Not in the cache: the fast path decides, the full path sends it upstream on that verdict.
    let h = r.handle_query(&client(), &q, Transport::Udp, test_epoch(), &mut out);
    assert!(matches!(h, Handled::Upstream(_)), "{h:?}");
    assert_eq!(DECIDED.load(Ordering::Relaxed), 1);
}

#[test]
fn a_device_answers_are_reported_with_aged_ttls_and_an_address_client_is_not() {
    use std::sync::{Arc, Mutex};
    /// Device id, address, host, TTL.
    type Report = (String, IpAddr, String, u32);
    let heard: Arc<Mutex<Vec<Report>>> = Arc::default();
    let mut r = resolver(allow);
    let sink = heard.clone();
    r.set_learn_sink(Box::new(move |device, ip, names, ttl| {
        sink.lock()
            .unwrap()
            .push((device.to_string(), ip, names.host.to_string(), ttl));
    }));
    let mut device = client();
    device.device = Some(testkit::device().id("d-ada").name("ada-laptop").arc());
    let t0 = test_epoch();
    let mut out = Vec::new();
    let h = r.handle_query(
        &device,
        &query(1, "web.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    let Handled::Upstream(ticket) = h else {
        panic!("{h:?}")
    };
    let resp = upstream_answer(
        &out,
        ResponseCode::NoError,
        vec![a("web.example.", [203, 0, 113, 10], 60)],
        vec![],
    );
    r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
    let ip = IpAddr::from([203, 0, 113, 10]);
    let first = (String::from("d-ada"), ip, String::from("web.example"), 60);
    assert_eq!(*heard.lock().unwrap(), vec![first.clone()]);

    // From the cache 20 s later: reported again with what is left of the TTL.
    let later = t0 + Duration::from_secs(20);
    let q = query(2, "web.example.", RecordType::A);
    assert_eq!(
        r.handle_query(&device, &q, Transport::Udp, later, &mut out),
        Handled::Answer
    );
    let second = (String::from("d-ada"), ip, String::from("web.example"), 40);
    assert_eq!(*heard.lock().unwrap(), vec![first.clone(), second.clone()]);

    // A client known only by its address (a location) gets the answer, nothing is reported.
    assert_eq!(
        r.handle_query(&client(), &q, Transport::Udp, later, &mut out),
        Handled::Answer
    );
    assert_eq!(*heard.lock().unwrap(), vec![first, second]);
}

#[test]
fn one_client_cannot_take_every_pending_upstream_query() {
    let config = ResolverConfig {
        max_pending_per_client: 3,
        ..ResolverConfig::default()
    };
    let mut r: Resolver<Policy> = Resolver::new(allow, config, 7);
    let t0 = test_epoch();
    let mut out = Vec::new();
    let other = ClientCtx::from_ip(IpAddr::V4(Ipv4Addr::new(100, 96, 0, 3)));
    let mut tickets = Vec::new();
    for i in 0..3u16 {
        let q = query(i, &format!("n{i}.example."), RecordType::A);
        match r.handle_query(&client(), &q, Transport::Udp, t0, &mut out) {
            Handled::Upstream(t) => tickets.push(t),
            h => panic!("{h:?}"),
        }
    }
    // The fourth fresh name of the same client is refused at once, another client's goes on.
    let h = r.handle_query(
        &client(),
        &query(9, "n9.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    assert_eq!(h, Handled::Answer);
    assert_eq!(answer_of(&out).response_code(), ResponseCode::ServFail);
    assert_eq!(r.stats().client_limited, 1);
    let h = r.handle_query(
        &other,
        &query(10, "o.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    assert!(matches!(h, Handled::Upstream(_)), "{h:?}");
    // An upstream that failed frees the client's place.
    assert_eq!(
        r.handle_upstream(tickets[0], None, "up", t0, &mut out),
        Handled::Answer
    );
    let h = r.handle_query(
        &client(),
        &query(11, "n11.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    assert!(matches!(h, Handled::Upstream(_)), "{h:?}");
}

/// Log lines written while `f` runs, as text.
fn logged(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn malformed_query_lines_name_the_device_and_are_rate_limited() {
    use super::resolver::{MALFORMED_LOG_BURST, MALFORMED_LOG_EVERY};
    let mut r = resolver(allow);
    let mut device = client();
    device.public_ip = Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)));
    device.device = Some(
        testkit::device()
            .id("d-mallory")
            .name("mallory-laptop")
            .email("mallory@example.com")
            .arc(),
    );
    let garbage = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    let t0 = test_epoch();
    let mut out = Vec::new();
    let flood = 1_000;
    let text = logged(|| {
        for _ in 0..flood {
            let h = r.handle_query(&device, &garbage, Transport::Udp, t0, &mut out);
            assert_eq!(h, Handled::Answer, "every one still gets its FORMERR");
        }
        // Nothing more until the interval is over, then one summary.
        r.poll_log(t0 + MALFORMED_LOG_EVERY / 2);
        r.poll_log(t0 + MALFORMED_LOG_EVERY);
        r.poll_log(t0 + MALFORMED_LOG_EVERY * 3);
    });
    let lines: Vec<&str> = text.lines().collect();
    let burst = MALFORMED_LOG_BURST as usize;
    assert_eq!(lines.len(), burst + 1, "{text}");
    for line in &lines[..burst] {
        assert!(line.contains("malformed dns query"), "{line}");
        assert!(line.contains("device=\"mallory-laptop\""), "{line}");
        assert!(line.contains("device_id=\"d-mallory\""), "{line}");
        assert!(line.contains("src_ip=100.96.0.2"), "{line}");
        assert!(line.contains("public_ip=198.51.100.7"), "{line}");
    }
    let summary = lines[burst];
    assert!(
        summary.contains("malformed dns queries not logged"),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("suppressed={}", flood - burst)),
        "{summary}"
    );
    assert!(
        summary.contains("last_device=\"mallory-laptop\""),
        "{summary}"
    );
    assert_eq!(r.stats().formerr, flood as u64);

    // A query from an address alone (a `dns.listen` client) names the address.
    let text = logged(|| {
        r.handle_query(
            &client(),
            &garbage,
            Transport::Udp,
            t0 + MALFORMED_LOG_EVERY * 4,
            &mut out,
        );
    });
    assert!(text.contains("src_ip=100.96.0.2"), "{text}");
    assert!(text.contains("device=\"\""), "{text}");
}

#[test]
fn every_answer_is_counted_and_reported_with_its_decision_once_a_sink_is_set() {
    use std::sync::{Arc, Mutex};
    use waygate_model::activity::{DnsActivity, ResolverDecision};
    fn policy(q: &QueryInfo<'_>) -> PolicyVerdict {
        if q.name == "blocked.example" {
            PolicyVerdict {
                decision: Decision::Block(BlockMode::NxDomain),
                rule: Some(Arc::from("block-list (Block list)")),
                policy: Some(Arc::new(waygate_model::activity::RuleRef::new(
                    "block-list",
                    "Block list",
                ))),
            }
        } else {
            Decision::Resolve.into()
        }
    }
    let mut r = resolver(policy);
    let t0 = test_epoch();
    let mut out = Vec::new();
    // Without a sink nothing is built, but the counters move.
    r.handle_query(
        &client(),
        &query(1, "blocked.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    assert_eq!(r.stats().answers[0][3], 1, "A NXDOMAIN");
    assert_eq!(r.stats().decisions[1], 1, "block");
    /// What the test reads of each record, owned (the resolver lends them).
    struct Seen {
        query_name: String,
        query_type_name: &'static str,
        rcode: u16,
        decision: ResolverDecision,
        cache_hit: bool,
        policy: Option<String>,
        resolved_ips: Vec<IpAddr>,
        upstream_latency: Option<Duration>,
        protocol: &'static str,
    }
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let into = seen.clone();
    let into_seen = seen.clone();
    r.set_activity_sink(Box::new(move |a: &DnsActivity<'_>| {
        into.lock().unwrap().push(Seen {
            query_name: a.query_name.to_string(),
            query_type_name: a.query_type_name,
            rcode: a.rcode,
            decision: a.decision,
            cache_hit: a.cache_hit,
            policy: a.policy.map(|p| p.id.to_string()),
            resolved_ips: a.resolved_ips.to_vec(),
            upstream_latency: a.upstream_latency,
            protocol: a.protocol,
        })
    }));
    // Blocked on the fast path.
    r.handle_query(
        &client(),
        &query(2, "blocked.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    );
    // Resolved upstream, then replayed from the cache.
    let Handled::Upstream(ticket) = r.handle_query(
        &client(),
        &query(3, "a.example.", RecordType::A),
        Transport::Udp,
        t0,
        &mut out,
    ) else {
        panic!("upstream expected")
    };
    let resp = upstream_answer(
        &out,
        ResponseCode::NoError,
        vec![a("a.example.", [203, 0, 113, 10], 60)],
        vec![],
    );
    let later = t0 + Duration::from_millis(20);
    r.handle_upstream(ticket, Some(&resp), "up", later, &mut out);
    r.handle_query(
        &client(),
        &query(4, "a.example.", RecordType::A),
        Transport::Stream,
        later,
        &mut out,
    );
    // The upstream fails.
    let Handled::Upstream(ticket) = r.handle_query(
        &client(),
        &query(5, "b.example.", RecordType::AAAA),
        Transport::Udp,
        t0,
        &mut out,
    ) else {
        panic!("upstream expected")
    };
    r.handle_upstream(ticket, None, "up", later, &mut out);
    let seen = seen.lock().unwrap();
    let got: Vec<(&str, &str, u16, ResolverDecision, bool)> = seen
        .iter()
        .map(|a| {
            (
                &*a.query_name,
                a.query_type_name,
                a.rcode,
                a.decision,
                a.cache_hit,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "blocked.example",
                "A",
                3,
                ResolverDecision::BlockedByQueryName,
                false
            ),
            (
                "a.example",
                "A",
                0,
                ResolverDecision::AllowedOnNoPolicyMatch,
                false
            ),
            (
                "a.example",
                "A",
                0,
                ResolverDecision::AllowedOnNoPolicyMatch,
                true
            ),
            (
                "b.example",
                "AAAA",
                2,
                ResolverDecision::AllowedOnNoPolicyMatch,
                false
            ),
        ]
    );
    assert_eq!(seen[0].policy.as_deref(), Some("block-list"));
    assert_eq!(
        seen[1].resolved_ips,
        vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10))]
    );
    assert_eq!(seen[1].upstream_latency, Some(Duration::from_millis(20)));
    assert_eq!(seen[2].resolved_ips, seen[1].resolved_ips);
    assert_eq!((seen[1].protocol, seen[2].protocol), ("udp", "tcp"));
    let stats = r.stats();
    assert_eq!(stats.upstream_errors, 1);
    assert_eq!(stats.answers[1][2], 1, "AAAA SERVFAIL");
    assert_eq!(stats.upstream_latency.count(), 2);
    assert_eq!(stats.decisions[0], 3, "allow");
    // The replay's addresses do not leak into the next record (their list is reused).
    assert!(seen[3].resolved_ips.is_empty());
    drop(seen);
    // DNS over TLS and over HTTPS say so in the record (Logpush `Protocol`).
    for (id, transport) in [(6, Transport::Tls), (7, Transport::Https)] {
        r.handle_query(
            &client(),
            &query(id, "a.example.", RecordType::A),
            transport,
            later,
            &mut out,
        );
    }
    r.handle_query(
        &client(),
        &query(8, "blocked.example.", RecordType::A),
        Transport::Https,
        later,
        &mut out,
    );
    let seen = into_seen.lock().unwrap();
    let tail: Vec<(&str, &str, usize)> = seen[4..]
        .iter()
        .map(|a| (&*a.query_name, a.protocol, a.resolved_ips.len()))
        .collect();
    assert_eq!(
        tail,
        [
            ("a.example", "tls", 1),
            ("a.example", "https", 1),
            ("blocked.example", "https", 0)
        ]
    );
}

#[test]
fn activity_records_carry_the_categories_of_the_name_the_rule_and_the_answer() {
    use std::sync::{Arc, Mutex};
    use waygate_model::activity::DnsActivity;
    use waygate_policy::category_db::CategoryDb;
    use waygate_policy::ruleset::{Lists, RuleSet};
    use waygate_stages::policy::Loaded;

    let set = RuleSet::from_json(
        r#"[{"id": "no-gambling", "name": "No gambling", "action": "block", "filters": ["dns"],
             "traffic": "any(dns.content_category[*] in {8})"}]"#,
    )
    .unwrap();
    let loaded = Loaded::compile(&set, &Lists::new(Vec::new())).unwrap();
    let mut db = CategoryDb::new();
    db.insert("casino.example", 99);
    db.insert("casino.example", 122);
    db.insert("news.example", 122);
    db.insert_ip("203.0.113.66".parse().unwrap(), 117);
    let rules = crate::rules::DnsRules::new(Arc::new(loaded), None, None)
        .with_categories(Some(Arc::new(db)));
    let mut r = Resolver::new(rules, ResolverConfig::default(), 7);
    type Cats = (String, Vec<u16>, Vec<u16>, Vec<u16>);
    let seen: Arc<Mutex<Vec<Cats>>> = Arc::default();
    let into = seen.clone();
    r.set_activity_sink(Box::new(move |a: &DnsActivity<'_>| {
        into.lock().unwrap().push((
            a.query_name.to_string(),
            a.query_categories.to_vec(),
            a.matched_categories.to_vec(),
            a.resolved_ip_categories.to_vec(),
        ))
    }));
    let t0 = test_epoch();
    let mut out = Vec::new();
    let q = query(1, "www.casino.example.", RecordType::A);
    assert_eq!(
        r.handle_query(&client(), &q, Transport::Udp, t0, &mut out),
        Handled::Answer
    );
    let q = query(2, "news.example.", RecordType::A);
    let Handled::Upstream(ticket) = r.handle_query(&client(), &q, Transport::Udp, t0, &mut out)
    else {
        panic!("upstream expected")
    };
    let resp = upstream_answer(
        &out,
        ResponseCode::NoError,
        vec![
            a("news.example.", [203, 0, 113, 66], 60),
            a("news.example.", [203, 0, 113, 67], 60),
        ],
        vec![],
    );
    r.handle_upstream(ticket, Some(&resp), "up", t0, &mut out);
    let q = query(3, "plain.example.", RecordType::A);
    let Handled::Upstream(ticket) = r.handle_query(&client(), &q, Transport::Udp, t0, &mut out)
    else {
        panic!("upstream expected")
    };
    r.handle_upstream(ticket, None, "up", t0, &mut out);
    let seen = seen.lock().unwrap();
    let none: Vec<u16> = Vec::new();
    assert_eq!(
        *seen,
        [
            // Blocked by the rule on 8 (Gambling): 99 is its subcategory, 122 is not tested.
            (
                "www.casino.example".to_string(),
                vec![99, 122],
                vec![99],
                none.clone()
            ),
            (
                "news.example".to_string(),
                vec![122],
                none.clone(),
                vec![117]
            ),
            (
                "plain.example".to_string(),
                none.clone(),
                none.clone(),
                none
            ),
        ]
    );
}
