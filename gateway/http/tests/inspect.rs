//! The inspector between an in-memory device and real origins on loopback: plain HTTP with
//! rules, TLS decrypted with the gateway's leaves, Do Not Inspect splicing the origin's own
//! certificate, an untrusted origin, and h2 end to end.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use waygate_config::HttpConfig;
use waygate_http::reset::ResetFlag;
use waygate_http::Inspector;
use waygate_keys::CertificateAuthority;
use waygate_policy::ruleset::{Lists, RuleSet};
use waygate_stages::policy::Loaded;

const RULES: &str = r#"[
  {"id": "bank", "name": "bank", "action": "off", "enabled": true, "precedence": 9,
   "filters": ["http"], "traffic": "http.request.host == \"bank.example\""},
  {"id": "admin", "name": "no admin", "action": "block", "enabled": true, "precedence": 1,
   "filters": ["http"], "traffic": "http.request.uri.path matches \"^/admin\"",
   "rule_settings": {"block_reason": "admin is closed"}},
  {"id": "tag", "name": "tag", "action": "allow", "enabled": true, "precedence": 2,
   "filters": ["http"], "traffic": "http.request.uri.path == \"/tagged\"",
   "rule_settings": {"add_headers": {"X-Waygate-Tag": ["t1"]}}},
  {"id": "move", "name": "move", "action": "redirect", "enabled": true, "precedence": 3,
   "filters": ["http"], "traffic": "http.request.uri.path == \"/old\"",
   "rule_settings": {"redirect": {"target_uri": "https://new.example/", "preserve_path_and_query": true}}},
  {"id": "gone", "name": "no 404", "action": "block", "enabled": true, "precedence": 4,
   "filters": ["http"], "traffic": "http.response.status_code == 404"},
  {"id": "noexe", "name": "no executables", "action": "block", "enabled": true, "precedence": 5,
   "filters": ["http"], "traffic": "any(http.download.file.types[*] == \"exe\")"},
  {"id": "casino", "name": "no casinos", "action": "block", "enabled": true, "precedence": 7,
   "filters": ["http"], "traffic": "http.request.host == \"casino.example\""},
  {"id": "noexeup", "name": "no executable uploads", "action": "block", "enabled": true,
   "precedence": 0, "filters": ["http"], "traffic": "any(http.upload.file.types[*] == \"exe\")"},
  {"id": "office", "name": "office private", "action": "block", "enabled": true, "precedence": 8,
   "filters": ["http"],
   "traffic": "proxy.endpoint == \"office\" and http.request.uri.path == \"/private\""}
]"#;

/// A PE executable's first bytes: "MZ", then the PE header at the offset at 0x3c.
fn exe() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0] = b'M';
    b[1] = b'Z';
    b[0x3c] = 0x80;
    b[0x80..0x84].copy_from_slice(b"PE\0\0");
    b
}

fn now() -> SystemTime {
    #[allow(clippy::disallowed_methods)] // certificates must be valid now
    SystemTime::now()
}

/// An origin answering every request with its version, path and the `x-waygate-tag` header;
/// `/missing` is a 404.
async fn origin_service(
    mut request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    // An echo of whatever follows the 101 (or an HTTP/2 extended CONNECT's 200), as a
    // WebSocket echo server would.
    let echo = |upgraded: hyper::upgrade::OnUpgrade| {
        tokio::spawn(async move {
            if let Ok(up) = upgraded.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        })
    };
    if request.method() == hyper::Method::CONNECT {
        let protocol = request.extensions().get::<hyper::ext::Protocol>();
        assert_eq!(protocol.map(|p| p.as_str()), Some("websocket"));
        assert_eq!(request.uri().path(), "/chat");
        echo(hyper::upgrade::on(&mut request));
        return Ok(Response::new(Full::new(Bytes::new())));
    }
    if request.headers().contains_key("upgrade") {
        echo(hyper::upgrade::on(&mut request));
        let response = Response::builder()
            .status(hyper::StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .expect("101");
        return Ok(response);
    }
    let tag = request
        .headers()
        .get("x-waygate-tag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = format!("{:?} {} tag={tag}", request.version(), request.uri().path());
    if request.uri().path() == "/file.txt" {
        let mut response = Response::new(Full::new(Bytes::from(exe())));
        response.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        return Ok(response);
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    if request.uri().path() == "/missing" {
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
    }
    Ok(response)
}

async fn serve_origin<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    extended_connect: bool,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if extended_connect {
        builder.http2().enable_connect_protocol();
    }
    let _ = builder
        .serve_connection_with_upgrades(
            TokioIo::new(stream),
            hyper::service::service_fn(origin_service),
        )
        .await;
}

/// A plain HTTP origin on loopback.
async fn plain_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve_origin(s, false));
        }
    });
    addr
}

