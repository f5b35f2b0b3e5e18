//! Rule sets end to end: Cloudflare JSON in, compiled per stage, decisions out.

use serde_json::json;
use waygate_policy::fields::{FieldId, Stage};
use waygate_policy::input::Input;
use waygate_policy::ruleset::{
    default_dns_rules, Action, EgressAction, Ipv4Fallback, Lists, Policy, PolicyHandle, RuleSet,
};

fn policy(rules: serde_json::Value, lists: serde_json::Value) -> Policy {
    let set = RuleSet::from_json(&rules.to_string()).expect("rules parse");
    let lists = Lists::from_json(&lists.to_string()).expect("lists parse");
    Policy::compile(&set, &lists).unwrap_or_else(|e| panic!("{e:?}"))
}

fn input(v: serde_json::Value) -> Input {
    Input::from_json(&v).expect("input")
}

fn decide(p: &Policy, stage: Stage, v: serde_json::Value) -> Option<String> {
    let i = input(v);
    let fast = p.stage(stage).evaluate(&i).map(|r| r.name.clone());
    let slow = p.stage(stage).evaluate_linear(&i).map(|r| r.name.clone());
    assert_eq!(fast, slow, "index and linear scan disagree");
    fast
}

fn rule(name: &str, prec: i64, filter: &str, action: &str, traffic: &str) -> serde_json::Value {
    json!({"name": name, "precedence": prec, "enabled": true, "action": action,
           "filters": [filter], "traffic": traffic, "identity": "", "device_posture": ""})
}

#[test]
fn catch_all_egress_policy() {
    let mut dedicated = rule(
        "Access third-party provider",
        1,
        "egress",
        "egress",
        "net.dst.ip == 198.51.100.158",
    );
    dedicated["rule_settings"] = json!({"egress": {"ipv4": "192.0.2.10", "ipv6": "2001:db8:10::/64", "ipv4_fallback": "0.0.0.0"}});
    let mut catch_all = rule(
        "Default egress policy",
        2,
        "egress",
        "egress",
        "net.protocol in {\"tcp\" \"udp\" \"icmp\"}",
    );
    catch_all["rule_settings"] = json!({"egress": {"ipv4": "", "ipv6": "", "ipv4_fallback": ""}});
    let p = policy(json!([catch_all, dedicated]), json!([]));
    let eg = p.stage(Stage::Egress);
    let r = eg
        .evaluate(&input(
            json!({"net.dst.ip": "198.51.100.158", "net.protocol": "tcp"}),
        ))
        .expect("match");
    assert_eq!(r.name, "Access third-party provider");
    assert_eq!(
        r.action,
        Action::Egress(EgressAction::Dedicated {
            ipv4: Some("192.0.2.10".parse().unwrap()),
            ipv6: Some("2001:db8:10::/64".parse().unwrap()),
            ipv4_fallback: Ipv4Fallback::DefaultEgress,
        })
    );
    let r = eg
        .evaluate(&input(
            json!({"net.dst.ip": "203.0.113.7", "net.protocol": "udp"}),
        ))
        .expect("catch-all");
    assert_eq!(r.name, "Default egress policy");
    assert_eq!(r.action, Action::Egress(EgressAction::Default));
    // A flow whose protocol is unknown reaches no rule: default egress.
    assert!(eg
        .evaluate(&input(json!({"net.dst.ip": "203.0.113.7"})))
        .is_none());
}

#[test]
fn and_or_and_missing_fields() {
    let p = policy(
        json!([
            rule(
                "and",
                1,
                "l4",
                "block",
                "net.dst.port == 22 and net.protocol == \"tcp\""
            ),
            rule(
                "or",
                2,
                "l4",
                "allow",
                "net.dst.port == 80 or net.dst.port == 443"
            ),
            rule("ne", 3, "l4", "block", "net.sni.host != \"example.com\""),
            rule(
                "not",
                4,
                "l4",
                "block",
                "not net.detected_protocol == \"ssh\""
            ),
        ]),
        json!([]),
    );
    let d = |v| decide(&p, Stage::L4, v);
    assert_eq!(
        d(json!({"net.dst.port": 22, "net.protocol": "tcp"})).as_deref(),
        Some("and")
    );
    assert_eq!(
        d(json!({"net.dst.port": 22, "net.protocol": "udp", "net.detected_protocol": "ssh"})),
        None
    );
    assert_eq!(d(json!({"net.dst.port": "443"})).as_deref(), Some("or"));
    // The SNI is unset: `!=` is false, but `not (... == ...)` on the unset field is true.
    assert_eq!(d(json!({"net.dst.port": 8080})).as_deref(), Some("not"));
    assert_eq!(
        d(json!({"net.dst.port": 8080, "net.sni.host": "other.test"})).as_deref(),
        Some("ne")
    );
}

