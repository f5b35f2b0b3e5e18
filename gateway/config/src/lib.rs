//! The gateway's configuration: a TOML file whose every key is optional.
//!
//! Parsing is two steps (validate first, build second): the file is read into a TOML table, every
//! known key is checked, and all problems are reported together, each naming its key path
//! (`tunnel.mtu: expected an integer from 576 to 9000, got 70000`). Unknown keys are errors too.
//! Relative paths are taken relative to the current directory, like the default `data_dir`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use toml::{Table, Value};
use waygate_policy::category_db::{CategoryFormat, CategorySource};

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
    /// Virtual networks declared here (`[[vnets]]`); the server adds them to the registry.
    pub vnets: Vec<VnetConfig>,
    /// Protected destinations devices may reach anyway (`[network]`).
    pub network: NetworkConfig,
    /// What one device may hold (`[limits]`).
    pub limits: LimitsConfig,
}

/// `[network]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkConfig {
    /// Private, link-local or directly connected ranges devices may reach anyway
    /// (`allow_private`); the gateway host's own addresses stay refused.
    pub allow_private: Vec<IpNet>,
}

/// `[limits]`: per-device caps. One device at its caps leaves room for every other device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open TCP flows per device.
    pub tcp_flows_per_device: usize,
    /// UDP and ping NAT entries per device.
    pub udp_flows_per_device: usize,
    /// DNS queries per device waiting for an upstream.
    pub dns_queries_per_device: usize,
    /// Flow buffer memory per device, in bytes (`flow_memory_per_device_mb` in the file).
    pub flow_memory_per_device: usize,
}

/// Default `limits.tcp_flows_per_device`: a browser with many tabs holds a few hundred
/// connections; 1,024 leaves room for that while one device cannot take the descriptor table.
pub const DEFAULT_TCP_FLOWS_PER_DEVICE: usize = 1024;
/// Default `limits.udp_flows_per_device` (UDP and ping flows, each one upstream socket).
pub const DEFAULT_UDP_FLOWS_PER_DEVICE: usize = 1024;
/// Default `limits.dns_queries_per_device`: each waiting query holds an upstream socket for up
/// to 2 s per upstream; 256 is far above what a device's resolver keeps outstanding.
pub const DEFAULT_DNS_QUERIES_PER_DEVICE: usize = 256;
/// Default `limits.flow_memory_per_device_mb`.
pub const DEFAULT_FLOW_MEMORY_PER_DEVICE_MB: usize = 256;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            tcp_flows_per_device: DEFAULT_TCP_FLOWS_PER_DEVICE,
            udp_flows_per_device: DEFAULT_UDP_FLOWS_PER_DEVICE,
            dns_queries_per_device: DEFAULT_DNS_QUERIES_PER_DEVICE,
            flow_memory_per_device: DEFAULT_FLOW_MEMORY_PER_DEVICE_MB * 1024 * 1024,
        }
    }
}

/// One `[[vnets]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnetConfig {
    /// Name.
    pub name: String,
    /// UUID.
    pub id: String,
    /// Private routes: `{ cidr = "198.18.0.0/16", via = "site-a" }` (an interface) or
    /// `via = "198.19.1.2"` (a next hop).
    pub routes: Vec<(ipnet::IpNet, String)>,
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
    /// Extra CA certificates (PEM) trusted for `tls://` and `https://` upstreams.
    pub upstream_ca: Option<PathBuf>,
    /// Answer DNS a device sends to any address on port 53, not only to the gateway.
    pub intercept: bool,
    /// Plain DNS listeners (UDP and TCP) for networks without the client.
    pub listen: Vec<SocketAddr>,
    /// Networks whose queries to `listen` count as a location's.
    pub locations: Vec<DnsLocation>,
    /// Address answering blocks of rules with `block_page_enabled: true`.
    pub block_page: Option<IpAddr>,
    /// Domain category sources (`[[dns.categories]] path, format, category`).
    pub categories: Vec<CategorySource>,
}

/// `[[dns.locations]]`: a network (an office) querying a `dns.listen` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsLocation {
    /// Name (`dns.location` in rules).
    pub name: String,
    /// Id, for logs.
    pub id: Option<String>,
    /// Source networks of its queries.
    pub networks: Vec<IpNet>,
}

