//! Waygate's secret material: WireGuard keys, key files, the gateway's certificate authority and
//! the text form of enrollment tokens ([`enroll_token`]).
//!
//! Keys are x25519 keys in the same base64 text form as `wg genkey` / `wg pubkey` (44 characters,
//! standard alphabet, one `=` of padding), so configs and key files are interchangeable with
//! wireguard-tools. Key files are written atomically with mode 0600 and refused on read when other
//! users could read them. WireGuard keys come from the RNG the caller passes in; CA keys from
//! ring's OS RNG. Nothing here reads the clock: callers pass the time in.
#![deny(missing_docs)]

mod ca;
pub mod enroll_token;
mod key_file;
mod wg_key;

pub use ca::{CaError, CertificateAuthority, IssuedCert, LeafKey, CA_CERT_FILE, CA_KEY_FILE};
pub use enroll_token::EnrollToken;
pub use key_file::{
    create_private_key, create_secret_file, read_private_key, read_secret_file, write_private_key,
    write_secret_file, KeyFileError,
};
pub use wg_key::{KeyKind, KeyParseError, PrivateKey, PublicKey, KEY_LEN, KEY_LEN_BASE64};
