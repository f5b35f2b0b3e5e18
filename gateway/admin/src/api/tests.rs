use super::*;
use rand::SeedableRng;

fn api_with(config: Config) -> (tempfile::TempDir, Api) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..config
    };
    let registry = Registry::open(dir.path(), &config.tunnel).unwrap();
    let status: StatusSource = Arc::new(|| GatewayStatus {
        peers: 2,
        tcp_flows: 3,
        udp_flows: 4,
        rules_loaded: 5,
    });
    (dir, Api::new(config, registry, status, || 1_795_000_000))
}

fn api() -> (tempfile::TempDir, Api) {
    api_with(Config::default())
}

fn call(api: &Api, method: &str, path: &str, body: &str) -> Answer {
    api.handle(method, path, &Caller::Socket, body.as_bytes())
}

/// Every answer has the four keys of the contract, and `success` agrees with the status.
fn assert_envelope(a: &Answer) {
    let obj = a.body.as_object().expect("an object");
    for key in ["success", "errors", "messages", "result"] {
        assert!(obj.contains_key(key), "{key} missing from {}", a.body);
    }
    assert_eq!(a.body["success"], a.status < 400, "{}", a.body);
    assert!(a.body["errors"].is_array() && a.body["messages"].is_array());
    if a.status >= 400 {
        let e = &a.body["errors"][0];
        assert!(e["code"].is_u64() && e["message"].is_string(), "{}", a.body);
    }
}

const RULE: &str = r#"{"name": "block games", "action": "block", "filters": ["dns"],
    "traffic": "dns.fqdn == \"games.example\"", "enabled": true, "precedence": 5}"#;

#[test]
fn rules_round_trip_in_envelopes() {
    let (_dir, api) = api();
    let a = call(&api, "GET", "/gateway/rules", "");
    assert_envelope(&a);
    assert_eq!(a.body["result"], json!([]));
    assert_eq!(a.body["result_info"]["count"], 0);
    let created = call(&api, "POST", "/gateway/rules", RULE);
    assert_envelope(&created);
    assert_eq!(created.status, 200);
    let id = created.body["result"]["id"].as_str().unwrap().to_string();
    assert_eq!(created.body["result"]["version"], 1);
    let got = call(&api, "GET", &format!("/gateway/rules/{id}"), "");
    assert_eq!(got.body["result"], created.body["result"]);
    let list = call(&api, "GET", "/gateway/rules", "");
    assert_eq!(list.body["result"][0]["id"], json!(id));
    let del = call(&api, "DELETE", &format!("/gateway/rules/{id}"), "");
    assert_envelope(&del);
    assert_eq!(del.body["result"]["id"], json!(id));
    let gone = call(&api, "GET", &format!("/gateway/rules/{id}"), "");
    assert_envelope(&gone);
    assert_eq!(gone.status, 404);
}

#[test]
fn a_bad_expression_is_400_with_field_line_and_column() {
    let (_dir, api) = api();
    let body = r#"{"name": "bad", "action": "block", "filters": ["dns"],
        "traffic": "dns.fqdn == \"a.example\" or\ndns.fqdn =="}"#;
    let a = call(&api, "POST", "/gateway/rules", body);
    assert_envelope(&a);
    assert_eq!(a.status, 400);
    let e = &a.body["errors"][0];
    assert_eq!(e["code"], codes::INVALID);
    assert_eq!(e["field"], "traffic");
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(2), Some(12)),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("traffic: line 2, column 12: "),
        "{e}"
    );
    let bad_json = call(&api, "POST", "/gateway/rules", "{\"name\": ");
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.body["errors"][0]["field"], "body");
    assert_eq!(
        call(&api, "GET", "/gateway/rules", "").body["result"],
        json!([])
    );
}

#[test]
fn file_managed_rules_refuse_writes_with_409_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.json");
    std::fs::write(&path, format!("[{RULE}]")).unwrap();
    let mut config = Config::default();
    config.policy.rules = Some(path.clone());
    let (_data, api) = api_with(config);
    let list = call(&api, "GET", "/gateway/rules", "");
    assert_eq!(list.body["result"].as_array().unwrap().len(), 1);
    for (method, path_) in [
        ("POST", "/gateway/rules".to_string()),
        (
            "DELETE",
            format!(
                "/gateway/rules/{}",
                list.body["result"][0]["id"].as_str().unwrap()
            ),
        ),
        ("POST", "/gateway/lists".to_string()),
    ] {
        let a = call(&api, method, &path_, RULE);
        assert_envelope(&a);
        assert_eq!(a.status, 409, "{method} {path_}: {}", a.body);
        let message = a.body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
}

