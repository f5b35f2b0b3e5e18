//! Secret files (mode 0600): private keys in `wg genkey` format (one base64 line), CA keys.
//!
//! Writes go to a temporary file in the same directory (created 0600, so the key is never readable
//! by others even briefly), are fsynced, then moved into place, so a crash leaves either the old
//! file or the new one. Reads refuse files that group or others may access.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroizing;

use crate::wg_key::{KeyParseError, PrivateKey, KEY_LEN_BASE64};

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file may be read by group or others.
    #[error(
        "{path}: private key file is group/world-readable (mode {mode:04o}); \
         it must be readable by its owner only: run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is not a regular file.
    #[error("{path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file does not hold a key.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why the text is not a key.
        source: KeyParseError,
    },
    /// [`create_private_key`] found the file already there.
    #[error("{path}: already exists")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `key` to `path` (mode 0600), atomically replacing any existing file.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyFileError> {
    write_secret_file(path, key_line(key).as_bytes())
}

/// Writes `key` to `path` (mode 0600) only if no file is there yet; otherwise
/// [`KeyFileError::AlreadyExists`]. Two processes racing here never both succeed, and neither
/// can observe a half-written file.
pub fn create_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyFileError> {
    create_secret_file(path, key_line(key).as_bytes())
}

fn key_line(key: &PrivateKey) -> Zeroizing<String> {
    let mut line = Zeroizing::new(String::with_capacity(KEY_LEN_BASE64 + 1));
    line.push_str(key.to_base64().as_str());
    line.push('\n');
    line
}

/// Writes secret `bytes` to `path` (mode 0600), atomically replacing any existing file.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    replace_file(path, bytes, 0o600)
}

/// Writes `bytes` to `path` with `mode`, atomically replacing any existing file (the CA's public
/// certificate goes through here too).
pub(crate) fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let tmp = write_temp(path, bytes, mode)?;
    let result = fs::rename(&tmp, path).map_err(io_err(path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path)
}

/// Writes secret `bytes` to `path` (mode 0600) only if no file is there yet; otherwise
/// [`KeyFileError::AlreadyExists`].
pub fn create_secret_file(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    let tmp = write_temp(path, bytes, 0o600)?;
    // link(2) fails if the target exists, which rename(2) would silently replace.
    let result = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(KeyFileError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads a key written by us or by `wg genkey > FILE`, refusing files others may read.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    // A key file is one short line; the cap keeps a wrong path (a huge file) from being slurped.
    let bytes = read_secret_file(path, 4 * KEY_LEN_BASE64)?;
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    // wg tolerates trailing whitespace (the newline `wg genkey >` writes); so do we.
    PrivateKey::from_base64(text.trim_end()).map_err(|source| KeyFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads at most `cap` bytes of a secret file, refusing files group or others may access.
pub fn read_secret_file(path: &Path, cap: usize) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    // Checking the opened file (not the path) leaves no window for a swap between check and read.
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    (&mut file)
        .take(cap as u64)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    Ok(bytes)
}

/// Creates `.NAME.tmp.PID.N` beside `path` with `mode` (0600 for secrets, so they are never
/// readable by others even briefly), writes and fsyncs `bytes`.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, KeyFileError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| KeyFileError::NotAFile {
        path: path.to_path_buf(),
    })?;
    let tmp_name = format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = path.with_file_name(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    Ok(tmp)
}

/// Fsyncs the directory holding `path` so the new name survives a crash.
fn sync_parent(path: &Path) -> Result<(), KeyFileError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err(parent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn key(seed: u64) -> PrivateKey {
        PrivateKey::generate(&mut StdRng::seed_from_u64(seed))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_then_read_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let k = key(1);
        write_private_key(&path, &k).unwrap();
        assert_eq!(mode(&path), 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", k.to_base64().as_str()));
        assert_eq!(read_private_key(&path).unwrap(), k);
        // Replacing works and leaves no temporary files behind.
        let k2 = key(2);
        write_private_key(&path, &k2).unwrap();
        assert_eq!(read_private_key(&path).unwrap(), k2);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn create_refuses_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        create_private_key(&path, &key(1)).unwrap();
        let err = create_private_key(&path, &key(2)).unwrap_err();
        assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err}");
        assert_eq!(read_private_key(&path).unwrap(), key(1));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_private_key(&path, &key(1)).unwrap();
        for bad in [0o644, 0o640, 0o604, 0o610] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = read_private_key(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Permissions { mode, .. } if mode == bad),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_private_key(&path).is_ok());
    }

    #[test]
    fn reads_wg_genkey_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        let out = Command::new("wg")
            .arg("genkey")
            .output()
            .expect("the `wg` binary (wireguard-tools) must be installed for this test");
        assert!(out.status.success());
        fs::write(&path, &out.stdout).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let k = read_private_key(&path).unwrap();
        assert_eq!(
            k.to_base64().as_str(),
            String::from_utf8(out.stdout).unwrap().trim_end()
        );
    }

    #[test]
    fn garbage_and_missing_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, "hello\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_private_key(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Parse { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(!err.to_string().contains("hello"));

        let missing = dir.path().join("missing");
        let err = read_private_key(&missing).unwrap_err();
        assert!(matches!(err, KeyFileError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing"));

        let err = read_private_key(dir.path()).unwrap_err();
        assert!(matches!(err, KeyFileError::NotAFile { .. }), "{err}");
    }
}
