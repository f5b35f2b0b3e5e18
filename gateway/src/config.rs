//! The gateway's configuration: a TOML file whose every key is optional.
//!
//! Parsing is two steps (validate first, build second): the file is read into a TOML table, every
//! known key is checked, and all problems are reported together, each naming its key path
//! (`tunnel.mtu: expected an integer from 576 to 9000, got 70000`). Unknown keys are errors too.
//! Relative paths are taken relative to the current directory, like the default `data_dir`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use toml::{Table, Value};

/// Default directory for the server key, registry and CA.
pub const DEFAULT_DATA_DIR: &str = "./waygate-data";
/// Default WireGuard listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 51820);
/// Default name of the UAPI socket (`wg show waygate0`).
pub const DEFAULT_INTERFACE_NAME: &str = "waygate0";
/// Default IPv4 tunnel pool; the gateway takes its first address.
pub const DEFAULT_IPV4_POOL: &str = "100.96.0.0/12";
/// Default IPv6 tunnel pool; the gateway takes its first address.
pub const DEFAULT_IPV6_POOL: &str = "fd77:6761:7465::/64";
/// Default MTU of the tunnel (wg-quick's default for IPv4+IPv6 underlays).
pub const DEFAULT_MTU: u16 = 1420;
/// Smallest tunnel MTU accepted (IPv4's minimum datagram size).
pub const MIN_MTU: u16 = 576;
/// Largest tunnel MTU accepted.
pub const MAX_MTU: u16 = 9000;

/// Validated gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory holding the server key, the registry and the CA.
    pub data_dir: PathBuf,
    /// WireGuard endpoint settings.
    pub wireguard: WireguardConfig,
    /// Tunnel address pools and MTU.
    pub tunnel: TunnelConfig,
    /// Resolver settings.
    pub dns: DnsConfig,
    /// Egress settings.
    pub egress: EgressConfig,
    /// Rule and list files.
    pub policy: PolicyConfig,
    /// Geolocation database.
    pub geoip: GeoipConfig,
}

/// `[wireguard]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// UDP address the endpoint listens on.
    pub listen: SocketAddr,
    /// `host:port` written into device configs; absent: derived from the listen address.
    pub public_endpoint: Option<String>,
    /// UAPI socket name.
    pub interface_name: String,
}

/// `[tunnel]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// IPv4 pool devices get addresses from; the gateway is its first host address.
    pub ipv4_pool: Ipv4Net,
    /// IPv6 pool devices get addresses from; the gateway is its first host address.
    pub ipv6_pool: Ipv6Net,
    /// MTU of the tunnel interface, also used to clamp TCP MSS.
    pub mtu: u16,
}

impl TunnelConfig {
    /// The gateway's own IPv4 address inside the tunnel (100.96.0.1 by default).
    pub fn gateway_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.ipv4_pool.network()).wrapping_add(1))
    }

    /// The gateway's own IPv6 address inside the tunnel.
    pub fn gateway_ipv6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::from(u128::from(self.ipv6_pool.network()).wrapping_add(1))
    }
}

/// `[dns]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsConfig {
    /// Upstream resolvers; empty means the host's resolvers from `/etc/resolv.conf`.
    pub upstreams: Vec<String>,
}

/// `[egress]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressConfig {
    /// Source address of proxied IPv4 flows; absent: the OS picks.
    pub default_ipv4: Option<Ipv4Addr>,
}

/// `[policy]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyConfig {
    /// Cloudflare-format rules file, reloaded when it changes.
    pub rules: Option<PathBuf>,
    /// Lists file.
    pub lists: Option<PathBuf>,
}

/// `[geoip]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GeoipConfig {
    /// MaxMind database (`.mmdb`).
    pub database: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            wireguard: WireguardConfig {
                listen: DEFAULT_LISTEN,
                public_endpoint: None,
                interface_name: DEFAULT_INTERFACE_NAME.to_string(),
            },
            tunnel: TunnelConfig {
                ipv4_pool: DEFAULT_IPV4_POOL.parse().expect("valid default pool"),
                ipv6_pool: DEFAULT_IPV6_POOL.parse().expect("valid default pool"),
                mtu: DEFAULT_MTU,
            },
            dns: DnsConfig::default(),
            egress: EgressConfig::default(),
            policy: PolicyConfig::default(),
            geoip: GeoipConfig::default(),
        }
    }
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: invalid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// One or more keys are unknown or hold invalid values.
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One message per bad key, each starting with the key's path.
        problems: Vec<String>,
    },
}

