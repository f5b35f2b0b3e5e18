//! What identity and device-posture rules read beyond a device's email, name and group names:
//! groups with ids and emails (`identity.groups.id`, `identity.groups.email`), the user's
//! attributes (`identity.saml_attributes`, `name=value`) and the device's posture-check results
//! (`device_posture.checks.passed` / `failed`).
//!
//! Devices name their groups; a group known here adds its id and email to every device in it.
//! Ids may be given (to keep the ids of rules exported from Cloudflare) or are made up.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{check_label, new_uuid, validate, Device, Registry, RegistryError};
use waygate_model::IdentityExtras;

/// A group of users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Id (a UUID unless given).
    pub id: String,
    /// Unique name, as devices' `--group` names it.
    pub name: String,
    /// The group's email, if it has one.
    pub email: Option<String>,
    /// Creation time (unix seconds).
    pub created_at: i64,
}

/// Longest attribute value kept.
const MAX_ATTRIBUTE: usize = 1024;

/// Splits and checks a `name=value` attribute.
pub fn parse_attribute(text: &str) -> Result<(String, String), RegistryError> {
    let bad = || RegistryError::InvalidAttribute(text.to_string());
    let (name, value) = text.split_once('=').ok_or_else(bad)?;
    let (name, value) = (name.trim(), value.trim());
    if !validate::label_ok(name)
        || value.is_empty()
        || value.len() > MAX_ATTRIBUTE
        || value.chars().any(char::is_control)
    {
        return Err(bad());
    }
    Ok((name.to_string(), value.to_string()))
}

/// Stores a new device's attributes inside its enrollment transaction.
pub(super) fn insert_attributes(
    tx: &Transaction<'_>,
    device_id: &str,
    attributes: &[(String, String)],
) -> Result<(), RegistryError> {
    let mut insert = tx.prepare(
        "INSERT OR IGNORE INTO device_attributes (device_id, name, value) VALUES (?1, ?2, ?3)",
    )?;
    for (name, value) in attributes {
        insert.execute(params![device_id, name, value])?;
    }
    Ok(())
}

impl Registry {
    /// Creates a group; `id` keeps a known id (e.g. Cloudflare's), else one is made up.
    pub fn create_group(
        &self,
        name: &str,
        email: Option<&str>,
        id: Option<&str>,
        now_unix: i64,
    ) -> Result<Group, RegistryError> {
        check_label("group", name)?;
        if let Some(email) = email {
            if !validate::email_ok(email) {
                return Err(RegistryError::InvalidEmail(email.to_string()));
            }
        }
        if let Some(id) = id {
            check_label("group id", id)?;
        }
        let tx = self.write_tx()?;
        let taken: Option<String> = tx
            .query_row(
                "SELECT name FROM groups WHERE name = ?1 OR id = ?2",
                params![name, id.unwrap_or("")],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(holder) = taken {
            return Err(RegistryError::GroupTaken(holder));
        }
        let id = id.map_or_else(|| new_uuid(&mut rand::rngs::OsRng), str::to_string);
        tx.execute(
            "INSERT INTO groups (id, name, email, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, name, email, now_unix],
        )?;
        tx.commit()?;
        Ok(Group {
            id,
            name: name.to_string(),
            email: email.map(str::to_string),
            created_at: now_unix,
        })
    }

    /// Every group, oldest first.
    pub fn groups(&self) -> Result<Vec<Group>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, email, created_at FROM groups ORDER BY created_at, rowid")?;
        let groups = stmt
            .query_map([], |r| {
                Ok(Group {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    email: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<Group>, _>>()?;
        Ok(groups)
    }

    /// Deletes the group with this id or name; devices keep the name, losing its id and email.
    pub fn delete_group(&self, needle: &str) -> Result<Group, RegistryError> {
        let group = self
            .groups()?
            .into_iter()
            .find(|g| g.id == needle || g.name == needle)
            .ok_or_else(|| RegistryError::GroupNotFound(needle.to_string()))?;
        self.conn
            .execute("DELETE FROM groups WHERE id = ?1", [&group.id])?;
        Ok(group)
    }

    /// Replaces the posture-check results of the device `needle` (id, name or public key).
    pub fn set_posture(
        &self,
        needle: &str,
        passed: &[String],
        failed: &[String],
        now_unix: i64,
    ) -> Result<Device, RegistryError> {
        for check in passed.iter().chain(failed) {
            check_label("posture check id", check)?;
        }
        if let Some(both) = passed.iter().find(|c| failed.contains(c)) {
            return Err(RegistryError::InvalidLabel {
                what: "posture check id (both passed and failed)",
                value: both.clone(),
            });
        }
        let device = self.find(needle)?;
        let tx = self.write_tx()?;
        tx.execute(
            "DELETE FROM device_posture WHERE device_id = ?1",
            [&device.id],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT OR REPLACE INTO device_posture (device_id, check_id, passed, reported_at) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (check, ok) in passed
                .iter()
                .map(|c| (c, true))
                .chain(failed.iter().map(|c| (c, false)))
            {
                insert.execute(params![device.id, check, ok, now_unix])?;
            }
        }
        tx.commit()?;
        self.find(&device.id)
    }

    /// The extras of the device `only`, or of every device, by device id.
    pub(super) fn extras(
        &self,
        only: Option<&str>,
    ) -> Result<HashMap<String, IdentityExtras>, RegistryError> {
        let mut out: HashMap<String, IdentityExtras> = HashMap::new();
        let mut stmt = self.conn.prepare(
            "SELECT dg.device_id, g.id, g.email FROM device_groups dg \
             JOIN groups g ON g.name = dg.name \
             WHERE ?1 IS NULL OR dg.device_id = ?1 ORDER BY dg.rowid",
        )?;
        let mut rows = stmt.query([only])?;
        while let Some(r) = rows.next()? {
            let e = out.entry(r.get(0)?).or_default();
            e.group_ids.push(r.get(1)?);
            if let Some(email) = r.get::<_, Option<String>>(2)? {
                e.group_emails.push(email);
            }
        }
        let mut stmt = self.conn.prepare(
            "SELECT device_id, name, value FROM device_attributes \
             WHERE ?1 IS NULL OR device_id = ?1 ORDER BY rowid",
        )?;
        let mut rows = stmt.query([only])?;
        while let Some(r) = rows.next()? {
            let (name, value): (String, String) = (r.get(1)?, r.get(2)?);
            out.entry(r.get(0)?)
                .or_default()
                .attributes
                .push(format!("{name}={value}"));
        }
        // A pass whose expiry has come counts as failed (waygate_posture::effective).
        let mut stmt = self.conn.prepare(
            "SELECT device_id, check_id, passed = 1 AND (expires_at IS NULL OR expires_at > \
               coalesce(?2, CAST(strftime('%s', 'now') AS INTEGER))) \
             FROM device_posture \
             WHERE ?1 IS NULL OR device_id = ?1 ORDER BY device_id, check_id",
        )?;
        let mut rows = stmt.query(params![only, self.posture_now])?;
        while let Some(r) = rows.next()? {
            let e = out.entry(r.get(0)?).or_default();
            let check: String = r.get(1)?;
            if r.get::<_, bool>(2)? {
                e.posture_passed.push(check);
            } else {
                e.posture_failed.push(check);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_name_equals_value() {
        assert_eq!(
            parse_attribute("department = Engineering Team").unwrap(),
            ("department".into(), "Engineering Team".into())
        );
        for bad in ["department", "=eng", "dept=", "dept=a\nb"] {
            assert!(parse_attribute(bad).is_err(), "{bad:?}");
        }
    }
}
