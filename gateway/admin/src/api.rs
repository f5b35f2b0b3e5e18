//! The API's requests and answers without sockets: [`Api::handle`] takes a method, a path, who
//! is asking and the body, and returns a status and Cloudflare's envelope
//! `{"success", "errors": [{code, message}], "messages", "result", "result_info"?}`. The server
//! and the tests call it alike.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value as Json};
use waygate_config::Config;
use waygate_control::ops::{Admin, Local, NewGroup, NewVnet, Posture, SetVnet};
use waygate_control::{lists, posture, rules, tokens, ControlError, EnrollRequest, ErrorKind};
use waygate_registry::{Registry, TokenScope};

/// The OpenAPI document of this API (kept in the repository beside this crate).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Error codes in `errors[].code`. Cloudflare's 10000 for authentication; the others are the
/// HTTP status plus 1000 so a script can tell them apart without the status line.
pub mod codes {
    /// No or an unknown bearer token.
    pub const UNAUTHENTICATED: u32 = 10000;
    /// The token's scope does not allow the request.
    pub const FORBIDDEN: u32 = 10001;
    /// The request is invalid (a body, a field, an expression).
    pub const INVALID: u32 = 1400;
    /// Nothing at this path, or no such object.
    pub const NOT_FOUND: u32 = 1404;
    /// The path exists but not with this method.
    pub const METHOD_NOT_ALLOWED: u32 = 1405;
    /// The request clashes with what exists or with who owns it (a file).
    pub const CONFLICT: u32 = 1409;
    /// The body is larger than the API accepts.
    pub const TOO_LARGE: u32 = 1413;
    /// The gateway failed.
    pub const INTERNAL: u32 = 1500;
    /// An enrollment token was refused (unknown, expired, used up, revoked, malformed).
    pub const TOKEN_REFUSED: u32 = 1403;
    /// Too many failed enrollment attempts from the source address.
    pub const RATE_LIMITED: u32 = 1429;
}

/// What the running gateway reports for `GET /status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GatewayStatus {
    /// Devices with a WireGuard peer.
    pub peers: usize,
    /// Open TCP flows.
    pub tcp_flows: usize,
    /// Open UDP and ping flows.
    pub udp_flows: usize,
    /// Enabled rules compiled into the running policy.
    pub rules_loaded: usize,
}

/// Reads the gateway's status when `GET /status` asks.
pub type StatusSource = Arc<dyn Fn() -> GatewayStatus + Send + Sync>;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A process on the gateway host that may open the 0600 socket: full access.
    Socket,
    /// A client of the TLS listener, with the `Authorization` header it sent.
    Bearer(Option<String>),
}

/// A status and the JSON to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Json,
    /// The methods the path takes, for the `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

/// The `errors[]` entry of a failure, with the field, line and column of invalid input.
fn error_entry(code: u32, err: &ControlError) -> Json {
    let mut entry = json!({ "code": code, "message": err.to_string() });
    if let ControlError::Invalid {
        field,
        line,
        column,
        ..
    } = err
    {
        entry["field"] = json!(field);
        if let (Some(l), Some(c)) = (line, column) {
            entry["line"] = json!(l);
            entry["column"] = json!(c);
        }
    }
    entry
}

/// `{"success": true, ...}` around `result`.
pub fn success(status: u16, result: Json) -> Answer {
    let result_info = result.as_array().map(
        |a| json!({ "page": 1, "per_page": a.len(), "count": a.len(), "total_count": a.len() }),
    );
    let mut body = json!({
        "success": true,
        "errors": [],
        "messages": [],
        "result": result,
    });
    if let Some(info) = result_info {
        body["result_info"] = info;
    }
    Answer {
        status,
        body,
        allow: None,
    }
}

/// `{"success": false, ...}` with one error.
pub fn failure(status: u16, code: u32, message: impl Into<String>) -> Answer {
    Answer {
        status,
        body: json!({
            "success": false,
            "errors": [{ "code": code, "message": message.into() }],
            "messages": [],
            "result": null,
        }),
        allow: None,
    }
}

/// A control error as a status and envelope.
pub fn control_failure(err: &ControlError) -> Answer {
    let (status, code) = match err.kind() {
        ErrorKind::Invalid => (400, codes::INVALID),
        ErrorKind::NotFound => (404, codes::NOT_FOUND),
        ErrorKind::Conflict => (409, codes::CONFLICT),
        ErrorKind::Internal => (500, codes::INTERNAL),
    };
    if status == 500 {
        tracing::warn!(%err, "admin API request failed");
    }
    Answer {
        status,
        body: json!({
            "success": false,
            "errors": [error_entry(code, err)],
            "messages": [],
            "result": null,
        }),
        allow: None,
    }
}

