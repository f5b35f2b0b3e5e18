//! The gateway's own services, in process. A device's TCP flow to one of the gateway's ports
//! (see [`waygate_engine::flow::local`]) reaches the runtime as [`Command::LocalConnect`] with its context;
//! the runtime pumps its end of an in-memory pipe like any upstream socket and hands the other end
//! here, together with who the device is. No loopback socket, no PROXY line, no lookup of the
//! device by address.
//!
//! Services run on the resolver's thread, so TLS handshakes and DNS work stay off the data plane.
//! An HTTPS port terminates TLS once and routes each request by path ([`HttpRouter`]).
//!
//! [`Command::LocalConnect`]: waygate_engine::flow::Command::LocalConnect

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio_rustls::TlsAcceptor;

use super::resolver::device_client;
use crate::dns::server::{serve_http, DnsStreams, TCP_IDLE};
use crate::dns::{ClientCtx, DnsPolicy, TlsConfigs};
use waygate_dns::resolver::Transport;
use waygate_engine::flow::{FlowCtx, LocalEndpoint, LocalService, LocalServices};

/// An HTTP response of a local service.
pub type HttpResponse = Response<Full<Bytes>>;
/// What an [`HttpRoute`] answers with.
pub type HttpFuture = Pin<Box<dyn Future<Output = HttpResponse> + Send>>;

/// A flow handed to a local service: its context, and the client the resolver sees.
#[derive(Debug)]
pub struct LocalFlow {
    /// The flow's context (device, user, addresses).
    pub ctx: FlowCtx,
    /// The device as a DNS client.
    pub client: ClientCtx,
}

impl LocalFlow {
    /// The flow as its services see it.
    pub fn new(ctx: FlowCtx) -> Self {
        let client = device_client(&ctx.device, ctx.src.ip(), ctx.device_public.map(|a| a.ip()));
        LocalFlow { ctx, client }
    }
}

/// Runs the gateway's own services for flows handed over in memory.
pub trait LocalHost: Send + Sync {
    /// Serves `stream`, the service's end of the flow described by `ctx`, in the background.
    fn serve(&self, endpoint: LocalEndpoint, ctx: FlowCtx, stream: DuplexStream);
}

/// One route of an HTTPS port.
pub trait HttpRoute: Send + Sync {
    /// The response to `request` from `flow`.
    fn handle(&self, flow: Arc<LocalFlow>, request: Request<Incoming>) -> HttpFuture;
}

/// Requests of an HTTPS port by path prefix; the longest prefix wins, no match is a 404.
#[derive(Default, Clone)]
pub struct HttpRouter {
    routes: Vec<(String, Arc<dyn HttpRoute>)>,
}

impl HttpRouter {
    /// No routes.
    pub fn new() -> Self {
        HttpRouter::default()
    }

    /// Sends requests whose path starts with `prefix` to `route`.
    pub fn add(&mut self, prefix: impl Into<String>, route: Arc<dyn HttpRoute>) {
        self.routes.push((prefix.into(), route));
    }

    /// The route for `path`.
    pub fn route(&self, path: &str) -> Option<&Arc<dyn HttpRoute>> {
        self.routes
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, route)| route)
    }

    /// Serves HTTP/1.1 or HTTP/2 (after TLS) on `stream` for `flow`.
    pub async fn serve<S>(self: Arc<Self>, flow: Arc<LocalFlow>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        serve_http(stream, move |request: Request<Incoming>| {
            let route = self.route(request.uri().path()).cloned();
            let flow = flow.clone();
            async move {
                match route {
                    Some(route) => route.handle(flow, request).await,
                    None => not_found(),
                }
            }
        })
        .await
    }
}

fn not_found() -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

/// DNS over HTTPS as an HTTP route.
struct DohRoute<P> {
    dns: DnsStreams<P>,
}

impl<P: DnsPolicy + 'static> HttpRoute for DohRoute<P> {
    fn handle(&self, flow: Arc<LocalFlow>, request: Request<Incoming>) -> HttpFuture {
        let dns = self.dns.clone();
        Box::pin(async move { dns.doh(&flow.client, request).await })
    }
}

/// The gateway's services, on the runtime of `runtime` (the resolver's thread).
pub struct LocalServer<P> {
    runtime: tokio::runtime::Handle,
    dns: DnsStreams<P>,
    dot: TlsAcceptor,
    https: TlsAcceptor,
    routers: HashMap<u16, Arc<HttpRouter>>,
    device_api: std::sync::OnceLock<Arc<dyn HttpRoute>>,
}

