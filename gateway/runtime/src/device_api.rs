//! The device API: plain HTTP with JSON on TCP port 80 of the gateway's tunnel addresses
//! ([`waygate_engine::flow::DEVICE_API_PORT`]), reached only through a device's tunnel, which
//! says which device asks (the flow's context), so it needs no TLS and no token.
//!
//! `GET /v1/profile`, `POST /v1/posture` (facts; the gateway evaluates them), `PUT /v1/vnet`.
//! Answers are the admin API's envelope. The logic is [`waygate_control::device_api`]; this is
//! its HTTP shell, running the registry work off the async threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use waygate_admin::api::{codes, control_failure, failure, success, Answer};
use waygate_config::Config;
use waygate_control::{device_api, ControlError};
use waygate_engine::flow::DeviceInfo;
use waygate_registry::Registry;

use crate::local::{HttpFuture, HttpResponse, HttpRoute, LocalFlow};

/// Largest request body read (a report of [`waygate_posture::MAX_FACTS`] files with their
/// paths and hashes stays well below it).
const MAX_BODY: usize = 256 * 1024;

/// Reports a device may send at once, and then one per second: a client reports once per
/// schedule (at least a minute), so only a broken or hostile one meets the limit, which keeps
/// it from turning the registry into a write loop.
const REPORT_BURST: i64 = 5;

/// The device API over one registry connection.
pub struct DeviceApi {
    config: Config,
    registry: Mutex<Registry>,
    clock: fn() -> i64,
    /// Per device: report tokens left and when they were last counted (unix seconds).
    reports: Mutex<HashMap<String, (i64, i64)>>,
}

