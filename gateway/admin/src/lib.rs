//! The admin API: Cloudflare-shaped JSON (`/gateway/rules`, `/gateway/lists`, `/devices`,
//! `/users`, `/groups`, `/virtual_networks`, `/status`, `/openapi.json`) served on the data
//! dir's Unix socket `admin.sock` (mode 0600; whoever can open it has full access) and, when
//! `admin.listen` is set, on a TLS listener that takes `Authorization: Bearer TOKEN`
//! (read-only tokens may only GET).
//!
//! Inputs: HTTP requests; the config; the registry (one connection of its own); the running
//! gateway's status through a callback. Outputs: answers, and registry writes that the gateway
//! picks up by polling the registry (rules and lists within a second). Started by the runtime
//! with [`start`], on a thread and runtime of its own; nothing polls it. [`client::Client`] is
//! the CLI's side of the socket. [`enroll`] serves the enrollment listener (`control.listen`),
//! started by the runtime with [`enroll::start`].
#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod enroll;
pub mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use api::{Api, GatewayStatus, StatusSource};
pub use server::ServeError;
use waygate_config::Config;
use waygate_registry::{Registry, RegistryError};

/// File name of the admin socket inside the data directory.
pub const SOCKET_FILE: &str = "admin.sock";

/// `<data_dir>/admin.sock`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A path to `socket` short enough for a Unix socket address: itself, or for a data dir with a
/// long path, `/proc/self/fd/N/admin.sock` through the returned descriptor of its directory
/// (keep it open while the path is used).
pub fn addressable(socket: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::io::AsRawFd as _;
    if socket.as_os_str().as_bytes().len() <= MAX_SOCKET_PATH {
        return Ok((socket.to_path_buf(), None));
    }
    let (dir, name) = match (socket.parent(), socket.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => return Ok((socket.to_path_buf(), None)),
    };
    let dir = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    Ok((short, Some(dir)))
}

/// Why the admin API did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Its registry connection could not be opened.
    #[error("admin API: {0}")]
    Registry(#[from] RegistryError),
    /// Its thread could not start.
    #[error("admin API thread: {0}")]
    Thread(std::io::Error),
}

/// The running API; dropping it removes the socket file (the thread ends with the process).
pub struct AdminHandle {
    socket: PathBuf,
    /// Where the TLS listener listens, if it does.
    pub tls_addr: Option<SocketAddr>,
}

impl AdminHandle {
    /// The Unix socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Unix seconds now: the API is an I/O shell and reads the clock for the records it writes.
#[allow(clippy::disallowed_methods)]
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Binds the socket (and the TLS listener with `tls` when `admin.listen` is set) now, so a
/// failure stops the start, then serves them on a thread of their own.
pub fn start(
    config: &Config,
    tls: Option<Arc<rustls::ServerConfig>>,
    status: StatusSource,
) -> Result<AdminHandle, StartError> {
    let socket = socket_path(&config.data_dir);
    let unix = server::bind_socket(&socket)?;
    let mut handle = AdminHandle {
        socket,
        tls_addr: None,
    };
    let (tls, tls_addr) = match (config.admin.listen, tls) {
        (Some(addr), Some(settings)) => {
            let listener = server::bind_tls(addr)?;
            let bound = listener.local_addr().ok();
            (Some((listener, settings)), bound)
        }
        _ => (None, None),
    };
    let registry = Registry::open(&config.data_dir, &config.tunnel)?;
    let api = Arc::new(Api::new(config.clone(), registry, status, unix_now));
    let listeners = server::Listeners { unix, tls };
    std::thread::Builder::new()
        .name("waygate-admin".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(server::run(api, listeners)),
                Err(err) => tracing::error!(%err, "admin API runtime did not start"),
            }
        })
        .map_err(StartError::Thread)?;
    handle.tls_addr = tls_addr;
    Ok(handle)
}
