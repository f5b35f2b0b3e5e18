//! The gateway's business logic that the command line and the admin API share: enrolling a
//! device and writing its wg-quick config, finding the endpoint devices dial, the operations on
//! devices, groups and virtual networks ([`ops`]), the rules and lists the API manages
//! ([`rules`], [`lists`]), the API's bearer tokens ([`tokens`]), enrollment tokens with
//! what they buy ([`enrollment`]) behind a per-source limit on guessing ([`ratelimit`]), device
//! posture rules ([`posture`]) and the device API inside the tunnel ([`device_api`]).
//!
//! Inputs: requests (the CLI's flags, the admin API's bodies), the config and the registry.
//! Outputs: typed results and errors ([`ControlError::kind`] says which HTTP status fits);
//! printing and HTTP are the callers' business. Called per request; nothing here keeps state
//! between calls.
#![deny(missing_docs)]

pub mod device_api;
pub mod enrollment;
pub mod lists;
pub mod ops;
pub mod posture;
pub mod ratelimit;
pub mod rules;
pub mod time;
pub mod tokens;

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use serde::{Deserialize, Serialize};
use waygate_config::{Config, TunnelConfig, WireguardConfig};
use waygate_keys::{PrivateKey, PublicKey};
use waygate_registry::{datadir, Device, NewDevice, Registry, RegistryError};

/// Where the primary-address probe "connects" to (TEST-NET-3; connecting a UDP socket only asks
/// the kernel for a route, no packet is sent).
const PROBE_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 51820);
/// IPv6 probe target (documentation prefix), tried when there is no IPv4 route.
const PROBE_V6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    51820,
);
/// Keepalive written into device configs: keeps NAT mappings open so the gateway can reach them.
const PERSISTENT_KEEPALIVE: u16 = 25;

/// What enrolling a device asks for (the CLI's flags, the admin API's body).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollRequest {
    /// Device name (`None`: derived from the email).
    pub name: Option<String>,
    /// The user's email.
    pub email: String,
    /// The user's display name.
    pub user_name: Option<String>,
    /// Group names.
    pub groups: Vec<String>,
    /// User attributes, `name=value`.
    pub attributes: Vec<String>,
    /// Virtual network (id or name); `None`: the default network.
    pub vnet: Option<String>,
    /// The device's own public key (base64); `None`: a key pair is made here.
    pub public_key: Option<String>,
}

/// A device just enrolled, with what it needs to connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    /// The registry's record.
    pub device: Device,
    /// Its complete wg-quick config (with the private key when it was made here).
    pub wg_quick: String,
    /// The gateway endpoint written into the config.
    pub endpoint: String,
    /// True when `endpoint` was derived from this host's addresses, not configured.
    pub endpoint_derived: bool,
}

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The data directory (server key) could not be read or created.
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    /// `--public-key` is not a WireGuard public key.
    #[error("--public-key: {0}")]
    PublicKey(String),
    /// The gateway's address for device configs is unknown.
    #[error(
        "cannot work out the gateway's address for device configs{0}: set wireguard.public_endpoint = \"host:port\" in the config"
    )]
    NoEndpoint(String),
    /// A request's value is invalid: the field at fault and, inside an expression, where.
    #[error("{field}: {}{message}", position(*line, *column))]
    Invalid {
        /// The field (`traffic`, `items[2].value`, `body`).
        field: String,
        /// What is wrong.
        message: String,
        /// 1-based line inside the expression (or JSON body), when known.
        line: Option<u32>,
        /// 1-based column inside the expression (or JSON body), when known.
        column: Option<u32>,
    },
    /// Rules or lists come from a file named in the config, so the API may not change them.
    #[error("{what} are managed by the file {} ({key} in the config); edit that file instead, or remove {key} to manage {what} through the API", path.display())]
    FileManaged {
        /// `rules` or `lists`.
        what: &'static str,
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
    },
    /// The change would leave the stored rules unable to compile (e.g. a list a rule uses).
    #[error("{0}")]
    Conflict(String),
    /// Stored or configured rules or lists cannot be read (a damaged row, an unreadable file).
    #[error("{0}")]
    Source(String),
    /// An admin API answered with an error (the CLI talking to a running gateway).
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// What it said.
        message: String,
    },
    /// An admin API could not be reached or answered nonsense.
    #[error("admin API: {0}")]
    Transport(String),
}

fn position(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        _ => String::new(),
    }
}

/// A request body as `T`: a JSON object, with what is wrong named by field (`body`, with the
/// line and column of a JSON syntax error).
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ControlError> {
    lists::parse(body)
}

/// The kind of a failure, for callers that answer with a status (the admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (HTTP 400).
    Invalid,
    /// What it names does not exist (HTTP 404).
    NotFound,
    /// It clashes with what exists or with who owns it (HTTP 409).
    Conflict,
    /// The gateway failed (HTTP 500).
    Internal,
}

