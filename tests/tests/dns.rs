//! The DNS stage through real wg-quick devices with `dig`: every action, the seed's order of
//! operations (allow list before block list; a blocked domain takes its subdomains, a bare TLD
//! the whole TLD), per-rule block answers, the AAAA block with its hints stripped, rules on the
//! answer, identity, DNS over TCP, TLS (`kdig`) and HTTPS (`curl`) with the gateway's CA,
//! intercept and a location (issue "DNS stage").
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::time::Duration;

use base64::Engine;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use waygate_e2e::{report, skip, Device, Lab};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const RULES: &str = r#"{"result": [
  {"id": "child-abuse", "name": "Child Abuse", "action": "block", "filters": ["dns"],
   "precedence": 1, "traffic": "any(dns.content_category[*] in {170})"},
  {"id": "allow-list", "name": "Allow list", "action": "allow", "filters": ["dns"],
   "precedence": 20, "traffic": "any(dns.domains[*] in $allowed)"},
  {"id": "block-list", "name": "Block list", "action": "block", "filters": ["dns"],
   "precedence": 30, "traffic": "any(dns.domains[*] in $blocked)"},
  {"id": "safe", "name": "SafeSearch", "action": "safesearch", "filters": ["dns"],
   "precedence": 40,
   "traffic": "any(dns.domains[*] in {\"google.com\" \"google.de\" \"bing.com\" \"duckduckgo.com\"})"},
  {"id": "yt", "name": "YouTube restricted", "action": "ytrestricted", "filters": ["dns"],
   "precedence": 41, "traffic": "any(dns.domains[*] == \"youtube.com\")"},
  {"id": "gambling", "name": "Category block: Gambling", "action": "block", "filters": ["dns"],
   "precedence": 45, "traffic": "any(dns.content_category[*] in {8})"},
  {"id": "eng-only", "name": "Not for eng", "action": "block", "filters": ["dns"],
   "precedence": 50, "traffic": "dns.fqdn == \"games.example\"",
   "identity": "any(identity.groups.name[*] in {\"eng\"})"},
  {"id": "gone", "action": "block", "filters": ["dns"], "precedence": 51,
   "traffic": "dns.fqdn == \"gone.example\"", "rule_settings": {"dns_block": "nxdomain"}},
  {"id": "zero", "action": "block", "filters": ["dns"], "precedence": 52,
   "traffic": "dns.fqdn == \"zero.example\"", "rule_settings": {"block_page_enabled": false}},
  {"id": "moved", "action": "override", "filters": ["dns"], "precedence": 53,
   "traffic": "dns.fqdn == \"moved.example\"", "rule_settings": {"override_ips": ["203.0.113.99"]}},
  {"id": "renamed", "action": "override", "filters": ["dns"], "precedence": 54,
   "traffic": "dns.fqdn == \"renamed.example\"", "rule_settings": {"override_host": "safe.duckduckgo.com"}},
  {"id": "v4-only", "action": "block", "filters": ["dns"], "precedence": 55,
   "traffic": "dns.fqdn == \"v4only.example\" and dns.query_rtype == \"AAAA\""},
  {"id": "office", "action": "block", "filters": ["dns"], "precedence": 56,
   "traffic": "dns.location == \"office\" and dns.fqdn == \"office-blocked.example\""},
  {"id": "no-alias", "name": "Nothing behind a.example", "action": "block", "filters": ["dns"],
   "precedence": 60, "traffic": "any(dns.response.cname[*] == \"a.example\")"},
  {"id": "by-name", "name": "Steered by name", "action": "egress", "filters": ["egress"],
   "precedence": 70, "traffic": "net.fqdn.host == \"steer.example\"",
   "rule_settings": {"egress": {"ipv4": "192.0.2.10", "ipv6": "", "ipv4_fallback": ""}}}
]}"#;

const LISTS: &str = r#"[
  {"id": "allowed", "name": "Allow list", "type": "DOMAIN", "items": [{"value": "ok.blocked.example"}, {"value": "fine.net"}, {"value": "csam.example"}]},
  {"id": "blocked", "name": "Block list", "type": "DOMAIN", "items": [{"value": "blocked.example"}, {"value": "net"}]}
]"#;

/// Gambling (99, under parent 8) and Child Abuse (170).
const CATEGORIES: &str = "casino.example,99\ncsam.example,170\n";

