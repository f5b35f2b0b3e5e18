//! The gateway's data directory (`data_dir`, `./waygate-data` by default): created on demand with
//! mode 0700, it holds the server's WireGuard key (`server.key`, 0600) and the registry
//! (`registry.db`). Both `waygate serve` and the `waygate device` CLI call into here, whichever
//! runs first creates the key, and they end up with the same one.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use waygate_keys::{KeyFileError, PrivateKey};

/// File name of the server's private key inside the data directory.
pub const SERVER_KEY_FILE: &str = "server.key";

/// Why the data directory or the server key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The key file exists but cannot be used, or cannot be written.
    #[error("server key: {0}")]
    Key(#[from] KeyFileError),
}

/// Creates `data_dir` (and missing parents) with mode 0700 if it does not exist yet; an existing
/// directory keeps its mode.
pub fn ensure_data_dir(data_dir: &Path) -> Result<(), DataDirError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| DataDirError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })
}

/// Path of the server key inside `data_dir`.
pub fn server_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SERVER_KEY_FILE)
}

/// Loads `<data_dir>/server.key`, generating it (mode 0600) on first use. A key file that group
/// or others can read is refused, with the `chmod` that fixes it.
pub fn load_or_create_server_key(data_dir: &Path) -> Result<PrivateKey, DataDirError> {
    ensure_data_dir(data_dir)?;
    let path = server_key_path(data_dir);
    match waygate_keys::read_private_key(&path) {
        Ok(key) => return Ok(key),
        Err(KeyFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let key = PrivateKey::generate(&mut rand::rngs::OsRng);
    match waygate_keys::create_private_key(&path, &key) {
        Ok(()) => Ok(key),
        // Another process (the server or a concurrent CLI) created it first: use theirs.
        Err(KeyFileError::AlreadyExists { .. }) => Ok(waygate_keys::read_private_key(&path)?),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested").join("waygate-data");
        let first = load_or_create_server_key(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&server_key_path(&dir)), 0o600);
        let second = load_or_create_server_key(&dir).unwrap();
        assert_eq!(first.public_key(), second.public_key());
    }

    #[test]
    fn readable_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let original = load_or_create_server_key(tmp.path()).unwrap().public_key();
        let path = server_key_path(tmp.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_server_key(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // It must not have been replaced by a fresh key either.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let again = load_or_create_server_key(tmp.path()).unwrap().public_key();
        assert_eq!(again, original);
    }
}
