//! The gateway's configuration: a TOML file whose every key is optional.
//!
//! Parsing is two steps. The text is deserialized into a raw tree (`Raw*` structs, every field
//! optional) that cannot fail on a wrong type or an unknown key: a wrong value is kept as the
//! TOML type it had and an unknown key is set aside, so one bad key never hides the next. The
//! validation step then walks that tree into the typed [`Config`], collecting every problem with
//! its key path (`tunnel.mtu: expected an integer from 576 to 9000, got 70000`). Unknown keys are
//! errors too. Relative paths are taken relative to the current directory, like the default
//! `data_dir`.
//!
//! Inputs: the config file's text (or none: the embedded defaults). Outputs: a validated
//! [`Config`] or a [`ConfigError`] listing every problem. Read once at start by `waygate serve`
//! and every CLI command; the crate depends on nothing of the gateway but the category source
//! types, so it sits below every other part.

#![deny(missing_docs)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::de::{DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
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
    /// The admin API's TLS listener (`[admin]`); its Unix socket is always on.
    pub admin: AdminConfig,
    /// The Prometheus endpoint (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Activity logs (`[logs]`).
    pub logs: LogsConfig,
    /// The enrollment listener (`[control]`).
    pub control: ControlConfig,
    /// The HTTP stage (`[http]`).
    pub http: HttpConfig,
}

/// `[http]`: the HTTP stage, an inspecting proxy for device TCP flows to web ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Destination ports whose TCP flows are inspected (`ports`, an array, or `"all"`);
    /// empty: no inspection.
    pub ports: HttpPorts,
    /// Whether HTTPS is decrypted with leaves minted by the gateway's CA (`tls_decrypt`); when
    /// false, HTTPS is decided on the TLS SNI alone.
    pub tls_decrypt: bool,
    /// What to do with a TLS ClientHello without SNI while decrypting (`no_sni`).
    pub no_sni: NoSni,
    /// Whether devices' UDP to port 443 (QUIC) passes while decrypting (`quic`).
    pub quic_allowed: bool,
    /// Extra trust anchors (PEM) for origins' certificates (`upstream_ca`).
    pub upstream_ca: Option<PathBuf>,
    /// How the block page looks (`[http.block_page]`).
    pub block_page: BlockPageStyle,
    /// Explicit proxy listeners (`proxy_listen`): HTTP CONNECT, absolute-URI requests and
    /// `/proxy.pac`; empty (the default): none.
    pub proxy_listen: Vec<SocketAddr>,
    /// Source networks allowed to use the proxy listeners (`[[http.proxy_endpoints]]`); any
    /// other source gets 403.
    pub proxy_endpoints: Vec<ProxyEndpoint>,
}

/// `[[http.proxy_endpoints]]`: a network allowed to use `http.proxy_listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyEndpoint {
    /// Name (`proxy.endpoint` in rules).
    pub name: String,
    /// Source networks of its requests.
    pub networks: Vec<IpNet>,
}

/// Which destination ports the HTTP stage inspects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpPorts {
    /// These ports.
    List(Vec<u16>),
    /// Every port (Cloudflare's "inspect on all ports").
    All,
}

impl HttpPorts {
    /// Whether flows to `port` are inspected.
    pub fn contains(&self, port: u16) -> bool {
        match self {
            HttpPorts::List(ports) => ports.contains(&port),
            HttpPorts::All => true,
        }
    }
}

/// What a TLS connection without SNI gets while decrypting (`http.no_sni`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSni {
    /// Decrypted with a leaf for the destination address (as mitmproxy does).
    Inspect,
    /// Spliced byte for byte, undecrypted.
    Bypass,
    /// Reset.
    Block,
}

/// `[http.block_page]`: the built-in block page's look.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockPageStyle {
    /// Organisation name in the heading (`org_name`).
    pub org_name: Option<String>,
    /// Logo image URL (`logo_url`).
    pub logo_url: Option<String>,
    /// Message shown above the rule's reason (`message`).
    pub message: Option<String>,
    /// Footer text (`footer`).
    pub footer: Option<String>,
    /// Background colour, `#rgb` or `#rrggbb` (`background_color`).
    pub background_color: Option<String>,
}

/// Default `http.ports`: plain HTTP and HTTPS.
pub const DEFAULT_HTTP_PORTS: [u16; 2] = [80, 443];

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            ports: HttpPorts::List(DEFAULT_HTTP_PORTS.to_vec()),
            tls_decrypt: false,
            no_sni: NoSni::Bypass,
            quic_allowed: false,
            upstream_ca: None,
            block_page: BlockPageStyle::default(),
            proxy_listen: Vec::new(),
            proxy_endpoints: Vec::new(),
        }
    }
}

/// `[control]`: the HTTPS listener where `waygate-client enroll` trades an enrollment token and
/// its public key for its tunnel settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlConfig {
    /// Where it listens (`https://ADDR:PORT` for clients); `None`: no enrollment listener.
    pub listen: Option<SocketAddr>,
}

/// `[admin]`: the admin API on TCP with TLS and bearer tokens. The Unix socket
/// `<data_dir>/admin.sock` serves the same API whatever this says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdminConfig {
    /// Where the TLS listener listens; `None`: only the Unix socket.
    pub listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for the listener; `None`: one issued by the data dir's CA.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM); given together with `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served over plain HTTP (`listen`); `None` (the default): nowhere.
    pub listen: Option<SocketAddr>,
}

/// `[logs]`: activity logs (one JSON object per DNS query, flow and egress decision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsConfig {
    /// Directory of `dns.jsonl`, `network.jsonl`, `http.jsonl` and `egress.jsonl` (`dir`);
    /// `None` (the default): no activity logs.
    pub dir: Option<PathBuf>,
    /// Size in bytes at which a file is rotated (`max_size`, e.g. `"10MB"`).
    pub max_size: u64,
    /// Rotated files kept per log (`keep`): `NAME.1.jsonl` (the newest) to `NAME.<keep>.jsonl`.
    pub keep: usize,
}

/// Default `logs.max_size`: 10 MB, small enough to open in an editor.
pub const DEFAULT_LOGS_MAX_SIZE: u64 = 10 * 1000 * 1000;
/// Default `logs.keep`: with the current file, 60 MB at most per log.
pub const DEFAULT_LOGS_KEEP: usize = 5;
/// Smallest `logs.max_size`: one long line must fit.
pub const MIN_LOGS_MAX_SIZE: u64 = 4096;

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            dir: None,
            max_size: DEFAULT_LOGS_MAX_SIZE,
            keep: DEFAULT_LOGS_KEEP,
        }
    }
}

/// A size such as `"10MB"`, `"512KiB"`, `"1GB"` or `"4096"` (bytes), in bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "kib" => 1024,
        "mb" | "m" => 1000 * 1000,
        "mib" => 1024 * 1024,
        "gb" | "g" => 1000 * 1000 * 1000,
        "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
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
/// Default `limits.udp_flows_per_device` (UDP and ping flows, each one upstream socket, kept
/// 120 s after their last datagram): a device's UDP is a QUIC connection per origin, calls and
/// games, tens at a time; 1,024, the TCP figure, holds a busy device's two minutes while a
/// device sending to ever new ports stops there (`scripts/bench-scale.sh`, "UDP flows").
pub const DEFAULT_UDP_FLOWS_PER_DEVICE: usize = 1024;
/// Default `limits.dns_queries_per_device`: each waiting query holds a slot for up to 1.8 s (the
/// upstreams' budget); 256 is far above what a device's resolver keeps outstanding, and a device
/// asking for names whose upstream never answers gets SERVFAIL at once past it, counted in
/// `waygate_dns_client_limited_total` (`scripts/bench-scale.sh`, "DNS queries ... capped").
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
    /// Data-plane shards, each a thread with its own peers, engine and socket; `None` (`0` in
    /// the file): one per core. 1 runs the data plane on one thread.
    pub threads: Option<usize>,
    /// How datagrams reach their shard (`steering`).
    pub steering: Steering,
}

/// How each datagram reaches the shard of its device (`wireguard.steering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// One socket per shard in a `SO_REUSEPORT` group; a kernel program picks the socket by the
    /// receiver index.
    Kernel,
    /// One socket read by the first shard, which hands other shards' datagrams over; for hosts
    /// that refuse the kernel program.
    Reader,
}

/// Default `wireguard.threads`: one shard per core. On a 2-core host four devices at once moved
/// 1.05x (up) and 1.08x (down) with two shards what they moved with one (scripts/bench-throughput.sh,
/// `BENCH_ONLY=multi`), and a single device is no worse off: it stays on one shard.
pub const DEFAULT_WIREGUARD_THREADS: Option<usize> = None;

/// Most `wireguard.threads` (the kernel steers datagrams among at most this many sockets of
/// one port in our program; `waygate_wg::shard::MAX_SHARDS`).
pub const MAX_WIREGUARD_THREADS: i64 = 64;

