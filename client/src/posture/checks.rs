//! One function per kind of fact, each reading under a root directory. A fact that cannot be
//! read is reported as absent (a missing file, no serial), never guessed.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use waygate_posture::{CertificateFact, DiskFact, FileFact, ProcessFact};

/// Most dm devices followed below a mount point (LVM on LUKS on RAID is three).
const MAX_DEPTH: usize = 8;

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Hex SHA-256 of a file's contents, read in chunks.
fn sha256_of(path: &Path) -> Option<String> {
    let mut file = fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Largest certificate file read (a bundle of a few certificates and a key is a few KiB).
const MAX_CERT_FILE: u64 = 1024 * 1024;

/// The `CERTIFICATE` blocks of the PEM file at `path`; its private key, if the file holds
/// one, is never part of the fact.
pub fn certificate(root: &Path, path: &str) -> CertificateFact {
    let text = fs::File::open(under(root, path)).ok().and_then(|f| {
        let mut text = String::new();
        f.take(MAX_CERT_FILE).read_to_string(&mut text).ok()?;
        Some(text)
    });
    CertificateFact {
        path: path.to_string(),
        pem: text
            .as_deref()
            .and_then(waygate_posture::certificate_blocks)
            .filter(|p| p.len() <= waygate_posture::MAX_PEM),
    }
}

/// Whether `path` is a regular file (symlinks followed), with its hash.
pub fn file(root: &Path, path: &str) -> FileFact {
    let full = under(root, path);
    let exists = fs::metadata(&full).is_ok_and(|m| m.is_file());
    FileFact {
        path: path.to_string(),
        exists,
        sha256: exists.then(|| sha256_of(&full)).flatten(),
    }
}

/// For each path, whether some process runs it, and the running image's hash (read through
/// `/proc/PID/exe`, so a replaced file on disk does not hide what runs).
pub fn processes(root: &Path, paths: &[String]) -> Vec<ProcessFact> {
    let mut found: Vec<Option<PathBuf>> = vec![None; paths.len()];
    if !paths.is_empty() {
        if let Ok(entries) = fs::read_dir(under(root, "/proc")) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let exe = entry.path().join("exe");
                let Ok(target) = fs::read_link(&exe) else {
                    continue;
                };
                let target = target.to_string_lossy();
                let target = target.strip_suffix(" (deleted)").unwrap_or(&target);
                for (i, p) in paths.iter().enumerate() {
                    if found[i].is_none() && target == p.as_str() {
                        found[i] = Some(exe.clone());
                    }
                }
            }
        }
    }
    paths
        .iter()
        .zip(found)
        .map(|(path, exe)| ProcessFact {
            path: path.clone(),
            running: exe.is_some(),
            sha256: exe.and_then(|e| sha256_of(&e)),
        })
        .collect()
}

/// The running kernel's release (`uname -r`).
pub fn kernel(root: &Path) -> Option<String> {
    let text = fs::read_to_string(under(root, "/proc/sys/kernel/osrelease")).ok()?;
    Some(text.trim().to_string()).filter(|s| !s.is_empty())
}

/// `ID` and `VERSION_ID` of os-release.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID`.
    pub id: Option<String>,
    /// `VERSION_ID`.
    pub version_id: Option<String>,
}

/// `/etc/os-release`, else `/usr/lib/os-release` (os-release(5)).
pub fn os_release(root: &Path) -> OsRelease {
    let text = fs::read_to_string(under(root, "/etc/os-release"))
        .or_else(|_| fs::read_to_string(under(root, "/usr/lib/os-release")))
        .unwrap_or_default();
    let mut out = OsRelease::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value
            .trim()
            .trim_matches('"')
            .trim_matches('\'')
            .to_string();
        match key.trim() {
            "ID" => out.id = Some(value),
            "VERSION_ID" => out.version_id = Some(value),
            _ => {}
        }
    }
    out
}

/// The system serial number; unreadable (not root), empty or a placeholder: none.
pub fn serial(root: &Path) -> Option<String> {
    let text = fs::read_to_string(under(root, "/sys/class/dmi/id/product_serial")).ok()?;
    let s = text.trim();
    // Firmware fills the field with these when it has no serial.
    let placeholder = [
        "",
        "0",
        "None",
        "Not Specified",
        "To Be Filled By O.E.M.",
        "Default string",
    ];
    (!placeholder.contains(&s)).then(|| s.to_string())
}

