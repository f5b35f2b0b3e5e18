//! Encrypted upstream transports (tokio shell): DNS over TLS (RFC 7858) and DNS over HTTPS
//! (RFC 8484, POST), with connections kept open between queries because a TLS handshake costs
//! several round trips.
//!
//! Certificates are checked against the host's trust store plus the extra CAs of
//! `dns.upstream_ca`. Idle connections are pooled per upstream; a pooled connection the server
//! closed in the meantime is dropped and the query retried once on a fresh one.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::doh::DNS_MESSAGE;
use super::framing::exchange;
use waygate_dns::resolver::MAX_MESSAGE;

/// Where a DNS over HTTPS upstream lives, parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsTarget {
    /// Host name or address, as in the URL (certificate name and `Host` header).
    pub host: String,
    /// Port (443 unless the URL says otherwise).
    pub port: u16,
    /// Path and query, e.g. `/dns-query`.
    pub path: String,
}

impl HttpsTarget {
    /// Parses `https://host[:port][/path]`; the path defaults to `/dns-query`.
    pub fn parse(url: &str) -> Option<HttpsTarget> {
        let rest = url.strip_prefix("https://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/dns-query"),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => 443,
                None => return None,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (authority.to_string(), 443),
            }
        };
        if host.is_empty() || host.contains('@') || path.contains(char::is_whitespace) {
            return None;
        }
        Some(HttpsTarget {
            host,
            port,
            path: path.to_string(),
        })
    }

    fn server_name(&self) -> io::Result<ServerName<'static>> {
        server_name(&self.host)
    }
}

fn server_name(name: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid TLS server name"))
}

/// The certificates an upstream may present: the host's trust store and `extra_ca` (PEM).
pub fn trust_roots(extra_ca: Option<&Path>) -> io::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(target: "waygate::dns", error = %e, "skipping a system certificate");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no certificates", path.display()),
            ));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
        }
    }
    Ok(roots)
}

/// TLS client settings for one ALPN list.
fn client_config(roots: &rustls::RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions();
    let mut config = match builder {
        Ok(b) => b
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        // ring supports the default versions; this arm only keeps the type checker honest.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

enum HttpSender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// Open connections to encrypted upstreams, by upstream index.
pub struct EncryptedPool {
    dot_config: Arc<rustls::ClientConfig>,
    doh_config: Arc<rustls::ClientConfig>,
    dot: Mutex<HashMap<usize, Vec<TlsStream<TcpStream>>>>,
    doh: Mutex<HashMap<usize, Vec<HttpSender>>>,
}

impl std::fmt::Debug for EncryptedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedPool").finish_non_exhaustive()
    }
}

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EncryptedPool {
    /// A pool trusting `roots`.
    pub fn new(roots: &rustls::RootCertStore) -> Self {
        EncryptedPool {
            dot_config: client_config(roots, &[b"dot"]),
            doh_config: client_config(roots, &[b"h2", b"http/1.1"]),
            dot: Mutex::default(),
            doh: Mutex::default(),
        }
    }

    /// One query over DNS over TLS to upstream `index`, whose certificate must name `name`;
    /// `connect` (awaited only when no idle connection works) opens a new TCP connection.
    pub async fn dot<F>(
        &self,
        index: usize,
        name: &str,
        query: &[u8],
        connect: F,
    ) -> io::Result<Vec<u8>>
    where
        F: Future<Output = io::Result<TcpStream>>,
    {
        let pooled = lock(&self.dot).get_mut(&index).and_then(Vec::pop);
        if let Some(mut stream) = pooled {
            if let Ok(answer) = exchange(&mut stream, query).await {
                self.keep_dot(index, stream);
                return Ok(answer);
            }
            // The server closed it while idle; a fresh connection retries.
        }
        let connector = tokio_rustls::TlsConnector::from(self.dot_config.clone());
        let mut stream = connector
            .connect(server_name(name)?, connect.await?)
            .await?;
        let answer = exchange(&mut stream, query).await?;
        self.keep_dot(index, stream);
        Ok(answer)
    }

    fn keep_dot(&self, index: usize, stream: TlsStream<TcpStream>) {
        let mut pools = lock(&self.dot);
        let idle = pools.entry(index).or_default();
        if idle.len() < MAX_IDLE {
            idle.push(stream);
        }
    }

    /// One query over DNS over HTTPS (POST) to upstream `index`; `connect` opens a new TCP
    /// connection when no idle one works.
    pub async fn doh<F>(
        &self,
        index: usize,
        target: &HttpsTarget,
        query: &[u8],
        connect: F,
    ) -> io::Result<Vec<u8>>
    where
        F: Future<Output = io::Result<TcpStream>>,
    {
        let pooled = {
            let mut pools = lock(&self.doh);
            let idle = pools.entry(index).or_default();
            match idle.pop() {
                // An HTTP/2 connection carries concurrent queries: it stays in the pool.
                Some(HttpSender::H2(s)) => {
                    idle.push(HttpSender::H2(s.clone()));
                    Some(HttpSender::H2(s))
                }
                other => other,
            }
        };
        if let Some(sender) = pooled {
            if let Ok((answer, sender)) = post(sender, target, query).await {
                self.keep_doh(index, sender);
                return Ok(answer);
            }
        }
        let sender = self.handshake_https(target, connect.await?).await?;
        let (answer, sender) = post(sender, target, query).await?;
        self.keep_doh(index, sender);
        Ok(answer)
    }

    fn keep_doh(&self, index: usize, sender: HttpSender) {
        let mut pools = lock(&self.doh);
        let idle = pools.entry(index).or_default();
        let shared = matches!(sender, HttpSender::H2(_))
            && idle.iter().any(|s| matches!(s, HttpSender::H2(_)));
        if idle.len() < MAX_IDLE && !shared {
            idle.push(sender);
        }
    }

    async fn handshake_https(
        &self,
        target: &HttpsTarget,
        tcp: TcpStream,
    ) -> io::Result<HttpSender> {
        let connector = tokio_rustls::TlsConnector::from(self.doh_config.clone());
        let tls = connector.connect(target.server_name()?, tcp).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = hyper_util::rt::TokioIo::new(tls);
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(io::Error::other)?;
            tokio::spawn(conn);
            Ok(HttpSender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            Ok(HttpSender::H1(sender))
        }
    }
}

