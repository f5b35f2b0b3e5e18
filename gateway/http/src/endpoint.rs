//! The explicit proxy endpoint (`http.proxy_listen`) for networks without the client, as
//! Cloudflare's proxy endpoints: browsers configured with a proxy (or the PAC file served at
//! `/proxy.pac`) send `CONNECT host:port` or absolute-URI requests (`GET http://host/path`).
//!
//! Only sources inside an `[[http.proxy_endpoints]]` network are served (others get 403); the
//! endpoint's name fills `proxy.endpoint`. There is no device: identity and posture fields stay
//! empty, `http.conn.src_ip` and the source geolocation come from the client's address, and the
//! origin is connected from the egress stage's default. A CONNECT tunnel then goes through the
//! same inspection as an intercepted flow (TLS decrypted per `http.tls_decrypt`); an
//! absolute-URI request is decided and forwarded like an intercepted plain HTTP one, and its
//! connection closes after the response, since the client's next request may name another
//! origin.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use waygate_model::{DeviceInfo, FlowCtx, FlowRules, Protocol};

use crate::reset::ResetFlag;
use crate::{proxy, Inspector, Shared};

/// Connects to an origin for a proxy request, from the egress address the runtime chose.
pub type Connector = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync,
>;

/// The longest request head (request line and headers) a proxy client may send.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers looked at in a request head; a head with more is refused.
const MAX_HEADERS: usize = 64;
/// Where the PAC file is served.
pub const PAC_PATH: &str = "/proxy.pac";

/// What a proxy client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// `CONNECT host:port`: a tunnel.
    Connect {
        /// Host name or address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// An absolute-URI request (`GET http://host[:port]/path`).
    Absolute {
        /// Host name or address (without brackets).
        host: String,
        /// Port (80 when the URI has none).
        port: u16,
    },
    /// An origin-form request to the proxy itself (`GET /proxy.pac`).
    Origin {
        /// Method.
        method: String,
        /// Path, query dropped.
        path: String,
    },
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Not an HTTP/1 request head.
    Malformed,
    /// Longer than [`MAX_HEAD`] or with too many headers.
    TooLarge,
    /// A target this proxy does not serve (an `https://` absolute URI, a CONNECT without port).
    BadTarget,
}

/// Parses a proxy request head from the start of `buf`: `Ok(None)` when more bytes are needed,
/// else what it asks for and the head's length.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(HeadError::Malformed);
    };
    let head = if method == "CONNECT" {
        let authority: hyper::http::uri::Authority =
            target.parse().map_err(|_| HeadError::BadTarget)?;
        let port = authority.port_u16().ok_or(HeadError::BadTarget)?;
        Head::Connect {
            host: unbracket(authority.host()),
            port,
        }
    } else if target.starts_with('/') {
        Head::Origin {
            method: method.to_string(),
            path: target.split('?').next().unwrap_or(target).to_string(),
        }
    } else {
        let uri: hyper::Uri = target.parse().map_err(|_| HeadError::BadTarget)?;
        if uri.scheme_str() != Some("http") {
            return Err(HeadError::BadTarget);
        }
        let host = uri.host().ok_or(HeadError::BadTarget)?;
        Head::Absolute {
            host: unbracket(host),
            port: uri.port_u16().unwrap_or(80),
        }
    };
    if head_host(&head).is_some_and(str::is_empty) {
        return Err(HeadError::BadTarget);
    }
    Ok(Some((head, len)))
}

fn head_host(head: &Head) -> Option<&str> {
    match head {
        Head::Connect { host, .. } | Head::Absolute { host, .. } => Some(host),
        Head::Origin { .. } => None,
    }
}

fn unbracket(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// The PAC file for a listener reached at `listener`: everything through the proxy, direct
/// only when the proxy does not answer (as Cloudflare's PAC files fall back).
pub fn pac_file(listener: SocketAddr) -> String {
    format!(
        "function FindProxyForURL(url, host) {{\n  \
         // Plain host names (intranet) and loopback stay direct.\n  \
         if (isPlainHostName(host) || shExpMatch(host, \"localhost\") ||\n      \
         isInNet(host, \"127.0.0.0\", \"255.0.0.0\")) {{\n    \
         return \"DIRECT\";\n  \
         }}\n  \
         return \"PROXY {listener}; DIRECT\";\n\
         }}\n"
    )
}

/// The endpoint whose networks hold `src`, by name.
fn endpoint_of(shared: &Shared, src: IpAddr) -> Option<Arc<str>> {
    let src = match src {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src, IpAddr::V4),
        v4 => v4,
    };
    shared
        .config
        .proxy_endpoints
        .iter()
        .find(|e| e.networks.iter().any(|n| n.contains(&src)))
        .map(|e| Arc::from(e.name.as_str()))
}

