//! HTTP/1.1 over the Unix socket and the TLS listener, on a thread of its own with its own
//! current-thread runtime: the registry calls behind each request block, and must never block
//! the gateway's serving loop. Requests are answered one at a time (one registry connection);
//! the API is for operators and scripts, not for traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};

use crate::api::{codes, failure, Answer, Api, Caller};

/// How long a client may take to send a request's headers.
pub(crate) const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest request body accepted (a rule, a list of some thousand items).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process answers on the socket: a gateway already runs on this data dir.
    #[error("{0} answers already: another waygate serve uses this data dir")]
    InUse(PathBuf),
    /// The socket or the listener could not be set up.
    #[error("admin API {what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// Binds `path` (mode 0600), replacing a socket a stopped gateway left behind.
pub fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let (address, _dir) = crate::addressable(path).map_err(io(format!(
        "cannot open the directory of {}",
        path.display()
    )))?;
    if std::os::unix::net::UnixStream::connect(&address).is_ok() {
        return Err(ServeError::InUse(path.to_path_buf()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("cannot remove the stale {}", path.display()))(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&address)
        .map_err(io(format!("cannot bind {}", path.display())))?;
    // The data dir is 0700 already; the socket's own mode keeps it private if the dir is not.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("cannot chmod {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io("cannot make the socket non-blocking"))?;
    Ok(listener)
}

/// What one listener hands to the serving code.
pub struct Listeners {
    /// The Unix socket, bound.
    pub unix: std::os::unix::net::UnixListener,
    /// The TLS listener, bound, with its settings.
    pub tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
}

/// Binds the TLS listener (the caller reports the address).
pub fn bind_tls(addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(io(format!("cannot listen on {addr}")))?;
    listener
        .set_nonblocking(true)
        .map_err(io("cannot make the listener non-blocking"))?;
    Ok(listener)
}

pub(crate) fn respond(answer: Answer) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec(&answer.body).unwrap_or_default();
    text.push(b'\n');
    let mut builder = Response::builder()
        .status(answer.status)
        .header("content-type", "application/json");
    if let Some(allow) = answer.allow {
        builder = builder.header("allow", allow);
    }
    builder
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn serve_request(
    api: Arc<Api>,
    tls: bool,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let caller = if tls {
        Caller::Bearer(
            req.headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        )
    } else {
        Caller::Socket
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let answer = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                failure(
                    413,
                    codes::TOO_LARGE,
                    format!("the body is larger than {MAX_BODY} bytes"),
                )
            } else {
                failure(400, codes::INVALID, format!("cannot read the body: {e}"))
            };
            return Ok(respond(answer));
        }
    };
    Ok(respond(api.handle(&method, &path, &caller, &body)))
}

async fn serve_connection<S>(api: Arc<Api>, tls: bool, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| serve_request(api.clone(), tls, req));
    // A client that never finishes its headers (a slow or stuck one on the TLS listener) is
    // dropped instead of holding its connection for good.
    if let Err(err) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%err, "admin API connection ended with an error");
    }
}

/// Serves both listeners until the process ends.
pub async fn run(api: Arc<Api>, listeners: Listeners) {
    let unix = match UnixListener::from_std(listeners.unix) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, "admin API socket unusable");
            return;
        }
    };
    if let Some((tcp, config)) = listeners.tls {
        let api = api.clone();
        tokio::spawn(async move {
            let tcp = match TcpListener::from_std(tcp) {
                Ok(l) => l,
                Err(err) => {
                    tracing::error!(%err, "admin API TLS listener unusable");
                    return;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(err) => {
                        tracing::debug!(%err, "admin API accept failed");
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let api = api.clone();
                tokio::spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(tls) => serve_connection(api, true, tls).await,
                        Err(err) => tracing::debug!(%peer, %err, "admin API TLS handshake failed"),
                    }
                });
            }
        });
    }
    loop {
        match unix.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(api.clone(), false, stream));
            }
            Err(err) => tracing::debug!(%err, "admin API socket accept failed"),
        }
    }
}
