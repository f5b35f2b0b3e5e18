//! Device posture rules as the CLI (`waygate posture create|list|delete`) and the admin API
//! (`/devices/posture`) manage them: one rule in Cloudflare's JSON, checked by
//! [`waygate_posture::parse_rule`] (errors name the field), its `id` kept when given, stored in
//! the registry and returned in the same shape, so a rule read back and sent again is unchanged.

use serde_json::Value as Json;
use waygate_config::Config;
use waygate_posture::{Input, PostureError, PostureRule};
use waygate_registry::{Registry, StoredPostureRule};

use crate::rules::json_error;
use crate::ControlError;

impl From<PostureError> for ControlError {
    fn from(e: PostureError) -> Self {
        ControlError::invalid(e.field, e.message)
    }
}

/// The body as a JSON object, with the line and column of a syntax error.
fn json_body(body: &[u8]) -> Result<Json, ControlError> {
    serde_json::from_slice::<Json>(body).map_err(|e| json_error("body", &e))
}

/// The items of the list of type SERIAL whose id or name is `id`; `None`: no such list.
pub fn serial_list(config: &Config, registry: &Registry, id: &str) -> Option<Vec<String>> {
    crate::lists::all(config, registry)
        .ok()?
        .into_iter()
        .find(|l| (l.id == id || l.name == id) && l.kind == "SERIAL")
        .map(|l| l.items.into_iter().map(|i| i.value).collect())
}

/// The directory of extra CAs `client_certificate_v2` rules may name (PEM files).
pub const POSTURE_CAS_DIR: &str = "posture-cas";

/// Every CA a `client_certificate_v2` rule may name, as (hex SHA-256 of the DER, DER): the
/// gateway's own CA (`<data_dir>/ca.pem`) and the certificates of the PEM files in
/// `<data_dir>/posture-cas/`. Unreadable files are skipped.
pub fn posture_cas(config: &Config) -> Vec<(String, Vec<u8>)> {
    use sha2::Digest as _;
    let mut files = vec![config.data_dir.join(waygate_keys::CA_CERT_FILE)];
    if let Ok(entries) = std::fs::read_dir(config.data_dir.join(POSTURE_CAS_DIR)) {
        let mut more: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut out = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read(&file) else {
            continue;
        };
        for block in x509_parser::pem::Pem::iter_from_buffer(&text).flatten() {
            if block.label == "CERTIFICATE" {
                let id = waygate_keys::enroll_token::hex(&sha2::Sha256::digest(&block.contents));
                out.push((id, block.contents));
            }
        }
    }
    out
}

/// The CA whose certificate's SHA-256 is `id`.
pub fn posture_ca(config: &Config, id: &str) -> Option<Vec<u8>> {
    posture_cas(config)
        .into_iter()
        .find(|(have, _)| have.eq_ignore_ascii_case(id))
        .map(|(_, der)| der)
}

/// Checks what depends on the gateway's state: a `serial_number` rule's list exists and has
/// type SERIAL, a `client_certificate_v2` rule's CA is known.
fn check_references(
    config: &Config,
    registry: &Registry,
    rule: &PostureRule,
) -> Result<(), ControlError> {
    if let Input::SerialNumber(i) = &rule.input {
        if serial_list(config, registry, &i.id).is_none() {
            return Err(ControlError::invalid(
                "input.id",
                format!(
                    "no list of type SERIAL with id or name {:?} (create one with POST /gateway/lists)",
                    i.id
                ),
            ));
        }
    }
    if let Input::ClientCertificate(i) = &rule.input {
        if posture_ca(config, &i.certificate_id).is_none() {
            return Err(ControlError::invalid(
                "input.certificate_id",
                format!(
                    "no CA with SHA-256 {} in {} or {}/ (put the CA's PEM there)",
                    i.certificate_id,
                    config.data_dir.join(waygate_keys::CA_CERT_FILE).display(),
                    config.data_dir.join(POSTURE_CAS_DIR).display()
                ),
            ));
        }
    }
    Ok(())
}

fn rule_json(rule: &PostureRule) -> Result<Json, ControlError> {
    serde_json::to_value(rule).map_err(|e| ControlError::Source(e.to_string()))
}

fn stored(s: &StoredPostureRule) -> Result<PostureRule, ControlError> {
    let value: Json = serde_json::from_str(&s.body)
        .map_err(|e| ControlError::Source(format!("posture rule {}: {e}", s.id)))?;
    let id = s.id.clone();
    waygate_posture::parse_rule(value, || id)
        .map_err(|e| ControlError::Source(format!("stored posture rule {}: {e}", s.id)))
}

/// Every stored rule, checked.
pub fn rules(registry: &Registry) -> Result<Vec<PostureRule>, ControlError> {
    registry.posture_rules()?.iter().map(stored).collect()
}

/// Every rule as JSON.
pub fn list(registry: &Registry) -> Result<Vec<Json>, ControlError> {
    rules(registry)?.iter().map(rule_json).collect()
}

/// One rule as JSON.
pub fn get(registry: &Registry, id: &str) -> Result<Json, ControlError> {
    rule_json(&stored(&registry.posture_rule(id)?)?)
}

