//! Rules and lists the admin API manages, stored as written: a rule is its JSON object (checked
//! and put in canonical form by the control crate before it gets here), a list its name, type
//! and items. Every change bumps the `policy` generation counter the gateway polls.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{Registry, RegistryError};

/// A rule as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRule {
    /// Its id.
    pub id: String,
    /// The rule object's JSON text, without the read-only keys.
    pub body: String,
    /// Its precedence (lower runs first), kept beside the body to order by.
    pub precedence: i64,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// Last change (unix seconds).
    pub updated_at: i64,
    /// 1 at creation, one more with every change.
    pub version: i64,
}

/// One item of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredListItem {
    /// The value (an address, a domain, ...).
    pub value: String,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// When it was added (unix seconds).
    pub created_at: i64,
}

/// An item to add to a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewListItem {
    /// The value.
    pub value: String,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
}

/// A list as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredList {
    /// Its id.
    pub id: String,
    /// Its unique name.
    pub name: String,
    /// Its type as Cloudflare spells it (`IP`, `DOMAIN`, ...).
    pub kind: String,
    /// What it is for.
    pub description: Option<String>,
    /// Its items, in the order they were added.
    pub items: Vec<StoredListItem>,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// Last change (unix seconds).
    pub updated_at: i64,
}

const RULE_COLUMNS: &str = "id, body, precedence, created_at, updated_at, version";

