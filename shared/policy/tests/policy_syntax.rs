//! The expression examples Waygate must read: those of the seed documents (`shared/spec/`), of the
//! policy-language design page, and of Cloudflare's published Gateway rule examples. Each must
//! parse, type-check in its stage, and print to text that parses back to the same tree.
//!
//! Placeholders in published examples (`$<LIST_UUID>`, `"<POSTURE_CHECK_UUID>"`) are filled with
//! made-up UUIDs; blank values (`net.dst.ip == ""`) are tested both as written and filled in.

use waygate_policy::ast::Expr;
use waygate_policy::error::ExprErrorKind;
use waygate_policy::fields::{FieldType, Stage, FIELDS};
use waygate_policy::parser::parse;
use waygate_policy::typecheck::{check, Warning, WarningKind};

use Stage::{Dns, Egress, Http, L4};

const LIST: &str = "2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a001";

fn accept(stage: Stage, src: &str) -> (Expr, Vec<Warning>) {
    let src = src.replace("<LIST_UUID>", LIST);
    let expr = parse(&src).unwrap_or_else(|e| panic!("{stage}: {src}\n  {e}"));
    let warnings = check(&expr, stage).unwrap_or_else(|e| panic!("{stage}: {src}\n  {e}"));
    let printed = expr.to_string();
    match parse(&printed) {
        Ok(back) => assert_eq!(back, expr, "{src}\nprinted as {printed}"),
        Err(e) => panic!("{src}\nprinted as {printed}\n  {e}"),
    }
    (expr, warnings)
}

/// Accepts every example and expects no warning.
fn accept_all(cases: &[(Stage, &str)]) {
    for (stage, src) in cases {
        let (_, w) = accept(*stage, src);
        assert!(w.is_empty(), "{src}: {w:?}");
    }
}

