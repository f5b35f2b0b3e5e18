//! WireGuard's cross-platform userspace API (UAPI), read side, so `wg show waygate0` works.
//!
//! wireguard-tools talks to userspace implementations over `/var/run/wireguard/NAME.sock`: it
//! sends `get=1\n\n` and parses `key=value` lines up to `errno=0` and a blank line. The gateway
//! answers from a snapshot of its state taken per request (the caller's closure). `set=1` is
//! refused with `errno=1`: peers come from the registry, which is the only source of truth.
//!
//! [`format_get`] is pure; [`serve`] is the tokio shell around it. The socket is mode 0600 (the
//! reply carries the private key, as it does for every WireGuard implementation).

use std::fmt::{self, Write as _};
use std::fs::{self, DirBuilder};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use zeroize::{Zeroize, Zeroizing};

/// Directory wireguard-tools looks in for userspace interfaces' sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Longest request line accepted; real ones are under 100 bytes.
const MAX_LINE: u64 = 4096;
/// Most lines in one request (a `set` may list many peers; we read and discard them).
const MAX_LINES: usize = 100_000;
/// How long a client may take to finish a request before it is disconnected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `errno` answered to `set=1` (EPERM): configuration comes from the registry.
const ERRNO_SET_REFUSED: i32 = 1;
/// `errno` answered to an unknown operation (EINVAL).
const ERRNO_INVALID: i32 = 22;

/// Path of the UAPI socket for `interface_name` (`/var/run/wireguard/waygate0.sock`).
pub fn socket_path(interface_name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface_name}.sock"))
}

/// The gateway's WireGuard state at one instant, as `wg show` presents it.
pub struct UapiSnapshot {
    /// The server's private key; zeroized when the snapshot is dropped.
    pub private_key: [u8; 32],
    /// UDP port the endpoint listens on.
    pub listen_port: u16,
    /// One entry per active device.
    pub peers: Vec<UapiPeer>,
}

impl Drop for UapiSnapshot {
    fn drop(&mut self) {
        self.private_key.zeroize();
    }
}

impl fmt::Debug for UapiSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UapiSnapshot")
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("peers", &self.peers)
            .finish()
    }
}

/// The snapshot the serving loop keeps for the socket, rebuilt only when a client asks for it:
/// building it walks every enrolled device (at 100,000 devices about 15 MB, and a pass over
/// the peer table), which once a second for nobody was the largest cost of idle devices.
pub struct SharedSnapshot {
    /// The key and port, and each shard's peers in its slot.
    snapshot: Mutex<(UapiSnapshot, Vec<Vec<UapiPeer>>)>,
    /// Per shard: a client waits for its peers.
    wanted: Vec<AtomicBool>,
    /// Per shard: bumped at each refresh.
    generation: Vec<AtomicU64>,
}

/// How long a client waits for the loops to refresh the snapshot before it gets the last one
/// (each loop looks once a second).
const REFRESH_WAIT: Duration = Duration::from_secs(2);