#[test]
fn lists_patch_appends_and_removes() {
    let (_dir, api) = api();
    let created = call(
        &api,
        "POST",
        "/gateway/lists",
        r#"{"name": "blocked", "type": "DOMAIN", "items": [{"value": "a.example"}, {"value": "b.example"}]}"#,
    );
    assert_envelope(&created);
    let id = created.body["result"]["id"].as_str().unwrap().to_string();
    let patched = call(
        &api,
        "PATCH",
        &format!("/gateway/lists/{id}"),
        r#"{"append": [{"value": "c.example", "description": "new"}], "remove": ["a.example"]}"#,
    );
    assert_envelope(&patched);
    assert_eq!(patched.body["result"]["count"], 2);
    let items = call(&api, "GET", &format!("/gateway/lists/{id}/items"), "");
    assert_eq!(items.body["result"][1]["value"], "c.example");
    assert_eq!(items.body["result"][1]["description"], "new");
    let lists = call(&api, "GET", "/gateway/lists", "");
    assert_eq!(lists.body["result"][0]["count"], 2);
    let bad = call(
        &api,
        "PATCH",
        &format!("/gateway/lists/{id}"),
        r#"{"append": [{"value": ""}]}"#,
    );
    assert_eq!(
        (bad.status, bad.body["errors"][0]["field"].as_str()),
        (400, Some("append[0].value"))
    );
}

#[test]
fn tokens_are_scoped_on_the_tls_side() {
    let (_dir, api) = api();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let registry = api.registry.lock().unwrap();
    let (read, _) = tokens::create(&registry, Some("ro"), TokenScope::Read, &mut rng, 1).unwrap();
    let (write, _) = tokens::create(&registry, Some("rw"), TokenScope::Write, &mut rng, 1).unwrap();
    drop(registry);
    let bearer = |t: &str| Caller::Bearer(Some(format!("Bearer {t}")));
    let no_token = api.handle("GET", "/devices", &Caller::Bearer(None), b"");
    assert_envelope(&no_token);
    assert_eq!(no_token.status, 401);
    assert_eq!(
        api.handle("GET", "/devices", &bearer("wgt_wrong"), b"")
            .status,
        401
    );
    assert_eq!(
        api.handle("GET", "/devices", &bearer(&read), b"").status,
        200
    );
    let lower = Caller::Bearer(Some(format!("bearer {read}")));
    assert_eq!(api.handle("GET", "/devices", &lower, b"").status, 200);
    let basic = Caller::Bearer(Some(format!("Basic {read}")));
    assert_eq!(api.handle("GET", "/devices", &basic, b"").status, 401);
    let denied = api.handle("POST", "/gateway/rules", &bearer(&read), RULE.as_bytes());
    assert_envelope(&denied);
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body["errors"][0]["code"], codes::FORBIDDEN);
    assert_eq!(
        api.handle("POST", "/gateway/rules", &bearer(&write), RULE.as_bytes())
            .status,
        200
    );
    // The socket needs no token.
    assert_eq!(call(&api, "GET", "/gateway/rules", "").status, 200);
}

