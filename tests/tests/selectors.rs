//! Every egress selector steering real flows, virtual networks reaching the same private range at
//! two sites (through an interface and through a next hop), and IPv6 egress from a per-device stable address (issue "Egress stage, geolocation,
//! virtual networks and network (l4) policies").
//!
//! One lab serves all cases: each case rewrites the rules file and waits for the gateway's reload,
//! then checks that a flow the selector matches leaves from the rule's address and one it does not
//! match falls through to the catch-all at the bottom.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::net::Ipv6Addr;
use std::time::Duration;

use waygate_e2e::{report, skip, wait_until, Device, Lab, UDP_ORIGIN};

/// Egress addresses the selector rule alternates between, so each case proves its own reload.
const RULE_ADDRS: [&str; 2] = ["192.0.2.10", "192.0.2.11"];
const CATCH_ALL: &str = "192.0.2.12";
const BLUE: &str = "3f1c9a52-7a51-4c55-9d3e-0b6f2a1e0001";
const GREEN: &str = "3f1c9a52-7a51-4c55-9d3e-0b6f2a1e0002";
const SITE: &str = "http://198.18.0.10/";
/// The gateway's side of each site's link: what the site's HTTP echo reports as the source.
const VIA_SITE1: &str = "198.19.1.1";
const VIA_SITE2: &str = "198.19.2.1";
const V6_PREFIX: &str = "2001:db8:2:10::/64";

/// Alice (d1, 198.51.100.11) is in the US, Bob (d2, 198.51.100.12) in Germany; 203.0.113.10 and
/// .30 are in Japan, .20 in Germany.
const GEO_CSV: &str = "198.51.100.11/32,US,NA\n198.51.100.12/32,DE,EU\n\
                       203.0.113.10/32,JP,AS\n203.0.113.20/32,DE,EU\n203.0.113.30/32,JP,AS\n";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Clone, Copy)]
enum Who {
    Alice,
    Bob,
}

/// A flow to an origin that reports its source address.
#[derive(Clone, Copy)]
enum Probe {
    /// `GET` from the device to this URL, with extra curl arguments.
    Http(&'static str, &'static [&'static str]),
    /// A datagram to the UDP whoami origin (port 8).
    UdpWhoami,
}

const ORIGIN_JP: Probe = Probe::Http("http://203.0.113.10/", &[]);
const ORIGIN_DE: Probe = Probe::Http("http://203.0.113.20/", &[]);

struct Case {
    selector: &'static str,
    /// Expression of the rule, in `traffic`, `identity` or `device_posture` by its field.
    expr: String,
    hit: (Who, Probe),
    miss: (Who, Probe),
}

impl Case {
    /// The rule key the expression belongs in.
    fn key(&self) -> &'static str {
        if self.selector.starts_with("identity.") {
            "identity"
        } else if self.selector.starts_with("device_posture.") {
            "device_posture"
        } else {
            "traffic"
        }
    }
}

fn case(selector: &'static str, expr: &str, hit: (Who, Probe), miss: (Who, Probe)) -> Case {
    Case {
        selector,
        expr: expr.to_string(),
        hit,
        miss,
    }
}

/// Alice's group, created with this id and email before she enrolls.
const ENG_ID: &str = "9a0a1a52-0000-4c55-9d3e-0b6f2a1e00e1";
/// A posture check Alice passes and Bob fails.
const DISK_CHECK: &str = "1308749e-fcfb-4ebc-b051-fe022b632644";

fn cases() -> Vec<Case> {
    use Who::{Alice, Bob};
    vec![
        case(
            "identity.email",
            r#"identity.email == "alice@example.com""#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "identity.name",
            r#"identity.name == "Alice Liddell""#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "identity.groups.name",
            r#"any(identity.groups.name[*] in {"eng"})"#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "identity.groups.id",
            &format!("any(identity.groups.id[*] in {{\"{ENG_ID}\"}})"),
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "identity.groups.email",
            r#"any(identity.groups.email[*] == "eng@example.com")"#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "identity.saml_attributes",
            r#"identity.saml_attributes["department"] == "engineering""#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "device_posture.checks.passed",
            &format!("any(device_posture.checks.passed[*] in {{\"{DISK_CHECK}\"}})"),
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "net.src.ip",
            "net.src.ip == 198.51.100.11",
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "net.src.geo.country",
            r#"net.src.geo.country == "US""#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "net.src.geo.continent",
            r#"net.src.geo.continent == "NA""#,
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "net.vnet_id",
            &format!("net.vnet_id == \"{BLUE}\""),
            (Alice, ORIGIN_JP),
            (Bob, ORIGIN_JP),
        ),
        case(
            "net.src.port",
            "net.src.port >= 61000",
            (
                Alice,
                Probe::Http("http://203.0.113.10/", &["--local-port", "61000-61999"]),
            ),
            (Alice, ORIGIN_JP),
        ),
        case(
            "net.dst.ip",
            "net.dst.ip in {203.0.113.8/30}",
            (Alice, ORIGIN_JP),
            (Alice, ORIGIN_DE),
        ),
        case(
            "net.dst.geo.country",
            r#"net.dst.geo.country == "JP""#,
            (Alice, ORIGIN_JP),
            (Alice, ORIGIN_DE),
        ),
        case(
            "net.dst.geo.continent",
            r#"net.dst.geo.continent == "AS""#,
            (Alice, ORIGIN_JP),
            (Alice, ORIGIN_DE),
        ),
        case(
            "net.dst.port",
            "net.dst.port == 80",
            (Alice, ORIGIN_JP),
            (Alice, Probe::UdpWhoami),
        ),
        case(
            "net.protocol",
            r#"net.protocol == "udp""#,
            (Alice, Probe::UdpWhoami),
            (Alice, ORIGIN_JP),
        ),
    ]
}

/// A rules document: the selector's rule on top, the catch-all at the bottom.
fn rules(c: &Case, addr: &str) -> String {
    let mut rule = serde_json::json!({
        "id": "selector", "name": c.selector, "action": "egress", "filters": ["egress"],
        "precedence": 10, "traffic": "", "identity": "", "device_posture": "",
        "rule_settings": {"egress": {"ipv4": addr, "ipv6": "", "ipv4_fallback": ""}},
    });
    rule[c.key()] = serde_json::Value::from(c.expr.as_str());
    let catch_all = serde_json::json!({
        "id": "catch-all", "name": "Everyone else", "action": "egress", "filters": ["egress"],
        "precedence": 1000, "traffic": "net.dst.ip == 0.0.0.0/0 or net.dst.ip == ::/0",
        "rule_settings": {"egress": {"ipv4": CATCH_ALL, "ipv6": V6_PREFIX, "ipv4_fallback": ""}},
    });
    serde_json::json!({ "result": [rule, catch_all] }).to_string()
}

struct Setup {
    lab: Lab,
    alice: Device,
    bob: Device,
}

impl Setup {
    fn device(&self, who: Who) -> &Device {
        match who {
            Who::Alice => &self.alice,
            Who::Bob => &self.bob,
        }
    }

