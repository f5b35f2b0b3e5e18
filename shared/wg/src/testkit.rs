//! Test kit of the WireGuard crate: the shared builders of `waygate-model`, and keys.

use boringtun::x25519::{PublicKey, StaticSecret};
pub use waygate_model::testkit::*;

/// A clamped X25519 private key made of `seed` (same seed, same key).
pub fn key(seed: u8) -> [u8; 32] {
    let mut k = [seed; 32];
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

/// The public key of `private`.
pub fn public(private: [u8; 32]) -> [u8; 32] {
    *PublicKey::from(&StaticSecret::from(private)).as_bytes()
}
