//! The WireGuard messages `wg-flood` sends and reads: handshake initiations (Noise IK, with MAC1
//! and, once a cookie arrived, MAC2) and cookie replies. Pure functions over byte arrays.
//!
//! Message layout and derivations follow the WireGuard paper (section 5.4): an initiation is
//! type (4) | sender index (4) | ephemeral (32) | encrypted static (48) | encrypted timestamp (28)
//! | mac1 (16) | mac2 (16); mac1 = MAC(HASH("mac1----" || S_r), msg[..116]), mac2 = MAC(cookie,
//! msg[..132]); a cookie reply is type (4) | receiver index (4) | nonce (24) | encrypted cookie
//! (32), sealed with XChaCha20-Poly1305 under HASH("cookie--" || S_r) with the answered mac1 as AAD.

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use x25519_dalek::{PublicKey, StaticSecret};

/// Size of a handshake initiation.
pub const INIT_LEN: usize = 148;
/// Size of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// How long an initiator may use a cookie (the paper's `Cookie Refresh Time` is 120 s).
pub const COOKIE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);
const MAC1_END: usize = 116;
const MAC2_END: usize = 132;
const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // WireGuard's HMAC is RFC 2104 over BLAKE2s (not keyed BLAKE2s); keys of any length work.
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// Keyed BLAKE2s-128, WireGuard's `MAC`.
fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = Blake2sMac::<U16>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("keys here are 16 or 32 bytes"));
    Update::update(&mut m, data);
    m.finalize_fixed().into()
}

/// `KDF2(key, input)`: two chained HMAC outputs.
fn kdf2(key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t0 = hmac(key, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    (t1, t2)
}

fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = <ChaCha20Poly1305 as KeyInit>::new(key.into());
    // Counter 0: each key here seals one message.
    cipher
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 seals any short message"))
}

/// What an initiator derives once from the responder's static public key.
#[derive(Clone)]
pub struct Responder {
    static_public: [u8; 32],
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
}

impl Responder {
    /// Keys for talking to the responder with this static public key.
    pub fn new(static_public: [u8; 32]) -> Responder {
        Responder {
            static_public,
            mac1_key: hash(&[b"mac1----", &static_public]),
            cookie_key: hash(&[b"cookie--", &static_public]),
        }
    }

    /// A complete initiation (sender index 0, no MACs) from `initiator` with ephemeral
    /// `ephemeral`: the responder must do X25519 with the ephemeral key to read the static key,
    /// and the static key and timestamp are real, so it finds an unknown but well-formed peer.
    pub fn initiation(
        &self,
        initiator: &StaticSecret,
        ephemeral: &StaticSecret,
        tai64n: [u8; 12],
    ) -> [u8; INIT_LEN] {
        let s_r = PublicKey::from(self.static_public);
        let e_pub = PublicKey::from(ephemeral);
        let s_pub = PublicKey::from(initiator);
        let c = hash(&[CONSTRUCTION]);
        let h = hash(&[&c, IDENTIFIER]);
        let h = hash(&[&h, &self.static_public]);
        let c = hmac(&hmac(&c, &[e_pub.as_bytes()]), &[&[1]]);
        let h = hash(&[&h, e_pub.as_bytes()]);
        let (c, k) = kdf2(&c, ephemeral.diffie_hellman(&s_r).as_bytes());
        let enc_static = seal(&k, s_pub.as_bytes(), &h);
        let h = hash(&[&h, &enc_static]);
        let (_, k) = kdf2(&c, initiator.diffie_hellman(&s_r).as_bytes());
        let enc_time = seal(&k, &tai64n, &h);

        let mut msg = [0u8; INIT_LEN];
        msg[0] = 1;
        msg[8..40].copy_from_slice(e_pub.as_bytes());
        msg[40..88].copy_from_slice(&enc_static);
        msg[88..116].copy_from_slice(&enc_time);
        msg
    }

