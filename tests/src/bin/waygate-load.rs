//! Many WireGuard devices in one process, for scale benchmarks (scripts/bench-scale.sh).
//!
//!     waygate-load enroll --data-dir DIR --count N [--seed S]
//!         enrolls N devices (keys derived from S and their number) in one registry transaction
//!     waygate-load run --data-dir DIR --to HOST:PORT --count N [--seed S] [--bind IP,IP..]
//!                      [--seconds 10] [--dns-rate 1000] [--dns-name NAME] [--dns-server IP]
//!                      [--fetch-rate 0] [--fetch-to 203.0.113.10:80] [--churn-every 0]
//!                      [--churn 10]
//!         N devices (the first N enrolled with S) over one UDP socket per --bind address:
//!         every device handshakes, then DNS queries go out at --dns-rate a second and HTTP
//!         fetches (`GET /`, a TCP connection each, through the tunnel) at --fetch-rate,
//!         spread over the devices, for --seconds. With --churn-every, every that many
//!         seconds --churn devices change: half roam to the next --bind address, half are
//!         revoked in the registry and enroll again 3 s later with a new key
//!     waygate-load responder --count N [--seconds 5]
//!         the responder's handshake work on this thread (its CPU time): N devices'
//!         initiations handled by a gateway endpoint in process, its flood thresholds never
//!         reached
//!
//! Each prints one JSON line. Only the device's keys are derived from the seed: the same seed
//! and count give the same devices to `enroll` and `run`.

// A lab tool on the real clock: it times what it measures.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use blake2::{Blake2s256, Digest};
use waygate_config::TunnelConfig;
use waygate_keys::{PrivateKey, PublicKey};
use waygate_registry::{NewDevice, Registry};
use waygate_wg::initiator::{FromGateway, Initiator};
use waygate_wg::transmit::{TransmitQueue, MAX_DATAGRAM};
use waygate_wg::{Endpoint, Received, TIMER_TICK};

/// A DNS answer later than this counts as lost (the resolver's own upstream timeout is 2 s).
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a device revoked by the churn stays away before it enrolls again.
const REENROLL_AFTER: Duration = Duration::from_secs(3);
/// How long devices may take to connect before the run goes on without the rest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("usage: waygate-load enroll|run|responder ...");
    };
    let opts = Opts::parse(rest)?;
    match cmd.as_str() {
        "enroll" => enroll(&opts),
        "run" => run(&opts),
        "responder" => responder(&opts),
        other => bail!("unknown command {other}"),
    }
}

struct Opts {
    values: HashMap<String, String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut values = HashMap::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let Some(name) = flag.strip_prefix("--") else {
                bail!("unexpected argument {flag}");
            };
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            values.insert(name.to_string(), value.clone());
        }
        Ok(Opts { values })
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.values.get(name) {
            Some(v) => v.parse().map_err(|e| anyhow::anyhow!("--{name} {v}: {e}")),
            None => default.with_context(|| format!("--{name} is required")),
        }
    }
}

/// Device `n`'s private key under `seed`.
fn device_key(seed: u64, n: u64) -> PrivateKey {
    let mut h = Blake2s256::new();
    h.update(b"waygate-load");
    h.update(seed.to_le_bytes());
    h.update(n.to_le_bytes());
    PrivateKey::from_bytes(h.finalize().into())
}