impl<P: DnsPolicy + 'static> LocalServer<P> {
    /// The services of `table`, answering DNS through `dns`, with the certificates of `tls`.
    pub fn new(
        runtime: tokio::runtime::Handle,
        dns: DnsStreams<P>,
        tls: &TlsConfigs,
        table: &LocalServices,
    ) -> Self {
        let mut routers: HashMap<u16, HttpRouter> = HashMap::new();
        for route in table.routes() {
            let Some(prefix) = &route.path_prefix else {
                continue;
            };
            let handler: Arc<dyn HttpRoute> = match route.service {
                LocalService::DnsOverHttps => Arc::new(DohRoute { dns: dns.clone() }),
                // The table only takes path prefixes for HTTP services.
                LocalService::DnsUdp
                | LocalService::DnsTcp
                | LocalService::DnsOverTls
                | LocalService::DeviceApi => continue,
            };
            routers
                .entry(route.port)
                .or_default()
                .add(prefix.clone(), handler);
        }
        LocalServer {
            runtime,
            dns,
            dot: TlsAcceptor::from(tls.dot.clone()),
            https: TlsAcceptor::from(tls.doh.clone()),
            routers: routers.into_iter().map(|(p, r)| (p, Arc::new(r))).collect(),
            device_api: std::sync::OnceLock::new(),
        }
    }

    /// Serves the device API's port ([`LocalService::DeviceApi`]) with `api`, as plain HTTP;
    /// until then (and after a second call) its flows are closed or keep the first.
    pub fn set_device_api(&self, api: Arc<dyn HttpRoute>) {
        let _ = self.device_api.set(api);
    }
}

/// Completes a device's TLS handshake within [`TCP_IDLE`].
async fn accept<S>(
    acceptor: TlsAcceptor,
    flow: &LocalFlow,
    stream: S,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(TCP_IDLE, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(device = %flow.ctx.device.name, src = %flow.ctx.src, dst = %flow.ctx.dst, error = %e, "tls handshake with a device failed");
            None
        }
        Err(_) => None,
    }
}

