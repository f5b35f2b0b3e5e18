//! The gateway's device API, reached through the tunnel: plain HTTP with JSON on TCP port 80 of
//! the gateway's tunnel address (the first IPv4 DNS server of `client.toml`, else 100.96.0.1).
//! The tunnel authenticates the device, so requests carry no token.
//!
//! Answers are the admin API's envelope `{success, errors: [{code, message, field?}], result}`;
//! a failure becomes an error with the gateway's message.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use waygate_posture::{Facts, PostureRule};

/// The gateway's tunnel address when the client has no `client.toml` (the default pool's).
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);

/// How long one request may take; the API answers from the gateway's registry at once, so a
/// slow answer means a tunnel that is down.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read (a profile with hundreds of posture rules stays far below).
const MAX_ANSWER: u64 = 1024 * 1024;

/// A virtual network the device may choose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnetChoice {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// `GET /v1/profile`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Profile {
    /// The device's id.
    pub device_id: String,
    /// The device's name.
    pub name: String,
    /// Virtual networks it may choose.
    pub vnets: Vec<VnetChoice>,
    /// The one it is in; `None`: the default network.
    pub vnet: Option<String>,
    /// The one `vnet default` returns to; `None`: the default network.
    pub default_vnet: Option<String>,
    /// Posture rules in Cloudflare's shape.
    pub posture_checks: Vec<Json>,
    /// Split tunnel mode and entries.
    pub split_tunnel: Json,
    /// DNS servers.
    pub dns: Vec<IpAddr>,
    /// Local Domain Fallback entries.
    pub local_domain_fallback: Vec<Json>,
}

impl Profile {
    /// The posture rules a Linux client checks (those it cannot read are skipped: a newer
    /// gateway may know types this client does not).
    pub fn linux_checks(&self) -> Vec<PostureRule> {
        self.posture_checks
            .iter()
            .filter_map(|v| {
                let id = v["id"].as_str().unwrap_or_default().to_string();
                waygate_posture::parse_rule(v.clone(), || id).ok()
            })
            .filter(|r| r.applies_to("linux"))
            .collect()
    }
}

/// One check's verdict, as `POST /v1/posture` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The rule's name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why, in the gateway's words.
    pub reason: String,
    /// When a pass stops counting unless reported again (unix seconds).
    pub expires_at: i64,
}

/// `PUT /v1/vnet`'s body and answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VnetBody {
    vnet: Option<String>,
}

/// What the client asks the gateway (the agent's seam for tests).
pub trait Api {
    /// The device's profile.
    fn profile(&self) -> anyhow::Result<Profile>;
    /// Sends facts; the gateway's verdicts by check id.
    fn report(&self, facts: &Facts) -> anyhow::Result<BTreeMap<String, CheckResult>>;
}

/// A client of the device API.
pub struct DeviceApi {
    base: String,
    agent: ureq::Agent,
}

impl DeviceApi {
    /// The API at `http://ADDR` (port 80).
    pub fn new(gateway: IpAddr) -> Self {
        let base = match gateway {
            IpAddr::V4(a) => format!("http://{a}"),
            IpAddr::V6(a) => format!("http://[{a}]"),
        };
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            // Inside the tunnel: never through a proxy from the environment.
            .proxy(None)
            .build();
        DeviceApi {
            base,
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// The API of the gateway the client in `dir` enrolled with.
    pub fn for_dir(dir: &Path) -> anyhow::Result<Self> {
        let gateway = crate::state::read_config(dir)?
            .and_then(|c| c.dns.into_iter().find(IpAddr::is_ipv4))
            .unwrap_or(IpAddr::V4(DEFAULT_GATEWAY));
        Ok(DeviceApi::new(gateway))
    }

    /// Where requests go.
    #[cfg(test)]
    pub fn base(&self) -> &str {
        &self.base
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let sent = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(&b[..]),
            ("PUT", Some(b)) => self
                .agent
                .put(&url)
                .header("content-type", "application/json")
                .send(&b[..]),
            _ => anyhow::bail!("{method} {path}: not a device API call"),
        };
        let mut answer =
            sent.map_err(|e| anyhow::anyhow!("device API {url}: {e} (is the tunnel up?)"))?;
        let status = answer.status().as_u16();
        let raw = answer
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map_err(|e| anyhow::anyhow!("device API {url}: reading the answer: {e}"))?;
        decode(status, &raw).map_err(|e| anyhow::anyhow!("device API {method} {path}: {e}"))
    }

    /// Moves the device into the virtual network `name` (`None`: the default network);
    /// returns the gateway's choice.
    pub fn set_vnet(&self, name: Option<&str>) -> anyhow::Result<Option<String>> {
        let body = serde_json::to_vec(&VnetBody {
            vnet: name.map(str::to_string),
        })?;
        let answer: VnetBody = self.call("PUT", "/v1/vnet", Some(body))?;
        Ok(answer.vnet)
    }
}

impl Api for DeviceApi {
    fn profile(&self) -> anyhow::Result<Profile> {
        self.call("GET", "/v1/profile", None)
    }

