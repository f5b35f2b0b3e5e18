use super::*;
use serde_json::json;

fn rule(v: Json) -> PostureRule {
    parse_rule(v, || "new-id".into()).expect("a valid rule")
}

fn refused(v: Json) -> PostureError {
    parse_rule(v, || "new-id".into()).expect_err("refused")
}

fn no_lists(_: &str) -> Option<Vec<String>> {
    None
}

fn no_cas(_: &str) -> Option<Vec<u8>> {
    None
}

const NOW: i64 = 1_800_000_000;

/// Evaluation without lists or CAs.
fn eval(r: &PostureRule, f: &Facts) -> Verdict {
    evaluate(
        r,
        f,
        &Env {
            now: NOW,
            serials: &no_lists,
            ca: &no_cas,
        },
    )
}

const HASH: &str = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";

fn linux() -> Facts {
    Facts {
        platform: "linux".into(),
        ..Facts::default()
    }
}

#[test]
fn a_cloudflare_rule_parses_with_defaults_and_keeps_its_id() {
    let r = rule(json!({
        "id": "f0b1c2d3-0000-4000-8000-000000000001",
        "name": "agent config", "type": "file",
        "match": [{"platform": "linux"}],
        "input": {"path": "/etc/agent.conf", "exists": true, "sha256": HASH}
    }));
    assert_eq!(r.id, "f0b1c2d3-0000-4000-8000-000000000001");
    assert_eq!(r.schedule, "5m");
    assert_eq!(r.expiration, "");
    assert_eq!(r.validity_secs(), 2 * 300 + GRACE_SECS);
    assert!(r.applies_to("linux") && !r.applies_to("windows"));
    let Input::File(f) = &r.input else {
        panic!("file input")
    };
    assert_eq!(
        f.sha256.as_deref(),
        Some(HASH.to_ascii_lowercase().as_str())
    );
    // Serialized back in the same shape, and parsed again to the same rule.
    let again = rule(serde_json::to_value(&r).expect("json"));
    assert_eq!(again, r);
    let fresh = rule(
        json!({"name": "x", "type": "client_version", "schedule": "1h",
        "expiration": "10m", "input": {"version": "0.1", "operator": ">="}}),
    );
    assert_eq!(fresh.id, "new-id");
    assert_eq!(fresh.validity_secs(), 600);
    assert!(fresh.applies_to("windows"), "no match: every platform");
}

