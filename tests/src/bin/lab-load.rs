//! Load that one device puts on the gateway, for the lab's fairness and memory tests.
//!
//! ```text
//! lab-load hold ADDR --count N [--dns-query] [--report FILE] [--seconds S]
//! lab-load dns-flood SERVER --rate R --seconds S [--garbage] [--report FILE]
//! lab-load udp-spray ADDR --count N [--report FILE]
//! lab-load egress-watch ADDR --seconds S [--every-ms M] [--report FILE]
//! ```
//!
//! `hold` opens N TCP connections to ADDR one after another (2 s connect timeout each), with
//! `--dns-query` sends a DNS query over each and reads its answer, writes `opened K failed F
//! answered A` to FILE (or stdout), then holds the connections for S seconds (default: until
//! killed) and closes them.
//!
//! `dns-flood` sends R queries per second for fresh random names to SERVER over UDP for S seconds
//! (`--garbage`: random bytes that are no DNS message), and reports `sent N answered A servfail
//! S` once done.
//!
//! `udp-spray` sends one datagram to a UDP echo at ADDR from each of N sockets (N flows, each
//! from its own source port), waits up to 2 s for the echoes and reports `sent N answered A`.
//!
//! `egress-watch` opens a new UDP flow every M ms (default 50) for S seconds: a fresh socket
//! sends one datagram to a UDP whoami at ADDR and waits up to M ms for its answer. It writes one
//! line per flow, `UNIX_SECONDS SOURCE` (the source address the whoami saw, `-` for no answer),
//! which shows when a device's new flows moved to another egress address.
// A load generator paces itself by the wall clock.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("hold") => hold(&args[1..]),
        Some("dns-flood") => dns_flood(&args[1..]),
        Some("udp-spray") => udp_spray(&args[1..]),
        Some("egress-watch") => egress_watch(&args[1..]),
        _ => Err("usage: lab-load hold ADDR --count N [--dns-query] [--report FILE] [--seconds S] | lab-load dns-flood SERVER --rate R --seconds S [--garbage] [--report FILE] | lab-load udp-spray ADDR --count N [--report FILE] | lab-load egress-watch ADDR --seconds S [--every-ms M] [--report FILE]".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab-load: {e}");
            ExitCode::from(2)
        }
    }
}

/// Flags after the positional address: `--name value` pairs and bare `--name` switches.
fn flags(args: &[String]) -> Result<(SocketAddr, HashMap<String, String>), String> {
    let addr = args
        .first()
        .ok_or("missing address")?
        .parse()
        .map_err(|e| format!("address: {e}"))?;
    let mut out = HashMap::new();
    let mut it = args[1..].iter().peekable();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected {flag}"))?;
        let value = match it.peek() {
            Some(v) if !v.starts_with("--") => it.next().cloned().unwrap_or_default(),
            _ => String::new(),
        };
        out.insert(name.to_string(), value);
    }
    Ok((addr, out))
}

fn number(flags: &HashMap<String, String>, name: &str) -> Result<Option<u64>, String> {
    flags
        .get(name)
        .map(|v| v.parse().map_err(|e| format!("--{name} {v}: {e}")))
        .transpose()
}

/// An unbound UDP socket of ADDR's family, on any port.
fn udp_socket(to: SocketAddr) -> Result<UdpSocket, String> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|e| format!("{e}"))?;
    UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))
}

