//! The lines: each activity record as one JSON object with Logpush's field names
//! (`gateway_dns`, `gateway_network`; egress lines borrow the network names), and the files
//! they go to.
//!
//! Fields the gateway has no value for are written empty (`""`) as Logpush does, except a few
//! of Waygate's own (`BytesSent`, `BytesReceived`, `DurationMs` on network lines, `EgressIP` on
//! egress lines).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use waygate_model::activity::{
    Activity, DnsActivity, EgressActivity, HttpActivity, NetworkActivity, RuleRef,
};
use waygate_model::calendar::{civil_from_days, days_from_civil};
use waygate_model::{DeviceInfo, Protocol};

/// Which log a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    /// `dns.jsonl`: one line per DNS query.
    Dns,
    /// `network.jsonl`: one line per flow, at its close or refusal.
    Network,
    /// `http.jsonl`: one line per HTTP request.
    Http,
    /// `egress.jsonl`: one line per egress decision.
    Egress,
}

impl LogKind {
    /// Every log.
    pub const ALL: [LogKind; 4] = [
        LogKind::Dns,
        LogKind::Network,
        LogKind::Http,
        LogKind::Egress,
    ];

    /// The file's stem (`dns` for `dns.jsonl`), also the `--type` word and the metric label.
    pub fn name(self) -> &'static str {
        match self {
            LogKind::Dns => "dns",
            LogKind::Network => "network",
            LogKind::Http => "http",
            LogKind::Egress => "egress",
        }
    }

    /// The log called `name`.
    pub fn from_name(name: &str) -> Option<LogKind> {
        LogKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The log `activity` goes to (DNS lines come as [`DnsActivity`], not as an [`Activity`]).
    pub fn of(activity: &Activity) -> LogKind {
        match activity {
            Activity::Network(_) => LogKind::Network,
            Activity::Egress(_) => LogKind::Egress,
            Activity::Http(_) => LogKind::Http,
        }
    }

    /// The current file's name (`dns.jsonl`).
    pub fn file_name(self) -> String {
        format!("{}.jsonl", self.name())
    }

    /// The name of rotated file `n` (`dns.1.jsonl` is the newest).
    pub fn rotated_name(self, n: usize) -> String {
        format!("{}.{n}.jsonl", self.name())
    }
}

/// `t` as Logpush writes it: RFC 3339 in UTC with milliseconds (`2026-07-27T00:01:07.123Z`).
pub fn datetime(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The time a [`datetime`] string names (also without milliseconds, or with any fraction).
pub fn parse_datetime(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut nanos = 0u64;
    if b.get(19) == Some(&b'.') {
        let frac: String = text[20..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let digits = frac.len().min(9);
        nanos = frac.get(..digits)?.parse::<u64>().ok()? * 10u64.pow(9 - digits as u32);
    }
    let days = days_from_civil(y as i64, m as u32, d as u32)?;
    let secs = u64::try_from(days).ok()? * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::new(secs, nanos as u32))
}

/// Identity fields every line carries.
struct Who<'a> {
    id: &'a str,
    name: &'a str,
    email: &'a str,
    vnet: &'a str,
}

fn who(device: Option<&DeviceInfo>) -> Who<'_> {
    match device {
        Some(d) => Who {
            id: &d.id,
            name: &d.name,
            email: &d.email,
            vnet: d.vnet_id.as_deref().unwrap_or(""),
        },
        None => Who {
            id: "",
            name: "",
            email: "",
            vnet: "",
        },
    }
}

fn policy(rule: Option<&RuleRef>) -> (&str, &str) {
    rule.map_or(("", ""), |r| (&r.id, &r.name))
}

/// Converts the cores' monotonic times to wall-clock times: one reading of both clocks, taken
/// by the writer when it starts.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The monotonic reading.
    pub instant: std::time::Instant,
    /// The wall-clock reading at the same moment.
    pub wall: SystemTime,
}

impl Clock {
    /// The wall-clock time of `at`.
    pub fn wall(&self, at: std::time::Instant) -> SystemTime {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.wall + after,
            None => self.wall - self.instant.saturating_duration_since(at),
        }
    }
}

/// Appends `activity` as one JSON line (with its newline) to `out`.
pub fn encode(activity: &Activity, clock: &Clock, out: &mut Vec<u8>) {
    Encoder::new(*clock).encode(activity, out);
}

