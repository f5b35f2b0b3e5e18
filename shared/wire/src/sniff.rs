//! What a TCP flow carries, from the first bytes the device sends: the protocol
//! (`net.detected_protocol`) and, for TLS, the server name of the ClientHello (`net.sni.host`).
//!
//! The input is hostile and may arrive a few bytes at a time: every read is bounds-checked, a
//! prefix that could still become a known protocol asks for more, and nothing past
//! [`MAX_SNIFF`] bytes is ever needed.

/// Most bytes looked at; a ClientHello larger than this (none in practice) is `Tls` without SNI.
pub const MAX_SNIFF: usize = 16 * 1024 + 5;

/// A protocol recognized from the client's first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// TLS, with the ClientHello's server name when it has one.
    Tls {
        /// `server_name` (lower-cased).
        sni: Option<String>,
    },
    /// HTTP/1.x, with the Host header when it came in the bytes seen.
    Http {
        /// `Host` (lower-cased, without port).
        host: Option<String>,
    },
    /// HTTP/2 with prior knowledge (cleartext preface).
    Http2,
    /// SSH.
    Ssh,
    /// Anything else.
    Unknown,
}

impl Detected {
    /// The value of `net.detected_protocol`.
    pub fn protocol(&self) -> &'static str {
        match self {
            Detected::Tls { .. } => "tls",
            Detected::Http { .. } | Detected::Http2 => "http",
            Detected::Ssh => "ssh",
            Detected::Unknown => "unknown",
        }
    }
}

/// The outcome of looking at a prefix of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Known.
    Done(Detected),
    /// The bytes so far could still become a known protocol; look again with more.
    NeedMore,
}

const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Looks at the first bytes a client sent. `data` is everything received so far (give at most
/// [`MAX_SNIFF`] bytes; with that many, the answer is always `Done`).
pub fn sniff(data: &[u8]) -> Sniff {
    if data.is_empty() {
        return Sniff::NeedMore;
    }
    let full = data.len() >= MAX_SNIFF;
    if data[0] == 0x16 {
        return match client_hello_sni(data) {
            Parse::Found(sni) => Sniff::Done(Detected::Tls { sni }),
            Parse::Incomplete if !full => Sniff::NeedMore,
            Parse::Incomplete => Sniff::Done(Detected::Tls { sni: None }),
            Parse::NotThis => Sniff::Done(Detected::Unknown),
        };
    }
    if let Some(verdict) = prefix_match(data, b"SSH-", Detected::Ssh) {
        return verdict;
    }
    if let Some(verdict) = prefix_match(data, H2_PREFACE, Detected::Http2) {
        return verdict;
    }
    for method in HTTP_METHODS {
        let n = data.len().min(method.len());
        if data[..n] == method[..n] {
            if data.len() < method.len() {
                return Sniff::NeedMore;
            }
            return match http_host(data) {
                Some(host) => Sniff::Done(Detected::Http { host }),
                None if !full => Sniff::NeedMore,
                None => Sniff::Done(Detected::Http { host: None }),
            };
        }
    }
    Sniff::Done(Detected::Unknown)
}

/// `Done(what)` when `data` starts with `prefix`, `NeedMore` while it is a prefix of it.
fn prefix_match(data: &[u8], prefix: &[u8], what: Detected) -> Option<Sniff> {
    let n = data.len().min(prefix.len());
    if data[..n] != prefix[..n] {
        return None;
    }
    Some(if data.len() >= prefix.len() {
        Sniff::Done(what)
    } else {
        Sniff::NeedMore
    })
}

/// The Host header of an HTTP/1 request head: `Some(None)` when the head is complete without
/// one, `None` while the head is incomplete.
fn http_host(data: &[u8]) -> Option<Option<String>> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n");
    let head = &data[..end.unwrap_or(data.len())];
    for line in head.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            // Only complete lines count: the last one may still be arriving.
            if end.is_none() && std::ptr::eq(line.as_ptr_range().end, head.as_ptr_range().end) {
                return None;
            }
            let value = std::str::from_utf8(&line[colon + 1..]).ok()?.trim();
            return Some(Some(strip_port(value).to_ascii_lowercase()));
        }
    }
    end.map(|_| None)
}