fn udp_spray(args: &[String]) -> Result<(), String> {
    let (addr, flags) = flags(args)?;
    let count = number(&flags, "count")?.ok_or("--count is required")?;
    let mut sockets = Vec::new();
    let mut sent = 0u64;
    for i in 0..count {
        let s = udp_socket(addr)?;
        s.set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        if s.send_to(format!("spray {i}").as_bytes(), addr).is_ok() {
            sent += 1;
        }
        sockets.push(Some(s));
    }
    let mut answered = 0u64;
    let mut buf = [0u8; 1500];
    let end = Instant::now() + Duration::from_secs(2);
    while answered < sent && Instant::now() < end {
        for slot in &mut sockets {
            if slot.as_ref().is_some_and(|s| s.recv(&mut buf).is_ok()) {
                answered += 1;
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    report(&flags, &format!("sent {sent} answered {answered}"))
}

/// The `"src"` of a whoami answer, `{"src":"IP","port":N}`.
fn whoami_source(answer: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(answer).ok()?;
    let rest = text.split("\"src\":\"").nth(1)?;
    let src = rest.split('"').next()?;
    (!src.is_empty()).then(|| src.to_string())
}

fn egress_watch(args: &[String]) -> Result<(), String> {
    let (addr, flags) = flags(args)?;
    let seconds = number(&flags, "seconds")?.ok_or("--seconds is required")?;
    let every = Duration::from_millis(number(&flags, "every-ms")?.unwrap_or(50).max(1));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut lines = String::new();
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        let started = Instant::now();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| format!("clock: {e}"))?
            .as_secs_f64();
        let s = udp_socket(addr)?;
        s.set_read_timeout(Some(every))
            .map_err(|e| format!("timeout: {e}"))?;
        let src = match s.send_to(b"whoami", addr).and_then(|_| s.recv(&mut buf)) {
            Ok(n) => whoami_source(&buf[..n]).unwrap_or_else(|| "-".to_string()),
            Err(_) => "-".to_string(),
        };
        lines.push_str(&format!("{at:.3} {src}\n"));
        if let Some(rest) = every.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    match flags.get("report") {
        Some(path) => std::fs::write(path, lines).map_err(|e| format!("{path}: {e}")),
        None => {
            print!("{lines}");
            Ok(())
        }
    }
}

fn report(flags: &HashMap<String, String>, line: &str) -> Result<(), String> {
    match flags.get("report") {
        Some(path) => std::fs::write(path, format!("{line}\n")).map_err(|e| format!("{path}: {e}")),
        None => {
            println!("{line}");
            Ok(())
        }
    }
}

/// A DNS query for `name` (type A, recursion desired).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn hold(args: &[String]) -> Result<(), String> {
    let (addr, flags) = flags(args)?;
    let count = number(&flags, "count")?.ok_or("--count is required")?;
    let query = flags.contains_key("dns-query");
    let (mut opened, mut failed, mut answered) = (0u64, 0u64, 0u64);
    let mut held = Vec::new();
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                opened += 1;
                held.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    if query {
        // All queries first, then all answers: the round trips overlap.
        for (i, s) in held.iter_mut().enumerate() {
            let q = dns_query(i as u16, &format!("h{i}.example"));
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            let _ = s.write_all(&framed);
        }
        for s in &mut held {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_ok() {
                let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut body).is_ok() {
                    answered += 1;
                }
            }
        }
    }
    report(
        &flags,
        &format!("opened {opened} failed {failed} answered {answered}"),
    )?;
    match number(&flags, "seconds")? {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    drop(held);
    Ok(())
}

fn dns_flood(args: &[String]) -> Result<(), String> {
    let (server, flags) = flags(args)?;
    let rate = number(&flags, "rate")?.ok_or("--rate is required")?.max(1);
    let garbage = flags.contains_key("garbage");
    let seconds = number(&flags, "seconds")?.ok_or("--seconds is required")?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let socket = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking: {e}"))?;
    let seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut rng = seed;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let (mut sent, mut answered, mut servfail) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let q = if garbage {
                // A header claiming one question, then bytes that are no name.
                let mut g = rng.to_be_bytes().to_vec();
                g[2..4].copy_from_slice(&[0x01, 0x00]);
                g.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0xfd]);
                g
            } else {
                dns_query(rng as u16, &format!("f{rng:x}.flood.example"))
            };
            if socket.send_to(&q, server).is_ok() {
                sent += 1;
            } else {
                break;
            }
        }
        while let Ok(n) = socket.recv(&mut buf) {
            if n >= 4 {
                answered += 1;
                if buf[3] & 0x0f == 2 {
                    servfail += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    report(
        &flags,
        &format!("sent {sent} answered {answered} servfail {servfail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whoami_answers_give_their_source() {
        assert_eq!(
            whoami_source(br#"{"src":"192.0.2.10","port":40000}"#).as_deref(),
            Some("192.0.2.10")
        );
        assert_eq!(whoami_source(br#"{"port":1}"#), None);
        assert_eq!(whoami_source(br#"{"src":"","port":1}"#), None);
        assert_eq!(whoami_source(&[0xff, 0xfe]), None);
    }
}