    /// The source address the probe's origin reports, or why there is none.
    fn src(&self, (who, probe): (Who, Probe), max_time: Duration) -> Result<String, String> {
        let device = self.device(who);
        match probe {
            Probe::Http(url, extra) => self
                .lab
                .http_src_of(device, url, max_time, extra)
                .map_err(|out| out.describe()),
            Probe::UdpWhoami => {
                let origin = self.lab.lab_origin().to_string_lossy().to_string();
                let to = format!("{UDP_ORIGIN}:8");
                let ms = max_time.as_millis().to_string();
                let out = self.lab.run_in(
                    &device.ns,
                    &[&origin, "udp-probe", &to, "--timeout-ms", &ms],
                    max_time + secs(5),
                );
                if !out.ok() {
                    return Err(out.describe());
                }
                serde_json::from_str::<serde_json::Value>(out.stdout.trim())
                    .ok()
                    .and_then(|v| v.get("src")?.as_str().map(str::to_string))
                    .ok_or_else(|| out.describe())
            }
        }
    }

    fn write_rules(&self, text: &str) {
        fs::write(self.lab.dir().join("rules.json"), text).expect("writing rules.json");
    }
}

fn setup() -> Setup {
    let mut lab = Lab::up();
    lab.stop_gateway();
    let dir = lab.dir().to_path_buf();
    fs::write(dir.join("rules.json"), r#"{"result": []}"#).expect("rules");
    let geo = lab.build_geoip(GEO_CSV).expect("GeoIP database");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!(
        "[policy]\nrules = \"{}\"\n[geoip]\ndatabase = \"{}\"\n\
         [[vnets]]\nname = \"blue\"\nid = \"{BLUE}\"\n\
         routes = [{{ cidr = \"198.18.0.0/24\", via = \"vs1\" }}]\n\
         [[vnets]]\nname = \"green\"\nid = \"{GREEN}\"\n\
         routes = [{{ cidr = \"198.18.0.0/24\", via = \"198.19.2.2\" }}]\n",
        dir.join("rules.json").display(),
        geo.display()
    ));
    fs::write(lab.config(), config).expect("config");
    if let Err(e) = lab.start_gateway() {
        panic!("the gateway did not start with rules, GeoIP and vnets: {e:#}");
    }
    let cli = |args: &[&str]| {
        let out = lab.waygate(args).expect("waygate");
        assert!(out.ok(), "waygate {args:?}: {}", out.describe());
    };
    cli(&[
        "group",
        "create",
        "eng",
        "--email",
        "eng@example.com",
        "--id",
        ENG_ID,
    ]);
    cli(&["group", "create", "sales"]);
    let alice = lab
        .add_device_with(
            "alice",
            "d1",
            &[
                "--group",
                "eng",
                "--user-name",
                "Alice Liddell",
                "--vnet",
                "blue",
                "--attribute",
                "department=engineering",
            ],
        )
        .expect("alice");
    let bob = lab
        .add_device_with(
            "bob",
            "d2",
            &[
                "--group",
                "sales",
                "--vnet",
                "green",
                "--attribute",
                "department=sales",
            ],
        )
        .expect("bob");
    let cli = |args: &[&str]| {
        let out = lab.waygate(args).expect("waygate");
        assert!(out.ok(), "waygate {args:?}: {}", out.describe());
    };
    cli(&["device", "posture", "alice", "--passed", DISK_CHECK]);
    cli(&["device", "posture", "bob", "--failed", DISK_CHECK]);
    Setup { lab, alice, bob }
}

#[test]
fn selectors_vnets_and_ipv6_egress() {
    if skip("selectors_vnets_and_ipv6_egress") {
        return;
    }
    let s = setup();

    for (i, c) in cases().iter().enumerate() {
        let addr = RULE_ADDRS[i % 2];
        s.write_rules(&rules(c, addr));
        // The previous case's rule used the other address, so seeing `addr` means this file is
        // the one in force.
        let hit = wait_until(secs(5), Duration::from_millis(100), || {
            (s.src(c.hit, secs(2)).ok().as_deref() == Some(addr)).then_some(())
        });
        assert!(
            hit.is_some(),
            "selector {}: a matching flow did not leave from {addr} (now: {:?})\ngateway log:\n{}",
            c.selector,
            s.src(c.hit, secs(2)),
            s.lab.gateway_log_tail()
        );
        let miss = s.src(c.miss, secs(3));
        assert_eq!(
            miss.as_deref(),
            Ok(CATCH_ALL),
            "selector {}: a flow it does not match must fall through to the catch-all",
            c.selector
        );
    }
    report("egress: every selector steered its flow and left the others to the catch-all");

    // Virtual networks: the same private address is a different site for each network; blue
    // routes through an interface, green through a next hop.
    let site = |who: Who| s.lab.http_src_of(s.device(who), SITE, secs(3), &[]);
    assert_eq!(
        site(Who::Alice).as_deref().ok(),
        Some(VIA_SITE1),
        "blue -> site 1"
    );
    assert_eq!(
        site(Who::Bob).as_deref().ok(),
        Some(VIA_SITE2),
        "green -> site 2"
    );
    // Moving Bob takes effect on his next flows: out of any network the range is refused; in
    // blue he reaches site 1.
    let set_vnet = |vnet: &str| {
        let out = s
            .lab
            .waygate(&["device", "set-vnet", "bob", vnet])
            .expect("waygate device set-vnet");
        assert!(out.ok(), "set-vnet bob {vnet}: {}", out.describe());
    };
    set_vnet("default");
    let refused = wait_until(secs(3), Duration::from_millis(100), || {
        site(Who::Bob).is_err().then_some(())
    });
    assert!(
        refused.is_some(),
        "bob outside any virtual network still reaches {SITE}: {:?}",
        site(Who::Bob)
    );
    set_vnet("blue");
    let moved = wait_until(secs(3), Duration::from_millis(100), || {
        (site(Who::Bob).ok().as_deref() == Some(VIA_SITE1)).then_some(())
    });
    assert!(
        moved.is_some(),
        "bob in blue must reach site 1: {:?}",
        site(Who::Bob)
    );
    report("vnets: 198.18.0.10 reached at two sites by two networks; a device moved between them");

    // IPv6 egress: each device leaves from its own address in the prefix, the same every time.
    let v6 = |who: Who| -> Ipv6Addr {
        let got = s
            .lab
            .http_src_of(s.device(who), "http://[2001:db8:3::10]/", secs(3), &["-6"])
            .unwrap_or_else(|out| panic!("IPv6 HTTP: {}", out.describe()));
        got.parse()
            .unwrap_or_else(|_| panic!("the origin saw {got:?}, not an IPv6 address"))
    };
    let in_prefix = |a: Ipv6Addr| a.segments()[..4] == [0x2001, 0xdb8, 0x2, 0x10];
    let (a1, a2, b1) = (v6(Who::Alice), v6(Who::Alice), v6(Who::Bob));
    assert!(
        in_prefix(a1) && in_prefix(b1),
        "{a1} / {b1} outside {V6_PREFIX}"
    );
    assert_eq!(a1, a2, "alice's IPv6 egress address must be stable");
    assert_ne!(a1, b1, "two devices must not share an IPv6 egress address");
    report(&format!("ipv6 egress: alice {a1}, bob {b1}"));
}
