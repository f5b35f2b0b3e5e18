//! The lines: each activity record as one JSON object with Logpush's field names
//! (`gateway_dns`, `gateway_network`; egress lines borrow the network names), and the files
//! they go to.
//!
//! Network, egress and HTTP lines write every field, empty (`""`) when the gateway has no value,
//! as Logpush does. DNS lines, the hot ones (one per query), leave out what has no value
//! (`Location` of a device's query, `PolicyName` of no rule, `ResolvedIPs` of a block, a
//! stranger's `DeviceName`, `UserID` and `VirtualNetworkID`, empty category lists), except the
//! contract's `DeviceID`, `Email` and `PolicyID`, written `""`.
//!
//! What is fixed per device (its identity fields) and per rule (`PolicyID`, `PolicyName`) is
//! rendered once, at its first line, and copied into every line after (see
//! [`waygate_model::LogFields`]).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use waygate_model::activity::{
    Activity, DnsActivity, EgressActivity, HttpActivity, NetworkActivity, ResolverDecision, RuleRef,
};
use waygate_model::calendar::{civil_from_days, days_from_civil};
use waygate_model::{user_id, DeviceInfo, Protocol};

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
    /// The start of the next DNS line, copied whole: `{"Datetime":"` and the time of the last
    /// record, then `Z","QueryID":"` and the next QueryID (see [`HEAD`]).
    head: [u8; HEAD],
    /// The record time `head` spells (records of one batch share their `now`).
    head_at: Option<std::time::Instant>,
    /// The second `head` spells, since the epoch.
    head_second: Option<u64>,
}

/// `{"Datetime":"` (13 bytes), `YYYY-MM-DDTHH:MM:SS.mmm` (23), `Z","QueryID":"` (14), the
/// QueryID `xxxxxxxx-xxxx-8xxx-yxxx-` (24, random per encoder) and `nnnnnnnnnnnn` (12, the
/// encoder's count of lines in hex), `"` (1).
const HEAD: usize = 13 + 23 + 14 + 24 + 12 + 1;
/// Where the seconds (with their dot), the milliseconds and the QueryID's count sit in `head`.
const HEAD_SECOND: std::ops::Range<usize> = 13..33;
const HEAD_MS: std::ops::Range<usize> = 33..36;
const HEAD_COUNT: std::ops::Range<usize> = 74..86;

/// A DNS line's head before its first record: the QueryID's random part filled in.
///
/// The QueryID is a UUID (version 8, RFC 9562's layout for custom ones) whose first 80 bits are
/// random per encoder and whose last 48 count its lines, so every query gets an id of its own
/// (Logpush's `QueryID` is unique per query) for the price of incrementing a hex counter.
fn dns_head() -> [u8; HEAD] {
    let mut r = [0u8; 10];
    // SAFETY: `r` is valid for writes of its length.
    let got = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    if usize::try_from(got).ok() != Some(r.len()) {
        // No getrandom: the clock, the process and a count of encoders keep ids apart.
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        #[allow(clippy::disallowed_methods)] // a seed, not a time
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos() as u64;
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r[..8].copy_from_slice(&nanos.to_le_bytes());
        r[8..].copy_from_slice(&(std::process::id() as u16 ^ made as u16).to_le_bytes());
    }
    r[6] = (r[6] & 0x0f) | 0x80;
    r[8] = (r[8] & 0x3f) | 0x80;
    let mut head = [b'0'; HEAD];
    head[..13].copy_from_slice(b"{\"Datetime\":\"");
    head[36..50].copy_from_slice(b"Z\",\"QueryID\":\"");
    let mut n = 50;
    for (i, byte) in r.iter().enumerate() {
        if matches!(i, 4 | 6 | 8) {
            head[n] = b'-';
            n += 1;
        }
        head[n] = HEX[usize::from(byte >> 4)];
        head[n + 1] = HEX[usize::from(byte & 0xf)];
        n += 2;
    }
    head[n] = b'-';
    head[HEAD - 1] = b'"';
    head
}

