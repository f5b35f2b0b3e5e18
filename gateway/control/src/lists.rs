//! Gateway lists as the admin API serves them (Cloudflare's list object: `id, name, description,
//! type, count, created_at, updated_at`, items `{value, description, created_at}`), and where
//! they come from: the `policy.lists` file when the config names one, or none at all when only
//! `policy.rules` is named (the rules file then owns the lists too); else the registry, where the
//! API creates, replaces, patches (`append`/`remove`) and deletes them. A change that would leave
//! a stored rule naming a list that is gone is refused.

use serde::Deserialize;
use serde_json::{Map, Value as Json};
use waygate_config::Config;
use waygate_policy::ruleset::{List, ListType, Lists, Policy, RuleSet};
use waygate_registry::{NewListItem, Registry, RegistryError, StoredList};

use crate::rules::json_error;
use crate::time::rfc3339;
use crate::ControlError;

/// The file owning the lists and the config key naming it, when the API may not change them.
fn file_owner(config: &Config) -> Option<(&'static str, &std::path::Path)> {
    match (&config.policy.lists, &config.policy.rules) {
        (Some(lists), _) => Some(("policy.lists", lists)),
        (None, Some(rules)) => Some(("policy.rules", rules)),
        (None, None) => None,
    }
}

fn refuse_if_file_managed(config: &Config) -> Result<(), ControlError> {
    match file_owner(config) {
        Some((key, path)) => Err(ControlError::FileManaged {
            what: "lists",
            key,
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

fn kind_of(text: &str) -> Option<ListType> {
    serde_json::from_value(Json::String(text.to_ascii_uppercase())).ok()
}

/// A stored list as the policy crate reads it.
fn policy_list(stored: &StoredList) -> Result<List, ControlError> {
    Ok(List {
        id: stored.id.clone(),
        name: stored.name.clone(),
        kind: kind_of(&stored.kind).ok_or_else(|| {
            ControlError::Source(format!(
                "registry list {}: unknown type {:?}",
                stored.id, stored.kind
            ))
        })?,
        items: stored.items.iter().map(|i| i.value.clone()).collect(),
    })
}

/// The lists of the files, when files own them: the `policy.lists` file's, or none beside a
/// rules file; `None` when the registry holds them.
fn file_owned(config: &Config) -> Result<Option<Lists>, ControlError> {
    if let Some(path) = &config.policy.lists {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ControlError::Source(format!("cannot read {}: {e}", path.display())))?;
        return Lists::from_json(&text)
            .map(Some)
            .map_err(|e| ControlError::Source(format!("{}: {e}", path.display())));
    }
    Ok(config.policy.rules.is_some().then(Lists::default))
}

/// The lists rules may name: the `policy.lists` file's, none beside a rules file, else the
/// registry's.
pub fn policy_lists(config: &Config, registry: &Registry) -> Result<Lists, ControlError> {
    if let Some(lists) = file_owned(config)? {
        return Ok(lists);
    }
    let lists = registry
        .lists()?
        .iter()
        .map(policy_list)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Lists::new(lists))
}

/// A list's object; with its items when `items` is set.
fn list_json(l: &StoredList, items: bool) -> Json {
    let mut map = Map::new();
    map.insert("id".into(), l.id.clone().into());
    map.insert("name".into(), l.name.clone().into());
    map.insert(
        "description".into(),
        l.description.clone().map_or(Json::Null, Json::String),
    );
    map.insert("type".into(), l.kind.clone().into());
    map.insert("count".into(), l.items.len().into());
    if l.created_at != 0 || l.updated_at != 0 {
        map.insert("created_at".into(), rfc3339(l.created_at).into());
        map.insert("updated_at".into(), rfc3339(l.updated_at).into());
    }
    if items {
        map.insert("items".into(), items_json(l));
    }
    Json::Object(map)
}

fn items_json(l: &StoredList) -> Json {
    Json::Array(
        l.items
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("value".into(), i.value.clone().into());
                m.insert(
                    "description".into(),
                    i.description.clone().map_or(Json::Null, Json::String),
                );
                if i.created_at != 0 {
                    m.insert("created_at".into(), rfc3339(i.created_at).into());
                }
                Json::Object(m)
            })
            .collect(),
    )
}