/// `[egress]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressConfig {
    /// Source address of proxied IPv4 flows; absent: the OS picks.
    pub default_ipv4: Option<Ipv4Addr>,
    /// Where flows no egress rule matched leave from.
    pub default: DefaultEgress,
    /// Dedicated egress locations.
    pub locations: Vec<EgressLocationConfig>,
}

/// `egress.default`: the source of flows no egress rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultEgress {
    /// `"default"`: `egress.default_ipv4` (or the OS's choice).
    #[default]
    Default,
    /// `"dedicated"`: the healthy location with the lowest latency to its health-check target.
    Dedicated,
}

/// One `[[egress.locations]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressLocationConfig {
    /// Name, for logs.
    pub name: String,
    /// The location's IPv4 egress addresses.
    pub ipv4: Vec<Ipv4Addr>,
    /// The location's IPv6 prefix; each device leaves from its own stable address inside it.
    pub ipv6: Option<Ipv6Net>,
    /// How the location's health and latency are measured.
    pub health_check: Option<HealthCheckConfig>,
}

/// `health_check = { target = "203.0.113.10:80", interval = "1s" }`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// A TCP endpoint the location must be able to connect to.
    pub target: SocketAddr,
    /// Time between checks.
    pub interval: std::time::Duration,
}

