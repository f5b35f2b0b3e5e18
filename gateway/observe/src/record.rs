//! The lines: each activity record as one JSON object with Logpush's field names
//! (`gateway_dns`, `gateway_network`; egress lines borrow the network names), and the files
//! they go to.
//!
//! Fields the gateway has no value for are written empty (`""`) as Logpush does, except a few
//! of Waygate's own (`BytesSent`, `BytesReceived`, `DurationMs` on network lines, `EgressIP` on
//! egress lines).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use waygate_model::activity::{Activity, DnsActivity, EgressActivity, NetworkActivity, RuleRef};
use waygate_model::DeviceInfo;

/// Which log a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    /// `dns.jsonl`: one line per DNS query.
    Dns,
    /// `network.jsonl`: one line per flow, at its close or refusal.
    Network,
    /// `http.jsonl`: one line per HTTP request (written once the HTTP stage exists).
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

    /// The log `activity` goes to.
    pub fn of(activity: &Activity) -> LogKind {
        match activity {
            Activity::Dns(_) => LogKind::Dns,
            Activity::Network(_) => LogKind::Network,
            Activity::Egress(_) => LogKind::Egress,
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

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inverse of [`civil_from_days`]; `None` for an impossible month or day.
fn days_from_civil(y: i64, m: u32, d: u32) -> Option<i64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
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

/// A `gateway_dns` line.
#[derive(Serialize)]
struct DnsLine<'a> {
    #[serde(rename = "Datetime")]
    datetime: &'a str,
    #[serde(rename = "DeviceID")]
    device_id: &'a str,
    #[serde(rename = "DeviceName")]
    device_name: &'a str,
    #[serde(rename = "Email")]
    email: &'a str,
    #[serde(rename = "SrcIP")]
    src_ip: IpAddr,
    #[serde(rename = "QueryName")]
    query_name: &'a str,
    #[serde(rename = "QueryType")]
    query_type: u16,
    #[serde(rename = "QueryTypeName")]
    query_type_name: &'a str,
    #[serde(rename = "QueryID")]
    query_id: u16,
    #[serde(rename = "RCode")]
    rcode: u16,
    #[serde(rename = "ResolvedIPs")]
    resolved_ips: &'a [IpAddr],
    #[serde(rename = "ResolverDecision")]
    resolver_decision: &'a str,
    #[serde(rename = "PolicyID")]
    policy_id: &'a str,
    #[serde(rename = "PolicyName")]
    policy_name: &'a str,
    #[serde(rename = "Location")]
    location: &'a str,
    #[serde(rename = "Protocol")]
    protocol: &'a str,
    #[serde(rename = "VirtualNetworkID")]
    vnet: &'a str,
    #[serde(rename = "CacheHit")]
    cache_hit: bool,
    #[serde(rename = "UpstreamDurationMs", skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<f64>,
}

/// A `gateway_network` line.
#[derive(Serialize)]
struct NetworkLine<'a> {
    #[serde(rename = "Datetime")]
    datetime: &'a str,
    #[serde(rename = "DeviceID")]
    device_id: &'a str,
    #[serde(rename = "DeviceName")]
    device_name: &'a str,
    #[serde(rename = "Email")]
    email: &'a str,
    #[serde(rename = "SourceIP")]
    source_ip: IpAddr,
    #[serde(rename = "SourcePort")]
    source_port: u16,
    #[serde(rename = "DestinationIP")]
    destination_ip: IpAddr,
    #[serde(rename = "DestinationPort")]
    destination_port: u16,
    #[serde(rename = "Transport")]
    transport: &'a str,
    #[serde(rename = "Action")]
    action: &'a str,
    #[serde(rename = "PolicyID")]
    policy_id: &'a str,
    #[serde(rename = "PolicyName")]
    policy_name: &'a str,
    #[serde(rename = "SNI")]
    sni: &'a str,
    #[serde(rename = "DetectedProtocol")]
    detected_protocol: &'a str,
    #[serde(rename = "OverrideIP")]
    override_ip: String,
    #[serde(rename = "OverridePort")]
    override_port: u16,
    #[serde(rename = "VirtualNetworkID")]
    vnet: &'a str,
    #[serde(rename = "BytesSent")]
    bytes_sent: u64,
    #[serde(rename = "BytesReceived")]
    bytes_received: u64,
    #[serde(rename = "DurationMs")]
    duration_ms: u64,
    #[serde(rename = "CloseReason")]
    close_reason: &'a str,
}

/// An egress line: the network names, plus the address chosen.
#[derive(Serialize)]
struct EgressLine<'a> {
    #[serde(rename = "Datetime")]
    datetime: &'a str,
    #[serde(rename = "DeviceID")]
    device_id: &'a str,
    #[serde(rename = "DeviceName")]
    device_name: &'a str,
    #[serde(rename = "Email")]
    email: &'a str,
    #[serde(rename = "SourceIP")]
    source_ip: IpAddr,
    #[serde(rename = "SourcePort")]
    source_port: u16,
    #[serde(rename = "DestinationIP")]
    destination_ip: IpAddr,
    #[serde(rename = "DestinationPort")]
    destination_port: u16,
    #[serde(rename = "Transport")]
    transport: &'a str,
    #[serde(rename = "PolicyID")]
    policy_id: &'a str,
    #[serde(rename = "PolicyName")]
    policy_name: &'a str,
    /// `""` when the OS picks the source (no default egress address configured).
    #[serde(rename = "EgressIP")]
    egress_ip: String,
    #[serde(rename = "Fqdn")]
    fqdn: &'a str,
    #[serde(rename = "VirtualNetworkID")]
    vnet: &'a str,
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