    /// Sets the sender index and the MACs of an initiation (MAC2 only with a cookie); returns
    /// its mac1, the AAD of a cookie reply answering it.
    pub fn stamp(
        &self,
        msg: &mut [u8; INIT_LEN],
        sender: u32,
        cookie: Option<&[u8; 16]>,
    ) -> [u8; 16] {
        msg[4..8].copy_from_slice(&sender.to_le_bytes());
        let mac1 = mac(&self.mac1_key, &msg[..MAC1_END]);
        msg[MAC1_END..MAC2_END].copy_from_slice(&mac1);
        let mac2 = cookie.map_or([0u8; 16], |c| mac(c, &msg[..MAC2_END]));
        msg[MAC2_END..].copy_from_slice(&mac2);
        mac1
    }

    /// The cookie in a cookie reply to an initiation whose mac1 was `mac1`; `None` when it does
    /// not decrypt.
    pub fn open_cookie(&self, reply: &[u8; COOKIE_REPLY_LEN], mac1: &[u8; 16]) -> Option<[u8; 16]> {
        let cipher = <XChaCha20Poly1305 as KeyInit>::new((&self.cookie_key).into());
        let nonce = chacha20poly1305::XNonce::from_slice(&reply[8..32]);
        let cookie = cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &reply[32..],
                    aad: mac1,
                },
            )
            .ok()?;
        cookie.try_into().ok()
    }
}

/// The receiver index of a cookie reply; `None` for anything else.
pub fn cookie_reply(datagram: &[u8]) -> Option<(u32, &[u8; COOKIE_REPLY_LEN])> {
    let reply: &[u8; COOKIE_REPLY_LEN] = datagram.try_into().ok()?;
    if reply[..4] != [3, 0, 0, 0] {
        return None;
    }
    let idx = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
    Some((idx, reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::handshake::parse_handshake_anon;
    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::noise::{Tunn, TunnResult};

    fn secret(seed: u8) -> StaticSecret {
        StaticSecret::from([seed; 32])
    }

    #[test]
    fn boringtun_reads_our_initiation_and_our_cookie_reply_handling() {
        let server = boringtun::x25519::StaticSecret::from([1u8; 32]);
        let server_pub = boringtun::x25519::PublicKey::from(&server);
        let r = Responder::new(*server_pub.as_bytes());
        let initiator = secret(7);
        let mut msg = r.initiation(&initiator, &secret(8), [0; 12]);
        let mac1 = r.stamp(&mut msg, 42, None);

        // The responder's anonymous parse (its X25519 work) finds our static key.
        let Ok(boringtun::noise::Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(&msg)
        else {
            panic!("not an initiation")
        };
        let half = parse_handshake_anon(&server, &server_pub, &init).expect("anon parse");
        assert_eq!(
            half.peer_static_public,
            *PublicKey::from(&initiator).as_bytes()
        );

        // A limiter that is always under load wants a cookie; we read it and prove our address.
        let limiter = RateLimiter::new(&server_pub, 0);
        let from = Some("198.51.100.12".parse().unwrap());
        let mut buf = [0u8; 64];
        let reply = match limiter.verify_packet(from, &msg, &mut buf) {
            Err(TunnResult::WriteToNetwork(reply)) => reply.to_vec(),
            _ => panic!("no cookie reply"),
        };
        let (idx, reply) = cookie_reply(&reply).expect("a cookie reply");
        assert_eq!(idx, 42);
        let cookie = r.open_cookie(reply, &mac1).expect("cookie decrypts");
        assert!(r.open_cookie(reply, &[0; 16]).is_none());
        r.stamp(&mut msg, 43, Some(&cookie));
        assert!(limiter.verify_packet(from, &msg, &mut buf).is_ok());
        // The cookie is bound to the address.
        let elsewhere = Some("198.51.100.13".parse().unwrap());
        assert!(limiter.verify_packet(elsewhere, &msg, &mut buf).is_err());
    }

    #[test]
    fn malformed_replies_are_none() {
        assert!(cookie_reply(&[]).is_none());
        assert!(cookie_reply(&[3; 63]).is_none());
        assert!(cookie_reply(&[4; 64]).is_none());
        let r = Responder::new([9; 32]);
        let mut b = [0u8; 64];
        b[0] = 3;
        let (_, reply) = cookie_reply(&b).expect("shape");
        assert!(r.open_cookie(reply, &[0; 16]).is_none());
    }
}