/// The methods a path takes (`None`: no such path), as the `Allow` header lists them.
fn allowed_methods(segs: &[&str]) -> Option<&'static str> {
    Some(match segs {
        ["status"] | ["users"] | ["openapi.json"] | ["gateway", "lists", _, "items"] => "GET",
        ["gateway", "rules"] | ["gateway", "lists"] | ["devices"] => "GET, POST",
        ["groups"] | ["virtual_networks"] => "GET, POST",
        ["gateway", "rules", _] => "GET, PUT, DELETE",
        ["gateway", "lists", _] => "GET, PUT, PATCH, DELETE",
        ["devices", "posture"] => "GET, POST",
        ["devices", "posture", _] => "GET, PUT, DELETE",
        ["devices", _] => "GET, DELETE",
        ["devices", _, "vnet"] => "PUT",
        ["devices", _, "posture"] => "GET, PUT",
        ["groups", _] | ["virtual_networks", _] => "DELETE",
        _ => return None,
    })
}

/// The API's state: the config, one registry connection, the gateway's status.
pub struct Api {
    config: Config,
    registry: Mutex<Registry>,
    status: StatusSource,
    started: Instant,
    clock: fn() -> i64,
}

fn to_json<T: Serialize>(value: &T) -> Result<Json, ControlError> {
    serde_json::to_value(value).map_err(|e| ControlError::Source(e.to_string()))
}

fn body_of<T: for<'de> serde::Deserialize<'de>>(body: &[u8]) -> Result<T, ControlError> {
    waygate_control::parse_body(body)
}