/// Proxy requests have no device: one shared empty identity.
fn no_device() -> Arc<DeviceInfo> {
    static NONE: std::sync::OnceLock<Arc<DeviceInfo>> = std::sync::OnceLock::new();
    NONE.get_or_init(|| {
        Arc::new(DeviceInfo {
            id: String::new(),
            name: String::new(),
            email: String::new(),
            user_name: None,
            groups: Vec::new(),
            extras: Arc::default(),
            vnet_id: None,
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv6: Ipv6Addr::UNSPECIFIED,
            log_fields: Default::default(),
        })
    })
    .clone()
}

/// Flow ids of proxy requests count down from the top, apart from the engine's.
static NEXT_FLOW: AtomicU64 = AtomicU64::new(u64::MAX);

fn simple(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Inspector {
    /// Serves the explicit proxy on `listener` (already bound, non-blocking), connecting to
    /// origins with `connect`.
    pub fn serve_proxy(&self, listener: std::net::TcpListener, connect: Connector) {
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(target: "waygate::http", error = %e, "proxy listener failed");
                    return;
                }
            };
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: wait instead of spinning.
                        tracing::debug!(target: "waygate::http", error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let connect = connect.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(shared, stream, peer, connect).await {
                        tracing::debug!(target: "waygate::http", src = %peer, error = %e, "proxy client ended");
                    }
                });
            }
        });
    }
}