impl Config {
    /// Loads `path`, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|err| match err {
            ParseError::Syntax(message) => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            ParseError::Invalid(problems) => ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            },
        })
    }

    /// Parses TOML text into a validated config.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ParseError::Syntax(e.to_string()))?;
        let mut cfg = Config::default();
        let mut keys = Keys::new(&table, "");

        if let Some(v) = keys.string("data_dir") {
            cfg.data_dir = PathBuf::from(v);
        }
        if let Some(mut wg) = keys.section("wireguard") {
            if let Some(v) = wg.parsed::<SocketAddr>("listen", "an address like \"0.0.0.0:51820\"")
            {
                cfg.wireguard.listen = v;
            }
            if let Some(v) = wg.string("public_endpoint") {
                if host_port_ok(&v) {
                    cfg.wireguard.public_endpoint = Some(v);
                } else {
                    wg.problem(
                        "public_endpoint",
                        format!("expected \"host:port\", got {v:?}"),
                    );
                }
            }
            if let Some(v) = wg.string("interface_name") {
                if interface_name_ok(&v) {
                    cfg.wireguard.interface_name = v;
                } else {
                    wg.problem(
                        "interface_name",
                        format!("expected 1 to 15 of [A-Za-z0-9_=+.-], got {v:?}"),
                    );
                }
            }
            keys.absorb(wg);
        }
        if let Some(mut t) = keys.section("tunnel") {
            if let Some(v) = t.parsed::<Ipv4Net>("ipv4_pool", "an IPv4 CIDR like \"100.96.0.0/12\"")
            {
                if v.prefix_len() > 30 {
                    t.problem("ipv4_pool", format!("pool {v} is too small (at most /30)"));
                } else {
                    cfg.tunnel.ipv4_pool = v.trunc();
                }
            }
            if let Some(v) = t.parsed::<Ipv6Net>("ipv6_pool", "an IPv6 CIDR like \"fd77::/64\"") {
                if v.prefix_len() > 126 {
                    t.problem("ipv6_pool", format!("pool {v} is too small (at most /126)"));
                } else {
                    cfg.tunnel.ipv6_pool = v.trunc();
                }
            }
            if let Some(v) = t.integer("mtu", i64::from(MIN_MTU)..=i64::from(MAX_MTU)) {
                cfg.tunnel.mtu = v as u16;
            }
            keys.absorb(t);
        }
        if let Some(mut d) = keys.section("dns") {
            if let Some(v) = d.string_array("upstreams") {
                cfg.dns.upstreams = v;
            }
            keys.absorb(d);
        }
        if let Some(mut e) = keys.section("egress") {
            if let Some(v) = e.parsed::<Ipv4Addr>("default_ipv4", "an IPv4 address") {
                cfg.egress.default_ipv4 = Some(v);
            }
            keys.absorb(e);
        }
        if let Some(mut p) = keys.section("policy") {
            cfg.policy.rules = p.string("rules").map(PathBuf::from);
            cfg.policy.lists = p.string("lists").map(PathBuf::from);
            keys.absorb(p);
        }
        if let Some(mut g) = keys.section("geoip") {
            cfg.geoip.database = g.string("database").map(PathBuf::from);
            keys.absorb(g);
        }
        let problems = keys.finish();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ParseError::Invalid(problems))
        }
    }
}

/// Why TOML text was rejected (without the file name; see [`ConfigError`]).
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not TOML.
    Syntax(String),
    /// Bad keys or values, each message starting with the key path.
    Invalid(Vec<String>),
}

fn host_port_ok(v: &str) -> bool {
    match v.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

fn interface_name_ok(v: &str) -> bool {
    (1..=15).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_=+.-".contains(&b))
}

/// Walks one TOML table, remembering which keys were read so the rest can be reported unknown.
struct Keys<'a> {
    table: &'a Table,
    prefix: String,
    seen: Vec<&'a str>,
    problems: Vec<String>,
}