impl SharedSnapshot {
    /// Starts with `snapshot` (its peers count as the first shard's) for `shards` loops.
    pub fn new(mut snapshot: UapiSnapshot, shards: usize) -> Self {
        let shards = shards.max(1);
        let mut slots = vec![Vec::new(); shards];
        slots[0] = std::mem::take(&mut snapshot.peers);
        SharedSnapshot {
            snapshot: Mutex::new((snapshot, slots)),
            wanted: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            generation: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether a client waits for fresh peers of `shard`; its loop then calls
    /// [`Self::set_peers`]. Clears the request.
    pub fn take_wanted(&self, shard: usize) -> bool {
        self.wanted
            .get(shard)
            .is_some_and(|w| w.swap(false, Ordering::AcqRel))
    }

    /// Replaces `shard`'s peers and wakes the clients waiting for them.
    pub fn set_peers(&self, shard: usize, peers: Vec<UapiPeer>) {
        let mut s = self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = s.1.get_mut(shard) {
            *slot = peers;
        }
        if let Some(generation) = self.generation.get(shard) {
            generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A copy every shard refreshed since the call, or after [`REFRESH_WAIT`] the last one.
    async fn fresh(&self) -> UapiSnapshot {
        let before: Vec<u64> = self
            .generation
            .iter()
            .map(|g| g.load(Ordering::Acquire))
            .collect();
        for wanted in &self.wanted {
            wanted.store(true, Ordering::Release);
        }
        let deadline = tokio::time::Instant::now() + REFRESH_WAIT;
        while self
            .generation
            .iter()
            .zip(&before)
            .any(|(g, b)| g.load(Ordering::Acquire) == *b)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        UapiSnapshot {
            private_key: s.0.private_key,
            listen_port: s.0.listen_port,
            peers: s.1.concat(),
        }
    }
}

/// Where a `get` takes its snapshot from.
enum Source<F> {
    /// Made by the closure per request.
    Made(F),
    /// Asked of the serving loop.
    Shared(Arc<SharedSnapshot>),
}

impl<F: Fn() -> UapiSnapshot> Source<F> {
    async fn get(&self) -> UapiSnapshot {
        match self {
            Source::Made(f) => f(),
            Source::Shared(s) => s.fresh().await,
        }
    }
}

/// One peer (device) in a [`UapiSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UapiPeer {
    /// The device's public key.
    pub public_key: [u8; 32],
    /// Where its packets last came from.
    pub endpoint: Option<SocketAddr>,
    /// Its tunnel addresses (a /32 and a /128).
    pub allowed_ips: Vec<IpNet>,
    /// Time of the last completed handshake, since the UNIX epoch.
    pub last_handshake: Option<Duration>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds (0 = off).
    pub keepalive: u16,
}

/// The reply to `get=1`, ending in `errno=0` and a blank line.
pub fn format_get(snapshot: &UapiSnapshot) -> String {
    let mut s = String::with_capacity(128 + 320 * snapshot.peers.len());
    // Writing to a String cannot fail; the results are ignored for that reason.
    if snapshot.private_key != [0; 32] {
        let _ = writeln!(s, "private_key={}", Hex(&snapshot.private_key));
    }
    let _ = writeln!(s, "listen_port={}", snapshot.listen_port);
    for peer in &snapshot.peers {
        let _ = writeln!(s, "public_key={}", Hex(&peer.public_key));
        if let Some(endpoint) = peer.endpoint {
            // SocketAddr prints IPv6 as [addr]:port, which is what wg expects.
            let _ = writeln!(s, "endpoint={endpoint}");
        }
        for net in &peer.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
        let handshake = peer.last_handshake.unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", handshake.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", handshake.subsec_nanos());
        let _ = writeln!(s, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(s, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(s, "persistent_keepalive_interval={}", peer.keepalive);
        let _ = writeln!(s, "protocol_version=1");
    }
    s.push_str("errno=0\n\n");
    s
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Serves the UAPI on `path` until the future is dropped or accepting fails for good.
///
/// Creates the socket's directory if missing, replaces a stale socket (one nobody answers on)
/// but refuses to take over a live one or to remove anything that is not a socket. The socket
/// file is removed again when the future is dropped, unless another process replaced it.
pub async fn serve(
    path: PathBuf,
    snapshot: impl Fn() -> UapiSnapshot + Send + Sync + 'static,
) -> io::Result<()> {
    serve_from(path, Source::Made(snapshot)).await
}

/// [`serve`] with the snapshot the serving loop refreshes when asked.
pub async fn serve_shared(path: PathBuf, shared: Arc<SharedSnapshot>) -> io::Result<()> {
    serve_from(path, Source::Shared::<fn() -> UapiSnapshot>(shared)).await
}

async fn serve_from<F: Fn() -> UapiSnapshot + Send + Sync + 'static>(
    path: PathBuf,
    snapshot: Source<F>,
) -> io::Result<()> {
    let (listener, guard) = bind(&path)?;
    let snapshot = Arc::new(snapshot);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let snapshot = Arc::clone(&snapshot);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &*snapshot).await {
                        tracing::debug!(error = %e, "uapi client dropped");
                    }
                });
            }
            // Out of file descriptors or similar: transient, so back off instead of ending.
            Err(e) => {
                tracing::warn!(path = %guard.path.display(), error = %e, "uapi accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Removes the socket file on drop if it is still the one we bound.
struct SocketGuard {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.dev_ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn bind(path: &Path) -> io::Result<(UnixListener, SocketGuard)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a socket path", path.display()),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(|e| annotate(parent, e))?;
    remove_stale(path)?;

    // Bound inside a fresh 0700 directory and chmodded before being moved into place, so no
    // other user can connect in the moment between bind(2) and chmod(2).
    let staging = parent.join(format!(
        ".{}.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| annotate(&staging, e))?;
    let staged = staging.join("s");
    let result = (|| {
        let std_listener = std::os::unix::net::UnixListener::bind(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::rename(&staged, path)?;
        Ok(std_listener)
    })();
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&staging);
    let std_listener = result.map_err(|e| annotate(path, e))?;
    std_listener.set_nonblocking(true)?;
    let meta = fs::symlink_metadata(path).map_err(|e| annotate(path, e))?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
        dev_ino: (meta.dev(), meta.ino()),
    };
    Ok((UnixListener::from_std(std_listener)?, guard))
}

/// Removes `path` if it is a socket nobody listens on; errors if it is live or not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(annotate(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{}: exists and is not a socket; not removing it",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{}: another process is serving this interface (is another gateway or \
                 wireguard-go running with the same interface name?)",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => remove_if_there(path),
        // Gone since we looked: removed by whoever else found it stale.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(annotate(path, e)),
    }
}

/// Removes `path`; one already gone is fine. `wg show` unlinks a socket it cannot connect to,
/// so after a crash it can beat us to the stale one: a gateway restarted while the e2e harness
/// polled `wg show` failed to serve UAPI with "No such file or directory".
fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(annotate(path, e)),
        _ => Ok(()),
    }
}