/// The lists of a file, shaped as stored ones (no times).
fn file_lists(config: &Config) -> Result<Vec<StoredList>, ControlError> {
    Ok(file_owned(config)?
        .unwrap_or_default()
        .iter()
        .map(|l| StoredList {
            id: l.id.clone(),
            name: l.name.clone(),
            kind: l.kind.as_str().to_string(),
            description: None,
            items: l
                .items
                .iter()
                .map(|v| waygate_registry::StoredListItem {
                    value: v.clone(),
                    description: None,
                    created_at: 0,
                })
                .collect(),
            created_at: 0,
            updated_at: 0,
        })
        .collect())
}

pub(crate) fn all(config: &Config, registry: &Registry) -> Result<Vec<StoredList>, ControlError> {
    if file_owner(config).is_some() {
        return file_lists(config);
    }
    Ok(registry.lists()?)
}

fn find(config: &Config, registry: &Registry, id: &str) -> Result<StoredList, ControlError> {
    all(config, registry)?
        .into_iter()
        .find(|l| l.id == id || l.name == id)
        .ok_or_else(|| RegistryError::ListNotFound(id.to_string()).into())
}

/// Every list, without items (as Cloudflare lists them).
pub fn list(config: &Config, registry: &Registry) -> Result<Vec<Json>, ControlError> {
    Ok(all(config, registry)?
        .iter()
        .map(|l| list_json(l, false))
        .collect())
}

/// One list (by id or name), with its items.
pub fn get(config: &Config, registry: &Registry, id: &str) -> Result<Json, ControlError> {
    Ok(list_json(&find(config, registry, id)?, true))
}

/// One list's items.
pub fn items(config: &Config, registry: &Registry, id: &str) -> Result<Json, ControlError> {
    Ok(items_json(&find(config, registry, id)?))
}

/// An item as a body gives it: a string or `{value, description}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ItemIn {
    Plain(String),
    Object {
        value: String,
        #[serde(default)]
        description: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewListBody {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    items: Vec<ItemIn>,
    // Read-only keys a list read back may carry.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    count: Option<Json>,
    #[serde(default)]
    created_at: Option<Json>,
    #[serde(default)]
    updated_at: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default)]
    append: Vec<ItemIn>,
    #[serde(default)]
    remove: Vec<String>,
}

/// The body as `T`, which must come from a JSON object (serde would also fill a struct from an
/// array, by position).
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ControlError> {
    match serde_json::from_slice::<Json>(body) {
        Ok(v @ Json::Object(_)) => {
            serde_json::from_value(v).map_err(|e| ControlError::invalid("body", e.to_string()))
        }
        Ok(_) => Err(ControlError::invalid("body", "expected a JSON object")),
        Err(e) => Err(json_error("body", &e)),
    }
}

/// Checks items for a list of `kind`: non-empty values, addresses or CIDRs in IP lists.
fn checked_items(
    field: &str,
    kind: ListType,
    items: Vec<ItemIn>,
) -> Result<Vec<NewListItem>, ControlError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let (value, description) = match item {
            ItemIn::Plain(v) => (v, None),
            ItemIn::Object { value, description } => (value, description),
        };
        let at = format!("{field}[{i}].value");
        let value = value.trim().to_string();
        if value.is_empty() || value.chars().any(char::is_control) {
            return Err(ControlError::invalid(at, "expected a non-empty value"));
        }
        if kind == ListType::Ip {
            // The policy crate's own reading of IP lists decides what the gateway accepts.
            let probe = serde_json::json!([{"type": "IP", "items": [value]}]).to_string();
            if Lists::from_json(&probe).is_err() {
                return Err(ControlError::invalid(
                    at,
                    format!("\"{value}\" is not an address or CIDR"),
                ));
            }
        }
        out.push(NewListItem { value, description });
    }
    Ok(out)
}

/// Refuses a change of the lists that would leave a stored rule unable to compile.
fn check_rules_still_compile(
    config: &Config,
    registry: &Registry,
    lists: Vec<StoredList>,
) -> Result<(), ControlError> {
    let (set, _) = crate::rules::registry_policy(config, registry)?;
    if set.rules.is_empty() {
        return Ok(());
    }
    let lists = Lists::new(
        lists
            .iter()
            .map(policy_list)
            .collect::<Result<Vec<_>, _>>()?,
    );
    let report = Policy::check(
        &RuleSet {
            rules: set.rules,
            envelope: None,
        },
        Some(&lists),
    );
    match report.errors.first() {
        Some(e) => Err(ControlError::Conflict(format!(
            "the stored rules would no longer compile: {e}"
        ))),
        None => Ok(()),
    }
}

