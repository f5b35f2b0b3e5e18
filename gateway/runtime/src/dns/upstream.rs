//! Upstream client (tokio shell): sends the core's query to each configured upstream in turn until
//! one answers. Plain DNS goes over UDP, retried over TCP when the answer comes back truncated;
//! `tls://` and `https://` upstreams go through [`super::encrypted`].
//! Queries leave from the configured egress address.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::encrypted::{self, trust_roots, EncryptedPool, HttpsTarget};
use super::framing::exchange;
use waygate_dns::resolver::MAX_MESSAGE;

/// Default time one upstream gets to answer before the next is tried.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// All upstreams together get this long, so a device hears SERVFAIL within 2 s when they are
/// gone (issue 20; measured with one silent upstream: 2.10 s at the device with 2 s an
/// upstream), and can go on to its other resolvers. Split evenly over the upstreams not yet
/// tried, each capped at its own timeout.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(1800);

/// One upstream resolver, as written in `dns.upstreams`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Upstream {
    /// `203.0.113.53`, `203.0.113.53:53` or `udp://…`: UDP with TCP fallback.
    Plain(SocketAddr),
    /// `tls://IP[:853]` or `tls://NAME@IP[:853]` (DNS over TLS; the certificate must name NAME,
    /// or IP).
    Tls {
        /// Server address.
        addr: SocketAddr,
        /// Name the certificate must carry.
        server_name: String,
    },
    /// `https://host[:port]/dns-query` (DNS over HTTPS, POST); a host name is resolved with the
    /// host's resolver.
    Https {
        /// The full URL.
        url: String,
        /// Its host, port and path.
        target: HttpsTarget,
    },
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Plain(a) => write!(f, "{a}"),
            Upstream::Tls { addr, server_name } => write!(f, "tls://{server_name}@{addr}"),
            Upstream::Https { url, .. } => f.write_str(url),
        }
    }
}

/// A `dns.upstreams` entry that is not an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid dns upstream {value:?}: {reason}")]
pub struct ParseUpstreamError {
    /// The entry as written.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn addr_with_default(s: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

impl FromStr for Upstream {
    type Err = ParseUpstreamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseUpstreamError {
            value: s.to_owned(),
            reason,
        };
        if s.starts_with("https://") {
            let target = HttpsTarget::parse(s).ok_or(err("expected https://host[:port][/path]"))?;
            return Ok(Upstream::Https {
                url: s.to_owned(),
                target,
            });
        }
        if let Some(rest) = s.strip_prefix("tls://") {
            // `tls://name@ip:port` pins the address; a bare IP is its own name.
            let (name, addr) = match rest.split_once('@') {
                Some((n, a)) => (n.to_owned(), a),
                None => (
                    rest.rsplit_once(':').map_or(rest, |(h, _)| h).to_owned(),
                    rest,
                ),
            };
            let addr = addr_with_default(addr, 853).ok_or(err("tls:// needs an IP address"))?;
            return Ok(Upstream::Tls {
                addr,
                server_name: name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            });
        }
        let rest = s.strip_prefix("udp://").unwrap_or(s);
        addr_with_default(rest, 53)
            .map(Upstream::Plain)
            .ok_or(err("expected IP[:port], tls://… or https://…"))
    }
}

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No upstreams configured.
    #[error("no dns upstreams configured")]
    NoUpstreams,
    /// The last upstream tried failed with this I/O error.
    #[error("dns upstream {upstream}: {source}")]
    Io {
        /// Which upstream.
        upstream: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The last upstream tried did not answer in time.
    #[error("dns upstream {upstream} timed out")]
    Timeout {
        /// Which upstream.
        upstream: String,
    },
}

/// Sends queries to the configured upstreams, in order, each with a timeout.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    upstreams: Vec<Upstream>,
    bind: Option<IpAddr>,
    timeout: Duration,
    encrypted: Arc<EncryptedPool>,
}

impl UpstreamClient {
    /// A client for `upstreams`, sending from `bind` (the egress address) when given; encrypted
    /// upstreams must present a certificate the host trusts.
    pub fn new(upstreams: Vec<Upstream>, bind: Option<IpAddr>, timeout: Duration) -> Self {
        let needs_roots = upstreams.iter().any(|u| !matches!(u, Upstream::Plain(_)));
        let roots = if needs_roots {
            trust_roots(None).unwrap_or_else(|_| rustls::RootCertStore::empty())
        } else {
            rustls::RootCertStore::empty()
        };
        UpstreamClient {
            upstreams,
            bind,
            timeout,
            encrypted: Arc::new(EncryptedPool::new(&roots)),
        }
    }

