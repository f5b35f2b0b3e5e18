//! The HTTP stage: an inspecting proxy for device TCP flows to web ports (`http.ports`).
//!
//! The runtime connects to the upstream the egress and network stages chose (so a refused
//! upstream still refuses the device) and hands both ends here with the flow's context.
//! The device's first bytes decide what follows:
//! - TLS: the ClientHello is read whole and kept. Without `http.tls_decrypt`, the HTTP rules
//!   decide on the SNI host alone (block resets the connection) and the recorded bytes are
//!   replayed to the origin and spliced. With it, Do Not Inspect (`off`) rules matching the SNI
//!   splice the same way; otherwise the origin is connected with TLS first (its ALPN decides
//!   whether the device is offered h2) and the device gets a leaf minted by the gateway's CA.
//! - HTTP: requests are proxied with hyper, each decided by the HTTP rules ([`decide`]).
//! - Anything else (or an upstream that speaks first): spliced byte for byte.
//!
//! Runs on its own thread's runtime, off the data plane.
#![deny(missing_docs)]
#![allow(clippy::disallowed_methods)] // an I/O shell like the runtime: it reads the clock for logs, pages and leaves

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use waygate_config::{HttpConfig, NoSni};
use waygate_geoip::GeoIp;
use waygate_keys::CertificateAuthority;
use waygate_model::FlowCtx;
use waygate_policy::category_db::CategoryDb;
use waygate_policy::fields::Stage;
use waygate_policy::input::Input;
use waygate_stages::policy::Loaded;

pub mod decide;
pub mod endpoint;
pub mod files;
pub mod h2settings;
pub mod page;
pub mod pool;
mod proxy;
pub mod reset;
pub mod tls;

use decide::Verdict;
use tls::{Hello, Minter, UpstreamTrust};

/// How long a device may take, once it started, to send its whole ClientHello and finish the
/// TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// First read from the device: the start of a ClientHello or a request line.
const FIRST_READ: usize = 4096;

/// Requests (and TLS connections decided on SNI alone) counted by decision.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Allowed (no rule, or an allow rule).
    pub allowed: AtomicU64,
    /// Blocked (block page, 307 to a block page, or a connection closed on SNI).
    pub blocked: AtomicU64,
    /// Redirected by a redirect rule.
    pub redirected: AtomicU64,
    /// Connections left uninspected by a Do Not Inspect rule or `http.no_sni = "bypass"`.
    pub bypassed: AtomicU64,
    /// Answered 526: the origin's certificate failed verification.
    pub untrusted: AtomicU64,
}