/// Creates a list from a body `{name, type, description?, items?}`.
pub fn create(
    config: &Config,
    registry: &Registry,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    let b: NewListBody = parse(body)?;
    let name = b
        .name
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ControlError::invalid("name", "required"))?;
    if !waygate_registry::validate::label_ok(&name) {
        return Err(ControlError::invalid(
            "name",
            "expected 1 to 128 characters without control characters or surrounding spaces",
        ));
    }
    let kind_text = b
        .kind
        .ok_or_else(|| ControlError::invalid("type", "required"))?;
    let kind = kind_of(&kind_text).ok_or_else(|| {
        ControlError::invalid(
            "type",
            format!("unknown type {kind_text:?} (expected IP, DOMAIN, EMAIL, URL or SERIAL)"),
        )
    })?;
    let items = checked_items("items", kind, b.items)?;
    let id = match b.id.filter(|i| !i.trim().is_empty()) {
        Some(id) if waygate_registry::validate::label_ok(&id) => id,
        Some(_) => return Err(ControlError::invalid("id", "expected 1 to 128 characters")),
        None => waygate_registry::new_id(),
    };
    // Read-only keys of a list read back and sent again: accepted, and ignored.
    let _ = (b.count, b.created_at, b.updated_at);
    let stored = registry.insert_list(
        &StoredList {
            id,
            name,
            kind: kind.as_str().to_string(),
            description: b.description,
            items: Vec::new(),
            created_at: now,
            updated_at: now,
        },
        &items,
        now,
    )?;
    Ok(list_json(&stored, true))
}

/// Replaces a list's name, description and items (`PUT`; its type stays).
pub fn replace(
    config: &Config,
    registry: &Registry,
    id: &str,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    let current = registry.list(id)?;
    let b: NewListBody = parse(body)?;
    let kind = kind_of(&current.kind)
        .ok_or_else(|| ControlError::Source(format!("list {id}: unknown stored type")))?;
    if let Some(k) = &b.kind {
        if kind_of(k) != Some(kind) {
            return Err(ControlError::invalid(
                "type",
                format!("a list's type cannot change (it is {})", current.kind),
            ));
        }
    }
    let name = b.name.unwrap_or_else(|| current.name.clone());
    if !waygate_registry::validate::label_ok(&name) {
        return Err(ControlError::invalid(
            "name",
            "expected 1 to 128 characters",
        ));
    }
    let items = checked_items("items", kind, b.items)?;
    let mut after = registry.lists()?;
    for l in after.iter_mut().filter(|l| l.id == current.id) {
        l.name.clone_from(&name);
        l.items = items
            .iter()
            .map(|i| waygate_registry::StoredListItem {
                value: i.value.clone(),
                description: None,
                created_at: now,
            })
            .collect();
    }
    check_rules_still_compile(config, registry, after)?;
    let stored =
        registry.replace_list(&current.id, &name, b.description.as_deref(), &items, now)?;
    Ok(list_json(&stored, true))
}

/// Appends and removes items (`PATCH {append: [{value, description}], remove: [value]}`).
pub fn patch(
    config: &Config,
    registry: &Registry,
    id: &str,
    body: &[u8],
    now: i64,
) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    let current = registry.list(id)?;
    let b: PatchBody = parse(body)?;
    let kind = kind_of(&current.kind)
        .ok_or_else(|| ControlError::Source(format!("list {id}: unknown stored type")))?;
    let append = checked_items("append", kind, b.append)?;
    let stored = registry.patch_list(&current.id, &append, &b.remove, now)?;
    Ok(list_json(&stored, true))
}