/// Whether the block device of mount point `mount` lies on a dm-crypt device.
pub fn disk(root: &Path, mount: &str) -> DiskFact {
    DiskFact {
        mount: mount.to_string(),
        encrypted: block_of(root, mount).is_some_and(|dev| encrypted(root, &dev, 0)),
    }
}

/// The `/sys/class/block` name of the device mounted at `mount` (the last mount there wins),
/// from `/proc/self/mountinfo`: its major:minor, else its source's name (`/dev/mapper/X` is the
/// dm device named X).
fn block_of(root: &Path, mount: &str) -> Option<String> {
    let text = fs::read_to_string(under(root, "/proc/self/mountinfo")).ok()?;
    let line = text.lines().rfind(|l| l.split(' ').nth(4) == Some(mount))?;
    let class = under(root, "/sys/class/block");
    let devnum = line.split(' ').nth(2)?;
    if let Ok(target) = fs::read_link(under(root, &format!("/sys/dev/block/{devnum}"))) {
        if let Some(name) = target.file_name() {
            return Some(name.to_string_lossy().to_string());
        }
    }
    // After " - ": the file system type, then the source.
    let source = line.split(" - ").nth(1)?.split(' ').nth(1)?;
    if let Some(mapped) = source.strip_prefix("/dev/mapper/") {
        for entry in fs::read_dir(&class).ok()?.flatten() {
            let name = fs::read_to_string(entry.path().join("dm/name")).unwrap_or_default();
            if name.trim() == mapped {
                return Some(entry.file_name().to_string_lossy().to_string());
            }
        }
        return None;
    }
    let name = source.strip_prefix("/dev/")?;
    class.join(name).exists().then(|| name.to_string())
}