/// Appends the DNS record `activity` as one JSON line (with its newline) to `out`.
pub fn encode_dns(activity: &DnsActivity<'_>, clock: &Clock, out: &mut Vec<u8>) {
    Encoder::new(*clock).encode_dns(activity, out);
}

/// Encodes lines, spelling out the date and time of day once per second rather than per line
/// (a flood of DNS queries writes thousands of lines a second).
#[derive(Debug)]
pub struct Encoder {
    clock: Clock,
    /// `clock.wall` since the epoch: a line's time is this plus its offset from
    /// `clock.instant`, one subtraction rather than three conversions.
    base: Duration,
    /// The second `stamp` spells out, since the epoch.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.` of that second.
    stamp: String,
    /// The last Datetime made.
    text: String,
}

impl Encoder {
    /// An encoder converting the cores' times with `clock`.
    pub fn new(clock: Clock) -> Encoder {
        Encoder {
            clock,
            base: clock
                .wall
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO),
            second: None,
            stamp: String::new(),
            text: String::new(),
        }
    }

    /// Appends `activity` as one JSON line (with its newline) to `out`.
    pub fn encode(&mut self, activity: &Activity, out: &mut Vec<u8>) {
        let at = match activity {
            // Logpush's Datetime is when the session was made.
            Activity::Network(a) => a.opened,
            Activity::Egress(a) => a.at,
            Activity::Http(a) => a.at,
        };
        self.datetime(self.clock.wall(at));
        let datetime = self.text.as_str();
        match activity {
            Activity::Network(a) => encode_network(a, datetime, out),
            Activity::Egress(a) => encode_egress(a, datetime, out),
            Activity::Http(a) => encode_http(a, datetime, out),
        }
        out.push(b'\n');
    }

    /// Appends the DNS record `activity` as one JSON line (with its newline) to `out`.
    pub fn encode_dns(&mut self, activity: &DnsActivity<'_>, out: &mut Vec<u8>) {
        // Lines are about 350 bytes: one reservation rather than a check that grows the
        // buffer mid-line.
        out.reserve(512);
        let since = match activity.at.checked_duration_since(self.clock.instant) {
            Some(after) => self.base + after,
            None => self
                .base
                .saturating_sub(self.clock.instant.saturating_duration_since(activity.at)),
        };
        self.stamp_for(since.as_secs());
        // `{"Datetime":"YYYY-MM-DDTHH:MM:SS.mmmZ"` without a copy through `text`.
        out.extend_from_slice(b"{\"Datetime\":\"");
        out.extend_from_slice(self.stamp.as_bytes());
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
            b'"',
        ]);
        dns_line(activity, out);
        out.push(b'\n');
    }

    /// Sets `stamp` to the second `secs` (since the epoch), unless it already is.
    fn stamp_for(&mut self, secs: u64) {
        if self.second != Some(secs) {
            let full = datetime(UNIX_EPOCH + Duration::from_secs(secs));
            // Everything up to and including the dot before the milliseconds.
            self.stamp = full[..full.len() - 4].to_string();
            self.second = Some(secs);
        }
    }

    /// Sets `text` to [`datetime`] of `t`.
    fn datetime(&mut self, t: SystemTime) {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        self.stamp_for(since.as_secs());
        let ms = since.subsec_millis();
        self.text.clear();
        self.text.push_str(&self.stamp);
        for digit in [ms / 100, ms / 10 % 10, ms % 10] {
            self.text.push(char::from(b'0' + digit as u8));
        }
        self.text.push('Z');
    }
}

/// `,"NAME":`, the way [`Json`] takes a key.
macro_rules! k {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// Writes one JSON object field by field. Keys are written as they are (they are ours, plain
/// ASCII); string values are escaped. Written by hand rather than derived: serde_json escapes
/// every key at run time, and a DNS flood writes hundreds of thousands of lines a second.
struct Json<'a> {
    out: &'a mut Vec<u8>,
    open: bool,
}