/// An HTTPS origin whose certificate for `name` comes from `ca`, speaking `alpn`.
async fn tls_origin(ca: &CertificateAuthority, name: &str, alpn: &[&[u8]]) -> SocketAddr {
    tls_origin_with(ca, name, alpn, false).await
}

/// [`tls_origin`], accepting HTTP/2 extended CONNECT (RFC 8441) when `extended_connect`.
async fn tls_origin_with(
    ca: &CertificateAuthority,
    name: &str,
    alpn: &[&[u8]],
    extended_connect: bool,
) -> SocketAddr {
    counting_tls_origin(ca, &[name], alpn, extended_connect)
        .await
        .0
}

/// [`tls_origin_with`] for several names, counting the connections it accepts.
async fn counting_tls_origin(
    ca: &CertificateAuthority,
    names: &[&str],
    alpn: &[&[u8]],
    extended_connect: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = ca.issue(&names, &[], now()).expect("cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            cert.chain_der
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.to_vec())),
        )
        .expect("origin cert");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    serve_origin(tls, extended_connect).await;
                }
            });
        }
    });
    (addr, accepts)
}

struct Lab {
    inspector: Inspector,
    gateway_ca: Arc<CertificateAuthority>,
    lab_ca: CertificateAuthority,
    /// The reset flag of the last flow opened.
    reset: std::sync::Mutex<Option<ResetFlag>>,
}

fn lab(tls_decrypt: bool) -> Lab {
    lab_with(HttpConfig {
        tls_decrypt,
        ..HttpConfig::default()
    })
}

fn lab_with(config: HttpConfig) -> Lab {
    let gateway_ca = Arc::new(CertificateAuthority::generate("Gateway CA", now()).expect("ca"));
    let lab_ca = CertificateAuthority::generate("Lab CA", now()).expect("ca");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(lab_ca.cert_der().to_vec()))
        .expect("root");
    let inspector = Inspector::new(
        config,
        gateway_ca.clone(),
        roots,
        tokio::runtime::Handle::current(),
    )
    .expect("inspector");
    let set = RuleSet::from_json(RULES).expect("rules");
    inspector.set_policy(Arc::new(
        Loaded::compile(&set, &Lists::new(Vec::new())).expect("compile"),
    ));
    Lab {
        inspector,
        gateway_ca,
        lab_ca,
        reset: std::sync::Mutex::default(),
    }
}

impl Lab {
    /// A device flow to `origin` through the inspector: the device's end.
    async fn open(&self, origin: SocketAddr) -> tokio::io::DuplexStream {
        self.open_route(waygate_http::Route::direct(origin)).await
    }

    /// [`Lab::open`] leaving by `route`.
    async fn open_route(&self, route: waygate_http::Route) -> tokio::io::DuplexStream {
        let origin = route.dst;
        let upstream = self.inspector.connect(&route).await.expect("origin");
        let (device, theirs) = tokio::io::duplex(64 * 1024);
        let ctx = waygate_model::testkit::flow()
            .dst(&origin.to_string())
            .build();
        let reset = ResetFlag::default();
        self.inspector
            .inspect(ctx, route, upstream, theirs, reset.clone());
        *self.reset.lock().expect("lock") = Some(reset);
        device
    }

