//! Pooled upstream connections, shared by every inspected device connection of one inspector.
//!
//! An HTTP/1.1 connection to an origin goes back to the pool once a response has ended whole and
//! serves the next request of any device connection with the same [`Key`]; an HTTP/2 one stays
//! in the pool while device connections send on clones of it. So an idle device connection holds
//! no upstream connection of its own, and a new device connection to a busy origin skips the
//! upstream TCP and TLS handshakes. hyper-util's legacy `Client` pools by the URI's scheme and
//! authority only, with no total bound and no way to carry the per-connection facts the rules
//! need (the origin's certificate verdict, its ALPN and RFC 8441 setting), hence this small pool
//! over hyper's connection handles, after the same model (idle timeout, LIFO reuse, h2 shared).
//!
//! Never pooled: CONNECT tunnels of the explicit proxy and its absolute-URI requests, HTTP/1.1
//! upgrades (WebSockets: a fresh connection that ends with the tunnel) and Do Not Inspect or
//! passed-through flows, which splice a TCP connection of their own.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::Counted;

/// Idle upstream connections kept, all origins together: Chromium's socket pool holds at most
/// 256 sockets in all, so a browser never keeps more idle; an idle entry (a socket, a rustls
/// client session, hyper's two 8 KiB buffers and its request queue) is about 35 KiB by the
/// session-12 heaptrack breakdown, so a full pool stays under ~9 MiB.
pub const MAX_IDLE: usize = 256;
/// How long an idle upstream connection is kept: under the keep-alive timeouts common origins
/// give (nginx 75 s, most CDNs 60 s or more), so the origin rarely closes one under us (a
/// request on one that it did close is retried on a fresh connection), and short enough that a
/// burst's connections are gone half a minute after it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What makes two upstream connections interchangeable. The upstream TLS verification settings
/// (`http.upstream_ca` and the host's roots) are the inspector's, one per pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The origin's address and port.
    pub dst: SocketAddr,
    /// The egress address the connection leaves from.
    pub bind: Option<IpAddr>,
    /// The virtual network route it takes (opaque: equal values leave the same way).
    pub via: Option<u64>,
    /// For TLS: the name sent (SNI, or the address) and verified, and whether h2 was offered
    /// in the ALPN; `None` for plain HTTP.
    pub tls: Option<(Arc<str>, bool)>,
}

impl Key {
    /// Whether `self` leaves the same way to the same origin as `dst`, `bind`, `via`.
    fn same_route(&self, dst: SocketAddr, bind: Option<IpAddr>, via: Option<u64>) -> bool {
        self.dst == dst && self.bind == bind && self.via == via
    }
}

/// What the connection to an origin learned, kept with it for the device connections that
/// reuse it.
#[derive(Debug, Default)]
pub struct OriginFacts {
    /// The origin chose h2.
    pub h2: bool,
    /// The origin accepts RFC 8441 extended CONNECT (h2 SETTINGS_ENABLE_CONNECT_PROTOCOL).
    pub extended_connect: bool,
    /// Why the origin's certificate failed verification, if it did.
    pub cert_error: Option<String>,
    /// The TLS version spoken with the origin.
    pub version: Option<String>,
}

/// A client handle on an upstream connection.
#[derive(Debug)]
pub enum Sender {
    /// HTTP/1.1: one request at a time, the handle goes where the connection goes.
    H1(hyper::client::conn::http1::SendRequest<Counted>),
    /// HTTP/2: shared, each request on a clone.
    H2(hyper::client::conn::http2::SendRequest<Counted>),
}

impl Sender {
    /// Whether the connection is gone (the origin closed it, or it failed).
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// A handle on the same connection when it can be shared (HTTP/2).
    pub fn share(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }
}

struct Idle {
    key: Key,
    sender: Sender,
    facts: Arc<OriginFacts>,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    /// Oldest first.
    idle: VecDeque<Idle>,
    /// A task is expiring entries.
    reaping: bool,
}

