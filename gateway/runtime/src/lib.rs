//! The I/O shell around [`GatewayCore`]: the only place that touches sockets, files and the clock.
//!
//! One task owns the core and the WireGuard socket (batched receive with GRO, batched send with
//! GSO). Upstream connections run as small tasks ([`upstream`]) reporting through one channel.
//! A thread watches the registry and hands the device list to the loop when it changes.
//!
//! Inputs: the validated config, the registry, the host's sockets, files and clock. Outputs: the
//! engine's datagrams on the wire, upstream connections, logs. Driven by tokio; it polls the
//! sans-IO crates below it (engine, DNS core, WireGuard endpoint) and nothing polls it.
#![deny(missing_docs)]
#![allow(clippy::disallowed_methods)] // the shell reads the clock for the core

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::sync::mpsc;
use waygate_udp::BatchSocket;

use crate::uapi::{SharedSnapshot, UapiPeer, UapiSnapshot};
use nexthop::{NextHopRoute, NextHops};
use waygate_config::Config;
use waygate_engine::flow::{Command, DeviceInfo, FlowLimits, LocalServices, Via};
use waygate_engine::gateway::{CoreSettings, GatewayCore};
use waygate_engine::protect::Protected;
use waygate_engine::vnet::VnetRoute;
use waygate_registry::datadir;
use waygate_registry::{Device, Registry, Seen, Vnet};
use waygate_stages::egress::EgressSettings;
use waygate_wg::transmit::TransmitQueue;

pub mod device_api;
pub mod dns;
pub mod drops;
pub mod health;
pub mod host;
pub mod http;
pub mod local;
pub mod metrics;
pub mod nexthop;
pub mod reload;
pub mod resolver;
pub mod stats;
pub mod tls;
pub mod uapi;
pub mod upstream;

use upstream::Upstreams;

/// How often the registry is checked for enrollments and revocations.
const REGISTRY_POLL: Duration = Duration::from_millis(200);
/// How often last-seen times are written to the registry.
const LAST_SEEN_EVERY: Duration = Duration::from_secs(30);
/// After a start, devices seen this recently at a known address get a handshake from the gateway.
const RESUME_WITHIN: Duration = Duration::from_secs(3600);
/// Flows that must have closed since the peak before freed memory is handed back: trimming
/// walks the whole heap, so not for every few flows.
const FLOWS_BEFORE_TRIM: usize = 256;
/// How often the `wg show` snapshot is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Kernel buffer for the WireGuard socket: bursts from many devices must not overflow it.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;
/// Datagrams sent to one peer in one GSO call. Longer runs arrive as one burst that overflows a
/// stock device's socket buffer (measured: 64 -> 36 Mbit/s downloads, 4 -> 0.57 Gbit/s).
const MAX_GSO_RUN: usize = 4;
/// Events handled before the loop looks at the socket again.
const MAX_EVENTS_PER_TURN: usize = 512;
/// Receive batches before the loop looks at events again.
const MAX_RECV_BATCHES_PER_TURN: usize = 16;

/// Runs the gateway until SIGINT or SIGTERM.
pub fn serve(config: Config) -> anyhow::Result<()> {
    map_large_allocations();
    let descriptors = host::raise_descriptor_limit();
    // One thread: the core, the WireGuard socket and every upstream task. Handing packets and
    // bytes between worker threads cost a wake-up each (measured with 2 workers: 40,000 context
    // switches per second uploading at 0.64 Gbit/s, 1.25 CPU-s/Gbit; one thread: 0.80 CPU-s/Gbit
    // at 0.72 Gbit/s). More cores are for shards of peers, each with its own thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(config, descriptors))
}

/// Has glibc's allocator serve large blocks (flow buffers, up to megabytes each) straight from
/// fresh mappings. Zeroed fresh pages cost nothing until touched, so a flow's buffers occupy
/// memory in proportion to the data it actually queued; freed blocks go back to the system. By
/// default glibc raises this threshold after the first free and then zero-fills recycled heap
/// memory, which would make every idle flow cost its whole buffers.
fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: libc::c_int = 128 * 1024;
        // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
        // of ours starts.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
}

