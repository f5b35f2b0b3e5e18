//! Metrics and activity logs through a real device (issue "Operate it", items 3 and 4): the
//! device makes DNS queries, a TCP flow and so an egress decision; `/metrics` on
//! `metrics.listen` parses with a Prometheus text-format parser and its counters move with that
//! traffic; `dns.jsonl`, `network.jsonl` and `egress.jsonl` in `logs.dir` hold the queries and
//! flows with Logpush's field names (the DNS lines' QueryID, UserID, IsResponseCached and
//! category fields included); `waygate logs` reads them; rotation keeps at most
//! `logs.keep` files; a full log disk (a 64 KiB tmpfs) does not stop DNS answers and its lost
//! lines are counted.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use waygate_e2e::{report, skip, wait_until, Device, Lab, HTTP_ORIGIN};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const METRICS: &str = "127.0.0.1:9090";

const RULES: &str = r#"[
  {"id": "block-list", "name": "Block list", "action": "block", "filters": ["dns"],
   "precedence": 10, "traffic": "dns.fqdn == \"blocked.example\""},
  {"id": "no-gambling", "name": "No gambling", "action": "block", "filters": ["dns"],
   "precedence": 20, "traffic": "any(dns.content_category[*] in {8})"}
]"#;

/// Categories for the DNS lines' category fields: a gambling name (99, under 8 Gambling),
/// the resolved name (122 News), and the address the lab's upstream answers (117 Malware).
const CATEGORIES: &str = "casino.example,99\na.example,122\n203.0.113.10,117\n";

/// Restarts the lab's gateway with `extra` appended to its config and a rule set; returns the
/// logs dir.
fn configure(lab: &mut Lab, logs: &Path, extra: &str) {
    lab.stop_gateway();
    let rules = lab.dir().join("rules.json");
    fs::write(&rules, RULES).expect("rules");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!(
        "[policy]\nrules = \"{}\"\n[metrics]\nlisten = \"{METRICS}\"\n[logs]\ndir = \"{}\"\n{extra}",
        rules.display(),
        logs.display()
    ));
    fs::write(lab.config(), config).expect("config");
    if let Err(e) = lab.start_gateway() {
        panic!("the gateway did not start with metrics and logs: {e:#}");
    }
}

/// `/metrics`, parsed.
fn scrape(lab: &Lab) -> prometheus_parse::Scrape {
    let url = format!("http://{METRICS}/metrics");
    let out = lab.run_in("gw", &["curl", "-sS", "--max-time", "5", &url], secs(10));
    assert!(out.ok(), "GET /metrics: {}", out.describe());
    let lines = out.stdout.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("/metrics parses");
    for s in &parsed.samples {
        assert!(
            s.metric.starts_with("waygate_"),
            "{} does not start with waygate_",
            s.metric
        );
    }
    parsed
}