    fn report(&self, facts: &Facts) -> anyhow::Result<BTreeMap<String, CheckResult>> {
        self.call("POST", "/v1/posture", Some(serde_json::to_vec(facts)?))
    }
}

/// `waygate-client vnet list [--json]`.
pub fn vnet_list_cmd(dir: &Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let profile = DeviceApi::for_dir(dir)?.profile()?;
    if json {
        let value = serde_json::json!({
            "vnets": profile.vnets,
            "current": profile.vnet,
            "default": profile.default_vnet,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mark = |current: bool| if current { "*" } else { " " };
        println!("{} default", mark(profile.vnet.is_none()));
        for v in &profile.vnets {
            println!(
                "{} {} ({})",
                mark(profile.vnet.as_deref() == Some(v.name.as_str())),
                v.name,
                v.id
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `waygate-client vnet use NAME` and `vnet default`.
pub fn vnet_use_cmd(dir: &Path, name: Option<&str>) -> anyhow::Result<std::process::ExitCode> {
    let now = DeviceApi::for_dir(dir)?.set_vnet(name)?;
    println!("{}", now.as_deref().unwrap_or("default"));
    Ok(std::process::ExitCode::SUCCESS)
}

/// The `result` of an envelope, or its first error's message (with the field at fault).
fn decode<T: DeserializeOwned>(status: u16, raw: &[u8]) -> anyhow::Result<T> {
    let envelope: Json =
        serde_json::from_slice(raw).map_err(|e| anyhow::anyhow!("HTTP {status}, not JSON: {e}"))?;
    if status >= 400 || envelope["success"] != Json::Bool(true) {
        let e = &envelope["errors"][0];
        let message = e["message"].as_str().unwrap_or("no message");
        anyhow::bail!("HTTP {status}: {message}");
    }
    serde_json::from_value(envelope["result"].clone())
        .map_err(|e| anyhow::anyhow!("HTTP {status}, unexpected result: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn envelopes_decode_to_results_or_the_gateways_message() {
        let ok: Option<String> =
            decode(200, br#"{"success": true, "errors": [], "result": "x"}"#).expect("a result");
        assert_eq!(ok.as_deref(), Some("x"));
        let err = decode::<Json>(
            400,
            br#"{"success": false, "errors": [{"code": 1400, "message": "vnet: \"lab\" is not a virtual network this device may use"}], "result": null}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("HTTP 400") && err.contains("lab"), "{err}");
        assert!(decode::<Json>(200, b"<html>").is_err());
    }

    #[test]
    fn the_profile_keeps_the_linux_checks_it_can_read() {
        let p: Profile = serde_json::from_value(serde_json::json!({
            "device_id": "d", "name": "laptop", "vnets": [{"id": "1", "name": "office"}],
            "posture_checks": [
                {"id": "a", "name": "a", "type": "file", "schedule": "1m", "expiration": "",
                 "match": [{"platform": "linux"}], "input": {"path": "/etc/a", "exists": true}},
                {"id": "b", "name": "b", "type": "file", "match": [{"platform": "mac"}], "input": {"path": "/b"}},
                {"id": "c", "name": "c", "type": "quantum_state", "input": {}}
            ]
        }))
        .expect("profile");
        let ids: Vec<String> = p.linux_checks().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a"]);
    }

    /// One HTTP exchange against a listener on loopback: the request as sent, the answer given.
    #[test]
    fn requests_reach_port_80_paths_with_json() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // Read the head and the 14-byte body.
            while !String::from_utf8_lossy(&got).contains("\r\n\r\n{\"vnet\":\"lab\"}") {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let body =
                r#"{"success": true, "errors": [], "messages": [], "result": {"vnet": "lab"}}"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .expect("write");
            String::from_utf8_lossy(&got).to_string()
        });
        let mut api = DeviceApi::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        api.base = format!("http://127.0.0.1:{port}");
        assert_eq!(
            api.set_vnet(Some("lab")).expect("set"),
            Some("lab".to_string())
        );
        let request = server.join().expect("server");
        assert!(request.starts_with("PUT /v1/vnet HTTP/1.1"), "{request}");
        assert_eq!(
            DeviceApi::new(IpAddr::V4(DEFAULT_GATEWAY)).base(),
            "http://100.96.0.1"
        );
        assert_eq!(
            DeviceApi::new("fd77:6761:7465::1".parse().expect("v6")).base(),
            "http://[fd77:6761:7465::1]"
        );
    }
}