impl<'a> Keys<'a> {
    fn new(table: &'a Table, prefix: &str) -> Self {
        Keys {
            table,
            prefix: prefix.to_string(),
            seen: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn problem(&mut self, key: &str, message: String) {
        let path = self.path(key);
        self.problems.push(format!("{path}: {message}"));
    }

    fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        let v = self.table.get(key)?;
        self.seen.push(key);
        Some(v)
    }

    fn string(&mut self, key: &'a str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.problem(key, format!("expected a string, got {}", other.type_str()));
                None
            }
        }
    }

    fn parsed<T: std::str::FromStr>(&mut self, key: &'a str, expected: &str) -> Option<T> {
        let s = self.string(key)?;
        match s.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.problem(key, format!("expected {expected}, got {s:?}"));
                None
            }
        }
    }

    fn integer(&mut self, key: &'a str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        match self.get(key)? {
            Value::Integer(i) if range.contains(i) => Some(*i),
            other => {
                let got = match other {
                    Value::Integer(i) => i.to_string(),
                    v => v.type_str().to_string(),
                };
                self.problem(
                    key,
                    format!(
                        "expected an integer from {} to {}, got {got}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    }

    fn string_array(&mut self, key: &'a str) -> Option<Vec<String>> {
        let Value::Array(items) = self.get(key)? else {
            self.problem(key, "expected an array of strings".to_string());
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) => out.push(s.clone()),
                other => {
                    let path = format!("{key}[{i}]");
                    self.problem(
                        &path,
                        format!("expected a string, got {}", other.type_str()),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn section(&mut self, key: &'a str) -> Option<Keys<'a>> {
        match self.get(key)? {
            Value::Table(t) => Some(Keys::new(t, &self.path(key))),
            other => {
                self.problem(key, format!("expected a table, got {}", other.type_str()));
                None
            }
        }
    }

    fn absorb(&mut self, child: Keys<'_>) {
        self.problems.extend(child.finish());
    }

    fn finish(mut self) -> Vec<String> {
        let unknown: Vec<&String> = self
            .table
            .keys()
            .filter(|k| !self.seen.contains(&k.as_str()))
            .collect();
        for key in unknown {
            let path = self.path(key);
            self.problems.push(format!("{path}: unknown key"));
        }
        self.problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let d = Config::default();
        assert_eq!(d.tunnel.gateway_ipv4(), Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(d.tunnel.gateway_ipv6().to_string(), "fd77:6761:7465::1");
        assert_eq!(d.wireguard.listen.port(), 51820);
    }

    #[test]
    fn full_example_parses() {
        let cfg = Config::parse(
            r#"
            data_dir = "/var/lib/waygate"
            [wireguard]
            listen = "198.51.100.1:51820"
            public_endpoint = "gw.example.com:51820"
            interface_name = "wg-test0"
            [tunnel]
            ipv4_pool = "100.100.0.0/16"
            ipv6_pool = "fd77:6761:7465::/64"
            mtu = 1380
            [dns]
            upstreams = ["203.0.113.53:53"]
            [egress]
            default_ipv4 = "192.0.2.1"
            [policy]
            rules = "rules.json"
            lists = "lists.json"
            [geoip]
            database = "GeoLite2-Country.mmdb"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/waygate"));
        assert_eq!(cfg.wireguard.listen, "198.51.100.1:51820".parse().unwrap());
        assert_eq!(cfg.tunnel.mtu, 1380);
        assert_eq!(cfg.tunnel.gateway_ipv4(), Ipv4Addr::new(100, 100, 0, 1));
        assert_eq!(cfg.egress.default_ipv4, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(cfg.dns.upstreams, vec!["203.0.113.53:53".to_string()]);
        assert_eq!(cfg.policy.rules, Some(PathBuf::from("rules.json")));
    }

    #[test]
    fn every_bad_key_is_named_in_one_pass() {
        let err = Config::parse(
            r#"
            colour = "blue"
            [tunnel]
            mtu = 70000
            ipv4_pool = "not-a-cidr"
            [egress]
            default_ipv4 = "2001:db8::1"
            [wireguard]
            listne = "0.0.0.0:1"
            "#,
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!("expected Invalid, got {err:?}");
        };
        let joined = problems.join("\n");
        for needle in [
            "colour: unknown key",
            "tunnel.mtu: expected an integer from 576 to 9000, got 70000",
            "tunnel.ipv4_pool: expected an IPv4 CIDR",
            "egress.default_ipv4: expected an IPv4 address",
            "wireguard.listne: unknown key",
        ] {
            assert!(
                joined.contains(needle),
                "{needle:?} missing from:\n{joined}"
            );
        }
        assert_eq!(problems.len(), 5, "{joined}");
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            Config::parse("[tunnel\nmtu = 1"),
            Err(ParseError::Syntax(_))
        ));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err =
            Config::parse("[dns]\nupstreams = [\"a\", 5]\n[geoip]\ndatabase = 3").unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!()
        };
        assert!(problems.iter().any(|p| p.starts_with("dns.upstreams[1]")));
        assert!(problems.iter().any(|p| p.starts_with("geoip.database")));
    }
}
