//! The HTTP layer of an inspected connection: hyper serves the device (HTTP/1.1, or HTTP/2 when
//! negotiated) and a client connection of the same flow carries allowed requests to the origin,
//! bodies streamed both ways. Each request is decided by the HTTP rules; rules that read the
//! response are decided once its head arrives.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use waygate_model::activity::{HttpActivity, RuleRef as LogRule};
use waygate_model::FlowCtx;
use waygate_policy::fields::{FieldId, Phase};
use waygate_policy::input::Input;

use crate::decide::{self, RuleRef, Verdict};
use crate::files::{self, Prefixed};
use crate::page::{self, PageContext};
use crate::pool::{Key, OriginFacts, Sender};
use crate::{h2settings, Route, Shared};

/// How long an HTTP/2 origin may take to send its SETTINGS after its TLS handshake.
const SETTINGS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the TLS layer learned about a decrypted connection.
#[derive(Debug, Clone)]
pub struct TlsFacts {
    /// The name the leaf was minted for (SNI, or the destination address).
    pub sni: String,
    /// Why the origin's certificate failed verification, if it did.
    pub cert_error: Option<String>,
    /// The TLS version spoken with the origin.
    pub version: Option<String>,
}

/// One inspected connection.
#[derive(Debug)]
pub struct Conn {
    /// The flow's context.
    pub ctx: FlowCtx,
    /// Where the upstream connection goes.
    pub target: SocketAddr,
    /// Set when the connection was decrypted.
    pub tls: Option<TlsFacts>,
    /// The proxy endpoint's name, for a connection to `http.proxy_listen`.
    pub proxy: Option<Arc<str>>,
    /// An absolute-URI proxy request: answered once, then closed (the next request on the
    /// connection could name another origin).
    pub one_request: bool,
    /// Raised to end the device's side with a reset.
    pub reset: Option<crate::reset::ResetFlag>,
    /// How its upstream connections are made.
    pub route: Route,
    /// Whether its upstream connections come from and go back to the inspector's pool (not
    /// for the explicit proxy's connections: each keeps its own).
    pub pooled: bool,
    /// TLS toward the origin: the name sent and verified, and whether h2 is offered.
    pub origin_tls: Option<(Arc<str>, bool)>,
    /// What its origin connection learned (ALPN, certificate, RFC 8441).
    pub facts: Arc<OriginFacts>,
    /// The upstream connection it holds: the one made (or taken from the pool) when it
    /// started, until its first request; a shared HTTP/2 one for its life; an unpooled one
    /// between requests.
    pub own: std::sync::Mutex<Option<Sender>>,
}

impl Conn {
    /// A connection to `route`'s origin, pooled, before anything is known of TLS.
    pub fn new(
        ctx: FlowCtx,
        route: Route,
        proxy: Option<Arc<str>>,
        reset: Option<crate::reset::ResetFlag>,
    ) -> Conn {
        Conn {
            ctx,
            target: route.dst,
            tls: None,
            proxy,
            one_request: false,
            reset,
            route,
            pooled: true,
            origin_tls: None,
            facts: Arc::default(),
            own: std::sync::Mutex::new(None),
        }
    }

    /// The pool key of its upstream connections.
    pub fn key(&self) -> Key {
        self.route.key(self.origin_tls.clone())
    }

    fn own(&self) -> std::sync::MutexGuard<'_, Option<Sender>> {
        self.own
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// A request body from the device, counting what passes.
pub struct Counted {
    inner: Prefixed,
    count: Arc<AtomicU64>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body on its way to the device: counts what passes and writes the request's log
/// record once it ends (or the device goes away).
struct Logged {
    inner: Prefixed,
    received: u64,
    record: Option<Record>,
    /// The HTTP/1.1 connection the response came on, back to the pool once it ended whole.
    give_back: Option<GiveBack>,
    /// The response ended whole.
    ended: bool,
}

struct GiveBack {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    sender: Sender,
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.ended = true;
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.write(self.received);
        }
        if let Some(g) = self.give_back.take() {
            // A response cut short leaves its connection mid-message: dropped, so closed.
            if self.ended || hyper::body::Body::is_end_stream(&self.inner) {
                give_back(&g.shared, &g.conn, g.sender);
            }
        }
    }
}