/// Whether block device `name` is, or lies on, a dm-crypt device (`dm/uuid` starting `CRYPT-`).
fn encrypted(root: &Path, name: &str, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let dev = under(root, "/sys/class/block").join(name);
    let uuid = fs::read_to_string(dev.join("dm/uuid")).unwrap_or_default();
    if uuid.starts_with("CRYPT-") {
        return true;
    }
    // A partition's parent is the directory above it; dm and md devices list what they sit on.
    fs::read_dir(dev.join("slaves"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| encrypted(root, &e.file_name().to_string_lossy(), depth + 1))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, path: &str, text: &str) {
        let full = under(root, path);
        fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        fs::write(full, text).expect("write");
    }

    #[test]
    fn files_exist_with_their_hash_or_not() {
        let tmp = tempfile::tempdir().expect("tmp");
        write(tmp.path(), "/etc/agent.conf", "test");
        let f = file(tmp.path(), "/etc/agent.conf");
        assert!(f.exists);
        assert_eq!(
            f.sha256.as_deref(),
            Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
        );
        let missing = file(tmp.path(), "/etc/none");
        assert!(!missing.exists && missing.sha256.is_none());
        fs::create_dir_all(tmp.path().join("etc/dir")).expect("dir");
        assert!(
            !file(tmp.path(), "/etc/dir").exists,
            "a directory is not a file"
        );
    }

    #[test]
    fn running_executables_are_found_through_a_fake_proc() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("root");
        let bin = tmp.path().join("agent");
        fs::write(&bin, "test").expect("bin");
        fs::create_dir_all(root.join("proc/42")).expect("proc");
        fs::create_dir_all(root.join("proc/self")).expect("self");
        symlink(&bin, root.join("proc/42/exe")).expect("exe link");
        fs::create_dir_all(root.join("proc/43")).expect("proc");
        symlink("/usr/bin/old (deleted)", root.join("proc/43/exe")).expect("deleted link");
        let agent = bin.to_string_lossy().to_string();
        let got = processes(
            &root,
            &[agent.clone(), "/usr/bin/old".into(), "/usr/bin/none".into()],
        );
        assert!(got[0].running);
        assert_eq!(
            got[0].sha256.as_deref(),
            Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
        );
        assert!(got[1].running, "a deleted executable still runs");
        assert!(!got[2].running);
    }

    #[test]
    fn certificate_files_give_their_certificates_and_never_a_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let bundle = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n\
                      -----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n";
        write(tmp.path(), "/etc/waygate/device.pem", bundle);
        let c = certificate(tmp.path(), "/etc/waygate/device.pem");
        let pem = c.pem.expect("a certificate");
        assert!(pem.contains("MIIB") && !pem.contains("SECRET") && !pem.contains("PRIVATE"));
        assert_eq!(certificate(tmp.path(), "/etc/none.pem").pem, None);
        write(
            tmp.path(),
            "/etc/key.pem",
            "-----BEGIN PRIVATE KEY-----\nSECRET\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(
            certificate(tmp.path(), "/etc/key.pem").pem,
            None,
            "a key alone is no certificate"
        );
    }

    #[test]
    fn kernel_distro_and_serial() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = tmp.path();
        assert_eq!(kernel(r), None);
        assert_eq!(os_release(r), OsRelease::default());
        write(r, "/proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        write(
            r,
            "/usr/lib/os-release",
            "NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\n",
        );
        assert_eq!(kernel(r).as_deref(), Some("6.1.0-18-amd64"));
        let os = os_release(r);
        assert_eq!(
            (os.id.as_deref(), os.version_id.as_deref()),
            (Some("debian"), Some("12"))
        );
        write(r, "/etc/os-release", "ID=ubuntu\nVERSION_ID='24.04'\n");
        assert_eq!(
            os_release(r).version_id.as_deref(),
            Some("24.04"),
            "/etc first"
        );
        assert_eq!(serial(r), None);
        write(
            r,
            "/sys/class/dmi/id/product_serial",
            "To Be Filled By O.E.M.\n",
        );
        assert_eq!(serial(r), None);
        write(r, "/sys/class/dmi/id/product_serial", "PF3ABCDE\n");
        assert_eq!(serial(r).as_deref(), Some("PF3ABCDE"));
    }

    /// `/` on LVM on LUKS on sda2 (found by major:minor), `/boot` plain on sda1, `/home` on a
    /// dm-crypt device named by its source only.
    #[test]
    fn root_inside_a_crypt_device_is_encrypted_and_a_plain_partition_is_not() {
        let tmp = tempfile::tempdir().expect("tmp");
        let r = tmp.path();
        write(
            r,
            "/proc/self/mountinfo",
            "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n\
             23 22 8:1 / /boot rw shared:2 - ext4 /dev/sda1 rw\n\
             24 22 0:40 / /home rw shared:3 - btrfs /dev/mapper/home rw\n",
        );
        for (name, uuid) in [
            ("dm-0", "CRYPT-LUKS2-abcdef-sda2_crypt"),
            ("dm-1", "LVM-xyz"),
            ("dm-2", "CRYPT-LUKS2-123-home"),
        ] {
            write(r, &format!("/sys/class/block/{name}/dm/uuid"), uuid);
        }
        write(r, "/sys/class/block/dm-2/dm/name", "home\n");
        fs::create_dir_all(r.join("sys/class/block/dm-1/slaves/dm-0")).expect("slave");
        fs::create_dir_all(r.join("sys/class/block/dm-0/slaves/sda2")).expect("slave");
        fs::create_dir_all(r.join("sys/class/block/sda1")).expect("sda1");
        fs::create_dir_all(r.join("sys/class/block/sda2")).expect("sda2");
        fs::create_dir_all(r.join("sys/dev/block")).expect("dev");
        symlink(
            "../../devices/virtual/block/dm-1",
            r.join("sys/dev/block/254:1"),
        )
        .expect("link");
        symlink(
            "../../devices/pci/block/sda/sda1",
            r.join("sys/dev/block/8:1"),
        )
        .expect("link");
        assert!(disk(r, "/").encrypted, "LVM on LUKS");
        assert!(!disk(r, "/boot").encrypted);
        assert!(disk(r, "/home").encrypted, "found by its source's dm name");
        assert!(!disk(r, "/srv").encrypted, "not mounted");
    }
}
