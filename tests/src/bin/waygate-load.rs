//! Many WireGuard devices in one process, for scale benchmarks (scripts/bench-scale.sh).
//!
//!     waygate-load enroll --data-dir DIR --count N [--seed S]
//!         enrolls N devices (keys derived from S and their number) in one registry transaction
//!     waygate-load run --data-dir DIR --to HOST:PORT --count N [--seed S] [--bind IP,IP..]
//!                      [--seconds 10] [--dns-rate 1000] [--dns-name NAME] [--dns-server IP]
//!         N devices (the first N enrolled with S) over one UDP socket per --bind address:
//!         every device handshakes, then DNS queries go out at --dns-rate a second, spread over
//!         the devices, for --seconds
//!     waygate-load responder --count N [--seconds 5]
//!         the responder's handshake work on this thread: N devices' initiations handled by a
//!         gateway endpoint in process, its flood thresholds never reached
//!
//! Each prints one JSON line. Only the device's keys are derived from the seed: the same seed
//! and count give the same devices to `enroll` and `run`.

// A lab tool on the real clock: it times what it measures.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
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
    ipv4: Ipv4Addr,
    socket: usize,
    connected: bool,
    /// DNS id -> when it was sent.
    pending: HashMap<u16, Instant>,
    next_id: u16,
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