impl WireguardConfig {
    /// Shards to run: `threads`, or the host's cores (`cores`, when known) up to the maximum.
    pub fn shards(&self, cores: Option<usize>) -> usize {
        self.threads
            .unwrap_or_else(|| cores.unwrap_or(1))
            .clamp(1, MAX_WIREGUARD_THREADS as usize)
    }
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
                threads: DEFAULT_WIREGUARD_THREADS,
                steering: Steering::Kernel,
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
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            logs: LogsConfig::default(),
            control: ControlConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// One bad key: its path in the file and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, with array indices: `egress.locations[0].health_check.interval`.
    pub key: String,
    /// What is wrong, e.g. `expected an integer from 576 to 9000, got 70000`.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
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
    /// The text is not valid TOML.
    #[error("{}invalid TOML: {message}", file_prefix(.path.as_deref()))]
    Syntax {
        /// The file; `None` for text parsed with [`parse_str`].
        path: Option<PathBuf>,
        /// The parser's message (with line and column).
        message: String,
    },
    /// One or more keys are unknown or hold invalid values; all of them are listed.
    #[error("{}", invalid_report(.path.as_deref(), .problems))]
    Invalid {
        /// The file; `None` for text parsed with [`parse_str`].
        path: Option<PathBuf>,
        /// Every problem found, in the order the keys were checked.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The bad keys (empty for read and syntax errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => &[],
        }
    }

    /// The same error, naming the file it came from.
    fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: Some(file.to_path_buf()),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: Some(file.to_path_buf()),
                problems,
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

fn file_prefix(path: Option<&Path>) -> String {
    path.map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

/// One problem stays on the file's line; several go one per line so each can be read alone.
fn invalid_report(path: Option<&Path>, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    match (path, lines.as_slice()) {
        (_, [one]) => format!("{}{one}", file_prefix(path)),
        (Some(file), _) => format!(
            "{}: {} problems:\n{}",
            file.display(),
            lines.len(),
            lines.join("\n")
        ),
        (None, _) => lines.join("\n"),
    }
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
        parse_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parses TOML text into a validated config (the same as [`parse_str`]).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_str(text)
    }
}

/// Parses TOML text into a validated config, reporting every bad key at once; never panics.
pub fn parse_str(text: &str) -> Result<Config, ConfigError> {
    let table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: None,
            message: e.to_string(),
        })?;
    let mut root = Value::Table(table);
    mark_datetimes(&mut root);
    let mut c = Checker::default();
    let cfg = match c.section("", Some(Section::<RawConfig>::from_value(root))) {
        Some(raw) => c.config(raw),
        None => Config::default(),
    };
    if c.problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid {
            path: None,
            problems: c.problems,
        })
    }
}

/// The normalised `via` of a virtual network's route to `cidr`: a Linux interface name, or a
/// next hop of the range's family (not unspecified). `None` when it is neither.
pub fn route_via(cidr: IpNet, via: &str) -> Option<String> {
    let via = via.trim();
    match via.parse::<IpAddr>() {
        Ok(hop) if hop.is_ipv4() == cidr.addr().is_ipv4() && !hop.is_unspecified() => {
            Some(hop.to_string())
        }
        Ok(_) => None,
        Err(_) if linux_interface_name_ok(via) => Some(via.to_string()),
        Err(_) => None,
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, whitespace or `:`; an address is not one.
fn linux_interface_name_ok(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
        && name.parse::<IpAddr>().is_err()
}

// ---------------------------------------------------------------------------------------------
// The raw tree. Every field is optional; leaves are `Leaf`s and tables `Section`s, neither of
// which fails to deserialize, so the validation step sees the whole file whatever is wrong in it.

/// A value as written: the wanted type, or the TOML type found instead (`"string"`, `"array"`,
/// ...), kept for validation to report with the key's path.
enum Leaf<T> {
    Ok(T),
    Wrong(&'static str),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Leaf<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        let type_str = type_name(&value);
        Ok(match T::deserialize(value) {
            Ok(v) => Leaf::Ok(v),
            Err(_) => Leaf::Wrong(type_str),
        })
    }
}

/// A table as written: the raw struct built from the keys it knows, plus the keys it does not
/// (set aside so `deny_unknown_fields` never stops the parse at the first one).
enum Section<T> {
    Table {
        raw: T,
        unknown: Vec<String>,
    },
    /// Not a table, or (a bug) a raw struct that still failed: the message to report.
    Bad(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Section<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Section::from_value)
    }
}

impl<T: DeserializeOwned> Section<T> {
    fn from_value(value: Value) -> Self {
        let kind = type_name(&value);
        let mut table = match value {
            Value::Table(t) if kind == "table" => t,
            _ => return Section::Bad(format!("expected a table, got {kind}")),
        };
        let known = field_names::<T>();
        let unknown: Vec<String> = table
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        for key in &unknown {
            table.remove(key);
        }
        match T::deserialize(Value::Table(table)) {
            Ok(raw) => Section::Table { raw, unknown },
            Err(e) => Section::Bad(e.to_string()),
        }
    }
}

/// Key of the one-entry table a datetime is swapped for before the raw tree is built: toml's
/// `Value` hands a datetime on as its text, so an unquoted date would pass as a path or a name.
const DATETIME_MARK: &str = "\0datetime";

/// Swaps every datetime in `value` for a marked table, which no raw field accepts.
fn mark_datetimes(value: &mut Value) {
    match value {
        Value::Datetime(d) => {
            let text = Value::String(d.to_string());
            *value = Value::Table(Table::from_iter([(DATETIME_MARK.to_string(), text)]));
        }
        Value::Array(items) => items.iter_mut().for_each(mark_datetimes),
        Value::Table(t) => t.iter_mut().for_each(|(_, v)| mark_datetimes(v)),
        Value::String(_) | Value::Integer(_) | Value::Float(_) | Value::Boolean(_) => {}
    }
}

/// `Value::type_str`, counting a marked datetime as the datetime it was.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Table(t) if t.len() == 1 && t.contains_key(DATETIME_MARK) => "datetime",
        other => other.type_str(),
    }
}

/// `key = ["a", "b"]`
type Strings = Leaf<Vec<Leaf<String>>>;
/// `[[key]]` or `key = [{ ... }]`
type Tables<T> = Leaf<Vec<Section<T>>>;

/// The field names of a raw struct, read from its derived `Deserialize` (which hands them to
/// `deserialize_struct`), so the list of known keys cannot drift from the struct.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields
}

/// A deserializer that records the field list it is asked for and then gives up.
struct FieldProbe<'a>(&'a mut &'static [&'static str]);

/// The probe's only error: it never produces a value.
#[derive(Debug)]
struct ProbeDone;

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for ProbeDone {}