    /// Whether the last flow's device side was asked to end with a reset.
    fn was_reset(&self) -> bool {
        self.reset
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(ResetFlag::raised)
    }

    /// A TLS connection from the device trusting `ca`, for `name`, offering `alpn`.
    async fn tls(
        &self,
        origin: SocketAddr,
        ca: &[u8],
        name: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
        let name = ServerName::try_from(name.to_string()).expect("name");
        self.tls_to(origin, ca, name, alpn).await
    }

    /// [`Lab::tls`] for any server name (an address sends no SNI).
    async fn tls_to(
        &self,
        origin: SocketAddr,
        ca: &[u8],
        name: ServerName<'static>,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.to_vec())).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let device = self.open(origin).await;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, device)
            .await
    }
}

/// One GET over `stream` (HTTP/2 when `h2`): status, headers and body.
async fn get<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    host: &str,
    path: &str,
    h2: bool,
) -> (u16, hyper::HeaderMap, String) {
    let request = Request::builder()
        .uri(if h2 {
            format!("https://{host}{path}")
        } else {
            path.to_string()
        })
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let mut request = request;
        request.headers_mut().remove("host");
        send.send_request(request).await.expect("response")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        send.send_request(request).await.expect("response")
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn plain_http_requests_are_decided_by_the_rules() {
    let lab = lab(false);
    let origin = plain_origin().await;
    let (status, _, body) = get(lab.open(origin).await, "a.example", "/page", false).await;
    assert_eq!((status, body.as_str()), (200, "HTTP/1.1 /page tag=-"));
    let (status, _, body) = get(lab.open(origin).await, "a.example", "/tagged", false).await;
    assert_eq!((status, body.as_str()), (200, "HTTP/1.1 /tagged tag=t1"));
    let (status, headers, body) = get(lab.open(origin).await, "a.example", "/admin/x", false).await;
    assert_eq!(status, 403);
    assert!(body.contains("admin is closed") && body.contains("no admin (admin)"));
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let (status, headers, _) = get(lab.open(origin).await, "a.example", "/old?q=1", false).await;
    assert_eq!(status, 307);
    assert_eq!(headers["location"], "https://new.example/old?q=1");
    // A rule on the response status decides when it arrives.
    let (status, _, body) = get(lab.open(origin).await, "a.example", "/missing", false).await;
    assert_eq!(status, 403);
    assert!(body.contains("no 404 (gone)"));
    let counters = lab.inspector.counters();
    let blocked = counters.blocked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(blocked, 2);
}

#[tokio::test]
async fn https_is_decrypted_with_gateway_leaves_and_do_not_inspect_keeps_the_origins() {
    let lab = lab(true);
    let origin = tls_origin(&lab.lab_ca, "shop.example", &[b"http/1.1"]).await;
    let gw = lab.gateway_ca.cert_der().to_vec();
    // The device trusts only the gateway's CA: the leaf it gets is the gateway's.
    let tls = lab
        .tls(origin, &gw, "shop.example", &[b"h2", b"http/1.1"])
        .await
        .expect("handshake with a gateway leaf");
    // The origin speaks HTTP/1.1 only, so the device was not offered h2.
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, _, body) = get(tls, "shop.example", "/tagged", false).await;
    assert_eq!((status, body.as_str()), (200, "HTTP/1.1 /tagged tag=t1"));
    let tls = lab
        .tls(origin, &gw, "shop.example", &[b"http/1.1"])
        .await
        .expect("handshake");
    let (status, _, body) = get(tls, "shop.example", "/admin", false).await;
    assert_eq!(
        status, 403,
        "the block page is served inside the connection"
    );
    assert!(body.contains("admin is closed"));

    // Do Not Inspect: the origin's own certificate reaches the device untouched.
    let bank = tls_origin(&lab.lab_ca, "bank.example", &[b"http/1.1"]).await;
    assert!(lab
        .tls(bank, &gw, "bank.example", &[b"http/1.1"])
        .await
        .is_err());
    let lab_ca = lab.lab_ca.cert_der().to_vec();
    let tls = lab
        .tls(bank, &lab_ca, "bank.example", &[b"http/1.1"])
        .await
        .expect("the origin's own certificate");
    let (status, _, body) = get(tls, "bank.example", "/admin", false).await;
    assert_eq!((status, body.as_str()), (200, "HTTP/1.1 /admin tag=-"));
}