#[test]
fn every_non_empty_expression_must_hold_and_disabled_rules_never_match() {
    let mut r1 = rule(
        "eng only",
        1,
        "dns",
        "block",
        "any(dns.domains[*] == \"example.com\")",
    );
    r1["identity"] = json!("any(identity.groups.name[*] == \"eng\")");
    let mut r2 = rule(
        "disabled",
        0,
        "dns",
        "block",
        "dns.fqdn == \"www.example.com\"",
    );
    r2["enabled"] = json!(false);
    let p = policy(json!([r1, r2]), json!([]));
    let d = |v| decide(&p, Stage::Dns, v);
    assert_eq!(
        d(json!({"dns.fqdn": "www.example.com", "identity.groups.name": ["eng"]})).as_deref(),
        Some("eng only")
    );
    assert_eq!(
        d(json!({"dns.fqdn": "www.example.com", "identity.groups.name": ["ops"]})),
        None
    );
    assert_eq!(d(json!({"dns.fqdn": "www.example.com"})), None);
}

#[test]
fn dns_order_of_operations_default_rule_set() {
    let set = default_dns_rules("allowed", "blocked", &[7, 2], &[21]);
    let lists = Lists::from_json(
        &json!([
            {"id": "a1b2c3d4-0000-4000-8000-000000000001", "name": "allowed", "type": "DOMAIN",
             "items": [{"value": "partner.example"}, "abuse.example", "both.example"]},
            {"id": "a1b2c3d4-0000-4000-8000-000000000002", "name": "blocked", "type": "DOMAIN",
             "items": ["both.example", "bad.example", "google.com"]}
        ])
        .to_string(),
    )
    .unwrap();
    let p = Policy::compile(&set, &lists).unwrap();
    let d = |v| decide(&p, Stage::Dns, v);
    // 1. Child Abuse first, even for an allow-listed domain.
    assert_eq!(
        d(json!({"dns.fqdn": "abuse.example", "dns.content_category": [170]})).as_deref(),
        Some("Child abuse")
    );
    // 2. The allow list beats the block list and categories.
    assert_eq!(
        d(json!({"dns.fqdn": "x.both.example", "dns.content_category": [2]})).as_deref(),
        Some("Allow list")
    );
    // 3. The block list beats SafeSearch.
    assert_eq!(
        d(json!({"dns.fqdn": "www.google.com"})).as_deref(),
        Some("Block list")
    );
    assert_eq!(
        d(json!({"dns.fqdn": "sub.bad.example"})).as_deref(),
        Some("Block list")
    );
    // 4. SafeSearch.
    let i = input(json!({"dns.fqdn": "www.bing.com"}));
    assert_eq!(
        p.stage(Stage::Dns).evaluate(&i).map(|r| &r.action),
        Some(&Action::SafeSearch)
    );
    // 5. Category block; a subcategory of a blocked parent (67 under 2) and a security threat (80 under 21).
    assert_eq!(
        d(json!({"dns.fqdn": "casino.test", "dns.content_category": [67]})).as_deref(),
        Some("Blocked categories")
    );
    assert_eq!(
        d(json!({"dns.fqdn": "phish.test", "dns.security_category": [80]})).as_deref(),
        Some("Blocked categories")
    );
    // 6. Everything else resolves normally.
    assert_eq!(
        d(json!({"dns.fqdn": "news.test", "dns.content_category": [3]})),
        None
    );
}