fn tunnel() -> TunnelConfig {
    waygate_config::Config::default().tunnel
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn enroll(opts: &Opts) -> Result<()> {
    let dir: PathBuf = opts.get("data-dir", None)?;
    let count: u64 = opts.get("count", None)?;
    let seed: u64 = opts.get("seed", Some(1))?;
    let start = Instant::now();
    let registry = Registry::open(&dir, &tunnel())?;
    let news = (0..count)
        .map(|n| NewDevice {
            name: Some(format!("load-{seed}-{n}")),
            email: format!("load{n}@example.com"),
            user_name: None,
            groups: Vec::new(),
            attributes: Vec::new(),
            vnet_id: None,
            public_key: device_key(seed, n).public_key(),
        })
        .collect();
    let devices = registry.enroll_many(news, unix_now())?;
    println!(
        "{{\"enrolled\":{},\"seconds\":{:.2}}}",
        devices.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One load device.
struct Device {
    wg: Initiator,
    /// Its registry id.
    id: String,
    ipv4: Ipv4Addr,
    socket: usize,
    connected: bool,
    /// Revoked by the churn, until it enrolls again (with a new key: the registry keeps a
    /// revoked device's key taken).
    revoked: bool,
    /// Times it enrolled again, which its next key derives from.
    generation: u64,
    /// DNS id -> when it was sent.
    pending: HashMap<u16, Instant>,
    next_id: u16,
    /// HTTP fetches under way, by local TCP port.
    fetches: HashMap<u16, Fetch>,
    next_port: u16,
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The one's-complement sum of `data` folded in with `sum`, as IP and TCP checksums take it.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(sum: u32) -> u16 {
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    !(folded as u16)
}

/// An IPv4 packet of `proto` around `l4` (its checksum, if any, already in place).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(l4);
    let sum = fold(sum16(0, &p[..20]));
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn ipv4_udp(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8 + payload.len()];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp[8..].copy_from_slice(payload);
    // UDP checksum 0: none (allowed over IPv4).
    ipv4(src, dst, 17, &udp)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
/// The MSS a load device announces (a WireGuard MTU of 1420 less IPv4 and TCP headers).
const TCP_MSS: u16 = 1380;
/// A fetch not finished in this long counts as lost (and is reset).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A segment without an answer for this long is sent again.
const FETCH_RETRANSMIT: Duration = Duration::from_secs(1);

/// One TCP segment to send.
struct Segment<'a> {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &'a [u8],
}

impl Segment<'_> {
    /// The segment in an IPv4 packet; a SYN carries the MSS option.
    fn packet(&self) -> Vec<u8> {
        let options: &[u8] = if self.flags & TCP_SYN != 0 {
            &[2, 4, (TCP_MSS >> 8) as u8, TCP_MSS as u8]
        } else {
            &[]
        };
        let header = 20 + options.len();
        let mut t = vec![0u8; header + self.payload.len()];
        t[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        t[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = ((header / 4) as u8) << 4;
        t[13] = self.flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t[20..header].copy_from_slice(options);
        t[header..].copy_from_slice(self.payload);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&self.src.ip().octets());
        pseudo[4..8].copy_from_slice(&self.dst.ip().octets());
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(t.len() as u16).to_be_bytes());
        let sum = fold(sum16(sum16(0, &pseudo), &t));
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        ipv4(*self.src.ip(), *self.dst.ip(), 6, &t)
    }
}

/// A TCP segment read from a decrypted packet.
struct Incoming<'a> {
    src: SocketAddrV4,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &'a [u8],
}

/// Reads an IPv4 TCP segment; `None` for anything else or anything malformed.
fn parse_tcp(p: &[u8]) -> Option<Incoming<'_>> {
    if p.first()? >> 4 != 4 || *p.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    let src = Ipv4Addr::new(*p.get(12)?, p[13], p[14], p[15]);
    let t = p.get(ihl..total.min(p.len()))?;
    let offset = usize::from(t.get(12)? >> 4) * 4;
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some(Incoming {
        src: SocketAddrV4::new(src, u16::from_be_bytes([t[0], t[1]])),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        seq: be32(&t[4..8]),
        ack: be32(&t[8..12]),
        flags: *t.get(13)?,
        payload: t.get(offset..)?,
    })
}

/// An HTTP/1.1 GET over a minimal TCP client: SYN, then the request with the handshake's ACK,
/// in-order data acknowledged as it comes, done at the server's FIN (the origin closes after
/// its answer). Out-of-order data is not kept: the duplicate ACK makes the server send again.
struct Fetch {
    local: SocketAddrV4,
    remote: SocketAddrV4,
    iss: u32,
    /// `None` until the SYN-ACK.
    rcv_nxt: Option<u32>,
    started: Instant,
    last_sent: Instant,
    /// The start of the answer, enough for its status line.
    head: Vec<u8>,
}

/// What a fetch came to.
enum FetchEnd {
    /// The whole answer, status 200, in this long.
    Ok(Duration),
    /// Another status, a reset or a timeout.
    Failed,
}

const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n";

