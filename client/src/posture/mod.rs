//! Collects the facts the gateway's posture rules ask about, from a root directory (`/` on a
//! device, a fake tree in tests): files and their SHA-256, running executables
//! (`/proc/PID/exe`), the kernel (`/proc/sys/kernel/osrelease`, what `uname -r` prints) and
//! distribution (`/etc/os-release`), whether mount points lie on dm-crypt devices, and the
//! system serial number (`/sys/class/dmi/id/product_serial`, what `dmidecode -s
//! system-serial-number` reads), and the certificates (never the keys) of PEM files. The client
//! reports facts only; the gateway decides.

mod checks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::device_api::{Api as _, DeviceApi};

use waygate_posture::{Facts, PostureRule};

/// Where facts are read from.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Host {
    /// This machine.
    pub fn real() -> Self {
        Host {
            root: PathBuf::from("/"),
        }
    }

    /// A tree standing in for `/` (tests).
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Host { root: root.into() }
    }

    /// The facts `rules` need, and the OS and client facts every report carries.
    pub fn facts(&self, rules: &[PostureRule]) -> Facts {
        let wanted = waygate_posture::wanted(rules);
        let os = checks::os_release(&self.root);
        Facts {
            platform: "linux".into(),
            client_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            kernel: checks::kernel(&self.root),
            os_distro_name: os.id,
            os_distro_revision: os.version_id,
            serial_number: wanted.serial.then(|| checks::serial(&self.root)).flatten(),
            files: wanted
                .files
                .iter()
                .map(|p| checks::file(&self.root, p))
                .collect(),
            processes: checks::processes(&self.root, &wanted.processes),
            disks: wanted
                .disks
                .iter()
                .map(|m| checks::disk(&self.root, m))
                .collect(),
            certificates: wanted
                .certificates
                .iter()
                .map(|p| checks::certificate(&self.root, p))
                .collect(),
        }
    }
}

/// `waygate-client posture run [--json] [--report]`: the profile's checks, the facts for them,
/// and with `--report` the gateway's verdicts on them.
pub fn run_cmd(dir: &Path, json: bool, report: bool) -> anyhow::Result<ExitCode> {
    let api = DeviceApi::for_dir(dir)?;
    let rules = api.profile()?.linux_checks();
    let facts = Host::real().facts(&rules);
    if json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
    } else {
        println!(
            "{} check(s); kernel {}, {} {}, client {}",
            rules.len(),
            facts.kernel.as_deref().unwrap_or("?"),
            facts.os_distro_name.as_deref().unwrap_or("?"),
            facts.os_distro_revision.as_deref().unwrap_or("?"),
            facts.client_version.as_deref().unwrap_or("?")
        );
        for f in &facts.files {
            let state = if f.exists { "exists" } else { "missing" };
            println!(
                "file {} {state} {}",
                f.path,
                f.sha256.as_deref().unwrap_or("")
            );
        }
        for p in &facts.processes {
            let state = if p.running { "running" } else { "not running" };
            println!(
                "application {} {state} {}",
                p.path,
                p.sha256.as_deref().unwrap_or("")
            );
        }
        for d in &facts.disks {
            let state = if d.encrypted {
                "encrypted"
            } else {
                "not encrypted"
            };
            println!("disk {} {state}", d.mount);
        }
        if let Some(s) = &facts.serial_number {
            println!("serial {s}");
        }
        for c in &facts.certificates {
            let n = c
                .pem
                .as_deref()
                .map_or(0, |p| p.matches("BEGIN CERTIFICATE").count());
            println!("certificate file {} has {n} certificate(s)", c.path);
        }
    }
    if report {
        let results = api.report(&facts)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&results)?);
        } else {
            for (id, r) in &results {
                let verdict = if r.passed { "passed" } else { "failed" };
                println!("{id} ({}): {verdict}: {}", r.name, r.reason);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