async fn run(config: Config, descriptors: u64) -> anyhow::Result<()> {
    let key_bytes = prepare_data_dir(&config)?;
    let drops = Arc::new(drops::RuntimeDrops::default());
    let wall = UNIX_EPOCH + unix_now();
    let ca = crate::tls::load_ca(&config.data_dir, wall)?;
    let dns_tls = crate::tls::gateway_dns_tls(&ca, &config, wall)?;
    let settings = core_settings(&config, descriptors)?;
    let (dns, dns_out) = resolver::spawn(
        &config,
        host::dns_queries_for_descriptors(descriptors),
        dns_tls,
        &settings.local,
        drops.clone(),
    )
    .context("dns")?;
    let now = Instant::now();
    let mut core = GatewayCore::new(key_bytes, settings.clone(), now);
    let host_addresses = (
        host::interface_addresses().context("cannot list the host's addresses")?,
        host::local_ipv6_prefixes(),
    );
    core.set_host_addresses(&host_addresses.0, &host_addresses.1);

    let socket = BatchSocket::bind(config.wireguard.listen, SOCKET_BUFFER)
        .with_context(|| format!("cannot listen on UDP {}", config.wireguard.listen))?;

    let (device_tx, device_rx) = mpsc::channel::<RegistrySnapshot>(4);
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<Seen>>();
    let watcher = {
        let data_dir = config.data_dir.clone();
        let tunnel = config.tunnel.clone();
        std::thread::Builder::new()
            .name("waygate-registry".into())
            .spawn(move || watch_registry(&data_dir, &tunnel, device_tx, seen_rx))?
    };
    let uapi = start_uapi(&config, key_bytes);
    let reloads = Arc::new(reload::ReloadCounters::default());
    let inspector = http::start(&config, wall)?;
    let (reload_rx, rules_loaded) = start_reloads(
        &config,
        &dns,
        &mut core,
        reloads.clone(),
        inspector.as_ref(),
    )?;
    let logs = start_logs(&config, &dns, &mut core)?;
    if let (Some(inspector), Some(logs)) = (&inspector, &logs) {
        inspector.log_to(logs.clone());
    }
    let (probe_tx, probe_rx) = mpsc::channel(PROBE_QUEUE);
    health::spawn_probes(&config.egress.locations, probe_tx);
    let (event_tx, event_rx) = mpsc::channel(upstream::EVENT_QUEUE);
    let device_api = device_api::DeviceApi::new(
        config.clone(),
        Registry::open(&config.data_dir, &config.tunnel).context("the device API's registry")?,
        unix_seconds,
    );
    dns.local.set_device_api(Arc::new(Arc::new(device_api)));
    let local: Arc<dyn local::LocalHost> = dns.local.clone();
    let mut upstreams = Upstreams::new(event_tx, Some(local), drops.clone());
    upstreams.set_inspector(inspector.clone());
    let (stats_tx, stats_rx) = tokio::sync::watch::channel(stats::StatsSnapshot::default());
    // Dropped at the end of this function, which removes the socket.
    let _admin = start_admin(&config, &ca, wall, stats_rx, rules_loaded)?;
    if let Some(listen) = config.metrics.listen {
        let registry = metrics::registry(metrics::Sources {
            stats: stats_tx.subscribe(),
            reloads,
            logs: logs.as_ref().map(|l| l.stats().clone()),
            egress_locations: config
                .egress
                .locations
                .iter()
                .map(|l| l.name.clone())
                .collect(),
            http: inspector.as_ref().map(waygate_http::Inspector::counters),
        });
        metrics::serve(listen, registry)?;
    }
    if let Some(listen) = config.control.listen {
        let tls = crate::tls::control_tls(&ca, &config, wall)?;
        let enroll = waygate_admin::enroll::start(&config, listen, tls)?;
        tracing::info!(addr = ?enroll.addr, "enrollment listener serving");
    }

    tracing::info!(
        listen = %config.wireguard.listen,
        public_key = %waygate_keys::PublicKey::from_bytes(core.public_key()),
        gateway = %settings.gateway_v4,
        local_services = settings.local.routes().len(),
        egress = ?settings.egress.default_ipv4,
        "waygate serving"
    );
    let mut serving = Serving {
        core,
        socket,
        upstreams,
        dns,
        drops,
        host_addresses,
        flows_peak: 0,
        vnets: Vec::new(),
        vnets_unresolved: false,
        next_hops: NextHops::default(),
        uapi_snapshot: uapi.snapshot.clone(),
        next_housekeeping: now,
        drop_report: drops::DropReport::new(now),
        seen_tx,
        next_seen: now + LAST_SEEN_EVERY,
        reported: HashMap::new(),
        stats: stats_tx,
        inspector,
        egress_locations: config.egress.locations.len(),
        logs,
    };
    let mut inputs = Inputs {
        devices: device_rx,
        events: event_rx,
        probes: probe_rx,
        reloads: reload_rx,
        answers: dns_out.answers,
        learned: dns_out.learned,
        terminate: signal(tokio::signal::unix::SignalKind::terminate())?,
        interrupt: signal(tokio::signal::unix::SignalKind::interrupt())?,
    };
    let result = serving.serve(&mut inputs).await;
    tracing::info!("waygate stopping");
    // Where every device is now, for the next start to reach them; sent before the registry
    // channel closes, which tells the watcher to write what it has and end.
    let _ = serving.seen_tx.send(recently_seen(&serving.core));
    drop(serving);
    drop(inputs);
    let _ = std::fs::remove_file(&uapi.path);
    let _ = watcher.join();
    result
}