/// Headers that describe one hop and never cross to another connection.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn answer(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn redirect(location: &str) -> Response<Body> {
    let mut r = answer(StatusCode::TEMPORARY_REDIRECT, "text/plain", String::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// hyper's client handshake on `upstream` (HTTP/2 when `h2`), its connection driven by a task
/// of its own; for HTTP/2 also whether the origin accepts RFC 8441 extended CONNECT.
pub async fn handshake<U>(upstream: U, h2: bool) -> std::io::Result<(Sender, bool)>
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (upstream, settings) = h2settings::Watched::new(upstream);
        let (send, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        // The origin's SETTINGS open what it sends once its TLS handshake is done, so this
        // waits for bytes already on their way (and the device's first request could not be
        // answered before them anyway).
        let extended_connect = tokio::time::timeout(SETTINGS_WAIT, settings)
            .await
            .is_ok_and(|accepts| accepts.unwrap_or(false));
        Ok((Sender::H2(send), extended_connect))
    } else {
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(upstream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection.with_upgrades());
        Ok((Sender::H1(send), false))
    }
}

/// An upstream connection on `stream`: TLS first when `tls` names the origin (offering h2
/// when asked), then hyper's handshake in the protocol the origin chose.
pub async fn open(
    shared: &Shared,
    tls: Option<&(Arc<str>, bool)>,
    stream: tokio::net::TcpStream,
) -> std::io::Result<(Sender, OriginFacts)> {
    let Some((name, offer_h2)) = tls else {
        let (sender, _) = handshake(stream, false).await?;
        return Ok((sender, OriginFacts::default()));
    };
    let server_name =
        rustls::pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    let client = shared.trust.client_config(*offer_h2);
    let origin = tokio_rustls::TlsConnector::from(client)
        .connect(server_name.clone(), stream)
        .await?;
    let session = origin.get_ref().1;
    let h2 = session.alpn_protocol() == Some(b"h2");
    let version = session.protocol_version().map(|v| format!("{v:?}"));
    let cert_error = shared
        .trust
        .verify(&server_name, session.peer_certificates());
    let (sender, extended_connect) = handshake(origin, h2).await?;
    Ok((
        sender,
        OriginFacts {
            h2,
            extended_connect,
            cert_error,
            version,
        },
    ))
}

/// An upstream connection for one request, and whether it served before (so may have been
/// closed by the origin meanwhile).
struct Lease {
    sender: Sender,
    reused: bool,
}

/// The connection a request goes on: the device connection's own, else a pooled one, else a
/// fresh one (always fresh when `fresh`: an upgrade takes its connection for good).
async fn lease(shared: &Shared, conn: &Conn, fresh: bool) -> std::io::Result<Lease> {
    if !fresh {
        let own = {
            let mut own = conn.own();
            if own.as_ref().is_some_and(Sender::is_closed) {
                *own = None;
            }
            match own.as_ref().and_then(Sender::share) {
                Some(shared) => Some(shared),
                None => own.take(),
            }
        };
        if let Some(sender) = own {
            return Ok(Lease {
                sender,
                reused: true,
            });
        }
        if conn.pooled {
            if let Some((sender, _)) = shared.pool.take(&conn.key()) {
                return Ok(Lease {
                    sender,
                    reused: true,
                });
            }
        }
    }
    let stream = (conn.route.connect)().await?;
    let (sender, facts) = open(shared, conn.origin_tls.as_ref(), stream).await?;
    if !fresh {
        if let Some(h2) = sender.share() {
            // An HTTP/2 connection serves this device connection's later requests too, and
            // (pooled) other device connections'.
            if conn.pooled {
                if let Some(pooled) = h2.share() {
                    shared.pool.put(conn.key(), pooled, Arc::new(facts));
                }
            }
            *conn.own() = Some(h2);
        }
    }
    Ok(Lease {
        sender,
        reused: false,
    })
}

