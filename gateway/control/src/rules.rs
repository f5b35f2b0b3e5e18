//! Gateway rules as the admin API serves them (Cloudflare's rule object), and where they come
//! from: the file `policy.rules` names when the config names one (it wins; the API may read the
//! rules but not change them), else the registry, where the API creates, replaces and deletes
//! them. A rule is checked by the policy crate before it is stored (errors name the key and,
//! inside an expression, its line and column) and stored with its expressions in canonical form,
//! so what the API returns is what the gateway runs and a client comparing them sees no drift.

use std::path::Path;

use serde_json::{Map, Value as Json};
use waygate_config::Config;
use waygate_policy::fields::Stage;
use waygate_policy::ruleset::{Lists, Opt, Policy, Rule, RuleError, RuleSet};
use waygate_policy::typecheck;
use waygate_registry::{Registry, StoredRule};

use crate::time::rfc3339;
use crate::ControlError;

/// Keys the server sets; a body may carry them (a rule read back and sent again) but they are
/// ignored.
const READ_ONLY: [&str; 4] = ["id", "created_at", "updated_at", "version"];
/// Keys a new or replaced rule must have.
const REQUIRED: [&str; 3] = ["action", "filters", "name"];
/// Keys holding expressions, in the order they are checked.
const EXPRESSIONS: [&str; 3] = ["traffic", "identity", "device_posture"];

/// The rules file, when the config names one (then it owns the rules and the lists).
pub fn rules_file(config: &Config) -> Option<&Path> {
    config.policy.rules.as_deref()
}

