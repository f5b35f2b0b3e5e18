//! Device posture and virtual networks through the device API inside the tunnel (issue 17,
//! items 3 and 4): a posture rule made with `waygate posture create`, a network rule that blocks
//! devices that have not passed it, and a wg-quick device whose `waygate-client posture run
//! --report` sends the facts (the gateway decides). A failing report blocks the device, a
//! passing one lets it through again, and a pass expires when the device stops reporting. Then
//! `waygate-client vnet use` switches which private site answers 198.18.0.10.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::time::{Duration, Instant};

use waygate_e2e::{client_bin, report, skip, wait_until, Device, Lab, Output, HTTP_ORIGIN};

const CHECK: &str = "5d1c0a52-7a51-4c55-9d3e-0b6f2a1e0f11";
const BLUE: &str = "3f1c9a52-7a51-4c55-9d3e-0b6f2a1e0001";
const GREEN: &str = "3f1c9a52-7a51-4c55-9d3e-0b6f2a1e0002";
const SITE: &str = "http://198.18.0.10/";
/// The gateway's side of each site's link: what the site's HTTP echo reports as the source.
const VIA_SITE1: &str = "198.19.1.1";
const VIA_SITE2: &str = "198.19.2.1";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Blocks flows to the HTTP origin of devices that have not passed [`CHECK`].
fn rules() -> String {
    serde_json::json!({"result": [{
        "id": "7c0d0a52-0000-4000-8000-00000000b10c", "name": "agent config required",
        "action": "block", "filters": ["l4"], "precedence": 1, "enabled": true,
        "traffic": format!("net.dst.ip == {HTTP_ORIGIN}"), "identity": "",
        "device_posture": format!("not(any(device_posture.checks.passed[*] in {{\"{CHECK}\"}}))"),
    }]})
    .to_string()
}

/// `waygate-client --dir DIR ARGS...` in the device's namespace. The directory holds no
/// enrollment (the device came up with wg-quick), so the client finds the device API at the
/// default gateway address, 100.96.0.1.
fn client(lab: &Lab, device: &Device, args: &[&str]) -> Output {
    let bin = client_bin().expect("waygate-client binary");
    let dir = lab.dir().join("no-client-dir");
    let mut all = vec![
        bin.to_str().expect("utf-8 path"),
        "--dir",
        dir.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    lab.run_in(&device.ns, &all, secs(30))
}

/// Sends the facts and returns the gateway's verdict on [`CHECK`].
fn report_posture(lab: &Lab, device: &Device) -> bool {
    let out = client(lab, device, &["posture", "run", "--json", "--report"]);
    assert!(out.ok(), "posture run --report: {}", out.describe());
    // Two JSON documents: the facts, then the verdicts.
    let mut docs = serde_json::Deserializer::from_str(&out.stdout).into_iter::<serde_json::Value>();
    let facts = docs.next().and_then(Result::ok).expect("the facts");
    assert_eq!(facts["platform"], "linux", "{facts}");
    let verdicts = docs.next().and_then(Result::ok).expect("the verdicts");
    verdicts[CHECK]["passed"]
        .as_bool()
        .unwrap_or_else(|| panic!("no verdict on {CHECK}: {verdicts}"))
}

fn reaches_origin(lab: &Lab, device: &Device) -> bool {
    lab.http_src(device, secs(2)).is_ok()
}

/// Waits until the origin is reachable (`want`) or not, within `within`.
fn expect_origin(lab: &Lab, device: &Device, want: bool, within: Duration, what: &str) {
    let got = wait_until(within, Duration::from_millis(250), || {
        (reaches_origin(lab, device) == want).then_some(())
    });
    assert!(
        got.is_some(),
        "{what}: the origin should be {} within {within:?}",
        if want { "reachable" } else { "blocked" }
    );
}

fn setup() -> (Lab, Device, std::path::PathBuf) {
    let mut lab = Lab::up();
    lab.stop_gateway();
    let dir = lab.dir().to_path_buf();
    fs::write(dir.join("rules.json"), rules()).expect("rules");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!(
        "[policy]\nrules = \"{}\"\n\
         [[vnets]]\nname = \"blue\"\nid = \"{BLUE}\"\n\
         routes = [{{ cidr = \"198.18.0.0/24\", via = \"vs1\" }}]\n\
         [[vnets]]\nname = \"green\"\nid = \"{GREEN}\"\n\
         routes = [{{ cidr = \"198.18.0.0/24\", via = \"198.19.2.2\" }}]\n",
        dir.join("rules.json").display(),
    ));
    fs::write(lab.config(), config).expect("config");
    if let Err(e) = lab.start_gateway() {
        panic!("the gateway did not start with rules and vnets: {e:#}");
    }
    // The file the posture check asks for: the device's namespace shares this file system.
    let flag = dir.join("agent.conf");
    let rule = serde_json::json!({
        "id": CHECK, "name": "agent config", "type": "file", "schedule": "1m",
        "expiration": "1m", "match": [{"platform": "linux"}],
        "input": {"path": flag.to_str().expect("utf-8 path"), "exists": true},
    });
    let rule_file = dir.join("posture-rule.json");
    fs::write(&rule_file, rule.to_string()).expect("rule file");
    let out = lab
        .waygate(&[
            "posture",
            "create",
            "--file",
            rule_file.to_str().expect("utf-8"),
        ])
        .expect("posture create");
    assert!(out.ok(), "posture create: {}", out.describe());
    assert_eq!(out.stdout.trim(), CHECK, "the id is kept and printed alone");
    let listed = lab
        .waygate(&["posture", "list", "--json"])
        .expect("posture list");
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).expect("JSON list");
    assert_eq!(listed[0]["id"], CHECK);
    assert_eq!(listed[0]["schedule"], "1m");
    let device = lab.add_device("alice", "d1").expect("device alice");
    (lab, device, flag)
}

