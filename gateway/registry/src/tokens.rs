//! The admin API's bearer tokens. Only a hash of each secret is stored (the control crate makes
//! the secret and hashes it), with a short visible prefix so `admin token list` can tell tokens
//! apart, and a scope: read-only tokens may only read.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{Registry, RegistryError};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// Read only (GET).
    Read,
    /// Read and change.
    Write,
}

impl TokenScope {
    /// The scope as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Read => "read",
            TokenScope::Write => "write",
        }
    }
}

/// A token as stored (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredToken {
    /// Its id.
    pub id: String,
    /// A name to recognise it by.
    pub name: String,
    /// The secret's first characters, shown in listings.
    pub prefix: String,
    /// Hex SHA-256 of the whole secret.
    #[serde(skip)]
    pub hash: String,
    /// What it may do.
    pub scope: TokenScope,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// Revocation time (unix seconds); revoked tokens are refused.
    pub revoked_at: Option<i64>,
}

const TOKEN_COLUMNS: &str = "id, name, prefix, hash, scope, created_at, revoked_at";

fn read_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredToken> {
    let scope: String = r.get(4)?;
    Ok(StoredToken {
        id: r.get(0)?,
        name: r.get(1)?,
        prefix: r.get(2)?,
        hash: r.get(3)?,
        // Anything but "write" is read-only: a damaged row never grants more.
        scope: if scope == "write" {
            TokenScope::Write
        } else {
            TokenScope::Read
        },
        created_at: r.get(5)?,
        revoked_at: r.get(6)?,
    })
}

impl Registry {
    /// Stores a token's hash.
    pub fn insert_token(&self, token: &StoredToken) -> Result<(), RegistryError> {
        self.conn.execute(
            "INSERT INTO admin_tokens (id, name, prefix, hash, scope, created_at, revoked_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                token.id,
                token.name,
                token.prefix,
                token.hash,
                token.scope.as_str(),
                token.created_at,
                token.revoked_at
            ],
        )?;
        Ok(())
    }

    /// Every token, oldest first.
    pub fn tokens(&self) -> Result<Vec<StoredToken>, RegistryError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {TOKEN_COLUMNS} FROM admin_tokens ORDER BY created_at, rowid"
        ))?;
        let tokens = stmt
            .query_map([], read_token)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(tokens)
    }

    /// The active token whose secret hashes to `hash`.
    pub fn token_by_hash(&self, hash: &str) -> Result<Option<StoredToken>, RegistryError> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM admin_tokens \
                     WHERE hash = ?1 AND revoked_at IS NULL"
                ),
                [hash],
                read_token,
            )
            .optional()?)
    }

    /// Revokes the token with this id, name or prefix.
    pub fn revoke_token(&self, needle: &str, now_unix: i64) -> Result<StoredToken, RegistryError> {
        let mut token = self
            .tokens()?
            .into_iter()
            .find(|t| {
                t.revoked_at.is_none() && (t.id == needle || t.prefix == needle || t.name == needle)
            })
            .ok_or_else(|| RegistryError::TokenNotFound(needle.to_string()))?;
        self.conn.execute(
            "UPDATE admin_tokens SET revoked_at = ?2 WHERE id = ?1",
            params![token.id, now_unix],
        )?;
        token.revoked_at = Some(now_unix);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_hash_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), &waygate_config::Config::default().tunnel).unwrap();
        let t = StoredToken {
            id: "t1".into(),
            name: "ci".into(),
            prefix: "wgt_abcd".into(),
            hash: "00ff".into(),
            scope: TokenScope::Read,
            created_at: 1,
            revoked_at: None,
        };
        reg.insert_token(&t).unwrap();
        assert_eq!(reg.token_by_hash("00ff").unwrap(), Some(t.clone()));
        assert_eq!(reg.token_by_hash("00fe").unwrap(), None);
        reg.revoke_token("wgt_abcd", 5).unwrap();
        assert_eq!(reg.token_by_hash("00ff").unwrap(), None);
        assert!(matches!(
            reg.revoke_token("t1", 6),
            Err(RegistryError::TokenNotFound(_))
        ));
        assert_eq!(reg.tokens().unwrap()[0].revoked_at, Some(5));
    }
}