fn refuse_if_file_managed(config: &Config) -> Result<(), ControlError> {
    match rules_file(config) {
        Some(path) => Err(ControlError::FileManaged {
            what: "rules",
            key: "policy.rules",
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// The rules of the file `path`, ids and precedences filled in as the gateway fills them.
fn file_rules(path: &Path) -> Result<RuleSet, ControlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ControlError::Source(format!("cannot read {}: {e}", path.display())))?;
    RuleSet::from_json(&text).map_err(|e| ControlError::Source(format!("{}: {e}", path.display())))
}

/// A stored rule's object, read-only keys added.
fn stored_json(stored: &StoredRule) -> Result<Json, ControlError> {
    let mut map: Map<String, Json> = serde_json::from_str(&stored.body).map_err(|e| {
        ControlError::Source(format!("registry rule {}: stored body: {e}", stored.id))
    })?;
    map.insert("id".into(), Json::String(stored.id.clone()));
    map.insert("created_at".into(), rfc3339(stored.created_at).into());
    map.insert("updated_at".into(), rfc3339(stored.updated_at).into());
    map.insert("version".into(), stored.version.into());
    Ok(Json::Object(map))
}

/// A stored rule as the policy crate reads it.
fn stored_rule(stored: &StoredRule) -> Result<Rule, ControlError> {
    let mut rule: Rule = serde_json::from_str(&stored.body).map_err(|e| {
        ControlError::Source(format!("registry rule {}: stored body: {e}", stored.id))
    })?;
    rule.id = Opt::Some(stored.id.clone());
    Ok(rule)
}

/// Every rule (by precedence for the registry's, in file order for a file's).
pub fn list(config: &Config, registry: &Registry) -> Result<Vec<Json>, ControlError> {
    if let Some(path) = rules_file(config) {
        return file_rules(path)?
            .rules
            .iter()
            .map(|r| serde_json::to_value(r).map_err(|e| ControlError::Source(e.to_string())))
            .collect();
    }
    registry.rules()?.iter().map(stored_json).collect()
}

/// The rule with this id.
pub fn get(config: &Config, registry: &Registry, id: &str) -> Result<Json, ControlError> {
    if let Some(path) = rules_file(config) {
        let set = file_rules(path)?;
        let rule = set
            .rules
            .iter()
            .find(|r| r.id.get().is_some_and(|i| i == id))
            .ok_or_else(|| waygate_registry::RegistryError::RuleNotFound(id.to_string()))?;
        return serde_json::to_value(rule).map_err(|e| ControlError::Source(e.to_string()));
    }
    stored_json(&registry.rule(id)?)
}

/// Creates a rule from a request body; returns it as stored.
pub fn create(
    config: &Config,
    registry: &Registry,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    let map = parse_body(body)?;
    let id = match map.get("id") {
        Some(Json::String(id)) if !id.trim().is_empty() => waygate_registry::validate::label_ok(id)
            .then(|| id.clone())
            .ok_or_else(|| ControlError::invalid("id", "expected 1 to 128 characters"))?,
        _ => waygate_registry::new_id(),
    };
    let (rule, precedence) = checked(config, registry, map, None)?;
    let stored = registry.insert_rule(&id, &body_text(&rule)?, precedence, now)?;
    stored_json(&stored)
}

/// Replaces the rule `id` with a request body (the whole object, as Cloudflare's PUT).
pub fn update(
    config: &Config,
    registry: &Registry,
    id: &str,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    registry.rule(id)?;
    let map = parse_body(body)?;
    let (rule, precedence) = checked(config, registry, map, Some(id))?;
    let stored = registry.update_rule(id, &body_text(&rule)?, precedence, now)?;
    stored_json(&stored)
}

/// Deletes the rule `id`; returns `{"id": ...}` as Cloudflare does.
pub fn delete(config: &Config, registry: &Registry, id: &str) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    let gone = registry.delete_rule(id)?;
    Ok(serde_json::json!({ "id": gone.id }))
}

/// The registry's rules and the lists they may name (the `policy.lists` file's when the config
/// names one, else the registry's), for the gateway to compile.
pub fn registry_policy(
    config: &Config,
    registry: &Registry,
) -> Result<(RuleSet, Lists), ControlError> {
    let rules = registry
        .rules()?
        .iter()
        .map(stored_rule)
        .collect::<Result<Vec<_>, _>>()?;
    let lists = crate::lists::policy_lists(config, registry)?;
    Ok((
        RuleSet {
            rules,
            envelope: None,
        },
        lists,
    ))
}

/// The body as a JSON object, with what is wrong in it named by field.
fn parse_body(body: &[u8]) -> Result<Map<String, Json>, ControlError> {
    match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(map)) => Ok(map),
        Ok(_) => Err(ControlError::invalid("body", "expected a JSON object")),
        Err(e) => Err(json_error("body", &e)),
    }
}

/// A serde_json error as an invalid field with the body's line and column.
pub(crate) fn json_error(field: &str, e: &serde_json::Error) -> ControlError {
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    };
    ControlError::Invalid {
        field: field.into(),
        message: format!("invalid JSON: {message}"),
        line: u32::try_from(e.line()).ok().filter(|l| *l > 0),
        column: u32::try_from(e.column()).ok().filter(|c| *c > 0),
    }
}

