//! Egress and network (l4) policy through real wg-quick devices: rules steer each flow's source
//! address by identity, geolocation and destination, fail over while a location is down, and
//! block or redirect flows (issue "Egress stage, geolocation, virtual networks and network (l4)
//! policies").
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::time::{Duration, Instant};

use waygate_e2e::{report, skip, wait_until, Device, Lab, HTTP_ORIGIN, UDP_ORIGIN};

const PRIMARY: &str = "192.0.2.10";
const SECONDARY: &str = "192.0.2.11";
const CATCH_ALL: &str = "192.0.2.12";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Rules: Alice's traffic to Japan leaves from the primary location (the secondary while it is
/// down); network rules allow Alice's UDP echo above a rule blocking everyone's, reset TLS to
/// blocked.example (from the ClientHello's SNI), and send 203.0.113.99 to the HTTP origin;
/// everything else leaves from the catch-all address at the bottom.
const RULES: &str = r#"{"result": [
  {"id": "alice-jp", "name": "Alice to Japan", "action": "egress", "filters": ["egress"],
   "precedence": 10,
   "traffic": "net.dst.geo.country == \"JP\" and net.src.geo.continent == \"North America\"",
   "identity": "identity.email == \"alice@example.com\"",
   "rule_settings": {"egress": {"ipv4": "192.0.2.10", "ipv6": "", "ipv4_fallback": "192.0.2.11"}}},
  {"id": "catch-all", "name": "Everyone else", "action": "egress", "filters": ["egress"],
   "precedence": 1000, "traffic": "net.dst.ip == 0.0.0.0/0",
   "rule_settings": {"egress": {"ipv4": "192.0.2.12", "ipv6": "", "ipv4_fallback": "0.0.0.0"}}},
  {"id": "echo-for-alice", "name": "UDP echo for Alice", "action": "allow", "filters": ["l4"],
   "precedence": 15,
   "traffic": "net.protocol == \"udp\" and net.dst.port == 7",
   "identity": "identity.email == \"alice@example.com\""},
  {"id": "no-echo", "name": "No UDP echo", "action": "block", "filters": ["l4"],
   "precedence": 20, "traffic": "net.protocol == \"udp\" and net.dst.port == 7"},
  {"id": "no-blocked-example", "name": "No blocked.example", "action": "block",
   "filters": ["l4"], "precedence": 5, "traffic": "net.sni.host == \"blocked.example\""},
  {"id": "moved", "name": "Moved origin", "action": "l4_override", "filters": ["l4"],
   "precedence": 30, "traffic": "net.dst.ip == 203.0.113.99 and net.dst.port == 80",
   "rule_settings": {"l4override": {"ip": "203.0.113.10", "port": 80}}}
]}"#;

/// Lab geography: the devices' public addresses in North America, the origins in Japan.
const GEO_CSV: &str = "198.51.100.0/24,US,NA\n203.0.113.0/24,JP,AS\n";

fn configure(lab: &mut Lab) {
    lab.stop_gateway();
    let dir = lab.dir().to_path_buf();
    fs::write(dir.join("rules.json"), RULES).expect("rules");
    let geo = lab.build_geoip(GEO_CSV).expect("GeoIP database");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!(
        "[policy]\nrules = \"{}\"\n[geoip]\ndatabase = \"{}\"\n\
         [[egress.locations]]\nname = \"primary\"\nipv4 = [\"{PRIMARY}\"]\n\
         health_check = {{ target = \"{HTTP_ORIGIN}:80\", interval = \"500ms\" }}\n\
         [[egress.locations]]\nname = \"secondary\"\nipv4 = [\"{SECONDARY}\"]\n",
        dir.join("rules.json").display(),
        geo.display()
    ));
    fs::write(lab.config(), config).expect("config");
    if let Err(e) = lab.start_gateway() {
        panic!("the gateway did not start with rules, GeoIP and locations: {e:#}");
    }
}

fn src(lab: &Lab, device: &Device) -> String {
    lab.http_src(device, secs(5)).unwrap_or_else(|out| {
        panic!(
            "HTTP from {} failed: {}\ngateway log:\n{}",
            device.name,
            out.describe(),
            lab.gateway_log_tail()
        )
    })
}