impl HttpCounters {
    /// Each count with its decision word (`allow`, `block`, `redirect`, `off`, `untrusted_cert`).
    pub fn by_decision(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("allow", get(&self.allowed)),
            ("block", get(&self.blocked)),
            ("redirect", get(&self.redirected)),
            ("off", get(&self.bypassed)),
            ("untrusted_cert", get(&self.untrusted)),
        ]
    }

    fn count(&self, verdict: &Verdict) {
        let counter = match verdict {
            Verdict::Allow { .. } | Verdict::AwaitResponse => &self.allowed,
            Verdict::Block { .. } => &self.blocked,
            Verdict::Redirect { .. } => &self.redirected,
            Verdict::DoNotInspect(_) => &self.bypassed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens a fresh TCP connection to a flow's origin, the way its [`Route`] leaves.
pub type Connect =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> + Send + Sync>;

/// How an inspected flow reaches its origin: what makes its upstream connections
/// interchangeable with another flow's, and how to open one.
#[derive(Clone)]
pub struct Route {
    /// The origin's address and port.
    pub dst: SocketAddr,
    /// The egress address connections leave from.
    pub bind: Option<IpAddr>,
    /// The virtual network route they take, opaque here: equal values leave the same way.
    pub via: Option<u64>,
    /// Opens one.
    pub connect: Connect,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("dst", &self.dst)
            .field("bind", &self.bind)
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// A route to `dst` the way the host routes it, from the address it picks.
    pub fn direct(dst: SocketAddr) -> Route {
        Route {
            dst,
            bind: None,
            via: None,
            connect: Arc::new(move || Box::pin(TcpStream::connect(dst))),
        }
    }

    /// The pool key of a connection on this route with `tls`.
    pub fn key(&self, tls: Option<(Arc<str>, bool)>) -> pool::Key {
        pool::Key {
            dst: self.dst,
            bind: self.bind,
            via: self.via,
            tls,
        }
    }
}

/// What the inspector reads that changes while running.
pub struct Shared {
    config: HttpConfig,
    policy: ArcSwap<Loaded>,
    geoip: ArcSwapOption<GeoIp>,
    categories: ArcSwapOption<CategoryDb>,
    minter: Option<Minter>,
    trust: UpstreamTrust,
    /// Idle upstream connections, shared by all inspected flows.
    pool: Arc<pool::Pool>,
    counters: Arc<HttpCounters>,
    /// Where `gateway_http` lines go (`logs.dir`), set once at start.
    /// One sender (each clone of a sender registers buffers of its own): requests share it.
    logs: std::sync::OnceLock<Arc<waygate_observe::LogSender>>,
}

/// The HTTP stage's inspector.
#[derive(Clone)]
pub struct Inspector {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl Inspector {
    /// An inspector for `config`, minting leaves with `ca` (when decrypting), trusting `roots`
    /// upstream, running its connections on `runtime`.
    pub fn new(
        config: HttpConfig,
        ca: Arc<CertificateAuthority>,
        roots: rustls::RootCertStore,
        runtime: tokio::runtime::Handle,
    ) -> Result<Inspector, String> {
        let minter = if config.tls_decrypt {
            Some(Minter::new(ca)?)
        } else {
            None
        };
        Ok(Inspector {
            shared: Arc::new(Shared {
                config,
                policy: ArcSwap::from_pointee(Loaded::empty()),
                geoip: ArcSwapOption::empty(),
                categories: ArcSwapOption::empty(),
                minter,
                trust: UpstreamTrust::new(roots)?,
                pool: pool::Pool::new(pool::MAX_IDLE, pool::IDLE_TIMEOUT),
                counters: Arc::default(),
                logs: std::sync::OnceLock::new(),
            }),
            runtime,
        })
    }

    /// Replaces the rules.
    pub fn set_policy(&self, loaded: Arc<Loaded>) {
        self.shared.policy.store(loaded);
    }

    /// Replaces the geolocation database.
    pub fn set_geoip(&self, geoip: Option<Arc<GeoIp>>) {
        self.shared.geoip.store(geoip);
    }

    /// Replaces the domain categories.
    pub fn set_categories(&self, categories: Option<Arc<CategoryDb>>) {
        self.shared.categories.store(categories);
    }

    /// Writes one `gateway_http` line per request to `logs` from now on.
    pub fn log_to(&self, logs: waygate_observe::LogSender) {
        let _ = self.shared.logs.set(Arc::new(logs));
    }

    /// The counters.
    pub fn counters(&self) -> Arc<HttpCounters> {
        self.shared.counters.clone()
    }

    /// Idle upstream connections in the pool.
    pub fn pooled(&self) -> usize {
        self.shared.pool.len()
    }

    /// The origin first: answers once `route`'s origin does, with the connection made, or
    /// with `None` when a live pooled connection already shows it answers (that flow then
    /// uses pooled connections, or opens one when it needs a connection of its own).
    pub async fn connect(&self, route: &Route) -> std::io::Result<Option<TcpStream>> {
        if self.shared.pool.reaches(route.dst, route.bind, route.via) {
            return Ok(None);
        }
        Ok(Some((route.connect)().await?))
    }

    /// Inspects a flow: `device` is the device's side, `upstream` what [`Inspector::connect`]
    /// gave for `route`; `reset` is raised before `device` is dropped when the device is to get
    /// a reset rather than a close.
    pub fn inspect<D>(
        &self,
        ctx: FlowCtx,
        route: Route,
        upstream: Option<TcpStream>,
        device: D,
        reset: reset::ResetFlag,
    ) where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let target = route.dst;
            let flow = Arc::new(proxy::Conn::new(ctx, route, None, Some(reset)));
            if let Err(e) = shared.run(flow.clone(), device, upstream).await {
                tracing::debug!(target: "waygate::http", device = %flow.ctx.device.name, dst = %target, error = %e, "inspected flow ended");
            }
        });
    }
}

/// The flow's own TCP connection to its origin: `upstream` when it was made, else a fresh one.
async fn raw(flow: &proxy::Conn, upstream: Option<TcpStream>) -> std::io::Result<TcpStream> {
    match upstream {
        Some(stream) => Ok(stream),
        None => (flow.route.connect)().await,
    }
}

/// Copies both ways until both sides are done.
async fn splice<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

