//! The lab's origins and probes, so the lab depends on nothing but this binary, iperf3 and curl.
//!
//! ```text
//! lab-origin serve [--http ADDR]... [--udp-echo ADDR]... [--udp-whoami ADDR]... [--dns ADDR]...
//!                  [--dns-floor ADDR]...
//! lab-origin udp-probe ADDR [--payload TEXT] [--timeout-ms N] [--bind ADDR]
//! ```
//!
//! `serve` runs until killed:
//! - HTTP (`--http`, e.g. `0.0.0.0:80`): `GET /` answers `{"src":"IP","port":N}` with the client's
//!   address; `GET /bytes/N` answers N bytes (for download tests); anything else is 404.
//!   One thread per connection, `Connection: close`.
//! - UDP echo (`--udp-echo`, e.g. `0.0.0.0:7`): every datagram is sent back unchanged.
//! - UDP whoami (`--udp-whoami`): every datagram is answered with `{"src":"IP","port":N}`.
//! - DNS (`--dns`, UDP and TCP): the lab's fixed zone (see `waygate_e2e::dns_origin`).
//! - DNS floor (`--dns-floor`, UDP): REFUSED to everything with no DNS work, the benchmark's
//!   measure of the kernel's share of a query (see `waygate_e2e::dns_floor`).
//!
//! `udp-probe` sends one datagram (retrying every 200 ms) and prints the first reply on stdout; it
//! exits 0 on a reply and 1 when `--timeout-ms` (default 2000) passes without one.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

/// Largest `/bytes/N` answer (1 GiB), so a typo cannot make the origin stream forever.
const MAX_BYTES: u64 = 1 << 30;
/// Largest request head the HTTP origin reads.
const MAX_HEAD: usize = 16 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("udp-probe") => udp_probe(&args[1..]),
        _ => Err("usage: lab-origin serve [--http ADDR]... [--udp-echo ADDR]... [--udp-whoami ADDR]... | lab-origin udp-probe ADDR [--payload TEXT] [--timeout-ms N] [--bind ADDR]".to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab-origin: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_addr(flag: &str, value: Option<&String>) -> Result<SocketAddr, String> {
    let value = value.ok_or_else(|| format!("{flag} needs an address"))?;
    value
        .parse()
        .map_err(|e| format!("{flag} {value}: not an address: {e}"))
}

fn serve(args: &[String]) -> Result<ExitCode, String> {
    let mut handles = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let addr = parse_addr(flag, it.next())?;
        match flag.as_str() {
            "--http" => {
                let listener =
                    TcpListener::bind(addr).map_err(|e| format!("bind tcp {addr}: {e}"))?;
                handles.push(thread::spawn(move || http_accept(listener)));
            }
            "--udp-echo" | "--udp-whoami" => {
                let socket = UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))?;
                let whoami = flag == "--udp-whoami";
                handles.push(thread::spawn(move || udp_serve(socket, whoami)));
            }
            "--dns" => handles.extend(waygate_e2e::dns_origin::serve(addr)?),
            "--dns-floor" => handles.push(waygate_e2e::dns_floor::serve(addr)?),
            other => return Err(format!("unknown flag {other}")),
        }
        eprintln!("lab-origin: {flag} on {addr}");
    }
    if handles.is_empty() {
        return Err("serve: nothing to serve".into());
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(ExitCode::SUCCESS)
}

fn whoami(peer: SocketAddr) -> String {
    // Dual-stack sockets see IPv4 peers as ::ffff:a.b.c.d; report them as a.b.c.d.
    format!(
        "{{\"src\":\"{}\",\"port\":{}}}",
        peer.ip().to_canonical(),
        peer.port()
    )
}

fn http_accept(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = http_handle(stream) {
                        eprintln!("lab-origin: http: {e}");
                    }
                });
            }
            Err(e) => eprintln!("lab-origin: accept: {e}"),
        }
    }
}

fn http_handle(stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?).take(MAX_HEAD as u64);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers up to the blank line.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let mut out = stream;
    if method != "GET" && method != "HEAD" {
        return respond(&mut out, "405 Method Not Allowed", b"method not allowed\n");
    }
    if path == "/" {
        let body = whoami(peer) + "\n";
        return respond(&mut out, "200 OK", body.as_bytes());
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return respond(&mut out, "400 Bad Request", b"bad length\n");
        };
        if n > MAX_BYTES {
            return respond(&mut out, "400 Bad Request", b"too long\n");
        }
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        )?;
        if method == "GET" {
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let take = left.min(chunk.len() as u64) as usize;
                out.write_all(&chunk[..take])?;
                left -= take as u64;
            }
        }
        return out.flush();
    }
    respond(&mut out, "404 Not Found", b"not found\n")
}

fn respond(out: &mut TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)?;
    out.flush()
}

fn udp_serve(socket: UdpSocket, whoami_mode: bool) {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let sent = if whoami_mode {
                    socket.send_to(whoami(peer).as_bytes(), peer)
                } else {
                    socket.send_to(&buf[..n], peer)
                };
                if let Err(e) = sent {
                    eprintln!("lab-origin: udp send to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("lab-origin: udp recv: {e}"),
        }
    }
}

#[allow(clippy::disallowed_methods)] // a command-line shell: it reads the clock for its timeout
fn udp_probe(args: &[String]) -> Result<ExitCode, String> {
    let target = parse_addr("udp-probe", args.first())?;
    let mut payload = "waygate-probe".to_string();
    let mut timeout = Duration::from_millis(2000);
    let mut bind: Option<SocketAddr> = None;
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--payload" => payload = value.clone(),
            "--timeout-ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|e| format!("--timeout-ms {value}: {e}"))?;
                timeout = Duration::from_millis(ms);
            }
            "--bind" => bind = Some(parse_addr(flag, Some(value))?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let local: SocketAddr = match (bind, target) {
        (Some(b), _) => b,
        (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().map_err(|_| "addr")?,
        (None, SocketAddr::V6(_)) => "[::]:0".parse().map_err(|_| "addr")?,
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if now >= deadline {
            eprintln!("lab-origin: udp-probe {target}: no reply within {timeout:?}");
            return Ok(ExitCode::from(1));
        }
        if let Err(e) = socket.send_to(payload.as_bytes(), target) {
            eprintln!("lab-origin: udp-probe send to {target}: {e}");
        }
        let wait = (deadline - now).min(Duration::from_millis(200));
        socket
            .set_read_timeout(Some(wait))
            .map_err(|e| format!("set timeout: {e}"))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == target => {
                println!("{}", String::from_utf8_lossy(&buf[..n]));
                return Ok(ExitCode::SUCCESS);
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                // ICMP errors (port unreachable) surface as ConnectionRefused on some paths; keep
                // trying until the deadline like for a lost datagram.
                eprintln!("lab-origin: udp-probe recv: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