#[tokio::test]
async fn h2_end_to_end_when_the_origin_speaks_it() {
    let lab = lab(true);
    let origin = tls_origin(&lab.lab_ca, "h2.example", &[b"h2", b"http/1.1"]).await;
    let gw = lab.gateway_ca.cert_der().to_vec();
    let tls = lab
        .tls(origin, &gw, "h2.example", &[b"h2", b"http/1.1"])
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, _, body) = get(tls, "h2.example", "/tagged", true).await;
    assert_eq!((status, body.as_str()), (200, "HTTP/2.0 /tagged tag=t1"));
}

#[tokio::test]
async fn an_origin_with_an_untrusted_certificate_gets_526() {
    let lab = lab(true);
    let stranger = CertificateAuthority::generate("Unknown CA", now()).expect("ca");
    let origin = tls_origin(&stranger, "bad.example", &[b"http/1.1"]).await;
    let gw = lab.gateway_ca.cert_der().to_vec();
    let tls = lab
        .tls(origin, &gw, "bad.example", &[b"http/1.1"])
        .await
        .expect("handshake");
    let (status, _, body) = get(tls, "bad.example", "/", false).await;
    assert_eq!(status, 526);
    assert!(body.contains("bad.example"));
}

#[tokio::test]
async fn without_decryption_https_is_decided_on_the_sni() {
    let lab = lab(false);
    let origin = tls_origin(&lab.lab_ca, "shop.example", &[b"http/1.1"]).await;
    let lab_ca = lab.lab_ca.cert_der().to_vec();
    // Spliced: the origin's certificate, the origin's answers, even for a path rule.
    let tls = lab
        .tls(origin, &lab_ca, "shop.example", &[b"http/1.1"])
        .await
        .expect("the origin's certificate");
    let (status, _, _) = get(tls, "shop.example", "/admin", false).await;
    assert_eq!(status, 200);
    assert!(!lab.was_reset());
    // A block on the SNI host resets the connection before any handshake.
    let casino = tls_origin(&lab.lab_ca, "casino.example", &[b"http/1.1"]).await;
    assert!(lab
        .tls(casino, &lab_ca, "casino.example", &[b"http/1.1"])
        .await
        .is_err());
    assert!(lab.was_reset(), "an SNI block resets, not closes");
    let blocked = lab
        .inspector
        .counters()
        .blocked
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(blocked, 1);
}

#[tokio::test]
async fn a_client_hello_without_sni_follows_no_sni() {
    use waygate_config::NoSni;
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    // block: closed.
    let lab = lab_with(HttpConfig {
        tls_decrypt: true,
        no_sni: NoSni::Block,
        ..HttpConfig::default()
    });
    let origin = tls_origin(&lab.lab_ca, "shop.example", &[b"http/1.1"]).await;
    let gw = lab.gateway_ca.cert_der().to_vec();
    assert!(lab
        .tls_to(origin, &gw, ip.clone(), &[b"http/1.1"])
        .await
        .is_err());
    // inspect: a gateway leaf for the address; the origin's certificate does not name it.
    let lab = lab_with(HttpConfig {
        tls_decrypt: true,
        no_sni: NoSni::Inspect,
        ..HttpConfig::default()
    });
    let gw = lab.gateway_ca.cert_der().to_vec();
    let tls = lab
        .tls_to(origin, &gw, ip.clone(), &[b"http/1.1"])
        .await
        .expect("a leaf for the address");
    let (status, _, _) = get(tls, "127.0.0.1", "/", false).await;
    assert_eq!(status, 526);
    // bypass: spliced, so the device meets the origin's own certificate.
    let lab = lab_with(HttpConfig {
        tls_decrypt: true,
        no_sni: NoSni::Bypass,
        ..HttpConfig::default()
    });
    let gw = lab.gateway_ca.cert_der().to_vec();
    assert!(lab.tls_to(origin, &gw, ip, &[b"http/1.1"]).await.is_err());
}