fn ipv4_udp(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&src_port.to_be_bytes());
    p[22..24].copy_from_slice(&53u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let sum: u32 = p[..20]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    p[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    p
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

fn run(opts: &Opts) -> Result<()> {
    let dir: PathBuf = opts.get("data-dir", None)?;
    let to: SocketAddr = opts.get("to", None)?;
    let count: u64 = opts.get("count", None)?;
    let seed: u64 = opts.get("seed", Some(1))?;
    let seconds: f64 = opts.get("seconds", Some(10.0))?;
    let dns_rate: f64 = opts.get("dns-rate", Some(1000.0))?;
    let dns_name: String = opts.get("dns-name", Some("example.com".to_string()))?;
    let tunnel = tunnel();
    let dns_server: Ipv4Addr = opts.get("dns-server", Some(tunnel.gateway_ipv4()))?;
    let binds: String = opts.get("bind", Some("0.0.0.0".to_string()))?;

    let registry = Registry::open(&dir, &tunnel)?;
    let by_key: HashMap<PublicKey, Ipv4Addr> = registry
        .active_devices()?
        .into_iter()
        .map(|d| (d.public_key, d.ipv4))
        .collect();
    drop(registry);
    let server = waygate_registry::datadir::load_or_create_server_key(&dir)?;
    let gw_public = *server.public_key().as_bytes();

    let mut sockets = Vec::new();
    for ip in binds.split(',') {
        let ip: IpAddr = ip.parse().with_context(|| format!("--bind {ip}"))?;
        let s = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        s.set_nonblocking(true)?;
        sockets.push(s);
    }
    let mut devices = Vec::new();
    for n in 0..count {
        let key = device_key(seed, n);
        let ipv4 = *by_key
            .get(&key.public_key())
            .with_context(|| format!("device {n} of seed {seed} is not enrolled"))?;
        devices.push(Device {
            // Index n + 1: replies are matched to their device by it.
            wg: Initiator::new(*key.to_bytes(), gw_public, to, None, n as u32 + 1),
            ipv4,
            socket: n as usize % sockets.len(),
            connected: false,
            pending: HashMap::new(),
            next_id: 0,
        });
    }

    let mut tx = TransmitQueue::new();
    let mut send_errors = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut latencies: Vec<f64> = Vec::new();
    let mut dns_sent = 0u64;
    let mut dns_failed = 0u64;
    let mut dns_timeouts = 0u64;
    let mut connected = 0usize;

    let start = Instant::now();
    for d in &mut devices {
        d.wg.force_handshake(&mut tx);
        flush(&mut tx, &sockets[d.socket], &mut send_errors);
    }
    let mut connect_time = None;
    let mut dns_start = None;
    let mut last_tick = Instant::now();
    let mut next_query = 0usize;
    let mut queries_due = 0.0f64;
    let mut last_due = Instant::now();
    loop {
        let now = Instant::now();
        let mut idle = true;
        for (si, socket) in sockets.iter().enumerate() {
            for _ in 0..256 {
                let (len, from) = match socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                };
                idle = false;
                let Some(idx) = buf.get(4..8) else { continue };
                let idx = u32::from_le_bytes([idx[0], idx[1], idx[2], idx[3]]) >> 8;
                let Some(d) = devices.get_mut((idx as usize).wrapping_sub(1)) else {
                    continue;
                };
                let kind = buf[0];
                let got = d.wg.handle_datagram(from, &buf[..len], &mut out, &mut tx);
                flush(&mut tx, &sockets[si], &mut send_errors);
                if kind == 3 && !d.connected {
                    // A cookie reply: answer it at once with the cookie.
                    d.wg.force_handshake(&mut tx);
                    flush(&mut tx, &sockets[si], &mut send_errors);
                }
                if !d.connected && d.wg.stats().since_handshake.is_some() {
                    d.connected = true;
                    connected += 1;
                }
                if let FromGateway::Packet(n) = got {
                    // IPv4 UDP from port 53: a DNS answer; its id says which query.
                    if n >= 28 + 12 && out[9] == 17 && out[20..22] == [0, 53] {
                        let id = u16::from_be_bytes([out[28], out[29]]);
                        if let Some(sent) = d.pending.remove(&id) {
                            if out[31] & 0x0f == 0 {
                                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                            } else {
                                dns_failed += 1;
                            }
                        }
                    }
                }
            }
        }
        if connect_time.is_none()
            && (connected == devices.len() || now.duration_since(start) > CONNECT_TIMEOUT)
        {
            connect_time = Some(now.duration_since(start));
            dns_start = Some(now);
            last_due = now;
        }
        if now.duration_since(last_tick) >= TIMER_TICK {
            last_tick = now;
            for d in &mut devices {
                d.wg.update_timers(&mut tx);
                flush(&mut tx, &sockets[d.socket], &mut send_errors);
                let before = d.pending.len();
                d.pending.retain(|_, sent| sent.elapsed() < DNS_TIMEOUT);
                dns_timeouts += (before - d.pending.len()) as u64;
            }
        }
        if let Some(ds) = dns_start {
            if now.duration_since(ds).as_secs_f64() >= seconds {
                if devices.iter().all(|d| d.pending.is_empty())
                    || now.duration_since(ds).as_secs_f64() >= seconds + 2.0
                {
                    break;
                }
            } else {
                queries_due += now.duration_since(last_due).as_secs_f64() * dns_rate;
                last_due = now;
                while queries_due >= 1.0 && connected > 0 {
                    queries_due -= 1.0;
                    let n = devices.len();
                    let d = &mut devices[next_query % n];
                    next_query += 1;
                    if !d.connected {
                        continue;
                    }
                    d.next_id = d.next_id.wrapping_add(1);
                    let id = d.next_id;
                    let q = dns_query(id, &dns_name);
                    let port = 10_000 + (id % 50_000);
                    d.wg.encapsulate(&ipv4_udp(d.ipv4, port, dns_server, &q), &mut tx);
                    flush(&mut tx, &sockets[d.socket], &mut send_errors);
                    d.pending.insert(id, Instant::now());
                    dns_sent += 1;
                    idle = false;
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let lost_at_end: u64 = devices.iter().map(|d| d.pending.len() as u64).sum();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let connect = connect_time.unwrap_or_default().as_secs_f64();
    println!(
        "{{\"devices\":{},\"connected\":{},\"connect_seconds\":{:.3},\"handshakes_per_sec\":{:.0},\
         \"dns_sent\":{},\"dns_answered\":{},\"dns_p50_ms\":{:.3},\"dns_p99_ms\":{:.3},\
         \"dns_errors\":{},\"dns_timeouts\":{},\"send_errors\":{}}}",
        devices.len(),
        connected,
        connect,
        connected as f64 / connect.max(1e-9),
        dns_sent,
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        dns_failed,
        dns_timeouts + lost_at_end,
        send_errors
    );
    Ok(())
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
            let t = Instant::now();
            let r = gw.handle_datagram(from, &init, clock, &mut scratch, &mut gw_tx);
            work += t.elapsed();
            if r == Received::Nothing && !gw_tx.is_empty() {
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