/// Bounded queue of egress health probe results (a handful of locations, one probe a second).
const PROBE_QUEUE: usize = 64;

/// Creates the data dir, checks the registry, loads the server key and registers the config's
/// virtual networks; returns the key.
fn prepare_data_dir(config: &Config) -> anyhow::Result<[u8; 32]> {
    datadir::ensure_data_dir(&config.data_dir)
        .with_context(|| format!("data dir {}", config.data_dir.display()))?;
    // Fail now, not in the watcher thread, if the registry is unusable. Opened before the key
    // is created: a key without a registry means the registry was lost, and is refused.
    let registry =
        Registry::open(&config.data_dir, &config.tunnel).context("cannot open the registry")?;
    let key = datadir::load_or_create_server_key(&config.data_dir)
        .with_context(|| format!("server key in {}", config.data_dir.display()))?;
    for vnet in &config.vnets {
        let routes: Vec<waygate_registry::VnetRoute> = vnet
            .routes
            .iter()
            .map(|(cidr, via)| waygate_registry::VnetRoute {
                cidr: *cidr,
                via: via.clone(),
            })
            .collect();
        registry
            .upsert_vnet(&vnet.id, &vnet.name, &routes, unix_now().as_secs() as i64)
            .with_context(|| format!("vnets: cannot register {:?}", vnet.name))?;
    }
    Ok(*key.to_bytes())
}

/// The `wg show` socket: what it serves, and where.
struct Uapi {
    snapshot: Arc<SharedSnapshot>,
    path: std::path::PathBuf,
}

/// Serves the WireGuard UAPI socket from a snapshot the loop refreshes when asked.
fn start_uapi(config: &Config, key_bytes: [u8; 32]) -> Uapi {
    let snapshot = Arc::new(SharedSnapshot::new(UapiSnapshot {
        private_key: key_bytes,
        listen_port: config.wireguard.listen.port(),
        peers: Vec::new(),
    }));
    let path = uapi::socket_path(&config.wireguard.interface_name);
    let shared = snapshot.clone();
    let at = path.clone();
    tokio::spawn(async move {
        if let Err(err) = uapi::serve_shared(at.clone(), shared).await {
            tracing::warn!(path = %at.display(), %err, "wg UAPI socket unavailable; `wg show` will not see this gateway");
        }
    });
    Uapi { snapshot, path }
}