struct Dns<'a> {
    lab: &'a Lab,
}

impl Dns<'_> {
    /// `dig` from the device's namespace: `@server name type` plus `extra`; returns the status
    /// word (`NOERROR`, `REFUSED`, ...) and the answer section's data.
    fn dig(
        &self,
        ns: &str,
        server: &str,
        name: &str,
        qtype: &str,
        extra: &[&str],
    ) -> (String, Vec<String>) {
        let at = format!("@{server}");
        let mut args = vec![
            "dig",
            &at,
            name,
            qtype,
            "+tries=2",
            "+time=2",
            "+noall",
            "+comments",
            "+answer",
        ];
        args.extend_from_slice(extra);
        let out = self.lab.run_in(ns, &args, secs(10));
        assert!(
            out.ok() || out.stdout.contains("status:"),
            "dig failed: {}",
            out.describe()
        );
        let status = out
            .stdout
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("NO-STATUS")
            .to_string();
        let answers = out
            .stdout
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .filter(|l| l.split_whitespace().count() > 4)
            .map(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" "))
            .collect();
        (status, answers)
    }

    fn ask(&self, device: &Device, name: &str, qtype: &str) -> (String, Vec<String>) {
        self.dig(&device.ns, "100.96.0.1", name, qtype, &[])
    }
}

fn setup() -> (Lab, Device, Device) {
    let mut lab = Lab::up();
    lab.stop_gateway();
    let dir = lab.dir().to_path_buf();
    fs::write(dir.join("rules.json"), RULES).expect("rules");
    fs::write(dir.join("lists.json"), LISTS).expect("lists");
    fs::write(dir.join("categories.csv"), CATEGORIES).expect("categories");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config = config.replace(
        "[dns]\n",
        "[dns]\nintercept = true\nlisten = [\"198.51.100.1:53\"]\n\
         locations = [{ name = \"office\", networks = [\"198.51.100.0/24\"] }]\n\
         categories = [{ path = \"CATEGORIES\", format = \"csv\" }]\n",
    );
    config = config.replace(
        "CATEGORIES",
        &dir.join("categories.csv").display().to_string(),
    );
    config.push_str(&format!(
        "[policy]\nrules = \"{}\"\nlists = \"{}\"\n",
        dir.join("rules.json").display(),
        dir.join("lists.json").display()
    ));
    fs::write(lab.config(), config).expect("config");
    if let Err(e) = lab.start_gateway() {
        panic!("the gateway did not start with DNS rules: {e:#}");
    }
    let alice = lab
        .add_device_with("alice", "d1", &["--group", "eng"])
        .expect("alice");
    let bob = lab.add_device("bob", "d2").expect("bob");
    (lab, alice, bob)
}