/// Encodes lines, spelling out the date and time of day once per second rather than per line
/// (a flood of DNS queries writes thousands of lines a second).
#[derive(Debug)]
pub struct Encoder {
    clock: Clock,
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
            second: None,
            stamp: String::new(),
            text: String::new(),
        }
    }

    /// Appends `activity` as one JSON line (with its newline) to `out`.
    pub fn encode(&mut self, activity: &Activity, out: &mut Vec<u8>) {
        let at = match activity {
            Activity::Dns(a) => a.at,
            // Logpush's Datetime is when the session was made.
            Activity::Network(a) => a.opened,
            Activity::Egress(a) => a.at,
        };
        self.datetime(self.clock.wall(at));
        let datetime = self.text.as_str();
        // Serializing these structs into a Vec cannot fail: every field is a plain value.
        let _ = match activity {
            Activity::Dns(a) => encode_dns(a, datetime, out),
            Activity::Network(a) => encode_network(a, datetime, out),
            Activity::Egress(a) => encode_egress(a, datetime, out),
        };
        out.push(b'\n');
    }

    /// Sets `text` to [`datetime`] of `t`.
    fn datetime(&mut self, t: SystemTime) {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let secs = since.as_secs();
        if self.second != Some(secs) {
            let full = datetime(t);
            // Everything up to and including the dot before the milliseconds.
            self.stamp = full[..full.len() - 4].to_string();
            self.second = Some(secs);
        }
        use std::fmt::Write as _;
        self.text.clear();
        self.text.push_str(&self.stamp);
        let _ = write!(self.text, "{:03}Z", since.subsec_millis());
    }
}

fn encode_dns(a: &DnsActivity, datetime: &str, out: &mut Vec<u8>) -> serde_json::Result<()> {
    let w = who(a.device.as_deref());
    let (policy_id, policy_name) = policy(a.policy.as_deref());
    let line = DnsLine {
        datetime,
        device_id: w.id,
        device_name: w.name,
        email: w.email,
        src_ip: a.src_ip,
        query_name: &a.query_name,
        query_type: a.query_type,
        query_type_name: a.query_type_name,
        query_id: a.query_id,
        rcode: a.rcode,
        resolved_ips: &a.resolved_ips,
        resolver_decision: a.decision.as_str(),
        policy_id,
        policy_name,
        location: a.location.as_deref().unwrap_or(""),
        protocol: a.protocol,
        vnet: w.vnet,
        cache_hit: a.cache_hit,
        upstream_ms: a.upstream_latency.map(|d| d.as_secs_f64() * 1000.0),
    };
    serde_json::to_writer(out, &line)
}

fn encode_network(
    a: &NetworkActivity,
    datetime: &str,
    out: &mut Vec<u8>,
) -> serde_json::Result<()> {
    let w = who(Some(&a.device));
    let (policy_id, policy_name) = policy(a.policy.as_deref());
    let line = NetworkLine {
        datetime,
        device_id: w.id,
        device_name: w.name,
        email: w.email,
        source_ip: a.src.ip(),
        source_port: a.src.port(),
        destination_ip: a.dst.ip(),
        destination_port: a.dst.port(),
        transport: a.protocol.as_str(),
        action: a.action.as_str(),
        policy_id,
        policy_name,
        sni: a.sni.as_deref().unwrap_or(""),
        detected_protocol: a.detected_protocol.unwrap_or(""),
        override_ip: a
            .override_dst
            .map(|d| d.ip().to_string())
            .unwrap_or_default(),
        override_port: a.override_dst.map_or(0, |d| d.port()),
        vnet: w.vnet,
        bytes_sent: a.bytes_sent,
        bytes_received: a.bytes_received,
        duration_ms: u64::try_from(a.at.saturating_duration_since(a.opened).as_millis())
            .unwrap_or(u64::MAX),
        close_reason: a.reason,
    };
    serde_json::to_writer(out, &line)
}

fn encode_egress(a: &EgressActivity, datetime: &str, out: &mut Vec<u8>) -> serde_json::Result<()> {
    let w = who(Some(&a.device));
    let (policy_id, policy_name) = policy(a.policy.as_deref());
    let line = EgressLine {
        datetime,
        device_id: w.id,
        device_name: w.name,
        email: w.email,
        source_ip: a.src.ip(),
        source_port: a.src.port(),
        destination_ip: a.dst.ip(),
        destination_port: a.dst.port(),
        transport: a.protocol.as_str(),
        policy_id,
        policy_name,
        egress_ip: a.egress_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        fqdn: a.name.as_deref().unwrap_or(""),
        vnet: w.vnet,
    };
    serde_json::to_writer(out, &line)
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
    fn dns_lines_carry_the_gateway_dns_names() {
        let c = clock();
        let a = Activity::Dns(Box::new(DnsActivity {
            at: c.instant,
            device: Some(device()),
            location: None,
            src_ip: "100.96.0.2".parse().unwrap(),
            query_id: 4660,
            query_name: Arc::from("blocked.example"),
            query_type: 1,
            query_type_name: "A",
            rcode: 5,
            resolved_ips: vec!["203.0.113.7".parse().unwrap()],
            decision: ResolverDecision::BlockedByQueryName,
            policy: Some(Arc::new(RuleRef {
                id: Arc::from("block-list"),
                name: Arc::from("Block list"),
            })),
            protocol: "udp",
            cache_hit: false,
            upstream_latency: None,
        }));
        let v = json(&a, &c);
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
    }
}