/// An HTTP/1.1 connection whose response ended whole: back to the pool, or kept by an
/// unpooled device connection for its next request.
fn give_back(shared: &Arc<Shared>, conn: &Conn, sender: Sender) {
    if sender.is_closed() || sender.share().is_some() {
        return;
    }
    if conn.pooled {
        shared.pool.put(conn.key(), sender, conn.facts.clone());
    } else {
        *conn.own() = Some(sender);
    }
}

/// Serves the device's requests on `device`, forwarding allowed ones over upstream connections
/// from the pool (or the device connection's own, `conn.own`); the device is offered RFC 8441
/// when `extended_connect`.
pub async fn serve<D>(shared: Arc<Shared>, conn: Arc<Conn>, device: D, extended_connect: bool)
where
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (shared_ref, conn_ref) = (shared.clone(), conn.clone());
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        let conn = conn.clone();
        // Boxed: hyper keeps room for one in-flight request's future for the connection's
        // whole life, and this one is about 12 KiB (bench-http's 1,000 idle connections held
        // 12.4 MB of it); boxed, only a request in flight pays for it.
        Box::pin(async move {
            let mut request = request;
            if conn.proxy.is_some() {
                // Meant for the proxy, never for the origin.
                request.headers_mut().remove("proxy-connection");
                request.headers_mut().remove(header::PROXY_AUTHORIZATION);
            }
            let mut response = handle(&shared, &conn, request).await;
            if conn.one_request {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response)
        })
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if extended_connect {
        // RFC 8441 WebSockets, mirrored: offered to the device only when the origin offers it.
        builder.http2().enable_connect_protocol();
    }
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(device), service)
        .await
    {
        tracing::debug!(target: "waygate::http", error = %e, "device connection ended");
    }
    // A connection taken for a device connection that sent no request to it (it closed, or
    // its requests were answered by the gateway) serves another.
    let own = conn_ref.own().take();
    if let Some(sender) = own {
        give_back(&shared_ref, &conn_ref, sender);
    }
}

/// The request's host, without port, lower-cased: the URI's authority, else `Host`, else the
/// SNI or the destination address.
fn request_host(conn: &Conn, request: &Request<Incoming>) -> String {
    let raw = request
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            let host = request.headers().get(header::HOST)?.to_str().ok()?;
            let authority: hyper::http::uri::Authority = host.parse().ok()?;
            Some(authority.host().to_string())
        })
        .or_else(|| conn.tls.as_ref().map(|t| t.sni.clone()))
        .unwrap_or_else(|| conn.target.ip().to_string());
    raw.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

struct Facts {
    scheme: &'static str,
    host: String,
    method: String,
    pq: String,
    url: String,
    version: &'static str,
    user_agent: String,
    started: Instant,
    /// Request body bytes forwarded so far.
    sent: Arc<AtomicU64>,
}

impl Facts {
    fn page_context<'a>(&'a self, conn: &'a Conn, time: String) -> PageContext<'a> {
        PageContext {
            url: &self.url,
            device: &conn.ctx.device.name,
            device_id: &conn.ctx.device.id,
            email: &conn.ctx.device.email,
            source_ip: conn.ctx.src.ip().to_string(),
            time,
        }
    }
}