const HEX: &[u8; 16] = b"0123456789abcdef";

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
            head: dns_head(),
            head_at: None,
            head_second: None,
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
        if self.head_at != Some(activity.at) {
            self.set_head_time(activity.at);
        }
        // The Datetime and the QueryID in one copy of known length.
        out.extend_from_slice(&self.head);
        self.count_query();
        dns_line(activity, out);
        out.push(b'\n');
    }

    /// Spells `at` into `head`: the date and time of day once per second, the milliseconds.
    fn set_head_time(&mut self, at: std::time::Instant) {
        let since = match at.checked_duration_since(self.clock.instant) {
            Some(after) => self.base + after,
            None => self
                .base
                .saturating_sub(self.clock.instant.saturating_duration_since(at)),
        };
        let secs = since.as_secs();
        if self.head_second != Some(secs) {
            let full = datetime(UNIX_EPOCH + Duration::from_secs(secs));
            if let Some(prefix) = full.as_bytes().get(..HEAD_SECOND.len()) {
                self.head[HEAD_SECOND].copy_from_slice(prefix);
            }
            self.head_second = Some(secs);
        }
        let ms = since.subsec_millis();
        self.head[HEAD_MS].copy_from_slice(&[
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
        ]);
        self.head_at = Some(at);
    }

    /// Moves `head` on to the next QueryID: the hex count plus one, an odometer's step (a
    /// carry past the last digit is one in 16).
    fn count_query(&mut self) {
        for digit in self.head[HEAD_COUNT].iter_mut().rev() {
            match *digit {
                b'9' => {
                    *digit = b'a';
                    return;
                }
                b'f' => *digit = b'0',
                _ => {
                    *digit += 1;
                    return;
                }
            }
        }
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

    /// Small numbers as a JSON array (`[117,131]`).
    #[inline(always)]
    fn ids(&mut self, key: &'static str, ids: &[u16]) {
        self.key(key);
        self.out.push(b'[');
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            uint(self.out, u64::from(*id));
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

/// The decimal digits of every octet, left-aligned, and how many there are.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut t = [([0u8; 3], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let n = i as u8;
        t[i] = if n >= 100 {
            ([b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10], 3)
        } else if n >= 10 {
            ([b'0' + n / 10, b'0' + n % 10, 0], 2)
        } else {
            ([b'0' + n, 0, 0], 1)
        };
        i += 1;
    }
    t
};

fn quoted_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        // The common case, without the formatting machinery: each octet's digits from a table,
        // spelled into a buffer and copied once (a branch per digit made quoted_ip a seventh
        // of a DNS line's instructions, callgrind).
        IpAddr::V4(v4) => {
            let mut buf = [0u8; 20];
            buf[0] = b'"';
            let mut n = 1;
            for octet in v4.octets() {
                let (digits, len) = &OCTETS[usize::from(octet)];
                buf[n..n + 3].copy_from_slice(digits);
                n += usize::from(*len);
                buf[n] = b'.';
                n += 1;
            }
            // The last dot becomes the closing quote. The whole buffer is copied (a copy of
            // known length, no call) and the unused end cut off.
            buf[n - 1] = b'"';
            out.extend_from_slice(&buf);
            out.truncate(out.len() - (buf.len() - n));
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            // Writing into a Vec cannot fail.
            let _ = write!(out, "\"{v6}\"");
        }
    }
}