/// `host:port` or `[v6]:port` to the host.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

enum Parse {
    Found(Option<String>),
    Incomplete,
    NotThis,
}

/// A cursor that reads big-endian fields and reports a short input as `None`.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// Reassembles the handshake messages carried by the leading TLS records (a ClientHello may
/// span several) and extracts the server name.
fn client_hello_sni(data: &[u8]) -> Parse {
    let mut records = Reader { buf: data };
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        let Some(header) = records.take(5) else {
            return Parse::Incomplete;
        };
        // Handshake records of TLS 1.0-1.3 (the ClientHello's record says 3.1 at most, but
        // some clients write 3.0 there).
        if header[0] != 0x16 || header[1] != 3 || header[2] > 4 {
            return Parse::NotThis;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 + 2048 {
            return Parse::NotThis;
        }
        let Some(body) = records.take(len) else {
            // Parse what arrived: the server name is usually early, long before the end.
            let partial = [&handshake[..], records.buf].concat();
            return match parse_client_hello(&partial) {
                Parse::Found(sni) => Parse::Found(sni),
                Parse::NotThis => Parse::NotThis,
                Parse::Incomplete => Parse::Incomplete,
            };
        };
        handshake.extend_from_slice(body);
        match parse_client_hello(&handshake) {
            Parse::Incomplete if handshake.len() < MAX_SNIFF => continue,
            Parse::Incomplete => return Parse::Found(None),
            done => return done,
        }
    }
}

fn parse_client_hello(handshake: &[u8]) -> Parse {
    let mut r = Reader { buf: handshake };
    let (Some(kind), Some(len)) = (r.u8(), r.u24()) else {
        return Parse::Incomplete;
    };
    if kind != 1 {
        return Parse::NotThis;
    }
    // With the whole message, running out of bytes means it is malformed; with part of it,
    // that more is needed.
    let complete = r.buf.len() >= len;
    let mut body = Reader {
        buf: if complete { &r.buf[..len] } else { r.buf },
    };
    match client_hello_body(&mut body, complete) {
        Some(found) => found,
        None if complete => Parse::NotThis,
        None => Parse::Incomplete,
    }
}

/// The server name from a ClientHello body; `None` when the bytes ran out.
fn client_hello_body(r: &mut Reader<'_>, complete: bool) -> Option<Parse> {
    let version = r.take(2)?;
    if version[0] != 3 {
        return Some(Parse::NotThis);
    }
    r.take(32)?; // random
    let session = usize::from(r.u8()?);
    if session > 32 {
        return Some(Parse::NotThis);
    }
    r.take(session)?;
    let suites = r.u16()?;
    if suites % 2 != 0 {
        return Some(Parse::NotThis);
    }
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    r.take(compression)?;
    if r.buf.is_empty() && complete {
        // No extensions at all (old clients): complete, without a name.
        return Some(Parse::Found(None));
    }
    let extensions_len = r.u16()?;
    let mut ext = Reader {
        buf: r.take(extensions_len).unwrap_or(r.buf),
    };
    let all_extensions = ext.buf.len() >= extensions_len;
    loop {
        if ext.buf.is_empty() && all_extensions {
            return Some(Parse::Found(None));
        }
        let kind = ext.u16()?;
        let len = ext.u16()?;
        let body = ext.take(len)?;
        if kind == 0 {
            return Some(server_name(body).map_or(Parse::NotThis, Parse::Found));
        }
    }
}

/// The host name in a `server_name` extension body; `None` when malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { buf: body };
    let list_len = r.u16()?;
    let mut list = Reader {
        buf: r.take(list_len)?,
    };
    while !list.buf.is_empty() {
        let kind = list.u8()?;
        let len = list.u16()?;
        let name = list.take(len)?;
        if kind == 0 {
            let name = std::str::from_utf8(name).ok()?;
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            return valid.then(|| Some(name.trim_end_matches('.').to_ascii_lowercase()));
        }
    }
    Some(None)
}

