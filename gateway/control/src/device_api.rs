//! The device API's logic (served inside the tunnel, on plain HTTP at port 80 of the gateway's
//! tunnel addresses; the tunnel says which device asks): the device's profile, its posture
//! reports, and its choice of virtual network.
//!
//! A report carries facts ([`waygate_posture::Facts`]); the gateway evaluates every posture
//! rule that applies to the device's platform and stores each verdict with its reason and the
//! time it stops counting as a pass ([`PostureRule::validity_secs`]). Stored results change the
//! device's `device_posture.checks.passed|failed` for its next flow.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use waygate_config::Config;
use waygate_posture::{Facts, PostureRule, Verdict};
use waygate_registry::{Device, PostureResult, Registry, RegistryError};

use crate::ControlError;

/// A virtual network a device may choose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnetChoice {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// Split tunnel entries (Cloudflare's `{address | host, description}`) and their mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitTunnel {
    /// `exclude` (everything through the tunnel but `exclude`) or `include` (only `include`).
    pub mode: String,
    /// Entries routed through the tunnel in `include` mode.
    pub include: Vec<serde_json::Value>,
    /// Entries kept out of the tunnel in `exclude` mode.
    pub exclude: Vec<serde_json::Value>,
}

/// What `GET /v1/profile` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The device's id.
    pub device_id: String,
    /// The device's name.
    pub name: String,
    /// Virtual networks the device may choose.
    pub vnets: Vec<VnetChoice>,
    /// The one it is in (name); `None`: the default network.
    pub vnet: Option<String>,
    /// The one `vnet default` returns to (name); `None`: the default network, Internet only.
    pub default_vnet: Option<String>,
    /// Posture checks to run, in Cloudflare's rule shape (with `schedule` and `input`).
    pub posture_checks: Vec<serde_json::Value>,
    /// Split tunnel (not configurable yet: everything goes through the tunnel).
    pub split_tunnel: SplitTunnel,
    /// DNS servers (the gateway's tunnel addresses).
    pub dns: Vec<IpAddr>,
    /// Local Domain Fallback entries `{suffix, dns_server[]}` (none configurable yet).
    pub local_domain_fallback: Vec<serde_json::Value>,
}

/// One check's verdict as `POST /v1/posture` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The rule's name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why.
    pub reason: String,
    /// When a pass stops counting (unix seconds) unless reported again.
    pub expires_at: i64,
}

/// Which virtual network the device moves into (`PUT /v1/vnet`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VnetRequest {
    /// Name or id; `None`: the default network.
    pub vnet: Option<String>,
}

fn device(registry: &Registry, device_id: &str) -> Result<Device, ControlError> {
    let d = registry.find(device_id)?;
    if !d.is_active() {
        return Err(RegistryError::NotFound(device_id.to_string()).into());
    }
    Ok(d)
}

fn vnet_name(registry: &Registry, id: Option<&str>) -> Result<Option<String>, ControlError> {
    Ok(match id {
        Some(id) => registry.find_vnet(id).ok().map(|v| v.name),
        None => None,
    })
}

/// The profile of `device_id`.
pub fn profile(
    config: &Config,
    registry: &Registry,
    device_id: &str,
) -> Result<Profile, ControlError> {
    let d = device(registry, device_id)?;
    let vnets = registry
        .vnets()?
        .into_iter()
        .map(|v| VnetChoice {
            id: v.id,
            name: v.name,
        })
        .collect();
    let checks = crate::posture::list(registry)?;
    Ok(Profile {
        device_id: d.id.clone(),
        name: d.name.clone(),
        vnets,
        vnet: vnet_name(registry, d.vnet_id.as_deref())?,
        default_vnet: None,
        posture_checks: checks,
        split_tunnel: SplitTunnel {
            mode: "exclude".into(),
            ..SplitTunnel::default()
        },
        dns: vec![
            IpAddr::V4(config.tunnel.gateway_ipv4()),
            IpAddr::V6(config.tunnel.gateway_ipv6()),
        ],
        local_domain_fallback: Vec::new(),
    })
}

/// The verdicts on `facts` of every rule that applies to their platform, at `now`.
pub fn evaluate(
    config: &Config,
    registry: &Registry,
    rules: &[PostureRule],
    facts: &Facts,
    now: i64,
) -> Vec<(PostureRule, Verdict)> {
    let serials = |id: &str| crate::posture::serial_list(config, registry, id);
    let ca = |id: &str| crate::posture::posture_ca(config, id);
    let env = waygate_posture::Env {
        now,
        serials: &serials,
        ca: &ca,
    };
    rules
        .iter()
        .filter(|r| r.applies_to(&facts.platform))
        .map(|r| (r.clone(), waygate_posture::evaluate(r, facts, &env)))
        .collect()
}

