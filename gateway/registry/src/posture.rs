//! Device posture rules (Cloudflare's JSON, checked by `waygate-posture` before it gets here)
//! and the results the gateway evaluates from devices' reports, each with when it stops
//! counting as a pass. Results an admin types in (`waygate device posture`) have no expiry.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{check_label, Registry, RegistryError};

/// A stored posture rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPostureRule {
    /// Its id.
    pub id: String,
    /// The rule as JSON, checked when it was stored.
    pub body: String,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// Last change (unix seconds).
    pub updated_at: i64,
}

/// One posture result of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureResult {
    /// The check (posture rule) id.
    pub check_id: String,
    /// The verdict as decided.
    pub passed: bool,
    /// When it was decided (unix seconds).
    pub reported_at: i64,
    /// From when a pass counts as failed (unix seconds); `None`: never.
    pub expires_at: Option<i64>,
    /// Why, as the gateway decided it.
    pub reason: Option<String>,
}

impl Registry {
    /// Stores a new posture rule; its id must be free.
    pub fn create_posture_rule(
        &self,
        id: &str,
        body: &str,
        now_unix: i64,
    ) -> Result<StoredPostureRule, RegistryError> {
        check_label("posture rule id", id)?;
        let tx = self.write_tx()?;
        let taken: Option<String> = tx
            .query_row("SELECT id FROM posture_rules WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        if taken.is_some() {
            return Err(RegistryError::IdTaken(id.to_string()));
        }
        tx.execute(
            "INSERT INTO posture_rules (id, body, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
            params![id, body, now_unix],
        )?;
        tx.commit()?;
        Ok(StoredPostureRule {
            id: id.to_string(),
            body: body.to_string(),
            created_at: now_unix,
            updated_at: now_unix,
        })
    }

    /// Replaces the body of the posture rule `id`.
    pub fn replace_posture_rule(
        &self,
        id: &str,
        body: &str,
        now_unix: i64,
    ) -> Result<StoredPostureRule, RegistryError> {
        let tx = self.write_tx()?;
        let changed = tx.execute(
            "UPDATE posture_rules SET body = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, body, now_unix],
        )?;
        if changed == 0 {
            return Err(RegistryError::PostureRuleNotFound(id.to_string()));
        }
        tx.commit()?;
        self.posture_rule(id)
    }