/// Parses `"500ms"`, `"2s"` or `"1m"`.
fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    let d = match unit.trim() {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.checked_mul(60)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
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
            vnets: Vec::new(),
            network: NetworkConfig::default(),
            limits: LimitsConfig::default(),
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
                } else if v != v.trunc() {
                    t.problem(
                        "ipv4_pool",
                        host_bits(&v.to_string(), &v.trunc().to_string()),
                    );
                } else {
                    cfg.tunnel.ipv4_pool = v.trunc();
                }
            }
            if let Some(v) = t.parsed::<Ipv6Net>("ipv6_pool", "an IPv6 CIDR like \"fd77::/64\"") {
                if v.prefix_len() > 126 {
                    t.problem("ipv6_pool", format!("pool {v} is too small (at most /126)"));
                } else if v != v.trunc() {
                    t.problem(
                        "ipv6_pool",
                        host_bits(&v.to_string(), &v.trunc().to_string()),
                    );
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
            cfg.dns.upstream_ca = d.string("upstream_ca").map(PathBuf::from);
            match d.get("intercept") {
                Some(Value::Boolean(b)) => cfg.dns.intercept = *b,
                Some(other) => d.problem(
                    "intercept",
                    format!("expected true or false, got {}", other.type_str()),
                ),
                None => {}
            }
            for (i, text) in d
                .string_array("listen")
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                match text.parse::<SocketAddr>() {
                    Ok(a) if udp_clash(cfg.wireguard.listen, a) => d.problem(
                        &format!("listen[{i}]"),
                        format!(
                            "{a} clashes with wireguard.listen ({}): both are UDP on the same \
                             port and address; pick another port for one of them",
                            cfg.wireguard.listen
                        ),
                    ),
                    Ok(a) => cfg.dns.listen.push(a),
                    Err(_) => d.problem(
                        &format!("listen[{i}]"),
                        format!("expected an address like \"198.51.100.1:53\", got {text:?}"),
                    ),
                }
            }
            cfg.dns.block_page = d.parsed::<IpAddr>("block_page", "an IP address");
            for mut c in d.table_array("categories").unwrap_or_default() {
                let path = c.string("path");
                if path.is_none() {
                    c.problem("path", "a category source needs a path".to_string());
                }
                let format = match c.string("format").as_deref() {
                    Some("csv") => Some(CategoryFormat::Csv),
                    Some("dir") => Some(CategoryFormat::Dir),
                    Some("ut1") => Some(CategoryFormat::Ut1),
                    Some("hosts") => Some(CategoryFormat::Hosts),
                    Some(other) => {
                        c.problem(
                            "format",
                            format!("expected csv, dir, ut1 or hosts, got {other:?}"),
                        );
                        None
                    }
                    None => {
                        c.problem("format", "expected csv, dir, ut1 or hosts".to_string());
                        None
                    }
                };
                let category = c
                    .integer("category", 1..=i64::from(u16::MAX))
                    .map(|v| v as u16);
                if format == Some(CategoryFormat::Hosts) && category.is_none() {
                    c.problem(
                        "category",
                        "a hosts source needs the category id of its domains".to_string(),
                    );
                }
                if let (Some(path), Some(format)) = (path, format) {
                    cfg.dns.categories.push(CategorySource {
                        path: PathBuf::from(path),
                        format,
                        category,
                    });
                }
                d.absorb(c);
            }
            for mut l in d.table_array("locations").unwrap_or_default() {
                let name = l.string("name");
                if name.is_none() {
                    l.problem("name", "a location needs a name".to_string());
                }
                let id = l.string("id");
                let mut networks = Vec::new();
                for (i, text) in l
                    .string_array("networks")
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                {
                    match text.parse::<IpNet>() {
                        Ok(n) => networks.push(n.trunc()),
                        Err(_) => l.problem(
                            &format!("networks[{i}]"),
                            format!("expected a CIDR like \"198.51.100.0/24\", got {text:?}"),
                        ),
                    }
                }
                if let Some(name) = name {
                    cfg.dns.locations.push(DnsLocation { name, id, networks });
                }
                d.absorb(l);
            }
            keys.absorb(d);
        }
        if let Some(mut e) = keys.section("egress") {
            if let Some(v) = e.parsed::<Ipv4Addr>("default_ipv4", "an IPv4 address") {
                cfg.egress.default_ipv4 = Some(v);
            }
            if let Some(v) = e.string("default") {
                match v.as_str() {
                    "default" => cfg.egress.default = DefaultEgress::Default,
                    "dedicated" => cfg.egress.default = DefaultEgress::Dedicated,
                    _ => e.problem(
                        "default",
                        format!("expected \"default\" or \"dedicated\", got {v:?}"),
                    ),
                }
            }
            for mut l in e.table_array("locations").unwrap_or_default() {
                if let Some(location) = egress_location(&mut l) {
                    if cfg.egress.locations.iter().any(|o| o.name == location.name) {
                        l.problem("name", format!("{:?} is used twice", location.name));
                    } else {
                        cfg.egress.locations.push(location);
                    }
                }
                e.absorb(l);
            }
            if cfg.egress.default == DefaultEgress::Dedicated
                && !cfg.egress.locations.iter().any(|l| !l.ipv4.is_empty())
            {
                e.problem(
                    "default",
                    "\"dedicated\" needs an [[egress.locations]] entry with ipv4 addresses"
                        .to_string(),
                );
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
        if let Some(mut n) = keys.section("network") {
            for (i, text) in n
                .string_array("allow_private")
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                match text.parse::<IpNet>() {
                    Ok(net) => cfg.network.allow_private.push(net.trunc()),
                    Err(_) => n.problem(
                        &format!("allow_private[{i}]"),
                        format!("expected a CIDR like \"10.20.0.0/16\", got {text:?}"),
                    ),
                }
            }
            keys.absorb(n);
        }
        if let Some(mut l) = keys.section("limits") {
            let l_ = &mut cfg.limits;
            if let Some(v) = l.integer("tcp_flows_per_device", 1..=1_000_000) {
                l_.tcp_flows_per_device = v as usize;
            }
            if let Some(v) = l.integer("udp_flows_per_device", 1..=1_000_000) {
                l_.udp_flows_per_device = v as usize;
            }
            if let Some(v) = l.integer("dns_queries_per_device", 1..=100_000) {
                l_.dns_queries_per_device = v as usize;
            }
            if let Some(v) = l.integer("flow_memory_per_device_mb", 1..=1_048_576) {
                l_.flow_memory_per_device = v as usize * 1024 * 1024;
            }
            keys.absorb(l);
        }
        for mut v in keys.table_array("vnets").unwrap_or_default() {
            if let Some(vnet) = vnet_config(&mut v) {
                if cfg
                    .vnets
                    .iter()
                    .any(|o| o.id == vnet.id || o.name == vnet.name)
                {
                    v.problem(
                        "name",
                        format!("{:?} or its id is declared twice", vnet.name),
                    );
                } else {
                    cfg.vnets.push(vnet);
                }
            }
            keys.absorb(v);
        }
        let problems = keys.finish();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ParseError::Invalid(problems))
        }
    }
}