/// Evaluates and stores a report of `device_id` made at `now` (unix seconds); answers each
/// check's verdict by rule id.
pub fn report(
    config: &Config,
    registry: &Registry,
    device_id: &str,
    body: &[u8],
    now: i64,
) -> Result<BTreeMap<String, CheckResult>, ControlError> {
    let d = device(registry, device_id)?;
    let facts = waygate_posture::parse_facts(body)?;
    if facts.platform.is_empty() {
        return Err(ControlError::invalid(
            "platform",
            "required (linux, mac, windows, ...); rules match on it",
        ));
    }
    let rules = crate::posture::rules(registry)?;
    let verdicts = evaluate(config, registry, &rules, &facts, now);
    let mut stored = Vec::with_capacity(verdicts.len());
    let mut out = BTreeMap::new();
    for (rule, v) in verdicts {
        let expires_at =
            now.saturating_add(i64::try_from(rule.validity_secs()).unwrap_or(i64::MAX));
        stored.push(PostureResult {
            check_id: rule.id.clone(),
            passed: v.passed,
            reported_at: now,
            expires_at: Some(expires_at),
            reason: Some(v.reason.clone()),
        });
        out.insert(
            rule.id,
            CheckResult {
                name: rule.name,
                passed: v.passed,
                reason: v.reason,
                expires_at,
            },
        );
    }
    registry.record_posture(&d.id, &stored)?;
    Ok(out)
}

