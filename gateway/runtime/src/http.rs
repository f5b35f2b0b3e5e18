//! Starts the HTTP stage's inspector ([`waygate_http`]) on a thread of its own, so TLS
//! handshakes, leaf minting and HTTP parsing stay off the data plane's thread.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use waygate_config::{Config, HttpPorts};
use waygate_http::Inspector;

/// The inspector for `config`, or `None` when `http.ports` is empty.
pub fn start(config: &Config, now: SystemTime) -> anyhow::Result<Option<Inspector>> {
    if config.http.ports == HttpPorts::List(Vec::new()) {
        return Ok(None);
    }
    let ca = Arc::new(crate::tls::load_ca(&config.data_dir, now)?);
    let roots = crate::dns::encrypted::trust_roots(config.http.upstream_ca.as_deref())
        .context("http.upstream_ca")?;
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("waygate-http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
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
    let inspector = Inspector::new(config.http.clone(), ca, roots, handle)
        .map_err(|e| anyhow::anyhow!("http: {e}"))?;
    tracing::info!(
        ports = ?config.http.ports,
        tls_decrypt = config.http.tls_decrypt,
        "HTTP inspection on"
    );
    Ok(Some(inspector))
}
