//! Token enrollment with the bundled client (issue 17, first stage): `waygate token create` ->
//! `waygate-client enroll` in a device namespace against `[control] listen` -> the registry has
//! the device's public key and never its private key, and a wg-quick config written from the
//! client's files reaches the Internet from the egress address. Used-up, expired and revoked
//! tokens are refused with a clear message, and a token whose CA hash is not the gateway's CA is
//! refused by the client before it sends anything.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use waygate_e2e::{client_bin, report, skip, wait_until, Device, Lab, Output, EGRESS_V4};

/// Where the gateway's enrollment listener listens (its underlay address).
const CONTROL: &str = "198.51.100.1:8444";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `waygate token create ARGS...`: the token, alone on stdout.
fn create_token(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let out = lab.waygate(&all).expect("token create");
    assert!(out.ok(), "token create: {}", out.describe());
    let token = out.stdout.trim().to_string();
    assert_eq!(
        out.stdout.lines().count(),
        1,
        "the token alone: {:?}",
        out.stdout
    );
    assert!(token.starts_with("wgenroll1-"), "{token}");
    token
}

/// `waygate-client --dir DIR enroll --server https://CONTROL --token TOKEN` in namespace `ns`.
fn enroll(lab: &Lab, ns: &str, dir: &Path, token: &str) -> Output {
    let client = client_bin().expect("waygate-client binary");
    let server = format!("https://{CONTROL}");
    lab.run_in(
        ns,
        &[
            client.to_str().expect("utf-8 path"),
            "--dir",
            dir.to_str().expect("utf-8 path"),
            "enroll",
            "--server",
            &server,
            "--token",
            token,
        ],
        secs(30),
    )
}

