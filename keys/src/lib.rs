//! Waygate's secret material: WireGuard keys and key files.
//!
//! Keys are x25519 keys in the same base64 text form as `wg genkey` / `wg pubkey` (44 characters,
//! standard alphabet, one `=` of padding), so configs and key files are interchangeable with
//! wireguard-tools. Key files are written atomically with mode 0600 and refused on read when other
//! users could read them. Nothing here reads the clock or the OS RNG: callers pass an RNG in.
#![deny(missing_docs)]

mod key_file;
mod wg_key;

pub use key_file::{create_private_key, read_private_key, write_private_key, KeyFileError};
pub use wg_key::{KeyKind, KeyParseError, PrivateKey, PublicKey, KEY_LEN, KEY_LEN_BASE64};
