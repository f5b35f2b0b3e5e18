//! A WireGuard handshake flood that answers cookies, from one UDP socket: initiations from
//! random static keys the responder does not know (each costs it X25519 work to find that out),
//! with a valid MAC1, and with a valid MAC2 from the first cookie reply on (refreshed by every
//! later reply, dropped after 120 s). Prints counts as JSON when done.
//!
//! `--replay-key BASE64` (an enrolled device's private key) sends instead one initiation of that
//! device, the same bytes every time up to the MAC2 (same sender index, ephemeral and a
//! timestamp a minute older than now): what an attacker who captured the device's initiation
//! can send. `--sockets N` spreads the datagrams over N sockets (N source ports).
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
/// Pause between rounds of sending and reading; sends catch up to the rate after it.
const ROUND: Duration = Duration::from_micros(500);

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
        while c.sent + c.send_errors < due {
            let n = c.sent + c.send_errors;
            let body = &mut bodies[(n as usize) % keys];
            // A replay keeps its sender index, so its bytes up to MAC2 never change.
            if replay.is_none() {
                sender = sender.wrapping_add(1);
            }
            let mac1 = responder.stamp(body, sender, cookie.as_ref().map(|(k, _)| k));
            mac1s[sender as usize % RING] = (sender, mac1);
            let socket = &socks[(n as usize) % socks.len()];
            match socket.send_to(body, to) {
                Ok(_) => {
                    c.sent += 1;
                    if cookie.is_some() {
                        c.sent_with_mac2 += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.send_errors += 1;
                    break;
                }
                Err(_) => c.send_errors += 1,
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