/// Polls until `device`'s HTTP source is `want`; returns how long that took.
fn wait_src(lab: &Lab, device: &Device, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let got = wait_until(within, Duration::from_millis(100), || {
        (lab.http_src(device, secs(1)).ok().as_deref() == Some(want)).then_some(())
    });
    assert!(
        got.is_some(),
        "{}'s HTTP did not come from {want} within {within:?} (now: {:?})\ngateway log:\n{}",
        device.name,
        lab.http_src(device, secs(2)).ok(),
        lab.gateway_log_tail()
    );
    start.elapsed()
}

fn udp_echo(lab: &Lab, device: &Device) -> bool {
    let origin = lab.lab_origin().to_string_lossy().to_string();
    let to = format!("{UDP_ORIGIN}:7");
    lab.run_in(
        &device.ns,
        &[&origin, "udp-probe", &to, "--timeout-ms", "1500"],
        secs(5),
    )
    .ok()
}

#[test]
fn egress_and_network_rules_steer_block_redirect_and_fail_over() {
    if skip("egress_and_network_rules_steer_block_redirect_and_fail_over") {
        return;
    }
    let mut lab = Lab::up();
    configure(&mut lab);
    let alice = lab.add_device("alice", "d1").expect("alice");
    let bob = lab.add_device("bob", "d2").expect("bob");

    // Identity + source and destination geolocation pick Alice's source; Bob falls through to
    // the catch-all at the bottom.
    assert_eq!(src(&lab, &alice), PRIMARY, "Alice's rule");
    assert_eq!(src(&lab, &bob), CATCH_ALL, "the catch-all rule");

    // Network rules: Bob's UDP echo is blocked, Alice's is not; 203.0.113.99 is redirected.
    assert!(udp_echo(&lab, &alice), "Alice's UDP echo must pass");
    assert!(
        !udp_echo(&lab, &bob),
        "Bob's UDP echo must be blocked by rule no-echo"
    );
    // The SNI rule: TLS to blocked.example is reset once the ClientHello is seen; another name
    // reaches the origin (a plain HTTP server, so that TLS handshake fails differently).
    let tls_to = |name: &str| {
        let connect = format!("{name}:443:{HTTP_ORIGIN}:80");
        let url = format!("https://{name}/");
        lab.curl(&alice, &url, secs(5), &["-k", "--connect-to", &connect])
    };
    let blocked = tls_to("blocked.example");
    assert!(
        !blocked.ok() && blocked.stderr.contains("reset"),
        "TLS to blocked.example must be reset: {}",
        blocked.describe()
    );
    let other = tls_to("allowed.example");
    assert!(
        !other.stderr.contains("reset"),
        "TLS to allowed.example must reach the origin: {}",
        other.describe()
    );
    let moved = lab.curl(&alice, "http://203.0.113.99/", secs(5), &[]);
    assert!(
        moved.ok() && moved.stdout.contains(PRIMARY),
        "l4_override to the HTTP origin: {}",
        moved.describe()
    );

    // The primary location's link goes down: its health check fails and Alice's new flows take
    // the fallback within 3 s; when it is back, they return to the primary.
    let gw = lab.ns("gw");
    let del = lab.run_in(
        "gw",
        &["ip", "addr", "del", &format!("{PRIMARY}/24"), "dev", "eg0"],
        secs(5),
    );
    assert!(del.ok(), "taking {PRIMARY} off {gw}: {}", del.describe());
    let took = wait_src(&lab, &alice, SECONDARY, secs(3));
    report(&format!(
        "failover to {SECONDARY} took {:.1}s",
        took.as_secs_f64()
    ));
    assert_eq!(src(&lab, &bob), CATCH_ALL, "Bob is not affected");
    let add = lab.run_in(
        "gw",
        &["ip", "addr", "add", &format!("{PRIMARY}/24"), "dev", "eg0"],
        secs(5),
    );
    assert!(add.ok(), "putting {PRIMARY} back: {}", add.describe());
    let took = wait_src(&lab, &alice, PRIMARY, secs(5));
    report(&format!(
        "back on {PRIMARY} after {:.1}s",
        took.as_secs_f64()
    ));
}