/// A UUID in its usual text form, lower-cased.
fn uuid_ok(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn vnet_config(v: &mut Keys<'_>) -> Option<VnetConfig> {
    let name = v.string("name");
    if name.is_none() {
        v.problem("name", "missing".to_string());
    }
    let id = match v.string("id") {
        Some(id) if uuid_ok(&id) => Some(id.to_ascii_lowercase()),
        Some(id) => {
            v.problem(
                "id",
                format!(
                    "expected a UUID like \"f70ff985-a4ef-4643-bbbc-4a0ed4fc8415\", got {id:?}"
                ),
            );
            None
        }
        None => {
            v.problem("id", "missing (a UUID)".to_string());
            None
        }
    };
    let mut routes = Vec::new();
    for (i, mut r) in v
        .table_array("routes")
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let cidr = r.parsed::<ipnet::IpNet>("cidr", "a CIDR like \"198.18.0.0/16\"");
        let via = r.string("via");
        if via.is_none() {
            r.problem(
                "via",
                "missing (the interface towards the site)".to_string(),
            );
        }
        if let (Some(cidr), Some(via)) = (cidr, via) {
            match route_via(cidr, &via) {
                Some(via) => routes.push((cidr.trunc(), via)),
                None => r.problem(
                    "via",
                    format!(
                        "expected an interface name or a next hop of the range's family, got {via:?}"
                    ),
                ),
            }
        }
        let _ = i;
        v.absorb(r);
    }
    Some(VnetConfig {
        name: name?,
        id: id?,
        routes,
    })
}

fn egress_location(l: &mut Keys<'_>) -> Option<EgressLocationConfig> {
    let Some(name) = l.string("name") else {
        l.problem("name", "missing".to_string());
        return None;
    };
    let mut ipv4 = Vec::new();
    for (i, v) in l
        .string_array("ipv4")
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match v.parse::<Ipv4Addr>() {
            Ok(a) => ipv4.push(a),
            Err(_) => l.problem(
                &format!("ipv4[{i}]"),
                format!("expected an IPv4 address, got {v:?}"),
            ),
        }
    }
    let ipv6 = l
        .parsed::<Ipv6Net>("ipv6", "an IPv6 prefix like \"2001:db8:2:10::/64\"")
        .map(|p| p.trunc());
    if ipv6.is_some_and(|p| p.prefix_len() > 120) {
        l.problem("ipv6", "prefix too long (at most /120)".to_string());
    }
    if ipv4.is_empty() && ipv6.is_none() {
        l.problem(
            "ipv4",
            "a location needs ipv4 addresses or an ipv6 prefix".to_string(),
        );
    }
    let health_check = match l.section("health_check") {
        Some(mut h) => {
            let target = h.parsed::<SocketAddr>("target", "an address like \"203.0.113.10:80\"");
            let interval = match h.string("interval") {
                Some(v) => match parse_duration(&v) {
                    Some(d) => Some(d),
                    None => {
                        h.problem(
                            "interval",
                            format!("expected a duration like \"1s\" or \"500ms\", got {v:?}"),
                        );
                        None
                    }
                },
                None => Some(std::time::Duration::from_secs(1)),
            };
            if target.is_none() && !h.table.contains_key("target") {
                h.problem("target", "missing".to_string());
            }
            l.absorb(h);
            target
                .zip(interval)
                .map(|(target, interval)| HealthCheckConfig { target, interval })
        }
        None => None,
    };
    Some(EgressLocationConfig {
        name,
        ipv4,
        ipv6,
        health_check,
    })
}

/// The message for a pool written with host bits set (`100.96.0.1/12`): the gateway's own
/// address is the pool's first, so a host part hides a typo rather than meaning anything.
fn host_bits(given: &str, network: &str) -> String {
    format!("{given} has host bits set; a pool is written as its network, e.g. \"{network}\"")
}

