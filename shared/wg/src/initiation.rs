//! The responder's reading of a handshake initiation, before any `Tunn` exists for its peer:
//! who sent it (the initiator's static key) and when (its TAI64N timestamp).
//!
//! boringtun's `parse_handshake_anon` gives the static key but not the timestamp, and keeps the
//! last accepted timestamp inside the `Tunn`. A peer's `Tunn` is dropped when it goes idle (it
//! is most of a peer's memory), so the endpoint keeps the last accepted timestamp itself and
//! refuses an initiation that is not newer: without that, an initiation recorded before the drop
//! would be accepted again by the new `Tunn` (a replay). The steps are the paper's (section
//! 5.4.2), the same as boringtun's `receive_handshake_initialization` up to the timestamp.

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Digest};
use boringtun::x25519::{PublicKey, SharedSecret, StaticSecret};
use chacha20poly1305::aead::{AeadInPlace, Tag};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

/// A TAI64N timestamp as sent: 8 bytes of seconds then 4 of nanoseconds, both big-endian, so
/// byte order is time order.
pub type Timestamp = [u8; 12];

/// `HASH(CONSTRUCTION)`, WireGuard's initial chaining key.
const INITIAL_CHAIN_KEY: [u8; 32] = [
    96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208, 22, 235, 66, 6, 248,
    114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54,
];
/// `HASH(HASH(CONSTRUCTION) || IDENTIFIER)`, WireGuard's initial hash.
const INITIAL_CHAIN_HASH: [u8; 32] = [
    34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50, 45, 156, 108, 102, 34,
    147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243,
];

fn hash(a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, a);
    Digest::update(&mut h, b);
    h.finalize().into()
}

fn hmac(key: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
    // RFC 2104 HMAC over BLAKE2s; any key length is valid, so the error arm cannot happen.
    let Ok(mut m) = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key) else {
        return [0; 32];
    };
    Update::update(&mut m, a);
    Update::update(&mut m, b);
    m.finalize_fixed().into()
}

/// `KDF2(key, input)`.
fn kdf2(key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t0 = hmac(key, input, &[]);
    let t1 = hmac(&t0, &[1], &[]);
    let t2 = hmac(&t0, &t1, &[2]);
    (t1, t2)
}

/// ChaCha20-Poly1305 open with counter 0 (every AEAD of an initiation uses nonce 0).
fn open<const N: usize>(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<[u8; N]> {
    if sealed.len() != N + 16 {
        return None;
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&sealed[..N]);
    let tag = Tag::<ChaCha20Poly1305>::from_slice(&sealed[N..]);
    ChaCha20Poly1305::new(key.into())
        .decrypt_in_place_detached(&Nonce::default(), aad, &mut out, tag)
        .ok()?;
    Some(out)
}

/// An initiation read up to the initiator's static key.
pub struct Opened<'a> {
    /// The initiator's static public key.
    pub peer_static: [u8; 32],
    /// The initiator's ephemeral public key.
    pub ephemeral: [u8; 32],
    /// `DH(our static, the initiator's ephemeral)`: the responder needs it again to answer
    /// (`Tunn::hint_initiation_dh` spares it the second X25519). `None` when attached again on
    /// another shard: the secret does not travel, so the owner's boringtun computes it (once per
    /// handed-off handshake).
    pub ephemeral_shared: Option<SharedSecret>,
    chaining_key: [u8; 32],
    hash: [u8; 32],
    encrypted_timestamp: &'a [u8],
}

/// Reads who sent the initiation `datagram` (type | sender index | ephemeral (32) | encrypted
/// static (48) | encrypted timestamp (28) | macs), with one X25519 of our static key. `None`:
/// too short, not for us, or tampered.
pub fn open_initiation<'a>(
    private: &StaticSecret,
    public: &PublicKey,
    datagram: &'a [u8],
) -> Option<Opened<'a>> {
    let ephemeral: [u8; 32] = datagram.get(8..40)?.try_into().ok()?;
    let encrypted_static = datagram.get(40..88)?;
    let encrypted_timestamp = datagram.get(88..116)?;
    let ephemeral = PublicKey::from(ephemeral);
    let h = hash(&INITIAL_CHAIN_HASH, public.as_bytes());
    let h = hash(&h, ephemeral.as_bytes());
    let (ck, _) = kdf2(&INITIAL_CHAIN_KEY, ephemeral.as_bytes());
    let ephemeral_shared = private.diffie_hellman(&ephemeral);
    let (ck, key) = kdf2(&ck, ephemeral_shared.as_bytes());
    let peer_static = open::<32>(&key, encrypted_static, &h)?;
    Some(Opened {
        peer_static,
        ephemeral: ephemeral.to_bytes(),
        ephemeral_shared: Some(ephemeral_shared),
        chaining_key: ck,
        hash: hash(&h, encrypted_static),
        encrypted_timestamp,
    })
}

/// An [`Opened`] without its borrow of the datagram, to travel with the datagram to the shard
/// that owns the peer (which then repeats no X25519 to read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detached {
    peer_static: [u8; 32],
    chaining_key: [u8; 32],
    hash: [u8; 32],
}