/// Deletes a list no stored rule names; returns `{"id": ...}`.
pub fn delete(config: &Config, registry: &Registry, id: &str) -> Result<Json, ControlError> {
    refuse_if_file_managed(config)?;
    let current = registry.list(id)?;
    let after: Vec<StoredList> = registry
        .lists()?
        .into_iter()
        .filter(|l| l.id != current.id)
        .collect();
    check_rules_still_compile(config, registry, after)?;
    let gone = registry.delete_list(&current.id)?;
    Ok(serde_json::json!({ "id": gone.id }))
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

    #[test]
    fn lists_are_created_patched_and_read_back() {
        let (_dir, config, reg) = setup();
        let l = create(
            &config,
            &reg,
            br#"{"name": "blocked", "type": "domain", "items": [{"value": "a.example", "description": "first"}, "b.example"]}"#,
            10,
        )
        .unwrap();
        assert_eq!(
            (l["type"].as_str(), l["count"].as_u64()),
            (Some("DOMAIN"), Some(2))
        );
        let id = l["id"].as_str().unwrap().to_string();
        let patched = patch(
            &config,
            &reg,
            &id,
            br#"{"append": [{"value": "c.example", "description": "third"}], "remove": ["a.example"]}"#,
            11,
        )
        .unwrap();
        let values: Vec<&str> = patched["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["value"].as_str().unwrap())
            .collect();
        assert_eq!(values, ["b.example", "c.example"]);
        assert_eq!(patched["items"][1]["description"], "third");
        assert_eq!(items(&config, &reg, "blocked").unwrap(), patched["items"]);
        assert!(list(&config, &reg).unwrap()[0].get("items").is_none());
        let lists = policy_lists(&config, &reg).unwrap();
        assert_eq!(
            lists.get("blocked").unwrap().items,
            ["b.example", "c.example"]
        );
        let replaced = replace(
            &config,
            &reg,
            &id,
            br#"{"name": "blocked", "items": []}"#,
            12,
        )
        .unwrap();
        assert_eq!(replaced["count"], 0);
    }

    #[test]
    fn bad_lists_and_items_name_their_field() {
        let (_dir, config, reg) = setup();
        let field = |r: Result<Json, ControlError>| match r {
            Err(ControlError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        };
        assert_eq!(
            field(create(&config, &reg, br#"{"type": "IP"}"#, 1)),
            "name"
        );
        assert_eq!(
            field(create(
                &config,
                &reg,
                br#"{"name": "a", "type": "PHONE"}"#,
                1
            )),
            "type"
        );
        assert_eq!(
            field(create(
                &config,
                &reg,
                br#"{"name": "a", "type": "IP", "items": ["192.0.2.1", "nope"]}"#,
                1
            )),
            "items[1].value"
        );
        assert_eq!(
            field(create(
                &config,
                &reg,
                br#"{"name": "a", "type": "IP", "colour": 1}"#,
                1
            )),
            "body"
        );
        create(
            &config,
            &reg,
            br#"{"id": "ips", "name": "ips", "type": "IP"}"#,
            1,
        )
        .unwrap();
        assert_eq!(
            field(patch(
                &config,
                &reg,
                "ips",
                br#"{"append": [{"value": "300.1.1.1"}]}"#,
                2
            )),
            "append[0].value"
        );
    }

    #[test]
    fn a_list_a_rule_names_is_not_deleted() {
        let (_dir, config, reg) = setup();
        create(
            &config,
            &reg,
            br#"{"name": "blocked", "type": "DOMAIN", "items": ["a.example"]}"#,
            1,
        )
        .unwrap();
        crate::rules::create(
            &config,
            &reg,
            br#"{"name": "r", "action": "block", "filters": ["dns"], "traffic": "any(dns.domains[*] in $blocked)"}"#,
            2,
        )
        .unwrap();
        let err = delete(&config, &reg, "blocked").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Conflict, "{err}");
        assert_eq!(reg.lists().unwrap().len(), 1);
    }

    #[test]
    fn file_managed_lists_are_read_only() {
        let (dir, mut config, reg) = setup();
        let path = dir.path().join("lists.json");
        std::fs::write(
            &path,
            r#"[{"id": "x", "name": "x", "type": "IP", "items": ["192.0.2.1"]}]"#,
        )
        .unwrap();
        config.policy.lists = Some(path.clone());
        assert_eq!(get(&config, &reg, "x").unwrap()["count"], 1);
        let err = create(&config, &reg, br#"{"name": "a", "type": "IP"}"#, 1).unwrap_err();
        assert!(err.to_string().contains("policy.lists"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::Conflict);
    }
}