/// Whether a `dns.listen` UDP socket at `dns` cannot be bound beside the WireGuard socket at
/// `wg`. The WireGuard socket on `[::]` is dual-stack; DNS sockets on `[::]` are IPv6-only.
fn udp_clash(wg: SocketAddr, dns: SocketAddr) -> bool {
    if wg.port() != dns.port() || wg.port() == 0 {
        return false;
    }
    let (w, d) = (wg.ip(), dns.ip());
    w == d
        || (w.is_unspecified() && (w.is_ipv6() || d.is_ipv4()))
        || (d.is_unspecified() && d.is_ipv4() == w.is_ipv4())
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

    /// An array of tables (`[[key]]`), one `Keys` per entry.
    fn table_array(&mut self, key: &'a str) -> Option<Vec<Keys<'a>>> {
        let path = self.path(key);
        let Value::Array(items) = self.get(key)? else {
            self.problem(key, "expected an array of tables".to_string());
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Table(t) => out.push(Keys::new(t, &format!("{path}[{i}]"))),
                other => {
                    let p = format!("{key}[{i}]");
                    self.problem(&p, format!("expected a table, got {}", other.type_str()));
                }
            }
        }
        Some(out)
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

/// The `via` of a virtual network's route: a next hop of the range's family, or an interface
/// name (Linux's rules: 1 to 15 bytes, no `/`, whitespace or `:`).
pub fn route_via(cidr: IpNet, via: &str) -> Option<String> {
    let via = via.trim();
    match via.parse::<IpAddr>() {
        Ok(hop) if hop.is_ipv4() == cidr.addr().is_ipv4() && !hop.is_unspecified() => {
            Some(hop.to_string())
        }
        Ok(_) => None,
        Err(_)
            if (1..=15).contains(&via.len())
                && via
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':') =>
        {
            Some(via.to_string())
        }
        Err(_) => None,
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
            upstreams = ["203.0.113.53:53", "tls://dns.example@203.0.113.53"]
            upstream_ca = "private-ca.pem"
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
        assert_eq!(cfg.dns.upstreams.len(), 2);
        assert_eq!(cfg.dns.upstream_ca, Some(PathBuf::from("private-ca.pem")));
        assert_eq!(cfg.policy.rules, Some(PathBuf::from("rules.json")));
    }

    #[test]
    fn network_and_limits_parse_and_bad_values_name_their_key() {
        let cfg = Config::parse(
            r#"
            [network]
            allow_private = ["10.20.0.5/16", "fd00:1::/48"]
            [limits]
            tcp_flows_per_device = 50
            udp_flows_per_device = 40
            dns_queries_per_device = 30
            flow_memory_per_device_mb = 8
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.network.allow_private,
            vec![
                "10.20.0.0/16".parse::<IpNet>().unwrap(),
                "fd00:1::/48".parse().unwrap()
            ]
        );
        assert_eq!(cfg.limits.tcp_flows_per_device, 50);
        assert_eq!(cfg.limits.udp_flows_per_device, 40);
        assert_eq!(cfg.limits.dns_queries_per_device, 30);
        assert_eq!(cfg.limits.flow_memory_per_device, 8 * 1024 * 1024);
        let err = Config::parse(
            "[network]\nallow_private = [\"10.0.0.0/33\"]\n[limits]\ntcp_flows_per_device = 0\n",
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!("expected invalid keys");
        };
        assert!(
            problems[0].starts_with("network.allow_private[0]"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("limits.tcp_flows_per_device"),
            "{problems:?}"
        );
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
    fn pools_with_host_bits_are_refused_by_key() {
        let err = Config::parse(
            r#"
            [tunnel]
            ipv4_pool = "100.96.0.1/12"
            ipv6_pool = "fd77:6761:7465::1/64"
            "#,
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!("expected Invalid, got {err:?}");
        };
        let joined = problems.join("\n");
        assert!(
            joined.contains("tunnel.ipv4_pool: 100.96.0.1/12 has host bits set")
                && joined.contains("\"100.96.0.0/12\""),
            "{joined}"
        );
        assert!(
            joined.contains("tunnel.ipv6_pool: fd77:6761:7465::1/64 has host bits set"),
            "{joined}"
        );
        // Written as networks they are fine.
        let cfg = Config::parse("[tunnel]\nipv4_pool = \"100.96.0.0/12\"\n").unwrap();
        assert_eq!(cfg.tunnel.ipv4_pool.to_string(), "100.96.0.0/12");
    }

    #[test]
    fn dns_listen_clashing_with_wireguard_listen_names_both_keys() {
        let err = Config::parse(
            r#"
            [wireguard]
            listen = "0.0.0.0:5353"
            [dns]
            listen = ["198.51.100.1:53", "198.51.100.1:5353"]
            "#,
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!("expected Invalid, got {err:?}");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "dns.listen[1]: 198.51.100.1:5353 clashes with wireguard.listen (0.0.0.0:5353)"
            ),
            "{problems:?}"
        );
        let clash = |wg: &str, dns: &str| udp_clash(wg.parse().unwrap(), dns.parse().unwrap());
        assert!(clash("[::]:51820", "198.51.100.1:51820"));
        assert!(clash("198.51.100.1:51820", "0.0.0.0:51820"));
        assert!(
            !clash("0.0.0.0:51820", "[::]:51820"),
            "DNS on [::] is IPv6-only"
        );
        assert!(!clash("198.51.100.1:51820", "198.51.100.2:51820"));
        assert!(!clash("198.51.100.1:51820", "198.51.100.1:53"));
    }

    #[test]
    fn egress_locations_parse() {
        let cfg = Config::parse(
            r#"
            [egress]
            default = "dedicated"
            [[egress.locations]]
            name = "primary"
            ipv4 = ["192.0.2.10"]
            ipv6 = "2001:db8:2:10::/64"
            health_check = { target = "203.0.113.10:80", interval = "500ms" }
            [[egress.locations]]
            name = "secondary"
            ipv4 = ["192.0.2.11", "192.0.2.12"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.egress.default, DefaultEgress::Dedicated);
        assert_eq!(cfg.egress.locations.len(), 2);
        let p = &cfg.egress.locations[0];
        assert_eq!(p.ipv6, Some("2001:db8:2:10::/64".parse().unwrap()));
        assert_eq!(
            p.health_check,
            Some(HealthCheckConfig {
                target: "203.0.113.10:80".parse().unwrap(),
                interval: std::time::Duration::from_millis(500),
            })
        );
        assert_eq!(cfg.egress.locations[1].ipv4.len(), 2);
        assert_eq!(cfg.egress.locations[1].health_check, None);
    }

    #[test]
    fn bad_egress_locations_name_the_entry() {
        let err = Config::parse(
            r#"
            [egress]
            default = "dedicated"
            [[egress.locations]]
            name = "a"
            ipv4 = ["192.0.2.300"]
            health_check = { target = "203.0.113.10:80", interval = "soon", colour = 1 }
            [[egress.locations]]
            name = "a"
            ipv6 = "2001:db8::/64"
            [[egress.locations]]
            ipv4 = ["192.0.2.1"]
            "#,
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!()
        };
        let joined = problems.join("\n");
        for needle in [
            "egress.locations[0].ipv4[0]: expected an IPv4 address",
            "egress.locations[0].health_check.interval: expected a duration",
            "egress.locations[0].health_check.colour: unknown key",
            "egress.locations[1].name: \"a\" is used twice",
            "egress.locations[2].name: missing",
            "egress.default: \"dedicated\" needs",
        ] {
            assert!(
                joined.contains(needle),
                "{needle:?} missing from:\n{joined}"
            );
        }
    }

    #[test]
    fn vnets_parse_and_bad_ones_name_the_key() {
        let cfg = Config::parse(
            r#"
            [[vnets]]
            name = "site-a"
            id = "F70FF985-A4EF-4643-BBBC-4A0ED4FC8415"
            routes = [{ cidr = "198.18.0.0/16", via = "sa" }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.vnets.len(), 1);
        assert_eq!(cfg.vnets[0].id, "f70ff985-a4ef-4643-bbbc-4a0ed4fc8415");
        assert_eq!(cfg.vnets[0].routes[0].1, "sa");
        let err = Config::parse(
            r#"
            [[vnets]]
            name = "x"
            id = "nope"
            routes = [{ cidr = "198.18.0.0/16", via = "2001:db8::1" }, { cidr = "bad" , via = "a"}]
            "#,
        )
        .unwrap_err();
        let ParseError::Invalid(problems) = err else {
            panic!()
        };
        let joined = problems.join("\n");
        for needle in [
            "vnets[0].id: expected a UUID",
            "vnets[0].routes[0].via: expected an interface name or a next hop",
            "vnets[0].routes[1].cidr: expected a CIDR",
        ] {
            assert!(
                joined.contains(needle),
                "{needle:?} missing from:\n{joined}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("1s"),
            Some(std::time::Duration::from_secs(1))
        );
        assert_eq!(
            parse_duration("250ms"),
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration("2m"),
            Some(std::time::Duration::from_secs(120))
        );
        for bad in ["", "s", "0s", "1h", "1.5s", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
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