fn now_rfc3339() -> String {
    #[allow(clippy::disallowed_methods)] // the block page shows the wall-clock time
    let now = SystemTime::now();
    time::OffsetDateTime::from(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The gateway's own answer for a verdict that does not forward, if it is one.
fn own_answer(
    shared: &Shared,
    conn: &Conn,
    facts: &Facts,
    verdict: &Verdict,
) -> Option<Response<Body>> {
    match verdict {
        Verdict::Block {
            rule,
            reason,
            target_uri,
            include_context,
        } => {
            let ctx = facts.page_context(conn, now_rfc3339());
            Some(match target_uri {
                Some(target) if *include_context => {
                    redirect(&page::with_context(target, rule, &ctx))
                }
                Some(target) => redirect(target),
                None => answer(
                    StatusCode::FORBIDDEN,
                    "text/html; charset=utf-8",
                    page::block_page(&shared.config.block_page, rule, reason.as_deref(), &ctx),
                ),
            })
        }
        Verdict::Redirect {
            rule,
            target_uri,
            preserve_path_and_query,
            include_context,
        } => {
            let mut location =
                page::redirect_location(target_uri, *preserve_path_and_query, &facts.pq);
            if *include_context {
                let ctx = facts.page_context(conn, now_rfc3339());
                location = page::with_context(&location, rule, &ctx);
            }
            Some(redirect(&location))
        }
        Verdict::Allow { .. } | Verdict::DoNotInspect(_) | Verdict::AwaitResponse => None,
    }
}

/// What `untrusted_cert` asks for on a connection whose origin failed verification: `None`
/// passes through.
fn untrusted(
    shared: &Shared,
    conn: &Conn,
    facts: &Facts,
    verdict: &Verdict,
) -> Option<Response<Body>> {
    conn.tls.as_ref()?.cert_error.as_ref()?;
    let action = verdict
        .rule()
        .and_then(|r| r.untrusted_cert.clone())
        .unwrap_or_else(|| "error".into());
    match action.as_str() {
        "pass_through" => None,
        "block" => {
            let rule = verdict.rule().cloned().unwrap_or(RuleRef {
                id: String::new(),
                name: "untrusted certificate".into(),
                action: "block".into(),
                untrusted_cert: Some(action.clone()),
            });
            let ctx = facts.page_context(conn, now_rfc3339());
            Some(answer(
                StatusCode::FORBIDDEN,
                "text/html; charset=utf-8",
                page::block_page(
                    &shared.config.block_page,
                    &rule,
                    Some("The site's certificate could not be verified."),
                    &ctx,
                ),
            ))
        }
        _ => Some(answer(
            StatusCode::from_u16(526).unwrap_or(StatusCode::BAD_GATEWAY),
            "text/html; charset=utf-8",
            page::untrusted_page(&facts.host),
        )),
    }
}

async fn handle(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let scheme = if conn.tls.is_some() { "https" } else { "http" };
    let host = request_host(conn, &request);
    let pq = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string());
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| host.clone());
    let facts = Facts {
        scheme,
        url: format!("{scheme}://{authority}{pq}"),
        method: request.method().as_str().to_string(),
        host,
        pq,
        version: match request.version() {
            hyper::Version::HTTP_2 => "HTTP/2",
            hyper::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        user_agent: request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        started,
        sent: Arc::default(),
    };
    let mut input = Input::new();
    {
        let geo = shared.geoip.load();
        decide::fill_conn(
            &mut input,
            &conn.ctx,
            conn.target,
            geo.as_deref(),
            conn.proxy.as_deref(),
        );
        let categories = shared.categories.load();
        decide::fill_host(&mut input, &facts.host, categories.as_deref());
    }
    decide::fill_request(
        &mut input,
        facts.scheme,
        &authority,
        &facts.method,
        &facts.pq,
    );
    let upload_mime = content_type(request.headers());
    if let Some(mime) = &upload_mime {
        input.set_str(FieldId::HttpUploadMime, mime);
    }
    // An upload's type comes from its bytes (for a form, each part's): the first bytes are
    // held until the rules have decided.
    let (parts, body) = request.into_parts();
    let body = if hyper::body::Body::is_end_stream(&body) {
        Prefixed::whole(body)
    } else {
        let (prefix, body) = match Prefixed::read(body).await {
            Ok(read) => read,
            Err(e) => {
                tracing::debug!(target: "waygate::http", error = %e, "device request body failed");
                return answer(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "bad request\n".into(),
                );
            }
        };
        let boundary = upload_mime
            .as_deref()
            .filter(|m| *m == "multipart/form-data")
            .and_then(|_| parts.headers.get(header::CONTENT_TYPE))
            .and_then(|v| v.to_str().ok())
            .and_then(files::multipart_boundary);
        let types = match boundary {
            Some(b) => files::multipart_types(prefix, &b).await,
            None => files::types_of(&prefix),
        };
        decide::fill_upload(&mut input, &types, content_length(&parts.headers));
        body
    };
    let mut request = Request::from_parts(parts, body);
    let policy = shared.policy.load();
    let verdict = decide::decide(&policy, &input, Phase::Request);
    if let Some(response) = untrusted(shared, conn, &facts, &verdict) {
        shared.counters.untrusted.fetch_add(1, Ordering::Relaxed);
        log_own(shared, conn, &facts, &verdict, &response, "untrusted_cert");
        return response;
    }
    if let Some(response) = own_answer(shared, conn, &facts, &verdict) {
        shared.counters.count(&verdict);
        log_own(
            shared,
            conn,
            &facts,
            &verdict,
            &response,
            verdict.decision(),
        );
        return response;
    }
    if let Verdict::Allow { add_headers, .. } = &verdict {
        for (name, value) in add_headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                request.headers_mut().append(n, v);
            }
        }
    }
    // An HTTP/2 extended CONNECT (RFC 8441) opens a tunnel on a 200, an HTTP/1.1 upgrade on
    // a 101.
    let extended_connect = request.method() == hyper::Method::CONNECT
        && request.extensions().get::<hyper::ext::Protocol>().is_some();
    let upgrade = extended_connect || request.headers().contains_key(header::UPGRADE);
    let device_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (response, mut sender) = match forward(shared, conn, request, &facts, &authority, upgrade)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(target: "waygate::http", error = %e, url = %facts.url, "upstream request failed");
            let r = answer(
                StatusCode::BAD_GATEWAY,
                "text/plain",
                "bad gateway\n".into(),
            );
            log_own(shared, conn, &facts, &verdict, &r, "upstream_error");
            return r;
        }
    };
    let (head, body) = response.into_parts();
    let (verdict, body) = if verdict == Verdict::AwaitResponse {
        input.set_int(
            FieldId::HttpResponseStatusCode,
            i64::from(head.status.as_u16()),
        );
        if let Some(mime) = content_type(&head.headers) {
            input.set_str(FieldId::HttpDownloadMime, &mime);
        }
        // A download's type comes from its first bytes, held until the rules decide.
        let (prefix, body) = match Prefixed::read(body).await {
            Ok(read) => read,
            Err(e) => {
                tracing::debug!(target: "waygate::http", error = %e, url = %facts.url, "upstream response body failed");
                let r = answer(
                    StatusCode::BAD_GATEWAY,
                    "text/plain",
                    "bad gateway\n".into(),
                );
                log_own(shared, conn, &facts, &verdict, &r, "upstream_error");
                return r;
            }
        };
        let types = files::types_of(&prefix);
        decide::fill_download(&mut input, &types, content_length(&head.headers));
        let verdict = decide::decide(&policy, &input, Phase::Response);
        if let Some(own) = own_answer(shared, conn, &facts, &verdict) {
            shared.counters.count(&verdict);
            log_own(shared, conn, &facts, &verdict, &own, verdict.decision());
            return own;
        }
        (verdict, body)
    } else {
        (verdict, Prefixed::whole(body))
    };
    let mut response = Response::from_parts(head, body);
    shared.counters.count(&verdict);
    let status = response.status();
    let tunnel = if extended_connect {
        StatusCode::OK
    } else {
        StatusCode::SWITCHING_PROTOCOLS
    };
    if let (Some(device_upgrade), true) = (device_upgrade, status == tunnel) {
        let origin_upgrade = hyper::upgrade::on(&mut response);
        let sender = sender.take();
        tokio::spawn(async move {
            // The tunnel's connection, never pooled: its handle lives as long as the tunnel.
            let _sender = sender;
            match (device_upgrade.await, origin_upgrade.await) {
                (Ok(d), Ok(o)) => {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(o))
                            .await;
                }
                (d, o) => {
                    tracing::debug!(target: "waygate::http", device = ?d.err(), origin = ?o.err(), "upgrade failed");
                }
            }
        });
    }
    // Do Not Inspect matched on a plain HTTP request: passed on, not logged.
    let record = (!matches!(verdict, Verdict::DoNotInspect(_)))
        .then(|| Record::new(shared, conn, &facts, &verdict, status, verdict.decision()));
    let (mut parts, body) = response.into_parts();
    let give_back = match sender {
        Some(sender @ Sender::H1(_)) if !upgrade => Some(GiveBack {
            shared: shared.clone(),
            conn: conn.clone(),
            sender,
        }),
        _ => None,
    };
    let body = Logged {
        inner: body,
        received: 0,
        record,
        give_back,
        ended: false,
    };
    if parts.version == hyper::Version::HTTP_2 && status != StatusCode::SWITCHING_PROTOCOLS {
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
    }
    parts.version = hyper::Version::HTTP_11;
    Response::from_parts(parts, body.boxed())
}

