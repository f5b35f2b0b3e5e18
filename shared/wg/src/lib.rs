//! The WireGuard endpoint: many peers behind one UDP socket, sans I/O.
//!
//! Input: datagrams from the socket ([`Endpoint::handle_datagram`]) and IP packets for a peer
//! ([`Endpoint::encapsulate`]). Output: datagrams appended to a [`TransmitQueue`] and decrypted IP
//! packets returned to the caller. A handshake initiation is matched to its peer by the initiator's
//! static key (boringtun's anonymous handshake parsing); every later message by receiver index.
//! Cryptokey routing: a decrypted packet whose source is not the peer's own tunnel address is
//! dropped.
//!
//! Before a handshake message costs any X25519 work it passes, in order: for an initiation, the
//! replay check of [`replay::RecentInitiations`] (its MAC1 is not one of an initiation opened
//! lately); its MAC1; its cookie
//! (MAC2), checked whenever present; the per-source buckets of [`SourceLimiter`] (a cookie-proven
//! source beyond 20/s is dropped, an unproven one is answered with a cookie); and the global
//! threshold [`HANDSHAKE_RATE_LIMIT`] (beyond it, every unproven message gets a cookie). Linux
//! checks cookies and per-source rates only under load; checking them always means a source that
//! answered a cookie once cannot spend the global budget and put every new device behind a
//! cookie round trip (wireguard-go retries 5 s after a cookie).
//!
//! boringtun's `Tunn` reads its own clock for session timers; the runtime calls
//! [`Endpoint::update_timers`] every [`TIMER_TICK`]. boringtun logs timer events (REKEY_TIMEOUT,
//! CONNECTION_EXPIRED) without naming the peer; they run inside the peer's span, so they do.

#![deny(missing_docs)]

pub mod handshake_limit;
pub mod initiation;
pub mod initiator;
pub mod replay;
pub mod shard;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod transmit;

use rustc_hash::FxHashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, SharedSecret, StaticSecret};

use crate::handshake_limit::SourceLimiter;
use crate::initiation::Timestamp;
use crate::shard::Shard;
use crate::transmit::TransmitQueue;

/// How often the runtime should call [`Endpoint::update_timers`].
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake messages per second that may go on to X25519 work before every message without a
/// valid cookie is answered with one (boringtun's usual figure). Counted here, once per message:
/// boringtun's own limiter counted each initiation twice (once here, once inside `Tunn`).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Size of a cookie reply.
const COOKIE_REPLY_LEN: usize = 64;
/// Bytes WireGuard adds around an IP packet (header, counter, tag).
pub const OVERHEAD: usize = 32;
/// Size of a handshake initiation, the largest control message.
const HANDSHAKE_INIT_LEN: usize = 148;
/// Where an initiation's MAC1 lies.
const INIT_MAC1: std::ops::Range<usize> = 116..132;
/// Tunnel indices are 24 bits: boringtun keeps the low 8 bits for its session ring.
const INDEX_MASK: u32 = 0x00FF_FFFF;
/// WireGuard's message type of transport data.
const DATA_TYPE: u8 = 4;
/// WireGuard's message type of a handshake response.
const HANDSHAKE_RESPONSE_TYPE: u8 = 2;

pub use waygate_model::PeerId;

/// Why a datagram or a decrypted packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a WireGuard message (wrong type or length).
    Malformed,
    /// Handshake MAC did not verify.
    BadMac,
    /// Under load and no valid cookie: a cookie reply was sent or nothing could be done.
    UnderLoad,
    /// Handshake from a key that is not enrolled (or was revoked).
    UnknownPeer,
    /// Message for a receiver index nobody holds.
    UnknownIndex,
    /// Handshake failed to decrypt or was replayed.
    BadHandshake,
    /// Data failed to decrypt, was replayed or had no session.
    BadData,
    /// Decrypted packet is not a valid IP packet.
    BadInnerPacket,
    /// Decrypted packet's source is not the peer's tunnel address.
    SpoofedSource,
    /// Handshake with a valid cookie from a source over its rate ([`SourceLimiter`]).
    SourceLimited,
    /// Initiation with the MAC1 of one opened lately: a replay, dropped before X25519 work
    /// ([`replay::RecentInitiations`]).
    ReplayedInitiation,
}

impl DropReason {
    /// Every reason, for counters and reports.
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::BadMac,
        DropReason::UnderLoad,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::BadHandshake,
        DropReason::BadData,
        DropReason::BadInnerPacket,
        DropReason::SpoofedSource,
        DropReason::SourceLimited,
        DropReason::ReplayedInitiation,
    ];

    fn from_wg(err: &WireGuardError) -> DropReason {
        match err {
            WireGuardError::InvalidMac => DropReason::BadMac,
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            WireGuardError::InvalidPacket
            | WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType => DropReason::Malformed,
            WireGuardError::WrongKey
            | WireGuardError::InvalidTai64nTimestamp
            | WireGuardError::WrongTai64nTimestamp
            | WireGuardError::UnexpectedPacket => DropReason::BadHandshake,
            _ => DropReason::BadData,
        }
    }
}

/// Counts of dropped datagrams and packets, by reason.
#[derive(Debug, Default, Clone)]
pub struct DropCounters {
    counts: [u64; DropReason::ALL.len()],
}

impl DropCounters {
    /// Adds one drop.
    pub fn add(&mut self, reason: DropReason) {
        self.counts[reason as usize] += 1;
    }

    /// Drops counted for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason as usize]
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What went through the tunnels since the start, all peers together (peers that were removed
/// included), for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// IP packets decrypted from devices.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// IP packets encrypted for devices.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Handshakes completed: initiations answered, and responses to ours accepted.
    pub handshakes: u64,
}

/// The result of one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'b> {
    /// Nothing for the tunnel (handshake, keepalive, cookie); replies, if any, are queued.
    Nothing,
    /// A decrypted IP packet from `peer`, source address verified.
    Packet {
        /// The sending peer.
        peer: PeerId,
        /// The IP packet.
        packet: &'b [u8],
    },
    /// Dropped, and counted.
    Dropped(DropReason),
    /// For a peer of another shard: the caller passes it to that shard's
    /// [`Endpoint::handle_handoff`].
    Handoff(Handoff),
}

/// A datagram for a peer another shard owns ([`shard`]): an initiation the kernel spread to
/// this shard by its hash, or a message that reached the wrong socket (while the sockets were
/// being bound, or GRO put it behind another's header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The shard that owns the peer.
    pub shard: u32,
    /// The datagram's source.
    pub from: SocketAddr,
    /// The datagram.
    pub datagram: Vec<u8>,
    /// An initiation as this shard opened it (and admitted it: the owner does not count it
    /// against its handshake budget again).
    opened: Option<initiation::Detached>,
}

/// Where [`Endpoint::route`] sends a datagram.
enum Routed {
    /// Fully handled here (a cookie reply was queued).
    Done,
    /// For this peer; for an initiation, what opening it found.
    Peer(PeerId, Option<Initiation>),
    /// For a peer of this shard (with what opening an initiation found).
    Elsewhere(u32, Option<initiation::Detached>),
}