/// Creates a rule from its JSON; returns it as stored.
pub fn create(
    config: &Config,
    registry: &Registry,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    let rule = waygate_posture::parse_rule(json_body(body)?, waygate_registry::new_id)?;
    check_references(config, registry, &rule)?;
    let json = rule_json(&rule)?;
    registry.create_posture_rule(&rule.id, &json.to_string(), now)?;
    Ok(json)
}

/// Replaces rule `id` (a body's `id`, when present, must be the same).
pub fn update(
    config: &Config,
    registry: &Registry,
    id: &str,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    let value = json_body(body)?;
    if let Some(given) = value.get("id").and_then(Json::as_str) {
        if given != id {
            return Err(ControlError::invalid(
                "id",
                format!("{given:?} is not the id in the path ({id:?})"),
            ));
        }
    }
    let key = id.to_string();
    let rule = waygate_posture::parse_rule(value, || key)?;
    check_references(config, registry, &rule)?;
    let json = rule_json(&rule)?;
    registry.replace_posture_rule(id, &json.to_string(), now)?;
    Ok(json)
}

/// Deletes rule `id`; returns `{"id"}` as Cloudflare does.
pub fn delete(registry: &Registry, id: &str) -> Result<Json, ControlError> {
    let rule = registry.delete_posture_rule(id)?;
    Ok(serde_json::json!({ "id": rule.id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Config, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let reg = Registry::open(dir.path(), &cfg.tunnel).unwrap();
        (dir, cfg, reg)
    }

    fn field(e: ControlError) -> String {
        match e {
            ControlError::Invalid { field, .. } => field,
            other => panic!("not an invalid field: {other}"),
        }
    }

    #[test]
    fn rules_round_trip_keep_their_id_and_are_deleted() {
        let (_d, cfg, reg) = setup();
        let body = br#"{"id": "6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11", "name": "agent",
            "description": "the agent's config", "type": "file", "schedule": "1m",
            "match": [{"platform": "linux"}], "input": {"path": "/etc/agent.conf"}}"#;
        let made = create(&cfg, &reg, body, 10).unwrap();
        assert_eq!(made["id"], "6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11");
        assert_eq!(made["input"]["exists"], true, "defaults are written out");
        // Read back and sent again: unchanged.
        let again = update(
            &cfg,
            &reg,
            "6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11",
            made.to_string().as_bytes(),
            11,
        )
        .unwrap();
        assert_eq!(again, made);
        assert_eq!(list(&reg).unwrap(), vec![made.clone()]);
        assert!(matches!(
            create(&cfg, &reg, body, 12).unwrap_err().kind(),
            crate::ErrorKind::Conflict
        ));
        let fresh = create(
            &cfg,
            &reg,
            br#"{"name": "n", "type": "client_version",
            "input": {"version": "0.1", "operator": ">="}}"#,
            13,
        )
        .unwrap();
        assert_eq!(fresh["id"].as_str().unwrap().len(), 36, "a new UUID");
        delete(&reg, "6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11").unwrap();
        assert!(matches!(
            get(&reg, "6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11")
                .unwrap_err()
                .kind(),
            crate::ErrorKind::NotFound
        ));
    }

    #[test]
    fn invalid_rules_are_refused_naming_the_field() {
        let (_d, cfg, reg) = setup();
        let e = create(&cfg, &reg, b"{\"name\": \"x\",\n \"type\": }", 1).unwrap_err();
        assert!(
            matches!(e, ControlError::Invalid { line: Some(2), .. }),
            "{e}"
        );
        let e = create(
            &cfg,
            &reg,
            br#"{"name": "x", "type": "file", "input": {"path": "rel"}}"#,
            1,
        );
        assert_eq!(field(e.unwrap_err()), "input.path");
        let e = create(
            &cfg,
            &reg,
            br#"{"name": "x", "type": "serial_number", "input": {"id": "nope"}}"#,
            1,
        );
        assert_eq!(field(e.unwrap_err()), "input.id");
        let e = update(
            &cfg,
            &reg,
            "a",
            br#"{"id": "b", "name": "x", "type": "file", "input": {"path": "/a"}}"#,
            1,
        );
        assert_eq!(field(e.unwrap_err()), "id");
        assert!(reg.posture_rules().unwrap().is_empty());
    }

    #[test]
    fn serial_rules_need_a_serial_list() {
        let (_d, cfg, reg) = setup();
        let list = crate::lists::create(
            &cfg,
            &reg,
            br#"{"name": "laptops", "type": "SERIAL",
            "items": [{"value": "SN-1"}]}"#,
            1,
        )
        .unwrap();
        let id = list["id"].as_str().unwrap();
        let body =
            format!(r#"{{"name": "s", "type": "serial_number", "input": {{"id": "{id}"}}}}"#);
        create(&cfg, &reg, body.as_bytes(), 2).unwrap();
        assert_eq!(serial_list(&cfg, &reg, id), Some(vec!["SN-1".to_string()]));
        crate::lists::create(
            &cfg,
            &reg,
            br#"{"name": "ips", "type": "IP", "items": []}"#,
            3,
        )
        .unwrap();
        assert_eq!(serial_list(&cfg, &reg, "ips"), None, "not a SERIAL list");
    }
}
