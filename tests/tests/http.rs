//! The HTTP stage through wg-quick devices (issue "HTTP stage"): a device trusting the gateway's
//! CA (`waygate ca show`) fetches from an HTTPS origin whose certificate comes from a lab CA given
//! as `http.upstream_ca`; rules block, redirect, tag and bypass; an untrusted origin gives 526;
//! QUIC is dropped while decrypting; and `waygate rules eval --filter http` agrees with the
//! running stage on the same request.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use waygate_e2e::{report, skip, Device, Lab, EGRESS_V4, HTTP_ORIGIN, UDP_ORIGIN};
use waygate_keys::CertificateAuthority;

/// The explicit proxy's listener, on the gateway's underlay address: the lab's `d1` namespace
/// (198.51.100.11) is the office endpoint's network, `d2` (198.51.100.12) is outside it.
const PROXY: &str = "198.51.100.1:3128";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const RULES: &str = r#"[
  {"id": "11111111-0000-4000-8000-000000000001", "name": "bank is private", "action": "off",
   "enabled": true, "precedence": 90, "filters": ["http"],
   "traffic": "any(http.request.domains[*] == \"bank.example\")"},
  {"id": "11111111-0000-4000-8000-000000000002", "name": "no admin pages", "action": "block",
   "enabled": true, "precedence": 10, "filters": ["http"],
   "traffic": "http.request.uri.path matches \"^/admin\"",
   "rule_settings": {"block_page_enabled": true, "block_reason": "Admin pages are closed here"}},
  {"id": "11111111-0000-4000-8000-000000000003", "name": "tag requests", "action": "allow",
   "enabled": true, "precedence": 20, "filters": ["http"],
   "traffic": "http.request.uri.path == \"/tagged\"",
   "rule_settings": {"add_headers": {"X-Waygate-Tag": ["lab"]}}},
  {"id": "11111111-0000-4000-8000-000000000004", "name": "moved", "action": "redirect",
   "enabled": true, "precedence": 30, "filters": ["http"],
   "traffic": "http.request.uri.path == \"/old\"",
   "rule_settings": {"redirect": {"target_uri": "https://new.example/",
                                  "preserve_path_and_query": true}}},
  {"id": "11111111-0000-4000-8000-000000000005", "name": "no executable uploads",
   "action": "block", "enabled": true, "precedence": 5, "filters": ["http"],
   "traffic": "any(http.upload.file.types[*] == \"exe\")"},
  {"id": "11111111-0000-4000-8000-000000000006", "name": "no executable downloads",
   "action": "block", "enabled": true, "precedence": 40, "filters": ["http"],
   "traffic": "any(http.download.file.types[*] == \"exe\")"},
  {"id": "11111111-0000-4000-8000-000000000007", "name": "private pages off the proxy",
   "action": "block", "enabled": true, "precedence": 7, "filters": ["http"],
   "traffic": "proxy.endpoint == \"office\" and http.request.uri.path == \"/private\"",
   "rule_settings": {"block_reason": "Private pages stay off the office proxy"}},
  {"id": "11111111-0000-4000-8000-000000000008", "name": "blocked domain", "action": "block",
   "enabled": true, "precedence": 35, "filters": ["http"],
   "traffic": "any(http.request.domains[*] == \"blocked.example\")"},
  {"id": "11111111-0000-4000-8000-000000000009", "name": "no deletes", "action": "block",
   "enabled": true, "precedence": 36, "filters": ["http"],
   "traffic": "http.request.method == \"DELETE\""}
]"#;

/// A PE executable's first bytes: "MZ", then the PE header at the offset at 0x3c.
fn exe() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0] = b'M';
    b[1] = b'Z';
    b[0x3c] = 0x80;
    b[0x80..0x84].copy_from_slice(b"PE\0\0");
    b
}