/// What the endpoint knows about a peer, for `wg show` and logs.
#[derive(Debug, Clone)]
pub struct PeerStats {
    /// Static public key.
    pub public_key: [u8; 32],
    /// Last authenticated source address.
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake.
    pub since_handshake: Option<Duration>,
    /// Bytes received (decrypted payload).
    pub rx_bytes: u64,
    /// Bytes sent (payload before encryption).
    pub tx_bytes: u64,
}

/// An enrolled peer. Small on purpose (about a hundred bytes): every enrolled device has one,
/// connected or not; the session state lives in [`Session`] only while the peer is active.
struct Peer<T> {
    public_key: [u8; 32],
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    endpoint: Option<SocketAddr>,
    data: T,
    /// The timestamp of the last initiation accepted from this peer: a new `Tunn` knows none,
    /// so this is what refuses an older initiation replayed after the session was dropped.
    last_initiation: Timestamp,
    /// Payload bytes of the sessions dropped so far, so the counters stay monotonic.
    rx_bytes: u64,
    tx_bytes: u64,
}

/// A peer's WireGuard state while it is active: created at its first authenticated
/// initiation (or when the gateway reaches out), dropped after [`SESSION_IDLE_DROP`].
struct Session {
    /// Measured: a `Tunn` with its span is about 14 KB (10,000 idle enrolled devices held
    /// 150 MB RSS when every peer had one).
    tunn: Tunn,
    /// `DH(our static, the peer's static)`, for reading its initiations' timestamps.
    static_shared: [u8; 32],
    /// The last authenticated datagram from the peer, or the session's creation (`None`:
    /// created before the caller gave any time; the next timer tick sets it).
    last_heard: Option<Instant>,
    /// Entered around boringtun calls that may log, so its lines name the device.
    span: tracing::Span,
}

/// An authenticated initiation newer than the last accepted one, as `route` opened it.
struct Initiation {
    timestamp: Timestamp,
    /// `DH(our static, the peer's static)` when the peer has no session yet, for its `Tunn`.
    new_static: Option<SharedSecret>,
    /// The initiator's ephemeral key and `DH(our static, it)` (`None` after a handoff).
    ephemeral: [u8; 32],
    ephemeral_shared: Option<SharedSecret>,
}

/// How long a session lives without an authenticated datagram from its peer: three times
/// boringtun's REJECT_AFTER_TIME (180 s), after which no key of it can be used anyway and
/// boringtun has cleared its sessions itself.
pub const SESSION_IDLE_DROP: Duration = Duration::from_secs(540);

/// The WireGuard endpoint. `T` is what the caller attaches to each peer (the device).
pub struct Endpoint<T> {
    private: StaticSecret,
    public: PublicKey,
    /// Checks MAC2 on every handshake message and makes cookie replies (limit 0: "always under
    /// load" is the only way boringtun's limiter checks MAC2).
    cookies: RateLimiter,
    /// Given to every `Tunn`, which checks MAC1 again; the load decision is ours (never under
    /// load).
    mac1_only: Arc<RateLimiter>,
    sources: SourceLimiter,
    /// MAC1s of initiations opened lately, to drop their replays first.
    recent_initiations: replay::RecentInitiations,
    /// Handshake messages let through to X25519 work since `window_start`.
    handshakes: u64,
    window_start: Option<Instant>,
    // Fx: the keys are indices this endpoint handed out and keys the admin enrolled, never
    // chosen by a remote party, and every datagram costs a lookup.
    peers: FxHashMap<PeerId, Peer<T>>,
    /// Boxed: most peers have none, and the map's spare capacity stays small.
    sessions: FxHashMap<PeerId, Box<Session>>,
    by_key: FxHashMap<[u8; 32], PeerId>,
    /// Makes a peer's span when its session is created.
    span_for: fn(&T) -> tracing::Span,
    next_index: u32,
    /// Which peers are this endpoint's, and the ids it hands out.
    shard: Shard,
    /// The latest `now` the caller gave, for sessions the caller's packets create.
    clock: Option<Instant>,
    drops: DropCounters,
    traffic: Traffic,
}

fn no_span<T>(_: &T) -> tracing::Span {
    tracing::Span::none()
}

impl<T> Endpoint<T> {
    /// An endpoint with the server's private key and no peers.
    pub fn new(private_key: [u8; 32]) -> Self {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Endpoint {
            cookies: RateLimiter::new(&public, 0),
            mac1_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            sources: SourceLimiter::default(),
            recent_initiations: replay::RecentInitiations::default(),
            handshakes: 0,
            window_start: None,
            private,
            public,
            peers: FxHashMap::default(),
            sessions: FxHashMap::default(),
            by_key: FxHashMap::default(),
            span_for: no_span::<T>,
            next_index: 1,
            shard: Shard::default(),
            clock: None,
            drops: DropCounters::default(),
            traffic: Traffic::default(),
        }
    }

    /// Sets how a peer's span is made (it wraps boringtun's calls for the peer, so their log
    /// lines name it); made when the peer's session is.
    pub fn with_spans(mut self, span_for: fn(&T) -> tracing::Span) -> Self {
        self.span_for = span_for;
        self
    }

