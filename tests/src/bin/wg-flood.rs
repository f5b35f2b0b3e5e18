//! A WireGuard handshake flood that answers cookies, from one UDP socket: initiations from
//! random static keys the responder does not know (each costs it X25519 work to find that out),
//! with a valid MAC1, and with a valid MAC2 from the first cookie reply on (refreshed by every
//! later reply, dropped after 120 s). Prints counts as JSON when done.
//!
//! `--replay-key BASE64` (an enrolled device's private key) sends instead one initiation of that
//! device, the same bytes every time up to the MAC2 (same sender index, ephemeral and a
//! timestamp a minute older than now): what an attacker who captured the device's initiation
//! can send. `--sockets N` spreads the datagrams over N sockets (N source ports). Datagrams leave
//! in rounds of 5 ms, one `sendmmsg` per socket, so the flood costs its machine little.
//!
//!     wg-flood --gateway-key BASE64 --to 198.51.100.1:51820 [--rate 20000] [--seconds 10]
//!              [--bind 198.51.100.12:0] [--keys 64] [--replay-key BASE64] [--sockets 1]

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rand::RngCore as _;
use waygate_e2e::wg_flood::{cookie_reply, Responder, COOKIE_LIFETIME, INIT_LEN};
use x25519_dalek::StaticSecret;

/// Sender indices whose mac1 we remember, to open the cookie reply that answers them: at 20,000/s
/// a reply would have to take over 3 s to find its slot reused.
const RING: usize = 1 << 16;
/// Pause between rounds of sending and reading; sends catch up to the rate after it. The flood
/// shares the machine with what it measures (bench-scale's device and gateway on 2 cores), so
/// it must cost little: rounds of 0.5 ms with one `sendto` per datagram and a `recvfrom` per
/// socket per round took 0.45 CPU-s per 8 s with one socket, far more with 64. Every 5 ms, 50
/// datagrams at 10,000/s leave in one `sendmmsg` per socket.
const ROUND: Duration = Duration::from_millis(5);
/// Most datagrams one `sendmmsg` call takes.
const BATCH: usize = 256;

#[derive(Default)]
struct Counts {
    sent: u64,
    sent_with_mac2: u64,
    send_errors: u64,
    cookie_replies: u64,
    cookies_accepted: u64,
    bad_cookie_replies: u64,
    other_datagrams: u64,
    first_cookie_ms: Option<u128>,
}

fn tai64n(now: SystemTime) -> [u8; 12] {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&((1u64 << 62) + 10 + since.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&since.subsec_nanos().to_be_bytes());
    t
}