#[test]
fn http_off_rules_first_and_dns_post_resolution_after() {
    let mut block_all = rule("block all", 1, "http", "block", "http.request.host != \"\"");
    block_all["rule_settings"] = json!({"block_page_enabled": true, "block_reason": "no"});
    let bypass = rule(
        "bypass bank",
        5,
        "http",
        "off",
        "http.request.host == \"bank.example\"",
    );
    let p = policy(json!([block_all, bypass]), json!([]));
    assert_eq!(
        decide(
            &p,
            Stage::Http,
            json!({"http.request.host": "bank.example"})
        )
        .as_deref(),
        Some("bypass bank")
    );
    let r = p
        .stage(Stage::Http)
        .evaluate(&input(json!({"http.request.host": "other.example"})))
        .unwrap();
    assert!(
        matches!(&r.action, Action::Block(b) if b.block_page_enabled && b.reason.as_deref() == Some("no"))
    );

    let p = policy(
        json!([
            rule(
                "resolved to US",
                1,
                "dns",
                "block",
                "dns.dst.geo.country == \"US\""
            ),
            rule("rtype", 2, "dns", "block", "dns.query_rtype == \"TXT\""),
        ]),
        json!([]),
    );
    let dns = p.stage(Stage::Dns);
    assert!(dns.needs_resolution());
    let q = input(
        json!({"dns.fqdn": "a.test", "dns.query_rtype": "TXT", "dns.dst.geo.country": ["DE", "US"]}),
    );
    // The post-resolution rule has the lower precedence but runs after the answer.
    assert_eq!(
        dns.evaluate_first(&q).map(|r| r.name.as_str()),
        Some("rtype")
    );
    let q = input(
        json!({"dns.fqdn": "a.test", "dns.query_rtype": "A", "dns.dst.geo.country": ["DE", "US"]}),
    );
    assert_eq!(dns.evaluate_first(&q).map(|r| r.name.as_str()), None);
    assert_eq!(
        dns.evaluate_second(&q).map(|r| r.name.as_str()),
        Some("resolved to US")
    );
}

#[test]
fn lists_by_name_and_by_uuid_in_both_spellings() {
    let lists = json!({"result": [
        {"id": "2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a001", "name": "Corp nets", "type": "IP",
         "items": [{"value": "10.0.0.0/8"}, {"value": "2001:db8::/32"}]},
        {"id": "2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a002", "name": "vips", "type": "email",
         "items": ["ceo@example.com"]}
    ]});
    let p = policy(
        json!([
            rule(
                "dashed",
                1,
                "l4",
                "block",
                "net.dst.ip in $2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a001 and net.dst.port == 25"
            ),
            rule(
                "hex",
                2,
                "l4",
                "allow",
                "net.dst.ip in $2c9a9e8b4f1d4c479d4530f5f2c1a001"
            ),
            rule("email", 3, "l4", "allow", "identity.email in $vips"),
        ]),
        lists,
    );
    let d = |v| decide(&p, Stage::L4, v);
    assert_eq!(
        d(json!({"net.dst.ip": "10.9.9.9", "net.dst.port": 25})).as_deref(),
        Some("dashed")
    );
    assert_eq!(
        d(json!({"net.dst.ip": "2001:db8::5", "net.dst.port": 443})).as_deref(),
        Some("hex")
    );
    assert_eq!(
        d(json!({"net.dst.ip": "203.0.113.1", "identity.email": "ceo@example.com"})).as_deref(),
        Some("email")
    );
    assert_eq!(d(json!({"net.dst.ip": "203.0.113.1"})), None);
}

#[test]
fn json_round_trip_keeps_unknown_keys_and_fills_defaults() {
    let doc = json!({
        "success": true, "errors": [], "messages": [],
        "result": [{
            "id": "7f3c5a1e-9b2d-4e8f-a6c4-1d2e3f4a5b6c", "name": "r", "description": "",
            "precedence": 10, "enabled": true, "action": "block", "filters": ["dns"],
            "traffic": "dns.fqdn == \"a.test\"", "identity": "", "device_posture": "",
            "version": 3, "deleted_at": null, "schedule": null,
            "rule_settings": {"block_page_enabled": false, "block_reason": "", "override_ips": null,
                              "biso_admin_controls": {"dp": false}, "egress": null},
        }, {
            "name": "no id or precedence", "action": "allow", "filters": ["dns"],
            "traffic": "dns.fqdn == \"b.test\""
        }]
    });
    let set = RuleSet::from_json(&doc.to_string()).unwrap();
    let out = set.to_json();
    assert_eq!(out["result"][0], doc["result"][0]);
    assert_eq!(out["success"], json!(true));
    assert_eq!(out["result"][1]["precedence"], json!(11));
    let id = out["result"][1]["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    // Ids are stable across loads.
    let again = RuleSet::from_json(&doc.to_string()).unwrap().to_json();
    assert_eq!(again, out);
    // And reading the output gives the same rules.
    assert_eq!(
        RuleSet::from_json(&out.to_string()).unwrap().rules,
        set.rules
    );
}

#[test]
fn errors_name_rule_key_and_position() {
    let set = RuleSet::from_json(
        &json!([
            rule("typo", 1, "dns", "block", "dns.fqd == \"x\""),
            rule("stage", 2, "egress", "block", "net.dst.port == 1"),
            json!({"name": "no filter", "action": "allow", "traffic": "dns.fqdn == \"a\""}),
            rule("list", 4, "dns", "block", "dns.fqdn in $nope"),
        ])
        .to_string(),
    )
    .unwrap();
    let errs = Policy::compile(&set, &Lists::default()).unwrap_err();
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 4, "{text:#?}");
    assert!(
        text[0].contains(
            "traffic: line 1, column 1: unknown field \"dns.fqd\"; did you mean \"dns.fqdn\"?"
        ),
        "{}",
        text[0]
    );
    assert!(
        text[1].contains("action \"block\" is not valid for egress rules"),
        "{}",
        text[1]
    );
    assert!(text[2].contains("filters"), "{}", text[2]);
    assert!(text[3].contains("unknown list \"$nope\""), "{}", text[3]);
    let bad = RuleSet::from_json("[{\"name\": 1}]").unwrap_err();
    assert_eq!((bad.line, bad.column > 0), (1, true));
}

