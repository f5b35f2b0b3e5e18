//! WireGuard x25519 keys and their base64 text form.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key in base64 text (`wg genkey` output without the newline).
pub const KEY_LEN_BASE64: usize = 44;

/// Which kind of key failed to parse; private key text is never echoed back in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A private key.
    Private,
    /// A public key.
    Public,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Private => "private key",
            KeyKind::Public => "public key",
        })
    }
}

/// Why key text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// Not 44 characters, or not decoding to exactly 32 bytes.
    #[error("invalid {kind}{}: expected {KEY_LEN_BASE64} base64 characters encoding {KEY_LEN} bytes (as printed by `wg genkey`), got {len} characters", shown(.input))]
    Length {
        /// Private or public.
        kind: KeyKind,
        /// Number of characters given.
        len: usize,
        /// The text, for public keys only.
        input: Option<String>,
    },
    /// Right length, but not base64.
    #[error("invalid {kind}{}: not valid base64 ({reason})", shown(.input))]
    Base64 {
        /// Private or public.
        kind: KeyKind,
        /// The decoder's complaint.
        reason: String,
        /// The text, for public keys only.
        input: Option<String>,
    },
}

fn shown(input: &Option<String>) -> String {
    match input {
        Some(text) => format!(" {text:?}"),
        None => String::new(),
    }
}

/// Decodes wg-style base64 into 32 bytes; the result is zeroized when dropped.
fn decode(text: &str, kind: KeyKind) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyParseError> {
    let input = match kind {
        KeyKind::Public => Some(text.to_string()),
        KeyKind::Private => None,
    };
    // wg accepts exactly 44 characters ending in one '='; checking the text length first keeps
    // "31 bytes with == padding" from slipping through as a short key.
    if text.len() != KEY_LEN_BASE64 || !text.ends_with('=') || text.ends_with("==") {
        return Err(KeyParseError::Length {
            kind,
            len: text.chars().count(),
            input,
        });
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    match STANDARD.decode_slice(text, out.as_mut()) {
        Ok(KEY_LEN) => Ok(out),
        Ok(n) => Err(KeyParseError::Length {
            kind,
            len: n,
            input,
        }),
        Err(e) => Err(KeyParseError::Base64 {
            kind,
            reason: e.to_string(),
            input,
        }),
    }
}

/// A WireGuard private key. Zeroized when dropped; `Debug` does not show it.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// Generates a key the way `wg genkey` does: 32 random bytes, clamped for x25519.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> PrivateKey {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(bytes.as_mut());
        // Clamped like wg genkey so the stored text is byte-identical in form to wg's keys;
        // x25519 clamps anyway, so this changes no public key.
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        PrivateKey::from_bytes(*bytes)
    }

    /// Wraps raw key bytes (any 32 bytes are a valid x25519 secret).
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> PrivateKey {
        let key = PrivateKey(x25519_dalek::StaticSecret::from(bytes));
        bytes.zeroize();
        key
    }

    /// The raw key bytes, e.g. to build `boringtun::x25519::StaticSecret`.
    pub fn to_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key (what `wg pubkey` prints).
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// The key as wg-style base64 text.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0.as_bytes()))
    }

    /// Parses wg-style base64 text; errors never contain the text.
    pub fn from_base64(text: &str) -> Result<PrivateKey, KeyParseError> {
        let bytes = decode(text, KeyKind::Private)?;
        Ok(PrivateKey::from_bytes(*bytes))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The public half identifies the key without revealing it.
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        // Not constant time; only tests compare private keys.
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for PrivateKey {}

/// A WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key as wg-style base64 text.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Parses wg-style base64 text.
    pub fn from_base64(text: &str) -> Result<PublicKey, KeyParseError> {
        decode(text, KeyKind::Public).map(|b| PublicKey(*b))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PublicKey::from_base64(s)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PublicKey::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Runs the real wireguard-tools binary (installed by scripts/install-deps.sh).
    fn wg(args: &[&str], stdin: &str) -> String {
        let mut child = Command::new("wg")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the `wg` binary (wireguard-tools) must be installed for these tests");
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(stdin.as_bytes())
            .expect("write to wg");
        let out = child.wait_with_output().expect("wait for wg");
        assert!(
            out.status.success(),
            "wg {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("wg prints ASCII")
    }

    #[test]
    fn public_key_of_wg_generated_key_matches_wg_pubkey() {
        for _ in 0..5 {
            let private = wg(&["genkey"], "");
            let theirs = wg(&["pubkey"], &private);
            let ours = PrivateKey::from_base64(private.trim_end())
                .unwrap()
                .public_key();
            assert_eq!(ours.to_string(), theirs.trim_end());
            // And the private key survives our round trip byte for byte.
            assert_eq!(
                PrivateKey::from_base64(private.trim_end())
                    .unwrap()
                    .to_base64()
                    .as_str(),
                private.trim_end()
            );
        }
    }

    #[test]
    fn wg_accepts_our_generated_keys() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5 {
            let key = PrivateKey::generate(&mut rng);
            let text = key.to_base64();
            let theirs = wg(&["pubkey"], &format!("{}\n", text.as_str()));
            assert_eq!(theirs.trim_end(), key.public_key().to_string());
        }
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = PrivateKey::generate(&mut rng);
        let b = PrivateKey::generate(&mut rng);
        assert_ne!(a, b);
        let bytes = a.to_bytes();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
    }

    #[test]
    fn known_vector_from_rfc7748() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(
            PrivateKey::from_bytes(private).public_key(),
            PublicKey::from_bytes(public)
        );
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn public_key_text_round_trip() {
        let key = PrivateKey::generate(&mut StdRng::seed_from_u64(3)).public_key();
        let text = key.to_string();
        assert_eq!(text.len(), KEY_LEN_BASE64);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), key);
        assert!(serde_json::from_str::<PublicKey>("\"abc\"").is_err());
    }

    #[test]
    fn wrong_length_is_reported_with_the_public_text() {
        let err = "abc=".parse::<PublicKey>().unwrap_err();
        assert!(
            matches!(err, KeyParseError::Length { len: 4, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("public key \"abc=\""), "{msg}");
        assert!(msg.contains("expected 44 base64 characters"), "{msg}");
        // 43 characters ending in "==" would decode to 31 bytes.
        let short = format!("{}==", "A".repeat(42));
        assert!(matches!(
            short.parse::<PublicKey>(),
            Err(KeyParseError::Length { .. })
        ));
    }

    #[test]
    fn bad_base64_is_reported() {
        let text = format!("{}=", "!".repeat(43));
        let err = text.parse::<PublicKey>().unwrap_err();
        assert!(matches!(err, KeyParseError::Base64 { .. }), "{err:?}");
        assert!(err.to_string().contains("not valid base64"), "{err}");
    }

    #[test]
    fn private_key_text_never_appears_in_errors_or_debug() {
        let secret = format!("{}=", "!".repeat(43));
        let err = PrivateKey::from_base64(&secret).unwrap_err();
        assert!(!err.to_string().contains(&secret));
        assert!(!format!("{err:?}").contains(&secret));

        let key = PrivateKey::generate(&mut StdRng::seed_from_u64(9));
        let text = key.to_base64();
        let debug = format!("{key:?}");
        assert!(!debug.contains(text.as_str()), "{debug}");
        assert!(debug.contains(&key.public_key().to_string()), "{debug}");
    }
}