/// Whether `bytes` hold a quote, a backslash or a control character. Eight bytes at a time
/// (the "has a byte less than n" and "has a zero byte" word tricks, exact for "any"): a
/// byte-wise scan of a query name cost more than the rest of its field (callgrind).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let special = |v: u64| {
        (v.wrapping_sub(ONES * 0x20) & !v & HIGH)
            | zero_in(v ^ (ONES * u64::from(b'"')))
            | zero_in(v ^ (ONES * u64::from(b'\\')))
    };
    let word = |at: usize| {
        let mut w = [0u8; 8];
        if let Some(b) = bytes.get(at..at + 8) {
            w.copy_from_slice(b);
        }
        u64::from_ne_bytes(w)
    };
    if bytes.len() < 8 {
        // Padded with a byte that needs nothing.
        let mut w = [b'a'; 8];
        w[..bytes.len()].copy_from_slice(bytes);
        return special(u64::from_ne_bytes(w)) != 0;
    }
    let mut found = 0;
    let mut at = 0;
    while at + 8 < bytes.len() {
        found |= special(word(at));
        at += 8;
    }
    // The last eight bytes, overlapping the words before: no byte-wise tail.
    found |= special(word(bytes.len() - 8));
    found != 0
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
    // Names, ids and emails almost never need escaping: one scan, then a copy.
    if !needs_escape(bytes) {
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

/// `,"DeviceID":...,"DeviceName":...,"Email":...,"UserID":...,"VirtualNetworkID":...` of
/// `device`, rendered at its first line (one registry snapshot's life) and copied after.
fn identity_fields(device: &DeviceInfo) -> &[u8] {
    device.log_fields.get_or_render(|| {
        let mut out = Vec::with_capacity(160);
        let mut j = Json::continued(&mut out);
        j.str(k!("DeviceID"), &device.id);
        j.str(k!("DeviceName"), &device.name);
        j.str(k!("Email"), &device.email);
        j.str(k!("UserID"), &user_id(&device.email));
        j.str(
            k!("VirtualNetworkID"),
            device.vnet_id.as_deref().unwrap_or(""),
        );
        out
    })
}

/// `,"PolicyID":...,"PolicyName":...` of `rule` (the name left out when it has none), rendered
/// at its first DNS line (once per loaded rule set) and copied after.
fn policy_fields(rule: &RuleRef) -> &[u8] {
    rule.log_fields.get_or_render(|| {
        let mut out = Vec::with_capacity(96);
        let mut j = Json::continued(&mut out);
        j.str(k!("PolicyID"), &rule.id);
        if !rule.name.is_empty() {
            j.str(k!("PolicyName"), &rule.name);
        }
        out
    })
}

/// `Datetime` and the identity fields, the start of every network, egress and HTTP line.
fn identity(j: &mut Json<'_>, datetime: &str, device: &DeviceInfo) {
    j.str(k!("Datetime"), datetime);
    j.out.extend_from_slice(identity_fields(device));
}

/// `,"QueryType":N,"QueryTypeName":"T"` in one copy for the common types.
fn query_type_fields(number: u16) -> Option<&'static str> {
    macro_rules! t {
        ($n:literal, $name:literal) => {
            concat!(k!("QueryType"), $n, k!("QueryTypeName"), "\"", $name, "\"")
        };
    }
    Some(match number {
        1 => t!("1", "A"),
        2 => t!("2", "NS"),
        5 => t!("5", "CNAME"),
        6 => t!("6", "SOA"),
        12 => t!("12", "PTR"),
        15 => t!("15", "MX"),
        16 => t!("16", "TXT"),
        28 => t!("28", "AAAA"),
        33 => t!("33", "SRV"),
        64 => t!("64", "SVCB"),
        65 => t!("65", "HTTPS"),
        _ => return None,
    })
}

/// `,"ResolverDecision":"word"` in one copy.
fn decision_field(d: ResolverDecision) -> &'static str {
    macro_rules! d {
        ($word:literal) => {
            concat!(k!("ResolverDecision"), "\"", $word, "\"")
        };
    }
    match d {
        ResolverDecision::AllowedOnNoPolicyMatch => d!("allowedOnNoPolicyMatch"),
        ResolverDecision::AllowedByQueryName => d!("allowedByQueryName"),
        ResolverDecision::BlockedByQueryName => d!("blockedByQueryName"),
        ResolverDecision::BlockedByResponse => d!("blockedByResponse"),
        ResolverDecision::OverrideApplied => d!("overrideApplied"),
        ResolverDecision::OverrideForSafeSearch => d!("overrideForSafeSearch"),
        ResolverDecision::Unknown => d!("unknown"),
    }
}

/// `,"Protocol":"p","IsResponseCached":b` in one copy.
fn protocol_fields(protocol: &str, cached: bool) -> Option<&'static str> {
    macro_rules! p {
        ($p:literal, $c:literal) => {
            concat!(k!("Protocol"), "\"", $p, "\"", k!("IsResponseCached"), $c)
        };
    }
    Some(match (protocol, cached) {
        ("udp", false) => p!("udp", "false"),
        ("udp", true) => p!("udp", "true"),
        ("tcp", false) => p!("tcp", "false"),
        ("tcp", true) => p!("tcp", "true"),
        ("tls", false) => p!("tls", "false"),
        ("tls", true) => p!("tls", "true"),
        ("https", false) => p!("https", "false"),
        ("https", true) => p!("https", "true"),
        _ => return None,
    })
}