impl DeviceApi {
    /// The API over `registry`; `clock` gives unix seconds for reports.
    pub fn new(config: Config, registry: Registry, clock: fn() -> i64) -> Self {
        DeviceApi {
            config,
            registry: Mutex::new(registry),
            clock,
            reports: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a report token of `device_id` at `now`; false when it has none left.
    fn take_report(&self, device_id: &str, now: i64) -> bool {
        let mut reports = self
            .reports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Devices come and go; forget those whose bucket is full again.
        if reports.len() > 4096 {
            reports.retain(|_, (_, at)| now.saturating_sub(*at) < REPORT_BURST);
        }
        let (tokens, at) = reports
            .entry(device_id.to_string())
            .or_insert((REPORT_BURST, now));
        *tokens = (*tokens + now.saturating_sub(*at).max(0)).min(REPORT_BURST);
        *at = now;
        if *tokens == 0 {
            return false;
        }
        *tokens -= 1;
        true
    }

    /// The answer to one request of `device`.
    pub fn answer(&self, device: &DeviceInfo, method: &str, path: &str, body: &[u8]) -> Answer {
        let path = path.split('?').next().unwrap_or("");
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let json = |v: Result<serde_json::Value, ControlError>| match v {
            Ok(v) => success(200, v),
            Err(e) => control_failure(&e),
        };
        match (method, path.trim_end_matches('/')) {
            ("GET", "/v1/profile") => json(
                device_api::profile(&self.config, &registry, &device.id).and_then(|p| to_json(&p)),
            ),
            ("POST", "/v1/posture") => {
                let now = (self.clock)();
                if !self.take_report(&device.id, now) {
                    tracing::info!(target: "waygate::posture", device = %device.name, device_id = %device.id, "posture reports limited");
                    return failure(
                        429,
                        codes::RATE_LIMITED,
                        format!(
                            "more than {REPORT_BURST} reports at once; one per second after that"
                        ),
                    );
                }
                let report = device_api::report(&self.config, &registry, &device.id, body, now);
                match &report {
                    Ok(results) => {
                        for (check, r) in results {
                            tracing::info!(target: "waygate::posture", device = %device.name, device_id = %device.id, check = %check, name = %r.name, passed = r.passed, reason = %r.reason, expires_at = r.expires_at, "posture decision");
                        }
                    }
                    Err(e) => {
                        tracing::info!(target: "waygate::posture", device = %device.name, device_id = %device.id, error = %e, "posture report refused")
                    }
                }
                json(report.and_then(|r| to_json(&r)))
            }
            ("PUT", "/v1/vnet") => {
                let chosen = device_api::choose_vnet(&registry, &device.id, body);
                if let Ok(c) = &chosen {
                    tracing::info!(device = %device.name, device_id = %device.id, vnet = ?c.vnet, "device chose a virtual network");
                }
                json(chosen.and_then(|c| to_json(&c)))
            }
            (_, "/v1/profile") => not_allowed(method, path, "GET"),
            (_, "/v1/posture") => not_allowed(method, path, "POST"),
            (_, "/v1/vnet") => not_allowed(method, path, "PUT"),
            _ => failure(404, codes::NOT_FOUND, format!("no such path: {path}")),
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::Source(e.to_string()))
}

fn not_allowed(method: &str, path: &str, allow: &'static str) -> Answer {
    Answer {
        allow: Some(allow),
        ..failure(
            405,
            codes::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path} (allowed: {allow})"),
        )
    }
}

fn respond(answer: Answer) -> HttpResponse {
    let body = serde_json::to_vec(&answer.body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Some(allow) = answer.allow {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static(allow),
        );
    }
    response
}

impl HttpRoute for Arc<DeviceApi> {
    fn handle(&self, flow: Arc<LocalFlow>, request: Request<Incoming>) -> HttpFuture {
        let api = self.clone();
        Box::pin(async move {
            let method = request.method().as_str().to_string();
            let path = request.uri().path().to_string();
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return respond(failure(
                        413,
                        codes::TOO_LARGE,
                        format!("the body could not be read whole (at most {MAX_BODY} bytes): {e}"),
                    ))
                }
            };
            let device = flow.ctx.device.clone();
            // SQLite work blocks: off the resolver's async threads.
            let answer =
                tokio::task::spawn_blocking(move || api.answer(&device, &method, &path, &body))
                    .await
                    .unwrap_or_else(|e| {
                        failure(500, codes::INTERNAL, format!("the device API failed: {e}"))
                    });
            respond(answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waygate_registry::NewDevice;

    fn result_of(answer: &Answer) -> &serde_json::Value {
        &answer.body["result"]
    }

    fn api() -> (tempfile::TempDir, DeviceApi, DeviceInfo) {
        let dir = tempfile::tempdir().expect("dir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let registry = Registry::open(dir.path(), &config.tunnel).expect("registry");
        let key = waygate_keys::PrivateKey::generate(&mut rand::rngs::OsRng).public_key();
        let d = registry
            .enroll(
                NewDevice {
                    name: Some("laptop".into()),
                    email: "ada@example.com".into(),
                    user_name: None,
                    groups: vec![],
                    attributes: vec![],
                    vnet_id: None,
                    public_key: key,
                },
                1,
            )
            .expect("enroll");
        registry.create_vnet("office", &[], 2).expect("vnet");
        waygate_control::posture::create(
            &config,
            &registry,
            br#"{"id": "agent", "name": "agent", "type": "file", "input": {"path": "/etc/agent"}}"#,
            3,
        )
        .expect("rule");
        let info = DeviceInfo {
            id: d.id,
            name: d.name,
            email: d.email,
            user_name: None,
            groups: vec![],
            extras: Default::default(),
            vnet_id: None,
            ipv4: d.ipv4,
            ipv6: d.ipv6,
            log_fields: Default::default(),
        };
        (dir, DeviceApi::new(config, registry, || 1_000), info)
    }

    #[test]
    fn profile_report_and_vnet_answer_for_the_tunnels_device() {
        let (_dir, api, device) = api();
        let p = api.answer(&device, "GET", "/v1/profile", b"");
        assert_eq!(p.status, 200, "{}", p.body);
        assert_eq!(result_of(&p)["name"], "laptop");
        assert_eq!(result_of(&p)["posture_checks"][0]["id"], "agent");
        let r = api.answer(
            &device,
            "POST",
            "/v1/posture",
            br#"{"platform": "linux", "files": [{"path": "/etc/agent", "exists": true}]}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(result_of(&r)["agent"]["passed"], true);
        assert_eq!(result_of(&r)["agent"]["expires_at"], 1_000 + 660);
        let v = api.answer(&device, "PUT", "/v1/vnet", br#"{"vnet": "office"}"#);
        assert_eq!(result_of(&v)["vnet"], "office");
        let bad = api.answer(&device, "PUT", "/v1/vnet", br#"{"vnet": "elsewhere"}"#);
        assert_eq!(
            (bad.status, bad.body["errors"][0]["field"].as_str()),
            (400, Some("vnet"))
        );
        let wrong = api.answer(&device, "GET", "/v1/posture", b"");
        assert_eq!((wrong.status, wrong.allow), (405, Some("POST")));
        assert_eq!(api.answer(&device, "GET", "/admin", b"").status, 404);
        // One report was made above; four more fit the burst, the next is limited.
        let facts = br#"{"platform": "linux"}"#;
        for _ in 0..4 {
            assert_eq!(
                api.answer(&device, "POST", "/v1/posture", facts).status,
                200
            );
        }
        assert_eq!(
            api.answer(&device, "POST", "/v1/posture", facts).status,
            429
        );
        assert!(api.take_report("another-device", 1_000), "per device");
        assert!(
            api.take_report(&device.id, 1_001),
            "one more a second later"
        );
        assert!(!api.take_report(&device.id, 1_001));
    }
}