#[tokio::test]
async fn a_websocket_upgrade_passes_through_after_the_request_is_allowed() {
    let lab = lab(false);
    let origin = plain_origin().await;
    for (path, upgraded) in [("/chat", true), ("/admin/chat", false)] {
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(lab.open(origin).await))
                .await
                .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        let request = Request::builder()
            .uri(path)
            .header("host", "ws.example")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = send.send_request(request).await.expect("response");
        if !upgraded {
            assert_eq!(
                response.status(),
                403,
                "a blocked upgrade gets the block page"
            );
            continue;
        }
        assert_eq!(response.status(), 101);
        echoes(response, b"hello over the socket").await;
    }
}

/// Writes `message` through the tunnel `response` opened and reads it back.
async fn echoes(response: Response<Incoming>, message: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = hyper::upgrade::on(response).await.expect("upgraded");
    let mut up = TokioIo::new(up);
    up.write_all(message).await.expect("write");
    let mut echoed = vec![0u8; message.len()];
    up.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(echoed, message);
}

/// A multipart upload of `file` named `name` over a fresh flow: the status.
async fn upload(lab: &Lab, origin: SocketAddr, name: &str, file: &[u8]) -> u16 {
    let mut body = format!(
        "--B0undary\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{name}\"\r\n\
         Content-Type: text/plain\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(b"\r\n--B0undary--\r\n");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(lab.open(origin).await))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let request = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "files.example")
        .header("content-type", "multipart/form-data; boundary=B0undary")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = send.send_request(request).await.expect("response");
    response.status().as_u16()
}

#[tokio::test]
async fn file_types_come_from_the_bytes_of_downloads_and_uploaded_parts() {
    let lab = lab(false);
    let origin = plain_origin().await;
    // An executable served as file.txt with Content-Type text/plain.
    let (status, _, body) = get(lab.open(origin).await, "files.example", "/file.txt", false).await;
    assert_eq!(status, 403);
    assert!(body.contains("no executables (noexe)"), "{body}");
    assert_eq!(upload(&lab, origin, "report.txt", &exe()).await, 403);
    assert_eq!(
        upload(&lab, origin, "report.txt", b"plain words").await,
        200
    );
}

/// An explicit proxy on loopback for sources in `networks` (endpoint "office").
async fn proxy(tls_decrypt: bool, networks: &str) -> (Lab, SocketAddr) {
    let lab = lab_with(HttpConfig {
        tls_decrypt,
        proxy_endpoints: vec![waygate_config::ProxyEndpoint {
            name: "office".into(),
            networks: vec![networks.parse().expect("cidr")],
        }],
        ..HttpConfig::default()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let connect: waygate_http::endpoint::Connector =
        Arc::new(|dst| Box::pin(TcpStream::connect(dst)));
    lab.inspector.serve_proxy(listener, connect);
    (lab, addr)
}

/// Sends `request` to the proxy and reads until it closes.
async fn raw(proxy: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(proxy).await.expect("proxy");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// A TLS client trusting the CA certificate `ca`.
fn trusting(ca: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec())).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A CONNECT tunnel to `target` through the proxy at `proxy`, its 200 read.
async fn tunnel(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(proxy).await.expect("proxy");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("connect");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.expect("read"), 1, "{head:?}");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    s
}

#[tokio::test]
async fn the_explicit_proxy_serves_its_networks_pac_connect_and_plain_requests() {
    let (lab, addr) = proxy(true, "127.0.0.0/8").await;
    let pac = raw(addr, "GET /proxy.pac HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(pac.starts_with("HTTP/1.1 200 OK\r\n"), "{pac}");
    assert!(pac.contains("Content-Type: application/x-ns-proxy-autoconfig\r\n"));
    assert!(
        pac.contains(&format!("return \"PROXY {addr}; DIRECT\";")),
        "{pac}"
    );

    // Absolute-URI requests: decided (proxy.endpoint included), forwarded, then closed.
    let origin = plain_origin().await;
    let page = raw(
        addr,
        &format!("GET http://{origin}/page HTTP/1.1\r\nHost: {origin}\r\nProxy-Connection: keep-alive\r\n\r\n"),
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.ends_with("HTTP/1.1 /page tag=-"), "{page}");
    assert!(
        page.to_ascii_lowercase().contains("connection: close"),
        "{page}"
    );
    let private = raw(
        addr,
        &format!("GET http://{origin}/private HTTP/1.1\r\nHost: {origin}\r\n\r\n"),
    )
    .await;
    assert!(private.starts_with("HTTP/1.1 403"), "{private}");
    assert!(private.contains("office private (office)"), "{private}");

    // CONNECT: the tunnel is decrypted with a gateway leaf for the SNI name.
    let shop = tls_origin(&lab.lab_ca, "shop.example", &[b"http/1.1"]).await;
    let tls = trusting(lab.gateway_ca.cert_der())
        .connect(
            ServerName::try_from("shop.example").expect("name"),
            tunnel(addr, shop).await,
        )
        .await
        .expect("a gateway leaf inside the tunnel");
    let (status, _, body) = get(tls, "shop.example", "/private", false).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("office private (office)"), "{body}");

    // A plain request to the proxy itself is not proxied.
    let other = raw(addr, "GET /elsewhere HTTP/1.1\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[tokio::test]
async fn sources_outside_every_proxy_endpoint_get_403() {
    let (_lab, addr) = proxy(false, "192.0.2.0/24").await;
    let origin = plain_origin().await;
    for request in [
        format!("GET http://{origin}/page HTTP/1.1\r\nHost: {origin}\r\n\r\n"),
        format!("CONNECT {origin} HTTP/1.1\r\n\r\n"),
        "GET /proxy.pac HTTP/1.1\r\n\r\n".to_string(),
    ] {
        let answer = raw(addr, &request).await;
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(answer.contains("127.0.0.1 is in no proxy endpoint's networks"));
    }
}

#[tokio::test]
async fn a_connect_blocked_on_the_sni_alone_is_reset_like_an_intercepted_flow() {
    let (lab, addr) = proxy(false, "127.0.0.0/8").await;
    let lab_ca = lab.lab_ca.cert_der().to_vec();
    for (name, reset) in [("shop.example", false), ("casino.example", true)] {
        let origin = tls_origin(&lab.lab_ca, name, &[b"http/1.1"]).await;
        let tls = trusting(&lab_ca)
            .connect(
                ServerName::try_from(name).expect("name"),
                tunnel(addr, origin).await,
            )
            .await;
        match tls {
            Ok(tls) => {
                assert!(!reset, "{name} was not blocked");
                let (status, _, _) = get(tls, name, "/", false).await;
                assert_eq!(status, 200, "spliced to the origin");
            }
            Err(e) => {
                assert!(reset, "{name}: {e}");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
            }
        }
    }
}

/// An origin that speaks first, as SMTP does: a banner, then `250 <line>` for each line.
async fn banner_origin() -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                if w.write_all(b"220 mail.example ESMTP\r\n").await.is_err() {
                    return;
                }
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("250 {line}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_protocol_whose_server_speaks_first_passes_through_an_inspected_port() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    for tls_decrypt in [false, true] {
        let lab = lab(tls_decrypt);
        let origin = banner_origin().await;
        let mut device = tokio::io::BufReader::new(lab.open(origin).await);
        let mut line = String::new();
        device.read_line(&mut line).await.expect("banner");
        assert_eq!(line, "220 mail.example ESMTP\r\n");
        // Then the device's own words, which look like nothing the inspector knows.
        for command in ["EHLO device.example", "GET / HTTP/1.1"] {
            device
                .get_mut()
                .write_all(format!("{command}\r\n").as_bytes())
                .await
                .expect("write");
            line.clear();
            device.read_line(&mut line).await.expect("reply");
            assert_eq!(line, format!("250 {command}\r\n"), "spliced byte for byte");
        }
    }
}

#[tokio::test]
async fn websockets_over_h2_pass_when_the_origin_accepts_extended_connect() {
    let lab = lab(true);
    let gw = lab.gateway_ca.cert_der().to_vec();
    for (accepts, path) in [(true, "/chat"), (true, "/admin/chat"), (false, "/chat")] {
        let origin = tls_origin_with(&lab.lab_ca, "ws.example", &[b"h2"], accepts).await;
        let tls = lab
            .tls(origin, &gw, "ws.example", &[b"h2"])
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        // A first answer means the inspector's SETTINGS were read.
        let warm = Request::get("https://ws.example/")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(send.send_request(warm).await.expect("warm").status(), 200);
        let mut connect = Request::builder()
            .method("CONNECT")
            .uri(format!("https://ws.example{path}"))
            .header("sec-websocket-version", "13")
            .body(Full::new(Bytes::new()))
            .expect("request");
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let response = send.send_request(connect).await;
        if !accepts {
            // Not offered to the device: its extended CONNECT is refused by the inspector's
            // HTTP/2 layer itself, so a browser would use HTTP/1.1 instead.
            assert!(response.is_err(), "{:?}", response.map(|r| r.status()));
            continue;
        }
        let response = response.expect("response");
        if path.starts_with("/admin") {
            assert_eq!(response.status(), 403, "decided like any request");
            continue;
        }
        assert_eq!(response.status(), 200);
        echoes(response, b"hello over h2").await;
    }
}

/// A route to `origin` leaving from `bind` (a loopback address: all of 127/8 is local).
fn route_from(origin: SocketAddr, bind: IpAddr) -> waygate_http::Route {
    waygate_http::Route {
        dst: origin,
        bind: Some(bind),
        via: None,
        connect: Arc::new(move || {
            Box::pin(async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(bind, 0))?;
                socket.connect(origin).await
            })
        }),
    }
}

/// A plain HTTP origin answering each connection's first request and then closing it without
/// saying so (`Connection: close`), as an origin whose keep-alive timeout passed does; records
/// each connection's source address.
async fn one_shot_origin() -> (SocketAddr, Arc<std::sync::Mutex<Vec<SocketAddr>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = peers.clone();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            seen.lock().expect("lock").push(peer);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, peers)
}