/// A `gateway_dns` line after its Datetime and QueryID (which [`Encoder::encode_dns`] writes).
fn dns_line(a: &DnsActivity<'_>, out: &mut Vec<u8>) {
    match a.device {
        Some(d) => out.extend_from_slice(identity_fields(d)),
        // A location's or a stranger's query: the contract's identity fields, empty.
        None => {
            out.extend_from_slice(concat!(k!("DeviceID"), "\"\"", k!("Email"), "\"\"").as_bytes())
        }
    }
    let mut j = Json::continued(out);
    j.ip(k!("SrcIP"), a.src_ip);
    j.str(k!("QueryName"), a.query_name);
    match query_type_fields(a.query_type) {
        Some(fields) => j.out.extend_from_slice(fields.as_bytes()),
        None => {
            j.uint(k!("QueryType"), u64::from(a.query_type));
            j.word(k!("QueryTypeName"), a.query_type_name);
        }
    }
    match a.rcode {
        0 => j.raw(concat!(k!("RCode"), "0")),
        2 => j.raw(concat!(k!("RCode"), "2")),
        3 => j.raw(concat!(k!("RCode"), "3")),
        5 => j.raw(concat!(k!("RCode"), "5")),
        other => j.uint(k!("RCode"), u64::from(other)),
    }
    if !a.resolved_ips.is_empty() {
        j.ips(k!("ResolvedIPs"), a.resolved_ips);
    }
    j.out
        .extend_from_slice(decision_field(a.decision).as_bytes());
    match a.policy {
        Some(rule) => j.out.extend_from_slice(policy_fields(rule)),
        None => j.raw(concat!(k!("PolicyID"), "\"\"")),
    }
    if let Some(location) = a.location {
        j.str(k!("Location"), location);
    }
    match protocol_fields(a.protocol, a.cache_hit) {
        Some(fields) => j.out.extend_from_slice(fields.as_bytes()),
        None => {
            j.word(k!("Protocol"), a.protocol);
            j.bool(k!("IsResponseCached"), a.cache_hit);
        }
    }
    if let Some(d) = a.upstream_latency {
        j.millis(k!("UpstreamDurationMs"), d);
    }
    if !a.query_categories.is_empty() {
        j.ids(k!("QueryCategoryIDs"), a.query_categories);
    }
    if !a.matched_categories.is_empty() {
        j.ids(k!("MatchedCategoryIDs"), a.matched_categories);
    }
    if !a.resolved_ip_categories.is_empty() {
        j.ids(k!("ResolvedIPCategoryIDs"), a.resolved_ip_categories);
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
    identity(&mut j, datetime, &a.device);
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
    identity(&mut j, datetime, &a.device);
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
    j.end();
}

/// A `gateway_http` line.
fn encode_http(a: &HttpActivity, datetime: &str, out: &mut Vec<u8>) {
    let mut j = Json::new(out);
    identity(&mut j, datetime, &a.device);
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
    fn the_escape_scan_finds_every_byte_that_needs_escaping_wherever_it_is() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        for len in 1..=19 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    assert_eq!(needs_escape(&text), naive(&text), "{text:?}");
                    // Beside bytes of UTF-8 sequences too.
                    text.iter_mut()
                        .filter(|c| **c == b'a')
                        .for_each(|c| *c = 0xc3);
                    assert_eq!(needs_escape(&text), naive(&text), "{text:?}");
                }
            }
        }
        assert!(!needs_escape(b""));
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
        for ip in [
            "0.10.100.255",
            "203.0.113.7",
            "2001:db8::1",
            "::",
            "0.0.0.0",
            "255.255.255.255",
            "9.99.199.1",
        ] {
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

    /// A blocked query of the test device, by a rule.
    fn dns_record<'a>(c: &Clock, device: &'a DeviceInfo, rule: &'a RuleRef) -> DnsActivity<'a> {
        DnsActivity {
            at: c.instant,
            device: Some(device),
            location: None,
            src_ip: "100.96.0.2".parse().unwrap(),
            query_name: "blocked.example",
            query_type: 1,
            query_type_name: "A",
            rcode: 5,
            resolved_ips: &[],
            decision: ResolverDecision::BlockedByQueryName,
            policy: Some(rule),
            protocol: "udp",
            cache_hit: false,
            upstream_latency: None,
            query_categories: &[],
            matched_categories: &[],
            resolved_ip_categories: &[],
        }
    }

    fn dns_json(enc: &mut Encoder, a: &DnsActivity<'_>) -> serde_json::Value {
        let mut out = Vec::new();
        enc.encode_dns(a, &mut out);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).expect("one JSON object")
    }

    #[test]
    fn dns_lines_carry_the_gateway_dns_names() {
        let c = clock();
        let mut enc = Encoder::new(c);
        let device = waygate_model::testkit::device()
            .id("d-1")
            .name("ada's \"laptop\"")
            .vnet("vn-1")
            .build();
        let rule = RuleRef::new("block-list", "Block list").with_categories([99, 8, 99]);
        let a = DnsActivity {
            query_categories: &[8, 99],
            matched_categories: &[99],
            resolved_ip_categories: &[117],
            ..dns_record(&c, &device, &rule)
        };
        let v = dns_json(&mut enc, &a);
        for key in [
            "Datetime",
            "QueryID",
            "DeviceID",
            "DeviceName",
            "Email",
            "UserID",
            "VirtualNetworkID",
            "SrcIP",
            "QueryName",
            "QueryType",
            "QueryTypeName",
            "RCode",
            "ResolverDecision",
            "PolicyID",
            "PolicyName",
            "Protocol",
            "IsResponseCached",
            "QueryCategoryIDs",
            "MatchedCategoryIDs",
            "ResolvedIPCategoryIDs",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["Datetime"], "2026-07-27T00:01:07.123Z");
        assert_eq!(v["DeviceID"], "d-1");
        assert_eq!(v["DeviceName"], "ada's \"laptop\"");
        assert_eq!(v["Email"], "ada@example.com");
        assert_eq!(v["UserID"], waygate_model::user_id("ada@example.com"));
        assert_eq!(v["VirtualNetworkID"], "vn-1");
        assert_eq!(v["SrcIP"], "100.96.0.2");
        assert_eq!(v["QueryName"], "blocked.example");
        assert_eq!(
            (v["QueryType"].as_u64(), v["QueryTypeName"].as_str()),
            (Some(1), Some("A"))
        );
        assert_eq!(v["RCode"], 5);
        assert_eq!(v["ResolverDecision"], "blockedByQueryName");
        assert_eq!(
            (v["PolicyID"].as_str(), v["PolicyName"].as_str()),
            (Some("block-list"), Some("Block list"))
        );
        assert_eq!(v["Protocol"], "udp");
        assert_eq!(v["IsResponseCached"], false);
        assert_eq!(v["QueryCategoryIDs"], serde_json::json!([8, 99]));
        assert_eq!(v["MatchedCategoryIDs"], serde_json::json!([99]));
        assert_eq!(v["ResolvedIPCategoryIDs"], serde_json::json!([117]));
        assert_eq!(&*rule.categories, &[8, 99]);
        // Left out without a value: no addresses, no location, no upstream.
        for key in ["ResolvedIPs", "Location", "UpstreamDurationMs", "CacheHit"] {
            assert!(v.get(key).is_none(), "{key} in {v}");
        }
        // The device's and the rule's fields were rendered once and are copied since.
        assert!(!device.log_fields.get_or_render(Vec::new).is_empty());
        assert!(!rule.log_fields.get_or_render(Vec::new).is_empty());
    }

    #[test]
    fn dns_lines_without_a_device_or_rule_keep_the_contract_fields() {
        let c = clock();
        let mut enc = Encoder::new(c);
        let device = device();
        let rule = RuleRef::new("r", "");
        let a = DnsActivity {
            device: None,
            location: Some("office \\ hq"),
            src_ip: "2001:db8::7".parse().unwrap(),
            policy: None,
            query_type: 99,
            query_type_name: "SPF",
            resolved_ips: &[
                "203.0.113.7".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            decision: ResolverDecision::AllowedOnNoPolicyMatch,
            protocol: "https",
            cache_hit: true,
            upstream_latency: Some(Duration::from_micros(1500)),
            rcode: 4,
            ..dns_record(&c, &device, &rule)
        };
        let v = dns_json(&mut enc, &a);
        assert_eq!(
            (v["DeviceID"].as_str(), v["Email"].as_str()),
            (Some(""), Some(""))
        );
        assert_eq!(v["PolicyID"], "");
        for key in [
            "DeviceName",
            "UserID",
            "VirtualNetworkID",
            "PolicyName",
            "QueryCategoryIDs",
        ] {
            assert!(v.get(key).is_none(), "{key} in {v}");
        }
        assert_eq!(v["Location"], "office \\ hq");
        assert_eq!(v["SrcIP"], "2001:db8::7");
        assert_eq!(
            (v["QueryType"].as_u64(), v["QueryTypeName"].as_str()),
            (Some(99), Some("SPF"))
        );
        assert_eq!(
            v["ResolvedIPs"],
            serde_json::json!(["203.0.113.7", "2001:db8::1"])
        );
        assert_eq!(
            (v["Protocol"].as_str(), v["IsResponseCached"].as_bool()),
            (Some("https"), Some(true))
        );
        assert_eq!(v["UpstreamDurationMs"], 1.5);
        assert_eq!(v["RCode"], 4);
        // A rule without a name: its id only.
        let v = dns_json(&mut enc, &dns_record(&c, &device, &rule));
        assert_eq!(v["PolicyID"], "r");
        assert!(v.get("PolicyName").is_none(), "{v}");
        // Every type the one-copy table spells agrees with the general path.
        for (n, name) in [
            (1, "A"),
            (2, "NS"),
            (5, "CNAME"),
            (6, "SOA"),
            (12, "PTR"),
            (15, "MX"),
            (16, "TXT"),
            (28, "AAAA"),
            (33, "SRV"),
            (64, "SVCB"),
            (65, "HTTPS"),
        ] {
            let v = dns_json(
                &mut enc,
                &DnsActivity {
                    query_type: n,
                    query_type_name: name,
                    ..a
                },
            );
            assert_eq!(
                (v["QueryType"].as_u64(), v["QueryTypeName"].as_str()),
                (Some(u64::from(n)), Some(name))
            );
        }
        for p in ["udp", "tcp", "tls", "https", "quic"] {
            for cached in [false, true] {
                let v = dns_json(
                    &mut enc,
                    &DnsActivity {
                        protocol: p,
                        cache_hit: cached,
                        ..a
                    },
                );
                assert_eq!(
                    (v["Protocol"].as_str(), v["IsResponseCached"].as_bool()),
                    (Some(p), Some(cached))
                );
            }
        }
    }

    #[test]
    fn query_ids_are_unique_uuids_per_query_and_per_encoder() {
        let c = clock();
        let device = device();
        let rule = RuleRef::new("r", "R");
        let a = dns_record(&c, &device, &rule);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2 {
            let mut enc = Encoder::new(c);
            for _ in 0..1000 {
                let v = dns_json(&mut enc, &a);
                let id = v["QueryID"].as_str().expect("a string").to_string();
                let groups: Vec<usize> = id.split('-').map(str::len).collect();
                assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
                assert!(id.bytes().all(|b| b == b'-' || HEX.contains(&b)), "{id}");
                assert_eq!(id.as_bytes()[14], b'8', "version 8: {id}");
                assert!(seen.insert(id), "a QueryID repeated");
            }
        }
        // The count runs through the last group, in hex, carrying like an odometer.
        let mut enc = Encoder::new(c);
        let last = |enc: &mut Encoder| {
            let v = dns_json(enc, &a);
            let id = v["QueryID"].as_str().unwrap_or_default().to_string();
            id.rsplit('-').next().unwrap_or_default().to_string()
        };
        assert_eq!(last(&mut enc), "000000000000");
        assert_eq!(last(&mut enc), "000000000001");
        enc.head[HEAD_COUNT].copy_from_slice(b"abcdef0123f9");
        for want in ["abcdef0123f9", "abcdef0123fa", "abcdef0123fb"] {
            assert_eq!(last(&mut enc), want);
        }
        enc.head[HEAD_COUNT].copy_from_slice(b"00000000ffff");
        assert_eq!(last(&mut enc), "00000000ffff");
        assert_eq!(last(&mut enc), "000000010000");
        enc.head[HEAD_COUNT].copy_from_slice(b"ffffffffffff");
        assert_eq!(last(&mut enc), "ffffffffffff");
        assert_eq!(last(&mut enc), "000000000000");
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
        assert_eq!(v["UserID"], waygate_model::user_id("ada@example.com"));
        assert_eq!(v["VirtualNetworkID"], "");
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
            policy: Some(Arc::new(RuleRef::new("r1", "no shops"))),
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