#[test]
fn dns_rules_through_the_tunnel() {
    if skip("dns_rules_through_the_tunnel") {
        return;
    }
    let (lab, alice, bob) = setup();
    let dns = Dns { lab: &lab };
    let a = |name: &str, t: &str| dns.ask(&alice, name, t);
    let fail = |what: &str, got: &(String, Vec<String>)| -> String {
        format!(
            "{what}: got {got:?}\ngateway log:\n{}",
            lab.gateway_log_tail()
        )
    };

    // Resolution through the upstream.
    let got = a("a.example", "A");
    assert_eq!(
        got,
        ("NOERROR".into(), vec!["A 203.0.113.10".into()]),
        "{}",
        fail("plain A", &got)
    );

    // The resolver answers on the gateway's IPv6 tunnel address too, with the same rules.
    let v6 = dns.dig(&alice.ns, "fd77:6761:7465::1", "a.example", "AAAA", &[]);
    assert_eq!(
        v6,
        ("NOERROR".into(), vec!["AAAA 2001:db8:3::10".into()]),
        "{}",
        fail("over IPv6", &v6)
    );
    let v6 = dns.dig(
        &alice.ns,
        "fd77:6761:7465::1",
        "blocked.example",
        "A",
        &["+tcp"],
    );
    assert_eq!(v6.0, "REFUSED", "{}", fail("TCP over IPv6", &v6));

    // Order of operations: allow list before the block list; a blocked domain takes its
    // subdomains; a bare TLD blocks the whole TLD.
    for (name, want) in [
        ("blocked.example", "REFUSED"),
        ("www.blocked.example", "REFUSED"),
        ("ok.blocked.example", "NOERROR"),
        ("anything.net", "REFUSED"),
        ("fine.net", "NOERROR"),
    ] {
        let got = a(name, "A");
        assert_eq!(got.0, want, "{}", fail(name, &got));
    }

    // Categories: Child Abuse first, even for a name on the allow list; a rule on the parent
    // category Gambling blocks its subcategory, subdomains inherit; the file reloads.
    for (name, want) in [
        ("csam.example", "REFUSED"),
        ("casino.example", "REFUSED"),
        ("www.casino.example", "REFUSED"),
        ("poker.example", "NOERROR"),
    ] {
        let got = a(name, "A");
        assert_eq!(got.0, want, "{}", fail(name, &got));
    }
    fs::write(
        lab.dir().join("categories.csv"),
        format!("{CATEGORIES}poker.example,99\n"),
    )
    .expect("categories");
    let reloaded = waygate_e2e::wait_until(secs(5), Duration::from_millis(200), || {
        (a("poker.example", "A").0 == "REFUSED").then_some(())
    });
    assert!(
        reloaded.is_some(),
        "the categories file did not reload within 5 s"
    );

    // SafeSearch and YouTube restricted: the engine's CNAME, then its addresses.
    for (name, target, addr) in [
        (
            "www.google.com",
            "forcesafesearch.google.com.",
            "203.0.113.61",
        ),
        (
            "www.google.de",
            "forcesafesearch.google.com.",
            "203.0.113.61",
        ),
        ("www.bing.com", "strict.bing.com.", "203.0.113.62"),
        ("duckduckgo.com", "safe.duckduckgo.com.", "203.0.113.63"),
        ("www.youtube.com", "restrict.youtube.com.", "203.0.113.64"),
    ] {
        let got = a(name, "A");
        assert_eq!(
            got,
            (
                "NOERROR".to_string(),
                vec![format!("CNAME {target}"), format!("A {addr}")]
            ),
            "{}",
            fail(name, &got)
        );
    }

    // Block answers per rule, overrides (other types REFUSED).
    assert_eq!(a("gone.example", "A").0, "NXDOMAIN");
    assert_eq!(
        a("zero.example", "A"),
        ("NOERROR".into(), vec!["A 0.0.0.0".into()])
    );
    assert_eq!(
        a("zero.example", "AAAA"),
        ("NOERROR".into(), vec!["AAAA ::".into()])
    );
    assert_eq!(
        a("moved.example", "A"),
        ("NOERROR".into(), vec!["A 203.0.113.99".into()])
    );
    assert_eq!(a("moved.example", "TXT").0, "REFUSED");
    let got = a("renamed.example", "A");
    assert_eq!(
        got,
        (
            "NOERROR".into(),
            vec!["CNAME safe.duckduckgo.com.".into(), "A 203.0.113.63".into()]
        ),
        "{}",
        fail("override_host", &got)
    );

    // AAAA blocked: no AAAA, and HTTPS answers lose their IPv6 hints (not their IPv4 ones).
    assert_eq!(a("v4only.example", "AAAA").0, "REFUSED");
    let https = a("v4only.example", "HTTPS");
    let text = https.1.join(" ");
    assert!(
        https.0 == "NOERROR" && text.contains("ipv4hint") && !text.contains("ipv6hint"),
        "{}",
        fail("HTTPS without ipv6hint", &https)
    );
    let other = a("dual.example", "HTTPS");
    assert!(
        other.1.join(" ").contains("ipv6hint"),
        "{}",
        fail("HTTPS keeps hints for other names", &other)
    );

    // A rule on the answer: alias.example resolves through a.example, which that rule blocks.
    assert_eq!(a("alias.example", "A").0, "REFUSED");

    // Identity: Alice's group is refused, Bob resolves.
    assert_eq!(a("games.example", "A").0, "REFUSED");
    assert_eq!(dns.ask(&bob, "games.example", "A").0, "NOERROR");

    // DNS over TCP follows the same rules and identity.
    let tcp = dns.dig(&alice.ns, "100.96.0.1", "games.example", "A", &["+tcp"]);
    assert_eq!(tcp.0, "REFUSED", "{}", fail("TCP, identity", &tcp));
    let tcp = dns.dig(&bob.ns, "100.96.0.1", "a.example", "A", &["+tcp"]);
    assert_eq!(
        tcp,
        ("NOERROR".into(), vec!["A 203.0.113.10".into()]),
        "{}",
        fail("TCP", &tcp)
    );

    // Intercept: DNS to another resolver is answered by Waygate, with its rules.
    let got = dns.dig(&alice.ns, "203.0.113.99", "blocked.example", "A", &[]);
    assert_eq!(got.0, "REFUSED", "{}", fail("intercepted", &got));
    let got = dns.dig(&alice.ns, "203.0.113.99", "a.example", "A", &[]);
    assert_eq!(
        got.1,
        vec!["A 203.0.113.10".to_string()],
        "{}",
        fail("intercepted", &got)
    );

    // A location: a host of 198.51.100.0/24 asking the plain listener outside the tunnel (the
    // gateway's own namespace: the devices send everything through their tunnels).
    let got = dns.dig("gw", "198.51.100.1", "office-blocked.example", "A", &[]);
    assert_eq!(got.0, "REFUSED", "{}", fail("location rule", &got));
    let got = dns.dig(&bob.ns, "100.96.0.1", "office-blocked.example", "A", &[]);
    assert_eq!(
        got.0,
        "NOERROR",
        "{}",
        fail("not a location through the tunnel", &got)
    );

    // Name memory: once Alice resolved steer.example through the gateway, her flows to its
    // address carry the name, and a rule on net.fqdn.host steers them; Bob's do not.
    let src = |d: &Device| {
        lab.http_src(d, secs(5))
            .unwrap_or_else(|o| panic!("{}", o.describe()))
    };
    assert_eq!(src(&alice), "192.0.2.1", "before resolving steer.example");
    assert_eq!(
        a("steer.example", "A").1,
        vec!["A 203.0.113.10".to_string()]
    );
    assert_eq!(src(&alice), "192.0.2.10", "after resolving steer.example");
    assert_eq!(src(&bob), "192.0.2.1", "Bob did not resolve it");
    assert!(lab.gateway_log_tail().contains("steer.example"));

    encrypted_dns(&lab, &alice, &bob);

    // One structured log line per query.
    let log = lab.gateway_log_tail();
    let line = log
        .lines()
        .find(|l| l.contains("dns query") && l.contains("games.example") && l.contains("eng-only"))
        .unwrap_or_else(|| panic!("no log line for Alice's blocked query:\n{log}"));
    for field in [
        "client=",
        "user=",
        "alice@example.com",
        "qtype=",
        "decision=",
        "rule=",
        "latency_us=",
    ] {
        assert!(
            line.contains(field),
            "{field} missing from the query log line: {line}"
        );
    }
    report("dns: actions, order of operations, AAAA hints, answer rules, identity, TCP, intercept, location");
}