impl<P: DnsPolicy + 'static> LocalHost for LocalServer<P> {
    fn serve(&self, endpoint: LocalEndpoint, ctx: FlowCtx, stream: DuplexStream) {
        let flow = Arc::new(LocalFlow::new(ctx));
        let dns = self.dns.clone();
        match endpoint {
            LocalEndpoint::Service(LocalService::DnsTcp) => {
                self.runtime.spawn(async move {
                    dns.serve_messages(&flow.client, Transport::Stream, stream)
                        .await
                });
            }
            LocalEndpoint::Service(LocalService::DnsOverTls) => {
                let acceptor = self.dot.clone();
                self.runtime.spawn(async move {
                    if let Some(tls) = accept(acceptor, &flow, stream).await {
                        dns.serve_messages(&flow.client, Transport::Tls, tls).await;
                    }
                });
            }
            LocalEndpoint::Https { port } => {
                let Some(router) = self.routers.get(&port).cloned() else {
                    // Dropping the stream closes the flow.
                    return;
                };
                let acceptor = self.https.clone();
                self.runtime.spawn(async move {
                    if let Some(tls) = accept(acceptor, &flow, stream).await {
                        router.serve(flow, tls).await;
                    }
                });
            }
            LocalEndpoint::Service(LocalService::DeviceApi) => {
                let Some(api) = self.device_api.get().cloned() else {
                    tracing::debug!("no device API: flow closed");
                    return;
                };
                self.runtime.spawn(async move {
                    serve_http(stream, move |request| api.handle(flow.clone(), request)).await
                });
            }
            // Not stream services: the table does not hand them TCP flows.
            LocalEndpoint::Service(LocalService::DnsUdp | LocalService::DnsOverHttps) => {
                tracing::debug!(?endpoint, "not a stream service: flow closed");
            }
            // The upstreams hand these to the HTTP inspector, never here.
            LocalEndpoint::Inspect(_) => {
                tracing::debug!(
                    ?endpoint,
                    "an inspected flow reached the local services: closed"
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use waygate_keys::CertificateAuthority;

    use super::*;
    use crate::dns::{
        BlockMode, Decision, PolicyVerdict, QueryInfo, Resolver, ResolverConfig, UpstreamClient,
    };
    use waygate_engine::flow::{DeviceInfo, Protocol};

    const GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 96, 0, 1));
    const ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);

    /// Answers `who.example` with [`ANSWER`] to the device named `laptop` only: an answer
    /// proves the resolver saw that device.
    fn policy(q: &QueryInfo<'_>) -> PolicyVerdict {
        let device = q.client.device.as_deref().map(|d| d.name.as_str());
        match (device, q.name) {
            (Some("laptop"), "who.example") => {
                Decision::OverrideIps(vec![IpAddr::V4(ANSWER)]).into()
            }
            _ => Decision::Block(BlockMode::Refused).into(),
        }
    }

    type TestPolicy = fn(&QueryInfo<'_>) -> PolicyVerdict;

    /// A TCP flow of device `name` to the gateway's `dst_port`.
    pub(crate) fn ctx(name: &str, dst_port: u16) -> FlowCtx {
        #[allow(clippy::disallowed_methods)] // a timestamp nobody reads
        let opened = std::time::Instant::now();
        FlowCtx {
            id: 7,
            peer: 1,
            device: Arc::new(DeviceInfo {
                id: format!("id-{name}"),
                name: name.into(),
                email: "ada@example.com".into(),
                user_name: None,
                groups: vec![],
                extras: Default::default(),
                vnet_id: None,
                ipv4: Ipv4Addr::new(100, 96, 0, 2),
                ipv6: "fd77:6761:7465::2".parse().expect("v6"),
                log_fields: Default::default(),
            }),
            device_public: Some("198.51.100.2:40000".parse().expect("endpoint")),
            protocol: Protocol::Tcp,
            src: "100.96.0.2:50000".parse().expect("src"),
            dst: SocketAddr::new(GATEWAY, dst_port),
            opened,
            rules: Default::default(),
        }
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(42)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
        m.to_vec().expect("query")
    }

    /// The answer's code and A records.
    fn parse(answer: &[u8]) -> (ResponseCode, Vec<Ipv4Addr>) {
        let m = Message::from_vec(answer).expect("an answer");
        let ips = m
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        (m.response_code(), ips)
    }

    struct Services {
        server: LocalServer<TestPolicy>,
        tls: Arc<rustls::ClientConfig>,
    }

    fn services() -> Services {
        #[allow(clippy::disallowed_methods)] // certificates must be valid for the client now
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("Test CA", now).expect("ca");
        let cert = ca.issue(&[], &[GATEWAY], now).expect("cert");
        let dir = tempfile::tempdir().expect("dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).expect("ca file");
        let roots = crate::dns::encrypted::trust_roots(Some(&ca_file)).expect("roots");
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let resolver = Arc::new(Mutex::new(Resolver::new(
            policy as TestPolicy,
            ResolverConfig::default(),
            3,
        )));
        // No upstream: every answer here comes from the policy.
        let nowhere = Arc::new(UpstreamClient::new(
            Vec::new(),
            None,
            Duration::from_secs(1),
        ));
        let server = LocalServer::new(
            tokio::runtime::Handle::current(),
            DnsStreams::new(resolver, nowhere),
            &crate::tls::dns_tls(&cert).expect("server tls"),
            &LocalServices::resolver(),
        );
        Services {
            server,
            tls: Arc::new(tls),
        }
    }

    impl Services {
        /// Hands a flow of device `device` to `endpoint`; the device's end of the pipe.
        fn open(&self, device: &str, endpoint: LocalEndpoint, port: u16) -> DuplexStream {
            let (device_end, service_end) = tokio::io::duplex(4096);
            self.server.serve(endpoint, ctx(device, port), service_end);
            device_end
        }

        async fn tls(
            &self,
            stream: DuplexStream,
            alpn: &[u8],
        ) -> tokio_rustls::client::TlsStream<DuplexStream> {
            let mut config = (*self.tls).clone();
            config.alpn_protocols = vec![alpn.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(GATEWAY.into()), stream)
                .await
                .expect("tls handshake with the gateway's certificate")
        }
    }

    async fn ask_framed<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, name: &str) -> Vec<u8> {
        let q = query(name);
        let len = u16::try_from(q.len()).expect("short");
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(&q).await.expect("write");
        stream.flush().await.expect("flush");
        let n = stream.read_u16().await.expect("answer length");
        let mut answer = vec![0; usize::from(n)];
        stream.read_exact(&mut answer).await.expect("answer");
        answer
    }

    async fn https_get(
        stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Vec<u8>) {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("http handshake");
        tokio::spawn(conn);
        let builder = Request::builder().uri(path).header("host", "100.96.0.1");
        let request = match body {
            Some(b) => builder
                .method("POST")
                .header("content-type", "application/dns-message")
                .body(Full::new(Bytes::from(b))),
            None => builder.method("GET").body(Full::new(Bytes::new())),
        }
        .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, body.to_vec())
    }

    /// DNS over TCP, TLS and HTTPS through the in-memory handover: each answer shows the
    /// resolver knew the device from the flow's context alone (there is no address map).
    async fn drive_every_dns_service() {
        let s = services();
        // DNS over TCP.
        let mut stream = s.open("laptop", LocalEndpoint::Service(LocalService::DnsTcp), 53);
        let got = parse(&ask_framed(&mut stream, "who.example").await);
        assert_eq!(got, (ResponseCode::NoError, vec![ANSWER]), "tcp");
        let mut other = s.open("phone", LocalEndpoint::Service(LocalService::DnsTcp), 53);
        let got = parse(&ask_framed(&mut other, "who.example").await);
        assert_eq!(
            got.0,
            ResponseCode::Refused,
            "another device is another client"
        );

        // DNS over TLS.
        let stream = s.open(
            "laptop",
            LocalEndpoint::Service(LocalService::DnsOverTls),
            853,
        );
        let mut tls = s.tls(stream, b"dot").await;
        let got = parse(&ask_framed(&mut tls, "who.example").await);
        assert_eq!(got, (ResponseCode::NoError, vec![ANSWER]), "dot");

        // DNS over HTTPS at /dns-query; other paths of 443 are not found.
        let https = LocalEndpoint::Https { port: 443 };
        let tls = s.tls(s.open("laptop", https, 443), b"http/1.1").await;
        let (status, body) = https_get(tls, "/dns-query", Some(query("who.example"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse(&body), (ResponseCode::NoError, vec![ANSWER]), "doh");
        let tls = s.tls(s.open("laptop", https, 443), b"http/1.1").await;
        let (status, _) = https_get(tls, "/api/posture", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn dns_over_tcp_tls_and_https_reach_the_resolver_with_the_device() {
        drive_every_dns_service().await;
    }

    /// TCP sockets in LISTEN state that this process holds.
    fn listening_sockets() -> usize {
        let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect();
        ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| t.lines().skip(1).map(String::from).collect::<Vec<_>>())
            .filter(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // st 0A is LISTEN; column 9 is the inode.
                cols.get(3) == Some(&"0A") && cols.get(9).is_some_and(|i| ours.contains(*i))
            })
            .count()
    }

    const SOLO: &str = "WAYGATE_LOCAL_SERVICES_SOLO";

    /// Run alone in a process of its own (other tests bind listeners), the services bind no
    /// socket at all.
    #[test]
    fn the_services_bind_no_listener() {
        if std::env::var_os(SOLO).is_none() {
            let exe = std::env::current_exe().expect("test binary");
            let status = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "runtime::local::tests::the_services_bind_no_listener",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(SOLO, "1")
                .status()
                .expect("run alone");
            assert!(status.success(), "the solo run failed");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let before = listening_sockets();
            let served = drive_every_dns_service();
            tokio::pin!(served);
            // Check while the services are mid-flight too, not only once they are done.
            let mut during = 0;
            loop {
                tokio::select! {
                    () = &mut served => break,
                    () = tokio::time::sleep(Duration::from_millis(1)) => {
                        during = during.max(listening_sockets());
                    }
                }
            }
            assert_eq!((before, during, listening_sockets()), (0, 0, 0));
            // The count does see listeners.
            let _listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            assert_eq!(listening_sockets(), 1);
        });
    }

    struct Hello;

    impl HttpRoute for Hello {
        fn handle(&self, flow: Arc<LocalFlow>, _request: Request<Incoming>) -> HttpFuture {
            let body = format!("hello {}", flow.ctx.device.name);
            Box::pin(async move { Response::new(Full::new(Bytes::from(body))) })
        }
    }

    #[tokio::test]
    async fn a_second_route_shares_the_https_port() {
        let s = services();
        let mut router = (*s.server.routers[&443]).clone();
        router.add("/api/", Arc::new(Hello));
        assert!(router.route("/api/posture").is_some());
        assert!(router.route("/dns-query").is_some());
        assert!(router.route("/").is_none());
        assert!(router.route("/ap").is_none());
        let router = Arc::new(router);
        let serve = |device: &str| {
            let (device_end, service_end) = tokio::io::duplex(4096);
            let flow = Arc::new(LocalFlow::new(ctx(device, 443)));
            tokio::spawn(router.clone().serve(flow, service_end));
            device_end
        };
        let (status, body) = https_get(serve("laptop"), "/api/posture", None).await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::OK, &b"hello laptop"[..])
        );
        let (status, body) =
            https_get(serve("laptop"), "/dns-query", Some(query("who.example"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(parse(&body), (ResponseCode::NoError, vec![ANSWER]));
        let (status, _) = https_get(serve("laptop"), "/elsewhere", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
