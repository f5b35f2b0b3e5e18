//! The bundled client's tunnel (issue 17): `waygate token create` -> `waygate-client enroll` ->
//! `up` in a device namespace with no wg-quick -> curl reaches the origin, by name through the
//! gateway's resolver, from the egress address; `status --json` says connected; the device's
//! private key is not in the gateway's data dir; after a gateway restart the same client is back
//! without enrolling again, and when the device's address changes it handshakes from the new
//! one at once; `down` leaves `ip rule`, every routing table and resolv.conf exactly
//! as they were (with resolvconf, and with /etc/resolv.conf alone), also when the interface is
//! deleted under the daemon. A token with a name for two devices names the second `NAME-2`.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use waygate_e2e::{client_bin, report, skip, wait_until, Lab, Output, EGRESS_V4};

/// The posture check the client's agent reports on.
const POSTURE_CHECK: &str = "4a1f5e0c-7d55-4c2e-9b0f-0d3c8e6a9f21";

/// Where the gateway's enrollment listener listens (its underlay address).
const CONTROL: &str = "198.51.100.1:8444";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `waygate-client --dir DIR ARGS...` in namespace `ns`.
fn client(lab: &Lab, ns: &str, dir: &Path, args: &[&str], timeout: Duration) -> Output {
    let bin = client_bin().expect("waygate-client binary");
    let mut all = vec![
        bin.to_str().expect("utf-8 path"),
        "--dir",
        dir.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    lab.run_in(ns, &all, timeout)
}

fn status(lab: &Lab, ns: &str, dir: &Path) -> serde_json::Value {
    let out = client(lab, ns, dir, &["status", "--json"], secs(10));
    assert!(out.ok(), "status: {}", out.describe());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {}", out.stdout))
}

/// What `down` must put back: rules, every routing table, the resolver file.
fn network_state(lab: &Lab, ns: &str) -> String {
    let mut all = String::new();
    for argv in [
        &["ip", "-4", "rule"][..],
        &["ip", "-6", "rule"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
        &["cat", "/etc/resolv.conf"],
        &["cat", "/proc/sys/net/ipv4/conf/all/src_valid_mark"],
    ] {
        let out = lab.run_in(ns, argv, secs(10));
        assert!(out.ok(), "{argv:?}: {}", out.describe());
        all.push_str(&format!("$ {}\n{}", argv.join(" "), out.stdout));
    }
    all
}

/// Creates the posture check [`POSTURE_CHECK`]: the file `flag` exists, every minute.
fn create_file_check(lab: &Lab, flag: &Path) {
    let rule = serde_json::json!({
        "id": POSTURE_CHECK, "name": "flag file", "type": "file", "schedule": "1m",
        "match": [{"platform": "linux"}],
        "input": {"path": flag.to_str().expect("utf-8 path"), "exists": true},
    });
    let rule_file = lab.dir().join("posture-rule.json");
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
}

/// The source address the HTTP origin saw for `GET url` from namespace `ns`.
fn http_src(lab: &Lab, ns: &str, url: &str) -> Result<String, Output> {
    let out = lab.run_in(ns, &["curl", "-sS", "--max-time", "5", url], secs(10));
    if !out.ok() {
        return Err(out);
    }
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["src"].as_str().map(str::to_string))
        .ok_or(out)
}

#[test]
fn the_client_tunnel_reaches_the_origin_survives_a_gateway_restart_and_down_restores_all() {
    if skip("the_client_tunnel_reaches_the_origin_survives_a_gateway_restart_and_down_restores_all")
    {
        return;
    }
    let mut lab = Lab::up();
    lab.stop_gateway();
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!("[control]\nlisten = \"{CONTROL}\"\n"));
    fs::write(lab.config(), config).expect("config");
    lab.start_gateway().expect("gateway with [control] listen");

    // One named token for two devices: the second gets a name of its own.
    let out = lab
        .waygate(&[
            "token",
            "create",
            "--email",
            "ada@example.com",
            "--name",
            "lab-pc",
            "--uses",
            "2",
        ])
        .expect("token create");
    assert!(out.ok(), "{}", out.describe());
    let token = out.stdout.trim().to_string();
    let server = format!("https://{CONTROL}");
    let dir = lab.dir().join("client-d1");
    let enroll = |ns: &str, dir: &Path| {
        wait_until(secs(10), Duration::from_millis(200), || {
            let out = client(
                &lab,
                ns,
                dir,
                &["enroll", "--server", &server, "--token", &token],
                secs(30),
            );
            (!out.stderr.contains("cannot connect")).then_some(out)
        })
        .expect("the enrollment listener accepts connections")
    };
    let out = enroll("d1", &dir);
    assert!(out.ok(), "enroll d1: {}", out.describe());
    let dir2 = lab.dir().join("client-d2");
    let out = enroll("d2", &dir2);
    assert!(out.ok(), "enroll d2: {}", out.describe());
    let list = lab
        .waygate(&["device", "list", "--json"])
        .expect("device list");
    let devices: serde_json::Value = serde_json::from_str(&list.stdout).expect("JSON");
    let mut names: Vec<&str> = devices
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["lab-pc", "lab-pc-2"]);

    // A posture check the daemon's agent reports on once the tunnel is up (the file exists;
    // the namespace shares this file system).
    let flag = lab.dir().join("client-posture.flag");
    fs::write(&flag, "present\n").expect("flag file");
    create_file_check(&lab, &flag);

    // Up, in a namespace where nothing but the client configures the network.
    let before = network_state(&lab, "d1");
    let iface = format!("{}c1", lab.prefix());
    let started = Instant::now();
    let out = client(&lab, "d1", &dir, &["up", "--interface", &iface], secs(40));
    let pid: Option<u32> = fs::read_to_string(dir.join("daemon.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    if let Some(pid) = pid {
        lab.record_pid(pid, "client-d1")
            .expect("record the daemon's pid");
    }
    assert!(
        out.ok(),
        "up: {}\ndaemon log: {}",
        out.describe(),
        fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
    report(&format!(
        "up returned after {:?}: {}",
        started.elapsed(),
        out.stdout.trim()
    ));
    let st = status(&lab, "d1", &dir);
    assert_eq!(st["connected"], true, "{st}");
    assert_eq!(st["vnet"], serde_json::Value::Null, "{st}");
    assert!(st["posture"].is_object(), "{st}");
    assert_eq!(st["endpoint"], "198.51.100.1:51820", "{st}");
    assert_eq!(st["interface"], iface.as_str(), "{st}");
    assert!(
        st["handshake_age_secs"].as_u64().is_some_and(|a| a < 30),
        "{st}"
    );
    // The daemon's agent reads the profile through the tunnel, reports the facts, and status
    // shows the gateway's verdict; the gateway recorded it for the device.
    let passed = wait_until(secs(20), Duration::from_millis(250), || {
        let st = status(&lab, "d1", &dir);
        (st["posture"][POSTURE_CHECK] == true).then_some(st)
    });
    assert!(
        passed.is_some(),
        "the agent's posture report never reached status: {}\ndaemon log: {}",
        status(&lab, "d1", &dir),
        fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
    let shown = lab
        .waygate(&["device", "show", "lab-pc"])
        .expect("device show");
    assert!(
        shown.stdout.contains(POSTURE_CHECK),
        "device show: {}",
        shown.describe()
    );
    let during = network_state(&lab, "d1");
    assert!(during.contains("nameserver 100.96.0.1"), "{during}");
    assert!(during.contains("suppress_prefixlength 0"), "{during}");
    // `up` again while up: the running daemon answers, nothing is started or changed.
    let out = client(&lab, "d1", &dir, &["up", "--interface", &iface], secs(40));
    assert!(out.ok(), "second up: {}", out.describe());
    assert_eq!(network_state(&lab, "d1"), during);
    assert_eq!(status(&lab, "d1", &dir)["pid"], st["pid"]);

    // The origin, by address and by name (resolved by the gateway through the tunnel).
    let src = http_src(&lab, "d1", "http://203.0.113.10/")
        .unwrap_or_else(|out| panic!("HTTP origin: {}", out.describe()));
    assert_eq!(src, EGRESS_V4);
    let src = http_src(&lab, "d1", "http://web.example/")
        .unwrap_or_else(|out| panic!("HTTP origin by name: {}", out.describe()));
    assert_eq!(src, EGRESS_V4);
    let st = status(&lab, "d1", &dir);
    assert!(st["rx_bytes"].as_u64().is_some_and(|b| b > 0), "{st}");
    assert!(st["tx_bytes"].as_u64().is_some_and(|b| b > 0), "{st}");

    // The private key stays on the device.
    let private = fs::read_to_string(dir.join("private.key")).expect("private.key");
    let mut stack = vec![lab.dir().join("data")];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(
                fs::read_dir(&path)
                    .expect("read_dir")
                    .flatten()
                    .map(|e| e.path()),
            );
        } else {
            let bytes = fs::read(&path).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(private.trim()),
                "{} holds the device's private key",
                path.display()
            );
        }
    }

    // A gateway restart: the same client comes back by itself, with a new handshake.
    lab.stop_gateway();
    // Taken before the start: the new gateway greets the device's last endpoint as it starts,
    // which may be before `start_gateway` returns.
    let restarted = Instant::now();
    lab.start_gateway().expect("gateway restart");
    let back = wait_until(secs(40), Duration::from_millis(500), || {
        http_src(&lab, "d1", "http://203.0.113.10/").ok()
    });
    assert_eq!(
        back.as_deref(),
        Some(EGRESS_V4),
        "no traffic after the gateway restart; daemon log: {}",
        fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
    report(&format!(
        "back {:?} after the gateway restart",
        restarted.elapsed()
    ));
    let st = status(&lab, "d1", &dir);
    assert_eq!(st["connected"], true, "{st}");
    assert!(
        st["handshake_age_secs"]
            .as_u64()
            .is_some_and(|a| a <= restarted.elapsed().as_secs()),
        "the handshake is from after the restart: {st}"
    );

    // Roaming: the device's address changes under the tunnel. The daemon sees the new source
    // towards the gateway and handshakes from it at once.
    let handshakes = st["handshakes"].as_u64().expect("handshakes");
    let sh = |cmd: &str| {
        let out = lab.run_in("d1", &["sh", "-c", cmd], secs(10));
        assert!(out.ok(), "{cmd}: {}", out.describe());
    };
    sh("sysctl -qw net.ipv4.conf.ul0.promote_secondaries=1 && \
        ip addr add 198.51.100.21/24 dev ul0 && ip addr del 198.51.100.11/24 dev ul0");
    let roamed = wait_until(secs(10), Duration::from_millis(200), || {
        let st = status(&lab, "d1", &dir);
        (st["handshakes"].as_u64() > Some(handshakes)).then_some(st)
    });
    assert!(
        roamed.is_some(),
        "no new handshake after the address changed; daemon log: {}",
        fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
    let src = http_src(&lab, "d1", "http://203.0.113.10/")
        .unwrap_or_else(|out| panic!("HTTP origin after roaming: {}", out.describe()));
    assert_eq!(src, EGRESS_V4);
    sh("ip addr add 198.51.100.11/24 dev ul0 && ip addr del 198.51.100.21/24 dev ul0");

    // Down: everything as it was.
    let out = client(&lab, "d1", &dir, &["down"], secs(20));
    assert!(out.ok(), "down: {}", out.describe());
    let after = network_state(&lab, "d1");
    assert_eq!(before, after, "down did not restore the network");
    let st = status(&lab, "d1", &dir);
    assert_eq!(st["connected"], false, "{st}");
    assert_eq!(st["running"], false, "{st}");
    if let Some(pid) = pid {
        // Gone, or a zombie its new parent has not reaped yet.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "the daemon (pid {pid}) still runs after down: {stat}"
        );
    }
    // Down again: nothing to do, and says so.
    let out = client(&lab, "d1", &dir, &["down"], secs(20));
    assert!(out.ok(), "{}", out.describe());
    assert!(out.stderr.contains("not running"), "{}", out.describe());

    // The second device, on a host without resolvconf (not on PATH): /etc/resolv.conf itself
    // is written, and put back byte for byte.
    let before = network_state(&lab, "d2");
    let bin = client_bin().expect("waygate-client binary");
    let iface2 = format!("{}c2", lab.prefix());
    let out = lab.run_in(
        "d2",
        &[
            "env",
            "PATH=/usr/bin:/bin",
            bin.to_str().expect("utf-8 path"),
            "--dir",
            dir2.to_str().expect("utf-8 path"),
            "up",
            "--interface",
            &iface2,
        ],
        secs(40),
    );
    if let Some(pid) = fs::read_to_string(dir2.join("daemon.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        lab.record_pid(pid, "client-d2")
            .expect("record the daemon's pid");
    }
    assert!(
        out.ok(),
        "up without resolvconf: {}\ndaemon log: {}",
        out.describe(),
        fs::read_to_string(dir2.join("daemon.log")).unwrap_or_default()
    );
    let resolv = lab
        .run_in("d2", &["cat", "/etc/resolv.conf"], secs(10))
        .stdout;
    assert!(resolv.contains("written by waygate-client"), "{resolv}");
    assert!(resolv.contains("nameserver 100.96.0.1"), "{resolv}");
    let src = http_src(&lab, "d2", "http://web.example/")
        .unwrap_or_else(|out| panic!("HTTP origin by name from d2: {}", out.describe()));
    assert_eq!(src, EGRESS_V4);
    // The interface deleted under the daemon: it stops and undoes its routes, rules and DNS.
    let out = lab.run_in("d2", &["ip", "link", "del", &iface2], secs(10));
    assert!(out.ok(), "{}", out.describe());
    let stopped = wait_until(secs(10), Duration::from_millis(100), || {
        (!dir2.join("daemon.pid").exists()).then_some(())
    });
    assert!(
        stopped.is_some(),
        "the daemon runs on without its interface; log: {}",
        fs::read_to_string(dir2.join("daemon.log")).unwrap_or_default()
    );
    assert_eq!(
        before,
        network_state(&lab, "d2"),
        "the daemon did not undo its changes when its interface went"
    );
    let out = client(&lab, "d2", &dir2, &["down"], secs(20));
    assert!(out.ok(), "down d2: {}", out.describe());
    assert!(out.stderr.contains("not running"), "{}", out.describe());
}

/// Posture through the real client's daemon: its agent reports on the rule's schedule, and a
/// network rule that needs the check blocks the device within one schedule after the file
/// goes, and lets it through again within one schedule after the file is back.
#[test]
fn the_client_daemon_reports_posture_on_its_schedule() {
    if skip("the_client_daemon_reports_posture_on_its_schedule") {
        return;
    }
    let mut lab = Lab::up();
    lab.stop_gateway();
    let dir = lab.dir().join("client-posture");
    let flag = lab.dir().join("posture-loop.flag");
    let rules = lab.dir().join("rules.json");
    fs::write(
        &rules,
        serde_json::json!({"result": [{
            "id": "7c0d0a52-0000-4000-8000-00000000c11e", "name": "flag required",
            "action": "block", "filters": ["l4"], "precedence": 1, "enabled": true,
            "traffic": "net.dst.ip == 203.0.113.10", "identity": "",
            "device_posture": format!(
                "not(any(device_posture.checks.passed[*] in {{\"{POSTURE_CHECK}\"}}))"
            ),
        }]})
        .to_string(),
    )
    .expect("rules");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!(
        "[control]\nlisten = \"{CONTROL}\"\n[policy]\nrules = \"{}\"\n",
        rules.display()
    ));
    fs::write(lab.config(), config).expect("config");
    lab.start_gateway()
        .expect("gateway with [control] and rules");
    create_file_check(&lab, &flag);
    fs::write(&flag, "present\n").expect("flag");
    let out = lab
        .waygate(&["token", "create", "--email", "ada@example.com"])
        .expect("token create");
    assert!(out.ok(), "{}", out.describe());
    let token = out.stdout.trim().to_string();
    let server = format!("https://{CONTROL}");
    let out = wait_until(secs(10), Duration::from_millis(200), || {
        let out = client(
            &lab,
            "d1",
            &dir,
            &["enroll", "--server", &server, "--token", &token],
            secs(30),
        );
        (!out.stderr.contains("cannot connect")).then_some(out)
    })
    .expect("the enrollment listener accepts connections");
    assert!(out.ok(), "enroll: {}", out.describe());
    let iface = format!("{}c9", lab.prefix());
    let out = client(&lab, "d1", &dir, &["up", "--interface", &iface], secs(40));
    if let Some(pid) = fs::read_to_string(dir.join("daemon.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        lab.record_pid(pid, "client-posture")
            .expect("record the daemon's pid");
    }
    assert!(out.ok(), "up: {}", out.describe());
    let origin = "http://203.0.113.10/";
    let reaches = |lab: &Lab| http_src(lab, "d1", origin).is_ok();
    // The agent's first round runs at once: the pass lets the device through.
    assert!(
        wait_until(secs(20), Duration::from_millis(250), || reaches(&lab)
            .then_some(()))
        .is_some(),
        "the first posture report should let the device through: {}\n{}",
        status(&lab, "d1", &dir),
        fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    );
    // One schedule is a minute; a round may be up to that late, plus a few seconds of slack.
    let within = secs(60 + 15);
    fs::remove_file(&flag).expect("remove the flag");
    let gone = Instant::now();
    assert!(
        wait_until(within, Duration::from_millis(500), || (!reaches(&lab))
            .then_some(()))
        .is_some(),
        "the device should be blocked within one schedule of the file going: {}",
        status(&lab, "d1", &dir)
    );
    report(&format!(
        "posture: blocked {:?} after the file went",
        gone.elapsed()
    ));
    assert_eq!(status(&lab, "d1", &dir)["posture"][POSTURE_CHECK], false);
    fs::write(&flag, "back\n").expect("flag back");
    let back = Instant::now();
    assert!(
        wait_until(within, Duration::from_millis(500), || reaches(&lab)
            .then_some(()))
        .is_some(),
        "the device should be let through within one schedule of the file returning: {}",
        status(&lab, "d1", &dir)
    );
    report(&format!(
        "posture: through again {:?} after the file returned",
        back.elapsed()
    ));
    let out = client(&lab, "d1", &dir, &["down"], secs(30));
    assert!(out.ok(), "down: {}", out.describe());
}