impl Shared {
    async fn run<D>(
        self: Arc<Self>,
        flow: Arc<proxy::Conn>,
        mut device: D,
        mut upstream: Option<TcpStream>,
    ) -> std::io::Result<()>
    where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut first = Vec::with_capacity(FIRST_READ);
        let read = match upstream.as_mut() {
            // A protocol whose server speaks first (SMTP, SSH on "all" ports) has nothing to
            // inspect: splice as soon as the upstream says something before the device does.
            // No deadline here: a browser's preconnect may idle for long, and passing a silent
            // flow through after a while would let any client skip inspection by waiting. The
            // flow's own idle timeout ends dead ones.
            // Readiness alone can be spurious, and a spurious one must not let a flow skip
            // inspection: the origin spoke when a peek finds bytes (or its end).
            Some(stream) => {
                let mut probe = [0u8; 1];
                let origin_spoke = std::future::poll_fn(|cx| {
                    stream.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut probe))
                });
                tokio::select! {
                    n = device.read_buf(&mut first) => Some(n?),
                    r = origin_spoke => { r?; None }
                }
            }
            // A pooled connection showed the origin answers (and speaks HTTP, not first).
            None => Some(device.read_buf(&mut first).await?),
        };
        match read {
            None => {
                tracing::debug!(target: "waygate::http", device = %flow.ctx.device.name, dst = %flow.target, "the origin spoke first: passed through");
                let mut upstream = raw(&flow, upstream).await?;
                upstream.write_all(&first).await?;
                splice(device, upstream).await;
                return Ok(());
            }
            Some(0) => return Ok(()),
            Some(_) => {}
        }
        if first.first() == Some(&0x16) {
            // The steps before a connection settles are boxed: a task is as big as its
            // largest state for its whole life, and an idle inspected connection lives in
            // `proxy::serve` (4.2 KiB); inline, the handshakes made it 10.4 KiB.
            let hello = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                Box::pin(tls::read_client_hello(&mut device, first)),
            )
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            return match hello {
                Hello::Tls { accepted, recorded } => {
                    self.tls(flow, device, upstream, accepted, recorded).await
                }
                Hello::Other { recorded } => {
                    let mut upstream = raw(&flow, upstream).await?;
                    upstream.write_all(&recorded).await?;
                    splice(device, upstream).await;
                    Ok(())
                }
            };
        }
        if !looks_like_http(&first) {
            let mut upstream = raw(&flow, upstream).await?;
            upstream.write_all(&first).await?;
            splice(device, upstream).await;
            return Ok(());
        }
        // The connection made for the flow serves its first request; without one, requests
        // take pooled connections.
        if let Some(stream) = upstream {
            let (sender, _) = Box::pin(proxy::open(&self, None, stream)).await?;
            *flow
                .own
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender);
        }
        // Replayed for the connection's life: only what was read is kept.
        first.shrink_to_fit();
        let (reader, writer) = tokio::io::split(device);
        let device = tokio::io::join(std::io::Cursor::new(first).chain(reader), writer);
        proxy::serve(self, flow, device, false).await;
        Ok(())
    }

    /// Decides on what a ClientHello shows: host (the SNI), domains, categories, identity and
    /// connection fields.
    fn decide_sni(&self, flow: &proxy::Conn, sni: &str) -> Verdict {
        let mut input = Input::new();
        let geo = self.geoip.load();
        decide::fill_conn(
            &mut input,
            &flow.ctx,
            flow.target,
            geo.as_deref(),
            flow.proxy.as_deref(),
        );
        let categories = self.categories.load();
        decide::fill_host(&mut input, sni, categories.as_deref());
        let policy = self.policy.load();
        decide::verdict_of(policy.policy.stage(Stage::Http).evaluate(&input))
    }

    async fn tls<D>(
        self: Arc<Self>,
        flow: Arc<proxy::Conn>,
        device: D,
        upstream: Option<TcpStream>,
        accepted: Box<rustls::server::Accepted>,
        recorded: Vec<u8>,
    ) -> std::io::Result<()>
    where
        D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sni, device_h2) = tls::hello_facts(&accepted.client_hello());
        let log = |decision: &str, verdict: Option<&Verdict>| {
            let rule = verdict.and_then(Verdict::rule);
            tracing::info!(
                target: "waygate::http",
                device = %flow.ctx.device.name,
                user = %flow.ctx.device.email,
                dst = %flow.target,
                sni = sni.as_deref().unwrap_or(""),
                decision,
                rule_id = rule.map_or("", |r| r.id.as_str()),
                rule_name = rule.map_or("", |r| r.name.as_str()),
                "http tls connection"
            );
        };
        let Some(minter) = self.minter.as_ref() else {
            // No decryption: the SNI host is all the rules see.
            let verdict = match &sni {
                Some(host) => self.decide_sni(&flow, host),
                None => decide::verdict_of(None),
            };
            self.counters.count(&verdict);
            log(verdict.decision(), Some(&verdict));
            if let Verdict::Block { .. } = verdict {
                // Reset before any byte reaches the origin, as Cloudflare does without
                // decryption: the device sees an RST, not a handshake or a FIN.
                if let Some(reset) = &flow.reset {
                    reset.raise();
                }
                return Ok(());
            }
            let mut upstream = raw(&flow, upstream).await?;
            upstream.write_all(&recorded).await?;
            splice(device, upstream).await;
            return Ok(());
        };
        let name = match &sni {
            Some(host) => {
                let verdict = self.decide_sni(&flow, host);
                if let Verdict::DoNotInspect(_) = verdict {
                    self.counters.count(&verdict);
                    log("off", Some(&verdict));
                    let mut upstream = raw(&flow, upstream).await?;
                    upstream.write_all(&recorded).await?;
                    splice(device, upstream).await;
                    return Ok(());
                }
                host.clone()
            }
            None => match self.config.no_sni {
                NoSni::Bypass => {
                    self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
                    log("no_sni_bypass", None);
                    let mut upstream = raw(&flow, upstream).await?;
                    upstream.write_all(&recorded).await?;
                    splice(device, upstream).await;
                    return Ok(());
                }
                NoSni::Block => {
                    self.counters.blocked.fetch_add(1, Ordering::Relaxed);
                    log("no_sni_block", None);
                    // Like a block on the SNI: reset, no handshake.
                    if let Some(reset) = &flow.reset {
                        reset.raise();
                    }
                    return Ok(());
                }
                NoSni::Inspect => flow.target.ip().to_string(),
            },
        };
        // The origin first: its ALPN decides what the device is offered. A pooled connection
        // to the same name tells as much as a new one.
        let origin_tls = Some((Arc::<str>::from(name.as_str()), device_h2));
        let key = flow.route.key(origin_tls.clone());
        let pooled = if flow.pooled {
            self.pool.take(&key)
        } else {
            None
        };
        let (own, facts) = match pooled {
            Some((sender, facts)) => {
                // Not needed: the pooled one answers for the origin.
                drop(upstream);
                (sender, facts)
            }
            None => {
                let stream = Box::pin(raw(&flow, upstream)).await?;
                let (sender, facts) =
                    Box::pin(proxy::open(&self, origin_tls.as_ref(), stream)).await?;
                let facts = Arc::new(facts);
                if flow.pooled {
                    if let Some(h2) = sender.share() {
                        self.pool.put(key, h2, facts.clone());
                    }
                }
                (sender, facts)
            }
        };
        #[allow(clippy::disallowed_methods)] // a certificate is minted for the time now
        let now = SystemTime::now();
        let config = minter
            .device_config(&name, facts.h2, now)
            .map_err(std::io::Error::other)?;
        // Only a splice replays the hello: not kept for the decrypted connection's life.
        drop(recorded);
        let start = tokio_rustls::StartHandshake::from_parts(*accepted, device);
        let device = tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(start.into_stream(config)))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let flow = Arc::new(proxy::Conn {
            ctx: flow.ctx.clone(),
            target: flow.target,
            tls: Some(proxy::TlsFacts {
                sni: name,
                cert_error: facts.cert_error.clone(),
                version: facts.version.clone(),
            }),
            proxy: flow.proxy.clone(),
            one_request: false,
            reset: None,
            route: flow.route.clone(),
            pooled: flow.pooled,
            origin_tls,
            facts: facts.clone(),
            own: std::sync::Mutex::new(Some(own)),
        });
        proxy::serve(self, flow, device, facts.extended_connect).await;
        Ok(())
    }
}

/// Whether `first` starts like an HTTP/1 request line or the HTTP/2 preface.
fn looks_like_http(first: &[u8]) -> bool {
    matches!(
        waygate_wire::sniff::sniff(first),
        waygate_wire::sniff::Sniff::Done(
            waygate_wire::sniff::Detected::Http { .. } | waygate_wire::sniff::Detected::Http2
        ) | waygate_wire::sniff::Sniff::NeedMore
    ) && first.first().is_some_and(u8::is_ascii_uppercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn with `f`'s signature returns.
    fn future_size<A, B, C, D, F>(_f: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_inspected_connections_task_is_little_more_than_its_http_connection() {
        type Device = tokio::io::DuplexStream;
        let serving = future_size(proxy::serve::<tokio_rustls::server::TlsStream<Device>>);
        let task = future_size(Shared::run::<Device>);
        // A task holds its largest state for life: 10,424 bytes when the TLS handshakes and
        // the origin's connection were awaited inline, against 4,192 for serving.
        assert!(
            task < serving + 2048,
            "task {task} bytes, serving {serving}"
        );
    }
}