impl ControlError {
    /// Which kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use RegistryError as R;
        match self {
            ControlError::Invalid { .. } | ControlError::PublicKey(_) => ErrorKind::Invalid,
            ControlError::FileManaged { .. } | ControlError::Conflict(_) => ErrorKind::Conflict,
            ControlError::Api { status, .. } => match status {
                400 => ErrorKind::Invalid,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            },
            ControlError::Registry(e) => match e {
                R::InvalidEmail(_)
                | R::InvalidName(_)
                | R::InvalidLabel { .. }
                | R::InvalidRoute(_)
                | R::InvalidAttribute(_) => ErrorKind::Invalid,
                R::NotFound(_)
                | R::VnetNotFound(_)
                | R::GroupNotFound(_)
                | R::RuleNotFound(_)
                | R::PostureRuleNotFound(_)
                | R::ListNotFound(_)
                | R::TokenNotFound(_)
                | R::EnrollTokenNotFound(_) => ErrorKind::NotFound,
                R::NameTaken { .. }
                | R::PublicKeyTaken { .. }
                | R::VnetNameTaken(_)
                | R::VnetInUse { .. }
                | R::GroupTaken(_)
                | R::ListNameTaken(_)
                | R::IdTaken(_)
                | R::AlreadyRevoked { .. }
                | R::Ambiguous { .. }
                | R::PoolExhausted { .. } => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            },
            ControlError::DataDir(_)
            | ControlError::NoEndpoint(_)
            | ControlError::Source(_)
            | ControlError::Transport(_) => ErrorKind::Internal,
        }
    }

    /// An invalid field without a position.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ControlError {
        ControlError::Invalid {
            field: field.into(),
            message: message.into(),
            line: None,
            column: None,
        }
    }
}

/// Enrolls a device: checks the request, stores the device, and writes its wg-quick config.
/// The endpoint is resolved first, so a failure leaves no device without a config behind.
pub fn enroll(
    cfg: &Config,
    registry: &Registry,
    request: EnrollRequest,
    now: i64,
) -> Result<Enrolled, ControlError> {
    let server_key = datadir::load_or_create_server_key(&cfg.data_dir)?;
    let (endpoint, endpoint_derived) = endpoint(&cfg.wireguard, probe_primary_address)?;
    let (private, public) = match &request.public_key {
        Some(text) => {
            let public: PublicKey = text
                .parse()
                .map_err(|e: waygate_keys::KeyParseError| ControlError::PublicKey(e.to_string()))?;
            (None, public)
        }
        None => {
            let private = PrivateKey::generate(&mut rand::rngs::OsRng);
            let public = private.public_key();
            (Some(private), public)
        }
    };
    let vnet_id = match &request.vnet {
        Some(needle) => Some(registry.find_vnet(needle)?.id),
        None => None,
    };
    let device = registry.enroll(
        NewDevice {
            name: request.name,
            email: request.email,
            user_name: request.user_name,
            groups: request.groups,
            attributes: request.attributes,
            vnet_id,
            public_key: public,
        },
        now,
    )?;
    let wg_quick = wg_quick_config(
        &device,
        private.as_ref(),
        &server_key.public_key(),
        &endpoint,
        &cfg.tunnel,
    );
    Ok(Enrolled {
        device,
        wg_quick,
        endpoint,
        endpoint_derived,
    })
}

/// The device's complete wg-quick config.
pub fn wg_quick_config(
    device: &Device,
    private: Option<&PrivateKey>,
    server: &PublicKey,
    endpoint: &str,
    tunnel: &TunnelConfig,
) -> String {
    let mut s = String::from("[Interface]\n");
    if let Some(key) = private {
        let _ = writeln!(s, "PrivateKey = {}", key.to_base64().as_str());
    }
    let _ = writeln!(s, "Address = {}/32, {}/128", device.ipv4, device.ipv6);
    let _ = writeln!(
        s,
        "DNS = {}, {}",
        tunnel.gateway_ipv4(),
        tunnel.gateway_ipv6()
    );
    let _ = writeln!(s, "MTU = {}", tunnel.mtu);
    let _ = writeln!(s);
    let _ = writeln!(s, "[Peer]");
    let _ = writeln!(s, "PublicKey = {server}");
    let _ = writeln!(s, "Endpoint = {endpoint}");
    let _ = writeln!(s, "AllowedIPs = 0.0.0.0/0, ::/0");
    let _ = writeln!(s, "PersistentKeepalive = {PERSISTENT_KEEPALIVE}");
    s
}