/// An HTTPS origin (Python's http.server with TLS): answers every GET with JSON of the
/// client's address, the path and the request headers.
const ORIGIN_PY: &str = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        got = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.reply(json.dumps({"received": len(got)}).encode())
    def reply(self, body, kind="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/file.txt":
            return self.reply(open(sys.argv[5], "rb").read(), "text/plain")
        body = json.dumps({"src": self.client_address[0], "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
addr, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
srv = http.server.ThreadingHTTPServer((addr, port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// A WebSocket client without framing: TLS to ADDR:PORT for NAME trusting CA, an upgrade request,
/// then prints the status line and what comes back for what it sends.
const WS_PY: &str = r#"
import socket, ssl, sys
ca, addr, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
t = ctx.wrap_socket(socket.create_connection((addr, port), timeout=5), server_hostname=name)
t.sendall(("GET /chat HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % name).encode())
head = b""
while b"\r\n\r\n" not in head:
    c = t.recv(1)
    if not c:
        break
    head += c
print(head.split(b"\r\n")[0].decode())
t.sendall(b"echo me")
got = b""
while len(got) < 7:
    c = t.recv(7 - len(got))
    if not c:
        break
    got += c
print(got.decode())
"#;

/// Writes `ca`'s certificate for `names` and its key as PEM files in `dir`, named after `stem`.
fn origin_cert(
    ca: &CertificateAuthority,
    names: &[&str],
    dir: &Path,
    stem: &str,
) -> (PathBuf, PathBuf) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = ca
        .issue(&names, &[], SystemTime::now())
        .expect("origin cert");
    let key = base64::engine::general_purpose::STANDARD.encode(cert.key_der.as_slice());
    let mut key_pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in key.as_bytes().chunks(64) {
        key_pem.push_str(std::str::from_utf8(line).expect("base64"));
        key_pem.push('\n');
    }
    key_pem.push_str("-----END PRIVATE KEY-----\n");
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    fs::write(&cert_path, format!("{}{}", cert.cert_pem, ca.cert_pem())).expect("cert");
    fs::write(&key_path, key_pem).expect("key");
    (cert_path, key_path)
}

/// `curl` from the device for `name` resolved to the HTTP origin's address.
fn fetch(
    lab: &Lab,
    device: &Device,
    url: &str,
    name_port: &str,
    extra: &[&str],
) -> waygate_e2e::Output {
    let resolve = format!("{name_port}:{HTTP_ORIGIN}");
    let mut args = vec!["--resolve", resolve.as_str()];
    args.extend_from_slice(extra);
    lab.curl(device, url, secs(10), &args)
}

#[test]
fn http_stage_inspects_device_traffic() {
    if skip("http_stage_inspects_device_traffic") {
        return;
    }
    let mut lab = Lab::up();
    lab.stop_gateway();
    let dir = lab.dir().to_path_buf();
    let lab_ca = CertificateAuthority::generate("Lab CA", SystemTime::now()).expect("lab ca");
    let stranger = CertificateAuthority::generate("Stranger CA", SystemTime::now()).expect("ca");
    fs::write(dir.join("lab-ca.pem"), lab_ca.cert_pem()).expect("lab ca file");
    let (cert, key) = origin_cert(
        &lab_ca,
        &["shop.example", "bank.example", "h2.example"],
        &dir,
        "origin",
    );
    let (bad_cert, bad_key) = origin_cert(&stranger, &["bad.example"], &dir, "bad");
    fs::write(dir.join("origin.py"), ORIGIN_PY).expect("origin script");
    let exe_file = dir.join("file.txt");
    fs::write(&exe_file, exe()).expect("exe");
    let text_file = dir.join("notes.txt");
    fs::write(&text_file, "just notes\n").expect("text");
    fs::write(dir.join("rules.json"), RULES).expect("rules");
    let mut config = fs::read_to_string(lab.config()).expect("config");
    config.push_str(&format!(
        "[policy]\nrules = \"{}\"\n[http]\nports = [80, 443, 8443, 9443]\ntls_decrypt = true\n\
         upstream_ca = \"{}\"\nproxy_listen = [\"{PROXY}\"]\n\
         [[http.proxy_endpoints]]\nname = \"office\"\nnetworks = [\"198.51.100.11/32\"]\n\
         [http.block_page]\norg_name = \"Lab Org\"\n\
         [logs]\ndir = \"{}\"\n",
        dir.join("rules.json").display(),
        dir.join("lab-ca.pem").display(),
        dir.join("logs").display(),
    ));
    fs::write(lab.config(), config).expect("config");
    lab.start_gateway().expect("the gateway starts with [http]");
    let script = dir.join("origin.py").display().to_string();
    for (port, cert, key) in [("443", &cert, &key), ("8443", &bad_cert, &bad_key)] {
        lab.spawn_in(
            "in",
            &[
                "python3",
                &script,
                HTTP_ORIGIN,
                port,
                &cert.display().to_string(),
                &key.display().to_string(),
                &exe_file.display().to_string(),
            ],
        )
        .expect("https origin");
    }
    // An origin speaking h2 (and HTTP/1.1) on 9443.
    let lab_https = lab.lab_https().expect("lab-https").display().to_string();
    lab.spawn_in(
        "in",
        &[
            &lab_https,
            &format!("{HTTP_ORIGIN}:9443"),
            &cert.display().to_string(),
            &key.display().to_string(),
        ],
    )
    .expect("h2 origin");
    // Extra UDP echo on 443 of the UDP origin: QUIC's port.
    lab.spawn_in(
        "in",
        &[
            &lab.lab_origin().display().to_string(),
            "serve",
            "--udp-echo",
            &format!("{UDP_ORIGIN}:443"),
        ],
    )
    .expect("udp echo on 443");
    let device = lab.add_device("d1", "d1").expect("device");
    let ca = lab.waygate(&["ca", "show"]).expect("ca show");
    assert!(ca.ok(), "{}", ca.describe());
    let gw_ca = dir.join("gateway-ca.pem");
    fs::write(&gw_ca, &ca.stdout).expect("gateway ca file");
    let gw_ca = gw_ca.display().to_string();
    let lab_ca_path = dir.join("lab-ca.pem").display().to_string();

    // The origin is up (its own certificate, straight from the Internet namespace).
    let ready = waygate_e2e::wait_until(secs(10), Duration::from_millis(200), || {
        lab.run_in(
            "in",
            &[
                "curl",
                "-sS",
                "--cacert",
                &lab_ca_path,
                "--resolve",
                &format!("shop.example:443:{HTTP_ORIGIN}"),
                "https://shop.example/",
            ],
            secs(5),
        )
        .ok()
        .then_some(())
    });
    assert!(ready.is_some(), "the HTTPS origin did not start");

    // An allowed page arrives from the egress address, with the gateway's certificate: the
    // device trusts only the gateway's CA.
    let out = fetch(
        &lab,
        &device,
        "https://shop.example/",
        "shop.example:443",
        &["--cacert", &gw_ca],
    );
    assert!(out.ok(), "allowed page: {}", out.describe());
    let page: serde_json::Value = serde_json::from_str(&out.stdout).expect("origin json");
    assert_eq!(page["src"], EGRESS_V4, "{}", out.stdout);
    let issuer = fetch(
        &lab,
        &device,
        "https://shop.example/",
        "shop.example:443",
        &["--cacert", &gw_ca, "-v", "-o", "/dev/null"],
    );
    let issued_by = issuer
        .stderr
        .lines()
        .find(|l| l.contains("issuer:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        issued_by.contains("Waygate Gateway CA"),
        "the leaf is the gateway's: {}",
        issuer.stderr
    );
    report("http: allowed HTTPS page from the egress address with the gateway's leaf");

    // A block rule answers 403 with its reason, inside the decrypted connection.
    let out = fetch(
        &lab,
        &device,
        "https://shop.example/admin/users",
        "shop.example:443",
        &["--cacert", &gw_ca, "-w", "\n%{http_code}"],
    );
    assert!(out.ok(), "{}", out.describe());
    assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
    assert!(
        out.stdout.contains("Admin pages are closed here"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("Lab Org"), "{}", out.stdout);
    report("http: block rule answers 403 with the block reason");

    // add_headers reach the origin.
    let out = fetch(
        &lab,
        &device,
        "https://shop.example/tagged",
        "shop.example:443",
        &["--cacert", &gw_ca],
    );
    let page: serde_json::Value = serde_json::from_str(&out.stdout).expect("origin json");
    assert_eq!(page["headers"]["x-waygate-tag"], "lab", "{}", out.stdout);
    report("http: add_headers reach the origin");

    // A redirect rule answers 307 with the target.
    let out = fetch(
        &lab,
        &device,
        "https://shop.example/old?q=1",
        "shop.example:443",
        &[
            "--cacert",
            &gw_ca,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ],
    );
    assert_eq!(
        out.stdout.trim(),
        "307 https://new.example/old?q=1",
        "{}",
        out.describe()
    );
    report("http: redirect rule answers 307 with the target");

    // Do Not Inspect: the origin's own certificate reaches the device.
    let out = fetch(
        &lab,
        &device,
        "https://bank.example/admin",
        "bank.example:443",
        &["--cacert", &lab_ca_path],
    );
    assert!(out.ok(), "bank with the lab CA: {}", out.describe());
    assert!(
        out.stdout.contains("\"path\": \"/admin\""),
        "not inspected: {}",
        out.stdout
    );
    let out = fetch(
        &lab,
        &device,
        "https://bank.example/",
        "bank.example:443",
        &["--cacert", &gw_ca],
    );
    assert!(
        !out.ok(),
        "bank must not carry a gateway leaf: {}",
        out.describe()
    );
    report("http: an off rule leaves the origin's own certificate in place");

    // A URL-path rule blocks on plain HTTP.
    let out = lab.curl(
        &device,
        &format!("http://{HTTP_ORIGIN}/admin/x"),
        secs(10),
        &["-w", "\n%{http_code}"],
    );
    assert!(out.stdout.ends_with("\n403"), "{}", out.describe());
    let shown = out
        .stdout
        .split("id=\"rule\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or_default()
        .to_string();
    report("http: a URL-path rule blocks plain HTTP");

    // `rules eval` decides the same requests the same way: a small table of paths, domains
    // and methods, each sent for real and given to `rules eval` as the same fields.
    let eval = |method: &str, host: &str, pq: &str| -> serde_json::Value {
        let (path, query) = pq.split_once('?').unwrap_or((pq, ""));
        let flow = serde_json::json!({
            "http.request.host": host,
            "http.request.uri": format!("http://{host}{pq}"),
            "http.request.uri.path": path,
            "http.request.uri.query": query,
            "http.request.uri.path_and_query": pq,
            "http.request.method": method,
            "identity.email": "d1@example.com",
        });
        let file = dir.join("flow.json");
        fs::write(&file, flow.to_string()).expect("flow");
        let out = lab
            .waygate(&[
                "rules",
                "eval",
                "--rules",
                &dir.join("rules.json").display().to_string(),
                "--filter",
                "http",
                "--input",
                &file.display().to_string(),
            ])
            .expect("rules eval");
        assert!(out.ok(), "{}", out.describe());
        serde_json::from_str(&out.stdout).expect("eval json")
    };
    let decided = eval("GET", HTTP_ORIGIN, "/admin/x");
    let expected = format!(
        "{} ({})",
        decided["rule_name"].as_str().unwrap_or_default(),
        decided["rule_id"].as_str().unwrap_or_default()
    );
    assert_eq!(shown, expected, "the running stage and rules eval disagree");
    // (method, host, path and query, the rule id both must name; "" for none)
    let cases = [
        (
            "GET",
            "blocked.example",
            "/",
            "11111111-0000-4000-8000-000000000008",
        ),
        (
            "GET",
            "www.blocked.example",
            "/a?b=1",
            "11111111-0000-4000-8000-000000000008",
        ),
        (
            "DELETE",
            "shop.example",
            "/thing",
            "11111111-0000-4000-8000-000000000009",
        ),
        (
            "GET",
            "shop.example",
            "/admin",
            "11111111-0000-4000-8000-000000000002",
        ),
        ("GET", "shop.example", "/thing?x=1", ""),
        ("POST", "shop.example", "/private", ""),
    ];
    for (method, host, pq, want) in cases {
        let out = fetch(
            &lab,
            &device,
            &format!("http://{host}{pq}"),
            &format!("{host}:80"),
            &["-X", method, "-w", "\n%{http_code}"],
        );
        let running = if out.stdout.ends_with("\n403") {
            out.stdout
                .split("id=\"rule\">")
                .nth(1)
                .and_then(|s| s.split('<').next())
                .unwrap_or("?")
                .to_string()
        } else {
            String::new()
        };
        let decided = eval(method, host, pq);
        let offline = match decided["action"].as_str() {
            Some("block") => format!(
                "{} ({})",
                decided["rule_name"].as_str().unwrap_or_default(),
                decided["rule_id"].as_str().unwrap_or_default()
            ),
            _ => String::new(),
        };
        assert_eq!(
            running,
            offline,
            "{method} http://{host}{pq}: the running stage and rules eval disagree ({})",
            out.describe()
        );
        assert!(
            running.contains(want),
            "{method} http://{host}{pq}: expected rule {want:?}, got {running:?}"
        );
    }
    report("http: rules eval --filter http agrees with the running stage");

    // One gateway_http line per request, with the decision, the rule and the bytes.
    let lines = waygate_e2e::wait_until(secs(10), Duration::from_millis(200), || {
        let text = fs::read_to_string(dir.join("logs/http.jsonl")).ok()?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let blocked = lines
            .iter()
            .any(|l| l["URL"] == format!("http://{HTTP_ORIGIN}/admin/x") && l["Action"] == "block");
        blocked.then_some(lines)
    })
    .expect("http.jsonl has the blocked request");
    let block = lines
        .iter()
        .find(|l| l["URL"] == format!("http://{HTTP_ORIGIN}/admin/x"))
        .expect("block line");
    assert_eq!(block["PolicyID"], decided["rule_id"], "{block}");
    assert_eq!(block["HTTPStatusCode"], 403, "{block}");
    assert_eq!(block["DeviceName"], "d1", "{block}");
    let tagged = lines
        .iter()
        .find(|l| l["URL"] == "https://shop.example/tagged")
        .expect("allowed line");
    assert_eq!(tagged["Action"], "allow", "{tagged}");
    assert!(tagged["BytesReceived"].as_u64() > Some(0), "{tagged}");
    assert_eq!(tagged["UpstreamTLSVersion"], "TLSv1_3", "{tagged}");
    assert!(
        !lines.iter().any(|l| l["HTTPHost"] == "bank.example"),
        "Do Not Inspect connections are not logged"
    );
    report("http: one http.jsonl line per request with decision, rule and bytes");

    // An .exe served as file.txt (Content-Type text/plain) is blocked by a download rule, and a
    // multipart upload of one by an upload rule; a text upload passes.
    let out = fetch(
        &lab,
        &device,
        "https://shop.example/file.txt",
        "shop.example:443",
        &["--cacert", &gw_ca, "-w", "\n%{http_code}"],
    );
    assert!(out.stdout.ends_with("\n403"), "{}", out.describe());
    assert!(
        out.stdout.contains("no executable downloads"),
        "{}",
        out.stdout
    );
    report("http: an .exe served as file.txt is blocked by a download file-type rule");
    let upload = |file: &Path| {
        let form = format!("f=@{}", file.display());
        fetch(
            &lab,
            &device,
            "https://shop.example/upload",
            "shop.example:443",
            &["--cacert", &gw_ca, "-F", &form, "-w", "\n%{http_code}"],
        )
    };
    let out = upload(&exe_file);
    assert!(out.stdout.ends_with("\n403"), "{}", out.describe());
    assert!(
        out.stdout.contains("no executable uploads"),
        "{}",
        out.stdout
    );
    let out = upload(&text_file);
    assert!(out.stdout.ends_with("\n200"), "{}", out.describe());
    report("http: a multipart upload of an .exe is blocked by an upload file-type rule");

    // curl --http2 gets h2 end to end: to the gateway, and from the gateway to the origin.
    let out = fetch(
        &lab,
        &device,
        "https://h2.example:9443/two",
        "h2.example:9443",
        &["--cacert", &gw_ca, "--http2", "-w", "\n%{http_version}"],
    );
    assert!(out.ok(), "{}", out.describe());
    let (json, version) = out.stdout.rsplit_once('\n').unwrap_or_default();
    assert_eq!(version, "2", "the device got h2: {}", out.stdout);
    let page: serde_json::Value = serde_json::from_str(json).expect("origin json");
    assert_eq!(page["version"], "HTTP/2.0", "the origin got h2: {json}");
    assert_eq!(page["src"], EGRESS_V4, "{json}");
    // Against the HTTP/1.1-only origin the device is not offered h2.
    let out = fetch(
        &lab,
        &device,
        "https://shop.example/",
        "shop.example:443",
        &[
            "--cacert",
            &gw_ca,
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
        ],
    );
    assert_eq!(out.stdout.trim(), "1.1", "{}", out.describe());
    report("http: curl --http2 gets h2 end to end against an h2 origin (1.1 against a 1.1 one)");

    // A WebSocket echo works through inspection (HTTP/1.1 upgrade inside the decrypted TLS).
    let ws = dir.join("ws.py");
    fs::write(&ws, WS_PY).expect("ws client");
    let out = lab.run_in(
        &device.ns,
        &[
            "python3",
            &ws.display().to_string(),
            &gw_ca,
            HTTP_ORIGIN,
            "9443",
            "h2.example",
        ],
        secs(10),
    );
    assert!(out.ok(), "{}", out.describe());
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["HTTP/1.1 101 Switching Protocols", "echo me"],
        "{}",
        out.describe()
    );
    report("http: a WebSocket echo works through inspection");

    // An origin whose certificate the gateway cannot verify gives 526.
    let out = fetch(
        &lab,
        &device,
        "https://bad.example:8443/",
        "bad.example:8443",
        &["--cacert", &gw_ca, "-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(out.stdout.trim(), "526", "{}", out.describe());
    report("http: an untrusted origin certificate gives 526");

    // QUIC (UDP 443) is dropped while decrypting; other UDP passes.
    let probe = lab.lab_origin().display().to_string();
    let quic = lab.run_in(
        &device.ns,
        &[
            &probe,
            "udp-probe",
            &format!("{UDP_ORIGIN}:443"),
            "--timeout-ms",
            "1500",
        ],
        secs(5),
    );
    assert!(!quic.ok(), "UDP 443 passed: {}", quic.describe());
    let echo = lab.run_in(
        &device.ns,
        &[
            &probe,
            "udp-probe",
            &format!("{UDP_ORIGIN}:7"),
            "--timeout-ms",
            "3000",
        ],
        secs(6),
    );
    assert!(echo.ok(), "UDP 7: {}", echo.describe());
    report("http: QUIC to 443 is dropped while decryption is on");

    // The explicit proxy: from the office network (d1's underlay address, no tunnel involved).
    let proxy_url = format!("http://{PROXY}");
    let via_proxy = |ns: &str, url: &str, extra: &[&str]| {
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-x", proxy_url.as_str()];
        args.extend_from_slice(extra);
        args.push(url);
        lab.run_in(ns, &args, secs(15))
    };
    let out = lab.run_in(
        "d1",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-D",
            "-",
            &format!("{proxy_url}/proxy.pac"),
        ],
        secs(15),
    );
    assert!(out.ok(), "{}", out.describe());
    assert!(
        out.stdout
            .to_ascii_lowercase()
            .contains("content-type: application/x-ns-proxy-autoconfig"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("return \"PROXY {PROXY}; DIRECT\";")),
        "{}",
        out.stdout
    );
    report("http: the proxy listener serves /proxy.pac");
    // CONNECT, decrypted with the gateway's leaf, leaving from the egress address.
    let out = via_proxy(
        "d1",
        "https://shop.example/via-proxy",
        &["--cacert", &gw_ca],
    );
    assert!(out.ok(), "CONNECT through the proxy: {}", out.describe());
    let page: serde_json::Value = serde_json::from_str(&out.stdout).expect("origin json");
    assert_eq!(page["path"], "/via-proxy", "{}", out.stdout);
    assert_eq!(page["src"], EGRESS_V4, "{}", out.stdout);
    // A rule on proxy.endpoint blocks with its page, inside the CONNECT tunnel.
    let out = via_proxy(
        "d1",
        "https://shop.example/private",
        &["--cacert", &gw_ca, "-w", "\n%{http_code}"],
    );
    assert!(out.stdout.ends_with("\n403"), "{}", out.describe());
    assert!(
        out.stdout
            .contains("Private pages stay off the office proxy"),
        "{}",
        out.stdout
    );
    report("http: CONNECT through the proxy is inspected; a proxy.endpoint rule blocks");
    // Plain absolute-URI requests: allowed, and decided by the same rules. (By address: the
    // lab's name resolves to IPv6 too, which the gateway would reach first.)
    let out = via_proxy("d1", &format!("http://{HTTP_ORIGIN}/"), &[]);
    assert!(out.ok(), "{}", out.describe());
    assert!(
        out.stdout.contains(&format!("\"src\":\"{EGRESS_V4}\"")),
        "{}",
        out.stdout
    );
    let out = via_proxy(
        "d1",
        &format!("http://{HTTP_ORIGIN}/private"),
        &["-w", "\n%{http_code}"],
    );
    assert!(out.stdout.ends_with("\n403"), "{}", out.describe());
    report("http: plain proxy requests pass and are decided");
    // A source outside every endpoint's networks gets 403, for plain requests and CONNECT.
    let out = via_proxy(
        "d2",
        "http://shop.example/",
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(out.stdout.trim(), "403", "{}", out.describe());
    let out = via_proxy("d2", "https://shop.example/", &["--cacert", &gw_ca]);
    assert!(
        !out.ok() && out.stderr.contains("403"),
        "CONNECT from outside: {}",
        out.describe()
    );
    report("http: sources outside every proxy endpoint get 403");

    chromium_loads_pages(&lab, &device, &dir, &ca.stdout);
}

/// Headless Chromium (Debian's package) inside the device's namespace, trusting the gateway's
/// CA through its NSS database, loads an allowed page and a blocked one through inspection.
fn chromium_loads_pages(lab: &Lab, device: &Device, dir: &Path, ca_pem: &str) {
    let root = running_as_root();
    if !Path::new("/usr/bin/chromium").exists() {
        assert!(
            !root,
            "chromium is missing: scripts/install-deps.sh installs it (Debian package chromium)"
        );
        eprintln!("SKIP http chromium check: /usr/bin/chromium is missing and this is not root");
        return;
    }
    let home = dir.join("chromium-home");
    let nssdb = home.join(".pki/nssdb");
    fs::create_dir_all(&nssdb).expect("nss dir");
    let ca = dir.join("chromium-ca.pem");
    fs::write(&ca, ca_pem).expect("ca");
    let db = format!("sql:{}", nssdb.display());
    for args in [
        vec!["certutil", "-d", &db, "-N", "--empty-password"],
        vec![
            "certutil",
            "-d",
            &db,
            "-A",
            "-t",
            "C,,",
            "-n",
            "waygate",
            "-i",
            ca.to_str().expect("utf-8 path"),
        ],
    ] {
        let out = waygate_e2e::run_with_timeout(
            {
                let mut c = std::process::Command::new(args[0]);
                c.args(&args[1..]);
                c
            },
            secs(20),
        )
        .expect("certutil");
        assert!(out.ok(), "{args:?}: {}", out.describe());
    }
    let home_env = format!("HOME={}", home.display());
    let profile = format!("--user-data-dir={}", home.join("profile").display());
    let resolve = format!("--host-resolver-rules=MAP shop.example {HTTP_ORIGIN}");
    let dump = |url: &str| {
        lab.run_in(
            &device.ns,
            &[
                "env",
                &home_env,
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &profile,
                &resolve,
                "--dump-dom",
                url,
            ],
            secs(60),
        )
    };
    let started = std::time::Instant::now();
    let out = dump("https://shop.example/from-chromium");
    assert!(
        out.stdout.contains("/from-chromium") && out.stdout.contains(EGRESS_V4),
        "chromium did not get the page: {}",
        out.describe()
    );
    let out = dump("https://shop.example/admin/chromium");
    assert!(
        out.stdout.contains("Admin pages are closed here") && out.stdout.contains("Lab Org"),
        "chromium did not get the block page: {}",
        out.describe()
    );
    report(&format!(
        "http: headless Chromium trusting the CA in its NSS db loads an allowed page and a block \
         page through inspection ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));
}

/// Whether this process runs as root (the lab needs it; then Chromium must be installed).
fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
