//! DNS listeners (tokio shell): UDP, TCP, DNS over TLS and DNS over HTTPS sockets answering
//! through the shared [`Resolver`].
//!
//! Each UDP worker owns its receive and send buffers for its whole life; a query that needs the
//! upstream is handed to a task so one slow upstream never stalls the socket. The resolver sits
//! behind a mutex held only for the synchronous core calls.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsRawFd;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use super::batch::{send_batch, RecvBatch, BATCH};
use super::doh;
use super::policy::{ClientCtx, DnsPolicy};
use super::upstream::UpstreamClient;
use waygate_dns::resolver::{Handled, Resolver, Transport, MAX_MESSAGE};

/// Socket receive/send buffer asked for each UDP listener.
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;
/// A TCP client idle this long is disconnected (RFC 7766 suggests tens of seconds).
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// DNS over HTTPS clients keep connections for many queries; this long without a request's
/// headers (HTTP/1) or between pings (HTTP/2) ends one.
pub const DOH_IDLE: Duration = Duration::from_secs(30);

/// Where to listen.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// UDP listen addresses (port 0 picks one; see [`RunningServer::udp_addrs`]).
    pub udp: Vec<SocketAddr>,
    /// TCP listeners: plain, TLS or HTTPS.
    pub streams: Vec<StreamListener>,
    /// Certificates for the TLS and HTTPS listeners.
    pub tls: Option<TlsConfigs>,
    /// Tasks receiving on each UDP socket (default 1 when 0).
    pub udp_workers: usize,
}

/// TLS server settings of the encrypted listeners (they differ in ALPN).
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    /// For DNS over TLS (ALPN `dot`).
    pub dot: Arc<rustls::ServerConfig>,
    /// For DNS over HTTPS (ALPN `h2`, `http/1.1`).
    pub doh: Arc<rustls::ServerConfig>,
}

/// What a stream listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Length-prefixed DNS over TCP (RFC 7766).
    Tcp,
    /// Length-prefixed DNS inside TLS (RFC 7858); needs [`ServerConfig::tls`].
    Tls,
    /// DNS over HTTPS (RFC 8484); needs [`ServerConfig::tls`].
    Https,
}

/// A TCP listen address and what its connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamListener {
    /// Where (port 0 picks one; see [`RunningServer::stream_addr`]).
    pub addr: SocketAddr,
    /// What it speaks.
    pub kind: StreamKind,
}

/// Maps a query's source address to the client the policy sees (device lookup, locations).
pub type Identify = Arc<dyn Fn(SocketAddr) -> ClientCtx + Send + Sync>;

/// The resolver shared between listeners and the integrator.
pub type SharedResolver<P> = Arc<Mutex<Resolver<P>>>;

/// Listeners around a resolver and an upstream client.
pub struct DnsServer<P> {
    resolver: SharedResolver<P>,
    upstream: Arc<UpstreamClient>,
    identify: Identify,
}

/// Running listeners; dropping it stops them.
pub struct RunningServer {
    /// Bound UDP addresses, in configuration order.
    pub udp_addrs: Vec<SocketAddr>,
    /// The stream listeners with their bound addresses, in configuration order.
    pub streams: Vec<StreamListener>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// The bound address of the first stream listener of this kind.
    pub fn stream_addr(&self, kind: StreamKind) -> Option<SocketAddr> {
        self.streams.iter().find(|l| l.kind == kind).map(|l| l.addr)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    // The shell is where the clock is read (house rule 2).
    Instant::now()
}

fn lock<P>(r: &SharedResolver<P>) -> std::sync::MutexGuard<'_, Resolver<P>> {
    // A panic elsewhere must not take DNS down with it; the core's state stays consistent per call.
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<P: DnsPolicy + 'static> DnsServer<P> {
    /// Listeners answering through `resolver`, asking `upstream`, identifying clients by `identify`.
    pub fn new(resolver: SharedResolver<P>, upstream: UpstreamClient, identify: Identify) -> Self {
        DnsServer {
            resolver,
            upstream: Arc::new(upstream),
            identify,
        }
    }

    /// The shared resolver (for policy reloads).
    pub fn resolver(&self) -> &SharedResolver<P> {
        &self.resolver
    }

    /// DNS over streams through the same resolver and upstream, for streams that come from
    /// elsewhere than these listeners (a device's flow handed over by the data plane).
    pub fn streams(&self) -> DnsStreams<P> {
        DnsStreams {
            resolver: self.resolver.clone(),
            upstream: self.upstream.clone(),
        }
    }