/// The body's length from `Content-Length` (a multipart upload's whole body), when given.
fn content_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn content_type(headers: &hyper::HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = value.split(';').next()?.trim().to_ascii_lowercase();
    (!mime.is_empty()).then_some(mime)
}

/// Why a request got no response from the origin.
enum SendError {
    /// Failed before the request was written: it may go on another connection.
    NotSent(hyper::Error, Box<Request<Counted>>),
    /// Failed after.
    Failed(hyper::Error),
}

impl From<hyper::client::conn::TrySendError<Request<Counted>>> for SendError {
    fn from(mut e: hyper::client::conn::TrySendError<Request<Counted>>) -> SendError {
        match e.take_message() {
            Some(request) => SendError::NotSent(e.into_error(), Box::new(request)),
            None => SendError::Failed(e.into_error()),
        }
    }
}

/// Sends `request` on `sender`, in the form its protocol needs.
async fn send(
    sender: &mut Sender,
    request: Request<Counted>,
    facts: &Facts,
    authority: &str,
) -> Result<Response<Incoming>, SendError> {
    let (mut parts, body) = request.into_parts();
    match sender {
        Sender::H1(send) => {
            // Origin form and a Host header, whatever the device spoke.
            if let Ok(uri) = facts.pq.parse() {
                parts.uri = uri;
            }
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(authority) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            parts.version = hyper::Version::HTTP_11;
            let request = Request::from_parts(parts, body);
            if let Err(e) = send.ready().await {
                return Err(SendError::NotSent(e, Box::new(request)));
            }
            Ok(send.try_send_request(request).await?)
        }
        Sender::H2(send) => {
            if let Ok(uri) = format!("{}://{authority}{}", facts.scheme, facts.pq).parse() {
                parts.uri = uri;
            }
            for name in HOP_BY_HOP {
                parts.headers.remove(name);
            }
            parts.headers.remove(header::HOST);
            parts.version = hyper::Version::HTTP_2;
            let request = Request::from_parts(parts, body);
            if let Err(e) = send.ready().await {
                return Err(SendError::NotSent(e, Box::new(request)));
            }
            Ok(send.try_send_request(request).await?)
        }
    }
}

