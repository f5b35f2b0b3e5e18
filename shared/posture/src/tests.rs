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
        let v = evaluate(r, &facts, &no_lists);
        assert_eq!(v.passed, want, "{facts:?}: {}", v.reason);
    }
    // A report from another platform does not pass a linux-only rule.
    let linux_only = rule(
        json!({"name": "f", "type": "file", "match": [{"platform": "linux"}],
        "input": {"path": "/etc/a"}}),
    );
    let mut mac = with(true, None);
    mac.platform = "mac".into();
    assert!(!evaluate(&linux_only, &mac, &no_lists).passed);
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
    assert!(evaluate(&r, &with(true, Some(HASH.to_ascii_lowercase())), &no_lists).passed);
    assert!(!evaluate(&r, &with(false, None), &no_lists).passed);
    assert!(!evaluate(&r, &with(true, Some("1".repeat(64))), &no_lists).passed);
    assert!(!evaluate(&r, &linux(), &no_lists).passed);
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
    assert!(evaluate(&r, &facts("6.1.0-18-amd64", "Debian", "12"), &no_lists).passed);
    assert!(evaluate(&r, &facts("6.12.3", "debian", "13"), &no_lists).passed);
    assert!(!evaluate(&r, &facts("5.10.0", "debian", "12"), &no_lists).passed);
    assert!(!evaluate(&r, &facts("6.1.0", "ubuntu", "24.04"), &no_lists).passed);
    assert!(!evaluate(&r, &facts("6.1.0", "debian", "11"), &no_lists).passed);
    assert!(
        !evaluate(&r, &linux(), &no_lists).passed,
        "no kernel reported"
    );
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
        evaluate(&any, &disks(true, false), &no_lists).passed,
        "empty check_disks: /"
    );
    assert!(!evaluate(&any, &disks(false, true), &no_lists).passed);
    assert!(evaluate(&all, &disks(true, true), &no_lists).passed);
    assert!(!evaluate(&all, &disks(true, false), &no_lists).passed);
    assert!(evaluate(&some, &disks(false, true), &no_lists).passed);
    assert!(!evaluate(&some, &disks(false, false), &no_lists).passed);
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
    assert!(evaluate(&r, &with("SN-2"), &lists).passed);
    assert!(!evaluate(&r, &with("SN-3"), &lists).passed);
    assert!(!evaluate(&r, &with(""), &lists).passed);
    assert!(
        !evaluate(&r, &with("SN-1"), &no_lists).passed,
        "the list is gone"
    );
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
    assert!(evaluate(&r, &with("0.2.0"), &no_lists).passed);
    assert!(evaluate(&r, &with("1.0.0"), &no_lists).passed);
    assert!(!evaluate(&r, &with("0.1.9"), &no_lists).passed);
    assert!(!evaluate(&r, &linux(), &no_lists).passed);
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