fn annotate(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Answers requests on one connection until the client closes it.
async fn handle<F: Fn() -> UapiSnapshot>(
    stream: UnixStream,
    snapshot: &Source<F>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let Some(request) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut reader))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))??
        else {
            return Ok(());
        };
        let reply = match request {
            Op::Get => Zeroizing::new(format_get(&snapshot.get().await)),
            Op::Set => Zeroizing::new(format!("errno={ERRNO_SET_REFUSED}\n\n")),
            Op::Invalid => {
                write
                    .write_all(format!("errno={ERRNO_INVALID}\n\n").as_bytes())
                    .await?;
                return Ok(());
            }
        };
        write.write_all(reply.as_bytes()).await?;
    }
}

enum Op {
    Get,
    Set,
    Invalid,
}

/// Reads one request (lines up to a blank line); `None` at a clean end of stream.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> io::Result<Option<Op>> {
    let mut op = None;
    // Set requests carry keys; keep every line's bytes zeroized after use.
    let mut line = Zeroizing::new(String::new());
    for _ in 0..MAX_LINES {
        line.clear();
        let n = (&mut *reader).take(MAX_LINE).read_line(&mut line).await?;
        if n == 0 {
            return if op.is_none() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if !line.ends_with('\n') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        let text = line.trim_end_matches('\n');
        if text.is_empty() {
            return Ok(Some(op.unwrap_or(Op::Invalid)));
        }
        if op.is_none() {
            op = Some(match text {
                "get=1" => Op::Get,
                "set=1" => Op::Set,
                _ => Op::Invalid,
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "request too long",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::process::Command;

    fn snapshot() -> UapiSnapshot {
        UapiSnapshot {
            private_key: [0x11; 32],
            listen_port: 51820,
            peers: vec![
                UapiPeer {
                    public_key: [0xab; 32],
                    endpoint: Some("198.51.100.2:40000".parse().unwrap()),
                    allowed_ips: vec![
                        "100.96.0.2/32".parse().unwrap(),
                        "fd77:6761:7465::2/128".parse().unwrap(),
                    ],
                    last_handshake: Some(Duration::new(1_795_361_096, 500)),
                    rx_bytes: 1234,
                    tx_bytes: 5678,
                    keepalive: 0,
                },
                UapiPeer {
                    public_key: [0x01; 32],
                    endpoint: Some("[2001:db8::5]:51820".parse().unwrap()),
                    allowed_ips: vec!["100.96.0.3/32".parse().unwrap()],
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    keepalive: 25,
                },
                UapiPeer {
                    public_key: [0x02; 32],
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    keepalive: 0,
                },
            ],
        }
    }

    #[test]
    fn get_reply_is_exact() {
        let expected = format!(
            "private_key={}\nlisten_port=51820\n\
             public_key={}\nendpoint=198.51.100.2:40000\nallowed_ip=100.96.0.2/32\n\
             allowed_ip=fd77:6761:7465::2/128\nlast_handshake_time_sec=1795361096\n\
             last_handshake_time_nsec=500\nrx_bytes=1234\ntx_bytes=5678\n\
             persistent_keepalive_interval=0\nprotocol_version=1\n\
             public_key={}\nendpoint=[2001:db8::5]:51820\nallowed_ip=100.96.0.3/32\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\nrx_bytes=0\ntx_bytes=0\n\
             persistent_keepalive_interval=25\nprotocol_version=1\n\
             public_key={}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             rx_bytes=0\ntx_bytes=0\npersistent_keepalive_interval=0\nprotocol_version=1\n\
             errno=0\n\n",
            "11".repeat(32),
            "ab".repeat(32),
            "01".repeat(32),
            "02".repeat(32),
        );
        assert_eq!(format_get(&snapshot()), expected);
    }

    #[test]
    fn empty_device_and_redacted_debug() {
        let s = UapiSnapshot {
            private_key: [0; 32],
            listen_port: 1,
            peers: vec![],
        };
        assert_eq!(format_get(&s), "listen_port=1\nerrno=0\n\n");
        let debug = format!("{:?}", snapshot());
        assert!(!debug.contains("17, 17"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }

    async fn request(stream: &mut BufReader<UnixStream>, req: &str) -> String {
        stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = stream.read_line(&mut line).await.unwrap();
            assert!(n > 0, "server closed early after {reply:?}");
            reply.push_str(&line);
            if line == "\n" {
                return reply;
            }
        }
    }

    fn parse(reply: &str) -> Vec<(String, String)> {
        reply
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("key=value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn server_answers_get_and_refuses_set() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run").join("wgtest0.sock");
        let server = tokio::spawn(serve(path.clone(), snapshot));
        let mut stream = connect(&path).await;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let reply = request(&mut stream, "get=1\n\n").await;
        let kv = parse(&reply);
        assert_eq!(kv.first().unwrap().0, "private_key");
        assert_eq!(kv.last().unwrap(), &("errno".to_string(), "0".to_string()));
        let keys: HashMap<_, _> = kv.iter().cloned().collect();
        assert_eq!(keys["listen_port"], "51820");
        assert_eq!(kv.iter().filter(|(k, _)| k == "public_key").count(), 3);
        assert_eq!(kv.iter().filter(|(k, _)| k == "allowed_ip").count(), 3);

        // Same connection, several requests, like wireguard-go allows.
        let reply = request(&mut stream, "set=1\nprivate_key=00\nlisten_port=1\n\n").await;
        assert_eq!(reply, "errno=1\n\n");
        let again = request(&mut stream, "get=1\n\n").await;
        assert_eq!(again, format_get(&snapshot()));

        // Nonsense gets EINVAL and the connection is closed.
        let reply = request(&mut stream, "hello\n\n").await;
        assert_eq!(reply, "errno=22\n\n");
        let mut rest = String::new();
        assert_eq!(stream.read_line(&mut rest).await.unwrap(), 0);

        server.abort();
        let _ = server.await;
        assert!(!path.exists(), "socket removed when the server stops");
    }

    #[tokio::test]
    async fn a_shared_snapshot_is_refreshed_when_a_client_asks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("shared.sock");
        let mut first = snapshot();
        first.peers.truncate(1);
        let shared = Arc::new(SharedSnapshot::new(first, 1));
        let server = tokio::spawn(serve_shared(path.clone(), shared.clone()));
        let mut stream = connect(&path).await;
        assert!(!shared.take_wanted(0), "nobody asked yet");
        // The loop's part: refresh when asked.
        let refresher = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while !shared.take_wanted(0) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                shared.set_peers(0, snapshot().peers.clone());
            })
        };
        let reply = request(&mut stream, "get=1\n\n").await;
        assert_eq!(reply, format_get(&snapshot()), "the refreshed peers");
        refresher.await.unwrap();
        // Nobody refreshes: after the wait, the last snapshot.
        let reply = request(&mut stream, "get=1\n\n").await;
        assert_eq!(reply, format_get(&snapshot()));
        server.abort();
        let _ = server.await;
    }

    async fn connect(path: &Path) -> BufReader<UnixStream> {
        for _ in 0..200 {
            if let Ok(s) = UnixStream::connect(path).await {
                return BufReader::new(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server never came up at {}", path.display());
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_socket_and_files_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file behind");
        let server = tokio::spawn(serve(path.clone(), snapshot));
        let mut stream = connect(&path).await;
        assert!(request(&mut stream, "get=1\n\n")
            .await
            .ends_with("errno=0\n\n"));

        let err = serve(path.clone(), snapshot).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(request(&mut stream, "get=1\n\n")
            .await
            .ends_with("errno=0\n\n"));
        server.abort();
        let _ = server.await;

        let file = tmp.path().join("file.sock");
        fs::write(&file, "keep me").unwrap();
        let err = serve(file.clone(), snapshot).await.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
    }

    #[test]
    fn a_stale_socket_someone_else_removed_first_is_no_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("gone.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        // `wg show` found it stale first and unlinked it.
        fs::remove_file(&path).unwrap();
        remove_if_there(&path).unwrap();
        // Other failures still count: a path under a regular file.
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let err = remove_if_there(&file.join("s.sock")).unwrap_err();
        assert!(err.to_string().contains("s.sock"), "{err}");
    }

    /// The real `wg show` against our socket. Needs root (wg only looks in /var/run/wireguard).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wg_show_parses_our_reply() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to bind in {SOCKET_DIR}");
            return;
        }
        let name = format!("wgt{}", std::process::id() % 100_000);
        let path = socket_path(&name);
        let server = tokio::spawn(serve(path.clone(), snapshot));
        drop(connect(&path).await);
        let out = tokio::task::spawn_blocking(move || {
            Command::new("wg")
                .args(["show", &name, "dump"])
                .output()
                .expect("the `wg` binary (wireguard-tools) must be installed")
        })
        .await
        .unwrap();
        server.abort();
        let _ = server.await;
        assert!(!path.exists());
        assert!(
            out.status.success(),
            "wg show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(lines.len(), 4, "{dump}");
        use base64::Engine;
        let b64 = |b: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(b);
        // Interface: private key, public key, listen port, fwmark.
        assert_eq!(lines[0][0], b64([0x11; 32]));
        assert_eq!(lines[0][2], "51820");
        // Peer: public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive.
        assert_eq!(lines[1][0], b64([0xab; 32]));
        assert_eq!(lines[1][2], "198.51.100.2:40000");
        assert_eq!(lines[1][3], "100.96.0.2/32,fd77:6761:7465::2/128");
        assert_eq!(lines[1][4], "1795361096");
        assert_eq!(lines[1][5], "1234");
        assert_eq!(lines[1][6], "5678");
        assert_eq!(lines[1][7], "off");
        assert_eq!(lines[2][2], "[2001:db8::5]:51820");
        assert_eq!(lines[2][7], "25");
        assert_eq!(lines[3][2], "(none)");
    }
}