/// Idle upstream connections, bounded in number and age.
pub struct Pool {
    inner: Mutex<Inner>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.len())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool keeping at most `max_idle` connections, each for at most `idle_timeout` idle.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            inner: Mutex::default(),
            max_idle,
            idle_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent queue: keep using it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops what expired or closed.
    fn prune(&self, inner: &mut Inner, now: Instant) {
        let timeout = self.idle_timeout;
        inner
            .idle
            .retain(|e| !e.sender.is_closed() && now.duration_since(e.since) < timeout);
    }

    /// A live connection for `key`: an HTTP/1.1 one leaves the pool (the most recently used,
    /// so the others age out), an HTTP/2 one stays and a clone is handed out.
    pub fn take(&self, key: &Key) -> Option<(Sender, Arc<OriginFacts>)> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.prune(&mut inner, now);
        let at = inner.idle.iter().rposition(|e| &e.key == key)?;
        if let Some(entry) = inner.idle.get_mut(at) {
            if let Some(shared) = entry.sender.share() {
                entry.since = now;
                return Some((shared, entry.facts.clone()));
            }
        }
        inner.idle.remove(at).map(|e| (e.sender, e.facts))
    }

    /// Whether a live connection leaves from `bind` by `via` to `dst`, whatever its name: the
    /// origin answered on it, so a new device connection to it may be answered.
    pub fn reaches(&self, dst: SocketAddr, bind: Option<IpAddr>, via: Option<u64>) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        self.prune(&mut inner, now);
        inner.idle.iter().any(|e| e.key.same_route(dst, bind, via))
    }

    /// Keeps `sender` for `key`, dropping the oldest entry when full.
    pub fn put(self: &Arc<Self>, key: Key, sender: Sender, facts: Arc<OriginFacts>) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        self.prune(&mut inner, now);
        while inner.idle.len() >= self.max_idle {
            inner.idle.pop_front();
        }
        inner.idle.push_back(Idle {
            key,
            sender,
            facts,
            since: now,
        });
        if !inner.reaping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                inner.reaping = true;
                runtime.spawn(reap(self.clone()));
            }
        }
    }

    /// Idle connections now.
    pub fn len(&self) -> usize {
        self.lock().idle.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes idle connections as they expire, so an idle pool does not keep them past the
/// timeout; ends when the pool is empty (the next `put` starts another).
async fn reap(pool: Arc<Pool>) {
    loop {
        let next = {
            let mut inner = pool.lock();
            pool.prune(&mut inner, Instant::now());
            match inner.idle.iter().map(|e| e.since).min() {
                Some(oldest) => oldest + pool.idle_timeout,
                None => {
                    inner.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// An HTTP/1.1 handle on an in-memory connection, and the far end (dropping it closes).
    async fn h1() -> (Sender, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        (Sender::H1(send), theirs)
    }

    fn key(port: u16, name: &str) -> Key {
        Key {
            dst: SocketAddr::from(([192, 0, 2, 1], port)),
            bind: None,
            via: None,
            tls: Some((name.into(), false)),
        }
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_its_bound_dropping_the_oldest() {
        let pool = Pool::new(2, IDLE_TIMEOUT);
        let mut ends = Vec::new();
        for port in [1, 2, 3] {
            let (sender, end) = h1().await;
            ends.push(end);
            pool.put(key(port, "a.example"), sender, Arc::default());
        }
        assert_eq!(pool.len(), 2);
        assert!(pool.take(&key(1, "a.example")).is_none(), "the oldest went");
        assert!(pool.take(&key(3, "a.example")).is_some());
        assert!(
            pool.take(&key(3, "a.example")).is_none(),
            "an HTTP/1.1 connection leaves the pool when taken"
        );
        assert!(pool.take(&key(2, "b.example")).is_none(), "another name");
        assert!(pool.take(&key(2, "a.example")).is_some());
        assert!(pool.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_and_are_closed_without_a_caller() {
        let pool = Pool::new(MAX_IDLE, IDLE_TIMEOUT);
        let (sender, _end) = h1().await;
        pool.put(key(1, "a.example"), sender, Arc::default());
        let dst = key(1, "a.example").dst;
        tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(pool.reaches(dst, None, None), "still fresh");
        assert!(
            !pool.reaches(dst, Some([10, 0, 0, 1].into()), None),
            "another egress"
        );
        assert!(!pool.reaches(dst, None, Some(7)), "another route");
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Nothing asked the pool since: the reaper dropped it.
        assert_eq!(pool.len(), 0);
        assert!(pool.take(&key(1, "a.example")).is_none());
    }

    #[tokio::test]
    async fn a_connection_the_origin_closed_is_never_handed_out() {
        let pool = Pool::new(MAX_IDLE, IDLE_TIMEOUT);
        let (sender, end) = h1().await;
        pool.put(key(1, "a.example"), sender, Arc::default());
        drop(end);
        // hyper's connection task sees the end and closes the handle.
        for _ in 0..100 {
            if !pool.reaches(key(1, "a.example").dst, None, None) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pool.take(&key(1, "a.example")).is_none());
        assert!(pool.is_empty());
    }
}