/// Starts the admin API: its socket always, its TLS listener when `admin.listen` is set. It
/// reads the stats snapshot and the count of rules running for `GET /status`.
fn start_admin(
    config: &Config,
    ca: &waygate_keys::CertificateAuthority,
    wall: SystemTime,
    stats: tokio::sync::watch::Receiver<stats::StatsSnapshot>,
    rules_loaded: Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<waygate_admin::AdminHandle> {
    let tls = match config.admin.listen {
        Some(_) => Some(crate::tls::admin_tls(ca, config, wall)?),
        None => None,
    };
    let status: waygate_admin::StatusSource = Arc::new(move || {
        let s = stats.borrow();
        waygate_admin::GatewayStatus {
            peers: s.peers,
            tcp_flows: s.tcp_flows,
            udp_flows: s.udp_flows,
            rules_loaded: rules_loaded.load(std::sync::atomic::Ordering::Relaxed),
        }
    });
    let admin = waygate_admin::start(config, tls, status)?;
    tracing::info!(socket = %admin.socket().display(), tls = ?admin.tls_addr, "admin API serving");
    Ok(admin)
}

/// Starts the activity log writer when `logs.dir` is set, and has the resolver and the core
/// report to it (each through a sender of its own). The writer thread is left to end with the
/// process: it writes what is buffered at least every `write::BUSY_WAIT`, so at most the lines
/// of that last moment are not on disk at exit.
fn start_logs(
    config: &Config,
    dns: &resolver::ResolverHandle,
    core: &mut GatewayCore,
) -> anyhow::Result<Option<waygate_observe::LogSender>> {
    let Some(dir) = &config.logs.dir else {
        return Ok(None);
    };
    let settings = waygate_observe::LogSettings {
        dir: dir.clone(),
        max_size: config.logs.max_size,
        keep: config.logs.keep,
        queue: waygate_observe::write::QUEUE,
    };
    let (sender, _writer) = waygate_observe::spawn(settings)
        .with_context(|| format!("logs.dir: cannot write activity logs in {}", dir.display()))?;
    dns.log_activity(sender.clone());
    core.record_activity(true);
    tracing::info!(dir = %dir.display(), max_size = config.logs.max_size, keep = config.logs.keep, "activity logs on");
    Ok(Some(sender))
}

/// Loads the followed files (rules, categories, GeoIP) into the core and the resolver, and
/// starts the thread that reports their changes; returns its channel and the count of rules
/// running.
fn start_reloads(
    config: &Config,
    dns: &resolver::ResolverHandle,
    core: &mut GatewayCore,
    counters: Arc<reload::ReloadCounters>,
    inspector: Option<&waygate_http::Inspector>,
) -> anyhow::Result<(
    mpsc::Receiver<reload::Reloaded>,
    Arc<std::sync::atomic::AtomicUsize>,
)> {
    let (followed, policy, geoip, categories) = reload::Followed::load(config)?;
    let rules_loaded = followed.rules_loaded();
    let categories = categories.map(Arc::new);
    dns.set_categories(categories.clone());
    if let Some(policy) = policy {
        let policy = Arc::new(policy);
        if let Some(inspector) = inspector {
            inspector.set_policy(policy.clone());
        }
        dns.set_policy(policy.clone());
        core.set_policy(policy);
    }
    let geoip = geoip.map(Arc::new);
    if let Some(inspector) = inspector {
        inspector.set_geoip(geoip.clone());
        inspector.set_categories(categories);
    }
    dns.set_geoip(geoip.clone());
    core.set_geoip(geoip);
    let (reload_tx, reload_rx) = mpsc::channel(2);
    std::thread::Builder::new()
        .name("waygate-reload".into())
        .spawn(move || followed.run(reload_tx, &counters))?;
    Ok((reload_rx, rules_loaded))
}

/// Everything the loop waits on.
struct Inputs {
    devices: mpsc::Receiver<RegistrySnapshot>,
    events: mpsc::Receiver<waygate_engine::flow::UpstreamEvent>,
    probes: mpsc::Receiver<(usize, waygate_stages::egress::Probe)>,
    reloads: mpsc::Receiver<reload::Reloaded>,
    answers: mpsc::Receiver<resolver::Answer>,
    learned: mpsc::Receiver<resolver::Learned>,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

/// The serving loop's state: the core and what carries out its work.
struct Serving {
    core: GatewayCore,
    socket: BatchSocket,
    upstreams: Upstreams,
    dns: resolver::ResolverHandle,
    drops: Arc<drops::RuntimeDrops>,
    host_addresses: (Vec<waygate_engine::protect::HostAddress>, Vec<ipnet::IpNet>),
    /// Flows at their most since memory was last handed back (see `host::return_freed_memory`).
    flows_peak: usize,
    vnets: Vec<Vnet>,
    vnets_unresolved: bool,
    /// Removes the kernel routes it installed when the loop ends, also on error.
    next_hops: NextHops,
    uapi_snapshot: Arc<SharedSnapshot>,
    next_housekeeping: Instant,
    drop_report: drops::DropReport,
    seen_tx: std::sync::mpsc::Sender<Vec<Seen>>,
    next_seen: Instant,
    /// Where each device was last reported to the registry.
    reported: HashMap<String, SocketAddr>,
    stats: tokio::sync::watch::Sender<stats::StatsSnapshot>,
    /// The HTTP stage's inspector, which follows rule, category and GeoIP reloads.
    inspector: Option<waygate_http::Inspector>,
    /// Configured egress locations, for the snapshot's health.
    egress_locations: usize,
    /// Where the core's activity records go, while `logs.dir` is set.
    logs: Option<waygate_observe::LogSender>,
}

impl Serving {
    /// Runs until a signal, or until the registry watcher stops (an error).
    async fn serve(&mut self, inputs: &mut Inputs) -> anyhow::Result<()> {
        loop {
            let deadline = self.core.poll_timeout();
            tokio::select! {
                biased;
                _ = inputs.terminate.recv() => return Ok(()),
                _ = inputs.interrupt.recv() => return Ok(()),
                snapshot = inputs.devices.recv() => match snapshot {
                    Some(snapshot) => self.sync_registry(snapshot),
                    None => anyhow::bail!("the registry watcher stopped"),
                },
                ready = self.socket.readable() => {
                    ready?;
                    receive(&mut self.socket, &mut self.core);
                }
                Some(event) = inputs.events.recv() => {
                    let now = Instant::now();
                    self.core.handle_upstream(event, now);
                    drain(&mut inputs.events, |e| self.core.handle_upstream(e, now));
                }
                Some((location, probe)) = inputs.probes.recv() => {
                    self.core.record_egress_probe(location, probe);
                }
                Some(reloaded) = inputs.reloads.recv() => self.reload(reloaded),
                Some(l) = inputs.learned.recv() => {
                    let now = Instant::now();
                    self.core.learn_name(&l.device_id, l.ip, &l.names, l.ttl, now);
                    drain(&mut inputs.learned, |l| {
                        self.core.learn_name(&l.device_id, l.ip, &l.names, l.ttl, now)
                    });
                }
                Some(a) = inputs.answers.recv() => {
                    self.core.handle_dns_answer(a.peer, a.to, a.from, &a.payload);
                    drain(&mut inputs.answers, |a| {
                        self.core.handle_dns_answer(a.peer, a.to, a.from, &a.payload)
                    });
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            self.finish_turn().await;
        }
    }

    /// A new device list and virtual networks from the registry.
    fn sync_registry(&mut self, snapshot: RegistrySnapshot) {
        let resume = resumable(&snapshot.devices, unix_now().as_secs() as i64);
        self.core
            .sync_peers(peers_of(snapshot.devices), Instant::now());
        // Devices already heard from since the start are skipped.
        for (key, at) in resume {
            self.core.resume_peer(&key, at);
        }
        let (routes, unresolved) = resolve_vnet_routes(&snapshot.vnets, &mut self.next_hops);
        self.core.sync_vnets(routes);
        self.vnets = snapshot.vnets;
        self.vnets_unresolved = unresolved;
        // The device list was read into a copy per device and compared: at 100,000 devices
        // tens of MB freed in the middle of the heap, kept mapped by glibc without this.
        host::return_freed_memory();
    }

    /// A followed file changed.
    fn reload(&mut self, reloaded: reload::Reloaded) {
        match reloaded {
            reload::Reloaded::Policy(policy) => {
                if let Some(inspector) = &self.inspector {
                    inspector.set_policy(policy.clone());
                }
                self.dns.set_policy(policy.clone());
                self.core.set_policy(policy);
            }
            reload::Reloaded::Categories(db) => {
                if let Some(inspector) = &self.inspector {
                    inspector.set_categories(Some(db.clone()));
                }
                self.dns.set_categories(Some(db));
            }
            reload::Reloaded::GeoIp(db) => {
                if let Some(inspector) = &self.inspector {
                    inspector.set_geoip(Some(db.clone()));
                }
                self.dns.set_geoip(Some(db.clone()));
                self.core.set_geoip(Some(db));
            }
        }
    }

    /// After every wake-up: due timers, the batch's flush, the datagrams it produced, the work
    /// it asked for, and the periodic chores.
    async fn finish_turn(&mut self) {
        let now = Instant::now();
        if now >= self.core.poll_timeout() {
            self.core.handle_timeout(now);
        }
        self.core.flush(now);
        send(&self.socket, self.core.transmit_queue()).await;
        if let Some(logs) = &self.logs {
            while let Some(activity) = self.core.poll_activity() {
                logs.send(activity);
            }
        }
        while let Some(command) = self.core.poll_command() {
            match command {
                Command::DnsQuery {
                    peer,
                    device,
                    device_public,
                    client,
                    server,
                    payload,
                } => self.dns.query(resolver::Query {
                    peer,
                    client: resolver::device_client(
                        &device,
                        client.ip(),
                        device_public.map(|a| a.ip()),
                    ),
                    from: client,
                    to: server,
                    payload,
                }),
                other => self.upstreams.execute(other),
            }
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + SNAPSHOT_EVERY;
            self.housekeeping(now);
        }
    }

    /// Once a second: the host's addresses, memory, late interfaces, `wg show`, drops,
    /// last-seen times and the stats snapshot.
    fn housekeeping(&mut self, now: Instant) {
        self.follow_host_addresses();
        let (tcp, udp) = self.core.open_flows();
        let flows = tcp + udp;
        self.flows_peak = self.flows_peak.max(flows);
        if flows + FLOWS_BEFORE_TRIM <= self.flows_peak {
            host::return_freed_memory();
            self.flows_peak = flows;
        }
        if self.vnets_unresolved {
            // An interface named by a route may come up after the gateway.
            let (routes, unresolved) = resolve_vnet_routes(&self.vnets, &mut self.next_hops);
            self.core.sync_vnets(routes);
            self.vnets_unresolved = unresolved;
        }
        if self.uapi_snapshot.take_wanted() {
            self.uapi_snapshot.set_peers(uapi_peers(&self.core));
        }
        let wg_drops = self.core.wireguard().drops();
        if let Some(dropped) =
            self.drop_report
                .poll(now, wg_drops, self.core.flow_drops(), &self.drops)
        {
            drops::log(&dropped);
        }
        self.record_last_seen(now);
        let snapshot = stats::StatsSnapshot::collect(
            &self.core,
            self.upstreams.len(),
            &self.dns,
            &self.drops,
            self.egress_locations,
        );
        self.stats.send_replace(snapshot);
    }

    /// Addresses come and go (DHCP, a new interface): flows to them are refused at once.
    fn follow_host_addresses(&mut self) {
        match host::interface_addresses() {
            Ok(addrs) => {
                let now_host = (addrs, host::local_ipv6_prefixes());
                if now_host != self.host_addresses {
                    tracing::info!(
                        addresses = now_host.0.len(),
                        local_prefixes = now_host.1.len(),
                        "the host's addresses changed"
                    );
                    self.core.set_host_addresses(&now_host.0, &now_host.1);
                    self.host_addresses = now_host;
                }
            }
            Err(err) => tracing::warn!(%err, "cannot list the host's addresses"),
        }
    }

    /// Written every LAST_SEEN_EVERY, and within a second when a device appears at a new
    /// address, so a crash soon after still leaves the next start where to reach it.
    fn record_last_seen(&mut self, now: Instant) {
        let seen = recently_seen(&self.core);
        let moved = seen.iter().any(|s| {
            s.endpoint.is_some() && self.reported.get(&s.device_id) != s.endpoint.as_ref()
        });
        if moved || now >= self.next_seen {
            self.next_seen = now + LAST_SEEN_EVERY;
            for s in &seen {
                if let Some(at) = s.endpoint {
                    self.reported.insert(s.device_id.clone(), at);
                }
            }
            let _ = self.seen_tx.send(seen);
        }
    }
}

/// Hands what else is already queued in `rx` to `handle`, up to a turn's worth.
fn drain<T>(rx: &mut mpsc::Receiver<T>, mut handle: impl FnMut(T)) {
    for _ in 1..MAX_EVENTS_PER_TURN {
        match rx.try_recv() {
            Ok(item) => handle(item),
            Err(_) => break,
        }
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("cannot install signal handler")
}

/// What the core needs, derived from the config.
fn core_settings(config: &Config, descriptors: u64) -> anyhow::Result<CoreSettings> {
    // The host owns its egress addresses and whole IPv6 egress prefixes even where no
    // interface lists them (a prefix routed `local` to lo answers on every address).
    let egress = &config.egress;
    let owned: Vec<ipnet::IpNet> = egress
        .default_ipv4
        .into_iter()
        .chain(egress.locations.iter().flat_map(|l| l.ipv4.iter().copied()))
        .map(|a| ipnet::IpNet::from(IpAddr::V4(a)))
        .chain(
            egress
                .locations
                .iter()
                .filter_map(|l| l.ipv6)
                .map(ipnet::IpNet::V6),
        )
        .collect();
    Ok(CoreSettings {
        pool_v4: config.tunnel.ipv4_pool,
        pool_v6: config.tunnel.ipv6_pool,
        gateway_v4: config.tunnel.gateway_ipv4(),
        gateway_v6: config.tunnel.gateway_ipv6(),
        mtu: config.tunnel.mtu,
        // The resolver answers DNS on every transport; no port of the gateway forwards it.
        local: LocalServices::resolver().with_device_api(),
        dns_upstream: None,
        dns_intercept: config.dns.intercept,
        egress: EgressSettings {
            default_ipv4: config.egress.default_ipv4,
            default_ipv6: None,
            default: config.egress.default,
            locations: config.egress.locations.clone(),
        },
        protected: Protected::new(owned, config.network.allow_private.clone()),
        limits: FlowLimits {
            tcp_per_device: config.limits.tcp_flows_per_device,
            udp_per_device: config.limits.udp_flows_per_device,
            memory_per_device: config.limits.flow_memory_per_device,
            total: host::flows_for_descriptors(descriptors),
        },
        random_seed: rand::random(),
        http_ports: config.http.ports.clone(),
        drop_quic: config.http.tls_decrypt && !config.http.quic_allowed,
    })
}

/// Drains the socket in batches, at most [`MAX_RECV_BATCHES_PER_TURN`] before the loop looks
/// at events again.
fn receive(socket: &mut BatchSocket, core: &mut GatewayCore) {
    for _ in 0..MAX_RECV_BATCHES_PER_TURN {
        let now = Instant::now();
        match socket.receive_batch(|from, datagram| core.handle_datagram(from, datagram, now)) {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                tracing::debug!(%err, "WireGuard socket receive error");
                return;
            }
        }
    }
}

/// Sends everything queued, in GSO runs of at most [`MAX_GSO_RUN`] datagrams.
async fn send(socket: &BatchSocket, queue: &mut TransmitQueue) {
    if queue.is_empty() {
        return;
    }
    let cap = socket.max_gso_segments().min(MAX_GSO_RUN);
    for run in queue.gso_runs(cap) {
        if let Err(err) = socket
            .send_run(run.dst, run.contents, run.segment_size)
            .await
        {
            tracing::debug!(%err, dst = %run.dst, "WireGuard socket send error");
        }
    }
    queue.clear();
}

/// What the registry watcher hands to the serving loop on every change.
struct RegistrySnapshot {
    devices: Vec<Device>,
    vnets: Vec<Vnet>,
}

/// Each virtual network's routes, resolved to their interfaces' indexes or, for next hops, to
/// the marks of the routing tables `next_hops` installs for them; routes whose interface does
/// not exist (yet) are left out and reported by the returned flag.
fn resolve_vnet_routes(
    vnets: &[Vnet],
    next_hops: &mut NextHops,
) -> (HashMap<String, Vec<VnetRoute>>, bool) {
    let wanted: Vec<NextHopRoute> = vnets
        .iter()
        .flat_map(|v| &v.routes)
        .filter_map(|r| {
            r.next_hop().map(|next_hop| NextHopRoute {
                cidr: r.cidr,
                next_hop,
            })
        })
        .collect();
    let mut marks = next_hops.sync(&wanted).into_iter();
    let mut unresolved = false;
    let mut out = HashMap::new();
    for vnet in vnets {
        let mut routes = Vec::new();
        for route in &vnet.routes {
            let path = match route.next_hop() {
                Some(_) => match marks.next() {
                    Some(Ok(mark)) => Some(Via::Mark(mark)),
                    Some(Err(why)) => {
                        tracing::warn!(vnet = %vnet.name, cidr = %route.cidr, via = %route.via, "next-hop route unusable: {why}");
                        None
                    }
                    None => None,
                },
                None => match interface_index(&route.via) {
                    Some(ifindex) => Some(Via::Interface(ifindex)),
                    None => {
                        unresolved = true;
                        tracing::warn!(vnet = %vnet.name, cidr = %route.cidr, via = %route.via, "no such interface; route unused until it appears");
                        None
                    }
                },
            };
            if let Some(path) = path {
                routes.push(VnetRoute {
                    cidr: route.cidr,
                    via: route.via.clone(),
                    path,
                });
            }
        }
        out.insert(vnet.id.clone(), routes);
    }
    (out, unresolved)
}

/// The index of the interface called `name` in this network namespace.
fn interface_index(name: &str) -> Option<NonZeroU32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    NonZeroU32::new(index)
}

/// The devices as the data plane keeps them. Devices with the same extras (the same groups and
/// posture results: most of a fleet) share one copy: at 100,000 devices a copy each was 14 MB.
fn peers_of(devices: Vec<Device>) -> Vec<([u8; 32], DeviceInfo)> {
    let mut extras: HashMap<waygate_model::IdentityExtras, Arc<waygate_model::IdentityExtras>> =
        HashMap::new();
    devices
        .into_iter()
        .filter(Device::is_active)
        .map(|d| {
            let shared = extras
                .entry(d.extras)
                .or_insert_with_key(|e| Arc::new(e.clone()))
                .clone();
            (
                *d.public_key.as_bytes(),
                DeviceInfo {
                    id: d.id,
                    name: d.name,
                    email: d.email,
                    user_name: d.user_name,
                    groups: d.groups,
                    extras: shared,
                    vnet_id: d.vnet_id,
                    ipv4: d.ipv4,
                    ipv6: d.ipv6,
                },
            )
        })
        .collect()
}

/// The wall clock in unix seconds.
fn unix_seconds() -> i64 {
    i64::try_from(unix_now().as_secs()).unwrap_or(i64::MAX)
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn uapi_peers(core: &GatewayCore) -> Vec<UapiPeer> {
    let wg = core.wireguard();
    let now = unix_now();
    wg.stats()
        .into_iter()
        .map(|s| {
            let device = wg
                .peer_by_key(&s.public_key)
                .and_then(|id| wg.peer_data(id));
            UapiPeer {
                public_key: s.public_key,
                endpoint: s.endpoint,
                allowed_ips: device
                    .map(|d| {
                        vec![
                            ipnet::IpNet::from(IpAddr::V4(d.ipv4)),
                            ipnet::IpNet::from(IpAddr::V6(d.ipv6)),
                        ]
                    })
                    .unwrap_or_default(),
                last_handshake: s.since_handshake.map(|d| now.saturating_sub(d)),
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
                keepalive: 0,
            }
        })
        .collect()
}

fn recently_seen(core: &GatewayCore) -> Vec<Seen> {
    let wg = core.wireguard();
    let now = unix_now();
    wg.active_stats()
        .filter_map(|(peer, s)| {
            let since = s.since_handshake?;
            // A session lives at most 3 minutes without a new handshake.
            if since > Duration::from_secs(180) {
                return None;
            }
            let device = wg.peer_data(peer)?;
            Some(Seen {
                device_id: device.id.clone(),
                at: now.saturating_sub(since).as_secs() as i64,
                endpoint: s.endpoint,
            })
        })
        .collect()
}

/// Devices to reach out to after a start: active, seen at a known address within
/// [`RESUME_WITHIN`] of `now` (unix seconds). Older addresses have likely changed hands.
fn resumable(devices: &[Device], now: i64) -> Vec<([u8; 32], SocketAddr)> {
    devices
        .iter()
        .filter(|d| d.is_active())
        .filter(|d| {
            d.last_seen
                .is_some_and(|t| now.saturating_sub(t) <= RESUME_WITHIN.as_secs() as i64)
        })
        .filter_map(|d| Some((*d.public_key.as_bytes(), d.last_endpoint?)))
        .collect()
}

fn record_seen(registry: &Registry, seen: &std::sync::mpsc::Receiver<Vec<Seen>>) {
    while let Ok(batch) = seen.try_recv() {
        if let Err(err) = registry.record_last_seen(&batch) {
            tracing::warn!(%err, "cannot record last-seen times");
        }
    }
}

/// Polls the registry's change counter and sends the device list whenever it changes; writes
/// last-seen times it is handed. Ends when the serving loop goes away.
fn watch_registry(
    data_dir: &Path,
    tunnel: &waygate_config::TunnelConfig,
    devices: mpsc::Sender<RegistrySnapshot>,
    seen: std::sync::mpsc::Receiver<Vec<Seen>>,
) {
    let registry = match Registry::open(data_dir, tunnel) {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(%err, "cannot open the registry");
            return;
        }
    };
    let mut last = None;
    // When the next posture pass expires: the devices are read again then, so the pass stops
    // counting on the next flow although nothing in the registry changed.
    let mut next_expiry: Option<i64> = None;
    loop {
        let now = unix_seconds();
        let expired = next_expiry.is_some_and(|at| now >= at);
        match registry.change_counter() {
            Ok(counter) if Some(counter) != last || expired => {
                match registry
                    .active_devices()
                    .and_then(|d| Ok((d, registry.vnets()?)))
                {
                    Ok((list, vnets)) => {
                        let snapshot = RegistrySnapshot {
                            devices: list,
                            vnets,
                        };
                        if devices.blocking_send(snapshot).is_err() {
                            return;
                        }
                        last = Some(counter);
                        next_expiry = registry.next_posture_expiry(now).unwrap_or_else(|err| {
                            tracing::warn!(%err, "cannot read posture expiries");
                            None
                        });
                    }
                    Err(err) => tracing::warn!(%err, "cannot read devices"),
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot read the registry"),
        }
        record_seen(&registry, &seen);
        if devices.is_closed() {
            // The serving loop's last report comes before it closes the channel.
            record_seen(&registry, &seen);
            return;
        }
        std::thread::sleep(REGISTRY_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use waygate_keys::PrivateKey;

    fn device(seed: u64, last_seen: Option<i64>, at: Option<&str>, revoked: bool) -> Device {
        Device {
            id: format!("d{seed}"),
            name: format!("device-{seed}"),
            public_key: PrivateKey::generate(&mut StdRng::seed_from_u64(seed)).public_key(),
            ipv4: Ipv4Addr::new(100, 96, 0, 2),
            ipv6: "fd77:6761:7465::2".parse().expect("v6"),
            email: "ada@example.com".into(),
            user_name: None,
            groups: Vec::new(),
            extras: Default::default(),
            vnet_id: None,
            created_at: 1_000,
            last_seen,
            last_endpoint: at.map(|a| a.parse().expect("endpoint")),
            revoked_at: revoked.then_some(2_000),
        }
    }

    #[test]
    fn only_active_devices_seen_lately_at_a_known_address_are_resumed() {
        let now = 100_000;
        let recent = Some(now - 600);
        let devices = [
            device(1, recent, Some("198.51.100.11:40000"), false),
            device(2, recent, None, false),
            device(3, Some(now - 7_200), Some("198.51.100.13:40000"), false),
            device(4, recent, Some("198.51.100.14:40000"), true),
            device(5, None, Some("198.51.100.15:40000"), false),
        ];
        let got = resumable(&devices, now);
        assert_eq!(
            got,
            vec![(
                *devices[0].public_key.as_bytes(),
                "198.51.100.11:40000".parse().expect("endpoint")
            )]
        );
    }
}