    /// Binds every address and starts serving on the current tokio runtime.
    pub async fn start(&self, config: &ServerConfig) -> io::Result<RunningServer> {
        let mut running = RunningServer {
            udp_addrs: Vec::new(),
            streams: Vec::new(),
            tasks: Vec::new(),
        };
        for addr in &config.udp {
            let sock = Arc::new(udp_socket(*addr)?);
            running.udp_addrs.push(sock.local_addr()?);
            for _ in 0..config.udp_workers.max(1) {
                let worker = UdpWorker {
                    sock: sock.clone(),
                    resolver: self.resolver.clone(),
                    upstream: self.upstream.clone(),
                    identify: self.identify.clone(),
                };
                running.tasks.push(tokio::spawn(worker.run()));
            }
        }
        for &StreamListener { addr, kind } in &config.streams {
            let tls = match (kind, &config.tls) {
                (StreamKind::Tcp, _) => None,
                (StreamKind::Tls, Some(t)) => Some(t.dot.clone()),
                (StreamKind::Https, Some(t)) => Some(t.doh.clone()),
                (_, None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "DNS over TLS/HTTPS listeners need a certificate",
                    ))
                }
            };
            let listener = TcpListener::bind(addr).await?;
            running.streams.push(StreamListener {
                addr: listener.local_addr()?,
                kind,
            });
            let streams = self.streams();
            let identify = self.identify.clone();
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            running.tasks.push(tokio::spawn(async move {
                loop {
                    let (stream, from) = match listener.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(target: "waygate::dns", error = %e, "dns tcp accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let conn = TcpConn {
                        streams: streams.clone(),
                        client: identify(from),
                        from,
                        kind,
                        acceptor: acceptor.clone(),
                    };
                    tokio::spawn(conn.run(stream));
                }
            }));
        }
        Ok(running)
    }
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Bursts of queries must queue in the kernel, not be dropped (RcvbufErrors).
    let _ = sock.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_SOCKET_BUFFER);
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

struct UdpWorker<P> {
    sock: Arc<UdpSocket>,
    resolver: SharedResolver<P>,
    upstream: Arc<UpstreamClient>,
    identify: Identify,
}