/// A ClientHello as a real TLS stack writes it (for tests here and in the engine).
#[cfg(any(test, feature = "testkit"))]
pub fn client_hello(name: &str) -> Vec<u8> {
    use std::sync::Arc;
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap())
            .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tls(sni: Option<&str>) -> Sniff {
        Sniff::Done(Detected::Tls {
            sni: sni.map(str::to_string),
        })
    }

    #[test]
    fn a_real_client_hello_gives_its_server_name() {
        let hello = client_hello("Www.Example.COM");
        assert_eq!(sniff(&hello), tls(Some("www.example.com")));
        assert_eq!(sniff(&hello).clone(), tls(Some("www.example.com")));
    }

    #[test]
    fn a_client_hello_arriving_in_pieces_asks_for_more_then_answers() {
        let hello = client_hello("api.example.net");
        let mut answered_at = None;
        for n in 1..=hello.len() {
            match sniff(&hello[..n]) {
                Sniff::NeedMore => assert!(answered_at.is_none(), "NeedMore after an answer"),
                done => {
                    assert_eq!(done, tls(Some("api.example.net")), "at {n} bytes");
                    answered_at.get_or_insert(n);
                }
            }
        }
        assert!(answered_at.is_some());
    }

    #[test]
    fn a_client_hello_split_over_two_records_is_reassembled() {
        let hello = client_hello("split.example.org");
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(sniff(&two), tls(Some("split.example.org")));
    }

    #[test]
    fn a_client_hello_to_an_address_has_no_name() {
        // rustls sends no server_name for an IP address.
        let hello = client_hello("192.0.2.7");
        assert_eq!(sniff(&hello), tls(None));
    }

    #[test]
    fn http_requests_give_their_host() {
        let req = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: Example.com:8080\r\n\r\n";
        assert_eq!(
            sniff(req),
            Sniff::Done(Detected::Http {
                host: Some("example.com".into())
            })
        );
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: exa"), Sniff::NeedMore);
        assert_eq!(
            sniff(b"POST /x HTTP/1.0\r\n\r\n"),
            Sniff::Done(Detected::Http { host: None })
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n"),
            Sniff::Done(Detected::Http {
                host: Some("2001:db8::1".into())
            })
        );
    }

    #[test]
    fn other_protocols() {
        assert_eq!(
            sniff(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Sniff::Done(Detected::Ssh)
        );
        assert_eq!(sniff(b"SS"), Sniff::NeedMore);
        assert_eq!(sniff(H2_PREFACE), Sniff::Done(Detected::Http2));
        assert_eq!(sniff(b"\x00\x01binary"), Sniff::Done(Detected::Unknown));
        assert_eq!(
            sniff(b"\x16\x03\x05\x00\x10"),
            Sniff::Done(Detected::Unknown)
        );
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(Detected::Http2.protocol(), "http");
    }

    proptest! {
        #[test]
        fn garbage_never_panics_and_a_full_buffer_always_answers(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            tls_start in any::<bool>(),
        ) {
            let mut data = data;
            if tls_start && data.len() > 3 {
                data[0] = 0x16;
                data[1] = 3;
                data[2] = 1;
            }
            let _ = sniff(&data);
            let mut full = data.clone();
            full.resize(MAX_SNIFF, 0);
            prop_assert!(matches!(sniff(&full), Sniff::Done(_)));
        }

        #[test]
        fn mutated_client_hellos_never_panic(flips in proptest::collection::vec((0usize..600, any::<u8>()), 1..8)) {
            let mut hello = client_hello("mutate.example.com");
            for (at, byte) in flips {
                if let Some(b) = hello.get_mut(at) {
                    *b = byte;
                }
            }
            let _ = sniff(&hello);
            for n in 0..hello.len() {
                let _ = sniff(&hello[..n]);
            }
        }
    }
}
