//! `waygate-client enroll`: makes the device's key pair here, sends the public half with the
//! token to the gateway's enrollment listener over TLS pinned to the CA hash in the token, and
//! returns what the gateway answered. A small HTTP/1.1 request written by hand, so the client
//! carries no HTTP stack.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::pin::PinnedCa;

/// Path of the enrollment endpoint (the gateway's `waygate_control::enrollment::ENROLL_PATH`).
pub const ENROLL_PATH: &str = "/v1/enroll";
/// How long connecting, and each read or write, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// What the gateway gives an enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Enrolled {
    /// The device's id.
    pub device_id: String,
    /// The device's name.
    pub name: String,
    /// Tunnel addresses with prefix lengths.
    pub addresses: Vec<String>,
    /// The gateway's WireGuard public key.
    pub gateway_public_key: String,
    /// The gateway's WireGuard endpoint.
    pub endpoint: String,
    /// DNS servers (the gateway's tunnel addresses).
    pub dns: Vec<std::net::IpAddr>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// The virtual network, if not the default.
    pub vnet: Option<String>,
}

/// Where the enrollment listener is: `https://HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (443 unless given).
    pub port: u16,
}

impl std::str::FromStr for ServerUrl {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow::anyhow!("--server {url:?}: expected https://HOST:PORT"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            anyhow::bail!("--server {url:?}: expected https://HOST:PORT with no path");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow::anyhow!("--server {url:?}: unclosed ["))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| anyhow::anyhow!("--server {url:?}: bad port {p:?}"))?,
            None => 443,
        };
        if host.is_empty() {
            anyhow::bail!("--server {url:?}: no host");
        }
        Ok(ServerUrl {
            host: host.to_string(),
            port,
        })
    }
}

/// Sends the enrollment and returns the gateway's answer.
pub fn enroll(
    server: &ServerUrl,
    token: &str,
    ca_sha256: [u8; 32],
    public_key: &str,
) -> anyhow::Result<Enrolled> {
    let body = serde_json::json!({ "token": token, "public_key": public_key }).to_string();
    let (status, answer) = post(server, ca_sha256, ENROLL_PATH, &body)?;
    let value: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| {
        anyhow::anyhow!("the enrollment listener answered HTTP {status} with no JSON ({e})")
    })?;
    if !(200..300).contains(&status) || value["success"] != serde_json::Value::Bool(true) {
        let message = value["errors"][0]["message"]
            .as_str()
            .unwrap_or("no reason given");
        anyhow::bail!("the gateway refused the enrollment (HTTP {status}): {message}");
    }
    serde_json::from_value(value["result"].clone())
        .map_err(|e| anyhow::anyhow!("the gateway's answer is incomplete: {e}"))
}

/// POSTs JSON over TLS pinned to the CA; returns the status and the body.
fn post(
    server: &ServerUrl,
    ca_sha256: [u8; 32],
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let target = format!("{}:{}", bracket(&server.host), server.port);
    let addrs: Vec<_> = (server.host.as_str(), server.port)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", server.host))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        anyhow::anyhow!(
            "cannot connect to {target}: {}",
            last.map_or_else(|| "no address".to_string(), |e| e.to_string())
        )
    })?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let config = Arc::new(PinnedCa::new(ca_sha256).client_config()?);
    let name = rustls::pki_types::ServerName::try_from(server.host.clone())
        .map_err(|e| anyhow::anyhow!("--server host {:?}: {e}", server.host))?;
    let conn = rustls::ClientConnection::new(config, name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes())
        .and_then(|()| tls.flush())
        .map_err(|e| tls_error(&target, e))?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() > MAX_ANSWER {
                    anyhow::bail!("the answer from {target} is larger than {MAX_ANSWER} bytes");
                }
                if let Some(done) = complete(&answer) {
                    answer.truncate(done);
                    break;
                }
            }
            // A server that closes without close_notify after a complete answer is fine.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(tls_error(&target, e)),
        }
    }
    parse_response(&answer).ok_or_else(|| anyhow::anyhow!("{target} answered no HTTP response"))
}

fn tls_error(target: &str, e: std::io::Error) -> anyhow::Error {
    // The pinning verifier's own words, without rustls's "unexpected error: " in front.
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::General(message)) => anyhow::anyhow!("TLS with {target}: {message}"),
        _ => anyhow::anyhow!("TLS with {target}: {e}"),
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The length of a complete response with a `Content-Length`, once it is all there.
fn complete(bytes: &[u8]) -> Option<usize> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let length: usize = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })?;
    (bytes.len() >= end + length).then_some(end + length)
}

/// Status and body of a response (body up to `Content-Length`, or to the end).
fn parse_response(bytes: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let status: u16 = head
        .lines()
        .next()?
        .strip_prefix("HTTP/1.")?
        .get(2..5)?
        .parse()
        .ok()?;
    let body = match complete(bytes) {
        Some(len) => bytes[end..len].to_vec(),
        None => bytes[end..].to_vec(),
    };
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        let u: ServerUrl = "https://198.51.100.1:8444".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("198.51.100.1", 8444));
        let u: ServerUrl = "https://[2001:db8::1]:8444/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 8444));
        let u: ServerUrl = "https://gw.example.com".parse().unwrap();
        assert_eq!(u.port, 443);
        for bad in [
            "http://x:1",
            "https://",
            "https://x:y",
            "https://x:1/path",
            "x:1",
        ] {
            assert!(bad.parse::<ServerUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_parse() {
        let r = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(complete(r), Some(r.len()));
        assert_eq!(parse_response(r), Some((403, b"{}".to_vec())));
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}"),
            None
        );
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(parse_response(b"HTTP/1.1 2\r\n\r\n"), None);
    }
}