impl serde::de::Error for ProbeDone {
    fn custom<M: fmt::Display>(_: M) -> Self {
        ProbeDone
    }
}

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, ProbeDone> {
        *self.0 = fields;
        Err(ProbeDone)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<Leaf<String>>,
    wireguard: Option<Section<RawWireguard>>,
    tunnel: Option<Section<RawTunnel>>,
    dns: Option<Section<RawDns>>,
    egress: Option<Section<RawEgress>>,
    policy: Option<Section<RawPolicy>>,
    geoip: Option<Section<RawGeoip>>,
    network: Option<Section<RawNetwork>>,
    limits: Option<Section<RawLimits>>,
    vnets: Option<Tables<RawVnet>>,
    admin: Option<Section<RawAdmin>>,
    metrics: Option<Section<RawMetrics>>,
    logs: Option<Section<RawLogs>>,
    control: Option<Section<RawControl>>,
    http: Option<Section<RawHttp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    ports: Option<Leaf<Value>>,
    tls_decrypt: Option<Leaf<bool>>,
    no_sni: Option<Leaf<String>>,
    quic: Option<Leaf<String>>,
    upstream_ca: Option<Leaf<String>>,
    block_page: Option<Section<RawBlockPage>>,
    proxy_listen: Option<Strings>,
    proxy_endpoints: Option<Tables<RawProxyEndpoint>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyEndpoint {
    name: Option<Leaf<String>>,
    networks: Option<Strings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlockPage {
    org_name: Option<Leaf<String>>,
    logo_url: Option<Leaf<String>>,
    message: Option<Leaf<String>>,
    footer: Option<Leaf<String>>,
    background_color: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    listen: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Leaf<String>>,
    tls_cert: Option<Leaf<String>>,
    tls_key: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    dir: Option<Leaf<String>>,
    max_size: Option<Leaf<String>>,
    keep: Option<Leaf<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWireguard {
    listen: Option<Leaf<String>>,
    public_endpoint: Option<Leaf<String>>,
    interface_name: Option<Leaf<String>>,
    threads: Option<Leaf<i64>>,
    steering: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    ipv4_pool: Option<Leaf<String>>,
    ipv6_pool: Option<Leaf<String>>,
    mtu: Option<Leaf<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    upstreams: Option<Strings>,
    upstream_ca: Option<Leaf<String>>,
    intercept: Option<Leaf<bool>>,
    listen: Option<Strings>,
    locations: Option<Tables<RawDnsLocation>>,
    block_page: Option<Leaf<String>>,
    categories: Option<Tables<RawCategory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsLocation {
    name: Option<Leaf<String>>,
    id: Option<Leaf<String>>,
    networks: Option<Strings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCategory {
    path: Option<Leaf<String>>,
    format: Option<Leaf<String>>,
    category: Option<Leaf<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    default_ipv4: Option<Leaf<String>>,
    default: Option<Leaf<String>>,
    locations: Option<Tables<RawEgressLocation>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgressLocation {
    name: Option<Leaf<String>>,
    ipv4: Option<Strings>,
    ipv6: Option<Leaf<String>>,
    health_check: Option<Section<RawHealthCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    target: Option<Leaf<String>>,
    interval: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    rules: Option<Leaf<String>>,
    lists: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeoip {
    database: Option<Leaf<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    allow_private: Option<Strings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    tcp_flows_per_device: Option<Leaf<i64>>,
    udp_flows_per_device: Option<Leaf<i64>>,
    dns_queries_per_device: Option<Leaf<i64>>,
    flow_memory_per_device_mb: Option<Leaf<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVnet {
    name: Option<Leaf<String>>,
    id: Option<Leaf<String>>,
    routes: Option<Tables<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    cidr: Option<Leaf<String>>,
    via: Option<Leaf<String>>,
}

// ---------------------------------------------------------------------------------------------
// Validation: raw tree to typed config.

/// `prefix.key`, or `key` at the top; a key that is not a bare TOML key is quoted so the path
/// stays unambiguous.
fn join(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// Collects problems while the raw tree is turned into typed values.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// The raw struct of a table, reporting its unknown keys, or `None` if absent or not a table.
    fn section<T>(&mut self, path: &str, section: Option<Section<T>>) -> Option<T> {
        match section? {
            Section::Table { raw, unknown } => {
                for key in unknown {
                    self.problem(join(path, &key), "unknown key");
                }
                Some(raw)
            }
            Section::Bad(message) => {
                self.problem(path, message);
                None
            }
        }
    }

    /// The entries of an array of tables, each with its path (`key[i]`).
    fn tables<T>(&mut self, path: &str, tables: Option<Tables<T>>) -> Vec<(String, T)> {
        match tables {
            None => Vec::new(),
            Some(Leaf::Wrong(_)) => {
                self.problem(path, "expected an array of tables");
                Vec::new()
            }
            Some(Leaf::Ok(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    if let Some(raw) = self.section(&at, Some(item)) {
                        out.push((at, raw));
                    }
                }
                out
            }
        }
    }

    fn string(&mut self, path: &str, leaf: Option<Leaf<String>>) -> Option<String> {
        match leaf? {
            Leaf::Ok(s) => Some(s),
            Leaf::Wrong(got) => {
                self.problem(path, format!("expected a string, got {got}"));
                None
            }
        }
    }

    fn parsed<T: std::str::FromStr>(
        &mut self,
        path: &str,
        leaf: Option<Leaf<String>>,
        expected: &str,
    ) -> Option<T> {
        let s = self.string(path, leaf)?;
        match s.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.problem(path, format!("expected {expected}, got {s:?}"));
                None
            }
        }
    }

    fn integer(
        &mut self,
        path: &str,
        leaf: Option<Leaf<i64>>,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let got = match leaf? {
            Leaf::Ok(i) if range.contains(&i) => return Some(i),
            Leaf::Ok(i) => i.to_string(),
            Leaf::Wrong(got) => got.to_string(),
        };
        self.problem(
            path,
            format!(
                "expected an integer from {} to {}, got {got}",
                range.start(),
                range.end()
            ),
        );
        None
    }

    fn boolean(&mut self, path: &str, leaf: Option<Leaf<bool>>) -> Option<bool> {
        match leaf? {
            Leaf::Ok(b) => Some(b),
            Leaf::Wrong(got) => {
                self.problem(path, format!("expected true or false, got {got}"));
                None
            }
        }
    }

    /// The strings of an array, each with its path (`key[i]`); other items are reported.
    fn strings(&mut self, path: &str, leaf: Option<Strings>) -> Vec<(String, String)> {
        let items = match leaf {
            None => return Vec::new(),
            Some(Leaf::Wrong(_)) => {
                self.problem(path, "expected an array of strings");
                return Vec::new();
            }
            Some(Leaf::Ok(items)) => items,
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            if let Some(s) = self.string(&at, Some(item)) {
                out.push((at, s));
            }
        }
        out
    }

    /// Each string of an array parsed as `T`; the ones that do not parse are reported.
    fn parsed_items<T: std::str::FromStr>(
        &mut self,
        path: &str,
        leaf: Option<Strings>,
        expected: &str,
    ) -> Vec<(String, T)> {
        let mut out = Vec::new();
        for (at, s) in self.strings(path, leaf) {
            match s.parse() {
                Ok(v) => out.push((at, v)),
                Err(_) => self.problem(at, format!("expected {expected}, got {s:?}")),
            }
        }
        out
    }

    /// Source networks (CIDRs, host bits dropped) of a location or proxy endpoint.
    fn networks(&mut self, path: &str, leaf: Option<Strings>) -> Vec<IpNet> {
        self.parsed_items::<IpNet>(path, leaf, "a CIDR like \"198.51.100.0/24\"")
            .into_iter()
            .map(|(_, n)| n.trunc())
            .collect()
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let mut cfg = Config::default();
        if let Some(v) = self.string("data_dir", raw.data_dir) {
            cfg.data_dir = PathBuf::from(v);
        }
        if let Some(wg) = self.section("wireguard", raw.wireguard) {
            self.wireguard(wg, &mut cfg.wireguard);
        }
        if let Some(t) = self.section("tunnel", raw.tunnel) {
            self.tunnel(t, &mut cfg.tunnel);
        }
        if let Some(d) = self.section("dns", raw.dns) {
            cfg.dns = self.dns(d, cfg.wireguard.listen);
        }
        if let Some(e) = self.section("egress", raw.egress) {
            cfg.egress = self.egress(e);
        }
        if let Some(p) = self.section("policy", raw.policy) {
            cfg.policy.rules = self.string("policy.rules", p.rules).map(PathBuf::from);
            cfg.policy.lists = self.string("policy.lists", p.lists).map(PathBuf::from);
        }
        if let Some(g) = self.section("geoip", raw.geoip) {
            cfg.geoip.database = self.string("geoip.database", g.database).map(PathBuf::from);
        }
        if let Some(n) = self.section("network", raw.network) {
            cfg.network.allow_private = self
                .parsed_items::<IpNet>(
                    "network.allow_private",
                    n.allow_private,
                    "a CIDR like \"10.20.0.0/16\"",
                )
                .into_iter()
                .map(|(_, net)| net.trunc())
                .collect();
        }
        if let Some(l) = self.section("limits", raw.limits) {
            self.limits(l, &mut cfg.limits);
        }
        if let Some(a) = self.section("admin", raw.admin) {
            cfg.admin = self.admin(a);
        }
        if let Some(m) = self.section("metrics", raw.metrics) {
            cfg.metrics.listen = self.parsed::<SocketAddr>(
                "metrics.listen",
                m.listen,
                "an address like \"127.0.0.1:9090\"",
            );
        }
        if let Some(l) = self.section("logs", raw.logs) {
            self.logs(l, &mut cfg.logs);
        }
        if let Some(c) = self.section("control", raw.control) {
            cfg.control = ControlConfig {
                listen: self.parsed::<SocketAddr>(
                    "control.listen",
                    c.listen,
                    "an address like \"198.51.100.1:8444\"",
                ),
            };
        }
        if let Some(h) = self.section("http", raw.http) {
            cfg.http = self.http(h);
        }
        for (at, v) in self.tables("vnets", raw.vnets) {
            if let Some(vnet) = self.vnet(&at, v) {
                if cfg
                    .vnets
                    .iter()
                    .any(|o| o.id == vnet.id || o.name == vnet.name)
                {
                    self.problem(
                        join(&at, "name"),
                        format!("{:?} or its id is declared twice", vnet.name),
                    );
                } else {
                    cfg.vnets.push(vnet);
                }
            }
        }
        cfg
    }

    fn admin(&mut self, raw: RawAdmin) -> AdminConfig {
        let listen = self.parsed::<SocketAddr>(
            "admin.listen",
            raw.listen,
            "an address like \"127.0.0.1:8443\"",
        );
        let tls_cert = self
            .string("admin.tls_cert", raw.tls_cert)
            .map(PathBuf::from);
        let tls_key = self.string("admin.tls_key", raw.tls_key).map(PathBuf::from);
        match (&tls_cert, &tls_key) {
            (Some(_), None) => {
                self.problem("admin.tls_key", "missing: admin.tls_cert needs its key")
            }
            (None, Some(_)) => self.problem(
                "admin.tls_cert",
                "missing: admin.tls_key needs its certificate",
            ),
            _ => {}
        }
        AdminConfig {
            listen,
            tls_cert,
            tls_key,
        }
    }

    fn wireguard(&mut self, raw: RawWireguard, wg: &mut WireguardConfig) {
        if let Some(v) = self.parsed::<SocketAddr>(
            "wireguard.listen",
            raw.listen,
            "an address like \"0.0.0.0:51820\"",
        ) {
            wg.listen = v;
        }
        if let Some(v) = self.string("wireguard.public_endpoint", raw.public_endpoint) {
            if host_port_ok(&v) {
                wg.public_endpoint = Some(v);
            } else {
                self.problem(
                    "wireguard.public_endpoint",
                    format!("expected \"host:port\", got {v:?}"),
                );
            }
        }
        if let Some(v) = self.string("wireguard.interface_name", raw.interface_name) {
            if interface_name_ok(&v) {
                wg.interface_name = v;
            } else {
                self.problem(
                    "wireguard.interface_name",
                    format!("expected 1 to 15 of [A-Za-z0-9_=+.-], got {v:?}"),
                );
            }
        }
        if let Some(n) = self.integer("wireguard.threads", raw.threads, 0..=MAX_WIREGUARD_THREADS) {
            // 0: one per core.
            wg.threads = usize::try_from(n).ok().filter(|&n| n > 0);
        }
        if let Some(s) = self.string("wireguard.steering", raw.steering) {
            match s.as_str() {
                "kernel" => wg.steering = Steering::Kernel,
                "reader" => wg.steering = Steering::Reader,
                _ => self.problem(
                    "wireguard.steering",
                    format!("expected \"kernel\" or \"reader\", got {s:?}"),
                ),
            }
        }
    }

    fn tunnel(&mut self, raw: RawTunnel, t: &mut TunnelConfig) {
        const V4: &str = "tunnel.ipv4_pool";
        const V6: &str = "tunnel.ipv6_pool";
        if let Some(v) =
            self.parsed::<Ipv4Net>(V4, raw.ipv4_pool, "an IPv4 CIDR like \"100.96.0.0/12\"")
        {
            if v.prefix_len() > 30 {
                self.problem(V4, format!("pool {v} is too small (at most /30)"));
            } else if v != v.trunc() {
                self.problem(V4, host_bits(&v.to_string(), &v.trunc().to_string()));
            } else {
                t.ipv4_pool = v;
            }
        }
        if let Some(v) =
            self.parsed::<Ipv6Net>(V6, raw.ipv6_pool, "an IPv6 CIDR like \"fd77::/64\"")
        {
            if v.prefix_len() > 126 {
                self.problem(V6, format!("pool {v} is too small (at most /126)"));
            } else if v != v.trunc() {
                self.problem(V6, host_bits(&v.to_string(), &v.trunc().to_string()));
            } else {
                t.ipv6_pool = v;
            }
        }
        let range = i64::from(MIN_MTU)..=i64::from(MAX_MTU);
        if let Some(v) = self.integer("tunnel.mtu", raw.mtu, range) {
            // In range, so it fits; the fallback is never taken.
            t.mtu = u16::try_from(v).unwrap_or(DEFAULT_MTU);
        }
    }

    fn dns(&mut self, raw: RawDns, wireguard_listen: SocketAddr) -> DnsConfig {
        let mut dns = DnsConfig {
            upstreams: self
                .strings("dns.upstreams", raw.upstreams)
                .into_iter()
                .map(|(_, s)| s)
                .collect(),
            upstream_ca: self
                .string("dns.upstream_ca", raw.upstream_ca)
                .map(PathBuf::from),
            intercept: self
                .boolean("dns.intercept", raw.intercept)
                .unwrap_or(false),
            ..DnsConfig::default()
        };
        for (at, a) in self.parsed_items::<SocketAddr>(
            "dns.listen",
            raw.listen,
            "an address like \"198.51.100.1:53\"",
        ) {
            if udp_clash(wireguard_listen, a) {
                self.problem(
                    at,
                    format!(
                        "{a} clashes with wireguard.listen ({wireguard_listen}): both are UDP on \
                         the same port and address; pick another port for one of them"
                    ),
                );
            } else {
                dns.listen.push(a);
            }
        }
        dns.block_page = self.parsed::<IpAddr>("dns.block_page", raw.block_page, "an IP address");
        for (at, c) in self.tables("dns.categories", raw.categories) {
            if let Some(source) = self.category(&at, c) {
                dns.categories.push(source);
            }
        }
        for (at, l) in self.tables("dns.locations", raw.locations) {
            let name = self.string(&join(&at, "name"), l.name);
            if name.is_none() {
                self.problem(join(&at, "name"), "a location needs a name");
            }
            let id = self.string(&join(&at, "id"), l.id);
            let networks = self.networks(&join(&at, "networks"), l.networks);
            if let Some(name) = name {
                dns.locations.push(DnsLocation { name, id, networks });
            }
        }
        dns
    }

    fn category(&mut self, at: &str, raw: RawCategory) -> Option<CategorySource> {
        let path = self.string(&join(at, "path"), raw.path);
        if path.is_none() {
            self.problem(join(at, "path"), "a category source needs a path");
        }
        let format = match self.string(&join(at, "format"), raw.format).as_deref() {
            Some("csv") => Some(CategoryFormat::Csv),
            Some("dir") => Some(CategoryFormat::Dir),
            Some("ut1") => Some(CategoryFormat::Ut1),
            Some("hosts") => Some(CategoryFormat::Hosts),
            Some(other) => {
                self.problem(
                    join(at, "format"),
                    format!("expected csv, dir, ut1 or hosts, got {other:?}"),
                );
                None
            }
            None => {
                self.problem(join(at, "format"), "expected csv, dir, ut1 or hosts");
                None
            }
        };
        let category = self
            .integer(&join(at, "category"), raw.category, 1..=i64::from(u16::MAX))
            .and_then(|v| u16::try_from(v).ok());
        if format == Some(CategoryFormat::Hosts) && category.is_none() {
            self.problem(
                join(at, "category"),
                "a hosts source needs the category id of its domains",
            );
        }
        Some(CategorySource {
            path: PathBuf::from(path?),
            format: format?,
            category,
        })
    }

    fn egress(&mut self, raw: RawEgress) -> EgressConfig {
        let mut egress = EgressConfig {
            default_ipv4: self.parsed::<Ipv4Addr>(
                "egress.default_ipv4",
                raw.default_ipv4,
                "an IPv4 address",
            ),
            ..EgressConfig::default()
        };
        if let Some(v) = self.string("egress.default", raw.default) {
            match v.as_str() {
                "default" => egress.default = DefaultEgress::Default,
                "dedicated" => egress.default = DefaultEgress::Dedicated,
                _ => self.problem(
                    "egress.default",
                    format!("expected \"default\" or \"dedicated\", got {v:?}"),
                ),
            }
        }
        for (at, l) in self.tables("egress.locations", raw.locations) {
            if let Some(location) = self.egress_location(&at, l) {
                if egress.locations.iter().any(|o| o.name == location.name) {
                    self.problem(
                        join(&at, "name"),
                        format!("{:?} is used twice", location.name),
                    );
                } else {
                    egress.locations.push(location);
                }
            }
        }
        if egress.default == DefaultEgress::Dedicated
            && !egress.locations.iter().any(|l| !l.ipv4.is_empty())
        {
            self.problem(
                "egress.default",
                "\"dedicated\" needs an [[egress.locations]] entry with ipv4 addresses",
            );
        }
        egress
    }

    fn egress_location(
        &mut self,
        at: &str,
        raw: RawEgressLocation,
    ) -> Option<EgressLocationConfig> {
        let Some(name) = self.string(&join(at, "name"), raw.name) else {
            self.problem(join(at, "name"), "missing");
            return None;
        };
        let ipv4: Vec<Ipv4Addr> = self
            .parsed_items(&join(at, "ipv4"), raw.ipv4, "an IPv4 address")
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        let ipv6 = self
            .parsed::<Ipv6Net>(
                &join(at, "ipv6"),
                raw.ipv6,
                "an IPv6 prefix like \"2001:db8:2:10::/64\"",
            )
            .map(|p| p.trunc());
        if ipv6.is_some_and(|p| p.prefix_len() > 120) {
            self.problem(join(at, "ipv6"), "prefix too long (at most /120)");
        }
        if ipv4.is_empty() && ipv6.is_none() {
            self.problem(
                join(at, "ipv4"),
                "a location needs ipv4 addresses or an ipv6 prefix",
            );
        }
        let health_at = join(at, "health_check");
        let health_check = match self.section(&health_at, raw.health_check) {
            Some(h) => self.health_check(&health_at, h),
            None => None,
        };
        Some(EgressLocationConfig {
            name,
            ipv4,
            ipv6,
            health_check,
        })
    }

    fn health_check(&mut self, at: &str, raw: RawHealthCheck) -> Option<HealthCheckConfig> {
        if raw.target.is_none() {
            self.problem(join(at, "target"), "missing");
        }
        let target = self.parsed::<SocketAddr>(
            &join(at, "target"),
            raw.target,
            "an address like \"203.0.113.10:80\"",
        );
        let interval = match self.string(&join(at, "interval"), raw.interval) {
            Some(v) => match parse_duration(&v) {
                Some(d) => Some(d),
                None => {
                    self.problem(
                        join(at, "interval"),
                        format!("expected a duration like \"1s\" or \"500ms\", got {v:?}"),
                    );
                    None
                }
            },
            None => Some(std::time::Duration::from_secs(1)),
        };
        target
            .zip(interval)
            .map(|(target, interval)| HealthCheckConfig { target, interval })
    }

    fn limits(&mut self, raw: RawLimits, limits: &mut LimitsConfig) {
        let tcp = self.count("tcp_flows_per_device", raw.tcp_flows_per_device, 1_000_000);
        if let Some(v) = tcp {
            limits.tcp_flows_per_device = v;
        }
        let udp = self.count("udp_flows_per_device", raw.udp_flows_per_device, 1_000_000);
        if let Some(v) = udp {
            limits.udp_flows_per_device = v;
        }
        let dns = self.count(
            "dns_queries_per_device",
            raw.dns_queries_per_device,
            100_000,
        );
        if let Some(v) = dns {
            limits.dns_queries_per_device = v;
        }
        let mb = self.count(
            "flow_memory_per_device_mb",
            raw.flow_memory_per_device_mb,
            1_048_576,
        );
        if let Some(v) = mb {
            // Saturates instead of wrapping where usize is 32 bits.
            limits.flow_memory_per_device = v.saturating_mul(1024 * 1024);
        }
    }

    fn http(&mut self, raw: RawHttp) -> HttpConfig {
        let mut http = HttpConfig::default();
        match raw.ports {
            None => {}
            Some(Leaf::Ok(Value::String(s))) if s == "all" => http.ports = HttpPorts::All,
            Some(Leaf::Ok(Value::Array(items))) => {
                let mut ports = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item.as_integer().and_then(|p| u16::try_from(p).ok()) {
                        Some(p) if p > 0 => ports.push(p),
                        _ => self.problem(
                            format!("http.ports[{i}]"),
                            format!("expected a port from 1 to 65535, got {item}"),
                        ),
                    }
                }
                http.ports = HttpPorts::List(ports);
            }
            Some(_) => self.problem(
                "http.ports",
                "expected an array of ports like [80, 443] or \"all\"",
            ),
        }
        if let Some(b) = self.boolean("http.tls_decrypt", raw.tls_decrypt) {
            http.tls_decrypt = b;
        }
        if let Some(s) = self.string("http.no_sni", raw.no_sni) {
            match s.as_str() {
                "inspect" => http.no_sni = NoSni::Inspect,
                "bypass" => http.no_sni = NoSni::Bypass,
                "block" => http.no_sni = NoSni::Block,
                _ => self.problem(
                    "http.no_sni",
                    format!("expected \"inspect\", \"bypass\" or \"block\", got {s:?}"),
                ),
            }
        }
        if let Some(s) = self.string("http.quic", raw.quic) {
            match s.as_str() {
                "block" => http.quic_allowed = false,
                "allow" => http.quic_allowed = true,
                _ => self.problem(
                    "http.quic",
                    format!("expected \"block\" or \"allow\", got {s:?}"),
                ),
            }
        }
        http.upstream_ca = self
            .string("http.upstream_ca", raw.upstream_ca)
            .map(PathBuf::from);
        if let Some(b) = self.section("http.block_page", raw.block_page) {
            let page = &mut http.block_page;
            page.org_name = self.string("http.block_page.org_name", b.org_name);
            page.logo_url = self.string("http.block_page.logo_url", b.logo_url);
            if let Some(url) = &page.logo_url {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    self.problem(
                        "http.block_page.logo_url",
                        format!("expected an http:// or https:// URL, got {url:?}"),
                    );
                }
            }
            page.message = self.string("http.block_page.message", b.message);
            page.footer = self.string("http.block_page.footer", b.footer);
            page.background_color =
                self.string("http.block_page.background_color", b.background_color);
            if let Some(c) = &page.background_color {
                let hex = c.strip_prefix('#').unwrap_or("");
                if !matches!(hex.len(), 3 | 6) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    self.problem(
                        "http.block_page.background_color",
                        format!("expected a colour like \"#1a73e8\", got {c:?}"),
                    );
                }
            }
        }
        http.proxy_listen = self
            .parsed_items::<SocketAddr>(
                "http.proxy_listen",
                raw.proxy_listen,
                "an address like \"198.51.100.1:8080\"",
            )
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        for (at, e) in self.tables("http.proxy_endpoints", raw.proxy_endpoints) {
            let name = self.string(&join(&at, "name"), e.name);
            if name.is_none() {
                self.problem(join(&at, "name"), "a proxy endpoint needs a name");
            }
            let networks = self.networks(&join(&at, "networks"), e.networks);
            if networks.is_empty() {
                self.problem(
                    join(&at, "networks"),
                    "a proxy endpoint needs at least one network, like [\"198.51.100.0/24\"]",
                );
            }
            if let Some(name) = name {
                http.proxy_endpoints.push(ProxyEndpoint { name, networks });
            }
        }
        if !http.proxy_listen.is_empty() && http.proxy_endpoints.is_empty() {
            self.problem(
                "http.proxy_listen",
                "no [[http.proxy_endpoints]]: every source would be refused; declare the networks \
                 allowed to use the proxy",
            );
        }
        http
    }

    fn logs(&mut self, raw: RawLogs, logs: &mut LogsConfig) {
        logs.dir = self.string("logs.dir", raw.dir).map(PathBuf::from);
        if let Some(text) = self.string("logs.max_size", raw.max_size) {
            match parse_size(&text) {
                Some(n) if n >= MIN_LOGS_MAX_SIZE => logs.max_size = n,
                _ => self.problem(
                    "logs.max_size",
                    format!(
                        "expected a size of at least {MIN_LOGS_MAX_SIZE} bytes like \"10MB\" or \"512KiB\", got {text:?}"
                    ),
                ),
            }
        }
        if let Some(n) = self.integer("logs.keep", raw.keep, 0..=1000) {
            logs.keep = usize::try_from(n).unwrap_or(DEFAULT_LOGS_KEEP);
        }
    }

    /// A `[limits]` count from 1 to `max`.
    fn count(&mut self, key: &str, leaf: Option<Leaf<i64>>, max: i64) -> Option<usize> {
        self.integer(&join("limits", key), leaf, 1..=max)
            .and_then(|v| usize::try_from(v).ok())
    }

    fn vnet(&mut self, at: &str, raw: RawVnet) -> Option<VnetConfig> {
        let name = self.string(&join(at, "name"), raw.name);
        if name.is_none() {
            self.problem(join(at, "name"), "missing");
        }
        let id = match self.string(&join(at, "id"), raw.id) {
            Some(id) if uuid_ok(&id) => Some(id.to_ascii_lowercase()),
            Some(id) => {
                self.problem(
                    join(at, "id"),
                    format!(
                        "expected a UUID like \"f70ff985-a4ef-4643-bbbc-4a0ed4fc8415\", got {id:?}"
                    ),
                );
                None
            }
            None => {
                self.problem(join(at, "id"), "missing (a UUID)");
                None
            }
        };
        let mut routes = Vec::new();
        for (r_at, r) in self.tables(&join(at, "routes"), raw.routes) {
            let cidr = self.parsed::<IpNet>(
                &join(&r_at, "cidr"),
                r.cidr,
                "a CIDR like \"198.18.0.0/16\"",
            );
            let via = self.string(&join(&r_at, "via"), r.via);
            if via.is_none() {
                self.problem(
                    join(&r_at, "via"),
                    "missing (the interface towards the site)",
                );
            }
            if let (Some(cidr), Some(via)) = (cidr, via) {
                match route_via(cidr, &via) {
                    Some(via) => routes.push((cidr.trunc(), via)),
                    None => self.problem(
                        join(&r_at, "via"),
                        format!(
                            "expected an interface name or a next hop of the range's family, got {via:?}"
                        ),
                    ),
                }
            }
        }
        Some(VnetConfig {
            name: name?,
            id: id?,
            routes,
        })
    }
}

/// A UUID in its usual text form.
fn uuid_ok(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The problems `text` is rejected with, as printed.
    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected invalid keys, got {other:?}"),
        }
    }

    /// The key paths `text` is rejected for.
    fn bad_keys(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected invalid keys, got {other:?}"),
        }
    }

    fn assert_all(joined: &str, needles: &[&str]) {
        for needle in needles {
            assert!(
                joined.contains(needle),
                "{needle:?} missing from:\n{joined}"
            );
        }
    }

    #[test]
    fn http_parses_its_keys_and_names_each_bad_one() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.http, HttpConfig::default());
        assert!(cfg.http.ports.contains(80) && cfg.http.ports.contains(443));
        assert!(!cfg.http.ports.contains(8080));
        let cfg = Config::parse(
            r##"
            [http]
            ports = "all"
            tls_decrypt = true
            no_sni = "block"
            quic = "allow"
            upstream_ca = "/etc/lab-ca.pem"
            [http.block_page]
            org_name = "Example Corp"
            logo_url = "https://example.com/logo.png"
            background_color = "#1a73e8"
            "##,
        )
        .unwrap();
        assert_eq!(cfg.http.ports, HttpPorts::All);
        assert!(cfg.http.tls_decrypt && cfg.http.quic_allowed);
        assert_eq!(cfg.http.no_sni, NoSni::Block);
        assert_eq!(
            cfg.http.block_page.org_name.as_deref(),
            Some("Example Corp")
        );
        let cfg = Config::parse("[http]\nports = [8080]").unwrap();
        assert_eq!(cfg.http.ports, HttpPorts::List(vec![8080]));
        assert_eq!(
            bad_keys(
                r##"
                [http]
                ports = [80, 70000]
                tls_decrypt = "yes"
                no_sni = "maybe"
                quic = "drop"
                colour = 1
                [http.block_page]
                logo_url = "file:///x"
                background_color = "blue"
                "##
            ),
            vec![
                "http.colour",
                "http.ports[1]",
                "http.tls_decrypt",
                "http.no_sni",
                "http.quic",
                "http.block_page.logo_url",
                "http.block_page.background_color",
            ]
        );
        assert_eq!(bad_keys("[http]\nports = \"some\""), vec!["http.ports"]);
    }

    #[test]
    fn http_proxy_endpoints_parse_and_bad_ones_are_named() {
        let cfg = Config::parse(
            r#"
            [http]
            proxy_listen = ["198.51.100.1:8080", "[2001:db8::1]:8080"]
            [[http.proxy_endpoints]]
            name = "office"
            networks = ["203.0.113.7/24", "2001:db8:1::/48"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.http.proxy_listen.len(), 2);
        assert_eq!(
            cfg.http.proxy_endpoints,
            vec![ProxyEndpoint {
                name: "office".into(),
                // Host bits are dropped, as for dns.locations.
                networks: vec![
                    "203.0.113.0/24".parse().unwrap(),
                    "2001:db8:1::/48".parse().unwrap()
                ],
            }]
        );
        assert_eq!(
            bad_keys(
                r#"
                [http]
                proxy_listen = ["198.51.100.1"]
                [[http.proxy_endpoints]]
                networks = ["203.0.113.0/33"]
                "#
            ),
            vec![
                "http.proxy_listen[0]",
                "http.proxy_endpoints[0].name",
                "http.proxy_endpoints[0].networks[0]",
                "http.proxy_endpoints[0].networks",
            ]
        );
        assert_eq!(
            bad_keys("[http]\nproxy_listen = [\"198.51.100.1:8080\"]"),
            vec!["http.proxy_listen"]
        );
    }

    #[test]
    fn metrics_and_logs_parse_with_sizes_and_report_bad_keys() {
        let cfg = Config::parse(
            r#"
            [metrics]
            listen = "127.0.0.1:9090"
            [logs]
            dir = "/var/log/waygate"
            max_size = "512KiB"
            keep = 3
            "#,
        )
        .unwrap();
        assert_eq!(cfg.metrics.listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(cfg.logs.dir, Some(PathBuf::from("/var/log/waygate")));
        assert_eq!((cfg.logs.max_size, cfg.logs.keep), (512 * 1024, 3));
        assert_eq!(Config::default().metrics.listen, None);
        assert_eq!(Config::default().logs.dir, None);
        assert_eq!(parse_size("10MB"), Some(10_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("99999999999999GB"), None);
        let bad = bad_keys(
            "[metrics]\nlisten = \"localhost\"\nport = 1\n[logs]\nmax_size = \"1KB\"\nkeep = -1\n",
        );
        assert_eq!(
            bad,
            [
                "metrics.port",
                "metrics.listen",
                "logs.max_size",
                "logs.keep"
            ]
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(parse_str("").unwrap(), Config::default());
        let d = Config::default();
        assert_eq!(d.tunnel.gateway_ipv4(), Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(d.tunnel.gateway_ipv6().to_string(), "fd77:6761:7465::1");
        assert_eq!(d.wireguard.listen.port(), 51820);
        assert_eq!(d.wireguard.threads, DEFAULT_WIREGUARD_THREADS);
        assert_eq!(d.wireguard.shards(Some(8)), 8);
        let one = Config::parse("[wireguard]\nthreads = 1\n")
            .unwrap()
            .wireguard;
        assert_eq!(one.shards(Some(8)), 1);
        // 0: one shard per core, one when the cores are unknown.
        let cores = Config::parse("[wireguard]\nthreads = 0\n")
            .unwrap()
            .wireguard;
        assert_eq!(cores.threads, None);
        assert_eq!(cores.shards(Some(8)), 8);
        assert_eq!(cores.shards(None), 1);
        assert_eq!(cores.shards(Some(500)), 64);
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
            threads = 3
            steering = "reader"
            [tunnel]
            ipv4_pool = "100.100.0.0/16"
            ipv6_pool = "fd77:6761:7465::/64"
            mtu = 1380
            [dns]
            upstreams = ["203.0.113.53:53", "tls://dns.example@203.0.113.53"]
            upstream_ca = "private-ca.pem"
            intercept = true
            listen = ["198.51.100.1:53"]
            block_page = "192.0.2.80"
            [[dns.categories]]
            path = "categories.csv"
            format = "csv"
            [[dns.categories]]
            path = "ads.hosts"
            format = "hosts"
            category = 117
            [[dns.locations]]
            name = "office"
            id = "loc-1"
            networks = ["198.51.100.7/24"]
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
        assert_eq!(
            cfg.wireguard.public_endpoint.as_deref(),
            Some("gw.example.com:51820")
        );
        assert_eq!(cfg.wireguard.interface_name, "wg-test0");
        assert_eq!(cfg.wireguard.threads, Some(3));
        assert_eq!(cfg.wireguard.shards(Some(8)), 3);
        assert_eq!(cfg.wireguard.steering, Steering::Reader);
        assert_eq!(cfg.tunnel.mtu, 1380);
        assert_eq!(cfg.tunnel.gateway_ipv4(), Ipv4Addr::new(100, 100, 0, 1));
        assert_eq!(cfg.egress.default_ipv4, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(cfg.dns.upstreams.len(), 2);
        assert_eq!(cfg.dns.upstream_ca, Some(PathBuf::from("private-ca.pem")));
        assert!(cfg.dns.intercept);
        assert_eq!(cfg.dns.listen, vec!["198.51.100.1:53".parse().unwrap()]);
        assert_eq!(cfg.dns.block_page, Some("192.0.2.80".parse().unwrap()));
        assert_eq!(
            cfg.dns.categories,
            vec![
                CategorySource {
                    path: "categories.csv".into(),
                    format: CategoryFormat::Csv,
                    category: None
                },
                CategorySource {
                    path: "ads.hosts".into(),
                    format: CategoryFormat::Hosts,
                    category: Some(117)
                },
            ]
        );
        assert_eq!(
            cfg.dns.locations,
            vec![DnsLocation {
                name: "office".into(),
                id: Some("loc-1".into()),
                networks: vec!["198.51.100.0/24".parse().unwrap()],
            }]
        );
        assert_eq!(cfg.policy.rules, Some(PathBuf::from("rules.json")));
        assert_eq!(cfg.policy.lists, Some(PathBuf::from("lists.json")));
        assert_eq!(
            cfg.geoip.database,
            Some(PathBuf::from("GeoLite2-Country.mmdb"))
        );
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
        let problems = problems(
            "[network]\nallow_private = [\"10.0.0.0/33\"]\n[limits]\ntcp_flows_per_device = 0\n",
        );
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
        let problems = problems(
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
        );
        let joined = problems.join("\n");
        assert_all(
            &joined,
            &[
                "colour: unknown key",
                "tunnel.mtu: expected an integer from 576 to 9000, got 70000",
                "tunnel.ipv4_pool: expected an IPv4 CIDR",
                "egress.default_ipv4: expected an IPv4 address",
                "wireguard.listne: unknown key",
            ],
        );
        assert_eq!(problems.len(), 5, "{joined}");
    }

    #[test]
    fn wrong_types_in_one_table_are_all_reported() {
        // A derived Deserialize would stop at the first of these.
        let problems = problems(
            r#"
            data_dir = 7
            [tunnel]
            ipv4_pool = 5
            ipv6_pool = true
            mtu = "big"
            extra = 1
            [wireguard]
            listen = ["0.0.0.0:1"]
            public_endpoint = { host = "x" }
            interface_name = 1979-05-27T07:32:00Z
            [dns]
            upstreams = ["a", 5, "b", false, 1979-05-27]
            intercept = "yes"
            listen = "198.51.100.1:53"
            [limits]
            tcp_flows_per_device = 1.5
            "#,
        );
        let joined = problems.join("\n");
        assert_all(
            &joined,
            &[
                "data_dir: expected a string, got integer",
                "tunnel.ipv4_pool: expected a string, got integer",
                "tunnel.ipv6_pool: expected a string, got boolean",
                "tunnel.mtu: expected an integer from 576 to 9000, got string",
                "tunnel.extra: unknown key",
                "wireguard.listen: expected a string, got array",
                "wireguard.public_endpoint: expected a string, got table",
                "wireguard.interface_name: expected a string, got datetime",
                "dns.upstreams[1]: expected a string, got integer",
                "dns.upstreams[3]: expected a string, got boolean",
                "dns.upstreams[4]: expected a string, got datetime",
                "dns.intercept: expected true or false, got string",
                "dns.listen: expected an array of strings",
                "limits.tcp_flows_per_device: expected an integer from 1 to 1000000, got float",
            ],
        );
        assert_eq!(problems.len(), 14, "{joined}");
    }

    #[test]
    fn tables_of_the_wrong_type_name_their_key() {
        let problems = problems(
            "tunnel = 5\nwireguard = \"x\"\nvnets = 3\ngeoip = 1979-05-27\n[dns]\nlocations = [1, { name = \"a\" }]\n\
             categories = { path = \"x\" }\n",
        );
        let joined = problems.join("\n");
        assert_all(
            &joined,
            &[
                "tunnel: expected a table, got integer",
                "wireguard: expected a table, got string",
                "vnets: expected an array of tables",
                "dns.locations[0]: expected a table, got integer",
                "dns.categories: expected an array of tables",
                "geoip: expected a table, got datetime",
            ],
        );
        assert_eq!(problems.len(), 6, "{joined}");
    }

    #[test]
    fn unknown_keys_are_named_at_every_depth() {
        let keys = bad_keys(
            r#"
            colour = "blue"
            [wireguard]
            listne = "0.0.0.0:1"
            [tunnel]
            "a.b" = 1
            [dns]
            [[dns.locations]]
            name = "office"
            colour = "red"
            [[dns.categories]]
            path = "c.csv"
            format = "csv"
            weight = 2
            [egress]
            [[egress.locations]]
            name = "a"
            ipv4 = ["192.0.2.10"]
            [[egress.locations]]
            name = "b"
            ipv4 = ["192.0.2.11"]
            health_check = { target = "203.0.113.10:80", colour = 1 }
            [policy]
            rule = "r.json"
            [geoip]
            db = "x"
            [network]
            allow = []
            [limits]
            tcp_flows = 1
            [[vnets]]
            name = "site-a"
            id = "f70ff985-a4ef-4643-bbbc-4a0ed4fc8415"
            routes = [{ cidr = "198.18.0.0/16", via = "sa", metric = 1 }]
            mtu = 1
            "#,
        );
        let mut keys = keys;
        keys.sort();
        let mut want = vec![
            "colour",
            "wireguard.listne",
            "tunnel.\"a.b\"",
            "dns.locations[0].colour",
            "dns.categories[0].weight",
            "egress.locations[1].health_check.colour",
            "policy.rule",
            "geoip.db",
            "network.allow",
            "limits.tcp_flows",
            "vnets[0].routes[0].metric",
            "vnets[0].mtu",
        ];
        want.sort();
        assert_eq!(keys, want);
        // Each of them is reported as unknown, not as anything else.
        let text = "[egress]\n[[egress.locations]]\nname = \"a\"\nipv4 = [\"192.0.2.1\"]\n\
                    health_check = { target = \"203.0.113.10:80\", colour = 1 }\n";
        assert_eq!(
            problems(text),
            vec!["egress.locations[0].health_check.colour: unknown key"]
        );
    }

    #[test]
    fn admin_listener_keys() {
        let cfg = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:8443\"\ntls_cert = \"a.pem\"\ntls_key = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(cfg.admin.listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(cfg.admin.tls_key, Some(PathBuf::from("k.pem")));
        assert_eq!(Config::default().admin, AdminConfig::default());
        assert_eq!(
            problems("[admin]\nlisten = \"nowhere\"\ntls_cert = \"a.pem\"\ntoken = 1\n"),
            vec![
                "admin.token: unknown key",
                "admin.listen: expected an address like \"127.0.0.1:8443\", got \"nowhere\"",
                "admin.tls_key: missing: admin.tls_cert needs its key",
            ]
        );
    }

    #[test]
    fn control_listener_key() {
        let cfg = Config::parse("[control]\nlisten = \"198.51.100.1:8444\"\n").unwrap();
        assert_eq!(
            cfg.control.listen,
            Some("198.51.100.1:8444".parse().unwrap())
        );
        assert_eq!(Config::default().control, ControlConfig::default());
        assert_eq!(
            problems("[control]\nlisten = \"here\"\nport = 1\n"),
            vec![
                "control.port: unknown key",
                "control.listen: expected an address like \"198.51.100.1:8444\", got \"here\"",
            ]
        );
    }

    #[test]
    fn the_known_keys_come_from_the_raw_structs() {
        assert_eq!(
            field_names::<RawTunnel>(),
            &["ipv4_pool", "ipv6_pool", "mtu"]
        );
        assert_eq!(field_names::<RawConfig>().len(), 15);
        assert!(field_names::<RawHttp>().contains(&"tls_decrypt"));
        assert!(field_names::<RawHealthCheck>().contains(&"interval"));
    }

    /// Each bounded key at and just past its bounds: `(toml, accepted)`.
    #[test]
    fn every_range_is_checked_at_its_bounds() {
        let v4 = "[tunnel]\nipv4_pool";
        let v6 = "[tunnel]\nipv6_pool";
        let loc = "[[egress.locations]]\nname = \"a\"\nipv6";
        let cat = "[[dns.categories]]\npath = \"h\"\nformat = \"hosts\"\ncategory";
        let cases: &[(&str, &str, bool)] = &[
            ("[tunnel]\nmtu", "575", false),
            ("[tunnel]\nmtu", "576", true),
            ("[tunnel]\nmtu", "9000", true),
            ("[tunnel]\nmtu", "9001", false),
            ("[tunnel]\nmtu", "-1", false),
            ("[tunnel]\nmtu", "9223372036854775807", false),
            (v4, "\"10.0.0.0/30\"", true),
            (v4, "\"10.0.0.0/31\"", false),
            (v6, "\"fd00::/126\"", true),
            (v6, "\"fd00::/127\"", false),
            (loc, "\"2001:db8::/120\"", true),
            (loc, "\"2001:db8::/121\"", false),
            (cat, "0", false),
            (cat, "1", true),
            (cat, "65535", true),
            (cat, "65536", false),
            ("[limits]\ntcp_flows_per_device", "0", false),
            ("[limits]\ntcp_flows_per_device", "1000000", true),
            ("[limits]\ntcp_flows_per_device", "1000001", false),
            ("[limits]\nudp_flows_per_device", "1", true),
            ("[limits]\nudp_flows_per_device", "1000001", false),
            ("[limits]\ndns_queries_per_device", "100000", true),
            ("[limits]\ndns_queries_per_device", "100001", false),
            ("[limits]\nflow_memory_per_device_mb", "1048576", true),
            ("[limits]\nflow_memory_per_device_mb", "1048577", false),
            ("[wireguard]\ninterface_name", "\"abcdefghijklmno\"", true),
            ("[wireguard]\ninterface_name", "\"abcdefghijklmnop\"", false),
            ("[wireguard]\ninterface_name", "\"\"", false),
            ("[wireguard]\ninterface_name", "\"wg/0\"", false),
            ("[wireguard]\nthreads", "1", true),
            ("[wireguard]\nthreads", "64", true),
            ("[wireguard]\nthreads", "0", true),
            ("[wireguard]\nthreads", "-1", false),
            ("[wireguard]\nthreads", "65", false),
            ("[wireguard]\nthreads", "\"2\"", false),
            ("[wireguard]\nsteering", "\"kernel\"", true),
            ("[wireguard]\nsteering", "\"reader\"", true),
            ("[wireguard]\nsteering", "\"bpf\"", false),
            ("[wireguard]\npublic_endpoint", "\"gw.example:1\"", true),
            ("[wireguard]\npublic_endpoint", "\"gw.example:0\"", false),
            ("[wireguard]\npublic_endpoint", "\"gw.example\"", false),
            ("[wireguard]\npublic_endpoint", "\":51820\"", false),
        ];
        for (key, value, ok) in cases {
            let text = format!("{key} = {value}\n");
            match Config::parse(&text) {
                Ok(_) => assert!(ok, "accepted:\n{text}"),
                Err(e) => {
                    assert!(!ok, "refused:\n{text}\n{e}");
                    // A hosts source refused for its category is also one without a category.
                    let name = key.rsplit('\n').next().unwrap_or(key);
                    assert!(
                        !e.problems().is_empty()
                            && e.problems().iter().all(|p| p.key.ends_with(name)),
                        "{e}"
                    );
                }
            }
        }
        let cfg = Config::parse("[limits]\nflow_memory_per_device_mb = 1048576\n").unwrap();
        assert_eq!(cfg.limits.flow_memory_per_device, 1 << 40);
    }

    #[test]
    fn pools_with_host_bits_are_refused_by_key() {
        let joined = problems(
            r#"
            [tunnel]
            ipv4_pool = "100.96.0.1/12"
            ipv6_pool = "fd77:6761:7465::1/64"
            "#,
        )
        .join("\n");
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
        let problems = problems(
            r#"
            [wireguard]
            listen = "0.0.0.0:5353"
            [dns]
            listen = ["198.51.100.1:53", "198.51.100.1:5353"]
            "#,
        );
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
            [[egress.locations]]
            name = "tertiary"
            ipv4 = ["192.0.2.13"]
            health_check = { target = "203.0.113.10:80" }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.egress.default, DefaultEgress::Dedicated);
        assert_eq!(cfg.egress.locations.len(), 3);
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
        assert_eq!(
            cfg.egress.locations[2].health_check.map(|h| h.interval),
            Some(std::time::Duration::from_secs(1)),
            "the interval defaults to a second"
        );
    }

    #[test]
    fn bad_egress_locations_name_the_entry() {
        let joined = problems(
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
            [[egress.locations]]
            name = "d"
            ipv6 = "2001:db8:1::/64"
            health_check = { interval = "1s" }
            "#,
        )
        .join("\n");
        assert_all(
            &joined,
            &[
                "egress.locations[0].ipv4[0]: expected an IPv4 address",
                "egress.locations[0].health_check.interval: expected a duration",
                "egress.locations[0].health_check.colour: unknown key",
                "egress.locations[1].name: \"a\" is used twice",
                "egress.locations[2].name: missing",
                "egress.locations[3].health_check.target: missing",
                "egress.default: \"dedicated\" needs",
            ],
        );
        assert_eq!(
            problems("[egress]\ndefault = \"nearest\"\n"),
            vec!["egress.default: expected \"default\" or \"dedicated\", got \"nearest\""]
        );
    }

    #[test]
    fn bad_dns_tables_name_the_entry() {
        let joined = problems(
            r#"
            [dns]
            block_page = "nope"
            listen = ["198.51.100.1"]
            [[dns.categories]]
            format = "xml"
            [[dns.categories]]
            path = "h"
            format = "hosts"
            [[dns.categories]]
            path = "c"
            [[dns.locations]]
            networks = ["198.51.100.0/24", "x"]
            "#,
        )
        .join("\n");
        assert_all(
            &joined,
            &[
                "dns.block_page: expected an IP address, got \"nope\"",
                "dns.listen[0]: expected an address like \"198.51.100.1:53\"",
                "dns.categories[0].path: a category source needs a path",
                "dns.categories[0].format: expected csv, dir, ut1 or hosts, got \"xml\"",
                "dns.categories[1].category: a hosts source needs the category id",
                "dns.categories[2].format: expected csv, dir, ut1 or hosts",
                "dns.locations[0].name: a location needs a name",
                "dns.locations[0].networks[1]: expected a CIDR",
            ],
        );
    }

    #[test]
    fn vnets_parse_and_bad_ones_name_the_key() {
        let cfg = Config::parse(
            r#"
            [[vnets]]
            name = "site-a"
            id = "F70FF985-A4EF-4643-BBBC-4A0ED4FC8415"
            routes = [{ cidr = "198.18.0.0/16", via = "sa" }, { cidr = "198.19.7.1/16", via = " 198.19.1.2 " }]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.vnets.len(), 1);
        assert_eq!(cfg.vnets[0].id, "f70ff985-a4ef-4643-bbbc-4a0ed4fc8415");
        assert_eq!(cfg.vnets[0].routes[0].1, "sa");
        assert_eq!(
            cfg.vnets[0].routes[1],
            ("198.19.0.0/16".parse().unwrap(), "198.19.1.2".to_string())
        );
        let joined = problems(
            r#"
            [[vnets]]
            name = "x"
            id = "nope"
            routes = [{ cidr = "198.18.0.0/16", via = "2001:db8::1" }, { cidr = "bad" , via = "a"}, { cidr = "198.18.0.0/16" }]
            [[vnets]]
            [[vnets]]
            name = "y"
            id = "f70ff985-a4ef-4643-bbbc-4a0ed4fc8415"
            [[vnets]]
            name = "y"
            id = "f70ff985-a4ef-4643-bbbc-4a0ed4fc8416"
            "#,
        )
        .join("\n");
        assert_all(
            &joined,
            &[
                "vnets[0].id: expected a UUID",
                "vnets[0].routes[0].via: expected an interface name or a next hop",
                "vnets[0].routes[1].cidr: expected a CIDR",
                "vnets[0].routes[2].via: missing (the interface towards the site)",
                "vnets[1].name: missing",
                "vnets[1].id: missing (a UUID)",
                "vnets[3].name: \"y\" or its id is declared twice",
            ],
        );
    }

    #[test]
    fn route_vias_are_interfaces_or_next_hops_of_the_family() {
        let v4: IpNet = "198.18.0.0/16".parse().unwrap();
        let v6: IpNet = "2001:db8::/64".parse().unwrap();
        assert_eq!(route_via(v4, "site-a").as_deref(), Some("site-a"));
        assert_eq!(route_via(v4, " 198.19.1.2").as_deref(), Some("198.19.1.2"));
        assert_eq!(
            route_via(v6, "2001:db8:0:0::1").as_deref(),
            Some("2001:db8::1")
        );
        for bad in [
            "",
            "2001:db8::1",
            "0.0.0.0",
            "a/b",
            "a:b",
            "sixteen-chars-xx",
            "a b",
        ] {
            assert_eq!(route_via(v4, bad), None, "{bad:?}");
        }
        assert_eq!(route_via(v6, "198.19.1.2"), None);
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
        for bad in [
            "",
            "s",
            "0s",
            "1h",
            "1.5s",
            "-1s",
            "99999999999999999999s",
            "1",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_duration("307445734561825861m"), None, "overflow");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = Config::parse("[tunnel\nmtu = 1").unwrap_err();
        assert!(
            matches!(err, ConfigError::Syntax { path: None, .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("invalid TOML: "), "{err}");
        assert!(err.problems().is_empty());
    }

    #[test]
    fn errors_print_one_problem_per_line_after_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("waygate.toml");
        std::fs::write(&file, "[tunnel]\nmtu = 1\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: tunnel.mtu: expected an integer from 576 to 9000, got 1",
                file.display()
            )
        );
        std::fs::write(&file, "colour = 1\n[tunnel]\nmtu = 1\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: 2 problems:\ncolour: unknown key\n\
                 tunnel.mtu: expected an integer from 576 to 9000, got 1",
                file.display()
            )
        );
        assert_eq!(
            Config::parse("colour = 1\n[tunnel]\nmtu = 1\n")
                .unwrap_err()
                .to_string(),
            "colour: unknown key\ntunnel.mtu: expected an integer from 576 to 9000, got 1"
        );
        std::fs::write(&file, "[tunnel").unwrap();
        let err = Config::load(Some(&file)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}: invalid TOML: ", file.display())),
            "{err}"
        );
        let missing = dir.path().join("missing.toml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert_eq!(Config::load(None).unwrap(), Config::default());
    }

    /// Lines drawn from the config's own vocabulary, so most cases get past the TOML parser
    /// and into validation.
    fn config_like_text() -> impl Strategy<Value = String> {
        let header = prop::sample::select(vec![
            "",
            "[wireguard]",
            "[tunnel]",
            "[dns]",
            "[[dns.locations]]",
            "[[dns.categories]]",
            "[egress]",
            "[[egress.locations]]",
            "[policy]",
            "[geoip]",
            "[network]",
            "[limits]",
            "[[vnets]]",
        ]);
        let key = prop::sample::select(vec![
            "data_dir",
            "listen",
            "public_endpoint",
            "interface_name",
            "ipv4_pool",
            "ipv6_pool",
            "mtu",
            "upstreams",
            "upstream_ca",
            "intercept",
            "locations",
            "block_page",
            "categories",
            "name",
            "id",
            "networks",
            "path",
            "format",
            "category",
            "default_ipv4",
            "default",
            "ipv4",
            "ipv6",
            "health_check",
            "rules",
            "database",
            "allow_private",
            "tcp_flows_per_device",
            "flow_memory_per_device_mb",
            "routes",
            "wireguard",
            "vnets",
            "colour",
        ]);
        let value = prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            "[a-z0-9:./ -]{0,24}".prop_map(|s| format!("{s:?}")),
            prop::sample::select(vec![
                "true",
                "1.5",
                "[]",
                "{}",
                "1979-05-27T07:32:00Z",
                "\"dedicated\"",
                "\"hosts\"",
                "\"198.51.100.1:53\"",
                "\"100.96.0.0/12\"",
                "\"fd77::/64\"",
                "\"f70ff985-a4ef-4643-bbbc-4a0ed4fc8415\"",
                "[\"10.0.0.0/8\", 3, \"x\"]",
                "[{ cidr = \"198.18.0.0/16\", via = \"x\" }, 1, { via = 2 }]",
                "{ target = \"203.0.113.10:80\", interval = \"0s\", x = 1 }",
                "[[], {}]",
            ])
            .prop_map(str::to_string),
        ];
        prop::collection::vec((header, key, value), 0..16).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(h, k, v)| format!("{h}\n{k} = {v}\n"))
                .collect()
        })
    }

    fn check_never_panics(text: &str) {
        match parse_str(text) {
            Ok(_) | Err(ConfigError::Syntax { .. }) => {}
            Err(ConfigError::Invalid { problems, .. }) => {
                assert!(!problems.is_empty());
                for p in &problems {
                    assert!(!p.key.is_empty(), "{p}");
                    // The raw tree never fails on its own; serde's wording would mean it did.
                    assert!(!p.message.contains("unknown field"), "{p}");
                    assert!(!p.message.contains("invalid type"), "{p}");
                }
            }
            Err(e @ ConfigError::Read { .. }) => panic!("{e}"),
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            check_never_panics(&text);
        }

        #[test]
        fn config_like_text_never_panics(text in config_like_text()) {
            check_never_panics(&text);
        }
    }
}
