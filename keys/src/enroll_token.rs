//! Enrollment tokens' text form: `wgenroll1-PREFIX-SECRET-CAHASH` (Headscale's
//! `hskey-auth-PREFIX-SECRET` with kubeadm's discovery hash). PREFIX is 12 random hex digits
//! shown in listings, SECRET 64 random hex digits (256 bits; the gateway keeps only its
//! SHA-256), CAHASH the hex SHA-256 of the gateway CA's certificate (DER), which the client
//! pins when it first contacts the gateway. The gateway makes and checks tokens; the client
//! parses them. Nothing here reads a clock or an RNG.

use std::fmt;

use sha2::{Digest, Sha256};

/// The first part of every enrollment token (its format's version).
pub const TOKEN_TAG: &str = "wgenroll1";
/// Hex digits of the visible prefix.
pub const PREFIX_HEX: usize = 12;
/// Hex digits of the secret (256 bits).
pub const SECRET_HEX: usize = 64;
/// Hex digits of the CA hash (SHA-256).
pub const CA_HASH_HEX: usize = 64;

/// A token's parts.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    /// The visible prefix (12 hex digits).
    pub prefix: String,
    /// The secret (64 hex digits).
    pub secret: String,
    /// SHA-256 of the gateway CA's certificate (DER).
    pub ca_sha256: [u8; 32],
}

impl fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret, in logs or panics.
        f.debug_struct("EnrollToken")
            .field("prefix", &self.prefix)
            .field("ca_sha256", &hex(&self.ca_sha256))
            .finish_non_exhaustive()
    }
}

impl fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_TAG}-{}-{}-{}",
            self.prefix,
            self.secret,
            hex(&self.ca_sha256)
        )
    }
}

/// Why a text is not an enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Waygate enrollment token ({0}); it reads {TOKEN_TAG}-PREFIX-SECRET-CAHASH")]
pub struct TokenFormatError(pub &'static str);

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl std::str::FromStr for EnrollToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        if parts.next() != Some(TOKEN_TAG) {
            return Err(TokenFormatError("it does not start with wgenroll1-"));
        }
        let (Some(prefix), Some(secret), Some(ca), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError("it does not have four parts"));
        };
        if !lower_hex(prefix, PREFIX_HEX) {
            return Err(TokenFormatError("the prefix is not 12 hex digits"));
        }
        if !lower_hex(secret, SECRET_HEX) {
            return Err(TokenFormatError("the secret is not 64 hex digits"));
        }
        if !lower_hex(ca, CA_HASH_HEX) {
            return Err(TokenFormatError("the CA hash is not 64 hex digits"));
        }
        let mut ca_sha256 = [0u8; 32];
        for (i, byte) in ca_sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&ca[2 * i..2 * i + 2], 16)
                .map_err(|_| TokenFormatError("the CA hash is not hex"))?;
        }
        Ok(EnrollToken {
            prefix: prefix.to_string(),
            secret: secret.to_string(),
            ca_sha256,
        })
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a certificate (DER): what a token carries as the CA hash.
pub fn ca_sha256(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let token = EnrollToken {
            prefix: "0123456789ab".into(),
            secret: "ab".repeat(32),
            ca_sha256: ca_sha256(b"der"),
        };
        let text = token.to_string();
        assert_eq!(text.len(), 9 + 1 + 12 + 1 + 64 + 1 + 64);
        assert_eq!(text.parse::<EnrollToken>().unwrap(), token);
        assert_eq!(format!(" {text}\n").parse::<EnrollToken>().unwrap(), token);
        assert!(!format!("{token:?}").contains(&token.secret));
        for bad in [
            "",
            "wgenroll1",
            "hskey-auth-x-y",
            &text.replace("wgenroll1", "wgenroll2"),
            &text[..text.len() - 1],
            &format!("{text}-00"),
            &text.to_uppercase(),
        ] {
            assert!(bad.parse::<EnrollToken>().is_err(), "{bad:?}");
        }
    }
}