/// POSTs `query` and returns the answer and the sender for reuse.
async fn post(
    mut sender: HttpSender,
    target: &HttpsTarget,
    query: &[u8],
) -> io::Result<(Vec<u8>, HttpSender)> {
    let authority = match target.host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", target.port),
        _ => format!("{}:{}", target.host, target.port),
    };
    // HTTP/2 wants an absolute URI (it becomes :scheme and :authority); HTTP/1.1 a path and Host.
    let h2 = matches!(sender, HttpSender::H2(_));
    let mut request = hyper::Request::post(if h2 {
        format!("https://{authority}{}", target.path)
    } else {
        target.path.clone()
    })
    .header(CONTENT_TYPE, DNS_MESSAGE)
    .header(ACCEPT, DNS_MESSAGE);
    if !h2 {
        request = request.header(HOST, authority);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(query)))
        .map_err(io::Error::other)?;
    let response = match &mut sender {
        HttpSender::H1(s) => {
            s.ready().await.map_err(io::Error::other)?;
            s.send_request(request).await
        }
        HttpSender::H2(s) => {
            s.ready().await.map_err(io::Error::other)?;
            s.send_request(request).await
        }
    }
    .map_err(io::Error::other)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        return Err(io::Error::other(format!("HTTP status {status}")));
    }
    Ok((body.to_vec(), sender))
}

/// Resolves an upstream host name with the host's resolver (the bootstrap), or takes it as an
/// address.
pub async fn lookup(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls() {
        let t = HttpsTarget::parse("https://dns.example/dns-query").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("dns.example", 443, "/dns-query")
        );
        let t = HttpsTarget::parse("https://203.0.113.53:8443").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("203.0.113.53", 8443, "/dns-query")
        );
        let t = HttpsTarget::parse("https://[2001:db8::53]/q?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("2001:db8::53", 443, "/q?x=1")
        );
        assert!(HttpsTarget::parse("https://").is_none());
        assert!(HttpsTarget::parse("https://a:b/").is_none());
        assert!(HttpsTarget::parse("https://user@a/").is_none());
        assert!(HttpsTarget::parse("http://a/").is_none());
    }

    #[test]
    fn an_extra_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        assert!(trust_roots(Some(&empty)).is_err());
        assert!(trust_roots(Some(&dir.path().join("missing.pem"))).is_err());
    }
}
