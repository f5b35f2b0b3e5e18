//! The admin API's bearer tokens: a random secret shown once at creation (`wgt_` and 43
//! base64url characters, 256 bits), of which the registry keeps only the SHA-256 and a visible
//! prefix. A request's token is checked by hashing it and looking the hash up, so the secret
//! never needs to be stored or compared.

use rand::RngCore;
use sha2::{Digest, Sha256};
use waygate_registry::{Registry, StoredToken, TokenScope};

use crate::ControlError;

/// What every token starts with, so a leaked one is recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "wgt_";
/// Characters of the secret kept visible for listings (the prefix and 8 more).
const VISIBLE: usize = TOKEN_PREFIX.len() + 8;
/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;

/// Hex SHA-256 of a secret, as the registry keeps admin and enrollment tokens alike.
pub fn hash(secret: &str) -> String {
    waygate_keys::enroll_token::hex(&Sha256::digest(secret.as_bytes()))
}

/// Unpadded base64url (RFC 4648 section 5): token characters that need no quoting anywhere.
fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Creates a token; returns the secret (shown once, never stored) and its record.
pub fn create(
    registry: &Registry,
    name: Option<&str>,
    scope: TokenScope,
    rng: &mut impl RngCore,
    now: i64,
) -> Result<(String, StoredToken), ControlError> {
    let mut bytes = [0u8; SECRET_BYTES];
    rng.fill_bytes(&mut bytes);
    let secret = format!("{TOKEN_PREFIX}{}", base64url(&bytes));
    let token = StoredToken {
        id: waygate_registry::new_id(),
        name: name.unwrap_or("").to_string(),
        prefix: secret[..VISIBLE].to_string(),
        hash: hash(&secret),
        scope,
        created_at: now,
        revoked_at: None,
    };
    if let Some(n) = name {
        if !waygate_registry::validate::label_ok(n) {
            return Err(ControlError::invalid(
                "name",
                "expected 1 to 128 characters without control characters",
            ));
        }
    }
    registry.insert_token(&token)?;
    Ok((secret, token))
}

/// The active token this secret belongs to, if any.
pub fn authenticate(
    registry: &Registry,
    secret: &str,
) -> Result<Option<StoredToken>, ControlError> {
    if !secret.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    Ok(registry.token_by_hash(&hash(secret))?)
}

/// Every token (never their secrets).
pub fn list(registry: &Registry) -> Result<Vec<StoredToken>, ControlError> {
    Ok(registry.tokens()?)
}

/// Revokes the token with this id, name or prefix.
pub fn revoke(registry: &Registry, needle: &str, now: i64) -> Result<StoredToken, ControlError> {
    Ok(registry.revoke_token(needle, now)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn a_token_authenticates_by_its_secret_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), &waygate_config::Config::default().tunnel).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let (secret, token) = create(&reg, Some("ci"), TokenScope::Read, &mut rng, 1).unwrap();
        assert!(
            secret.starts_with("wgt_") && secret.len() == 4 + 43,
            "{secret}"
        );
        assert!(secret.starts_with(&token.prefix));
        assert_ne!(token.hash, secret, "only the hash is kept");
        let found = authenticate(&reg, &secret).unwrap().unwrap();
        assert_eq!(found.scope, TokenScope::Read);
        assert!(authenticate(&reg, "wgt_nope").unwrap().is_none());
        assert!(authenticate(&reg, "").unwrap().is_none());
        revoke(&reg, &token.prefix, 2).unwrap();
        assert!(authenticate(&reg, &secret).unwrap().is_none());
    }

    #[test]
    fn base64url_has_no_padding() {
        assert_eq!(base64url(b"\xff\xff\xff"), "____");
        assert_eq!(base64url(b"a"), "YQ");
        assert_eq!(base64url(&[0u8; 32]).len(), 43);
    }
}
