//! `waygate rules check|eval` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

fn waygate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waygate"))
        .args(args)
        .output()
        .expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn rules() -> Value {
    json!({"success": true, "result": [
        {"id": "1f0b9d2e-7a1c-4e55-9a0e-6c3d2b1a0f01", "name": "Access third-party provider",
         "precedence": 1000, "enabled": true, "action": "egress", "filters": ["egress"],
         "traffic": "net.dst.ip == 198.51.100.158", "identity": "", "device_posture": "",
         "rule_settings": {"egress": {"ipv4": "192.0.2.10", "ipv6": "2001:db8:10::/64", "ipv4_fallback": "0.0.0.0"}}},
        {"id": "1f0b9d2e-7a1c-4e55-9a0e-6c3d2b1a0f02", "name": "Default egress policy",
         "precedence": 2000, "enabled": true, "action": "egress", "filters": ["egress"],
         "traffic": "net.protocol in {\"tcp\" \"udp\" \"icmp\"}", "identity": "", "device_posture": ""},
        {"id": "1f0b9d2e-7a1c-4e55-9a0e-6c3d2b1a0f03", "name": "Block listed",
         "precedence": 10, "enabled": true, "action": "block", "filters": ["dns"],
         "traffic": "any(dns.domains[*] in $3b5f9c1e-2d4a-4f6b-8c7d-9e0a1b2c3d4e)",
         "identity": "any(identity.groups.name[*] == \"eng\")", "device_posture": ""}
    ]})
}

fn lists() -> Value {
    json!([{"id": "3b5f9c1e-2d4a-4f6b-8c7d-9e0a1b2c3d4e", "name": "bad", "type": "DOMAIN",
            "items": [{"value": "bad.example"}]}])
}

#[test]
fn check_accepts_valid_rules() {
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "rules.json", &rules());
    let l = write(dir.path(), "lists.json", &lists());
    let out = waygate(&[
        "rules",
        "check",
        r.to_str().unwrap(),
        "--lists",
        l.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("3 rules OK"),
        "{}",
        text(&out.stdout)
    );
    // Without the lists file the rules still check, with a warning about the list.
    let out = waygate(&["rules", "check", r.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("warning:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_reports_errors_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = json!([{"name": "typo", "action": "block", "filters": ["dns"],
                      "traffic": "dns.fqdn == \"a\" and dns.fqd == \"b\""}]);
    let r = write(dir.path(), "bad.json", &bad);
    let out = waygate(&["rules", "check", r.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("rule 1 \"typo\"")
            && err.contains(
                "traffic: line 1, column 21: unknown field \"dns.fqd\"; did you mean \"dns.fqdn\"?"
            ),
        "{err}"
    );
    // Prefixed by the error's place in the (pretty-printed) file, for editors.
    assert!(err.contains("bad.json:8:39: rule 1"), "{err}");
    std::fs::write(
        &r,
        "[\n  {\"name\": \"x\",\n   \"precedence\": \"high\"}\n]",
    )
    .unwrap();
    let out = waygate(&["rules", "check", r.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("line 3, column"),
        "{}",
        text(&out.stderr)
    );
}

fn eval(filter: &str, flow: Value, with_lists: bool) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "rules.json", &rules());
    let l = write(dir.path(), "lists.json", &lists());
    let f = write(dir.path(), "flow.json", &flow);
    let mut args = vec![
        "rules",
        "eval",
        "--rules",
        r.to_str().unwrap(),
        "--filter",
        filter,
        "--input",
        f.to_str().unwrap(),
    ];
    if with_lists {
        args.extend(["--lists", l.to_str().unwrap()]);
    }
    let out = waygate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON decision")
}

#[test]
fn eval_prints_the_decision() {
    let d = eval(
        "egress",
        json!({"net.dst.ip": "198.51.100.158", "net.protocol": "tcp", "identity.groups.name": ["eng"]}),
        false,
    );
    assert_eq!(
        d,
        json!({"matched": true, "rule_id": "1f0b9d2e-7a1c-4e55-9a0e-6c3d2b1a0f01",
               "rule_name": "Access third-party provider", "action": "egress",
               "rule_settings": {"egress": {"ipv4": "192.0.2.10", "ipv6": "2001:db8:10::/64", "ipv4_fallback": "0.0.0.0"}}})
    );
    let d = eval(
        "egress",
        json!({"net.dst.ip": "203.0.113.9", "net.protocol": "udp"}),
        false,
    );
    assert_eq!(d["rule_name"], json!("Default egress policy"));
    assert_eq!(d["rule_settings"], json!({}));
    let d = eval("l4", json!({"net.dst.ip": "203.0.113.9"}), false);
    assert_eq!(
        d,
        json!({"matched": false, "rule_id": null, "rule_name": null, "action": null, "rule_settings": null})
    );
}

#[test]
fn eval_uses_lists() {
    let flow = json!({"dns.fqdn": "www.bad.example", "identity.groups.name": ["eng"]});
    assert_eq!(
        eval("dns", flow.clone(), true)["rule_name"],
        json!("Block listed")
    );
    // Without the lists file the list matches nothing.
    assert_eq!(eval("dns", flow, false)["matched"], json!(false));
    let other = json!({"dns.fqdn": "www.bad.example", "identity.groups.name": ["ops"]});
    assert_eq!(eval("dns", other, true)["matched"], json!(false));
}

#[test]
fn eval_rejects_unknown_input_fields() {
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "rules.json", &rules());
    let f = write(dir.path(), "flow.json", &json!({"net.dst.iq": "1.2.3.4"}));
    let out = waygate(&[
        "rules",
        "eval",
        "--rules",
        r.to_str().unwrap(),
        "--filter",
        "l4",
        "--input",
        f.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("did you mean \"net.dst.ip\""),
        "{}",
        text(&out.stderr)
    );
}