/// Sends `request` to the origin on a leased connection (a fresh one for an `upgrade`); a
/// reused connection that fails before the request is written (the origin closed it while
/// idle) is replaced once by a fresh one. Returns the response and, for HTTP/1.1, the
/// connection's handle.
async fn forward(
    shared: &Shared,
    conn: &Conn,
    request: Request<Prefixed>,
    facts: &Facts,
    authority: &str,
    upgrade: bool,
) -> Result<(Response<Incoming>, Option<Sender>), Box<dyn std::error::Error + Send + Sync>> {
    let mut request = request.map(|body| Counted {
        inner: body,
        count: facts.sent.clone(),
    });
    let mut fresh = upgrade;
    loop {
        let mut lease = lease(shared, conn, fresh).await?;
        match send(&mut lease.sender, request, facts, authority).await {
            Ok(response) => {
                let sender = lease.sender.share().is_none().then_some(lease.sender);
                return Ok((response, sender));
            }
            Err(SendError::NotSent(e, unsent)) if lease.reused => {
                tracing::debug!(target: "waygate::http", error = %e, url = %facts.url, "reused upstream connection failed: retried on a fresh one");
                request = *unsent;
                fresh = true;
            }
            Err(SendError::NotSent(e, _) | SendError::Failed(e)) => return Err(e.into()),
        }
    }
}