/// A wg-quick config from the client's `client.toml` and `private.key`.
fn wg_quick_from(dir: &Path) -> (String, String, String) {
    let config: serde_json::Value = {
        let text = fs::read_to_string(dir.join("client.toml")).expect("client.toml");
        let mut map = serde_json::Map::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(" = ") {
                let v: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|_| {
                    panic!("client.toml value {v:?} is not a plain TOML string or array")
                });
                map.insert(k.trim().to_string(), v);
            }
        }
        serde_json::Value::Object(map)
    };
    let private = fs::read_to_string(dir.join("private.key")).expect("private.key");
    let list = |key: &str| -> String {
        config[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in client.toml"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {}\nDNS = {}\nMTU = {}\n\n[Peer]\n\
         PublicKey = {}\nEndpoint = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
        private.trim(),
        list("addresses"),
        list("dns"),
        config["mtu"],
        config["gateway_public_key"]
            .as_str()
            .expect("gateway_public_key"),
        config["endpoint"].as_str().expect("endpoint"),
    );
    let v4 = config["addresses"][0]
        .as_str()
        .and_then(|a| a.split('/').next())
        .expect("an IPv4 address")
        .to_string();
    (conf, private.trim().to_string(), v4)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_client_enrolls_with_a_token_and_its_config_reaches_the_origin() {
    if skip("a_client_enrolls_with_a_token_and_its_config_reaches_the_origin") {
        return;
    }
    let mut lab = Lab::up();
    lab.stop_gateway();
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!("[control]\nlisten = \"{CONTROL}\"\n"));
    fs::write(lab.config(), config).expect("config");
    lab.start_gateway().expect("gateway with [control] listen");

    let token = create_token(&lab, &["--email", "ada@example.com", "--group", "eng"]);
    let dir = lab.dir().join("client-ada");
    // The listener starts with the gateway; give it a moment after the UAPI answers.
    let out = wait_until(secs(10), Duration::from_millis(200), || {
        let out = enroll(&lab, "d1", &dir, &token);
        (!out.stderr.contains("cannot connect")).then_some(out)
    })
    .expect("the enrollment listener accepts connections");
    assert!(out.ok(), "enroll: {}", out.describe());

    // The files: the directory 0700, the key 0600.
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("private.key")), 0o600);
    let (conf, private, v4) = wg_quick_from(&dir);
    let public = waygate_keys::PrivateKey::from_base64(&private)
        .expect("private.key in wg genkey form")
        .public_key()
        .to_base64();

    // The registry has the device with the client's public key, never its private key.
    let list = lab
        .waygate(&["device", "list", "--json"])
        .expect("device list");
    assert!(list.ok(), "{}", list.describe());
    let devices: serde_json::Value = serde_json::from_str(&list.stdout).expect("JSON");
    let device = devices
        .as_array()
        .and_then(|a| a.iter().find(|d| d["public_key"] == public.as_str()))
        .unwrap_or_else(|| panic!("no device with the client's key {public}: {}", list.stdout));
    assert_eq!(device["email"], "ada@example.com");
    assert_eq!(device["ipv4"], v4.as_str());
    assert!(!list.stdout.contains(&private));
    for file in files_under(&lab.dir().join("data")) {
        let bytes = fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&private),
            "{} holds the device's private key",
            file.display()
        );
    }
    let status = lab.run_in(
        "d1",
        &[
            client_bin().expect("client").to_str().expect("utf-8"),
            "--dir",
            dir.to_str().expect("utf-8"),
            "status",
            "--json",
        ],
        secs(10),
    );
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(status["enrolled"], true);
    assert_eq!(status["connected"], false);

    // Stock wg-quick from the client's files reaches the origin from the egress address.
    let iface = format!("{}x", lab.prefix());
    let conf_path = lab.dir().join(format!("{iface}.conf"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&conf_path)
        .expect("wg-quick conf");
    std::io::Write::write_all(&mut file, conf.as_bytes()).expect("write conf");
    drop(file);
    let device = Device {
        name: device["name"].as_str().unwrap_or("ada").to_string(),
        ns: "d1".into(),
        conf: conf_path,
        iface,
        ipv4: v4.parse().expect("IPv4"),
        public_key: public,
    };
    lab.device_up(&device).expect("wg-quick up");
    assert!(
        lab.wait_tunnel(&device, secs(10)),
        "the enrolled device does not ping the gateway: {}",
        lab.wg_show(&device)
    );
    let src = lab
        .http_src(&device, secs(10))
        .unwrap_or_else(|out| panic!("HTTP origin: {}", out.describe()));
    assert_eq!(src, EGRESS_V4);

    // The token was for one device: used up now.
    let out = enroll(&lab, "d2", &lab.dir().join("client-2"), &token);
    assert!(!out.ok());
    assert!(out.stderr.contains("used up"), "{}", out.describe());
    report(out.stderr.trim());

    // An expired token.
    let short = create_token(&lab, &["--email", "bob@example.com", "--ttl", "1s"]);
    std::thread::sleep(secs(2));
    let out = enroll(&lab, "d2", &lab.dir().join("client-3"), &short);
    assert!(!out.ok());
    assert!(out.stderr.contains("expired"), "{}", out.describe());
    report(out.stderr.trim());

    // A revoked token.
    let revoked = create_token(&lab, &["--email", "carol@example.com", "--uses", "3"]);
    let prefix = revoked.split('-').nth(1).expect("prefix").to_string();
    let out = lab.waygate(&["token", "revoke", &prefix]).expect("revoke");
    assert!(out.ok(), "{}", out.describe());
    let out = enroll(&lab, "d2", &lab.dir().join("client-4"), &revoked);
    assert!(out.stderr.contains("revoked"), "{}", out.describe());
    report(out.stderr.trim());

    // A token whose CA hash is not the gateway's CA: the client refuses the gateway and sends
    // nothing, so the token keeps its use.
    let good = create_token(&lab, &["--email", "dave@example.com"]);
    let mut parts: Vec<&str> = good.split('-').collect();
    let other_ca = "ab".repeat(32);
    parts[3] = &other_ca;
    let forged = parts.join("-");
    let out = enroll(&lab, "d2", &lab.dir().join("client-5"), &forged);
    assert!(!out.ok());
    assert!(
        out.stderr.contains("does not match the token"),
        "{}",
        out.describe()
    );
    report(out.stderr.trim());
    assert!(!lab.dir().join("client-5/client.toml").exists());
    let list = lab
        .waygate(&["token", "list", "--json"])
        .expect("token list");
    let tokens: serde_json::Value = serde_json::from_str(&list.stdout).expect("JSON");
    let dave = tokens
        .as_array()
        .and_then(|a| a.iter().find(|t| t["email"] == "dave@example.com"))
        .expect("dave's token listed");
    assert_eq!(dave["used"], 0, "{dave}");
    assert!(
        !list.stdout.contains(parts[2]),
        "the listing holds no secret"
    );
    // The same token with the right hash still enrolls, read from a file this time.
    let token_file = lab.dir().join("dave.token");
    fs::write(&token_file, format!("{good}\n")).expect("token file");
    let client = client_bin().expect("client");
    let dir6 = lab.dir().join("client-6");
    let server = format!("https://{CONTROL}");
    let out = lab.run_in(
        "d2",
        &[
            client.to_str().expect("utf-8"),
            "--dir",
            dir6.to_str().expect("utf-8"),
            "enroll",
            "--server",
            &server,
            "--token-file",
            token_file.to_str().expect("utf-8"),
        ],
        secs(30),
    );
    assert!(out.ok(), "{}", out.describe());
    assert!(dir6.join("private.key").exists());
}