#[allow(clippy::disallowed_methods)] // a lab tool on the real clock and the OS RNG
fn main() -> Result<()> {
    let mut key: Option<[u8; 32]> = None;
    let mut to: Option<SocketAddr> = None;
    let mut bind: SocketAddr = "0.0.0.0:0".parse().context("default bind")?;
    let mut rate = 20_000u64;
    let mut seconds = 10.0f64;
    let mut keys = 64usize;
    let mut replay: Option<StaticSecret> = None;
    let mut sockets = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--gateway-key" => {
                let k = waygate_keys::PublicKey::from_base64(value.trim())
                    .map_err(|e| anyhow::anyhow!("--gateway-key: {e}"))?;
                key = Some(*k.as_bytes());
            }
            "--to" => to = Some(value.parse().context("--to")?),
            "--bind" => bind = value.parse().context("--bind")?,
            "--rate" => rate = value.parse().context("--rate")?,
            "--seconds" => seconds = value.parse().context("--seconds")?,
            "--keys" => keys = value.parse().context("--keys")?,
            "--sockets" => sockets = value.parse().context("--sockets")?,
            "--replay-key" => {
                let k = waygate_keys::PrivateKey::from_base64(value.trim())
                    .map_err(|e| anyhow::anyhow!("--replay-key: {e}"))?;
                replay = Some(StaticSecret::from(*k.to_bytes()));
            }
            other => bail!("unknown flag {other}"),
        }
    }
    let key = key.context("--gateway-key is required")?;
    let to = to.context("--to is required")?;
    let duration = Duration::try_from_secs_f64(seconds).context("--seconds")?;
    if keys == 0 || rate == 0 || sockets == 0 || duration.is_zero() {
        bail!("--keys, --rate, --sockets and --seconds must be positive");
    }
    let responder = Responder::new(key);

    // Bodies are reused: the responder's work does not depend on them being fresh (a replayed
    // timestamp is only noticed after the X25519 work, and only for known keys).
    let mut rng = rand::rngs::OsRng;
    let now = SystemTime::now();
    let mut bodies: Vec<[u8; INIT_LEN]> = match &replay {
        // Older than the device's live handshake, as a captured initiation is.
        Some(device) => {
            let mut e = [0u8; 32];
            rng.fill_bytes(&mut e);
            let stamp = tai64n(now.checked_sub(Duration::from_secs(60)).unwrap_or(now));
            vec![responder.initiation(device, &StaticSecret::from(e), stamp)]
        }
        None => (0..keys)
            .map(|_| {
                let mut s = [0u8; 32];
                let mut e = [0u8; 32];
                rng.fill_bytes(&mut s);
                rng.fill_bytes(&mut e);
                responder.initiation(&StaticSecret::from(s), &StaticSecret::from(e), tai64n(now))
            })
            .collect(),
    };
    let keys = bodies.len();

    let socks = (0..sockets)
        .map(|_| {
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut mac1s = vec![(u32::MAX, [0u8; 16]); RING];
    let mut cookie: Option<([u8; 16], Instant)> = None;
    let mut sender = rng.next_u32();
    let mut c = Counts::default();
    let mut buf = [0u8; 2048];
    let mut batch = vec![[0u8; INIT_LEN]; BATCH * socks.len()];
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
        if cookie.is_some_and(|(_, at)| at.elapsed() >= COOKIE_LIFETIME) {
            cookie = None;
        }
        let mut first = c.sent + c.send_errors;
        while first < due {
            // This round's datagrams, in order, each stamped into its own slot; datagram n
            // leaves from socket n % sockets.
            let count = ((due - first) as usize).min(BATCH * socks.len());
            let with_mac2 = cookie.is_some();
            for (slot, out) in batch.iter_mut().take(count).enumerate() {
                let n = first as usize + slot;
                let body = &mut bodies[n % keys];
                // A replay keeps its sender index, so its bytes up to MAC2 never change.
                if replay.is_none() {
                    sender = sender.wrapping_add(1);
                }
                let mac1 = responder.stamp(body, sender, cookie.as_ref().map(|(k, _)| k));
                mac1s[sender as usize % RING] = (sender, mac1);
                *out = *body;
            }
            let mut blocked = false;
            for (i, socket) in socks.iter().enumerate() {
                let offset = (socks.len() + i - first as usize % socks.len()) % socks.len();
                let mine: Vec<&[u8; INIT_LEN]> = batch[..count]
                    .iter()
                    .skip(offset)
                    .step_by(socks.len())
                    .collect();
                let (sent, failed) = send_batch(socket, &mine, to);
                c.sent += sent as u64;
                c.send_errors += failed as u64;
                if with_mac2 {
                    c.sent_with_mac2 += sent as u64;
                }
                blocked |= failed > 0;
            }
            first += count as u64;
            if blocked {
                break;
            }
        }
        for socket in &socks {
            loop {
                let n = match socket.recv_from(&mut buf) {
                    Ok((n, _)) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                };
                let Some((idx, reply)) = cookie_reply(&buf[..n]) else {
                    c.other_datagrams += 1;
                    continue;
                };
                c.cookie_replies += 1;
                let (sent_idx, mac1) = mac1s[idx as usize % RING];
                let opened = (sent_idx == idx)
                    .then(|| responder.open_cookie(reply, &mac1))
                    .flatten();
                match opened {
                    Some(k) => {
                        c.cookies_accepted += 1;
                        c.first_cookie_ms.get_or_insert(start.elapsed().as_millis());
                        cookie = Some((k, Instant::now()));
                    }
                    None => c.bad_cookie_replies += 1,
                }
            }
        }
        thread::sleep(ROUND);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"sent\": {}, \"sent_with_mac2\": {}, \"send_errors\": {}, \"cookie_replies\": {}, \
         \"cookies_accepted\": {}, \"bad_cookie_replies\": {}, \"other_datagrams\": {}, \
         \"first_cookie_ms\": {}, \"seconds\": {secs:.3}, \"per_second\": {:.0}}}",
        c.sent,
        c.sent_with_mac2,
        c.send_errors,
        c.cookie_replies,
        c.cookies_accepted,
        c.bad_cookie_replies,
        c.other_datagrams,
        c.first_cookie_ms
            .map_or_else(|| "null".to_string(), |ms| ms.to_string()),
        c.sent as f64 / secs,
    );
    Ok(())
}

/// Sends `datagrams` to `to` with as few `sendmmsg` calls as the kernel allows; how many left and
/// how many did not (a full socket buffer: the rest of the round is counted as not sent).
fn send_batch(socket: &UdpSocket, datagrams: &[&[u8; INIT_LEN]], to: SocketAddr) -> (usize, usize) {
    use std::os::fd::AsRawFd as _;
    let (addr, addr_len) = socket_addr(to);
    let mut iovecs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let mut sent = 0;
    while sent < datagrams.len() {
        let mut headers: Vec<libc::mmsghdr> = iovecs[sent..]
            .iter_mut()
            .map(|iov| {
                // SAFETY: an all-zero msghdr is a valid empty one; the pointers set below
                // outlive the call.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = &addr as *const libc::sockaddr_storage as *mut libc::c_void;
                h.msg_hdr.msg_namelen = addr_len;
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: `headers` points at `iovecs`, `addr` and the datagrams, all alive here.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                0,
            )
        };
        if n <= 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return (sent, datagrams.len() - sent);
        }
        sent += n as usize;
    }
    (sent, 0)
}

/// `to` as a socket address for the kernel.
fn socket_addr(to: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family's own struct is written in.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::write(
                    &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in,
                    sin,
                )
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::write(
                    &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6,
                    sin6,
                )
            };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