#[test]
fn posture_reports_decide_network_rules_and_vnet_use_switches_sites() {
    if skip("posture_reports_decide_network_rules_and_vnet_use_switches_sites") {
        return;
    }
    let (lab, alice, flag) = setup();

    // No report yet: no pass, blocked.
    assert!(!reaches_origin(&lab, &alice), "blocked before any report");

    // The profile names the check, its schedule and input, and the virtual networks.
    let out = client(&lab, &alice, &["vnet", "list", "--json"]);
    assert!(out.ok(), "vnet list: {}", out.describe());
    let vnets: serde_json::Value = serde_json::from_str(&out.stdout).expect("vnet list JSON");
    let names: Vec<&str> = vnets["vnets"]
        .as_array()
        .expect("vnets")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["blue", "green"]);
    assert!(vnets["current"].is_null());
    // The same API on the gateway's IPv6 tunnel address, read with curl: the tunnel says who
    // asks, so the profile is this device's.
    let out = lab.curl(
        &alice,
        "http://[fd77:6761:7465::1]/v1/profile",
        secs(3),
        &["-g"],
    );
    assert!(out.ok(), "GET /v1/profile over IPv6: {}", out.describe());
    let profile: serde_json::Value = serde_json::from_str(&out.stdout).expect("profile JSON");
    assert_eq!(profile["success"], true, "{profile}");
    assert_eq!(profile["result"]["name"], "alice");
    assert_eq!(profile["result"]["posture_checks"][0]["id"], CHECK);
    assert_eq!(profile["result"]["posture_checks"][0]["schedule"], "1m");

    // The file is there: a passing report lets the device through on its next flow.
    fs::write(&flag, "agent=on\n").expect("flag file");
    assert!(report_posture(&lab, &alice), "the file exists: passed");
    expect_origin(&lab, &alice, true, secs(3), "after a passing report");
    report("posture: a passing report opened the network rule");

    // The file is gone: the next report fails the check and blocks the device.
    fs::remove_file(&flag).expect("rm flag");
    assert!(!report_posture(&lab, &alice), "the file is missing: failed");
    expect_origin(&lab, &alice, false, secs(3), "after a failing report");
    fs::write(&flag, "agent=on\n").expect("flag file");
    assert!(report_posture(&lab, &alice));
    expect_origin(&lab, &alice, true, secs(3), "after the file came back");
    report("posture: a failing report blocked the device, a passing one let it through again");

    // The device stops reporting: its pass expires ("expiration": "1m") and it is blocked.
    let passed_at = Instant::now();
    expect_origin(&lab, &alice, false, secs(75), "after the pass expired");
    let took = passed_at.elapsed();
    assert!(
        took >= secs(50),
        "blocked after {took:?}, before the pass could expire"
    );
    report(&format!(
        "posture: the pass expired {:.0}s after the last report",
        took.as_secs_f64()
    ));

    // Virtual networks: the device picks the site that answers 198.18.0.10.
    let site = || lab.http_src_of(&alice, SITE, secs(3), &[]);
    assert!(
        site().is_err(),
        "the default network has no route to the sites"
    );
    for (vnet, via) in [
        ("blue", VIA_SITE1),
        ("green", VIA_SITE2),
        ("blue", VIA_SITE1),
    ] {
        let out = client(&lab, &alice, &["vnet", "use", vnet]);
        assert!(out.ok(), "vnet use {vnet}: {}", out.describe());
        assert_eq!(out.stdout.trim(), vnet);
        let reached = wait_until(secs(3), Duration::from_millis(200), || {
            (site().ok().as_deref() == Some(via)).then_some(())
        });
        assert!(
            reached.is_some(),
            "in {vnet} the device must reach {via}: {:?}",
            site()
        );
    }
    let out = client(&lab, &alice, &["vnet", "list", "--json"]);
    let vnets: serde_json::Value = serde_json::from_str(&out.stdout).expect("vnet list JSON");
    assert_eq!(vnets["current"], "blue");
    let refused = client(&lab, &alice, &["vnet", "use", "purple"]);
    assert!(!refused.ok(), "an unknown network is refused");
    assert!(refused.stderr.contains("purple"), "{}", refused.describe());
    let out = client(&lab, &alice, &["vnet", "default"]);
    assert!(out.ok(), "vnet default: {}", out.describe());
    let left = wait_until(secs(3), Duration::from_millis(200), || {
        site().is_err().then_some(())
    });
    assert!(left.is_some(), "back in the default network: no site");
    report("vnets: vnet use switched 198.18.0.10 between two sites; vnet default left them");

    // The registry has the gateway's verdict with its reason (auditable), never the client's;
    // the last pass has expired.
    let show = lab
        .waygate(&["device", "show", "alice"])
        .expect("device show");
    let line = show
        .stdout
        .lines()
        .find(|l| l.starts_with("posture check:"))
        .unwrap_or_else(|| panic!("no posture check line: {}", show.describe()));
    assert!(line.contains(&format!("{CHECK} expired")), "{line}");
    assert!(
        line.contains(&format!("file {} exists", flag.display())),
        "{line}"
    );
}