/// A DNS query for `name`/`qtype` in wire form.
fn wire_query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m.to_vec().expect("query")
}

/// The response code and A/AAAA addresses of a wire answer.
fn parse_answer(bytes: &[u8]) -> (ResponseCode, Vec<String>) {
    let m =
        Message::from_vec(bytes).unwrap_or_else(|e| panic!("not a DNS answer ({e}): {bytes:?}"));
    let ips = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            hickory_proto::rr::RData::A(a) => Some(a.to_string()),
            hickory_proto::rr::RData::AAAA(a) => Some(a.to_string()),
            _ => None,
        })
        .collect();
    (m.response_code(), ips)
}

/// DNS over TLS with `kdig` and DNS over HTTPS with `curl`, both verifying the gateway's
/// certificate against the CA `waygate ca show` prints; the same rules and identities apply.
fn encrypted_dns(lab: &Lab, alice: &Device, bob: &Device) {
    let shown = lab.waygate(&["ca", "show"]).expect("waygate ca show");
    assert!(shown.ok(), "{}", shown.describe());
    assert!(shown.stdout.starts_with("-----BEGIN CERTIFICATE-----"));
    let ca = lab.dir().join("gateway-ca.pem");
    fs::write(&ca, &shown.stdout).expect("ca file");
    let ca = ca.display().to_string();
    let tls_ca = format!("+tls-ca={ca}");

    let kdig = |device: &Device, name: &str, extra: &[&str]| {
        let mut args = vec!["kdig", "@100.96.0.1", name, "A", "+timeout=3", "+retry=0"];
        args.extend_from_slice(extra);
        lab.run_in(&device.ns, &args, secs(10))
    };
    let status = |stdout: &str| {
        stdout
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .unwrap_or("NO-STATUS")
            .trim()
            .to_string()
    };
    let got = kdig(bob, "a.example", &[&tls_ca, "+tls-hostname=100.96.0.1"]);
    assert!(got.ok(), "kdig over TLS: {}", got.describe());
    assert_eq!(status(&got.stdout), "NOERROR", "{}", got.describe());
    assert!(got.stdout.contains("203.0.113.10"), "{}", got.describe());
    assert!(
        got.stdout.contains("TLS"),
        "not over TLS: {}",
        got.describe()
    );
    let got = kdig(alice, "games.example", &[&tls_ca]);
    assert_eq!(
        status(&got.stdout),
        "REFUSED",
        "identity over TLS: {}",
        got.describe()
    );
    let got = kdig(bob, "blocked.example", &[&tls_ca]);
    assert_eq!(
        status(&got.stdout),
        "REFUSED",
        "block list over TLS: {}",
        got.describe()
    );
    // A client trusting only the public CAs refuses the gateway's certificate.
    let got = kdig(
        bob,
        "a.example",
        &[
            "+tls-ca=/etc/ssl/certs/ca-certificates.crt",
            "+tls-hostname=100.96.0.1",
        ],
    );
    assert!(
        !got.stdout.contains("status: NOERROR"),
        "verified against the wrong CA: {}",
        got.describe()
    );

    // DNS over HTTPS: POST and GET of wire messages, then curl resolving through it.
    let doh = "https://100.96.0.1/dns-query";
    let query = lab.dir().join("doh-query.bin");
    fs::write(&query, wire_query("a.example.", RecordType::A)).expect("query");
    let answer = lab.dir().join("doh-answer.bin");
    let out_arg = answer.display().to_string();
    let data = format!("@{}", query.display());
    let got = lab.curl(
        bob,
        doh,
        secs(5),
        &[
            "--cacert",
            &ca,
            "-H",
            "content-type: application/dns-message",
            "--data-binary",
            &data,
            "--http2",
            "-o",
            &out_arg,
            "-w",
            "%{http_code} %{content_type} %{http_version}",
        ],
    );
    assert!(got.ok(), "DoH POST: {}", got.describe());
    // curl negotiates HTTP/2 through ALPN, as browsers do.
    assert_eq!(
        got.stdout,
        "200 application/dns-message 2",
        "{}",
        got.describe()
    );
    let (rcode, ips) = parse_answer(&fs::read(&answer).expect("answer"));
    assert_eq!(
        (rcode, ips),
        (ResponseCode::NoError, vec!["203.0.113.10".to_string()])
    );

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(wire_query("games.example.", RecordType::A));
    let get_url = format!("{doh}?dns={b64}");
    let got = lab.curl(
        alice,
        &get_url,
        secs(5),
        &[
            "--cacert",
            &ca,
            "--http1.1",
            "-H",
            "accept: application/dns-message",
            "-o",
            &out_arg,
            "-w",
            "%{http_code}",
        ],
    );
    assert_eq!(got.stdout, "200", "DoH GET: {}", got.describe());
    let (rcode, _) = parse_answer(&fs::read(&answer).expect("answer"));
    assert_eq!(rcode, ResponseCode::Refused, "identity over HTTPS");

    let got = lab.curl(
        bob,
        &format!("{doh}?nodns"),
        secs(5),
        &["--cacert", &ca, "-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(got.stdout, "400", "DoH without a query: {}", got.describe());

    // curl resolving its host through the gateway's DoH, then fetching from the origin.
    let got = lab.curl(
        bob,
        "http://a.example/",
        secs(5),
        &["--cacert", &ca, "--doh-url", doh],
    );
    assert!(got.ok(), "curl --doh-url: {}", got.describe());
    assert!(got.stdout.contains("192.0.2.1"), "{}", got.describe());
    let got = lab.curl(
        bob,
        "http://blocked.example/",
        secs(5),
        &["--cacert", &ca, "--doh-url", doh],
    );
    assert!(
        !got.ok() && got.stderr.contains("resolve"),
        "a blocked name resolved over DoH: {}",
        got.describe()
    );
}