#[test]
fn policy_handle_swaps_atomically() {
    let handle = PolicyHandle::new(Policy::empty());
    let before = handle.load_full();
    let p = policy(
        json!([rule("r", 1, "l4", "block", "net.dst.port == 1")]),
        json!([]),
    );
    handle.replace(p);
    assert_eq!(before.stage(Stage::L4).rules().len(), 0);
    assert_eq!(handle.load().stage(Stage::L4).rules().len(), 1);
    let mut i = Input::new();
    i.set_int(FieldId::NetDstPort, 1);
    assert!(handle.load().stage(Stage::L4).evaluate(&i).is_some());
}

#[test]
fn policies_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
    send_sync::<PolicyHandle>();
}

#[test]
fn unsupported_actions_and_resolver_policies_load_with_warnings() {
    let set = RuleSet::from_json(
        &json!([
            rule(
                "isolate",
                1,
                "http",
                "isolate",
                "http.request.host == \"a.test\""
            ),
            rule(
                "resolver",
                2,
                "dns_resolver",
                "resolve",
                "dns.fqdn == \"a.test\""
            ),
            rule("ssh", 3, "l4", "audit_ssh", "net.dst.port == 22"),
            rule(
                "allow",
                4,
                "http",
                "allow",
                "http.request.host == \"a.test\""
            ),
        ])
        .to_string(),
    )
    .unwrap();
    let p = Policy::compile(&set, &Lists::default()).expect("loads");
    assert_eq!(p.warnings().len(), 3, "{:?}", p.warnings());
    assert_eq!(
        decide(&p, Stage::Http, json!({"http.request.host": "a.test"})).as_deref(),
        Some("allow")
    );
    assert_eq!(decide(&p, Stage::L4, json!({"net.dst.port": 22})), None);
    // The rules stay in the document.
    assert_eq!(set.to_json().as_array().map(Vec::len), Some(4));
}

#[test]
fn bad_ip_list_items_are_refused_with_their_position() {
    let text =
        "[{\"name\": \"nets\", \"type\": \"IP\",\n  \"items\": [\"10.0.0.0/8\", \"10.0.0.300\"]}]";
    let err = Lists::from_json(text).unwrap_err();
    assert_eq!((err.line, err.column), (2, 27), "{err}");
    assert!(
        err.to_string()
            .contains("\"10.0.0.300\" is not an address or CIDR"),
        "{err}"
    );
}

#[test]
fn compiled_rules_know_the_categories_they_test() {
    let p = policy(
        json!([
            rule(
                "gambling",
                1,
                "dns",
                "block",
                "any(dns.content_category[*] in {8 122})"
            ),
            rule(
                "threats",
                2,
                "dns",
                "block",
                "any(dns.security_category[*] == 80) or dns.fqdn == \"x.example\""
            ),
            rule(
                "range",
                3,
                "dns",
                "block",
                "any(dns.content_category[*] in {140..142})"
            ),
            rule("names", 4, "dns", "block", "dns.fqdn == \"y.example\""),
        ]),
        json!([]),
    );
    let by_name = |name: &str| {
        p.stage(Stage::Dns)
            .rules()
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name}"))
            .categories
            .clone()
    };
    // A parent names its subcategories too (8 Gambling: 99).
    assert_eq!(by_name("gambling"), [8, 99, 122]);
    assert_eq!(by_name("threats"), [80]);
    assert_eq!(by_name("range"), [140, 141, 142]);
    assert!(by_name("names").is_empty());
}