impl Fetch {
    fn syn(&self) -> Segment<'static> {
        Segment {
            src: self.local,
            dst: self.remote,
            seq: self.iss,
            ack: 0,
            flags: TCP_SYN,
            payload: &[],
        }
    }

    fn request(&self, ack: u32) -> Segment<'static> {
        Segment {
            src: self.local,
            dst: self.remote,
            seq: self.iss.wrapping_add(1),
            ack,
            flags: TCP_ACK | TCP_PSH,
            payload: HTTP_REQUEST,
        }
    }

    fn snd_nxt(&self) -> u32 {
        self.iss.wrapping_add(1 + HTTP_REQUEST.len() as u32)
    }

    /// Takes in one segment from the server; returns what to send back and whether it ended.
    fn receive(&mut self, seg: &Incoming, now: Instant) -> (Option<Vec<u8>>, Option<FetchEnd>) {
        if seg.flags & TCP_RST != 0 {
            return (None, Some(FetchEnd::Failed));
        }
        let Some(rcv_nxt) = self.rcv_nxt else {
            if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                && seg.ack == self.iss.wrapping_add(1)
            {
                let ack = seg.seq.wrapping_add(1);
                self.rcv_nxt = Some(ack);
                self.last_sent = now;
                return (Some(self.request(ack).packet()), None);
            }
            return (None, None);
        };
        if seg.flags & TCP_SYN != 0 {
            // Our ACK and request were lost: the SYN-ACK again.
            return (Some(self.request(rcv_nxt).packet()), None);
        }
        let mut ack = rcv_nxt;
        let mut fin = false;
        if seg.seq == rcv_nxt {
            let room = 64usize.saturating_sub(self.head.len());
            self.head
                .extend_from_slice(&seg.payload[..seg.payload.len().min(room)]);
            ack = ack.wrapping_add(seg.payload.len() as u32);
            if seg.flags & TCP_FIN != 0 {
                ack = ack.wrapping_add(1);
                fin = true;
            }
            self.rcv_nxt = Some(ack);
            self.last_sent = now;
        }
        if seg.payload.is_empty() && !fin && seg.seq == rcv_nxt {
            // A bare ACK of our request: nothing to answer.
            return (None, None);
        }
        let flags = if fin { TCP_ACK | TCP_FIN } else { TCP_ACK };
        let reply = Segment {
            src: self.local,
            dst: self.remote,
            seq: self.snd_nxt(),
            ack,
            flags,
            payload: &[],
        }
        .packet();
        let end = fin.then(|| {
            if self.head.starts_with(b"HTTP/1.1 200") {
                FetchEnd::Ok(now.duration_since(self.started))
            } else {
                FetchEnd::Failed
            }
        });
        (Some(reply), end)
    }

    /// On the timer: what to send again, or the end of a fetch that took too long (with the
    /// reset that tells the gateway).
    fn tick(&mut self, now: Instant) -> (Option<Vec<u8>>, Option<FetchEnd>) {
        if now.duration_since(self.started) >= FETCH_TIMEOUT {
            let rst = Segment {
                src: self.local,
                dst: self.remote,
                seq: self.snd_nxt(),
                ack: 0,
                flags: TCP_RST,
                payload: &[],
            };
            return (Some(rst.packet()), Some(FetchEnd::Failed));
        }
        if now.duration_since(self.last_sent) < FETCH_RETRANSMIT {
            return (None, None);
        }
        self.last_sent = now;
        let again = match self.rcv_nxt {
            None => self.syn(),
            Some(ack) => self.request(ack),
        };
        (Some(again.packet()), None)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn flush(tx: &mut TransmitQueue, socket: &UdpSocket, errors: &mut u64) {
    for d in tx.datagrams() {
        if socket.send_to(&tx.bytes()[d.range.clone()], d.dst).is_err() {
            *errors += 1;
        }
    }
    tx.clear();
}

/// The receiver index a datagram from the gateway is for: replies find their device by it.
fn receiver_index(datagram: &[u8]) -> Option<u32> {
    // A handshake response carries the sender's index first, then the receiver's.
    let at = if *datagram.first()? == 2 { 8 } else { 4 };
    let b = datagram.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Waits until one of `fds` is readable (its `revents` set) or `timeout` passes.
fn wait_readable(fds: &mut [libc::pollfd], timeout: Duration) -> Result<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` is a valid array of pollfd for its length, `ts` lives across the call.
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(err.into());
        }
    }
    Ok(())
}

/// Counts and latencies of one run.
#[derive(Default)]
struct Tally {
    send_errors: u64,
    dns_ms: Vec<f64>,
    dns_sent: u64,
    dns_failed: u64,
    dns_timeouts: u64,
    fetch_ms: Vec<f64>,
    fetches: u64,
    fetch_failed: u64,
    roams: u64,
    revokes: u64,
    reenrolls: u64,
    churn_errors: u64,
}

/// Paces an event at `rate` a second: how many are due since the last call.
struct Pace {
    rate: f64,
    due: f64,
    last: Instant,
}

impl Pace {
    fn new(rate: f64, now: Instant) -> Pace {
        Pace {
            rate,
            due: 0.0,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> u64 {
        self.due += now.duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        let n = self.due.floor();
        self.due -= n;
        n as u64
    }

    /// Time until the next event is due (a second when none is paced).
    fn wait(&self) -> Duration {
        if self.rate <= 0.0 {
            return Duration::from_secs(1);
        }
        Duration::from_secs_f64(((1.0 - self.due) / self.rate).max(0.0))
    }
}

fn run(opts: &Opts) -> Result<()> {
    let dir: PathBuf = opts.get("data-dir", None)?;
    let to: SocketAddr = opts.get("to", None)?;
    let count: u64 = opts.get("count", None)?;
    let seed: u64 = opts.get("seed", Some(1))?;
    let seconds: f64 = opts.get("seconds", Some(10.0))?;
    let dns_rate: f64 = opts.get("dns-rate", Some(1000.0))?;
    let dns_name: String = opts.get("dns-name", Some("example.com".to_string()))?;
    let fetch_rate: f64 = opts.get("fetch-rate", Some(0.0))?;
    let fetch_to: SocketAddrV4 = opts.get("fetch-to", Some("203.0.113.10:80".parse()?))?;
    let tunnel = tunnel();
    let dns_server: Ipv4Addr = opts.get("dns-server", Some(tunnel.gateway_ipv4()))?;
    let binds: String = opts.get("bind", Some("0.0.0.0".to_string()))?;

    let churn_every: f64 = opts.get("churn-every", Some(0.0))?;
    let churn: usize = opts.get("churn", Some(10))?;

    let registry = Registry::open(&dir, &tunnel)?;
    let by_key: HashMap<PublicKey, (Ipv4Addr, String)> = registry
        .active_devices()?
        .into_iter()
        .map(|d| (d.public_key, (d.ipv4, d.id)))
        .collect();
    let server = waygate_registry::datadir::load_or_create_server_key(&dir)?;
    let gw_public = *server.public_key().as_bytes();

    let mut sockets = Vec::new();
    for ip in binds.split(',') {
        let ip: IpAddr = ip.parse().with_context(|| format!("--bind {ip}"))?;
        let s = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        s.set_nonblocking(true)?;
        sockets.push(s);
    }
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut devices = Vec::new();
    for n in 0..count {
        let key = device_key(seed, n);
        let (ipv4, id) = by_key
            .get(&key.public_key())
            .with_context(|| format!("device {n} of seed {seed} is not enrolled"))?
            .clone();
        devices.push(Device {
            // Index n + 1: replies are matched to their device by it.
            wg: Initiator::new(*key.to_bytes(), gw_public, to, None, n as u32 + 1),
            id,
            ipv4,
            socket: n as usize % sockets.len(),
            connected: false,
            revoked: false,
            generation: 0,
            pending: HashMap::new(),
            next_id: 0,
            fetches: HashMap::new(),
            next_port: 20_000,
        });
    }

    let mut tx = TransmitQueue::new();
    let mut t = Tally::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut connected = 0usize;

    let start = Instant::now();
    for d in &mut devices {
        d.wg.force_handshake(&mut tx);
        flush(&mut tx, &sockets[d.socket], &mut t.send_errors);
    }
    let mut connect_time = None;
    let mut load_start = None;
    let mut last_tick = Instant::now();
    let mut next_dns = 0usize;
    let mut next_fetch = 0usize;
    let mut dns_pace = Pace::new(dns_rate, start);
    let mut fetch_pace = Pace::new(fetch_rate, start);
    let mut churn_pace = Pace::new(
        if churn_every > 0.0 {
            1.0 / churn_every
        } else {
            0.0
        },
        start,
    );
    let mut next_churn = 0usize;
    // Revoked devices and when they enroll again.
    let mut reenroll: std::collections::VecDeque<(Instant, usize)> = Default::default();
    loop {
        let wait = if load_start.is_some() {
            dns_pace.wait().min(fetch_pace.wait())
        } else {
            Duration::from_secs(1)
        }
        .min(TIMER_TICK.saturating_sub(last_tick.elapsed()));
        wait_readable(&mut fds, wait)?;
        for si in 0..sockets.len() {
            if fds[si].revents == 0 {
                continue;
            }
            fds[si].revents = 0;
            for _ in 0..256 {
                let (len, from) = match sockets[si].recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                };
                let Some(idx) = receiver_index(&buf[..len]) else {
                    continue;
                };
                let Some(d) = devices.get_mut(((idx >> 8) as usize).wrapping_sub(1)) else {
                    continue;
                };
                let kind = buf[0];
                // Replies leave from the device's socket (it may have roamed since).
                let socket = &sockets[d.socket];
                let got = d.wg.handle_datagram(from, &buf[..len], &mut out, &mut tx);
                flush(&mut tx, socket, &mut t.send_errors);
                if kind == 3 && !d.connected {
                    // A cookie reply: answer it at once with the cookie.
                    d.wg.force_handshake(&mut tx);
                    flush(&mut tx, socket, &mut t.send_errors);
                }
                if !d.connected && !d.revoked && d.wg.stats().since_handshake.is_some() {
                    d.connected = true;
                    connected += 1;
                }
                let FromGateway::Packet(n) = got else {
                    continue;
                };
                let packet = &out[..n];
                // IPv4 UDP from port 53: a DNS answer; its id says which query.
                if n >= 28 + 12 && packet[0] == 0x45 && packet[9] == 17 && packet[20..22] == [0, 53]
                {
                    let id = u16::from_be_bytes([packet[28], packet[29]]);
                    if let Some(sent) = d.pending.remove(&id) {
                        if packet[31] & 0x0f == 0 {
                            t.dns_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                        } else {
                            t.dns_failed += 1;
                        }
                    }
                    continue;
                }
                let Some(seg) = parse_tcp(packet) else {
                    continue;
                };
                let now = Instant::now();
                let (reply, end) = match d.fetches.get_mut(&seg.dst_port) {
                    Some(f) if f.remote == seg.src => f.receive(&seg, now),
                    // A late segment of a finished fetch: a reset, so the gateway lets go.
                    _ if seg.flags & TCP_RST == 0
                        && (!seg.payload.is_empty() || seg.flags & (TCP_SYN | TCP_FIN) != 0) =>
                    {
                        let rst = Segment {
                            src: SocketAddrV4::new(d.ipv4, seg.dst_port),
                            dst: seg.src,
                            seq: seg.ack,
                            ack: 0,
                            flags: TCP_RST,
                            payload: &[],
                        };
                        (Some(rst.packet()), None)
                    }
                    _ => (None, None),
                };
                if let Some(reply) = reply {
                    d.wg.encapsulate(&reply, &mut tx);
                    flush(&mut tx, socket, &mut t.send_errors);
                }
                if let Some(end) = end {
                    d.fetches.remove(&seg.dst_port);
                    match end {
                        FetchEnd::Ok(took) => t.fetch_ms.push(took.as_secs_f64() * 1000.0),
                        FetchEnd::Failed => t.fetch_failed += 1,
                    }
                }
            }
        }
        let now = Instant::now();
        if connect_time.is_none()
            && (connected == devices.len() || now.duration_since(start) > CONNECT_TIMEOUT)
        {
            connect_time = Some(now.duration_since(start));
            load_start = Some(now);
            dns_pace = Pace::new(dns_rate, now);
            fetch_pace = Pace::new(fetch_rate, now);
        }
        if now.duration_since(last_tick) >= TIMER_TICK {
            last_tick = now;
            for d in &mut devices {
                d.wg.update_timers(&mut tx);
                let before = d.pending.len();
                d.pending.retain(|_, sent| sent.elapsed() < DNS_TIMEOUT);
                t.dns_timeouts += (before - d.pending.len()) as u64;
                let mut ended = Vec::new();
                for (port, f) in &mut d.fetches {
                    let (again, end) = f.tick(now);
                    if let Some(p) = again {
                        d.wg.encapsulate(&p, &mut tx);
                    }
                    if end.is_some() {
                        ended.push(*port);
                    }
                }
                for port in ended {
                    d.fetches.remove(&port);
                    t.fetch_failed += 1;
                }
                flush(&mut tx, &sockets[d.socket], &mut t.send_errors);
            }
        }
        let Some(ls) = load_start else {
            continue;
        };
        if now.duration_since(ls).as_secs_f64() >= seconds {
            let quiet = devices
                .iter()
                .all(|d| d.pending.is_empty() && d.fetches.is_empty());
            if quiet || now.duration_since(ls) >= Duration::from_secs_f64(seconds) + FETCH_TIMEOUT {
                break;
            }
            continue;
        }
        if connected == 0 {
            continue;
        }
        let n = devices.len();
        for _ in 0..churn_pace.take(now) {
            for k in 0..churn {
                let i = next_churn % n;
                next_churn += 1;
                let d = &mut devices[i];
                if d.revoked {
                    continue;
                }
                if k % 2 == 0 {
                    // Roams: its datagrams come from another address from now on.
                    d.socket = (d.socket + 1) % sockets.len();
                    d.wg.force_handshake(&mut tx);
                    flush(&mut tx, &sockets[d.socket], &mut t.send_errors);
                    t.roams += 1;
                } else {
                    match registry.revoke(&d.id, unix_now()) {
                        Ok(_) => {
                            t.revokes += 1;
                            d.revoked = true;
                            if d.connected {
                                d.connected = false;
                                connected -= 1;
                            }
                            reenroll.push_back((now + REENROLL_AFTER, i));
                        }
                        Err(_) => t.churn_errors += 1,
                    }
                }
            }
        }
        while reenroll.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, i)) = reenroll.pop_front() else {
                break;
            };
            let d = &mut devices[i];
            d.generation += 1;
            let key = device_key(seed ^ (d.generation << 32), i as u64);
            let new = NewDevice {
                name: None,
                email: format!("load{i}@example.com"),
                user_name: None,
                groups: Vec::new(),
                attributes: Vec::new(),
                vnet_id: None,
                public_key: key.public_key(),
            };
            match registry.enroll(new, unix_now()) {
                Ok(enrolled) => {
                    t.reenrolls += 1;
                    d.id = enrolled.id;
                    d.ipv4 = enrolled.ipv4;
                    d.revoked = false;
                    d.pending.clear();
                    d.fetches.clear();
                    d.wg = Initiator::new(*key.to_bytes(), gw_public, to, None, i as u32 + 1);
                    // The gateway learns of it on its next registry poll; boringtun retries.
                    d.wg.force_handshake(&mut tx);
                    flush(&mut tx, &sockets[d.socket], &mut t.send_errors);
                }
                Err(_) => t.churn_errors += 1,
            }
        }
        for _ in 0..dns_pace.take(now) {
            let d = &mut devices[next_dns % n];
            next_dns += 1;
            if !d.connected {
                continue;
            }
            d.next_id = d.next_id.wrapping_add(1);
            let id = d.next_id;
            let q = dns_query(id, &dns_name);
            let port = 10_000 + (id % 50_000);
            d.wg.encapsulate(&ipv4_udp(d.ipv4, port, dns_server, &q), &mut tx);
            flush(&mut tx, &sockets[d.socket], &mut t.send_errors);
            d.pending.insert(id, Instant::now());
            t.dns_sent += 1;
        }
        for _ in 0..fetch_pace.take(now) {
            let d = &mut devices[next_fetch % n];
            next_fetch += 1;
            if !d.connected {
                continue;
            }
            d.next_port = d.next_port.checked_add(1).unwrap_or(20_000);
            let port = d.next_port;
            let f = Fetch {
                local: SocketAddrV4::new(d.ipv4, port),
                remote: fetch_to,
                iss: u32::from(port).wrapping_mul(2_654_435_761),
                rcv_nxt: None,
                started: now,
                last_sent: now,
                head: Vec::new(),
            };
            d.wg.encapsulate(&f.syn().packet(), &mut tx);
            flush(&mut tx, &sockets[d.socket], &mut t.send_errors);
            d.fetches.insert(port, f);
            t.fetches += 1;
        }
    }
    let lost_at_end: u64 = devices.iter().map(|d| d.pending.len() as u64).sum();
    let fetches_left: u64 = devices.iter().map(|d| d.fetches.len() as u64).sum();
    t.dns_ms.sort_by(|a, b| a.total_cmp(b));
    t.fetch_ms.sort_by(|a, b| a.total_cmp(b));
    let connect = connect_time.unwrap_or_default().as_secs_f64();
    println!(
        "{{\"devices\":{},\"connected\":{},\"connect_seconds\":{:.3},\"handshakes_per_sec\":{:.0},\
         \"dns_sent\":{},\"dns_answered\":{},\"dns_p50_ms\":{:.3},\"dns_p99_ms\":{:.3},\
         \"dns_errors\":{},\"dns_timeouts\":{},\"fetches\":{},\"fetched\":{},\
         \"fetch_p50_ms\":{:.3},\"fetch_p99_ms\":{:.3},\"fetch_errors\":{},\"send_errors\":{},\
         \"roams\":{},\"revokes\":{},\"reenrolls\":{},\"churn_errors\":{}}}",
        devices.len(),
        connected,
        connect,
        connected as f64 / connect.max(1e-9),
        t.dns_sent,
        t.dns_ms.len(),
        percentile(&t.dns_ms, 0.5),
        percentile(&t.dns_ms, 0.99),
        t.dns_failed,
        t.dns_timeouts + lost_at_end,
        t.fetches,
        t.fetch_ms.len(),
        percentile(&t.fetch_ms, 0.5),
        percentile(&t.fetch_ms, 0.99),
        t.fetch_failed + fetches_left,
        t.send_errors,
        t.roams,
        t.revokes,
        t.reenrolls,
        t.churn_errors
    );
    Ok(())
}

/// CPU time this thread has used: what the responder costs a core, whatever else the machine
/// runs (wall time would count the time other processes had the core).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn responder(opts: &Opts) -> Result<()> {
    let count: u64 = opts.get("count", Some(1000))?;
    let seconds: f64 = opts.get("seconds", Some(5.0))?;
    let server = device_key(0, u64::MAX);
    let mut gw: Endpoint<()> = Endpoint::new(*server.to_bytes());
    let gw_public = gw.public_key();
    let to: SocketAddr = "198.51.100.1:51820".parse()?;
    let mut devices = Vec::new();
    for n in 0..count {
        let key = device_key(0, n);
        let v4 = Ipv4Addr::from(0x6460_0002 + n as u32);
        let v6 = std::net::Ipv6Addr::from(0xfd77_6761_7465_0000_0000_0000_0000_0002 + n as u128);
        gw.upsert_peer(*key.public_key().as_bytes(), v4, v6, ());
        devices.push(Initiator::new(
            *key.to_bytes(),
            gw_public,
            to,
            None,
            n as u32 + 1,
        ));
    }
    let mut tx = TransmitQueue::new();
    let mut gw_tx = TransmitQueue::new();
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    // The endpoint's clock: one second per HANDSHAKE_RATE_LIMIT initiations, from many sources,
    // so what is measured is the handshake work, not the flood thresholds.
    let mut clock = Instant::now();
    let mut done = 0u64;
    let mut refused = 0u64;
    let start = Instant::now();
    let mut work = Duration::ZERO;
    while start.elapsed().as_secs_f64() < seconds {
        for (n, d) in devices.iter_mut().enumerate() {
            d.force_handshake(&mut tx);
            let Some(dg) = tx.datagrams().first() else {
                continue;
            };
            let init = tx.bytes()[dg.range.clone()].to_vec();
            tx.clear();
            let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xc633_6400 + n as u32)), 4000);
            let t = thread_cpu();
            let r = gw.handle_datagram(from, &init, clock, &mut scratch, &mut gw_tx);
            work += thread_cpu().saturating_sub(t);
            // Only a handshake response counts (a cookie reply would mean the limits were hit).
            let answered = gw_tx
                .datagrams()
                .first()
                .is_some_and(|d| gw_tx.bytes()[d.range.start] == 2 && d.range.len() == 92);
            if r == Received::Nothing && answered {
                done += 1;
            } else {
                refused += 1;
            }
            gw_tx.clear();
            if done.is_multiple_of(waygate_wg::HANDSHAKE_RATE_LIMIT) {
                clock += Duration::from_secs(1);
                gw.update_timers(clock, &mut gw_tx);
                gw_tx.clear();
            }
        }
    }
    println!(
        "{{\"devices\":{count},\"handshakes\":{done},\"refused\":{refused},\
         \"responder_seconds\":{:.3},\"handshakes_per_sec_per_core\":{:.0}}}",
        work.as_secs_f64(),
        done as f64 / work.as_secs_f64().max(1e-9)
    );
    Ok(())
}