/// The endpoint devices should dial, and whether it was derived rather than configured:
/// `public_endpoint` if set; else the listen address if it is a specific one; else this host's
/// primary address (as `probe` finds it) with the listen port.
pub fn endpoint(
    wg: &WireguardConfig,
    probe: impl Fn(SocketAddr) -> io::Result<IpAddr>,
) -> Result<(String, bool), ControlError> {
    if let Some(configured) = &wg.public_endpoint {
        return Ok((configured.clone(), false));
    }
    let listen = wg.listen;
    if !listen.ip().is_unspecified() {
        return Ok((listen.to_string(), true));
    }
    // A socket bound to [::] also takes IPv4, so IPv4 is tried first for either.
    let mut targets = vec![PROBE_V4];
    if listen.is_ipv6() {
        targets.push(PROBE_V6);
    }
    let mut last_err = None;
    for target in targets {
        match probe(target) {
            Ok(ip) if !ip.is_unspecified() => {
                return Ok((SocketAddr::new(ip, listen.port()).to_string(), true))
            }
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    let why = last_err.map(|e| format!(" ({e})")).unwrap_or_default();
    Err(ControlError::NoEndpoint(why))
}

/// The source address the kernel would use towards `target`.
fn probe_primary_address(target: SocketAddr) -> io::Result<IpAddr> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn device() -> Device {
        Device {
            id: "0b0e6a52-3f1e-4c1a-9d7e-1b2c3d4e5f60".into(),
            name: "alice".into(),
            public_key: PrivateKey::generate(&mut StdRng::seed_from_u64(1)).public_key(),
            ipv4: Ipv4Addr::new(100, 96, 0, 2),
            ipv6: "fd77:6761:7465::2".parse().unwrap(),
            email: "alice@example.com".into(),
            user_name: None,
            groups: vec!["eng".into(), "sre".into()],
            extras: Default::default(),
            vnet_id: None,
            created_at: 1_795_000_000,
            last_seen: None,
            last_endpoint: None,
            revoked_at: None,
        }
    }

    #[test]
    fn config_has_every_line_wg_quick_needs() {
        let server = PrivateKey::generate(&mut StdRng::seed_from_u64(2)).public_key();
        let private = PrivateKey::generate(&mut StdRng::seed_from_u64(3));
        let tunnel = Config::default().tunnel;
        let text = wg_quick_config(
            &device(),
            Some(&private),
            &server,
            "198.51.100.1:51820",
            &tunnel,
        );
        let expected = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 100.96.0.2/32, fd77:6761:7465::2/128\n\
             DNS = 100.96.0.1, fd77:6761:7465::1\nMTU = 1420\n\n[Peer]\nPublicKey = {server}\n\
             Endpoint = 198.51.100.1:51820\nAllowedIPs = 0.0.0.0/0, ::/0\n\
             PersistentKeepalive = 25\n",
            private.to_base64().as_str()
        );
        assert_eq!(text, expected);
        let without = wg_quick_config(&device(), None, &server, "gw:1", &tunnel);
        assert!(!without.contains("PrivateKey"));
        assert!(without.starts_with("[Interface]\nAddress = "));
    }

    #[test]
    fn endpoint_prefers_config_then_listen_then_probe() {
        let mut wg = Config::default().wireguard;
        let never = |_: SocketAddr| -> io::Result<IpAddr> { panic!("must not probe") };
        wg.public_endpoint = Some("gw.example.com:51820".into());
        assert_eq!(
            endpoint(&wg, never).unwrap(),
            ("gw.example.com:51820".to_string(), false)
        );
        wg.public_endpoint = None;
        wg.listen = "198.51.100.1:4500".parse().unwrap();
        assert_eq!(
            endpoint(&wg, never).unwrap(),
            ("198.51.100.1:4500".to_string(), true)
        );
        wg.listen = "0.0.0.0:51820".parse().unwrap();
        let probe = |t: SocketAddr| -> io::Result<IpAddr> {
            assert_eq!(t, PROBE_V4);
            Ok(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)))
        };
        assert_eq!(
            endpoint(&wg, probe).unwrap(),
            ("198.51.100.7:51820".to_string(), true)
        );
        // IPv6-only host: the v4 probe fails, the v6 one answers; brackets for the port.
        wg.listen = "[::]:51820".parse().unwrap();
        let probe = |t: SocketAddr| -> io::Result<IpAddr> {
            if t.is_ipv4() {
                Err(io::Error::from(io::ErrorKind::NetworkUnreachable))
            } else {
                Ok("2001:db8::7".parse().unwrap())
            }
        };
        assert_eq!(endpoint(&wg, probe).unwrap().0, "[2001:db8::7]:51820");
        let unreachable =
            |_: SocketAddr| -> io::Result<IpAddr> { Err(io::ErrorKind::NetworkUnreachable.into()) };
        let err = endpoint(&wg, unreachable).unwrap_err().to_string();
        assert!(err.contains("wireguard.public_endpoint"), "{err}");
    }
}