#[test]
fn invalid_rules_name_the_field_at_fault() {
    let cases = [
        (json!([]), "body"),
        (
            json!({"name": "x", "type": "file", "input": {"path": "/a"}, "colour": 1}),
            "colour",
        ),
        (json!({"type": "file", "input": {"path": "/a"}}), "name"),
        (json!({"name": "x", "input": {"path": "/a"}}), "type"),
        (
            json!({"name": "x", "type": "firewall", "input": {}}),
            "type",
        ),
        (json!({"name": "x", "type": "file"}), "input"),
        (
            json!({"name": "x", "type": "file", "input": {"path": "etc/a"}}),
            "input.path",
        ),
        (
            json!({"name": "x", "type": "file", "input": {"path": "/a", "sha256": "abc"}}),
            "input.sha256",
        ),
        (
            json!({"name": "x", "type": "file", "input": {"path": "/a", "exists": false, "sha256": HASH}}),
            "input.sha256",
        ),
        (
            json!({"name": "x", "type": "file", "input": {"path": "/a", "thumbprint": "ab"}}),
            "input.thumbprint",
        ),
        (
            json!({"name": "x", "type": "file", "input": {"path": "/a", "size": 1}}),
            "input",
        ),
        (
            json!({"name": "x", "type": "file", "schedule": "30s", "input": {"path": "/a"}}),
            "schedule",
        ),
        (
            json!({"name": "x", "type": "file", "schedule": "often", "input": {"path": "/a"}}),
            "schedule",
        ),
        (
            json!({"name": "x", "type": "file", "expiration": "5x", "input": {"path": "/a"}}),
            "expiration",
        ),
        (
            json!({"name": "x", "type": "file", "match": [{"platform": "beos"}], "input": {"path": "/a"}}),
            "match[0].platform",
        ),
        (
            json!({"name": "x", "type": "os_version", "input": {"version": "6.x", "operator": ">="}}),
            "input.version",
        ),
        (
            json!({"name": "x", "type": "os_version", "input": {"version": "6.1", "operator": "=>"}}),
            "input.operator",
        ),
        (
            json!({"name": "x", "type": "os_version", "input": {"version": "6.1", "operator": ">=", "os_distro_revision": "twelve"}}),
            "input.os_distro_revision",
        ),
        (
            json!({"name": "x", "type": "disk_encryption", "input": {"check_disks": ["home"]}}),
            "input.check_disks[0]",
        ),
        (
            json!({"name": "x", "type": "serial_number", "input": {"id": ""}}),
            "input.id",
        ),
        (
            json!({"name": 5, "type": "file", "input": {"path": "/a"}}),
            "name",
        ),
    ];
    for (body, field) in cases {
        let e = refused(body.clone());
        assert_eq!(e.field, field, "{body}: {e}");
        assert!(!e.message.is_empty());
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("30s"), Some(30));
    assert_eq!(parse_duration("5m"), Some(300));
    assert_eq!(parse_duration("24h"), Some(86_400));
    assert_eq!(parse_duration("7d"), Some(604_800));
    for bad in ["", "m", "5", "-5m", "5 m", "1.5h", "99999999999999999999d"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn versions_compare_like_cloudflare_and_kernels_are_not_prereleases() {
    assert_eq!(parse_version("1.2"), Some([1, 2, 0]));
    assert_eq!(parse_version("6.1.0-18-amd64"), Some([6, 1, 0]));
    assert_eq!(parse_version("v0.1.0"), Some([0, 1, 0]));
    assert_eq!(parse_version("22.04"), Some([22, 4, 0]));
    assert_eq!(parse_version("rolling"), None);
    let v = |s| parse_version(s).expect("version");
    let op = |s| Operator::parse(s).expect("operator");
    assert!(compare(&v("6.1.0-18-amd64"), op(">="), &v("6.1")));
    assert!(compare(&v("6.1.0-18-amd64"), op("=="), &v("6.1.0")));
    assert!(!compare(&v("6.1.0"), op(">"), &v("6.1")));
    assert!(compare(&v("5.15.0"), op("<"), &v("6")));
    assert!(compare(&v("6.10"), op(">"), &v("6.9")), "numeric, not text");
    assert!(compare(&v("6.1"), op("<="), &v("6.1.0")));
    assert!(!compare(&v("6.2"), op("<="), &v("6.1.9")));
}

#[test]
fn file_matcher() {
    let must_exist = rule(json!({"name": "f", "type": "file", "input": {"path": "/etc/a"}}));
    let hashed =
        rule(json!({"name": "f", "type": "file", "input": {"path": "/etc/a", "sha256": HASH}}));
    let absent =
        rule(json!({"name": "f", "type": "file", "input": {"path": "/etc/a", "exists": false}}));
    let with = |exists: bool, sha: Option<&str>| Facts {
        files: vec![FileFact {
            path: "/etc/a".into(),
            exists,
            sha256: sha.map(str::to_string),
        }],
        ..linux()
    };
    let lower = HASH.to_ascii_lowercase();
    let cases = [
        (&must_exist, with(true, None), true),
        (&must_exist, with(false, None), false),
        (&must_exist, linux(), false),
        (&hashed, with(true, Some(&lower)), true),
        (&hashed, with(true, Some(&"0".repeat(64))), false),
        (&hashed, with(true, None), false),
        (&absent, with(false, None), true),
        (&absent, with(true, None), false),
    ];
    for (r, facts, want) in cases {
        let v = eval(r, &facts);
        assert_eq!(v.passed, want, "{facts:?}: {}", v.reason);
    }
    // A report from another platform does not pass a linux-only rule.
    let linux_only = rule(
        json!({"name": "f", "type": "file", "match": [{"platform": "linux"}],
        "input": {"path": "/etc/a"}}),
    );
    let mut mac = with(true, None);
    mac.platform = "mac".into();
    assert!(!eval(&linux_only, &mac).passed);
}

#[test]
fn application_matcher() {
    let r = rule(
        json!({"name": "a", "type": "application", "input": {"path": "/usr/bin/agent", "sha256": HASH}}),
    );
    let with = |running, sha: Option<String>| Facts {
        processes: vec![ProcessFact {
            path: "/usr/bin/agent".into(),
            running,
            sha256: sha,
        }],
        ..linux()
    };
    assert!(eval(&r, &with(true, Some(HASH.to_ascii_lowercase()))).passed);
    assert!(!eval(&r, &with(false, None)).passed);
    assert!(!eval(&r, &with(true, Some("1".repeat(64)))).passed);
    assert!(!eval(&r, &linux()).passed);
}

#[test]
fn os_version_matcher() {
    let r = rule(
        json!({"name": "o", "type": "os_version", "input": {"version": "6.1", "operator": ">=",
        "os_distro_name": "debian", "os_distro_revision": "12"}}),
    );
    let facts = |kernel: &str, distro: &str, rev: &str| Facts {
        kernel: Some(kernel.into()),
        os_distro_name: Some(distro.into()),
        os_distro_revision: Some(rev.into()),
        ..linux()
    };
    assert!(eval(&r, &facts("6.1.0-18-amd64", "Debian", "12")).passed);
    assert!(eval(&r, &facts("6.12.3", "debian", "13")).passed);
    assert!(!eval(&r, &facts("5.10.0", "debian", "12")).passed);
    assert!(!eval(&r, &facts("6.1.0", "ubuntu", "24.04")).passed);
    assert!(!eval(&r, &facts("6.1.0", "debian", "11")).passed);
    assert!(!eval(&r, &linux()).passed, "no kernel reported");
}

#[test]
fn disk_encryption_matcher() {
    let any = rule(json!({"name": "d", "type": "disk_encryption", "input": {}}));
    let all = rule(json!({"name": "d", "type": "disk_encryption",
        "input": {"check_disks": ["/", "/home"], "require_all": true}}));
    let some = rule(json!({"name": "d", "type": "disk_encryption",
        "input": {"check_disks": ["/", "/home"]}}));
    let disks = |root: bool, home: bool| Facts {
        disks: vec![
            DiskFact {
                mount: "/".into(),
                encrypted: root,
            },
            DiskFact {
                mount: "/home".into(),
                encrypted: home,
            },
        ],
        ..linux()
    };
    assert!(
        eval(&any, &disks(true, false)).passed,
        "empty check_disks: /"
    );
    assert!(!eval(&any, &disks(false, true)).passed);
    assert!(eval(&all, &disks(true, true)).passed);
    assert!(!eval(&all, &disks(true, false)).passed);
    assert!(eval(&some, &disks(false, true)).passed);
    assert!(!eval(&some, &disks(false, false)).passed);
    assert_eq!(
        wanted([&all, &any]).disks,
        vec!["/".to_string(), "/home".into()]
    );
}

#[test]
fn serial_number_matcher() {
    let r = rule(json!({"name": "s", "type": "serial_number", "input": {"id": "L1"}}));
    let lists = |id: &str| (id == "L1").then(|| vec!["SN-1".to_string(), "SN-2".into()]);
    let with = |s: &str| Facts {
        serial_number: Some(s.into()),
        ..linux()
    };
    let env = Env {
        now: NOW,
        serials: &lists,
        ca: &no_cas,
    };
    assert!(evaluate(&r, &with("SN-2"), &env).passed);
    assert!(!evaluate(&r, &with("SN-3"), &env).passed);
    assert!(!evaluate(&r, &with(""), &env).passed);
    assert!(!eval(&r, &with("SN-1")).passed, "the list is gone");
    assert!(wanted([&r]).serial);
}

#[test]
fn client_version_matcher() {
    let r = rule(
        json!({"name": "c", "type": "client_version", "input": {"version": "0.2", "operator": ">="}}),
    );
    let with = |v: &str| Facts {
        client_version: Some(v.into()),
        ..linux()
    };
    assert!(eval(&r, &with("0.2.0")).passed);
    assert!(eval(&r, &with("1.0.0")).passed);
    assert!(!eval(&r, &with("0.1.9")).passed);
    assert!(!eval(&r, &linux()).passed);
}

#[test]
fn expiry_turns_a_pass_into_a_failure_with_a_fake_clock() {
    let r = rule(json!({"name": "f", "type": "file", "schedule": "1m", "input": {"path": "/a"}}));
    let reported_at: i64 = 1_800_000_000;
    let expires_at = reported_at + r.validity_secs() as i64;
    assert_eq!(r.validity_secs(), 180, "2 x 1m + 60 s grace");
    assert!(effective(true, Some(expires_at), reported_at));
    assert!(effective(true, Some(expires_at), expires_at - 1));
    assert!(!effective(true, Some(expires_at), expires_at));
    assert!(!effective(false, Some(expires_at), reported_at));
    assert!(
        effective(true, None, i64::MAX),
        "results typed in by an admin do not expire"
    );
}

#[test]
fn facts_parse_and_refuse_by_field() {
    let f = parse_facts(br#"{"platform": "linux", "kernel": "6.1.0",
        "files": [{"path": "/a", "exists": true, "sha256": "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"}]}"#)
    .expect("facts");
    assert_eq!(
        f.files[0].sha256.as_deref(),
        Some(HASH.to_ascii_lowercase().as_str())
    );
    let e =
        parse_facts(br#"{"files": [{"path": "/a", "exists": true, "sha256": "zz"}]}"#).unwrap_err();
    assert_eq!(e.field, "files[0].sha256");
    let e = parse_facts(br#"{"verdict": "passed"}"#).unwrap_err();
    assert_eq!(e.field, "body");
    assert!(e.message.contains("verdict"), "{e}");
    let many = format!(
        r#"{{"disks": [{}]}}"#,
        vec![r#"{"mount": "/", "encrypted": true}"#; MAX_FACTS + 1].join(",")
    );
    assert_eq!(parse_facts(many.as_bytes()).unwrap_err().field, "disks");
    assert!(parse_facts(b"{").is_err());
}

/// A CA and a client certificate it signed (CN `laptop-1`, clientAuth), valid around [`NOW`].
struct Pki {
    ca_der: Vec<u8>,
    ca_id: String,
    leaf_pem: String,
    other_pem: String,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let at =
        |unix: i64| (std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix as u64)).into();
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(vec![]).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Corp CA");
    ca_params.not_before = at(NOW - 86_400);
    ca_params.not_after = at(NOW + 86_400);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |cn: &str, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec![]).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = at(NOW - 3600);
        p.not_after = at(NOW + 3600);
        // The key goes with it, as in a real bundle: the client must leave it out.
        format!(
            "{}{}",
            p.signed_by(&key, issuer).expect("leaf").pem(),
            key.serialize_pem()
        )
    };
    let other_key = KeyPair::generate().expect("key");
    let mut other_params = CertificateParams::new(vec![]).expect("params");
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = Issuer::new(other_params, other_key);
    use sha2::Digest as _;
    let ca_id: String = sha2::Sha256::digest(ca.der())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Pki {
        ca_id,
        ca_der: ca.der().to_vec(),
        leaf_pem: leaf("laptop-1", &issuer),
        other_pem: leaf("laptop-1", &other),
    }
}

#[test]
fn client_certificates_are_checked_against_the_ca_by_the_gateway() {
    let pki = pki();
    let r = rule(
        json!({"name": "cert", "type": "client_certificate_v2", "input": {
        "certificate_id": pki.ca_id, "cn": "laptop-1", "extended_key_usage": ["clientAuth"],
        "locations": {"paths": ["/etc/waygate/device.pem"]}}}),
    );
    assert_eq!(wanted([&r]).certificates, ["/etc/waygate/device.pem"]);
    let ca_der = pki.ca_der.clone();
    let id = pki.ca_id.clone();
    let cas = move |want: &str| (want == id).then(|| ca_der.clone());
    let env = |now| Env {
        now,
        serials: &no_lists,
        ca: &cas,
    };
    let with = |pem: &str| Facts {
        certificates: vec![CertificateFact {
            path: "/etc/waygate/device.pem".into(),
            pem: certificate_blocks(pem),
        }],
        ..linux()
    };
    let sent = certificate_blocks(&pki.leaf_pem).expect("a certificate");
    assert!(!sent.contains("PRIVATE KEY"), "keys are never sent");
    let v = evaluate(&r, &with(&pki.leaf_pem), &env(NOW));
    assert!(v.passed, "{}", v.reason);
    assert!(
        !evaluate(&r, &with(&pki.other_pem), &env(NOW)).passed,
        "another CA"
    );
    assert!(
        !evaluate(&r, &with(&pki.leaf_pem), &env(NOW + 7200)).passed,
        "expired"
    );
    assert!(!evaluate(&r, &linux(), &env(NOW)).passed, "no file");
    assert!(!eval(&r, &with(&pki.leaf_pem)).passed, "an unknown CA id");
    let other_cn = rule(
        json!({"name": "cert", "type": "client_certificate_v2", "input": {
        "certificate_id": pki.ca_id, "cn": "laptop-2", "locations": {"paths": ["/etc/waygate/device.pem"]}}}),
    );
    assert!(!evaluate(&other_cn, &with(&pki.leaf_pem), &env(NOW)).passed);
    let email = rule(
        json!({"name": "cert", "type": "client_certificate_v2", "input": {
        "certificate_id": pki.ca_id, "extended_key_usage": ["emailProtection"],
        "locations": {"paths": ["/etc/waygate/device.pem"]}}}),
    );
    assert!(!evaluate(&email, &with(&pki.leaf_pem), &env(NOW)).passed);
}

#[test]
fn client_certificate_inputs_are_checked() {
    let id = "ab".repeat(32);
    let cases = [
        (
            json!({"name": "c", "type": "client_certificate", "input": {"certificate_id": id}}),
            "type",
        ),
        (
            json!({"name": "c", "type": "client_certificate_v2", "input": {"certificate_id": "x", "locations": {"paths": ["/a"]}}}),
            "input.certificate_id",
        ),
        (
            json!({"name": "c", "type": "client_certificate_v2", "input": {"certificate_id": id, "locations": {"paths": []}}}),
            "input.locations.paths",
        ),
        (
            json!({"name": "c", "type": "client_certificate_v2", "input": {"certificate_id": id, "locations": {"paths": ["a.pem"]}}}),
            "input.locations.paths[0]",
        ),
        (
            json!({"name": "c", "type": "client_certificate_v2", "input": {"certificate_id": id, "locations": {"paths": ["/a"], "trust_stores": ["system"]}}}),
            "input.locations.trust_stores",
        ),
        (
            json!({"name": "c", "type": "client_certificate_v2", "input": {"certificate_id": id, "check_private_key": true, "locations": {"paths": ["/a"]}}}),
            "input.check_private_key",
        ),
        (
            json!({"name": "c", "type": "client_certificate_v2", "input": {"certificate_id": id, "extended_key_usage": ["serverAuth"], "locations": {"paths": ["/a"]}}}),
            "input.extended_key_usage[0]",
        ),
    ];
    for (body, field) in cases {
        let e = refused(body.clone());
        assert_eq!(e.field, field, "{body}: {e}");
    }
}