/// Checks the keys' types and presence, compiles the rule alone (with the lists it may name)
/// and returns it with canonical expressions, and its precedence.
fn checked(
    config: &Config,
    registry: &Registry,
    mut map: Map<String, Json>,
    replacing: Option<&str>,
) -> Result<(Rule, i64), ControlError> {
    for key in READ_ONLY {
        map.remove(key);
    }
    for key in REQUIRED {
        if map.get(key).is_none_or(Json::is_null) {
            return Err(ControlError::invalid(key, "required"));
        }
    }
    for (key, value) in &map {
        let ok = match key.as_str() {
            "name" | "description" | "action" | "traffic" | "identity" | "device_posture" => {
                value.is_string() || value.is_null()
            }
            "precedence" => value.is_i64() || value.is_null(),
            "enabled" => value.is_boolean() || value.is_null(),
            "filters" => value
                .as_array()
                .is_some_and(|a| a.iter().all(Json::is_string)),
            "rule_settings" => value.is_object() || value.is_null(),
            _ => true,
        };
        if !ok {
            let expected = match key.as_str() {
                "precedence" => "an integer",
                "enabled" => "true or false",
                "filters" => "an array of strings, e.g. [\"dns\"]",
                "rule_settings" => "an object",
                _ => "a string",
            };
            return Err(ControlError::invalid(
                key.clone(),
                format!("expected {expected}, got {}", type_name(value)),
            ));
        }
    }
    if map.get("enabled").is_none_or(Json::is_null) {
        map.insert("enabled".into(), Json::Bool(true));
    }
    let precedence = match map.get("precedence").and_then(Json::as_i64) {
        Some(p) => p,
        None => {
            // After every other rule, as Cloudflare places a rule created without one.
            let max = registry
                .rules()?
                .iter()
                .filter(|r| Some(r.id.as_str()) != replacing)
                .map(|r| r.precedence)
                .max()
                .unwrap_or(0);
            let p = max.saturating_add(1);
            map.insert("precedence".into(), p.into());
            p
        }
    };
    let mut rule: Rule = serde_json::from_value(Json::Object(map))
        .map_err(|e| ControlError::invalid("body", e.to_string()))?;
    rule.id = Opt::Some(replacing.map_or_else(String::new, str::to_string));
    let lists = crate::lists::policy_lists(config, registry)?;
    let set = RuleSet {
        rules: vec![rule.clone()],
        envelope: None,
    };
    let report = Policy::check(&set, Some(&lists));
    if let Some(e) = report.errors.first() {
        return Err(rule_error(e));
    }
    canonicalize(&mut rule);
    rule.id = Opt::Absent;
    Ok((rule, precedence))
}

/// A policy error as an invalid field, with the position inside the expression.
fn rule_error(e: &RuleError) -> ControlError {
    ControlError::Invalid {
        field: e.key.to_string(),
        message: e.message.clone(),
        line: e.pos.map(|p| p.line),
        column: e.pos.map(|p| p.column),
    }
}

/// Rewrites the rule's expressions in canonical form (the rule compiled, so they parse).
fn canonicalize(rule: &mut Rule) {
    let Some(stage) = rule
        .filters
        .get()
        .and_then(|f| f.first())
        .and_then(|f| Stage::parse(f))
    else {
        return;
    };
    for key in EXPRESSIONS {
        let slot = match key {
            "traffic" => &mut rule.traffic,
            "identity" => &mut rule.identity,
            _ => &mut rule.device_posture,
        };
        if let Opt::Some(text) = slot {
            if text.trim().is_empty() {
                continue;
            }
            if let Ok((expr, _)) = typecheck::parse_checked(text, stage) {
                *text = expr.to_string();
            }
        }
    }
}