    /// Trusts `roots` (instead of the host's store alone) for encrypted upstreams.
    pub fn with_roots(mut self, roots: &rustls::RootCertStore) -> Self {
        self.encrypted = Arc::new(EncryptedPool::new(roots));
        self
    }

    /// The configured upstreams.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// Sends `query` (a full DNS message) and returns the first answer and who gave it.
    ///
    /// An answer is accepted only from the queried address with the query's id, so spoofed
    /// datagrams to our ephemeral port are ignored rather than trusted.
    pub async fn query(&self, query: &[u8]) -> Result<(Vec<u8>, &Upstream), UpstreamError> {
        let mut last = UpstreamError::NoUpstreams;
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        let count = self.upstreams.len();
        for (index, up) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / u32::try_from(count - index).unwrap_or(u32::MAX);
            match self
                .query_one(index, up, query, share.min(self.timeout))
                .await
            {
                Ok(answer) => return Ok((answer, up)),
                Err(e) => {
                    tracing::debug!(target: "waygate::dns", upstream = %up, error = %e, "dns upstream failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn query_one(
        &self,
        index: usize,
        up: &Upstream,
        query: &[u8],
        wait: Duration,
    ) -> Result<Vec<u8>, UpstreamError> {
        let io = |source| UpstreamError::Io {
            upstream: up.to_string(),
            source,
        };
        let timeout = || UpstreamError::Timeout {
            upstream: up.to_string(),
        };
        let addr = match up {
            Upstream::Plain(addr) => *addr,
            Upstream::Tls { addr, server_name } => {
                let answer = self
                    .encrypted
                    .dot(index, server_name, query, self.connect_tcp(*addr));
                return tokio::time::timeout(wait, answer)
                    .await
                    .map_err(|_| timeout())?
                    .map_err(io);
            }
            Upstream::Https { target, .. } => {
                let connect = async {
                    let addrs = encrypted::lookup(&target.host, target.port).await?;
                    let mut last = std::io::Error::other("the host name has no address");
                    for addr in addrs {
                        match self.connect_tcp(addr).await {
                            Ok(s) => return Ok(s),
                            Err(e) => last = e,
                        }
                    }
                    Err(last)
                };
                let answer = self.encrypted.doh(index, target, query, connect);
                return tokio::time::timeout(wait, answer)
                    .await
                    .map_err(|_| timeout())?
                    .map_err(io);
            }
        };
        let answer = tokio::time::timeout(wait, self.udp(addr, query))
            .await
            .map_err(|_| timeout())?
            .map_err(io)?;
        // TC bit: the answer did not fit, ask again over TCP (RFC 7766).
        if answer.get(2).is_some_and(|f| f & 0x02 != 0) {
            return tokio::time::timeout(wait, self.tcp(addr, query))
                .await
                .map_err(|_| timeout())?
                .map_err(io);
        }
        Ok(answer)
    }

    async fn udp(&self, addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let local = self.local_for(addr);
        let sock = UdpSocket::bind(local).await?;
        sock.connect(addr).await?;
        sock.send(query).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = sock.recv(&mut buf).await?;
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn tcp(&self, addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut stream = self.connect_tcp(addr).await?;
        exchange(&mut stream, query).await
    }

    async fn connect_tcp(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = self.bind.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        sock.connect(addr).await
    }

    fn local_for(&self, addr: SocketAddr) -> SocketAddr {
        match self.bind.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            Some(ip) => SocketAddr::new(ip, 0),
            None if addr.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => SocketAddr::from(([0u16; 8], 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_forms() {
        let p = |s: &str| s.parse::<Upstream>();
        assert_eq!(
            p("203.0.113.53").unwrap(),
            Upstream::Plain("203.0.113.53:53".parse().unwrap())
        );
        assert_eq!(
            p("udp://203.0.113.53:5353").unwrap(),
            Upstream::Plain("203.0.113.53:5353".parse().unwrap())
        );
        assert_eq!(
            p("[2001:db8::53]").unwrap(),
            Upstream::Plain("[2001:db8::53]:53".parse().unwrap())
        );
        assert_eq!(
            p("tls://dns.example@203.0.113.53").unwrap(),
            Upstream::Tls {
                addr: "203.0.113.53:853".parse().unwrap(),
                server_name: "dns.example".into()
            }
        );
        assert!(matches!(
            p("https://dns.example/dns-query").unwrap(),
            Upstream::Https { .. }
        ));
        assert!(p("dns.example").is_err());
        assert!(p("tls://dns.example").is_err());
    }
}