/// The value of `name` with `labels` (0 when the series is absent).
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map_or(0.0, |s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// `dig` for every name in one process; the status word of each answer, in order.
fn dig_many(lab: &Lab, device: &Device, names: &[String]) -> Vec<String> {
    let mut args = vec![
        "dig".to_string(),
        "@100.96.0.1".into(),
        "+noall".into(),
        "+comments".into(),
        "+tries=1".into(),
        "+time=3".into(),
    ];
    args.extend(names.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.run_in(&device.ns, &args, secs(120));
    out.stdout
        .split("status: ")
        .skip(1)
        .map(|s| s.split(',').next().unwrap_or("").to_string())
        .collect()
}

/// Every line of `kind`'s files in `dir`, oldest first.
fn lines(dir: &Path, kind: &str) -> Vec<Value> {
    let mut files: Vec<(usize, PathBuf)> = fs::read_dir(dir)
        .expect("logs dir")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = if name == format!("{kind}.jsonl") {
                0
            } else {
                name.strip_prefix(&format!("{kind}."))?
                    .strip_suffix(".jsonl")?
                    .parse()
                    .ok()?
            };
            Some((n, e.path()))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files
        .iter()
        .flat_map(|(_, p)| {
            fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("each line is one JSON object"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn has(keys: &[&str], v: &Value) {
    for key in keys {
        assert!(v.get(*key).is_some(), "{key} missing from {v}");
    }
}

#[test]
fn metrics_and_activity_logs_follow_the_traffic() {
    if skip("metrics_and_activity_logs_follow_the_traffic") {
        return;
    }
    let mut lab = Lab::up();
    let logs = lab.dir().join("logs");
    let categories = lab.dir().join("categories.csv");
    fs::write(&categories, CATEGORIES).expect("categories");
    configure(
        &mut lab,
        &logs,
        &format!(
            "max_size = \"16KB\"\nkeep = 2\n[[dns.categories]]\npath = \"{}\"\nformat = \"csv\"\n",
            categories.display()
        ),
    );
    let alice = lab.add_device("alice", "d1").expect("alice");
    let before = scrape(&lab);

    // DNS: a resolved name (then again, from the cache), a blocked one, one blocked by its
    // category; a TCP flow (and its egress decision).
    let got = dig_many(
        &lab,
        &alice,
        &[
            "a.example".into(),
            "blocked.example".into(),
            "casino.example".into(),
            "a.example".into(),
        ],
    );
    assert_eq!(
        got,
        ["NOERROR", "REFUSED", "REFUSED", "NOERROR"],
        "{}",
        lab.gateway_log_tail()
    );
    let http = lab.curl(&alice, &format!("http://{HTTP_ORIGIN}/"), secs(10), &[]);
    assert!(http.ok(), "curl: {}", http.describe());

    // The snapshot behind /metrics is published once a second.
    let after = wait_until(secs(10), Duration::from_millis(500), || {
        let s = scrape(&lab);
        (value(
            &s,
            "waygate_policy_decisions_total",
            &[("stage", "network"), ("action", "allow")],
        ) > value(
            &before,
            "waygate_policy_decisions_total",
            &[("stage", "network"), ("action", "allow")],
        ))
        .then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "the network decision never showed in /metrics\n{}",
            lab.gateway_log_tail()
        )
    });
    let grew = |name: &str, labels: &[(&str, &str)], by: f64| {
        let (b, a) = (value(&before, name, labels), value(&after, name, labels));
        assert!(a - b >= by, "{name}{labels:?}: {b} -> {a}, expected +{by}");
    };
    grew("waygate_dns_queries_total", &[], 2.0);
    grew(
        "waygate_dns_answers_total",
        &[("qtype", "A"), ("rcode", "NOERROR")],
        1.0,
    );
    grew(
        "waygate_dns_answers_total",
        &[("qtype", "A"), ("rcode", "REFUSED")],
        1.0,
    );
    grew(
        "waygate_policy_decisions_total",
        &[("stage", "dns"), ("action", "block")],
        1.0,
    );
    grew(
        "waygate_policy_decisions_total",
        &[("stage", "egress"), ("action", "default")],
        1.0,
    );
    grew("waygate_tunnel_bytes_total", &[("direction", "rx")], 500.0);
    grew("waygate_tunnel_packets_total", &[("direction", "tx")], 3.0);
    grew("waygate_log_lines_written_total", &[("log", "dns")], 2.0);
    assert_eq!(value(&after, "waygate_peers", &[]), 1.0);
    assert_eq!(value(&after, "waygate_peers_connected", &[]), 1.0);
    assert!(value(&after, "waygate_wireguard_handshakes_total", &[]) >= 1.0);
    assert!(
        value(&after, "waygate_dns_upstream_duration_seconds_count", &[]) >= 1.0,
        "the upstream query's latency is in the histogram"
    );
    report(&format!(
        "observe: /metrics has {} samples; dns queries {} -> {}",
        after.samples.len(),
        value(&before, "waygate_dns_queries_total", &[]),
        value(&after, "waygate_dns_queries_total", &[])
    ));

    // The logs: the files exist.
    for name in ["dns.jsonl", "network.jsonl", "http.jsonl", "egress.jsonl"] {
        assert!(logs.join(name).exists(), "{name} missing");
    }
    let dns = lines(&logs, "dns");
    let find = |name: &str| {
        dns.iter()
            .find(|l| l["QueryName"] == name && l["DeviceName"] == "alice")
            .unwrap_or_else(|| panic!("no dns line for {name} in {dns:?}"))
            .clone()
    };
    let ok = find("a.example");
    has(
        &[
            "Datetime",
            "DeviceID",
            "Email",
            "SrcIP",
            "QueryName",
            "QueryTypeName",
            "ResolverDecision",
            "PolicyID",
            "QueryID",
            "UserID",
            "IsResponseCached",
        ],
        &ok,
    );
    assert_eq!(ok["Email"], "alice@example.com");
    assert_eq!(ok["SrcIP"], alice.ipv4.to_string());
    assert_eq!(ok["QueryTypeName"], "A");
    assert_eq!(ok["RCode"], 0);
    assert_eq!(ok["ResolvedIPs"][0], "203.0.113.10");
    assert_eq!(ok["ResolverDecision"], "allowedOnNoPolicyMatch");
    let blocked = find("blocked.example");
    assert_eq!(blocked["ResolverDecision"], "blockedByQueryName");
    assert_eq!(
        (blocked["PolicyID"].as_str(), blocked["PolicyName"].as_str()),
        (Some("block-list"), Some("Block list"))
    );
    assert_eq!(blocked["RCode"], 5);
    let device_id = ok["DeviceID"].as_str().expect("DeviceID").to_string();
    assert!(!device_id.is_empty());
    // Logpush's QueryID: a UUID, one per query.
    let ids: Vec<&str> = dns.iter().filter_map(|l| l["QueryID"].as_str()).collect();
    assert_eq!(ids.len(), dns.len(), "every line has a QueryID");
    for id in &ids {
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "QueryID {id}");
    }
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "QueryIDs repeat: {ids:?}");
    // The second a.example came from the cache.
    let cached: Vec<Option<bool>> = dns
        .iter()
        .filter(|l| l["QueryName"] == "a.example" && l["DeviceName"] == "alice")
        .map(|l| l["IsResponseCached"].as_bool())
        .collect();
    assert_eq!(cached, [Some(false), Some(true)], "IsResponseCached");
    // Categories: the name's, the addresses', and those the deciding rule tested.
    assert_eq!(ok["QueryCategoryIDs"], serde_json::json!([122]), "{ok}");
    assert_eq!(
        ok["ResolvedIPCategoryIDs"],
        serde_json::json!([117]),
        "{ok}"
    );
    assert!(ok.get("MatchedCategoryIDs").is_none(), "{ok}");
    let casino = find("casino.example");
    assert_eq!(
        (
            casino["ResolverDecision"].as_str(),
            casino["PolicyID"].as_str()
        ),
        (Some("blockedByQueryName"), Some("no-gambling"))
    );
    assert_eq!(
        casino["QueryCategoryIDs"],
        serde_json::json!([99]),
        "{casino}"
    );
    assert_eq!(
        casino["MatchedCategoryIDs"],
        serde_json::json!([99]),
        "{casino}"
    );
    // UserID: the user's id as the admin API's /users shows it.
    let socket = lab.dir().join("data").join("admin.sock");
    let users = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(&socket)
        .arg("http://waygate/users")
        .output()
        .expect("curl /users");
    let users: Value = serde_json::from_slice(&users.stdout).expect("/users is JSON");
    let user = users["result"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["email"] == "alice@example.com"))
        .unwrap_or_else(|| panic!("alice in /users: {users}"));
    let user_id = user["id"].as_str().expect("a user id").to_string();
    assert_eq!(user_id.len(), 36, "{user_id}");
    assert_eq!(ok["UserID"], user_id.as_str());

    // The flow's line comes at its close.
    let flow = wait_until(secs(15), Duration::from_millis(250), || {
        lines(&logs, "network")
            .into_iter()
            .find(|l| l["DestinationIP"] == HTTP_ORIGIN && l["DestinationPort"] == 80)
    })
    .unwrap_or_else(|| {
        panic!(
            "no network line for the HTTP flow\n{}",
            lab.gateway_log_tail()
        )
    });
    has(
        &[
            "Datetime",
            "SourceIP",
            "SourcePort",
            "DestinationIP",
            "DestinationPort",
            "Transport",
            "Action",
            "PolicyID",
            "PolicyName",
            "DeviceID",
            "DeviceName",
            "Email",
            "UserID",
            "SNI",
            "VirtualNetworkID",
            "BytesSent",
            "BytesReceived",
            "DurationMs",
        ],
        &flow,
    );
    assert_eq!(
        (flow["Transport"].as_str(), flow["Action"].as_str()),
        (Some("tcp"), Some("allow"))
    );
    assert_eq!(flow["DeviceID"], device_id.as_str());
    assert_eq!(flow["UserID"], user_id.as_str());
    assert!(flow["BytesSent"].as_u64().unwrap_or(0) > 0, "{flow}");
    assert!(flow["BytesReceived"].as_u64().unwrap_or(0) > 0, "{flow}");
    let egress = lines(&logs, "egress")
        .into_iter()
        .find(|l| l["DestinationIP"] == HTTP_ORIGIN)
        .unwrap_or_else(|| panic!("no egress line for the HTTP flow"));
    assert_eq!(egress["EgressIP"], waygate_e2e::EGRESS_V4);
    assert_eq!(egress["DeviceName"], "alice");

    // `waygate logs` reads the same lines.
    let out = lab
        .waygate(&[
            "logs", "--type", "dns", "--device", "alice", "--json", "--since", "10m",
        ])
        .expect("waygate logs");
    assert!(out.ok(), "{}", out.describe());
    assert!(out
        .stdout
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_ok()));
    assert!(out.stdout.contains("\"blocked.example\""), "{}", out.stdout);
    let table = lab
        .waygate(&["logs", "--device", &device_id])
        .expect("waygate logs");
    assert!(table.ok(), "{}", table.describe());
    assert!(table.stdout.contains("a.example A"), "{}", table.stdout);
    assert!(
        table.stdout.contains(&format!("-> {HTTP_ORIGIN}:80")),
        "{}",
        table.stdout
    );
    let none = lab
        .waygate(&["logs", "--device", "nobody"])
        .expect("waygate logs");
    assert!(none.ok() && none.stdout.is_empty(), "{}", none.describe());

    // `waygate logs --follow` from here on, across the rotations below.
    let followed = lab.dir().join("followed.jsonl");
    let follower = lab
        .waygate_command(&[
            "logs", "--type", "dns", "--follow", "--json", "--since", "1s",
        ])
        .stdout(fs::File::create(&followed).expect("followed"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("waygate logs --follow");
    let follower = Stop(follower);
    std::thread::sleep(Duration::from_millis(500));

    // Rotation: ~200 lines of ~500 bytes into files of 16 KB, of which 2 are kept.
    let names: Vec<String> = (0..200).map(|i| format!("r{i}.a.example")).collect();
    // In steps of about one file, so the follower (polling every 250 ms) sees each rotated
    // file before it is rotated past `keep`.
    for chunk in names.chunks(25) {
        let got = dig_many(&lab, &alice, chunk);
        assert_eq!(got.len(), chunk.len(), "every query answered");
        std::thread::sleep(Duration::from_millis(400));
    }
    let rotated = wait_until(secs(10), Duration::from_millis(250), || {
        lines(&logs, "dns")
            .last()
            .is_some_and(|l| l["QueryName"] == "r199.a.example")
            .then_some(())
    });
    assert!(rotated.is_some(), "the last query's line never came");
    let files: Vec<String> = fs::read_dir(&logs)
        .expect("logs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dns."))
        .collect();
    assert!(files.contains(&"dns.1.jsonl".to_string()), "{files:?}");
    assert!(
        files.len() <= 3,
        "at most dns.jsonl and 2 rotated files: {files:?}"
    );
    for f in &files {
        let len = fs::metadata(logs.join(f)).expect("size").len();
        assert!(len <= 16_000, "{f} has {len} bytes");
    }
    // The follower saw every one of those lines, in order, though most were rotated past.
    let seen = wait_until(secs(5), Duration::from_millis(250), || {
        let text = fs::read_to_string(&followed).unwrap_or_default();
        let names: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["QueryName"].as_str().map(String::from))
            .filter(|n| n.starts_with('r'))
            .collect();
        (names.len() >= 200).then_some(names)
    })
    .unwrap_or_else(|| panic!("--follow missed lines: {:?}", fs::read_to_string(&followed)));
    assert_eq!(seen, names, "--follow printed each line once, in order");
    drop(follower);
    report(&format!(
        "observe: dns log files after 200 queries: {files:?}"
    ));
}

/// A process this test started, killed (by its pid) when the test ends, also on failure.
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmpfs mounted for the test; unmounted on drop (lazily: the gateway may still hold files).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_log_disk_does_not_stop_dns_answers() {
    if skip("a_full_log_disk_does_not_stop_dns_answers") {
        return;
    }
    let mut lab = Lab::up();
    let logs = lab.dir().join("logs");
    // Declared after the lab, so it is unmounted before the lab removes its dir.
    let _disk = Tmpfs::mount(&logs, "64k");
    // Files larger than the disk: it fills up before any rotation.
    configure(&mut lab, &logs, "max_size = \"1MB\"\nkeep = 1\n");
    let alice = lab.add_device("alice", "d1").expect("alice");
    // ~400 lines of ~450 bytes: three times the disk.
    let names: Vec<String> = (0..400).map(|i| format!("full{i}.a.example")).collect();
    let got = dig_many(&lab, &alice, &names);
    assert_eq!(
        got.len(),
        names.len(),
        "every query answered\n{}",
        lab.gateway_log_tail()
    );
    let dropped = wait_until(secs(10), Duration::from_millis(500), || {
        let s = scrape(&lab);
        let n = value(
            &s,
            "waygate_log_lines_dropped_total",
            &[("log", "dns"), ("reason", "write_error")],
        );
        (n > 0.0).then_some(n)
    })
    .unwrap_or_else(|| panic!("no dropped lines counted\n{}", lab.gateway_log_tail()));
    // Still answering once the disk is full, and every line on disk is whole.
    let got = dig_many(&lab, &alice, &["a.example".into()]);
    assert_eq!(got, ["NOERROR"]);
    let on_disk = lines(&logs, "dns").len();
    assert!(on_disk > 0, "lines up to the full disk are kept");
    report(&format!(
        "observe: full disk: {on_disk} dns lines kept, {dropped} dropped and counted"
    ));
}
