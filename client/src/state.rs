//! The client's files in its directory (`--dir`, default `/etc/waygate-client`, mode 0700):
//! `client.toml` (what enrollment returned, no secrets) and `private.key` (the device's
//! WireGuard private key in `wg genkey` form, mode 0600, never sent anywhere).

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default directory.
pub const DEFAULT_DIR: &str = "/etc/waygate-client";
/// The config file's name.
pub const CONFIG_FILE: &str = "client.toml";
/// The private key file's name.
pub const KEY_FILE: &str = "private.key";

/// `client.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The enrollment listener it enrolled with (`https://HOST:PORT`).
    pub server: String,
    /// Hex SHA-256 of the gateway CA (from the token), trusted for later calls.
    pub ca_sha256: String,
    /// The device's id at the gateway.
    pub device_id: String,
    /// The device's name at the gateway.
    pub name: String,
    /// Tunnel addresses with prefix lengths.
    pub addresses: Vec<String>,
    /// The gateway's WireGuard public key.
    pub gateway_public_key: String,
    /// The gateway's WireGuard endpoint.
    pub endpoint: String,
    /// DNS servers.
    pub dns: Vec<std::net::IpAddr>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// The virtual network (absent: the default one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnet: Option<String>,
    /// Split tunnel, include mode: only these prefixes (and the DNS servers) go through the
    /// tunnel. Absent with `exclude`: full tunnel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<ipnet::IpNet>,
    /// Split tunnel, exclude mode: everything but these prefixes goes through the tunnel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<ipnet::IpNet>,
}

/// `DIR/client.toml`.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join(CONFIG_FILE)
}

/// `DIR/private.key`.
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

/// Creates `dir` (0700) if needed and makes sure nobody else may read it.
pub fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| anyhow::anyhow!("cannot chmod 0700 {}: {e}", dir.display()))?;
    Ok(())
}

/// Writes `client.toml` (0600, atomically).
pub fn write_config(dir: &Path, config: &ClientConfig) -> anyhow::Result<()> {
    let text = toml::to_string(config)?;
    let path = config_path(dir);
    waygate_keys::write_secret_file(&path, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Reads `client.toml`; `None` when the client is not enrolled.
pub fn read_config(dir: &Path) -> anyhow::Result<Option<ClientConfig>> {
    let path = config_path(dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_round_trips_in_a_private_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wc");
        ensure_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(read_config(&dir).unwrap(), None);
        let config = ClientConfig {
            server: "https://198.51.100.1:8444".into(),
            ca_sha256: "00".repeat(32),
            device_id: "id".into(),
            name: "ada".into(),
            addresses: vec!["100.96.0.2/32".into()],
            gateway_public_key: "k".into(),
            endpoint: "198.51.100.1:51820".into(),
            dns: vec!["100.96.0.1".parse().unwrap()],
            mtu: 1420,
            vnet: None,
            include: vec![],
            exclude: vec![],
        };
        write_config(&dir, &config).unwrap();
        let meta = fs::metadata(config_path(&dir)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(read_config(&dir).unwrap(), Some(config));
    }
}