fn body_text(rule: &Rule) -> Result<String, ControlError> {
    serde_json::to_string(rule).map_err(|e| ControlError::Source(e.to_string()))
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Config, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let registry = Registry::open(dir.path(), &config.tunnel).unwrap();
        (dir, config, registry)
    }

    const RULE: &str = r#"{"name": "No games", "action": "block", "filters": ["dns"],
        "traffic": "any(dns.domains[*] in {\"games.example\"}) and dns.fqdn eq \"x.example\"",
        "precedence": 10, "enabled": true, "rule_settings": {"block_page_enabled": false}}"#;

    #[test]
    fn a_created_rule_comes_back_canonical_with_read_only_keys() {
        let (_dir, config, reg) = setup();
        let rule = create(&config, &reg, RULE.as_bytes(), 1_795_000_000).unwrap();
        assert_eq!(rule["name"], "No games");
        assert_eq!(rule["version"], 1);
        assert_eq!(rule["created_at"], "2026-11-18T11:06:40Z");
        assert_eq!(
            rule["traffic"],
            "any(dns.domains[*] in {\"games.example\"}) and dns.fqdn == \"x.example\""
        );
        let id = rule["id"].as_str().unwrap().to_string();
        assert_eq!(get(&config, &reg, &id).unwrap(), rule);
        // Sent back as read (with its read-only keys), it is accepted and its version grows.
        let again = serde_json::to_vec(&rule).unwrap();
        let updated = update(&config, &reg, &id, &again, 1_795_000_100).unwrap();
        assert_eq!(updated["version"], 2);
        assert_eq!(updated["traffic"], rule["traffic"]);
        let (set, _) = registry_policy(&config, &reg).unwrap();
        assert_eq!(set.rules.len(), 1);
        assert_eq!(set.rules[0].id.get(), Some(&id));
        assert_eq!(list(&config, &reg).unwrap().len(), 1);
        delete(&config, &reg, &id).unwrap();
        assert!(list(&config, &reg).unwrap().is_empty());
    }

    #[test]
    fn expression_errors_carry_the_field_line_and_column() {
        let (_dir, config, reg) = setup();
        let body = r#"{"name": "bad", "action": "block", "filters": ["dns"],
            "traffic": "dns.fqdn == \"a.example\" and\n  dns.nope == 1"}"#;
        match create(&config, &reg, body.as_bytes(), 1) {
            Err(ControlError::Invalid {
                field,
                line,
                column,
                message,
            }) => {
                assert_eq!(field, "traffic");
                assert_eq!((line, column), (Some(2), Some(3)), "{message}");
                assert!(message.contains("dns.nope"), "{message}");
            }
            other => panic!("expected an invalid traffic, got {other:?}"),
        }
        assert!(reg.rules().unwrap().is_empty(), "nothing stored");
    }

    #[test]
    fn missing_keys_wrong_types_and_bad_json_name_their_field() {
        let (_dir, config, reg) = setup();
        let field = |body: &str| match create(&config, &reg, body.as_bytes(), 1) {
            Err(ControlError::Invalid { field, .. }) => field,
            other => panic!("{body}: expected invalid, got {other:?}"),
        };
        assert_eq!(field(r#"{"action": "block", "filters": ["dns"]}"#), "name");
        assert_eq!(
            field(r#"{"name": "a", "action": "block", "filters": "dns"}"#),
            "filters"
        );
        assert_eq!(
            field(r#"{"name": "a", "action": "block", "filters": ["dns"], "precedence": "1"}"#),
            "precedence"
        );
        assert_eq!(
            field(r#"{"name": "a", "action": "nope", "filters": ["dns"]}"#),
            "action"
        );
        assert_eq!(field("[1, 2]"), "body");
        match create(&config, &reg, b"{\"name\": \n  tru", 1) {
            Err(ControlError::Invalid { field, line, .. }) => {
                assert_eq!((field.as_str(), line), ("body", Some(2)));
            }
            other => panic!("expected invalid JSON, got {other:?}"),
        }
    }

    #[test]
    fn file_managed_rules_are_read_only() {
        let (dir, mut config, reg) = setup();
        let path = dir.path().join("rules.json");
        std::fs::write(&path, format!("[{RULE}]")).unwrap();
        config.policy.rules = Some(path.clone());
        let rules = list(&config, &reg).unwrap();
        assert_eq!(rules.len(), 1);
        let id = rules[0]["id"].as_str().unwrap();
        assert_eq!(get(&config, &reg, id).unwrap()["name"], "No games");
        let err = create(&config, &reg, RULE.as_bytes(), 1).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Conflict);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(delete(&config, &reg, id).is_err());
        assert!(update(&config, &reg, id, RULE.as_bytes(), 1).is_err());
    }

    #[test]
    fn precedence_defaults_after_the_others() {
        let (_dir, config, reg) = setup();
        create(&config, &reg, RULE.as_bytes(), 1).unwrap();
        let body = r#"{"name": "b", "action": "allow", "filters": ["dns"], "traffic": ""}"#;
        let b = create(&config, &reg, body.as_bytes(), 2).unwrap();
        assert_eq!(b["precedence"], 11);
        assert_eq!(b["enabled"], true);
    }
}