/// What the log line of one request says, written once its response has ended.
struct Record {
    logs: Option<Arc<waygate_observe::LogSender>>,
    activity: HttpActivity,
    sent: Arc<AtomicU64>,
    started: Instant,
}

impl Record {
    fn new(
        shared: &Shared,
        conn: &Conn,
        facts: &Facts,
        verdict: &Verdict,
        status: StatusCode,
        action: &'static str,
    ) -> Record {
        let rule = verdict
            .rule()
            .map(|r| Arc::new(LogRule::new(&r.id, &r.name)));
        Record {
            logs: shared.logs.get().cloned(),
            activity: HttpActivity {
                at: facts.started,
                device: conn.ctx.device.clone(),
                src: conn.ctx.src,
                dst: conn.target,
                host: facts.host.clone(),
                method: facts.method.clone(),
                url: facts.url.clone(),
                version: facts.version,
                status: status.as_u16(),
                action,
                policy: rule,
                user_agent: facts.user_agent.clone(),
                bytes_sent: 0,
                bytes_received: 0,
                duration: std::time::Duration::ZERO,
                upstream_tls: conn
                    .tls
                    .as_ref()
                    .and_then(|t| t.version.clone())
                    .unwrap_or_default(),
            },
            sent: facts.sent.clone(),
            started: facts.started,
        }
    }

    /// One line per request: who, what, the decision and the rule, as a tracing line and, with
    /// `logs.dir`, a `gateway_http` line.
    fn write(mut self, received: u64) {
        let a = &mut self.activity;
        a.bytes_sent = self.sent.load(Ordering::Relaxed);
        a.bytes_received = received;
        a.duration = self.started.elapsed();
        tracing::info!(
            target: "waygate::http",
            device = %a.device.name,
            device_id = %a.device.id,
            user = %a.device.email,
            src = %a.src,
            dst = %a.dst,
            host = %a.host,
            method = %a.method,
            url = %a.url,
            status = a.status,
            decision = a.action,
            rule_id = a.policy.as_ref().map_or("", |r| &*r.id),
            rule_name = a.policy.as_ref().map_or("", |r| &*r.name),
            bytes_up = a.bytes_sent,
            bytes_down = a.bytes_received,
            upstream_tls = %a.upstream_tls,
            duration_ms = u64::try_from(a.duration.as_millis()).unwrap_or(u64::MAX),
            "http request"
        );
        if let Some(logs) = self.logs.take() {
            logs.send(waygate_model::activity::Activity::Http(Box::new(
                self.activity,
            )));
        }
    }
}

/// Logs an answer the gateway wrote itself.
fn log_own(
    shared: &Shared,
    conn: &Conn,
    facts: &Facts,
    verdict: &Verdict,
    response: &Response<Body>,
    action: &'static str,
) {
    let len = hyper::body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    Record::new(shared, conn, facts, verdict, response.status(), action).write(len);
}