    /// Makes this endpoint one of several shards: it hands out only ids of its shard, and
    /// hands datagrams of other shards' peers back ([`Received::Handoff`]). Set before adding
    /// peers.
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// This endpoint's shard.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The server's public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Adds a peer, or updates the addresses and data of an existing one without touching its
    /// session. Returns its id. An added peer costs its entry only until its first handshake.
    pub fn upsert_peer(
        &mut self,
        public_key: [u8; 32],
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
        data: T,
    ) -> PeerId {
        if let Some(&id) = self.by_key.get(&public_key) {
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.ipv4 = ipv4;
                peer.ipv6 = ipv6;
                peer.data = data;
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.span = (self.span_for)(&peer.data);
                }
                return id;
            }
        }
        let id = self.allocate_index();
        self.peers.insert(
            id,
            Peer {
                public_key,
                ipv4,
                ipv6,
                endpoint: None,
                data,
                last_initiation: [0; 12],
                rx_bytes: 0,
                tx_bytes: 0,
            },
        );
        self.by_key.insert(public_key, id);
        id
    }

    /// Peers with a live session (a `Tunn`).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Creates the session of `id` if it has none, with `DH(our static, its static)` when the
    /// caller has it. False: no such peer.
    fn ensure_session(
        &mut self,
        id: PeerId,
        now: Option<Instant>,
        static_shared: Option<SharedSecret>,
    ) -> bool {
        let Some(peer) = self.peers.get(&id) else {
            return false;
        };
        self.sessions.entry(id).or_insert_with(|| {
            let span = (self.span_for)(&peer.data);
            let static_shared = static_shared
                .unwrap_or_else(|| initiation::static_shared(&self.private, &peer.public_key));
            let cached = static_shared.to_bytes();
            let tunn = {
                let _in_span = span.enter();
                // Our public key and the static DH given, not computed again: two X25519 of
                // the eight a first handshake cost.
                Tunn::with_keys(
                    self.private.clone(),
                    self.public,
                    PublicKey::from(peer.public_key),
                    Some(static_shared),
                    None,
                    None,
                    id,
                    Some(self.mac1_only.clone()),
                )
            };
            Box::new(Session {
                tunn,
                static_shared: cached,
                last_heard: now,
                span,
            })
        });
        true
    }

    /// Removes a peer; its sessions end at once. Returns its data.
    pub fn remove_peer(&mut self, public_key: &[u8; 32]) -> Option<(PeerId, T)> {
        let id = self.by_key.remove(public_key)?;
        self.sessions.remove(&id);
        self.peers.remove(&id).map(|p| (id, p.data))
    }

    /// The peer with this key.
    pub fn peer_by_key(&self, public_key: &[u8; 32]) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    /// The data attached to a peer.
    pub fn peer_data(&self, id: PeerId) -> Option<&T> {
        self.peers.get(&id).map(|p| &p.data)
    }

    /// The peer's last authenticated source address.
    pub fn peer_endpoint(&self, id: PeerId) -> Option<SocketAddr> {
        self.peers.get(&id).and_then(|p| p.endpoint)
    }

    /// Starts a handshake with a peer that has not reached us since we started, at the address
    /// it was last seen at (a restart): the peer answers and its session is back at once,
    /// instead of when its own retry notices the old session is gone. The address stays the
    /// peer's endpoint until an authenticated datagram says otherwise, so boringtun's handshake
    /// retries go there too. False when the peer is unknown or has been heard from already.
    pub fn resume(&mut self, peer: PeerId, at: SocketAddr, tx: &mut TransmitQueue) -> bool {
        if self.peers.get(&peer).is_none_or(|p| p.endpoint.is_some()) {
            return false;
        }
        let now = self.clock;
        if !self.ensure_session(peer, now, None) {
            return false;
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return false;
        };
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        let _in_span = s.span.enter();
        let sent = match s.tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(init) => {
                tx.push(at, init);
                true
            }
            _ => false,
        };
        if let (true, Some(p)) = (sent, self.peers.get_mut(&peer)) {
            p.endpoint = Some(at);
        }
        sent
    }

    /// Ids and keys of every peer.
    pub fn peer_keys(&self) -> impl Iterator<Item = (PeerId, &[u8; 32])> {
        self.peers.iter().map(|(id, p)| (*id, &p.public_key))
    }

    /// Statistics of every peer (walks every enrolled device: for `wg show`, not per tick).
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .iter()
            .map(|(id, p)| Self::peer_stats(p, self.sessions.get(id).map(|s| &**s)))
            .collect()
    }

    /// Statistics of the peers with a live session, the only ones that can have completed a
    /// handshake lately: a walk over the active devices, not the enrolled ones.
    pub fn active_stats(&self) -> impl Iterator<Item = (PeerId, PeerStats)> + '_ {
        self.sessions.iter().filter_map(|(id, s)| {
            let p = self.peers.get(id)?;
            Some((*id, Self::peer_stats(p, Some(s))))
        })
    }

    fn peer_stats(p: &Peer<T>, session: Option<&Session>) -> PeerStats {
        let (since_handshake, tx, rx) = match session {
            Some(s) => {
                let (since, tx, rx, _, _) = s.tunn.stats();
                (since, tx as u64, rx as u64)
            }
            None => (None, 0, 0),
        };
        PeerStats {
            public_key: p.public_key,
            endpoint: p.endpoint,
            since_handshake,
            rx_bytes: p.rx_bytes + rx,
            tx_bytes: p.tx_bytes + tx,
        }
    }

    /// Enrolled peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Packets, bytes and handshakes since the start.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Drop counters.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Handshake messages the per-source limit stopped since the start: dropped
    /// ([`DropReason::SourceLimited`]) or answered with a cookie (part of
    /// [`DropReason::UnderLoad`]).
    pub fn handshakes_limited(&self) -> u64 {
        self.sources.limited()
    }

    fn allocate_index(&mut self) -> PeerId {
        loop {
            let id = self.next_index & INDEX_MASK;
            self.next_index = self.next_index.wrapping_add(1);
            // Ids of this shard only: `id % count == index` is what steers the peer's
            // datagrams here (ids of other shards are skipped; 2^24 / count stay).
            if id != 0 && self.shard.owns_id(id) && !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    /// Handles one datagram from `from`, received at `now`. Replies (handshake responses,
    /// cookies) go to `tx`; a decrypted packet is written into `scratch` and returned.
    ///
    /// # Panics
    /// If `scratch` is shorter than `datagram` (size it [`crate::transmit::MAX_DATAGRAM`]).
    pub fn handle_datagram<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        scratch: &'b mut [u8],
        tx: &mut TransmitQueue,
    ) -> Received<'b> {
        self.receive(from, datagram, None, now, scratch, tx)
    }

    /// Handles a datagram another shard handed over ([`Received::Handoff`]), like
    /// [`Endpoint::handle_datagram`].
    ///
    /// # Panics
    /// If `scratch` is shorter than the datagram.
    pub fn handle_handoff<'b>(
        &mut self,
        handoff: &Handoff,
        now: Instant,
        scratch: &'b mut [u8],
        tx: &mut TransmitQueue,
    ) -> Received<'b> {
        let opened = handoff.opened.as_ref();
        self.receive(handoff.from, &handoff.datagram, opened, now, scratch, tx)
    }

    fn receive<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        opened: Option<&initiation::Detached>,
        now: Instant,
        scratch: &'b mut [u8],
        tx: &mut TransmitQueue,
    ) -> Received<'b> {
        assert!(scratch.len() >= datagram.len().max(HANDSHAKE_INIT_LEN));
        self.clock = Some(now);
        let (id, initiation) = match self.route(from, datagram, opened, now, tx) {
            Ok(Routed::Peer(id, initiation)) => (id, initiation),
            Ok(Routed::Done) => return Received::Nothing,
            Ok(Routed::Elsewhere(shard, opened)) => {
                return Received::Handoff(Handoff {
                    shard,
                    from,
                    datagram: datagram.to_vec(),
                    opened,
                })
            }
            Err(reason) => return self.drop(reason),
        };
        let mut timestamp = None;
        let mut hint = None;
        if let Some(init) = initiation {
            // An authenticated, fresh initiation: the peer is active from now on.
            self.ensure_session(id, Some(now), init.new_static);
            timestamp = Some(init.timestamp);
            hint = init.ephemeral_shared.map(|shared| (init.ephemeral, shared));
        }
        let (Some(peer), Some(session)) = (self.peers.get_mut(&id), self.sessions.get_mut(&id))
        else {
            return self.drop(DropReason::UnknownIndex);
        };
        if let Some((ephemeral, shared)) = hint {
            // The X25519 that found the peer, not done again inside boringtun.
            session.tunn.hint_initiation_dh(ephemeral, shared);
        }
        // Data messages are most of the traffic and boringtun logs nothing worth naming for them.
        let in_span = (datagram.first() != Some(&DATA_TYPE)).then(|| session.span.enter());
        // The decrypted packet always starts at scratch[0]; remember only its length so the
        // borrow of `scratch` ends here and other arms can reuse it.
        let outcome = match session.tunn.decapsulate(Some(from.ip()), datagram, scratch) {
            TunnResult::Done => Ok(None),
            TunnResult::WriteToNetwork(reply) => {
                tx.push(from, reply);
                Err(None)
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                if src == peer.ipv4 {
                    Ok(Some(packet.len()))
                } else {
                    Err(Some(DropReason::SpoofedSource))
                }
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                if src == peer.ipv6 {
                    Ok(Some(packet.len()))
                } else {
                    Err(Some(DropReason::SpoofedSource))
                }
            }
            TunnResult::Err(WireGuardError::InvalidPacket) => Err(Some(DropReason::BadInnerPacket)),
            TunnResult::Err(e) => Err(Some(DropReason::from_wg(&e))),
        };
        match outcome {
            Ok(len) => {
                // Authenticated: this is where the peer is now (roaming).
                peer.endpoint = Some(from);
                session.last_heard = Some(now);
                match len {
                    Some(len) => {
                        self.traffic.rx_packets += 1;
                        self.traffic.rx_bytes += len as u64;
                        Received::Packet {
                            peer: id,
                            packet: &scratch[..len],
                        }
                    }
                    None => {
                        if datagram.first() == Some(&HANDSHAKE_RESPONSE_TYPE) {
                            self.traffic.handshakes += 1;
                        }
                        Received::Nothing
                    }
                }
            }
            Err(None) => {
                peer.endpoint = Some(from);
                session.last_heard = Some(now);
                if let Some(timestamp) = timestamp {
                    peer.last_initiation = timestamp;
                    self.traffic.handshakes += 1;
                }
                // A completed handshake may release packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) =
                    session.tunn.decapsulate(None, &[], scratch)
                {
                    tx.push(from, queued);
                }
                Received::Nothing
            }
            Err(Some(reason)) => {
                drop(in_span);
                self.drop(reason)
            }
        }
    }

    /// Finds the peer a datagram is for, and for an initiation what was learnt opening it.
    /// `opened`: an initiation another shard admitted and opened.
    fn route(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        opened: Option<&initiation::Detached>,
        now: Instant,
        tx: &mut TransmitQueue,
    ) -> Result<Routed, DropReason> {
        let packet = Tunn::parse_incoming_packet(datagram).map_err(|_| DropReason::Malformed)?;
        if let Some(id) = shard::peer_id_of(datagram) {
            if !self.shard.owns_id(id) {
                return Ok(Routed::Elsewhere(self.shard.owner_of_id(id), None));
            }
        }
        match packet {
            Packet::HandshakeInit(_) => {
                let opened = match opened.and_then(|o| o.attach(datagram)) {
                    Some(opened) => opened,
                    None => {
                        let mac1: Option<[u8; 16]> =
                            datagram.get(INIT_MAC1).and_then(|m| m.try_into().ok());
                        if mac1.is_some_and(|m| self.recent_initiations.contains(&m)) {
                            return Err(DropReason::ReplayedInitiation);
                        }
                        // Admission first: opening the initiation costs a Diffie-Hellman.
                        if !self.admit_handshake(from, datagram, now, tx)? {
                            return Ok(Routed::Done);
                        }
                        // Remembered once admitted: its MAC1 verified and the work is paid.
                        if let Some(m) = mac1 {
                            self.recent_initiations.insert(m);
                        }
                        initiation::open_initiation(&self.private, &self.public, datagram)
                            .ok_or(DropReason::BadHandshake)?
                    }
                };
                if !self.shard.owns_key(&opened.peer_static) {
                    let owner = self.shard.owner_of_key(&opened.peer_static);
                    return Ok(Routed::Elsewhere(owner, Some(opened.detach())));
                }
                let id = *self
                    .by_key
                    .get(&opened.peer_static)
                    .ok_or(DropReason::UnknownPeer)?;
                let peer = self.peers.get(&id).ok_or(DropReason::UnknownPeer)?;
                let (shared, new_static) = match self.sessions.get(&id) {
                    Some(s) => (s.static_shared, None),
                    None => {
                        let secret = initiation::static_shared(&self.private, &peer.public_key);
                        (secret.to_bytes(), Some(secret))
                    }
                };
                let timestamp = opened.timestamp(&shared).ok_or(DropReason::BadHandshake)?;
                // The `Tunn` checks this too, but only against what it saw itself.
                if timestamp <= peer.last_initiation {
                    return Err(DropReason::BadHandshake);
                }
                Ok(Routed::Peer(
                    id,
                    Some(Initiation {
                        timestamp,
                        new_static,
                        ephemeral: opened.ephemeral,
                        ephemeral_shared: opened.ephemeral_shared,
                    }),
                ))
            }
            Packet::HandshakeResponse(r) => {
                let id = self.by_index(r.receiver_idx)?;
                Ok(match self.admit_handshake(from, datagram, now, tx)? {
                    true => Routed::Peer(id, None),
                    false => Routed::Done,
                })
            }
            Packet::PacketCookieReply(c) => Ok(Routed::Peer(self.by_index(c.receiver_idx)?, None)),
            Packet::PacketData(d) => Ok(Routed::Peer(self.by_index(d.receiver_idx)?, None)),
        }
    }

    /// Whether a handshake message may go on to X25519 work; false when a cookie reply was
    /// queued instead. Only hashing and one AEAD (for the reply) happen here.
    fn admit_handshake(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        tx: &mut TransmitQueue,
    ) -> Result<bool, DropReason> {
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        let proven = match self
            .cookies
            .verify_packet(Some(from.ip()), datagram, &mut reply)
        {
            Ok(_) => None,
            // No valid MAC2 (none, or made with an old cookie): the reply is ready if needed.
            Err(TunnResult::WriteToNetwork(r)) => Some(r.len()),
            Err(TunnResult::Err(e)) => return Err(DropReason::from_wg(&e)),
            Err(_) => return Err(DropReason::Malformed),
        };
        match proven {
            None => {
                if !self.sources.allow(from.ip(), true, now) {
                    return Err(DropReason::SourceLimited);
                }
            }
            Some(len) => {
                let under_load = self.handshakes >= HANDSHAKE_RATE_LIMIT;
                if under_load || !self.sources.allow(from.ip(), false, now) {
                    tx.push(from, &reply[..len]);
                    self.drops.add(DropReason::UnderLoad);
                    return Ok(false);
                }
            }
        }
        self.handshakes += 1;
        Ok(true)
    }

    /// The peer holding a receiver index: only a peer with a session has handed one out.
    fn by_index(&self, receiver_idx: u32) -> Result<PeerId, DropReason> {
        let id = receiver_idx >> 8;
        if self.sessions.contains_key(&id) {
            Ok(id)
        } else {
            Err(DropReason::UnknownIndex)
        }
    }

    fn drop(&mut self, reason: DropReason) -> Received<'static> {
        self.drops.add(reason);
        Received::Dropped(reason)
    }

    /// Encrypts an IP packet for `peer` and queues it. Returns false when the peer is unknown or
    /// has no endpoint yet (it has never completed a handshake with us).
    /// A peer whose session was dropped gets a new one, which starts with a handshake.
    pub fn encapsulate(&mut self, peer: PeerId, packet: &[u8], tx: &mut TransmitQueue) -> bool {
        let Some(dst) = self.peers.get(&peer).and_then(|p| p.endpoint) else {
            return false;
        };
        let now = self.clock;
        if !self.ensure_session(peer, now, None) {
            return false;
        }
        let Some(session) = self.sessions.get_mut(&peer) else {
            return false;
        };
        let tunn = &mut session.tunn;
        self.traffic.tx_packets += 1;
        self.traffic.tx_bytes += packet.len() as u64;
        tx.push_with(
            dst,
            (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN),
            |buf| match tunn.encapsulate(packet, buf) {
                TunnResult::WriteToNetwork(out) => out.len(),
                _ => 0,
            },
        );
        true
    }

    /// Runs every peer's timers (keepalives, rekeys, expiry), the handshake load window and the
    /// per-source limiter's pruning and report.
    pub fn update_timers(&mut self, now: Instant, tx: &mut TransmitQueue) {
        self.clock = Some(now);
        let window_over = self
            .window_start
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if window_over {
            self.handshakes = 0;
            self.window_start = Some(now);
        }
        if let Some(r) = self.sources.handle_timeout(now) {
            tracing::warn!(
                source = %r.top_source,
                count = r.top_count,
                total = r.total,
                with_cookie = r.with_cookie,
                "handshake messages limited per source address (count: this source's, total: \
                 all sources' since the last such line, with_cookie: of those, dropped though \
                 their cookie was valid)"
            );
        }
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        let peers = &mut self.peers;
        self.sessions.retain(|id, session| {
            let Some(peer) = peers.get_mut(id) else {
                return false;
            };
            let heard = *session.last_heard.get_or_insert(now);
            if now.saturating_duration_since(heard) >= SESSION_IDLE_DROP {
                let (_, tx_bytes, rx_bytes, _, _) = session.tunn.stats();
                peer.tx_bytes += tx_bytes as u64;
                peer.rx_bytes += rx_bytes as u64;
                return false;
            }
            let _in_span = session.span.enter();
            if let TunnResult::WriteToNetwork(out) = session.tunn.update_timers(&mut buf) {
                if let Some(dst) = peer.endpoint {
                    tx.push(dst, out);
                }
            }
            true
        });
    }

    /// The tunnel address a peer must use as source, by IP version of `addr`.
    pub fn peer_address_for(&self, peer: PeerId, addr: IpAddr) -> Option<IpAddr> {
        let p = self.peers.get(&peer)?;
        Some(match addr {
            IpAddr::V4(_) => IpAddr::V4(p.ipv4),
            IpAddr::V6(_) => IpAddr::V6(p.ipv6),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{key, public, DEV_V4, DEV_V6};
    use crate::transmit::MAX_DATAGRAM;

    const BURST_FOR_TESTS: u64 = crate::handshake_limit::BURST;
    const RATE_FOR_TESTS: u64 = crate::handshake_limit::RATE_PER_SEC;

    struct Pair {
        gw: Endpoint<&'static str>,
        dev: Tunn,
        dev_addr: SocketAddr,
        tx: TransmitQueue,
        scratch: Vec<u8>,
        now: Instant,
    }

    fn pair() -> Pair {
        let gw_key = key(1);
        let dev_key = key(2);
        let mut gw = Endpoint::new(gw_key);
        gw.upsert_peer(public(dev_key), DEV_V4, DEV_V6, "laptop");
        let dev = Tunn::new(
            StaticSecret::from(dev_key),
            PublicKey::from(public(gw_key)),
            None,
            None,
            7,
            None,
        );
        Pair {
            gw,
            dev,
            dev_addr: "198.51.100.11:40000".parse().unwrap(),
            tx: TransmitQueue::new(),
            scratch: vec![0; MAX_DATAGRAM],
            now: crate::testkit::epoch(),
        }
    }

    fn ipv4_udp(src: Ipv4Addr) -> Vec<u8> {
        crate::testkit::ipv4_udp(src, Ipv4Addr::new(203, 0, 113, 30), 7, b"")
    }

    /// Device sends `packet`; handshake messages are delivered until the data arrives.
    fn device_sends(p: &mut Pair, packet: &[u8]) -> Vec<Received<'static>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let first = match p.dev.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            // Queued behind a handshake that got no answer (a cookie reply): retry it now.
            TunnResult::Done => match p.dev.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let mut to_gw = vec![first];
        for _ in 0..4 {
            let mut next = Vec::new();
            for d in to_gw.drain(..) {
                p.tx.clear();
                let r =
                    p.gw.handle_datagram(p.dev_addr, &d, p.now, &mut p.scratch, &mut p.tx);
                out.push(match r {
                    Received::Packet { peer, packet } => {
                        assert_eq!(p.gw.peer_data(peer), Some(&"laptop"));
                        Received::Packet {
                            peer,
                            packet: Box::leak(packet.to_vec().into_boxed_slice()),
                        }
                    }
                    Received::Nothing => Received::Nothing,
                    Received::Dropped(r) => Received::Dropped(r),
                    Received::Handoff(h) => Received::Handoff(h),
                });
                let replies: Vec<Vec<u8>> =
                    p.tx.datagrams()
                        .iter()
                        .map(|d| p.tx.bytes()[d.range.clone()].to_vec())
                        .collect();
                for reply in replies {
                    let mut res = p.dev.decapsulate(None, &reply, &mut buf);
                    while let TunnResult::WriteToNetwork(d) = res {
                        next.push(d.to_vec());
                        res = p.dev.decapsulate(None, &[], &mut buf);
                    }
                }
            }
            to_gw = next;
            if to_gw.is_empty() {
                break;
            }
        }
        out
    }

    #[test]
    fn handshake_then_data_reaches_the_tunnel() {
        let mut p = pair();
        let packet = ipv4_udp(DEV_V4);
        let results = device_sends(&mut p, &packet);
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Received::Packet { packet: got, .. } if *got == &packet[..])),
            "{results:?}"
        );
        assert_eq!(p.gw.peer_endpoint(1), Some(p.dev_addr));
        assert_eq!(p.gw.drops().total(), 0);
    }

    /// The device's next initiation, as bytes.
    fn initiation(p: &mut Pair) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match p.dev.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_enrolled_peer_has_no_session_until_its_first_handshake() {
        let mut p = pair();
        assert_eq!(p.gw.sessions(), 0);
        // Data for a peer that never connected: nothing to encrypt with, nowhere to send.
        assert!(!p.gw.encapsulate(1, &ipv4_udp(DEV_V4), &mut p.tx));
        assert_eq!(p.gw.sessions(), 0);
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(results.iter().any(|r| matches!(r, Received::Packet { .. })));
        assert_eq!(p.gw.sessions(), 1);
        assert_eq!(p.gw.traffic().handshakes, 1);
    }

    #[test]
    fn an_unanswered_initiation_from_an_unknown_key_creates_no_session() {
        let mut p = pair();
        p.gw.remove_peer(&public(key(2)));
        let init = initiation(&mut p);
        let r =
            p.gw.handle_datagram(p.dev_addr, &init, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::UnknownPeer));
        assert_eq!(p.gw.sessions(), 0);
    }

    #[test]
    fn an_idle_session_is_dropped_and_the_next_handshake_makes_a_new_one() {
        let mut p = pair();
        device_sends(&mut p, &ipv4_udp(DEV_V4));
        let rx = p.gw.stats()[0].rx_bytes;
        assert!(rx > 0);
        let mut tx = TransmitQueue::new();
        p.gw.update_timers(p.now + SESSION_IDLE_DROP - Duration::from_secs(1), &mut tx);
        assert_eq!(p.gw.sessions(), 1);
        p.now += SESSION_IDLE_DROP;
        p.gw.update_timers(p.now, &mut tx);
        assert_eq!(p.gw.sessions(), 0);
        // Counters and the endpoint outlive the session.
        assert_eq!(p.gw.stats()[0].rx_bytes, rx);
        assert_eq!(p.gw.peer_endpoint(1), Some(p.dev_addr));

        // The device's old session is gone with it.
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let TunnResult::WriteToNetwork(d) = p.dev.encapsulate(&ipv4_udp(DEV_V4), &mut buf) else {
            panic!()
        };
        let d = d.to_vec();
        let r =
            p.gw.handle_datagram(p.dev_addr, &d, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::UnknownIndex));

        // A new handshake brings it back.
        let init = initiation(&mut p);
        p.tx.clear();
        let r =
            p.gw.handle_datagram(p.dev_addr, &init, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Nothing);
        assert_eq!(p.gw.sessions(), 1);
        let response = p.tx.bytes()[p.tx.datagrams()[0].range.clone()].to_vec();
        assert!(matches!(
            p.dev.decapsulate(None, &response, &mut buf),
            TunnResult::WriteToNetwork(_) | TunnResult::Done
        ));
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(
            results.iter().any(|r| matches!(r, Received::Packet { .. })),
            "{results:?}"
        );
        assert_eq!(p.gw.stats()[0].rx_bytes, 2 * rx);
    }

    #[test]
    fn an_initiation_replayed_after_its_session_was_dropped_is_refused() {
        let mut p = pair();
        let recorded = initiation(&mut p);
        let r =
            p.gw.handle_datagram(p.dev_addr, &recorded, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Nothing);
        assert_eq!(p.gw.traffic().handshakes, 1);
        // While the session lives: its MAC1 was opened lately.
        let r =
            p.gw.handle_datagram(p.dev_addr, &recorded, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::ReplayedInitiation));
        // Once forgotten there, the timestamp refuses it, also after the session was dropped,
        // when a new `Tunn` would have no timestamp to compare.
        p.gw.recent_initiations = replay::RecentInitiations::default();
        let r =
            p.gw.handle_datagram(p.dev_addr, &recorded, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::BadHandshake));
        p.gw.recent_initiations = replay::RecentInitiations::default();
        p.now += SESSION_IDLE_DROP;
        p.gw.update_timers(p.now, &mut TransmitQueue::new());
        assert_eq!(p.gw.sessions(), 0);
        p.tx.clear();
        let r =
            p.gw.handle_datagram(p.dev_addr, &recorded, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::BadHandshake));
        assert_eq!(p.gw.sessions(), 0, "a replay creates no session");
        assert!(p.tx.is_empty(), "and gets no response");
        // The device's next initiation is newer and accepted.
        std::thread::sleep(Duration::from_millis(2));
        let fresh = initiation(&mut p);
        let r =
            p.gw.handle_datagram(p.dev_addr, &fresh, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Nothing);
        assert_eq!(p.gw.traffic().handshakes, 2);
    }

    #[test]
    fn a_replay_flood_from_many_sources_costs_no_work_and_the_device_keeps_its_session() {
        let mut p = pair();
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(results.iter().any(|r| matches!(r, Received::Packet { .. })));
        // A captured initiation of the enrolled device (the gateway opened it once).
        std::thread::sleep(Duration::from_millis(2));
        let recorded = initiation(&mut p);
        let r =
            p.gw.handle_datagram(p.dev_addr, &recorded, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Nothing);
        let budget = p.gw.handshakes;
        p.tx.clear();
        // 10,000 replays from 10 addresses and 1,000 ports each.
        for i in 0..10_000u16 {
            let from = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 20 + (i % 10) as u8), i));
            let r =
                p.gw.handle_datagram(from, &recorded, p.now, &mut p.scratch, &mut p.tx);
            assert_eq!(r, Received::Dropped(DropReason::ReplayedInitiation));
            p.now += Duration::from_micros(100);
        }
        assert_eq!(p.gw.handshakes, budget, "replays spend no handshake budget");
        assert!(p.tx.is_empty(), "nor get cookie replies or responses");
        assert_eq!(p.gw.drops().get(DropReason::ReplayedInitiation), 10_000);
        assert_eq!(p.gw.drops().get(DropReason::BadHandshake), 0);
        assert_eq!(
            p.gw.peer_endpoint(1),
            Some(p.dev_addr),
            "no roaming to a replayer"
        );
        // A replay that changed only its MAC2 (a cookie the replayer got) is the same replay.
        let mut with_mac2 = recorded.clone();
        with_mac2[132..148].fill(7);
        let r =
            p.gw.handle_datagram(p.dev_addr, &with_mac2, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::ReplayedInitiation));
        // The device's next handshake is fresh and accepted.
        std::thread::sleep(Duration::from_millis(2));
        let fresh = initiation(&mut p);
        let r =
            p.gw.handle_datagram(p.dev_addr, &fresh, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Nothing);
    }

    #[test]
    fn data_for_a_dropped_session_starts_a_handshake_to_the_peer() {
        let mut p = pair();
        device_sends(&mut p, &ipv4_udp(DEV_V4));
        p.now += SESSION_IDLE_DROP;
        p.gw.update_timers(p.now, &mut TransmitQueue::new());
        assert_eq!(p.gw.sessions(), 0);
        p.tx.clear();
        assert!(p
            .gw
            .encapsulate(1, &ipv4_udp(Ipv4Addr::new(203, 0, 113, 30)), &mut p.tx));
        assert_eq!(p.gw.sessions(), 1);
        let d = &p.tx.datagrams()[0];
        assert_eq!(d.dst, p.dev_addr);
        assert_eq!(p.tx.bytes()[d.range.start], 1, "a handshake initiation");
    }

    #[test]
    fn spoofed_inner_source_is_dropped() {
        let mut p = pair();
        let results = device_sends(&mut p, &ipv4_udp(Ipv4Addr::new(100, 96, 0, 3)));
        assert!(results.contains(&Received::Dropped(DropReason::SpoofedSource)));
        assert!(!results.iter().any(|r| matches!(r, Received::Packet { .. })));
        assert_eq!(p.gw.drops().get(DropReason::SpoofedSource), 1);
    }

    #[test]
    fn unknown_peer_handshake_is_dropped() {
        let mut p = pair();
        p.gw.remove_peer(&public(key(2)));
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert_eq!(results, vec![Received::Dropped(DropReason::UnknownPeer)]);
    }

    #[test]
    fn garbage_never_panics_and_is_counted() {
        let mut gw: Endpoint<()> = Endpoint::new(key(1));
        gw.upsert_peer(public(key(2)), DEV_V4, DEV_V6, ());
        let mut scratch = vec![0u8; MAX_DATAGRAM];
        let mut tx = TransmitQueue::new();
        let from: SocketAddr = "198.51.100.11:1".parse().unwrap();
        let now = crate::testkit::epoch();
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1],
            vec![1, 0, 0, 0],
            vec![4, 0, 0, 0, 1, 0, 0, 0],
            vec![1; 148],
            vec![2; 92],
            vec![3; 64],
            vec![4; 32],
            vec![4; 1500],
        ];
        // A data message for an index that exists but with a bogus counter and tag.
        let mut data = vec![0u8; 64];
        data[0] = 4;
        data[4..8].copy_from_slice(&(1u32 << 8).to_le_bytes());
        cases.push(data);
        for case in &cases {
            let r = gw.handle_datagram(from, case, now, &mut scratch, &mut tx);
            assert!(matches!(r, Received::Dropped(_)), "{case:?} -> {r:?}");
        }
        assert_eq!(gw.drops().total(), cases.len() as u64);
        assert!(tx.is_empty());
    }

    #[test]
    fn removed_peer_loses_its_session() {
        let mut p = pair();
        device_sends(&mut p, &ipv4_udp(DEV_V4));
        p.gw.remove_peer(&public(key(2)));
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let d = match p.dev.encapsulate(&ipv4_udp(DEV_V4), &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        };
        let r =
            p.gw.handle_datagram(p.dev_addr, &d, p.now, &mut p.scratch, &mut p.tx);
        assert_eq!(r, Received::Dropped(DropReason::UnknownIndex));
    }

    #[test]
    fn a_resumed_peer_is_reached_first_and_its_session_carries_data_both_ways() {
        let mut p = pair();
        let id = p.gw.peer_by_key(&public(key(2))).unwrap();
        assert!(p.gw.resume(id, p.dev_addr, &mut p.tx));
        assert_eq!(p.gw.peer_endpoint(id), Some(p.dev_addr));
        // Only once: a peer with an endpoint is not resumed again.
        assert!(!p.gw.resume(id, p.dev_addr, &mut p.tx));
        assert_eq!(p.tx.datagrams().len(), 1);
        let d = &p.tx.datagrams()[0];
        assert_eq!(d.dst, p.dev_addr);
        let init = p.tx.bytes()[d.range.clone()].to_vec();

        // The device answers the gateway's initiation; the gateway confirms with a keepalive.
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let response = match p.dev.decapsulate(None, &init, &mut buf) {
            TunnResult::WriteToNetwork(r) => r.to_vec(),
            other => panic!("{other:?}"),
        };
        p.tx.clear();
        let r =
            p.gw.handle_datagram(p.dev_addr, &response, p.now, &mut p.scratch, &mut p.tx);
        assert!(matches!(r, Received::Nothing), "{r:?}");
        let keepalive = p.tx.bytes()[p.tx.datagrams()[0].range.clone()].to_vec();
        assert!(matches!(
            p.dev.decapsulate(None, &keepalive, &mut buf),
            TunnResult::Done
        ));

        // Gateway to device and device to gateway, on the session the gateway started.
        p.tx.clear();
        let reply = ipv4_udp(Ipv4Addr::new(203, 0, 113, 30));
        assert!(p.gw.encapsulate(id, &reply, &mut p.tx));
        let d = &p.tx.datagrams()[0];
        match p
            .dev
            .decapsulate(None, &p.tx.bytes()[d.range.clone()], &mut buf)
        {
            TunnResult::WriteToTunnelV4(got, _) => assert_eq!(got, &reply[..]),
            other => panic!("{other:?}"),
        }
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(
            matches!(results[..], [Received::Packet { .. }]),
            "{results:?}"
        );
    }

    #[test]
    fn an_unknown_peer_is_not_resumed() {
        let mut gw: Endpoint<()> = Endpoint::new(key(1));
        let mut tx = TransmitQueue::new();
        assert!(!gw.resume(42, "198.51.100.11:40000".parse().unwrap(), &mut tx));
        assert!(tx.datagrams().is_empty());
    }

    /// An initiator with a key the gateway does not know, answering cookies as boringtun does.
    struct Flooder {
        tunn: Tunn,
        addr: SocketAddr,
        cookie_replies: usize,
    }

    /// A device (boringtun initiator) with key `seed` for the gateway of key 1.
    fn device_tunn(seed: u8) -> Tunn {
        Tunn::new(
            StaticSecret::from(key(seed)),
            PublicKey::from(public(key(1))),
            None,
            None,
            u32::from(seed),
            None,
        )
    }

    impl Flooder {
        fn new(seed: u8, addr: &str) -> Flooder {
            Flooder {
                tunn: device_tunn(seed),
                addr: addr.parse().unwrap(),
                cookie_replies: 0,
            }
        }

        /// Sends `n` fresh initiations, one every `every`, consuming whatever comes back.
        fn flood(&mut self, p: &mut Pair, n: usize, every: Duration) {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            for _ in 0..n {
                let init = match self.tunn.format_handshake_initiation(&mut buf, true) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    other => panic!("{other:?}"),
                };
                p.tx.clear();
                p.gw.handle_datagram(self.addr, &init, p.now, &mut p.scratch, &mut p.tx);
                let replies: Vec<Vec<u8>> =
                    p.tx.datagrams()
                        .iter()
                        .map(|d| p.tx.bytes()[d.range.clone()].to_vec())
                        .collect();
                for r in replies {
                    assert_eq!(r[0], 3, "only cookie replies go to an unknown key");
                    self.cookie_replies += 1;
                    assert!(matches!(
                        self.tunn.decapsulate(None, &r, &mut buf),
                        TunnResult::Done
                    ));
                }
                p.now += every;
            }
        }
    }

    /// Initiations that reached X25519 work (an unknown key is found only by it).
    fn x25519_work(p: &Pair) -> u64 {
        p.gw.drops().get(DropReason::UnknownPeer)
    }

    #[test]
    fn a_cookie_answering_flood_from_one_source_gets_its_rate_and_others_still_connect() {
        let mut p = pair();
        let mut f = Flooder::new(9, "198.51.100.12:5555");
        // 20,000 initiations a second for a second.
        let every = Duration::from_micros(50);
        let mut tx = TransmitQueue::new();
        for _ in 0..4 {
            f.flood(&mut p, 5_000, every);
            p.gw.update_timers(p.now, &mut tx);
        }
        // Its unproven burst, one cookie, then its proven burst and rate: nothing like 20,000.
        assert_eq!(f.cookie_replies, 1);
        let work = x25519_work(&p);
        assert!(
            (10..=2 * BURST_FOR_TESTS + RATE_FOR_TESTS + 1).contains(&work),
            "{work}"
        );
        let limited = p.gw.drops().get(DropReason::SourceLimited);
        assert_eq!(limited + work + 1, 20_000);
        assert_eq!(p.gw.handshakes_limited(), limited + 1);

        // A device connecting now gets its handshake at once: the flood spent no global budget
        // beyond what its buckets allowed.
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(
            results.iter().any(|r| matches!(r, Received::Packet { .. })),
            "{results:?}"
        );
        assert_eq!(p.gw.drops().get(DropReason::UnderLoad), 1);
    }

    #[test]
    fn a_flood_ignoring_cookies_from_one_source_gets_cookies_not_work() {
        let mut p = pair();
        let from: SocketAddr = "198.51.100.12:5555".parse().unwrap();
        let mut attacker = Flooder::new(9, "198.51.100.12:5555");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut cookies = 0;
        for _ in 0..1000 {
            let TunnResult::WriteToNetwork(init) =
                attacker.tunn.format_handshake_initiation(&mut buf, true)
            else {
                panic!()
            };
            p.tx.clear();
            p.gw.handle_datagram(from, init, p.now, &mut p.scratch, &mut p.tx);
            cookies += p.tx.datagrams().len();
            p.now += Duration::from_micros(50);
        }
        // Just under 50 ms: the burst, not yet a refill.
        assert_eq!(x25519_work(&p), BURST_FOR_TESTS);
        assert_eq!(cookies as u64, 1000 - BURST_FOR_TESTS);
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(results.iter().any(|r| matches!(r, Received::Packet { .. })));
    }

    #[test]
    fn the_global_threshold_still_answers_a_spread_flood_with_cookies() {
        let mut p = pair();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut attacker = Flooder::new(9, "198.51.100.12:5555");
        // One initiation from each of many sources: no bucket is ever exceeded.
        for i in 0..HANDSHAKE_RATE_LIMIT + 50 {
            let TunnResult::WriteToNetwork(init) =
                attacker.tunn.format_handshake_initiation(&mut buf, true)
            else {
                panic!()
            };
            let from = SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
                )),
                1,
            );
            p.tx.clear();
            p.gw.handle_datagram(from, init, p.now, &mut p.scratch, &mut p.tx);
        }
        assert_eq!(x25519_work(&p), HANDSHAKE_RATE_LIMIT);
        assert_eq!(p.gw.drops().get(DropReason::UnderLoad), 50);
        // The device is asked for a cookie too...
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(!results.iter().any(|r| matches!(r, Received::Packet { .. })));
        assert_eq!(p.gw.drops().get(DropReason::UnderLoad), 51);
        // ...and once the window has passed it gets through.
        p.now += Duration::from_secs(1);
        let mut tx = TransmitQueue::new();
        p.gw.update_timers(p.now, &mut tx);
        p.gw.update_timers(p.now + Duration::from_secs(1), &mut tx);
        let results = device_sends(&mut p, &ipv4_udp(DEV_V4));
        assert!(
            results.iter().any(|r| matches!(r, Received::Packet { .. })),
            "{results:?}"
        );
    }

    /// Delivers `d` to the shard the kernel would pick (`hashed` for an initiation), following
    /// handoffs; the replies go to the device, whose answers are delivered the same way.
    fn deliver_to_shards(
        shards: &mut [Endpoint<&'static str>],
        dev: &mut Tunn,
        from: SocketAddr,
        d: Vec<u8>,
        hashed: u32,
        handoffs: &mut usize,
    ) -> Vec<(u32, Vec<u8>)> {
        let count = shards.len() as u32;
        let mut scratch = vec![0u8; MAX_DATAGRAM];
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut packets = Vec::new();
        let mut queue = vec![d];
        let now = crate::testkit::epoch();
        while let Some(d) = queue.pop() {
            let mut at = shard::steer(&d, count).unwrap_or(hashed);
            let mut tx = TransmitQueue::new();
            let mut r = shards[at as usize].handle_datagram(from, &d, now, &mut scratch, &mut tx);
            while let Received::Handoff(h) = &r {
                *handoffs += 1;
                assert_ne!(h.shard, at);
                at = h.shard;
                let h = h.clone();
                r = shards[at as usize].handle_handoff(&h, now, &mut scratch, &mut tx);
            }
            if let Received::Packet { packet, .. } = r {
                packets.push((at, packet.to_vec()));
            }
            for out in tx.datagrams() {
                let mut res = dev.decapsulate(None, &tx.bytes()[out.range.clone()], &mut buf);
                while let TunnResult::WriteToNetwork(next) = res {
                    queue.push(next.to_vec());
                    res = dev.decapsulate(None, &[], &mut buf);
                }
            }
        }
        packets
    }

    #[test]
    fn a_peer_lives_on_its_owner_shard_whichever_shard_its_datagrams_reach() {
        let count = 3;
        let mut shards: Vec<Endpoint<&'static str>> = (0..count)
            .map(|index| {
                Endpoint::new(key(1)).with_shard(Shard {
                    index,
                    count,
                    seed: 42,
                })
            })
            .collect();
        let from: SocketAddr = "198.51.100.11:40000".parse().unwrap();
        let mut checked = 0;
        for seed in 2..14u8 {
            let dev_key = public(key(seed));
            let owner = shards[0].shard().owner_of_key(&dev_key);
            // Only the owner holds the peer, with an id of its own.
            let id = shards[owner as usize].upsert_peer(dev_key, DEV_V4, DEV_V6, "laptop");
            assert_eq!(id % count, owner);
            let mut dev = device_tunn(seed);
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let TunnResult::WriteToNetwork(init) = dev.format_handshake_initiation(&mut buf, false)
            else {
                panic!()
            };
            let init = init.to_vec();
            // The kernel's hash puts the initiation on any shard.
            let hashed = u32::from(seed) % count;
            let mut handoffs = 0;
            deliver_to_shards(&mut shards, &mut dev, from, init, hashed, &mut handoffs);
            assert_eq!(handoffs, usize::from(hashed != owner), "seed {seed}");
            // Data goes straight to the owner; also when it reaches another shard first.
            let packet = ipv4_udp(DEV_V4);
            let TunnResult::WriteToNetwork(data) = dev.encapsulate(&packet, &mut buf) else {
                panic!()
            };
            let data = data.to_vec();
            assert_eq!(shard::steer(&data, count), Some(owner));
            let mut handoffs = 0;
            let got = deliver_to_shards(&mut shards, &mut dev, from, data.clone(), 0, &mut 0);
            assert_eq!(got, vec![(owner, packet.clone())]);
            let wrong = (owner + 1) % count;
            let mut tx = TransmitQueue::new();
            let mut scratch = vec![0u8; MAX_DATAGRAM];
            let now = crate::testkit::epoch();
            let r = shards[wrong as usize].handle_datagram(from, &data, now, &mut scratch, &mut tx);
            let Received::Handoff(h) = r else {
                panic!("{r:?}")
            };
            handoffs += 1;
            assert_eq!(h.shard, owner);
            // A replayed counter is refused by the owner, not decrypted twice.
            let r = shards[owner as usize].handle_handoff(&h, now, &mut scratch, &mut tx);
            assert_eq!(r, Received::Dropped(DropReason::BadData));
            assert_eq!(handoffs, 1);
            checked += 1;
        }
        assert_eq!(checked, 12);
        // Each shard's sessions are its own peers'.
        let sessions: usize = shards.iter().map(Endpoint::sessions).sum();
        assert_eq!(sessions, 12);
        assert!(shards.iter().all(|s| s.sessions() > 0));
        // An initiation from an unknown key ends at its would-be owner as unknown.
        let mut stranger = device_tunn(99);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let TunnResult::WriteToNetwork(init) =
            stranger.format_handshake_initiation(&mut buf, false)
        else {
            panic!()
        };
        let init = init.to_vec();
        let unknown_before: u64 = shards
            .iter()
            .map(|s| s.drops().get(DropReason::UnknownPeer))
            .sum();
        deliver_to_shards(&mut shards, &mut stranger, from, init, 0, &mut 0);
        let unknown: u64 = shards
            .iter()
            .map(|s| s.drops().get(DropReason::UnknownPeer))
            .sum();
        assert_eq!(unknown, unknown_before + 1);
    }

    #[test]
    fn gateway_replies_reach_the_device() {
        let mut p = pair();
        device_sends(&mut p, &ipv4_udp(DEV_V4));
        p.tx.clear();
        let reply = ipv4_udp(Ipv4Addr::new(203, 0, 113, 30));
        assert!(p.gw.encapsulate(1, &reply, &mut p.tx));
        let d = &p.tx.datagrams()[0];
        assert_eq!(d.dst, p.dev_addr);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match p
            .dev
            .decapsulate(None, &p.tx.bytes()[d.range.clone()], &mut buf)
        {
            TunnResult::WriteToTunnelV4(got, _) => assert_eq!(got, &reply[..]),
            other => panic!("{other:?}"),
        }
    }
}
