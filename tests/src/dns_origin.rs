//! The lab's DNS upstream: a fixed zone answering over UDP and TCP, so DNS tests know what the
//! gateway's resolver got from upstream.
//!
//! - `nx.example`: NXDOMAIN (with an SOA, for negative caching).
//! - `alias.example`: CNAME to `a.example`, then its addresses.
//! - SafeSearch and YouTube targets (`forcesafesearch.google.com`, `strict.bing.com`,
//!   `safe.duckduckgo.com`, `restrict.youtube.com`, `restrictmoderate.youtube.com`): their own
//!   addresses in 203.0.113.0/24 ([`SAFE_TARGETS`]), so a rewritten answer shows.
//! - Every other name: A [`DEFAULT_V4`], AAAA [`DEFAULT_V6`], and an HTTPS record with both
//!   address hints.
//! - `serial.example`: TXT with a counter, increased per upstream answer (shows caching).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Address of every ordinary name.
pub const DEFAULT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// IPv6 address of every ordinary name.
pub const DEFAULT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10);
/// The SafeSearch / YouTube restricted targets and their lab addresses.
pub const SAFE_TARGETS: [(&str, Ipv4Addr); 5] = [
    ("forcesafesearch.google.com", Ipv4Addr::new(203, 0, 113, 61)),
    ("strict.bing.com", Ipv4Addr::new(203, 0, 113, 62)),
    ("safe.duckduckgo.com", Ipv4Addr::new(203, 0, 113, 63)),
    ("restrict.youtube.com", Ipv4Addr::new(203, 0, 113, 64)),
    (
        "restrictmoderate.youtube.com",
        Ipv4Addr::new(203, 0, 113, 65),
    ),
];

static SERIAL: AtomicU64 = AtomicU64::new(0);

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

fn records_for(qname: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
    let lower = qname.to_lowercase().to_ascii();
    let host = lower.trim_end_matches('.');
    let ttl = 300;
    if host == "nx.example" {
        let soa = SOA::new(
            name("ns.example."),
            name("admin.example."),
            1,
            60,
            60,
            60,
            30,
        );
        let soa = Record::from_rdata(name("example."), 30, RData::SOA(soa));
        return (ResponseCode::NXDomain, Vec::new(), vec![soa]);
    }
    if host == "alias.example" {
        let target = name("a.example.");
        let mut out = vec![Record::from_rdata(
            qname.clone(),
            ttl,
            RData::CNAME(CNAME(target.clone())),
        )];
        out.extend(addresses(&target, qtype, DEFAULT_V4));
        return (ResponseCode::NoError, out, Vec::new());
    }
    if host == "serial.example" && qtype == RecordType::TXT {
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let txt = TXT::new(vec![n.to_string()]);
        let r = Record::from_rdata(qname.clone(), ttl, RData::TXT(txt));
        return (ResponseCode::NoError, vec![r], Vec::new());
    }
    let v4 = SAFE_TARGETS
        .iter()
        .find(|(n, _)| *n == host)
        .map_or(DEFAULT_V4, |(_, a)| *a);
    (
        ResponseCode::NoError,
        addresses(qname, qtype, v4),
        Vec::new(),
    )
}

fn addresses(owner: &Name, qtype: RecordType, v4: Ipv4Addr) -> Vec<Record> {
    let ttl = 300;
    let data = match qtype {
        RecordType::A => RData::A(A(v4)),
        RecordType::AAAA => RData::AAAA(AAAA(DEFAULT_V6)),
        RecordType::HTTPS => RData::HTTPS(HTTPS(SVCB::new(
            1,
            Name::root(),
            vec![
                (
                    SvcParamKey::Ipv4Hint,
                    SvcParamValue::Ipv4Hint(IpHint(vec![A(v4)])),
                ),
                (
                    SvcParamKey::Ipv6Hint,
                    SvcParamValue::Ipv6Hint(IpHint(vec![AAAA(DEFAULT_V6)])),
                ),
            ],
        ))),
        _ => return Vec::new(),
    };
    vec![Record::from_rdata(owner.clone(), ttl, data)]
}

/// The answer to `query`, or `None` for bytes that are no query.
pub fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    if msg.message_type() != MessageType::Query {
        return None;
    }
    let mut reply = Message::new();
    reply
        .set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    if let [q] = msg.queries() {
        let (rcode, answers, authority) = records_for(q.name(), q.query_type());
        reply.add_query(q.clone()).set_response_code(rcode);
        reply.insert_answers(answers);
        reply.insert_name_servers(authority);
    } else {
        reply.set_response_code(ResponseCode::FormErr);
    }
    reply.to_vec().ok()
}

/// Serves the zone on UDP and TCP `addr` until the process ends.
pub fn serve(addr: SocketAddr) -> Result<Vec<thread::JoinHandle<()>>, String> {
    let udp = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
    let tcp = TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
    let u = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                continue;
            };
            if let Some(a) = answer(&buf[..n]) {
                let _ = udp.send_to(&a, from);
            }
        }
    });
    let t = thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut s) = conn else { continue };
            thread::spawn(move || loop {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).is_err() {
                    return;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut q).is_err() {
                    return;
                }
                let Some(a) = answer(&q) else { return };
                let Ok(n) = u16::try_from(a.len()) else {
                    return;
                };
                if s.write_all(&n.to_be_bytes())
                    .and_then(|_| s.write_all(&a))
                    .is_err()
                {
                    return;
                }
            });
        }
    });
    Ok(vec![u, t])
}
