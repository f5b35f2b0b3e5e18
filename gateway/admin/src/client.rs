//! The CLI's way to a running gateway: HTTP/1.1 over `<data_dir>/admin.sock`, blocking, one
//! connection per request. [`Client`] implements the control crate's [`Admin`] operations, so
//! the CLI runs the same code whether it talks to the API or to the registry.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;
use waygate_control::ops::{Admin, NewGroup, NewVnet, Posture, SetVnet, User};
use waygate_control::{ControlError, EnrollRequest, Enrolled};
use waygate_registry::{Device, Group, PostureResult, Vnet};

/// How long a request may take before the CLI gives up on the gateway.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the admin API's Unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// `%XX` for every byte outside the unreserved set, for a path segment.
pub fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn transport(what: &str, e: impl std::fmt::Display) -> ControlError {
    ControlError::Transport(format!("{what}: {e}"))
}

impl Client {
    /// A client of the gateway running on `data_dir`, when its socket exists and answers.
    pub fn if_running(data_dir: &Path) -> Option<Client> {
        let socket = crate::socket_path(data_dir);
        let (address, _dir) = crate::addressable(&socket).ok()?;
        UnixStream::connect(&address).ok()?;
        Some(Client { socket })
    }

    /// A client of the socket at `socket` (whether or not anything answers).
    pub fn at(socket: PathBuf) -> Client {
        Client { socket }
    }

    /// Sends one request; returns the envelope's `result`, or the API's error.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Json>,
    ) -> Result<Json, ControlError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| transport("request body", e))?,
            None => Vec::new(),
        };
        let cannot = |e| transport(&format!("cannot connect to {}", self.socket.display()), e);
        let (address, _dir) = crate::addressable(&self.socket).map_err(cannot)?;
        let mut stream = UnixStream::connect(&address).map_err(cannot)?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| transport("socket", e))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: waygate\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(&body))
            .map_err(|e| transport("sending the request", e))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| transport("reading the answer", e))?;
        let (status, body) = parse_response(&raw)?;
        let envelope: Json =
            serde_json::from_slice(body).map_err(|e| transport("the answer is not JSON", e))?;
        if envelope["success"] == Json::Bool(true) {
            return Ok(envelope["result"].clone());
        }
        let message = envelope["errors"]
            .as_array()
            .and_then(|e| e.first())
            .and_then(|e| e["message"].as_str())
            .unwrap_or("the request failed without a message")
            .to_string();
        Err(ControlError::Api { status, message })
    }

    fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Json>,
    ) -> Result<T, ControlError> {
        let result = self.request(method, path, body)?;
        serde_json::from_value(result).map_err(|e| transport("unexpected answer", e))
    }
}

fn json<T: Serialize>(v: &T) -> Result<Json, ControlError> {
    serde_json::to_value(v).map_err(|e| transport("request body", e))
}

/// The status and body of an HTTP/1.1 answer read to its end (the server sends a length).
fn parse_response(raw: &[u8]) -> Result<(u16, &[u8]), ControlError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| transport("answer", "no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|e| transport("answer", e))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| transport("answer", "no status line"))?;
    let mut body = &raw[split + 4..];
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    if let Some(n) = length {
        body = body.get(..n).unwrap_or(body);
    }
    Ok((status, body))
}

impl Admin for Client {
    fn devices(&self) -> Result<Vec<Device>, ControlError> {
        self.typed("GET", "/devices", None)
    }

    fn device(&self, needle: &str) -> Result<Device, ControlError> {
        self.typed("GET", &format!("/devices/{}", percent_encode(needle)), None)
    }

    fn enroll(&self, request: EnrollRequest) -> Result<Enrolled, ControlError> {
        self.typed("POST", "/devices", Some(&json(&request)?))
    }

    fn revoke(&self, needle: &str) -> Result<Device, ControlError> {
        self.typed(
            "DELETE",
            &format!("/devices/{}", percent_encode(needle)),
            None,
        )
    }

    fn set_vnet(&self, needle: &str, vnet: SetVnet) -> Result<Device, ControlError> {
        let path = format!("/devices/{}/vnet", percent_encode(needle));
        self.typed("PUT", &path, Some(&json(&vnet)?))
    }

    fn set_posture(&self, needle: &str, posture: Posture) -> Result<Device, ControlError> {
        let path = format!("/devices/{}/posture", percent_encode(needle));
        self.typed("PUT", &path, Some(&json(&posture)?))
    }

    fn users(&self) -> Result<Vec<User>, ControlError> {
        self.typed("GET", "/users", None)
    }

    fn groups(&self) -> Result<Vec<Group>, ControlError> {
        self.typed("GET", "/groups", None)
    }

    fn create_group(&self, group: NewGroup) -> Result<Group, ControlError> {
        self.typed("POST", "/groups", Some(&json(&group)?))
    }

    fn delete_group(&self, needle: &str) -> Result<Group, ControlError> {
        self.typed(
            "DELETE",
            &format!("/groups/{}", percent_encode(needle)),
            None,
        )
    }

    fn vnets(&self) -> Result<Vec<Vnet>, ControlError> {
        self.typed("GET", "/virtual_networks", None)
    }

    fn create_vnet(&self, vnet: NewVnet) -> Result<Vnet, ControlError> {
        self.typed("POST", "/virtual_networks", Some(&json(&vnet)?))
    }

    fn delete_vnet(&self, needle: &str) -> Result<Vnet, ControlError> {
        let path = format!("/virtual_networks/{}", percent_encode(needle));
        self.typed("DELETE", &path, None)
    }

    fn posture_results(&self, needle: &str) -> Result<Vec<PostureResult>, ControlError> {
        let path = format!("/devices/{}/posture", percent_encode(needle));
        self.typed("GET", &path, None)
    }

    fn posture_rules(&self) -> Result<Vec<Json>, ControlError> {
        self.typed("GET", "/devices/posture", None)
    }

    fn create_posture_rule(&self, rule: Json) -> Result<Json, ControlError> {
        self.request("POST", "/devices/posture", Some(&rule))
    }

    fn delete_posture_rule(&self, id: &str) -> Result<Json, ControlError> {
        let path = format!("/devices/posture/{}", percent_encode(id));
        self.request("DELETE", &path, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_in_a_long_data_dir_is_served_and_reached() {
        let tmp = tempfile::tempdir().unwrap();
        let long = tmp.path().join("d".repeat(100));
        std::fs::create_dir(&long).unwrap();
        let socket = crate::socket_path(&long);
        assert!(socket.as_os_str().len() > 107);
        let listener = crate::server::bind_socket(&socket).unwrap();
        listener.set_nonblocking(false).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{BufRead as _, BufReader};
            // The first connection is `if_running`'s probe, which sends nothing.
            drop(listener.accept().unwrap());
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let body = r#"{"success": true, "errors": [], "messages": [], "result": 7}"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            line
        });
        let client = Client::if_running(&long).expect("the socket answers");
        assert_eq!(client.request("GET", "/status", None).unwrap(), 7);
        assert!(server.join().unwrap().starts_with("GET /status HTTP/1.1"));
    }

    #[test]
    fn answers_and_segments_parse() {
        let raw = b"HTTP/1.1 409 Conflict\r\ncontent-length: 2\r\n\r\n{}trailing";
        let (status, body) = parse_response(raw).unwrap();
        assert_eq!((status, body), (409, &b"{}"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert_eq!(percent_encode("ab+/c=="), "ab%2B%2Fc%3D%3D");
    }
}