    /// Every posture rule, oldest first.
    pub fn posture_rules(&self) -> Result<Vec<StoredPostureRule>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, body, created_at, updated_at FROM posture_rules ORDER BY created_at, rowid",
        )?;
        let rules = stmt
            .query_map([], |r| {
                Ok(StoredPostureRule {
                    id: r.get(0)?,
                    body: r.get(1)?,
                    created_at: r.get(2)?,
                    updated_at: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rules)
    }

    /// The posture rule `id`.
    pub fn posture_rule(&self, id: &str) -> Result<StoredPostureRule, RegistryError> {
        self.posture_rules()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| RegistryError::PostureRuleNotFound(id.to_string()))
    }

    /// Deletes the posture rule `id`. Devices' results for it stay until they expire.
    pub fn delete_posture_rule(&self, id: &str) -> Result<StoredPostureRule, RegistryError> {
        let rule = self.posture_rule(id)?;
        self.conn
            .execute("DELETE FROM posture_rules WHERE id = ?1", [id])?;
        Ok(rule)
    }

    /// Records the results the gateway evaluated from a report of `device_id`: results of the
    /// same checks are replaced (an unchanged verdict only renews its expiry and reason, which
    /// does not reload the device set), and earlier evaluated results of checks no longer in
    /// the report are dropped. Results typed in by an admin stay unless a check is reported.
    pub fn record_posture(
        &self,
        device_id: &str,
        results: &[PostureResult],
    ) -> Result<(), RegistryError> {
        for r in results {
            check_label("posture check id", &r.check_id)?;
        }
        let tx = self.write_tx()?;
        let exists: Option<String> = tx
            .query_row("SELECT id FROM devices WHERE id = ?1", [device_id], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_none() {
            return Err(RegistryError::NotFound(device_id.to_string()));
        }
        {
            let reported: Vec<&str> = results.iter().map(|r| r.check_id.as_str()).collect();
            let mut stale = tx.prepare(
                "SELECT check_id FROM device_posture WHERE device_id = ?1 AND expires_at IS NOT NULL",
            )?;
            let old: Vec<String> = stale
                .query_map([device_id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for check in old.iter().filter(|c| !reported.contains(&c.as_str())) {
                tx.execute(
                    "DELETE FROM device_posture WHERE device_id = ?1 AND check_id = ?2",
                    params![device_id, check],
                )?;
            }
            // The trigger fires on any UPDATE naming `passed`, so the verdict is written only
            // when it changes.
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO device_posture \
                 (device_id, check_id, passed, reported_at, expires_at, reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut renew = tx.prepare(
                "UPDATE device_posture SET reported_at = ?3, expires_at = ?4, reason = ?5 \
                 WHERE device_id = ?1 AND check_id = ?2",
            )?;
            let mut flip = tx.prepare(
                "UPDATE device_posture SET passed = ?3 \
                 WHERE device_id = ?1 AND check_id = ?2 AND passed != ?3",
            )?;
            for r in results {
                let added = insert.execute(params![
                    device_id,
                    r.check_id,
                    r.passed,
                    r.reported_at,
                    r.expires_at,
                    r.reason
                ])?;
                if added == 0 {
                    renew.execute(params![
                        device_id,
                        r.check_id,
                        r.reported_at,
                        r.expires_at,
                        r.reason
                    ])?;
                    flip.execute(params![device_id, r.check_id, r.passed])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The posture results of `device_id` as stored (passes not yet judged by their expiry).
    pub fn posture_results(&self, device_id: &str) -> Result<Vec<PostureResult>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT check_id, passed, reported_at, expires_at, reason FROM device_posture \
             WHERE device_id = ?1 ORDER BY check_id",
        )?;
        let results = stmt
            .query_map([device_id], |r| {
                Ok(PostureResult {
                    check_id: r.get(0)?,
                    passed: r.get(1)?,
                    reported_at: r.get(2)?,
                    expires_at: r.get(3)?,
                    reason: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(results)
    }

    /// The earliest time after `now` (unix seconds) at which some device's pass expires: a
    /// running gateway reads its devices again then, so the pass stops counting on time.
    pub fn next_posture_expiry(&self, now: i64) -> Result<Option<i64>, RegistryError> {
        Ok(self.conn.query_row(
            "SELECT min(expires_at) FROM device_posture WHERE passed = 1 AND expires_at > ?1",
            [now],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewDevice;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), &waygate_config::Config::default().tunnel).unwrap();
        (dir, reg)
    }

    fn enroll(reg: &Registry, name: &str) -> crate::Device {
        let key = waygate_keys::PrivateKey::generate(&mut rand::rngs::OsRng).public_key();
        reg.enroll(
            NewDevice {
                name: Some(name.into()),
                email: format!("{name}@example.com"),
                user_name: None,
                groups: vec![],
                attributes: vec![],
                vnet_id: None,
                public_key: key,
            },
            1,
        )
        .unwrap()
    }

    fn result(check: &str, passed: bool, at: i64, expires_at: Option<i64>) -> PostureResult {
        PostureResult {
            check_id: check.into(),
            passed,
            reported_at: at,
            expires_at,
            reason: Some("because".into()),
        }
    }

    #[test]
    fn posture_rules_are_created_replaced_listed_and_deleted() {
        let (_dir, reg) = registry();
        reg.create_posture_rule("r1", "{}", 10).unwrap();
        assert!(matches!(
            reg.create_posture_rule("r1", "{}", 11),
            Err(RegistryError::IdTaken(_))
        ));
        reg.create_posture_rule("r2", "{\"a\":1}", 12).unwrap();
        let r = reg.replace_posture_rule("r1", "{\"b\":2}", 13).unwrap();
        assert_eq!(
            (r.body.as_str(), r.created_at, r.updated_at),
            ("{\"b\":2}", 10, 13)
        );
        let ids: Vec<String> = reg
            .posture_rules()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["r1", "r2"]);
        reg.delete_posture_rule("r1").unwrap();
        assert!(matches!(
            reg.delete_posture_rule("r1"),
            Err(RegistryError::PostureRuleNotFound(_))
        ));
        assert!(matches!(
            reg.replace_posture_rule("nope", "{}", 1),
            Err(RegistryError::PostureRuleNotFound(_))
        ));
    }

    #[test]
    fn reported_passes_expire_with_a_fake_clock_and_renewals_do_not_reload() {
        let (_dir, mut reg) = registry();
        let d = enroll(&reg, "laptop");
        reg.set_posture_now(Some(1_000));
        let before = reg.change_counter().unwrap();
        reg.record_posture(
            &d.id,
            &[
                result("file-ok", true, 1_000, Some(1_180)),
                result("disk", false, 1_000, Some(1_180)),
            ],
        )
        .unwrap();
        assert!(reg.change_counter().unwrap() > before, "new results reload");
        let x = reg.find(&d.id).unwrap().extras;
        assert_eq!(
            (x.posture_passed, x.posture_failed),
            (vec!["file-ok".to_string()], vec!["disk".to_string()])
        );
        assert_eq!(reg.next_posture_expiry(1_000).unwrap(), Some(1_180));

        // At its expiry the pass counts as failed.
        reg.set_posture_now(Some(1_180));
        let x = reg.find(&d.id).unwrap().extras;
        assert!(x.posture_passed.is_empty());
        assert_eq!(x.posture_failed, ["disk", "file-ok"]);
        assert_eq!(reg.next_posture_expiry(1_180).unwrap(), None);

        // A renewal with the same verdicts does not reload the device set, and passes again.
        let counter = reg.change_counter().unwrap();
        reg.record_posture(
            &d.id,
            &[
                result("file-ok", true, 1_170, Some(1_350)),
                result("disk", false, 1_170, Some(1_350)),
            ],
        )
        .unwrap();
        assert_eq!(reg.change_counter().unwrap(), counter);
        assert_eq!(reg.find(&d.id).unwrap().extras.posture_passed, ["file-ok"]);
        // A changed verdict reloads; a check no longer reported is dropped.
        reg.record_posture(&d.id, &[result("file-ok", false, 1_200, Some(1_380))])
            .unwrap();
        assert!(reg.change_counter().unwrap() > counter);
        let stored = reg.posture_results(&d.id).unwrap();
        assert_eq!(stored.len(), 1);
        assert!(!stored[0].passed);
        assert!(matches!(
            reg.record_posture("no-such-device", &[]),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn results_typed_in_by_an_admin_never_expire_and_survive_reports() {
        let (_dir, mut reg) = registry();
        let d = enroll(&reg, "laptop");
        reg.set_posture(&d.id, &["manual".to_string()], &[], 5)
            .unwrap();
        reg.record_posture(&d.id, &[result("file-ok", true, 10, Some(20))])
            .unwrap();
        reg.set_posture_now(Some(1_000_000));
        let x = reg.find(&d.id).unwrap().extras;
        assert_eq!(x.posture_passed, ["manual"]);
        assert_eq!(x.posture_failed, ["file-ok"]);
    }
}