impl Detached {
    /// The initiator's static public key.
    pub fn peer_static(&self) -> &[u8; 32] {
        &self.peer_static
    }

    /// The [`Opened`] of `datagram`, the initiation this was detached from. `None`: too short.
    pub fn attach<'a>(&self, datagram: &'a [u8]) -> Option<Opened<'a>> {
        Some(Opened {
            peer_static: self.peer_static,
            ephemeral: datagram.get(8..40)?.try_into().ok()?,
            ephemeral_shared: None,
            chaining_key: self.chaining_key,
            hash: self.hash,
            encrypted_timestamp: datagram.get(88..116)?,
        })
    }
}

impl Opened<'_> {
    /// Keeps what opening found, without the datagram.
    pub fn detach(&self) -> Detached {
        Detached {
            peer_static: self.peer_static,
            chaining_key: self.chaining_key,
            hash: self.hash,
        }
    }

    /// The initiation's timestamp, given `DH(our static, the peer's static)`. `None`: the
    /// initiation was not made with the peer's private key.
    pub fn timestamp(&self, static_shared: &[u8; 32]) -> Option<Timestamp> {
        let (_, key) = kdf2(&self.chaining_key, static_shared);
        open::<12>(&key, self.encrypted_timestamp, &self.hash)
    }
}

/// `DH(our static, the peer's static)`, which every initiation of that peer needs.
pub fn static_shared(private: &StaticSecret, peer: &[u8; 32]) -> SharedSecret {
    private.diffie_hellman(&PublicKey::from(*peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{key, public};
    use boringtun::noise::{Tunn, TunnResult};

    fn initiation(dev: &mut Tunn) -> Vec<u8> {
        let mut buf = [0u8; 148];
        match dev.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_static_key_and_a_growing_timestamp_of_boringtuns_initiations() {
        let gw = StaticSecret::from(key(1));
        let gw_public = PublicKey::from(&gw);
        let mut dev = Tunn::new(StaticSecret::from(key(2)), gw_public, None, None, 7, None);
        let shared = static_shared(&gw, &public(key(2))).to_bytes();
        let mut last = [0u8; 12];
        for _ in 0..3 {
            let d = initiation(&mut dev);
            let opened = open_initiation(&gw, &gw_public, &d).unwrap();
            assert_eq!(opened.peer_static, public(key(2)));
            let ts = opened.timestamp(&shared).unwrap();
            assert!(ts > last);
            last = ts;
            // A wrong static secret (another peer's) cannot read the timestamp.
            assert!(opened
                .timestamp(&static_shared(&gw, &public(key(3))).to_bytes())
                .is_none());
            // Detached and attached again (another shard), it reads the same.
            let again = opened.detach().attach(&d).unwrap();
            assert_eq!(again.timestamp(&shared), Some(ts));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Another gateway cannot read it at all.
        let other = StaticSecret::from(key(4));
        let d = initiation(&mut dev);
        assert!(open_initiation(&other, &PublicKey::from(&other), &d).is_none());
        assert!(open_initiation(&gw, &gw_public, &d[..100]).is_none());
    }
    /// The patched boringtun (shared/boringtun) takes the DH the endpoint computed opening the
    /// initiation, and only for the initiation it was computed for.
    #[test]
    fn a_responder_hinted_with_the_opening_dh_answers_and_a_wrong_hint_is_ignored() {
        let gw = StaticSecret::from(key(1));
        let gw_public = PublicKey::from(&gw);
        let mut dev = Tunn::new(StaticSecret::from(key(2)), gw_public, None, None, 7, None);
        let mut responder = Tunn::with_keys(
            gw.clone(),
            gw_public,
            PublicKey::from(public(key(2))),
            Some(static_shared(&gw, &public(key(2)))),
            None,
            None,
            9,
            None,
        );
        let mut buf = [0u8; 256];
        for wrong in [false, true, false] {
            let d = initiation(&mut dev);
            let opened = open_initiation(&gw, &gw_public, &d).unwrap();
            if wrong {
                // Another initiation's DH: boringtun must see it is not this one's.
                let mut other_dev =
                    Tunn::new(StaticSecret::from(key(3)), gw_public, None, None, 8, None);
                let other_init = initiation(&mut other_dev);
                let other = open_initiation(&gw, &gw_public, &other_init).unwrap();
                responder.hint_initiation_dh(other.ephemeral, other.ephemeral_shared.unwrap());
            } else {
                responder.hint_initiation_dh(opened.ephemeral, opened.ephemeral_shared.unwrap());
            }
            let response = match responder.decapsulate(None, &d, &mut buf) {
                TunnResult::WriteToNetwork(r) => r.to_vec(),
                other => panic!("{other:?}"),
            };
            let mut out = [0u8; 256];
            assert!(
                matches!(
                    dev.decapsulate(None, &response, &mut out),
                    TunnResult::WriteToNetwork(_) | TunnResult::Done
                ),
                "the device accepts the response"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}
