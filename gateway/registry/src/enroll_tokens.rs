//! Enrollment tokens: what `waygate-client enroll` trades for a device. Only a hash of each
//! secret is stored (the control crate makes the secret and hashes it), with a visible prefix
//! for listings; each token carries the identity the device gets (email, name, groups, virtual
//! network), how many devices it may enroll and when it expires. Spent, expired and revoked
//! tokens stay in the table so the client can be told which of these it is.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Registry, RegistryError};

/// An enrollment token as stored (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEnrollToken {
    /// Its id.
    pub id: String,
    /// The visible prefix (the token's second part), shown in listings.
    pub prefix: String,
    /// Hex SHA-256 of the token's secret part.
    #[serde(skip)]
    pub hash: String,
    /// The email of the user the devices are enrolled for.
    pub email: String,
    /// The device name (`None`: derived from the email).
    pub name: Option<String>,
    /// Groups the devices get.
    pub groups: Vec<String>,
    /// Id of the virtual network the devices start in (`None`: the default network).
    pub vnet_id: Option<String>,
    /// How many devices it may enroll (0: any number until it expires).
    pub uses: i64,
    /// How many it has enrolled.
    pub used: i64,
    /// Expiry (unix seconds).
    pub expires_at: i64,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// Last enrollment with it (unix seconds).
    pub last_used_at: Option<i64>,
    /// Revocation time (unix seconds).
    pub revoked_at: Option<i64>,
}

impl StoredEnrollToken {
    /// True when every allowed use is taken.
    pub fn spent(&self) -> bool {
        self.uses > 0 && self.used >= self.uses
    }
}

const COLUMNS: &str = "id, prefix, hash, email, name, groups, vnet_id, uses, used, expires_at, \
                       created_at, last_used_at, revoked_at";

fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEnrollToken> {
    let groups: String = r.get(5)?;
    Ok(StoredEnrollToken {
        id: r.get(0)?,
        prefix: r.get(1)?,
        hash: r.get(2)?,
        email: r.get(3)?,
        name: r.get(4)?,
        // A damaged groups column grants no groups rather than failing every listing.
        groups: serde_json::from_str(&groups).unwrap_or_default(),
        vnet_id: r.get(6)?,
        uses: r.get(7)?,
        used: r.get(8)?,
        expires_at: r.get(9)?,
        created_at: r.get(10)?,
        last_used_at: r.get(11)?,
        revoked_at: r.get(12)?,
    })
}

impl Registry {
    /// Stores a new enrollment token.
    pub fn insert_enroll_token(&self, t: &StoredEnrollToken) -> Result<(), RegistryError> {
        let groups = serde_json::to_string(&t.groups).unwrap_or_else(|_| "[]".into());
        self.conn.execute(
            &format!("INSERT INTO enroll_tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
            params![
                t.id,
                t.prefix,
                t.hash,
                t.email,
                t.name,
                groups,
                t.vnet_id,
                t.uses,
                t.used,
                t.expires_at,
                t.created_at,
                t.last_used_at,
                t.revoked_at
            ],
        )?;
        Ok(())
    }

    /// Every enrollment token, oldest first.
    pub fn enroll_tokens(&self) -> Result<Vec<StoredEnrollToken>, RegistryError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM enroll_tokens ORDER BY created_at, rowid"
        ))?;
        let tokens = stmt.query_map([], read)?.collect::<Result<Vec<_>, _>>()?;
        Ok(tokens)
    }

    /// The token whose secret hashes to `hash`, spent, expired and revoked ones included.
    pub fn enroll_token_by_hash(
        &self,
        hash: &str,
    ) -> Result<Option<StoredEnrollToken>, RegistryError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM enroll_tokens WHERE hash = ?1"),
                [hash],
                read,
            )
            .optional()?)
    }

    /// Takes one use of the token if it is still usable at `now_unix` (not revoked, not
    /// expired, not spent), in one statement so two enrollments cannot both take the last use.
    pub fn take_enroll_token_use(&self, id: &str, now_unix: i64) -> Result<bool, RegistryError> {
        let changed = self.conn.execute(
            "UPDATE enroll_tokens SET used = used + 1, last_used_at = ?2 \
             WHERE id = ?1 AND revoked_at IS NULL AND expires_at > ?2 \
             AND (uses = 0 OR used < uses)",
            params![id, now_unix],
        )?;
        Ok(changed == 1)
    }

    /// Gives back a use taken for an enrollment that then failed.
    pub fn return_enroll_token_use(&self, id: &str) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE enroll_tokens SET used = used - 1 WHERE id = ?1 AND used > 0",
            [id],
        )?;
        Ok(())
    }

    /// Revokes the enrollment token with this id or prefix.
    pub fn revoke_enroll_token(
        &self,
        needle: &str,
        now_unix: i64,
    ) -> Result<StoredEnrollToken, RegistryError> {
        let mut token = self
            .enroll_tokens()?
            .into_iter()
            .find(|t| t.revoked_at.is_none() && (t.id == needle || t.prefix == needle))
            .ok_or_else(|| RegistryError::EnrollTokenNotFound(needle.to_string()))?;
        self.conn.execute(
            "UPDATE enroll_tokens SET revoked_at = ?2 WHERE id = ?1",
            params![token.id, now_unix],
        )?;
        token.revoked_at = Some(now_unix);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(uses: i64) -> StoredEnrollToken {
        StoredEnrollToken {
            id: "e1".into(),
            prefix: "0123456789ab".into(),
            hash: "00ff".into(),
            email: "ada@example.com".into(),
            name: None,
            groups: vec!["eng".into()],
            vnet_id: None,
            uses,
            used: 0,
            expires_at: 100,
            created_at: 1,
            last_used_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn uses_are_taken_until_spent_expired_or_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), &waygate_config::Config::default().tunnel).unwrap();
        reg.insert_enroll_token(&token(2)).unwrap();
        assert!(reg.take_enroll_token_use("e1", 10).unwrap());
        reg.return_enroll_token_use("e1").unwrap();
        assert!(reg.take_enroll_token_use("e1", 10).unwrap());
        assert!(reg.take_enroll_token_use("e1", 11).unwrap());
        assert!(!reg.take_enroll_token_use("e1", 12).unwrap(), "spent");
        let t = reg.enroll_token_by_hash("00ff").unwrap().unwrap();
        assert!(t.spent());
        assert_eq!((t.used, t.last_used_at), (2, Some(11)));
        assert_eq!(t.groups, vec!["eng".to_string()]);

        let mut other = token(0);
        other.id = "e2".into();
        other.prefix = "ba9876543210".into();
        other.hash = "11ee".into();
        reg.insert_enroll_token(&other).unwrap();
        assert!(
            reg.take_enroll_token_use("e2", 99).unwrap(),
            "0 is unlimited"
        );
        assert!(!reg.take_enroll_token_use("e2", 100).unwrap(), "expired");
        reg.revoke_enroll_token("ba9876543210", 50).unwrap();
        assert!(!reg.take_enroll_token_use("e2", 60).unwrap(), "revoked");
        assert!(matches!(
            reg.revoke_enroll_token("e2", 61),
            Err(RegistryError::EnrollTokenNotFound(_))
        ));
        assert_eq!(reg.enroll_tokens().unwrap().len(), 2);
    }
}