impl<P: DnsPolicy + 'static> UdpWorker<P> {
    async fn run(self) {
        let fd = self.sock.as_raw_fd();
        let mut batch = RecvBatch::default();
        // One answer buffer per datagram of a batch, kept for the listener's life.
        let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(1232)).collect();
        let mut ready: Vec<(SocketAddr, usize)> = Vec::with_capacity(BATCH);
        loop {
            if let Err(e) = self.sock.readable().await {
                tracing::warn!(target: "waygate::dns", error = %e, "dns udp socket failed");
                return;
            }
            let n = match self.sock.try_io(Interest::READABLE, || batch.recv(fd)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // ICMP port unreachable from an earlier send surfaces here; keep serving.
                    tracing::debug!(target: "waygate::dns", error = %e, "dns udp recv failed");
                    continue;
                }
            };
            ready.clear();
            {
                let mut resolver = lock(&self.resolver);
                let now = now();
                for (i, out) in outs.iter_mut().enumerate().take(n) {
                    let Some((query, from)) = batch.get(i) else {
                        continue;
                    };
                    let client = (self.identify)(from);
                    match resolver.handle_query(&client, query, Transport::Udp, now, out) {
                        Handled::Answer => ready.push((from, i)),
                        Handled::Upstream(ticket) => {
                            let query = out.clone();
                            let sock = self.sock.clone();
                            let resolver = self.resolver.clone();
                            let upstream = self.upstream.clone();
                            tokio::spawn(async move {
                                let mut answer = Vec::new();
                                if resolve(&resolver, &upstream, ticket, &query, &mut answer).await
                                {
                                    let _ = sock.send_to(&answer, from).await;
                                }
                            });
                        }
                        Handled::Drop => {}
                    }
                }
            }
            let mut sent = 0;
            while sent < ready.len() {
                let rest = &ready[sent..];
                let answers = rest.iter().map(|&(to, i)| (to, outs[i].as_slice()));
                match self
                    .sock
                    .try_io(Interest::WRITABLE, || send_batch(fd, answers.clone()))
                {
                    Ok(k) if k > 0 => sent += k,
                    _ => {
                        // A full socket buffer: the rest one by one, waiting for room.
                        for &(to, i) in rest {
                            let _ = self.sock.send_to(&outs[i], to).await;
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// Asks the upstream and feeds the result to the core; true when `out` holds an answer.
pub async fn resolve<P: DnsPolicy>(
    resolver: &SharedResolver<P>,
    upstream: &UpstreamClient,
    ticket: u16,
    query: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let result = upstream.query(query).await;
    let (bytes, label) = match &result {
        Ok((bytes, up)) => (Some(bytes.as_slice()), up.to_string()),
        Err(e) => {
            tracing::debug!(target: "waygate::dns", error = %e, "dns upstreams failed");
            (None, String::from("failed"))
        }
    };
    let handled = lock(resolver).handle_upstream(ticket, bytes, &label, now(), out);
    handled == Handled::Answer
}

/// Answers `query` from `client` into `out`, asking the upstream when the core needs it; true
/// when `out` holds an answer.
async fn answer_query<P: DnsPolicy>(
    resolver: &SharedResolver<P>,
    upstream: &UpstreamClient,
    client: &ClientCtx,
    (query, transport): (&[u8], Transport),
    out: &mut Vec<u8>,
) -> bool {
    let handled = lock(resolver).handle_query(client, query, transport, now(), out);
    match handled {
        Handled::Answer => true,
        Handled::Upstream(ticket) => {
            let query = std::mem::take(out);
            resolve(resolver, upstream, ticket, &query, out).await
        }
        Handled::Drop => false,
    }
}

/// Serves DNS carried over one byte stream: a listener's connection, or a device's flow the data
/// plane hands over in memory (then the device's identity comes with it, see
/// `runtime::local`).
pub struct DnsStreams<P> {
    resolver: SharedResolver<P>,
    upstream: Arc<UpstreamClient>,
}

impl<P> Clone for DnsStreams<P> {
    fn clone(&self) -> Self {
        DnsStreams {
            resolver: self.resolver.clone(),
            upstream: self.upstream.clone(),
        }
    }
}

impl<P: DnsPolicy + 'static> DnsStreams<P> {
    /// Streams answered through `resolver`, asking `upstream`.
    pub fn new(resolver: SharedResolver<P>, upstream: Arc<UpstreamClient>) -> Self {
        DnsStreams { resolver, upstream }
    }

    /// Length-prefixed DNS messages (RFC 1035 4.2.2 framing, also DoT's) from `client`, until
    /// idle or closed; `transport` says which (`Stream` for TCP, `Tls` for DoT).
    pub async fn serve_messages<S>(&self, client: &ClientCtx, transport: Transport, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        let mut framed = Vec::with_capacity(MAX_MESSAGE + 2);
        loop {
            let read = async {
                let n = usize::from(stream.read_u16().await?);
                stream.read_exact(&mut buf[..n]).await?;
                io::Result::Ok(n)
            };
            let n = match tokio::time::timeout(TCP_IDLE, read).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let query = (&buf[..n], transport);
            if !answer_query(&self.resolver, &self.upstream, client, query, &mut out).await {
                continue;
            }
            let Ok(len) = u16::try_from(out.len()) else {
                return;
            };
            framed.clear();
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&out);
            if stream.write_all(&framed).await.is_err() || stream.flush().await.is_err() {
                return;
            }
        }
    }

    /// The response to one DNS over HTTPS request (RFC 8484) from `client`.
    pub async fn doh(
        &self,
        client: &ClientCtx,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        match doh::read_query(request).await {
            Err(rejection) => doh::rejection_response(&rejection),
            Ok(body) => {
                let mut out = Vec::new();
                let query = (body.as_slice(), Transport::Https);
                if answer_query(&self.resolver, &self.upstream, client, query, &mut out).await {
                    doh::answer_response(out)
                } else {
                    doh::rejection_response(&doh::Rejection {
                        status: hyper::StatusCode::BAD_REQUEST,
                        reason: "not a DNS query",
                    })
                }
            }
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 requests on `stream` with `service`, until the client is done or
/// goes quiet for longer than DoH clients may.
pub async fn serve_http<S, F, Fut>(stream: S, service: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let response = service(request);
        async move { Ok::<_, std::convert::Infallible>(response.await) }
    });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // A device must not hold connections open by going quiet: HTTP/1 connections close
    // when a request's headers take too long, HTTP/2 ones when pings go unanswered.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(DOH_IDLE);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(DOH_IDLE)
        .keep_alive_timeout(TCP_IDLE);
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(target: "waygate::dns", error = %e, "https connection ended");
    }
}

/// One connection to a listener.
struct TcpConn<P> {
    streams: DnsStreams<P>,
    client: ClientCtx,
    from: SocketAddr,
    kind: StreamKind,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl<P: DnsPolicy + 'static> TcpConn<P> {
    async fn run(self, stream: TcpStream) {
        let Some(acceptor) = self.acceptor.clone() else {
            return self
                .streams
                .serve_messages(&self.client, Transport::Stream, stream)
                .await;
        };
        let tls = match tokio::time::timeout(TCP_IDLE, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(target: "waygate::dns", client = %self.from, error = %e, "dns tls handshake failed");
                return;
            }
            Err(_) => return,
        };
        match self.kind {
            StreamKind::Https => {
                let (streams, client) = (self.streams, Arc::new(self.client));
                serve_http(tls, move |request| {
                    let (streams, client) = (streams.clone(), client.clone());
                    async move { streams.doh(&client, request).await }
                })
                .await
            }
            StreamKind::Tcp => {
                self.streams
                    .serve_messages(&self.client, Transport::Stream, tls)
                    .await
            }
            StreamKind::Tls => {
                self.streams
                    .serve_messages(&self.client, Transport::Tls, tls)
                    .await
            }
        }
    }
}