/// A plain HTTP origin counting the connections it accepts.
async fn counting_plain_origin() -> (SocketAddr, Arc<std::sync::Mutex<Vec<SocketAddr>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = peers.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = listener.accept().await {
            seen.lock().expect("lock").push(peer);
            tokio::spawn(serve_origin(s, false));
        }
    });
    (addr, peers)
}

impl Lab {
    /// Waits until `n` upstream connections are idle in the pool (a response's connection goes
    /// back once the device's side of it ended).
    async fn pooled(&self, n: usize) {
        for _ in 0..200 {
            if self.inspector.pooled() == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(self.inspector.pooled(), n, "idle pooled connections");
    }
}

#[tokio::test]
async fn device_connections_in_sequence_share_one_upstream_connection_per_name() {
    let lab = lab(true);
    let (origin, accepts) = counting_tls_origin(
        &lab.lab_ca,
        &["shop.example", "other.example"],
        &[b"http/1.1"],
        false,
    )
    .await;
    let gw = lab.gateway_ca.cert_der().to_vec();
    for round in 0..3 {
        let tls = lab
            .tls(origin, &gw, "shop.example", &[b"h2", b"http/1.1"])
            .await
            .expect("handshake");
        let (status, _, body) = get(tls, "shop.example", &format!("/r{round}"), false).await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("HTTP/1.1 /r{round} tag=-").as_str())
        );
        lab.pooled(1).await;
    }
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "one upstream connection served all three"
    );

    // Another SNI is another key: its own connection, and both are kept.
    let tls = lab
        .tls(origin, &gw, "other.example", &[b"http/1.1"])
        .await
        .expect("handshake");
    let (status, _, _) = get(tls, "other.example", "/", false).await;
    assert_eq!(status, 200);
    lab.pooled(2).await;
    assert_eq!(accepts.load(Ordering::SeqCst), 2);

    // A device connection whose requests the gateway answers itself hands back the
    // connection it took (same name, same ALPN offer).
    let tls = lab
        .tls(origin, &gw, "shop.example", &[b"h2", b"http/1.1"])
        .await
        .expect("handshake");
    let (status, _, _) = get(tls, "shop.example", "/admin", false).await;
    assert_eq!(status, 403);
    lab.pooled(2).await;
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_h2_upstream_connection_is_shared_by_device_connections() {
    let lab = lab(true);
    let (origin, accepts) =
        counting_tls_origin(&lab.lab_ca, &["h2.example"], &[b"h2", b"http/1.1"], false).await;
    let gw = lab.gateway_ca.cert_der().to_vec();
    let first = lab
        .tls(origin, &gw, "h2.example", &[b"h2", b"http/1.1"])
        .await
        .expect("handshake");
    let second = lab
        .tls(origin, &gw, "h2.example", &[b"h2", b"http/1.1"])
        .await
        .expect("handshake");
    assert_eq!(second.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (a, b) = tokio::join!(
        get(first, "h2.example", "/a", true),
        get(second, "h2.example", "/b", true)
    );
    assert_eq!((a.0, a.2.as_str()), (200, "HTTP/2.0 /a tag=-"));
    assert_eq!((b.0, b.2.as_str()), (200, "HTTP/2.0 /b tag=-"));
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "both devices on one h2 connection"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_origin_closed_is_replaced_by_a_fresh_one() {
    let lab = lab(false);
    let (origin, peers) = one_shot_origin().await;
    for round in 0..3 {
        let device = lab.open(origin).await;
        let (status, _, body) = get(device, "plain.example", "/", false).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "round {round}");
    }
    assert_eq!(
        peers.lock().expect("lock").len(),
        3,
        "each request on a new connection"
    );
}

#[tokio::test]
async fn different_egress_addresses_do_not_share_connections() {
    let lab = lab(false);
    let (origin, peers) = counting_plain_origin().await;
    let a: IpAddr = [127, 0, 0, 1].into();
    let b: IpAddr = [127, 0, 0, 2].into();
    // One idle connection after the first request, two (one per address) after each later.
    for (bind, idle) in [(a, 1), (b, 2), (a, 2), (b, 2)] {
        let device = lab.open_route(route_from(origin, bind)).await;
        let (status, _, _) = get(device, "plain.example", "/", false).await;
        assert_eq!(status, 200);
        lab.pooled(idle).await;
    }
    let peers = peers.lock().expect("lock").clone();
    let sources: Vec<IpAddr> = peers.iter().map(SocketAddr::ip).collect();
    assert_eq!(
        sources,
        vec![a, b],
        "one connection from each egress address, reused"
    );
}