/// Decodes `%XX` escapes of a path segment (public keys hold `/`, `+` and `=`).
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Api {
    /// The API over `registry`; `clock` gives unix seconds for what changes.
    pub fn new(
        config: Config,
        registry: Registry,
        status: StatusSource,
        clock: fn() -> i64,
    ) -> Api {
        Api {
            config,
            registry: Mutex::new(registry),
            #[allow(clippy::disallowed_methods)] // the uptime's start: read once, here
            started: Instant::now(),
            status,
            clock,
        }
    }

    /// Answers one request. `path` may carry a query (ignored).
    pub fn handle(&self, method: &str, path: &str, caller: &Caller, body: &[u8]) -> Answer {
        let path = path.split('?').next().unwrap_or("");
        if path == "/openapi.json" && method == "GET" {
            // The schema is public, like Cloudflare's; it is served as is, not in an envelope.
            return Answer {
                status: 200,
                body: serde_json::from_str(OPENAPI).unwrap_or(Json::Null),
                allow: None,
            };
        }
        let Some(segments) = path
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(percent_decode)
            .collect::<Option<Vec<String>>>()
        else {
            return failure(400, codes::INVALID, "the path has an invalid %-escape");
        };
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Caller::Bearer(header) = caller {
            // The scheme is case-insensitive (RFC 9110); the token is not.
            let secret = header
                .as_deref()
                .and_then(|h| h.trim().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .filter(|s| !s.is_empty());
            let Some(secret) = secret else {
                return failure(
                    401,
                    codes::UNAUTHENTICATED,
                    "missing \"Authorization: Bearer TOKEN\" (create one with `waygate admin token create`)",
                );
            };
            match tokens::authenticate(&registry, secret) {
                Ok(Some(token)) => {
                    if token.scope == TokenScope::Read && method != "GET" && method != "HEAD" {
                        return failure(
                            403,
                            codes::FORBIDDEN,
                            format!(
                                "token {} is read-only; {method} needs a token created without --read-only",
                                token.prefix
                            ),
                        );
                    }
                }
                Ok(None) => {
                    return failure(401, codes::UNAUTHENTICATED, "unknown or revoked token")
                }
                Err(e) => return control_failure(&e),
            }
        }
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let now = (self.clock)();
        match self.route(&registry, method, &segs, body, now) {
            Some(Ok((status, result))) => success(status, result),
            Some(Err(e)) => control_failure(&e),
            None => {
                if let Some(allow) = allowed_methods(&segs) {
                    Answer {
                        allow: Some(allow),
                        ..failure(
                            405,
                            codes::METHOD_NOT_ALLOWED,
                            format!("{method} is not allowed on {path} (allowed: {allow})"),
                        )
                    }
                } else {
                    failure(404, codes::NOT_FOUND, format!("no such path: {path}"))
                }
            }
        }
    }

    /// The operation at `segs`; `None` when no route matches.
    fn route(
        &self,
        registry: &Registry,
        method: &str,
        segs: &[&str],
        body: &[u8],
        now: i64,
    ) -> Option<Result<(u16, Json), ControlError>> {
        let cfg = &self.config;
        let ops = Local {
            config: cfg,
            registry,
            now,
        };
        // Cloudflare answers creations with 200 too.
        let ok = |v: Result<Json, ControlError>| Some(v.map(|j| (200, j)));
        match (method, segs) {
            ("GET", ["status"]) => ok(Ok(self.status(registry))),
            ("GET", ["gateway", "rules"]) => ok(rules::list(cfg, registry).map(Json::Array)),
            ("POST", ["gateway", "rules"]) => ok(rules::create(cfg, registry, body, now)),
            ("GET", ["gateway", "rules", id]) => ok(rules::get(cfg, registry, id)),
            ("PUT", ["gateway", "rules", id]) => ok(rules::update(cfg, registry, id, body, now)),
            ("DELETE", ["gateway", "rules", id]) => ok(rules::delete(cfg, registry, id)),
            ("GET", ["gateway", "lists"]) => ok(lists::list(cfg, registry).map(Json::Array)),
            ("POST", ["gateway", "lists"]) => ok(lists::create(cfg, registry, body, now)),
            ("GET", ["gateway", "lists", id]) => ok(lists::get(cfg, registry, id)),
            ("PUT", ["gateway", "lists", id]) => ok(lists::replace(cfg, registry, id, body, now)),
            ("PATCH", ["gateway", "lists", id]) => ok(lists::patch(cfg, registry, id, body, now)),
            ("DELETE", ["gateway", "lists", id]) => ok(lists::delete(cfg, registry, id)),
            ("GET", ["gateway", "lists", id, "items"]) => ok(lists::items(cfg, registry, id)),
            // Before `/devices/{device}`: Cloudflare's posture paths win over a device called
            // "posture" (reach that one by its id).
            ("GET", ["devices", "posture"]) => ok(posture::list(registry).map(Json::Array)),
            ("POST", ["devices", "posture"]) => ok(posture::create(cfg, registry, body, now)),
            ("GET", ["devices", "posture", id]) => ok(posture::get(registry, id)),
            ("PUT", ["devices", "posture", id]) => {
                ok(posture::update(cfg, registry, id, body, now))
            }
            ("DELETE", ["devices", "posture", id]) => ok(posture::delete(registry, id)),
            (_, ["devices", "posture", ..]) => None,
            ("GET", ["devices"]) => ok(ops.devices().and_then(|d| to_json(&d))),
            ("POST", ["devices"]) => ok(body_of::<EnrollRequest>(body)
                .and_then(|r| ops.enroll(r))
                .and_then(|e| to_json(&e))),
            ("GET", ["devices", id]) => ok(ops.device(id).and_then(|d| to_json(&d))),
            ("DELETE", ["devices", id]) => ok(ops.revoke(id).and_then(|d| to_json(&d))),
            ("PUT", ["devices", id, "vnet"]) => ok(body_of::<SetVnet>(body)
                .and_then(|v| ops.set_vnet(id, v))
                .and_then(|d| to_json(&d))),
            ("GET", ["devices", id, "posture"]) => {
                ok(ops.posture_results(id).and_then(|r| to_json(&r)))
            }
            ("PUT", ["devices", id, "posture"]) => ok(body_of::<Posture>(body)
                .and_then(|p| ops.set_posture(id, p))
                .and_then(|d| to_json(&d))),
            ("GET", ["users"]) => ok(ops.users().and_then(|u| to_json(&u))),
            ("GET", ["groups"]) => ok(ops.groups().and_then(|g| to_json(&g))),
            ("POST", ["groups"]) => ok(body_of::<NewGroup>(body)
                .and_then(|g| ops.create_group(g))
                .and_then(|g| to_json(&g))),
            ("DELETE", ["groups", id]) => ok(ops.delete_group(id).and_then(|g| to_json(&g))),
            ("GET", ["virtual_networks"]) => ok(ops.vnets().and_then(|v| to_json(&v))),
            ("POST", ["virtual_networks"]) => ok(body_of::<NewVnet>(body)
                .and_then(|v| ops.create_vnet(v))
                .and_then(|v| to_json(&v))),
            ("DELETE", ["virtual_networks", id]) => {
                ok(ops.delete_vnet(id).and_then(|v| to_json(&v)))
            }
            _ => None,
        }
    }

    fn status(&self, registry: &Registry) -> Json {
        let s = (self.status)();
        let source = match (&self.config.policy.rules, &self.config.policy.lists) {
            (Some(rules), _) => {
                json!({ "rules": rules.display().to_string(), "lists": self.config.policy.lists.as_ref().map(|l| l.display().to_string()) })
            }
            (None, Some(lists)) => {
                json!({ "rules": "registry", "lists": lists.display().to_string() })
            }
            (None, None) => json!({ "rules": "registry", "lists": "registry" }),
        };
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "peers": s.peers,
            "flows": { "tcp": s.tcp_flows, "udp": s.udp_flows, "total": s.tcp_flows + s.udp_flows },
            "rules_loaded": s.rules_loaded,
            "rules_stored": registry.rules().map(|r| r.len()).unwrap_or(0),
            "policy_source": source,
        })
    }
}

#[cfg(test)]
mod tests;