#[test]
fn egress_seed_selectors() {
    accept_all(&[
        // Destination continent / country.
        (Egress, r#"net.dst.geo.continent == "EU""#),
        (Egress, r#"net.dst.geo.country == "RU""#),
        // Destination IP, filled with the address of the seed's example policy.
        (Egress, "net.dst.ip == 198.51.100.158"),
        (Egress, r#"net.dst.ip == "198.51.100.158""#),
        (Egress, r#"net.dst.port == "2222""#),
        (
            Egress,
            r#"any(device_posture.checks.failed[*] in {"1308749e-fcfb-4ebc-b051-fe022b632644"})"#,
        ),
        (
            Egress,
            r#"any(device_posture.checks.passed[*] in {"1308749e-fcfb-4ebc-b051-fe022b632644"})"#,
        ),
        (Egress, r#"net.protocol == "tcp""#),
        (Egress, r#"proxy.endpoint == """#),
        (Egress, r#"net.src.geo.continent == "North America""#),
        (Egress, r#"net.src.geo.country == "RU""#),
        (Egress, "net.src.ip == 203.0.113.7"),
        (Egress, r#"net.src.port == "2222""#),
        (
            Egress,
            r#"net.vnet_id == "957fc748-591a-e96s-a15d-1j90204a7923""#,
        ),
        // Users.
        (Egress, r#"identity.email == "user@example.com""#),
        (Egress, r#"identity.name == "user-name""#),
        (
            Egress,
            r#"any(identity.groups.email[*] == "group@example.com")"#,
        ),
        (
            Egress,
            r#"any(identity.groups.id[*] == "12jf495bhjd7893ml09o")"#,
        ),
        (Egress, r#"any(identity.groups.name[*] == "finance")"#),
        (
            Egress,
            r#"identity.saml_attributes["department"] == "Marketing""#,
        ),
    ]);
}

#[test]
fn egress_seed_policies() {
    accept_all(&[
        // "Access third-party provider": Destination IP is 198.51.100.158.
        (Egress, "net.dst.ip in {198.51.100.158}"),
        // The catch-all: Protocol in all options.
        (Egress, r#"net.protocol in {"tcp" "udp"}"#),
        (Egress, r#"net.protocol in {"icmp" "tcp" "udp"}"#),
    ]);
}

#[test]
fn blank_seed_values() {
    // The seed shows blank placeholders; they parse, and a blank address is a clear error.
    for src in [r#"net.dst.ip == """#, r#"net.src.ip == """#] {
        let e = parse(src).expect(src);
        let err = check(&e, Egress).expect_err(src);
        assert!(matches!(err.kind, ExprErrorKind::BadValue { .. }), "{err}");
        assert_eq!((err.pos.line, err.pos.column), (1, 15), "{err}");
    }
    accept(Egress, r#"proxy.endpoint == """#);
}

#[test]
fn egress_seed_operators() {
    accept_all(&[
        // is, is not
        (Egress, "net.dst.port == 443"),
        (Egress, "not(net.dst.port == 443)"),
        // in, not in
        (Egress, r#"net.dst.geo.country in {"RU" "BY"}"#),
        (Egress, r#"not(net.dst.geo.country in {"RU" "BY"})"#),
        // in list, not in list
        (Egress, "net.dst.ip in $<LIST_UUID>"),
        (Egress, "not(net.dst.ip in $<LIST_UUID>)"),
        // matches regex, does not match regex
        (Egress, r#"net.dst.geo.country matches "^(RU|BY)$""#),
        (Egress, r#"not(net.dst.geo.country matches "^(RU|BY)$")"#),
        // greater / less than
        (Egress, "net.dst.port > 1023"),
        (Egress, "net.dst.port >= 1024"),
        (Egress, "net.dst.port < 1024"),
        (Egress, "net.dst.port <= 1023"),
        // And, Or
        (
            Egress,
            r#"net.dst.geo.continent == "EU" and net.protocol == "tcp""#,
        ),
        (
            Egress,
            r#"net.dst.geo.continent == "EU" or net.dst.geo.continent == "NA""#,
        ),
        (
            Egress,
            r#"(net.src.geo.country == "US" and net.dst.port in {80 443}) or any(identity.groups.name[*] in {"eng"})"#,
        ),
    ]);
}

#[test]
fn dns_seed_examples() {
    accept_all(&[
        // Order of operations: Child Abuse, allow list, block list, SafeSearch, categories.
        (Dns, "any(dns.content_category[*] in {170})"),
        (Dns, "any(dns.domains[*] in $<LIST_UUID>)"),
        (Dns, "any(dns.content_category[*] in {145})"),
        (
            Dns,
            "any(dns.security_category[*] in {68 80 83 117 131 134 151 153 175 176 178})",
        ),
        // Blocking a domain blocks its subdomains; a TLD blocks everything under it.
        (Dns, r#"any(dns.domains[*] == "example.com")"#),
        (Dns, r#"any(dns.domains[*] == "a.example.com")"#),
        (Dns, r#"any(dns.domains[*] == "net")"#),
        // Destinations: allow / block / override one name.
        (Dns, r#"dns.fqdn == "example.com""#),
        (Dns, r#"dns.fqdn in {"example.com" "example.net"}"#),
        // Operators of the HTTP table, on DNS fields.
        (Dns, r#"not(dns.fqdn == "example.com")"#),
        (Dns, r#"not(dns.fqdn in {"example.com"})"#),
        (Dns, r#"dns.fqdn matches "example\.com$""#),
        (Dns, r#"not(dns.fqdn matches "example\.com$")"#),
        (Dns, r#"dns.query_rtype == "AAAA""#),
    ]);
}

#[test]
fn http_seed_examples() {
    accept_all(&[
        // Selectors.
        (Http, r#"http.request.host == "example.com""#),
        (Http, r#"http.request.uri == "https://example.com/a?b=c""#),
        (Http, r#"http.request.uri.query == "b=c""#),
        (Http, r#"http.request.uri.path == "/a""#),
        (Http, r#"http.request.uri.path_and_query == "/a?b=c""#),
        (Http, r#"http.request.method == "POST""#),
        (Http, "http.response.status_code == 403"),
        (
            Http,
            r#"any(http.upload.file.types[*] in {"exe" "dll" "apk"})"#,
        ),
        (Http, r#"any(http.download.file.types[*] in {"7z" "zip"})"#),
        (Http, r#"http.upload.mime == "application/pdf""#),
        (Http, r#"http.download.mime matches "^video/""#),
        // Example scenario: content categories in: Gaming (subcategory 100 of Entertainment).
        (Http, "any(http.request.uri.content_category[*] in {100})"),
        // Operators.
        (Http, r#"http.request.host != "example.com""#),
        (Http, r#"not(http.request.host == "example.com")"#),
        (
            Http,
            r#"http.request.host in {"a.example.com" "b.example.com"}"#,
        ),
        (Http, r#"not(http.request.host in {"a.example.com"})"#),
        (Http, r#"http.request.uri matches "/r/gaming""#),
        (Http, r#"not(http.request.uri matches "/r/gaming")"#),
        // Bypass (Do Not Inspect) by host.
        (Http, r#"http.request.host in {"pinned.example.com"}"#),
    ]);
}

#[test]
fn design_page_examples() {
    accept_all(&[
        (L4, "net.dst.port in {80 443}"),
        (L4, r#"net.detected_protocol in {"tls" "http"}"#),
        (
            L4,
            "net.dst.ip in {10.0.0.0/8 192.0.2.1..192.0.2.9 2001:db8::/32}",
        ),
        (L4, "net.dst.port in {8000..8999}"),
        (L4, r#"net.dst.ip in $2c9a9e8b4f1d4c479d4530f5f2c1a001"#),
        (L4, "net.dst.ip in $2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a001"),
        (L4, "any(net.sni.domains[*] == \"example.com\")"),
        (L4, "net.sni.domains[*] == \"example.com\""),
        (L4, "net.sni.domains[] == \"example.com\""),
        (L4, r#"all(net.fqdn.domains[*] != "example.com")"#),
        (Dns, "dns.resolved_ips[0] == 192.0.2.1"),
        (Http, r#"identity.saml_attributes["claim"] == "value""#),
        (Http, r#"any(identity.saml_attributes[*] == "claim=value")"#),
        (Http, r#"any(identity.groups[*].name in {"Admins"})"#),
    ]);
    accept_all(&[
        // Precedence and symbols.
        (
            L4,
            r#"!net.dst.port == 22 && net.protocol == "tcp" ^^ net.dst.port lt 1024 || net.dst.port ge 8000"#,
        ),
        (
            L4,
            r#"not net.dst.port eq 22 and net.protocol ne "udp" xor net.dst.port gt 1 or net.dst.port le 2"#,
        ),
        (L4, r#"net.sni.host wildcard "*.example.com""#),
        (L4, r#"net.sni.host strict wildcard "*.Example.com""#),
        (L4, r#"net.sni.host contains "example""#),
        (L4, r#"net.sni.host ~ "example""#),
        // Strings and regexes.
        (Dns, r#"dns.fqdn == "q\"uote\\back\x41""#),
        (Dns, r#"dns.fqdn matches r"example\.com""#),
        (Dns, r##"dns.fqdn matches r#"a"b"#"##),
        (Dns, r#"dns.fqdn matches "example\.com""#),
        // Leniencies.
        (L4, r#"net.dst.port == "2222""#),
        (L4, "net.src.ip == 10.0.0.0/8"),
        (L4, r#"net.src.geo.continent == "North America""#),
        // Dashboard operator mapping.
        (Dns, r#"any(dns.domains[*] == "example.com")"#),
        (Dns, r#"not(dns.fqdn == "example.com")"#),
        (Dns, r#"dns.fqdn in {"a.com" "b.com"}"#),
        (Dns, r#"not(dns.fqdn in {"a.com" "b.com"})"#),
        (Dns, "dns.fqdn in $<LIST_UUID>"),
        (Dns, "not(dns.fqdn in $<LIST_UUID>)"),
        (Dns, r#"dns.fqdn matches "^ads\.""#),
        (Dns, r#"not(dns.fqdn matches "^ads\.")"#),
        // Resolved geolocation may be compared as a whole.
        (Dns, r#"dns.dst.geo.country == "RU""#),
        (Dns, r#"dns.dst.geo.continent in {"EU" "Asia"}"#),
        // Aliases.
        (Http, r#"http.conn.hostname == "example.com""#),
        (Http, r#"any(http.conn.domains[*] == "example.com")"#),
        (Http, "any(http.conn.content_category[*] in {1})"),
        (Http, "any(http.conn.security_category[*] in {80})"),
        // Multi-line expressions report lines; they also parse.
        (
            Dns,
            "dns.fqdn == \"a.com\"\n  or dns.fqdn == \"b.com\"\n\tor dns.fqdn == \"c.com\"",
        ),
    ]);
}

#[test]
fn design_page_normalizations() {
    assert_eq!(
        parse(r#"net.dst.port == "2222""#).ok(),
        parse("net.dst.port == 2222").ok()
    );
    assert_eq!(
        parse(r#"net.src.geo.continent == "North America""#).ok(),
        parse(r#"net.src.geo.continent == "NA""#).ok()
    );
    assert_eq!(
        parse("dns.fqdn in $2C9A9E8B-4F1D-4C47-9D45-30F5F2C1A001").ok(),
        parse("dns.fqdn in $2c9a9e8b4f1d4c479d4530f5f2c1a001").ok()
    );
    assert_eq!(
        parse(r#"any(identity.groups[*].name == "a")"#).ok(),
        parse(r#"identity.groups.name[*] == "a""#).ok()
    );
    assert_eq!(
        parse(r#"http.conn.hostname == "a""#).ok(),
        parse(r#"http.request.host == "a""#).ok()
    );
}

/// Every field gets a comparison fitting its type; each must check in its own stages and be
/// refused, at the field, in the others.
#[test]
fn every_field_in_every_stage() {
    for info in FIELDS {
        let name = info.name;
        let src = match info.ty {
            FieldType::Bytes if info.is_continent() => format!("{name} == \"EU\""),
            FieldType::Bytes => format!("{name} == \"US\""),
            FieldType::Int => format!("{name} >= 1"),
            FieldType::Ip => format!("{name} in {{10.0.0.0/8}}"),
            FieldType::Bool => name.to_string(),
            FieldType::BytesArray if info.is_continent() => format!("any({name}[*] == \"EU\")"),
            FieldType::BytesArray | FieldType::BytesArrayMap => format!("any({name}[*] == \"US\")"),
            FieldType::IntArray => format!("any({name}[*] in {{1 2..3}})"),
            FieldType::IpArray => format!("any({name}[*] == ::1)"),
        };
        for stage in Stage::ALL {
            let expr = parse(&src).unwrap_or_else(|e| panic!("{src}: {e}"));
            match check(&expr, stage) {
                Ok(w) => {
                    assert!(info.in_stage(stage), "{src} accepted in {stage}");
                    assert_eq!(
                        !w.is_empty(),
                        info.unfilled(),
                        "{src} in {stage}: warnings {w:?}"
                    );
                }
                Err(e) => {
                    assert!(!info.in_stage(stage), "{src} in {stage}: {e}");
                    assert!(matches!(e.kind, ExprErrorKind::WrongStage { .. }), "{e}");
                    assert_eq!(e.pos.line, 1);
                }
            }
        }
        // Identity and posture are everywhere.
        if name.starts_with("identity.") || name.starts_with("device_posture.") {
            assert!(Stage::ALL.iter().all(|s| info.in_stage(*s)), "{name}");
        }
    }
}

#[test]
fn unfilled_fields_warn() {
    for (stage, src) in [
        (Http, "any(app.ids[*] in {606})"),
        (L4, "any(app.type.ids[*] in {25})"),
        (L4, "any(app_control.controls[*] in {1})"),
        (Http, r#"any(app.statuses[*] == "unapproved")"#),
        (Http, r#"any(dlp.profiles[*] == "x")"#),
        (L4, r#"net.proxy_endpoint.ids[*] in {"x"}"#),
        (Dns, "dns.categories_in_request_context_matches"),
        (L4, "access.target"),
        (L4, "not access.private_app"),
        (Dns, "dns.src_internal_ip in {10.0.0.0/8}"),
        (Http, "http.conn.internal_src_ip == 10.1.2.3"),
    ] {
        let (_, w) = accept(stage, src);
        assert!(
            matches!(
                w.as_slice(),
                [Warning {
                    kind: WarningKind::Unfilled { .. },
                    ..
                }]
            ),
            "{src}: {w:?}"
        );
    }
}

/// Cloudflare's published Gateway examples (developer documentation, API examples).
#[test]
fn cloudflare_published_examples() {
    let published: &[(Stage, &str)] = &[
        // Gateway policy expressions page.
        (Dns, r#"dns.fqdn == "example.com""#),
        (Http, r#"http.request.host == "api.example.com""#),
        (Http, r#"identity.email == "user@company.com""#),
        (Http, r#"http.request.host != "blocked.com""#),
        (L4, "net.dst.port in {80 443}"),
        (Http, r#"http.request.host matches ".*\\.example\\.com""#),
        (
            Dns,
            r#"dns.fqdn == "example.com" and identity.email == "admin@company.com""#,
        ),
        (L4, "net.dst.port == 80 or net.dst.port == 443"),
        (Http, r#"not(identity.email == "guest@company.com")"#),
        (
            Http,
            "any(http.request.uri.content_category[*] in {17 85 102})",
        ),
        (
            Http,
            r#"any(identity.groups[*].name in {"Engineering" "Security"})"#,
        ),
        (Http, r#"any(http.request.domains[*] == "example.com")"#),
        (Http, "http.request.host in $<LIST_UUID>"),
        (Http, "any(http.request.domains[*] in $<LIST_UUID>)"),
        (Http, r#"any(identity.groups[*].name in {"Engineering"})"#),
        (L4, "net.dst.ip in {10.0.0.0/8}"),
        (
            Http,
            r#"http.request.host == "internal.example.com" and identity.email matches ".*@company.com""#,
        ),
        // Common DNS policies.
        (Dns, "any(dns.domains[*] in $<LIST_UUID>)"),
        (
            Dns,
            r#"any(dns.dst.geo.country[*] in {"AF" "BY" "CD" "CU" "IR" "IQ" "KP" "MM" "RU" "SD" "SY" "UA" "ZW"})"#,
        ),
        (
            Dns,
            r#"any(dns.domains[*] matches "[.](cn|ru)$") or any(dns.domains[*] matches "[.](rest|hair|top|live|cfd|boats|beauty|mom|skin|okinawa)$") or any(dns.domains[*] matches "[.](zip|mobi)$")"#,
        ),
        (
            Dns,
            r#"not(any(dns.domains[*] in $<LIST_UUID>)) and any(dns.domains[*] matches ".*okta.*\|.*cloudflare.*\|.*mfa.*\|.sso.*")"#,
        ),
        (Dns, "any(dns.resolved_ips[*] in $<LIST_UUID>)"),
        (Dns, "any(dns.content_category[*] in {182})"),
        (Dns, "any(dns.content_category[*] in {145})"),
        (Dns, "any(dns.content_category[*] in {149})"),
        (Dns, r#"any(identity.groups.name[*] in {"Contractors"})"#),
        (Dns, r#"any(identity.groups.name[*] in {"Marketing"})"#),
        // Common network policies.
        (L4, r#"any(identity.groups.name[*] in {"Contractors"})"#),
        (
            L4,
            r#"net.detected_protocol == "tls" and net.dst.port in {80 443}"#,
        ),
        (L4, r#"net.protocol in {"tcp" "udp"}"#),
        (
            L4,
            r#"net.detected_protocol == "tls" or net.detected_protocol == "http""#,
        ),
        (L4, r#"identity.email matches ".*@example.com""#),
        (L4, "net.dst.ip in {203.0.113.17} and net.dst.port == 80"),
        // Common HTTP policies.
        (Http, r#"http.request.host matches ".*example\.com""#),
        (Http, r#"http.request.uri matches "/r/gaming""#),
        (Http, r#"any(identity.groups.name[] in {"Contractors"})"#),
        (
            Http,
            r#"any(device_posture.checks.passed[*] in {"6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11"})"#,
        ),
        (
            Http,
            r#"any(device_posture.checks.passed[] in {"6a3b1f0e-5b8e-4c35-9c1d-3f0a2b7c9d11"}) or any(device_posture.checks.passed[] in {"0b6f7f52-8f2f-4f61-9a8e-2f2c7a1d5e40"})"#,
        ),
        (
            Http,
            r#"any(http.conn.domains[*] in {"internal.example.com"})"#,
        ),
        (
            Http,
            r#"http.request.host == "mail-attachment.googleusercontent.com" and http.request.uri.path_and_query matches "/attachment/u/0""#,
        ),
        (
            Http,
            r#"any(http.request.domains[*] matches "^(.+\.)?translate\.goog$")"#,
        ),
        (
            Http,
            r#"not(http.request.host == "drivefrontend-pa.clients6.google.com")"#,
        ),
        // Identity-based selectors (older page): whole identity arrays compared with ==.
        (Http, r#"identity.name == "user-name""#),
        (Http, r#"identity.groups.id == "12jf495bhjd7893ml09o""#),
        (Http, r#"identity.groups.email == "group@example.com""#),
        (Http, r#"identity.groups.name == "\"finance\"""#),
        (Http, r#"identity.saml_attributes == "\"finance\"""#),
        // Selector reference tables.
        (Http, r#"identity.saml_attributes == "\"group=finance\"""#),
        (L4, r#"net.onramp.type == "device_client""#),
        (Dns, r#"dns.query_rtype == "TXT""#),
        (
            Dns,
            r#"dns.location in {"location_uuid_1" "location_uuid_2"}"#,
        ),
        (L4, r#"net.protocol.detection == "ssh""#),
        (Egress, "net.dst.ip == 192.0.2.0"),
        (Dns, "any(dns.security_category[*] in {1})"),
        (Http, "any(http.request.uri.security_category[*] in {1})"),
        (L4, r#"any(net.sni.domains[*] == "example.com")"#),
        // API examples (JSON conditions written as text).
        (Dns, "any(dns.resolved_ips[*] == 203.0.113.17)"),
        (Dns, r#"any(identity.groups.name[*] in {"marketing"})"#),
        (Http, r#"any(http.request.domains[*] == "example.com")"#),
        (Http, r#"identity.email in {"user@example1.com"}"#),
        (L4, "net.dst.ip in {203.0.113.17} and net.dst.port == 80"),
        (Dns, r#"any(dns.domains[*] == "cluster-admin.microagi")"#),
        // File sizes (MiB) and the deprecated singular file type, filled by the HTTP stage.
        (Http, "http.upload.file.size > 10"),
        (Http, "http.download.file.size >= 100"),
        (Http, "http.upload.file.size < 50"),
        (Http, "http.download.file.size <= 200"),
        (Http, r#"http.download.file.type in {"PDF" "ZIP"}"#),
        (
            Http,
            r#"http.body_phase == "upload" and any(http.upload.file.types[*] == "pdf")"#,
        ),
    ];
    accept_all(published);
    // Published examples on features Waygate lacks load with a warning.
    for (stage, src) in [
        (Dns, "dns.categories_in_request_context_matches"),
        (L4, "access.target"),
        (Dns, r#"dns.doh_subdomain == "abcdefg""#),
        (
            Http,
            r#"any(identity.oidc_claims[*] == "\"department=engineering\"")"#,
        ),
        (Dns, "any(app.ids[*] in {606})"),
        (L4, "any(app.type.ids[*] in {25})"),
        (L4, "any(app.ids[*] in {606})"),
        (Http, "any(app.ids[] in {606})"),
        (Http, "any(app.type.ids[*] in {16})"),
        (
            Http,
            r#"any(app.statuses[*] == "unreviewed") or any(app.statuses[*] == "in review")"#,
        ),
        (
            Http,
            r#"any(app.ids[] in {554}) and http.request.uri.path_and_query matches ".(e=download\|export).*""#,
        ),
        (
            Http,
            r#"any(app.ids[] in {554}) and http.upload.mime matches "." and not(http.request.host == "drivefrontend-pa.clients6.google.com")"#,
        ),
        (
            L4,
            r#"net.proxy_endpoint.ids[*] in {"3f1c"} and net.src.ip in {203.0.113.0/24} and net.dst.ip in {10.0.0.0/8}"#,
        ),
    ] {
        let (_, w) = accept(stage, src);
        assert!(!w.is_empty(), "{src}");
    }
}

/// Each rejection, with where it is reported.
#[test]
fn rejections() {
    let cases: &[(Stage, &str, (u32, u32), &str)] = &[
        // Syntax.
        (
            Dns,
            r#"dns.fqd == "a""#,
            (1, 1),
            r#"unknown field "dns.fqd"; did you mean "dns.fqdn"?"#,
        ),
        (
            Dns,
            r#"dns.fqdn == "a" and dns.fqd == "b""#,
            (1, 21),
            r#"line 1, column 21: unknown field "dns.fqd"; did you mean "dns.fqdn"?"#,
        ),
        (
            Dns,
            r#"dns.fqdn = "a""#,
            (1, 10),
            r#"unexpected "="; did you mean "=="?"#,
        ),
        (Dns, r#"dns.fqdn == 'a'"#, (1, 13), "double quotes"),
        (
            Dns,
            r#"dns.fqdn == "a" & dns.fqdn == "b""#,
            (1, 17),
            r#"did you mean "&&"?"#,
        ),
        (
            Dns,
            r#"dns.fqdn == "a" | dns.fqdn == "b""#,
            (1, 17),
            r#"did you mean "||"?"#,
        ),
        (
            Dns,
            r#"dns.fqdn not in {"a"}"#,
            (1, 10),
            r#"not(dns.fqdn in ...)"#,
        ),
        (Dns, r#"dns.fqdn ! "a""#, (1, 10), "expected an operator"),
        (Dns, r#"dns.fqdn == "a"#, (1, 13), "unterminated string"),
        (
            Dns,
            r#"dns.fqdn == "a\qb""#,
            (1, 13),
            r#"invalid escape "\q""#,
        ),
        (
            Dns,
            r#"dns.fqdn == "a\.b""#,
            (1, 13),
            r#"invalid escape "\.""#,
        ),
        (
            L4,
            "net.dst.port in {80, 443}",
            (1, 20),
            "separated by spaces",
        ),
        (
            L4,
            "net.dst.port in {443..80}",
            (1, 18),
            "range 443..80 is empty",
        ),
        (
            L4,
            "net.dst.ip in {10.0.0.9..10.0.0.1}",
            (1, 16),
            "is empty",
        ),
        (L4, "net.dst.ip in {10.0.0.1..::1}", (1, 16), "is empty"),
        (
            L4,
            "net.dst.port in 80",
            (1, 17),
            "expected a set {...} or a list",
        ),
        (
            L4,
            "net.dst.port == {80}",
            (1, 17),
            "sets {...} go after \"in\"",
        ),
        (Dns, "(dns.fqdn == \"a\"", (1, 17), "expected \")\""),
        (Dns, "dns.fqdn == \"a\")", (1, 16), "unbalanced"),
        (Dns, "dns.fqdn == \"a\" and", (1, 20), "expected a field"),
        (
            Dns,
            "dns.fqdn strict \"a\"",
            (1, 17),
            "\"wildcard\" after \"strict\"",
        ),
        (Dns, "dns.fqdn == example.com", (1, 13), "expected a value"),
        (Dns, "dns.domains[x] == \"a\"", (1, 13), "an index"),
        (Dns, "any(dns.domains[*] == \"a\"", (1, 26), "closing any"),
        (Dns, "", (1, 1), "expected a field"),
        (
            Dns,
            "dns.fqdn == \"a\" or\n   dns.fqdm == \"b\"",
            (2, 4),
            "did you mean \"dns.fqdn\"",
        ),
        // Stages, with the field of the same selector when the stage has one.
        (
            Dns,
            r#"http.request.host == "a""#,
            (1, 1),
            r#"field "http.request.host" is not available in dns rules; use "dns.fqdn""#,
        ),
        (
            Egress,
            r#"dns.src.geo.country == "US""#,
            (1, 1),
            r#"use "net.src.geo.country""#,
        ),
        (
            Http,
            "any(dns.content_category[*] in {1})",
            (1, 5),
            r#"use "http.request.uri.content_category""#,
        ),
        // Types.
        (
            Dns,
            r#"net.dst.port == 80"#,
            (1, 1),
            "not available in dns rules",
        ),
        (
            Egress,
            r#"dns.fqdn == "a""#,
            (1, 1),
            "not available in egress rules",
        ),
        (
            Egress,
            r#"net.sni.host == "a""#,
            (1, 1),
            "not available in egress rules",
        ),
        (
            L4,
            r#"http.request.host == "a""#,
            (1, 1),
            "not available in l4 rules",
        ),
        (
            Dns,
            r#"dns.fqdn > "a""#,
            (1, 1),
            r#"operator ">" cannot be used on "dns.fqdn""#,
        ),
        (L4, "net.dst.ip >= 10.0.0.1", (1, 1), "operator \">=\""),
        (
            L4,
            r#"net.dst.port matches "80""#,
            (1, 1),
            "operator \"matches\"",
        ),
        (
            L4,
            r#"net.dst.port contains "80""#,
            (1, 1),
            "operator \"contains\"",
        ),
        (
            L4,
            r#"net.dst.ip wildcard "10.*""#,
            (1, 1),
            "operator \"wildcard\"",
        ),
        (L4, "access.target == 1", (1, 1), "(Bool)"),
        (Dns, r#"dns.domains == "a""#, (1, 1), "is an array"),
        (Dns, r#"dns.domains matches "a""#, (1, 1), "is an array"),
        (Dns, r#"dns.content_category in {1}"#, (1, 1), "is an array"),
        (Dns, r#"dns.fqdn == 1"#, (1, 13), "1 is not a valid string"),
        (
            L4,
            r#"net.dst.port == "x""#,
            (1, 17),
            "is not a valid integer",
        ),
        (
            L4,
            r#"net.dst.port == 10.0.0.1"#,
            (1, 17),
            "is not a valid integer",
        ),
        (L4, r#"net.dst.ip == 80"#, (1, 15), "IP address or CIDR"),
        (
            L4,
            r#"net.dst.ip in {"a"}"#,
            (1, 15),
            "IP address, CIDR or address range",
        ),
        (
            L4,
            r#"net.protocol in {6 17}"#,
            (1, 17),
            "is not a valid string",
        ),
        (
            L4,
            r#"net.dst.port in {1..2 "x"}"#,
            (1, 17),
            "integer or integer range",
        ),
        (
            Http,
            r#"http.request.uri matches "(unclosed""#,
            (1, 26),
            "invalid regex",
        ),
        (
            Http,
            r#"http.request.uri matches "a{99999999}""#,
            (1, 26),
            "invalid regex",
        ),
        (
            Dns,
            r#"dns.fqdn[*] == "a""#,
            (1, 1),
            "cannot be accessed with an element index",
        ),
        (
            Dns,
            r#"dns.fqdn[0] == "a""#,
            (1, 1),
            "cannot be accessed with an element index",
        ),
        (
            Dns,
            r#"dns.domains["k"] == "a""#,
            (1, 1),
            "cannot be accessed with a [\"key\"]",
        ),
        (Dns, "dns.fqdn", (1, 1), "is not a Bool"),
        (Dns, "not dns.domains", (1, 5), "is not a Bool"),
        (
            Dns,
            r#"any(dns.fqdn == "a")"#,
            (1, 5),
            "needs a field with [*]",
        ),
        (
            Dns,
            r#"any(dns.domains[*] == "a" or dns.response.cname[*] == "a")"#,
            (1, 30),
            "one array only",
        ),
    ];
    for (stage, src, (line, col), msg) in cases {
        let err = match parse(src) {
            Err(e) => e,
            Ok(e) => check(&e, *stage).expect_err(src),
        };
        let text = err.to_string();
        assert_eq!(
            (err.pos.line, err.pos.column),
            (*line, *col),
            "{src}: {text}"
        );
        assert!(text.contains(msg), "{src}: {text}");
        assert!(
            text.starts_with(&format!("line {line}, column {col}: ")),
            "{text}"
        );
    }
}