/// Moves `device_id` into the virtual network the body names (`null`: the default network);
/// any virtual network of the gateway may be chosen, network rules (`net.vnet_id`) decide what
/// it reaches. Answers the new choice.
pub fn choose_vnet(
    registry: &Registry,
    device_id: &str,
    body: &[u8],
) -> Result<VnetRequest, ControlError> {
    let request: VnetRequest = crate::parse_body(body)?;
    let d = device(registry, device_id)?;
    let vnet = match request.vnet.as_deref() {
        Some(needle) => match registry.find_vnet(needle) {
            Ok(v) => Some(v),
            Err(RegistryError::VnetNotFound(_)) => {
                return Err(ControlError::invalid(
                    "vnet",
                    format!("{needle:?} is not a virtual network this device may use"),
                ))
            }
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    registry.set_device_vnet(&d.id, vnet.as_ref().map(|v| v.id.as_str()))?;
    Ok(VnetRequest {
        vnet: vnet.map(|v| v.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use waygate_registry::NewDevice;

    fn setup() -> (tempfile::TempDir, Config, Registry, Device) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let reg = Registry::open(dir.path(), &cfg.tunnel).unwrap();
        let key = waygate_keys::PrivateKey::generate(&mut rand::rngs::OsRng).public_key();
        let d = reg
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
            .unwrap();
        (dir, cfg, reg, d)
    }

    const RULE: &[u8] = br#"{"id": "file-check", "name": "agent", "type": "file", "schedule": "1m",
        "match": [{"platform": "linux"}], "input": {"path": "/etc/agent.conf"}}"#;

    #[test]
    fn the_profile_lists_vnets_checks_and_dns() {
        let (_d, cfg, reg, dev) = setup();
        crate::posture::create(&cfg, &reg, RULE, 2).unwrap();
        reg.create_vnet("office", &[], 3).unwrap();
        let p = profile(&cfg, &reg, &dev.id).unwrap();
        assert_eq!(p.name, "laptop");
        assert_eq!(
            p.vnets.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["office"]
        );
        assert_eq!(p.vnet, None);
        assert_eq!(p.posture_checks[0]["id"], "file-check");
        assert_eq!(p.posture_checks[0]["schedule"], "1m");
        assert_eq!(p.dns.len(), 2);
        assert_eq!(p.split_tunnel.mode, "exclude");
    }

    #[test]
    fn reports_are_evaluated_stored_and_expire() {
        let (_d, cfg, mut reg, dev) = setup();
        crate::posture::create(&cfg, &reg, RULE, 2).unwrap();
        crate::posture::create(
            &cfg,
            &reg,
            br#"{"id": "mac-only", "name": "m", "type": "file",
            "match": [{"platform": "mac"}], "input": {"path": "/x"}}"#,
            2,
        )
        .unwrap();
        let good =
            br#"{"platform": "linux", "files": [{"path": "/etc/agent.conf", "exists": true}]}"#;
        let out = report(&cfg, &reg, &dev.id, good, 1_000).unwrap();
        assert_eq!(
            out.keys().collect::<Vec<_>>(),
            ["file-check"],
            "only linux rules"
        );
        assert!(out["file-check"].passed);
        assert_eq!(out["file-check"].expires_at, 1_000 + 180, "2 x 1m + 60 s");
        reg.set_posture_now(Some(1_001));
        assert_eq!(
            reg.find(&dev.id).unwrap().extras.posture_passed,
            ["file-check"]
        );
        reg.set_posture_now(Some(1_180));
        assert_eq!(
            reg.find(&dev.id).unwrap().extras.posture_failed,
            ["file-check"],
            "expired"
        );
        let bad =
            br#"{"platform": "linux", "files": [{"path": "/etc/agent.conf", "exists": false}]}"#;
        let out = report(&cfg, &reg, &dev.id, bad, 1_200).unwrap();
        assert!(!out["file-check"].passed);
        assert!(
            out["file-check"].reason.contains("missing"),
            "{}",
            out["file-check"].reason
        );
        reg.set_posture_now(Some(1_201));
        assert_eq!(
            reg.find(&dev.id).unwrap().extras.posture_failed,
            ["file-check"]
        );
        // Verdicts are the gateway's: a report cannot carry one.
        let e = report(
            &cfg,
            &reg,
            &dev.id,
            br#"{"platform": "linux", "passed": ["file-check"]}"#,
            1_300,
        );
        assert!(matches!(e, Err(ControlError::Invalid { .. })));
        let e = report(&cfg, &reg, &dev.id, br#"{"files": []}"#, 1_300).unwrap_err();
        assert!(
            matches!(e, ControlError::Invalid { ref field, .. } if field == "platform"),
            "{e}"
        );
    }

    #[test]
    fn client_certificates_signed_by_the_gateways_ca_pass() {
        use sha2::Digest as _;
        let (_d, cfg, reg, dev) = setup();
        let now = 1_800_000_000;
        let wall = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now as u64);
        let ca = waygate_keys::CertificateAuthority::load_or_create(&cfg.data_dir, "Test CA", wall)
            .unwrap();
        let id = waygate_keys::enroll_token::hex(&sha2::Sha256::digest(ca.cert_der()));
        let rule = |id: &str| {
            format!(
                r#"{{"id": "cert", "name": "device cert", "type": "client_certificate_v2",
                "input": {{"certificate_id": "{id}", "cn": "laptop.example",
                "locations": {{"paths": ["/etc/waygate/device.pem"]}}}}}}"#
            )
        };
        let e =
            crate::posture::create(&cfg, &reg, rule(&"0".repeat(64)).as_bytes(), 1).unwrap_err();
        assert!(
            matches!(e, ControlError::Invalid { ref field, .. } if field == "input.certificate_id"),
            "{e}"
        );
        crate::posture::create(&cfg, &reg, rule(&id).as_bytes(), 1).unwrap();
        let leaf = ca.issue(&["laptop.example".into()], &[], wall).unwrap();
        let facts = serde_json::json!({"platform": "linux", "certificates": [
            {"path": "/etc/waygate/device.pem", "pem": leaf.cert_pem}]});
        let out = report(&cfg, &reg, &dev.id, facts.to_string().as_bytes(), now).unwrap();
        assert!(out["cert"].passed, "{}", out["cert"].reason);
        // Another CA in posture-cas/ is known too, but did not sign this certificate.
        let other = waygate_keys::CertificateAuthority::generate("Other", wall).unwrap();
        std::fs::create_dir_all(cfg.data_dir.join(crate::posture::POSTURE_CAS_DIR)).unwrap();
        std::fs::write(cfg.data_dir.join("posture-cas/other.pem"), other.cert_pem()).unwrap();
        let other_id = waygate_keys::enroll_token::hex(&sha2::Sha256::digest(other.cert_der()));
        crate::posture::update(&cfg, &reg, "cert", rule(&other_id).as_bytes(), 2).unwrap();
        let out = report(&cfg, &reg, &dev.id, facts.to_string().as_bytes(), now).unwrap();
        assert!(!out["cert"].passed, "{}", out["cert"].reason);
    }

    #[test]
    fn a_device_chooses_among_the_gateways_vnets() {
        let (_d, cfg, reg, dev) = setup();
        let office = reg.create_vnet("office", &[], 3).unwrap();
        let chosen = choose_vnet(&reg, &dev.id, br#"{"vnet": "office"}"#).unwrap();
        assert_eq!(chosen.vnet.as_deref(), Some("office"));
        assert_eq!(reg.find(&dev.id).unwrap().vnet_id, Some(office.id.clone()));
        assert_eq!(
            profile(&cfg, &reg, &dev.id).unwrap().vnet.as_deref(),
            Some("office")
        );
        let e = choose_vnet(&reg, &dev.id, br#"{"vnet": "lab"}"#).unwrap_err();
        assert!(
            matches!(e, ControlError::Invalid { ref field, .. } if field == "vnet"),
            "{e}"
        );
        assert_eq!(
            choose_vnet(&reg, &dev.id, br#"{"vnet": null}"#)
                .unwrap()
                .vnet,
            None
        );
        assert_eq!(reg.find(&dev.id).unwrap().vnet_id, None);
        reg.revoke(&dev.id, 5).unwrap();
        assert!(matches!(
            profile(&cfg, &reg, &dev.id).unwrap_err().kind(),
            crate::ErrorKind::NotFound
        ));
    }
}
