//! Starts the HTTP stage's inspector ([`waygate_http`]) on threads of its own, so TLS
//! handshakes, leaf minting and HTTP parsing stay off the data plane's threads. It gets as many
//! worker threads as the data plane has shards: a new inspected HTTPS connection costs about
//! 0.85 CPU-ms (bench-http: 1,174 per CPU-second), so a busy inspector needs more than one core
//! whenever the data plane does.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use waygate_config::{Config, HttpPorts};
use waygate_http::Inspector;

/// The inspector for `config` on `workers` threads, or `None` when `http.ports` is empty and
/// there is no `http.proxy_listen`.
pub fn start(
    config: &Config,
    now: SystemTime,
    workers: usize,
) -> anyhow::Result<Option<Inspector>> {
    if config.http.ports == HttpPorts::List(Vec::new()) && config.http.proxy_listen.is_empty() {
        return Ok(None);
    }
    // Bound first: an address in use stops the start with its name before anything runs.
    let mut listeners = Vec::with_capacity(config.http.proxy_listen.len());
    for addr in &config.http.proxy_listen {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| format!("cannot listen on http.proxy_listen {addr}"))?;
        listeners.push(listener);
    }
    let ca = Arc::new(crate::tls::load_ca(&config.data_dir, now)?);
    let roots = crate::dns::encrypted::trust_roots(config.http.upstream_ca.as_deref())
        .context("http.upstream_ca")?;
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("waygate-http".into())
        .spawn(move || {
            let runtime = match crate::service_runtime(workers, "waygate-http") {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the HTTP inspector's runtime");
                    return;
                }
            };
            if handle_tx.send(runtime.handle().clone()).is_ok() {
                // Serves the inspector's tasks for the life of the process.
                runtime.block_on(std::future::pending::<()>());
            }
        })
        .context("cannot start the HTTP inspector's thread")?;
    let handle = handle_rx
        .recv()
        .context("the HTTP inspector's runtime did not start")?;
    let inspector = Inspector::new(config.http.clone(), ca, roots, handle.clone())
        .map_err(|e| anyhow::anyhow!("http: {e}"))?;
    // Proxy requests leave from the egress stage's default address.
    let bind4 = config.egress.default_ipv4;
    let connect: waygate_http::endpoint::Connector = Arc::new(move |dst: SocketAddr| {
        let bind = match dst {
            SocketAddr::V4(_) => bind4.map(IpAddr::V4),
            SocketAddr::V6(_) => None,
        };
        Box::pin(crate::upstream::connect_from(
            dst,
            bind,
            None,
            crate::upstream::CONNECT_TIMEOUT,
        ))
    });
    handle.spawn(trim_after_bursts(inspector.counters()));
    for listener in listeners {
        tracing::info!(listen = ?listener.local_addr().ok(), "explicit proxy on");
        inspector.serve_proxy(listener, connect.clone());
    }
    tracing::info!(
        ports = ?config.http.ports,
        tls_decrypt = config.http.tls_decrypt,
        "HTTP inspection on"
    );
    Ok(Some(inspector))
}

/// Hands freed memory back to the system once a burst of inspected requests ends. TLS
/// handshakes and HTTP parsing free their temporaries between long-lived connection state, in
/// the middle of the heap, where glibc keeps them mapped; the data plane trims only when its
/// flows fall from a peak, never while they only grow: with 1,000 idle inspected connections
/// (`scripts/bench-http.sh`) RSS went 110.5 -> 104.0 MiB (61.9 -> 56.2 KiB a connection). Never
/// while requests keep coming: the trim walks the whole heap.
async fn trim_after_bursts(counters: Arc<waygate_http::HttpCounters>) {
    let total = || counters.by_decision().iter().map(|(_, n)| n).sum::<u64>();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let (mut last, mut busy) = (total(), false);
    loop {
        tick.tick().await;
        let now = total();
        if now != last {
            busy = true;
        } else if busy {
            busy = false;
            crate::host::return_freed_memory();
        }
        last = now;
    }
}