/// Reads a request head: the parsed head, and every byte read (head and what followed).
async fn read_head(
    stream: &mut TcpStream,
) -> io::Result<Result<(Head, usize, Vec<u8>), HeadError>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match parse_head(&buf) {
            Ok(Some((head, len))) => return Ok(Ok((head, len, buf))),
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// Connects to `host:port`: each of its addresses in turn (the first one that answers), so an
/// origin listening on one address family only is still reached.
async fn connect_to(
    connect: &Connector,
    host: &str,
    port: u16,
) -> io::Result<(SocketAddr, TcpStream)> {
    let targets: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for target in targets {
        match connect(target).await {
            Ok(stream) => return Ok((target, stream)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn client(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    connect: Connector,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let listener = stream.local_addr()?;
    let read = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let Some(endpoint) = endpoint_of(&shared, peer.ip()) else {
        tracing::info!(target: "waygate::http", src = %peer, decision = "refused", "proxy request from outside every proxy endpoint");
        shared.counters.blocked.fetch_add(1, Ordering::Relaxed);
        let body = format!("{} is in no proxy endpoint's networks.\n", peer.ip());
        stream
            .write_all(&simple("403 Forbidden", "text/plain", &body))
            .await?;
        return stream.shutdown().await;
    };
    let (head, len, buf) = match read {
        Ok(read) => read,
        Err(e) => {
            let status = match e {
                HeadError::TooLarge => "431 Request Header Fields Too Large",
                HeadError::Malformed | HeadError::BadTarget => "400 Bad Request",
            };
            stream
                .write_all(&simple(status, "text/plain", "bad proxy request\n"))
                .await?;
            return stream.shutdown().await;
        }
    };
    let (host, port, tunnel) = match head {
        Head::Origin { method, path } => {
            let answer = if path == PAC_PATH && (method == "GET" || method == "HEAD") {
                let pac = pac_file(listener);
                let mut answer = simple("200 OK", "application/x-ns-proxy-autoconfig", &pac);
                if method == "HEAD" {
                    answer.truncate(answer.len() - pac.len());
                }
                answer
            } else {
                simple(
                    "404 Not Found",
                    "text/plain",
                    "This is a proxy: configure it in the browser, or use /proxy.pac.\n",
                )
            };
            stream.write_all(&answer).await?;
            return stream.shutdown().await;
        }
        Head::Connect { host, port } => (host, port, true),
        Head::Absolute { host, port } => (host, port, false),
    };
    let (target, upstream) = match connect_to(&connect, &host, port).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::debug!(target: "waygate::http", src = %peer, host = %host, port, error = %e, "proxy upstream connect failed");
            let body = format!("Cannot reach {host}:{port}.\n");
            stream
                .write_all(&simple("502 Bad Gateway", "text/plain", &body))
                .await?;
            return stream.shutdown().await;
        }
    };
    let ctx = FlowCtx {
        id: NEXT_FLOW.fetch_sub(1, Ordering::Relaxed),
        peer: 0,
        device: no_device(),
        device_public: None,
        protocol: Protocol::Tcp,
        src: peer,
        dst: target,
        opened: Instant::now(),
        rules: FlowRules::default(),
    };
    let reset = ResetFlag::default();
    // The explicit proxy's connections keep their own upstream: never from or to the pool.
    let route = crate::Route {
        dst: target,
        bind: None,
        via: None,
        connect: Arc::new(move || connect(target)),
    };
    let mut flow = proxy::Conn::new(ctx, route, Some(endpoint), Some(reset.clone()));
    flow.one_request = !tunnel;
    flow.pooled = false;
    let flow = Arc::new(flow);
    // The tunnel carries what follows the CONNECT head; a plain request is served whole.
    let rest = if tunnel { buf[len..].to_vec() } else { buf };
    if tunnel {
        stream
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
    }
    let device = Client {
        rest,
        at: 0,
        stream,
        reset,
    };
    if tunnel {
        shared.run(flow, device, Some(upstream)).await
    } else {
        let (sender, _) = proxy::open(&shared, None, upstream).await?;
        *flow
            .own
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender);
        proxy::serve(shared, flow, device, false).await;
        Ok(())
    }
}

/// A proxy client's connection past its request head: the bytes read beyond the head first,
/// then the socket. Dropped with its flag raised (a CONNECT blocked on the SNI alone), it ends
/// with a reset, as an intercepted device's connection does, instead of a FIN.
struct Client {
    rest: Vec<u8>,
    /// How much of `rest` was read.
    at: usize,
    stream: TcpStream,
    reset: ResetFlag,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(left) = this.rest.get(this.at..).filter(|l| !l.is_empty()) {
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.at += n;
            if this.at == this.rest.len() {
                // Read through: its memory goes now, not with the connection.
                this.rest = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.reset.raised() {
            // A zero linger makes the close an RST (and never blocks).
            let _ = self.stream.set_zero_linger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_into_what_the_client_asked_for() {
        let connect = b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n\r\nX";
        assert_eq!(
            parse_head(connect),
            Ok(Some((
                Head::Connect {
                    host: "www.example.com".into(),
                    port: 443
                },
                connect.len() - 1
            )))
        );
        let v6 = b"CONNECT [2001:DB8::1]:8443 HTTP/1.1\r\n\r\n";
        assert!(matches!(
            parse_head(v6),
            Ok(Some((Head::Connect { host, port: 8443 }, _))) if host == "2001:db8::1"
        ));
        let plain = b"GET http://Example.com/a?b=1 HTTP/1.1\r\nHost: example.com\r\n\r\n";
        assert!(matches!(
            parse_head(plain),
            Ok(Some((Head::Absolute { host, port: 80 }, _))) if host == "example.com"
        ));
        let pac = b"GET /proxy.pac?x=1 HTTP/1.1\r\n\r\n";
        assert!(matches!(
            parse_head(pac),
            Ok(Some((Head::Origin { method, path }, _))) if method == "GET" && path == PAC_PATH
        ));
        // Incomplete heads wait for more; broken and unserved ones are refused.
        assert_eq!(parse_head(b"CONNECT a.example:443 HTTP/1.1\r\n"), Ok(None));
        assert_eq!(
            parse_head(b"CONNECT a.example HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadTarget)
        );
        assert_eq!(
            parse_head(b"GET https://a.example/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadTarget)
        );
        assert_eq!(
            parse_head(b"\x16\x03\x01\x02\x00"),
            Err(HeadError::Malformed)
        );
        let mut long = b"GET http://a.example/ HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(parse_head(&long), Err(HeadError::TooLarge));
    }

    #[test]
    fn the_pac_file_names_the_listener() {
        let pac = pac_file("198.51.100.1:8080".parse().unwrap());
        assert!(pac.starts_with("function FindProxyForURL(url, host) {"));
        assert!(pac.contains("return \"PROXY 198.51.100.1:8080; DIRECT\";"));
        let pac = pac_file("[2001:db8::1]:8080".parse().unwrap());
        assert!(pac.contains("PROXY [2001:db8::1]:8080; DIRECT"));
    }
}