fn read_rule(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRule> {
    Ok(StoredRule {
        id: r.get(0)?,
        body: r.get(1)?,
        precedence: r.get(2)?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
        version: r.get(5)?,
    })
}

impl Registry {
    /// A number that changes whenever any process changes a rule or a list; the gateway polls
    /// it to recompile the rules the API manages.
    pub fn policy_counter(&self) -> Result<u64, RegistryError> {
        let generation: i64 =
            self.conn
                .query_row("SELECT policy FROM generation WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
        Ok(generation.unsigned_abs())
    }

    /// Every stored rule by ascending precedence (then age).
    pub fn rules(&self) -> Result<Vec<StoredRule>, RegistryError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {RULE_COLUMNS} FROM rules ORDER BY precedence, created_at, rowid"
        ))?;
        let rules = stmt
            .query_map([], read_rule)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rules)
    }

    /// The rule with this id.
    pub fn rule(&self, id: &str) -> Result<StoredRule, RegistryError> {
        self.conn
            .query_row(
                &format!("SELECT {RULE_COLUMNS} FROM rules WHERE id = ?1"),
                [id],
                read_rule,
            )
            .optional()?
            .ok_or_else(|| RegistryError::RuleNotFound(id.to_string()))
    }

    /// Stores a new rule (version 1).
    pub fn insert_rule(
        &self,
        id: &str,
        body: &str,
        precedence: i64,
        now_unix: i64,
    ) -> Result<StoredRule, RegistryError> {
        let tx = self.write_tx()?;
        let taken: Option<String> = tx
            .query_row("SELECT id FROM rules WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        if taken.is_some() {
            return Err(RegistryError::IdTaken(id.to_string()));
        }
        tx.execute(
            "INSERT INTO rules (id, body, precedence, created_at, updated_at, version) \
             VALUES (?1, ?2, ?3, ?4, ?4, 1)",
            params![id, body, precedence, now_unix],
        )?;
        tx.commit()?;
        self.rule(id)
    }

    /// Replaces a rule's body and precedence; its version goes up by one.
    pub fn update_rule(
        &self,
        id: &str,
        body: &str,
        precedence: i64,
        now_unix: i64,
    ) -> Result<StoredRule, RegistryError> {
        let changed = self.conn.execute(
            "UPDATE rules SET body = ?2, precedence = ?3, updated_at = ?4, version = version + 1 \
             WHERE id = ?1",
            params![id, body, precedence, now_unix],
        )?;
        if changed == 0 {
            return Err(RegistryError::RuleNotFound(id.to_string()));
        }
        self.rule(id)
    }

    /// Deletes a rule; returns what it was.
    pub fn delete_rule(&self, id: &str) -> Result<StoredRule, RegistryError> {
        let rule = self.rule(id)?;
        self.conn.execute("DELETE FROM rules WHERE id = ?1", [id])?;
        Ok(rule)
    }

    /// Every stored list with its items, oldest first.
    pub fn lists(&self) -> Result<Vec<StoredList>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, type, description, created_at, updated_at FROM lists \
             ORDER BY created_at, rowid",
        )?;
        let mut lists = stmt
            .query_map([], |r| {
                Ok(StoredList {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    kind: r.get(2)?,
                    description: r.get(3)?,
                    items: Vec::new(),
                    created_at: r.get(4)?,
                    updated_at: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT list_id, value, description, created_at FROM list_items ORDER BY rowid",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let list_id: String = r.get(0)?;
            if let Some(list) = lists.iter_mut().find(|l| l.id == list_id) {
                list.items.push(StoredListItem {
                    value: r.get(1)?,
                    description: r.get(2)?,
                    created_at: r.get(3)?,
                });
            }
        }
        Ok(lists)
    }

    /// The list whose id or name is `needle`.
    pub fn list(&self, needle: &str) -> Result<StoredList, RegistryError> {
        self.lists()?
            .into_iter()
            .find(|l| l.id == needle || l.name == needle)
            .ok_or_else(|| RegistryError::ListNotFound(needle.to_string()))
    }

    /// Stores a new list with its items.
    pub fn insert_list(
        &self,
        list: &StoredList,
        items: &[NewListItem],
        now_unix: i64,
    ) -> Result<StoredList, RegistryError> {
        let tx = self.write_tx()?;
        let taken: Option<(String, String)> = tx
            .query_row(
                "SELECT id, name FROM lists WHERE id = ?1 OR name = ?2",
                params![list.id, list.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match taken {
            Some((id, _)) if id == list.id => return Err(RegistryError::IdTaken(id)),
            Some((_, name)) => return Err(RegistryError::ListNameTaken(name)),
            None => {}
        }
        tx.execute(
            "INSERT INTO lists (id, name, type, description, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![list.id, list.name, list.kind, list.description, now_unix],
        )?;
        insert_items(&tx, &list.id, items, now_unix)?;
        tx.commit()?;
        self.list(&list.id)
    }

    /// Replaces a list's name, description and items (its type stays).
    pub fn replace_list(
        &self,
        id: &str,
        name: &str,
        description: Option<&str>,
        items: &[NewListItem],
        now_unix: i64,
    ) -> Result<StoredList, RegistryError> {
        let tx = self.write_tx()?;
        let holder: Option<String> = tx
            .query_row("SELECT id FROM lists WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        if holder.is_some_and(|h| h != id) {
            return Err(RegistryError::ListNameTaken(name.to_string()));
        }
        let changed = tx.execute(
            "UPDATE lists SET name = ?2, description = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, name, description, now_unix],
        )?;
        if changed == 0 {
            return Err(RegistryError::ListNotFound(id.to_string()));
        }
        tx.execute("DELETE FROM list_items WHERE list_id = ?1", [id])?;
        insert_items(&tx, id, items, now_unix)?;
        tx.commit()?;
        self.list(id)
    }

    /// Adds `append` (an item already there keeps its place and takes the new description) and
    /// removes `remove` (values not in the list are ignored), in one transaction.
    pub fn patch_list(
        &self,
        id: &str,
        append: &[NewListItem],
        remove: &[String],
        now_unix: i64,
    ) -> Result<StoredList, RegistryError> {
        let tx = self.write_tx()?;
        let changed = tx.execute(
            "UPDATE lists SET updated_at = ?2 WHERE id = ?1",
            params![id, now_unix],
        )?;
        if changed == 0 {
            return Err(RegistryError::ListNotFound(id.to_string()));
        }
        {
            let mut delete =
                tx.prepare("DELETE FROM list_items WHERE list_id = ?1 AND value = ?2")?;
            for value in remove {
                delete.execute(params![id, value])?;
            }
        }
        insert_items(&tx, id, append, now_unix)?;
        tx.commit()?;
        self.list(id)
    }

    /// Deletes a list and its items; returns what it was.
    pub fn delete_list(&self, id: &str) -> Result<StoredList, RegistryError> {
        let list = self.list(id)?;
        self.conn
            .execute("DELETE FROM lists WHERE id = ?1", [&list.id])?;
        Ok(list)
    }
}

fn insert_items(
    tx: &rusqlite::Transaction<'_>,
    list_id: &str,
    items: &[NewListItem],
    now_unix: i64,
) -> Result<(), RegistryError> {
    let mut insert = tx.prepare(
        "INSERT INTO list_items (list_id, value, description, created_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (list_id, value) DO UPDATE SET description = excluded.description",
    )?;
    for item in items {
        insert.execute(params![list_id, item.value, item.description, now_unix])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), &waygate_config::Config::default().tunnel).unwrap();
        (dir, reg)
    }

    fn item(v: &str) -> NewListItem {
        NewListItem {
            value: v.into(),
            description: None,
        }
    }

    #[test]
    fn rules_are_stored_versioned_and_bump_the_policy_counter() {
        let (_dir, reg) = registry();
        let devices = reg.change_counter().unwrap();
        let before = reg.policy_counter().unwrap();
        reg.insert_rule("b", "{}", 20, 1).unwrap();
        let a = reg.insert_rule("a", "{\"x\":1}", 10, 2).unwrap();
        assert_eq!((a.version, a.created_at, a.updated_at), (1, 2, 2));
        assert!(reg.policy_counter().unwrap() > before);
        assert_eq!(reg.change_counter().unwrap(), devices, "devices untouched");
        let ids: Vec<String> = reg.rules().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "b"], "by precedence");
        assert!(matches!(
            reg.insert_rule("a", "{}", 1, 3),
            Err(RegistryError::IdTaken(_))
        ));
        let a = reg.update_rule("a", "{\"x\":2}", 30, 5).unwrap();
        assert_eq!((a.version, a.created_at, a.updated_at), (2, 2, 5));
        reg.delete_rule("a").unwrap();
        assert!(matches!(reg.rule("a"), Err(RegistryError::RuleNotFound(_))));
        assert!(matches!(
            reg.update_rule("a", "{}", 1, 6),
            Err(RegistryError::RuleNotFound(_))
        ));
    }

    #[test]
    fn lists_are_created_patched_replaced_and_deleted() {
        let (_dir, reg) = registry();
        let new = StoredList {
            id: "l1".into(),
            name: "blocked".into(),
            kind: "DOMAIN".into(),
            description: None,
            items: Vec::new(),
            created_at: 0,
            updated_at: 0,
        };
        let l = reg
            .insert_list(&new, &[item("a.example"), item("b.example")], 1)
            .unwrap();
        assert_eq!(l.items.len(), 2);
        assert!(matches!(
            reg.insert_list(
                &StoredList {
                    id: "l2".into(),
                    ..new.clone()
                },
                &[],
                1
            ),
            Err(RegistryError::ListNameTaken(_))
        ));
        let before = reg.policy_counter().unwrap();
        let l = reg
            .patch_list(
                "l1",
                &[
                    item("c.example"),
                    NewListItem {
                        value: "a.example".into(),
                        description: Some("kept".into()),
                    },
                ],
                &["b.example".into(), "nope".into()],
                2,
            )
            .unwrap();
        let values: Vec<&str> = l.items.iter().map(|i| i.value.as_str()).collect();
        assert_eq!(values, ["a.example", "c.example"]);
        assert_eq!(l.items[0].description.as_deref(), Some("kept"));
        assert!(reg.policy_counter().unwrap() > before);
        let l = reg
            .replace_list("l1", "renamed", Some("d"), &[item("z.example")], 3)
            .unwrap();
        assert_eq!((l.name.as_str(), l.items.len()), ("renamed", 1));
        assert_eq!(reg.list("renamed").unwrap().id, "l1");
        reg.delete_list("l1").unwrap();
        assert!(reg.lists().unwrap().is_empty());
        assert!(matches!(
            reg.patch_list("l1", &[], &[], 4),
            Err(RegistryError::ListNotFound(_))
        ));
    }
}