impl<'a> Json<'a> {
    #[inline(always)]
    fn new(out: &'a mut Vec<u8>) -> Json<'a> {
        Json { out, open: false }
    }

    /// A writer going on with an object whose first field is written.
    #[inline(always)]
    fn continued(out: &'a mut Vec<u8>) -> Json<'a> {
        Json { out, open: true }
    }

    /// Writes `text`, fields spelled out whole (keys and values that never change).
    #[inline(always)]
    fn raw(&mut self, text: &'static str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    /// `key` is `,"Name":` as [`k!`] spells it: one copy per key. The first key of a line
    /// opens the object instead of the comma.
    #[inline(always)]
    fn key(&mut self, key: &'static str) {
        if self.open {
            self.out.extend_from_slice(key.as_bytes());
        } else {
            self.open = true;
            self.out.push(b'{');
            self.out.extend_from_slice(&key.as_bytes()[1..]);
        }
    }

    #[inline(always)]
    fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        escaped(self.out, value);
    }

    /// A value of ours that needs no escaping (`"A"`, `"udp"`, decision words).
    #[inline(always)]
    fn word(&mut self, key: &'static str, value: &'static str) {
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    #[inline(always)]
    fn uint(&mut self, key: &'static str, value: u64) {
        self.key(key);
        uint(self.out, value);
    }

    #[inline(always)]
    fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    #[inline(always)]
    fn ip(&mut self, key: &'static str, ip: IpAddr) {
        self.key(key);
        quoted_ip(self.out, ip);
    }

    #[inline(always)]
    fn ips(&mut self, key: &'static str, ips: &[IpAddr]) {
        self.key(key);
        self.out.push(b'[');
        for (i, ip) in ips.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            quoted_ip(self.out, *ip);
        }
        self.out.push(b']');
    }

    /// Milliseconds with microsecond precision (`12.345`).
    #[inline(always)]
    fn millis(&mut self, key: &'static str, d: Duration) {
        self.key(key);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        uint(self.out, micros / 1000);
        self.out.push(b'.');
        let frac = micros % 1000;
        self.out.extend_from_slice(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    #[inline(always)]
    fn end(self) {
        if !self.open {
            self.out.push(b'{');
        }
        self.out.push(b'}');
    }
}

fn uint(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn quoted_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.push(b'"');
    match ip {
        // The common case, without the formatting machinery.
        IpAddr::V4(v4) => {
            // Spelled into a buffer and copied once: a push per digit checked the capacity
            // each time (quoted_ip was a seventh of a DNS line's instructions, callgrind).
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            out.extend_from_slice(&buf[..n]);
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

/// `s` as a JSON string: quotes, backslashes and control characters escaped; the rest (UTF-8
/// included) as it is.
fn escaped(out: &mut Vec<u8>, s: &str) {
    // Most lines leave half their strings empty (no device, no rule, no location).
    if s.is_empty() {
        out.extend_from_slice(b"\"\"");
        return;
    }
    out.push(b'"');
    let bytes = s.as_bytes();
    // Names, ids and emails almost never need escaping: one scan, then a copy. The scan has no
    // early exit so LLVM vectorises it (an `any` took 3x as long per line, measured with
    // `cargo bench -p waygate-observe`).
    let special = bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !special {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn identity(j: &mut Json<'_>, datetime: &str, device: Option<&DeviceInfo>) {
    let w = who(device);
    j.str(k!("Datetime"), datetime);
    j.str(k!("DeviceID"), w.id);
    j.str(k!("DeviceName"), w.name);
    j.str(k!("Email"), w.email);
}

/// A `gateway_dns` line after its Datetime (which [`Encoder::encode_dns`] writes).
fn dns_line(a: &DnsActivity<'_>, out: &mut Vec<u8>) {
    let mut j = Json::continued(out);
    match a.device {
        Some(d) => {
            j.str(k!("DeviceID"), &d.id);
            j.str(k!("DeviceName"), &d.name);
            j.str(k!("Email"), &d.email);
        }
        // A location's or a stranger's query: one copy for the three empty fields.
        None => j.raw(concat!(
            k!("DeviceID"),
            "\"\"",
            k!("DeviceName"),
            "\"\"",
            k!("Email"),
            "\"\""
        )),
    }
    let (policy_id, policy_name) = policy(a.policy);
    j.ip(k!("SrcIP"), a.src_ip);
    j.str(k!("QueryName"), a.query_name);
    j.uint(k!("QueryType"), u64::from(a.query_type));
    j.word(k!("QueryTypeName"), a.query_type_name);
    j.uint(k!("QueryID"), u64::from(a.query_id));
    j.uint(k!("RCode"), u64::from(a.rcode));
    j.ips(k!("ResolvedIPs"), a.resolved_ips);
    j.word(k!("ResolverDecision"), a.decision.as_str());
    j.str(k!("PolicyID"), policy_id);
    j.str(k!("PolicyName"), policy_name);
    j.str(k!("Location"), a.location.unwrap_or(""));
    j.word(k!("Protocol"), a.protocol);
    j.str(k!("VirtualNetworkID"), who(a.device).vnet);
    j.bool(k!("CacheHit"), a.cache_hit);
    if let Some(d) = a.upstream_latency {
        j.millis(k!("UpstreamDurationMs"), d);
    }
    j.end();
}

/// The fields network and egress lines share.
fn session(j: &mut Json<'_>, src: std::net::SocketAddr, dst: std::net::SocketAddr, p: Protocol) {
    j.ip(k!("SourceIP"), src.ip());
    j.uint(k!("SourcePort"), u64::from(src.port()));
    j.ip(k!("DestinationIP"), dst.ip());
    j.uint(k!("DestinationPort"), u64::from(dst.port()));
    j.word(k!("Transport"), p.as_str());
}

/// A `gateway_network` line.
fn encode_network(a: &NetworkActivity, datetime: &str, out: &mut Vec<u8>) {
    let mut j = Json::new(out);
    identity(&mut j, datetime, Some(&a.device));
    session(&mut j, a.src, a.dst, a.protocol);
    let (policy_id, policy_name) = policy(a.policy.as_deref());
    j.word(k!("Action"), a.action.as_str());
    j.str(k!("PolicyID"), policy_id);
    j.str(k!("PolicyName"), policy_name);
    j.str(k!("SNI"), a.sni.as_deref().unwrap_or(""));
    j.word(k!("DetectedProtocol"), a.detected_protocol.unwrap_or(""));
    match a.override_dst {
        Some(d) => j.ip(k!("OverrideIP"), d.ip()),
        None => j.str(k!("OverrideIP"), ""),
    }
    j.uint(
        k!("OverridePort"),
        u64::from(a.override_dst.map_or(0, |d| d.port())),
    );
    j.str(k!("VirtualNetworkID"), who(Some(&a.device)).vnet);
    j.uint(k!("BytesSent"), a.bytes_sent);
    j.uint(k!("BytesReceived"), a.bytes_received);
    let duration = a.at.saturating_duration_since(a.opened).as_millis();
    j.uint(
        k!("DurationMs"),
        u64::try_from(duration).unwrap_or(u64::MAX),
    );
    j.word(k!("CloseReason"), a.reason);
    j.end();
}

/// An egress line: the network names, plus the address chosen.
fn encode_egress(a: &EgressActivity, datetime: &str, out: &mut Vec<u8>) {
    let mut j = Json::new(out);
    identity(&mut j, datetime, Some(&a.device));
    session(&mut j, a.src, a.dst, a.protocol);
    let (policy_id, policy_name) = policy(a.policy.as_deref());
    j.str(k!("PolicyID"), policy_id);
    j.str(k!("PolicyName"), policy_name);
    // Empty when the OS picks the source (no default egress address configured).
    match a.egress_ip {
        Some(ip) => j.ip(k!("EgressIP"), ip),
        None => j.str(k!("EgressIP"), ""),
    }
    j.str(k!("Fqdn"), a.name.as_deref().unwrap_or(""));
    j.str(k!("VirtualNetworkID"), who(Some(&a.device)).vnet);
    j.end();
}

/// A `gateway_http` line.
fn encode_http(a: &HttpActivity, datetime: &str, out: &mut Vec<u8>) {
    let mut j = Json::new(out);
    identity(&mut j, datetime, Some(&a.device));
    j.ip(k!("SourceIP"), a.src.ip());
    j.uint(k!("SourcePort"), u64::from(a.src.port()));
    j.ip(k!("DestinationIP"), a.dst.ip());
    j.uint(k!("DestinationPort"), u64::from(a.dst.port()));
    j.str(k!("HTTPHost"), &a.host);
    j.str(k!("HTTPMethod"), &a.method);
    j.word(k!("HTTPVersion"), a.version);
    j.uint(k!("HTTPStatusCode"), u64::from(a.status));
    j.str(k!("URL"), &a.url);
    j.str(k!("UserAgent"), &a.user_agent);
    j.word(k!("Action"), a.action);
    let (policy_id, policy_name) = policy(a.policy.as_deref());
    j.str(k!("PolicyID"), policy_id);
    j.str(k!("PolicyName"), policy_name);
    j.str(k!("VirtualNetworkID"), who(Some(&a.device)).vnet);
    j.uint(k!("BytesSent"), a.bytes_sent);
    j.uint(k!("BytesReceived"), a.bytes_received);
    j.millis(k!("DurationMs"), a.duration);
    j.str(k!("UpstreamTLSVersion"), &a.upstream_tls);
    j.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;
    use waygate_model::activity::{FlowAction, ResolverDecision};
    use waygate_model::Protocol;

    pub(crate) fn device() -> Arc<DeviceInfo> {
        waygate_model::testkit::device().id("d-1").arc()
    }

    #[allow(clippy::disallowed_methods)] // a fixed base for the records' times
    fn clock() -> Clock {
        Clock {
            instant: Instant::now(),
            wall: UNIX_EPOCH + Duration::from_millis(1_785_110_467_123),
        }
    }

    fn json(activity: &Activity, clock: &Clock) -> serde_json::Value {
        let mut out = Vec::new();
        encode(activity, clock, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        serde_json::from_slice(&out).expect("one JSON object")
    }

    #[test]
    fn datetimes_are_rfc3339_utc_and_read_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_785_110_467_123);
        assert_eq!(datetime(t), "2026-07-27T00:01:07.123Z");
        assert_eq!(parse_datetime("2026-07-27T00:01:07.123Z"), Some(t));
        assert_eq!(
            parse_datetime("2026-07-27T00:01:07Z"),
            Some(t - Duration::from_millis(123))
        );
        assert_eq!(datetime(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            datetime(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        let mut enc = Encoder::new(clock());
        for ms in [0u64, 5, 999, 1000, 61_001] {
            enc.datetime(t + Duration::from_millis(ms));
            assert_eq!(enc.text, datetime(t + Duration::from_millis(ms)));
        }
        assert_eq!(parse_datetime("yesterday"), None);
        assert_eq!(parse_datetime("2026-13-01T00:00:00Z"), None);
    }

    #[test]
    fn strings_numbers_and_durations_are_valid_json() {
        for text in [
            "plain",
            "quo\"te",
            "back\\slash",
            "new\nline\ttab\r",
            "\u{1}\u{1f}",
            "ünï",
            "",
        ] {
            let mut out = Vec::new();
            escaped(&mut out, text);
            let back: String = serde_json::from_slice(&out).expect("a JSON string");
            assert_eq!(back, text);
        }
        for ip in ["0.10.100.255", "203.0.113.7", "2001:db8::1", "::"] {
            let mut out = Vec::new();
            quoted_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, format!("\"{ip}\"").into_bytes());
        }
        let mut out = Vec::new();
        let mut j = Json::new(&mut out);
        j.uint(k!("Zero"), 0);
        j.uint(k!("Max"), u64::MAX);
        j.millis(k!("Ms"), Duration::from_micros(12_045));
        j.millis(k!("Small"), Duration::from_micros(7));
        j.ips(k!("None"), &[]);
        j.end();
        let v: serde_json::Value = serde_json::from_slice(&out).expect("an object");
        assert_eq!(v["Zero"], 0);
        assert_eq!(v["Max"], u64::MAX);
        assert_eq!(v["Ms"], 12.045);
        assert_eq!(v["Small"], 0.007);
        assert_eq!(v["None"], serde_json::json!([]));
    }

    #[test]
    fn dns_lines_carry_the_gateway_dns_names() {
        let c = clock();
        let device = device();
        let rule = RuleRef {
            id: Arc::from("block-list"),
            name: Arc::from("Block list"),
        };
        let a = DnsActivity {
            at: c.instant,
            device: Some(&device),
            location: None,
            src_ip: "100.96.0.2".parse().unwrap(),
            query_id: 4660,
            query_name: "blocked.example",
            query_type: 1,
            query_type_name: "A",
            rcode: 5,
            resolved_ips: &["203.0.113.7".parse().unwrap()],
            decision: ResolverDecision::BlockedByQueryName,
            policy: Some(&rule),
            protocol: "udp",
            cache_hit: false,
            upstream_latency: None,
        };
        let mut out = Vec::new();
        encode_dns(&a, &c, &mut out);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("one JSON object");
        for key in [
            "Datetime",
            "DeviceID",
            "DeviceName",
            "Email",
            "SrcIP",
            "QueryName",
            "QueryType",
            "QueryTypeName",
            "RCode",
            "ResolvedIPs",
            "ResolverDecision",
            "PolicyID",
            "PolicyName",
            "Location",
            "Protocol",
            "QueryID",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["Datetime"], "2026-07-27T00:01:07.123Z");
        assert_eq!(v["DeviceID"], "d-1");
        assert_eq!(v["Email"], "ada@example.com");
        assert_eq!(v["SrcIP"], "100.96.0.2");
        assert_eq!(v["QueryTypeName"], "A");
        assert_eq!(v["RCode"], 5);
        assert_eq!(v["ResolvedIPs"][0], "203.0.113.7");
        assert_eq!(v["ResolverDecision"], "blockedByQueryName");
        assert_eq!(
            (v["PolicyID"].as_str(), v["PolicyName"].as_str()),
            (Some("block-list"), Some("Block list"))
        );
        assert!(v.get("UpstreamDurationMs").is_none());
    }

    #[test]
    fn network_and_egress_lines_carry_the_gateway_network_names() {
        let c = clock();
        let n = Activity::Network(Box::new(NetworkActivity {
            at: c.instant + Duration::from_millis(1500),
            opened: c.instant,
            device: device(),
            protocol: Protocol::Tcp,
            src: "100.96.0.2:40000".parse().unwrap(),
            dst: "203.0.113.10:443".parse().unwrap(),
            override_dst: None,
            action: FlowAction::Allow,
            policy: None,
            sni: Some(Arc::from("origin.example")),
            detected_protocol: Some("tls"),
            bytes_sent: 517,
            bytes_received: 4096,
            reason: "closed",
        }));
        let v = json(&n, &c);
        for key in [
            "Datetime",
            "SourceIP",
            "SourcePort",
            "DestinationIP",
            "DestinationPort",
            "Transport",
            "Action",
            "PolicyID",
            "PolicyName",
            "DeviceID",
            "DeviceName",
            "Email",
            "SNI",
            "VirtualNetworkID",
            "BytesSent",
            "BytesReceived",
            "DurationMs",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["DestinationPort"], 443);
        assert_eq!(v["Transport"], "tcp");
        assert_eq!(v["Action"], "allow");
        assert_eq!(
            (v["BytesSent"].as_u64(), v["BytesReceived"].as_u64()),
            (Some(517), Some(4096))
        );
        assert_eq!(v["DurationMs"], 1500);
        assert_eq!(v["SNI"], "origin.example");
        let e = Activity::Egress(Box::new(EgressActivity {
            at: c.instant,
            device: device(),
            protocol: Protocol::Udp,
            src: "100.96.0.2:40000".parse().unwrap(),
            dst: "203.0.113.53:53".parse().unwrap(),
            policy: None,
            egress_ip: Some("192.0.2.1".parse().unwrap()),
            name: None,
        }));
        let v = json(&e, &c);
        assert_eq!(v["EgressIP"], "192.0.2.1");
        assert_eq!(v["Transport"], "udp");
        assert_eq!(v["PolicyID"], "");
        assert_eq!(v["DeviceID"], "d-1");
        let h = Activity::Http(Box::new(HttpActivity {
            at: c.instant,
            device: device(),
            src: "100.96.0.2:40000".parse().unwrap(),
            dst: "203.0.113.10:443".parse().unwrap(),
            host: "shop.example".into(),
            method: "GET".into(),
            url: "https://shop.example/a?\"b\"".into(),
            version: "HTTP/2",
            status: 403,
            action: "block",
            policy: Some(Arc::new(RuleRef {
                id: "r1".into(),
                name: "no shops".into(),
            })),
            user_agent: "curl/8".into(),
            bytes_sent: 12,
            bytes_received: 345,
            duration: Duration::from_micros(2500),
            upstream_tls: "TLSv1_3".into(),
        }));
        assert_eq!(LogKind::of(&h), LogKind::Http);
        let v = json(&h, &c);
        assert_eq!(v["URL"], "https://shop.example/a?\"b\"");
        assert_eq!(v["HTTPStatusCode"], 403);
        assert_eq!(v["Action"], "block");
        assert_eq!(v["PolicyName"], "no shops");
        assert_eq!(
            (v["BytesSent"].as_u64(), v["BytesReceived"].as_u64()),
            (Some(12), Some(345))
        );
        assert_eq!(v["DurationMs"], 2.5);
        assert_eq!(v["DestinationPort"], 443);
    }
}