#[test]
fn devices_groups_vnets_and_status() {
    let (_dir, mut api) = api();
    api.config.wireguard.public_endpoint = Some("198.51.100.1:51820".into());
    let enrolled = call(
        &api,
        "POST",
        "/devices",
        r#"{"email": "ada@example.com", "groups": ["eng"]}"#,
    );
    assert_envelope(&enrolled);
    assert!(enrolled.body["result"]["wg_quick"]
        .as_str()
        .unwrap()
        .contains("[Peer]"));
    let key = enrolled.body["result"]["device"]["public_key"]
        .as_str()
        .unwrap();
    let by_key = call(
        &api,
        "GET",
        &format!("/devices/{}", crate::client::percent_encode(key)),
        "",
    );
    assert_eq!(by_key.body["result"]["name"], "ada");
    let users = call(&api, "GET", "/users", "");
    assert_eq!(users.body["result"][0]["email"], "ada@example.com");
    // The id the activity logs show as UserID.
    assert_eq!(
        users.body["result"][0]["id"],
        waygate_model::user_id("ada@example.com")
    );
    assert_eq!(
        call(&api, "POST", "/groups", r#"{"name": "eng"}"#).status,
        200
    );
    assert_eq!(
        call(&api, "POST", "/groups", r#"{"name": "eng"}"#).status,
        409
    );
    assert_eq!(
        call(
            &api,
            "POST",
            "/virtual_networks",
            r#"{"name": "site", "routes": ["198.18.0.0/16=eth9"]}"#
        )
        .status,
        200
    );
    assert_eq!(
        call(&api, "PUT", "/devices/ada/vnet", r#"{"vnet": "site"}"#).status,
        200
    );
    assert_eq!(
        call(&api, "DELETE", "/virtual_networks/site", "").status,
        409
    );
    assert_eq!(
        call(&api, "DELETE", "/devices/ada", "").body["result"]["revoked_at"],
        1_795_000_000
    );
    assert_eq!(call(&api, "DELETE", "/devices/ada", "").status, 409);
    assert_eq!(
        call(&api, "POST", "/devices", r#"{"email": "nope"}"#).status,
        400
    );
    assert_eq!(
        call(&api, "POST", "/devices", r#"{"colour": 1}"#).status,
        400
    );
    // A struct is never filled from an array by position.
    assert_eq!(call(&api, "POST", "/groups", r#"["eng2"]"#).status, 400);
    assert_eq!(call(&api, "PUT", "/gateway/lists/x", "[]").status, 404);
    let status = call(&api, "GET", "/status", "");
    assert_envelope(&status);
    assert_eq!(status.body["result"]["peers"], 2);
    assert_eq!(status.body["result"]["flows"]["total"], 7);
    assert_eq!(status.body["result"]["rules_loaded"], 5);
    assert!(status.body["result"]["version"].is_string());
    let missing = call(&api, "GET", "/nowhere", "");
    assert_envelope(&missing);
    assert_eq!(missing.status, 404);
    let method = call(&api, "PATCH", "/devices", "");
    assert_envelope(&method);
    assert_eq!(method.status, 405);
    assert_eq!(method.allow, Some("GET, POST"));
}

/// The OpenAPI document parses, and each of its operations is routed (none answers 404 for a
/// missing route or 405), GETs without parameters answering 200 in the envelope.
#[test]
fn the_openapi_document_matches_the_routes() {
    let doc: Json = serde_json::from_str(OPENAPI).expect("openapi.json parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let (_dir, api) = api();
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 10, "{} paths", paths.len());
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            if method == "parameters" {
                continue;
            }
            let concrete = path
                .split('/')
                .map(|s| if s.starts_with('{') { "x" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let m = method.to_uppercase();
            let a = call(&api, &m, &concrete, "{}");
            assert_ne!(a.status, 405, "{m} {path} is documented but not routed");
            if path != "/openapi.json" {
                assert_envelope(&a);
                let error = a.body["errors"][0]["message"].as_str().unwrap_or("");
                assert!(!error.starts_with("no such path"), "{m} {path}: {error}");
            }
            if m == "GET" && !path.contains('{') {
                assert_eq!(a.status, 200, "{m} {path}: {}", a.body);
            }
        }
    }
}

#[test]
fn posture_rules_at_cloudflares_paths() {
    let (_dir, api) = api();
    let body = r#"{"id": "0b6f7f52-8f2f-4f61-9a8e-2f2c7a1d5e40", "name": "agent config",
        "type": "file", "schedule": "1m", "match": [{"platform": "linux"}],
        "input": {"path": "/etc/agent.conf", "exists": true}}"#;
    let made = call(&api, "POST", "/devices/posture", body);
    assert_envelope(&made);
    assert_eq!(made.status, 200, "{}", made.body);
    assert_eq!(
        made.body["result"]["id"],
        "0b6f7f52-8f2f-4f61-9a8e-2f2c7a1d5e40"
    );
    let list = call(&api, "GET", "/devices/posture", "");
    assert_eq!(list.body["result"], json!([made.body["result"].clone()]));
    let path = "/devices/posture/0b6f7f52-8f2f-4f61-9a8e-2f2c7a1d5e40";
    assert_eq!(
        call(&api, "GET", path, "").body["result"],
        made.body["result"]
    );
    let bad = call(
        &api,
        "PUT",
        path,
        r#"{"name": "x", "type": "file", "input": {"path": "x"}}"#,
    );
    assert_envelope(&bad);
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["errors"][0]["field"], "input.path");
    let unknown = call(
        &api,
        "POST",
        "/devices/posture",
        r#"{"name": "x", "type": "warp", "input": {}}"#,
    );
    assert_eq!(
        (unknown.status, unknown.body["errors"][0]["field"].as_str()),
        (400, Some("type"))
    );
    let not_allowed = call(&api, "PATCH", path, "{}");
    assert_eq!(
        (not_allowed.status, not_allowed.allow),
        (405, Some("GET, PUT, DELETE"))
    );
    let gone = call(&api, "DELETE", path, "");
    assert_eq!(
        gone.body["result"]["id"],
        "0b6f7f52-8f2f-4f61-9a8e-2f2c7a1d5e40"
    );
    assert_eq!(call(&api, "GET", path, "").status, 404);
    // DELETE /devices/posture is not a revocation of a device called "posture".
    assert_eq!(call(&api, "DELETE", "/devices/posture", "").status, 405);
}

#[test]
fn a_devices_posture_results_are_read_with_their_reasons() {
    let (_dir, api) = api();
    let enrolled = call(
        &api,
        "POST",
        "/devices",
        r#"{"email": "ada@example.com", "name": "ada"}"#,
    );
    assert_eq!(enrolled.status, 200, "{}", enrolled.body);
    let set = call(
        &api,
        "PUT",
        "/devices/ada/posture",
        r#"{"passed": ["disk"], "failed": []}"#,
    );
    assert_eq!(set.status, 200, "{}", set.body);
    let got = call(&api, "GET", "/devices/ada/posture", "");
    assert_envelope(&got);
    assert_eq!(got.body["result"][0]["check_id"], "disk");
    assert_eq!(got.body["result"][0]["passed"], true);
    assert!(
        got.body["result"][0]["expires_at"].is_null(),
        "typed in: never expires"
    );
    assert_eq!(call(&api, "GET", "/devices/nobody/posture", "").status, 404);
    let not_allowed = call(&api, "DELETE", "/devices/ada/posture", "");
    assert_eq!(not_allowed.allow, Some("GET, PUT"));
}
