//! The I/O shell around [`GatewayCore`]: the only place that touches sockets, files and the clock.
//!
//! The data plane is `wireguard.threads` shards ([`shard`]), each a thread with its own tokio
//! runtime where one task owns the shard's core and its WireGuard socket (batched receive with
//! GRO, batched send with GSO; the shards' sockets share the port and the kernel steers each
//! peer's datagrams to its shard). Upstream connections run as small tasks ([`upstream`]) on
//! their shard, reporting through its channel. A thread watches the registry and hands the
//! device list to every shard when it changes.
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
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use waygate_udp::BatchSocket;
use waygate_wg::shard::Shard;
use waygate_wg::Handoff;

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

pub mod deadline;
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
pub mod shard;
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
    // One thread per shard: its core, its WireGuard socket and its upstream tasks. Handing
    // packets and bytes between worker threads cost a wake-up each (measured with 2 workers:
    // 40,000 context switches per second uploading at 0.64 Gbit/s, 1.25 CPU-s/Gbit; one thread:
    // 0.80 CPU-s/Gbit at 0.72 Gbit/s), so a shard never hands its flows' work to another thread.
    // This runtime runs the first shard and the shared services; the others start their own.
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
        // The engine sizes its socket buffers' allocations on this.
        const THRESHOLD: libc::c_int = waygate_engine::flow::tcp::MAPPED_ALLOCATION as libc::c_int;
        // SAFETY: mallopt only sets an allocator parameter; it is called before any thread
        // of ours starts.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
}

/// The runtime of a shared service (resolver, inspector) on `workers` threads: one runs on the
/// calling thread's scheduler, as a service without shards always did; more get a pool whose
/// threads are named `name`, like the calling thread.
fn service_runtime(workers: usize, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .enable_all()
            .build()
    }
}

/// Datagrams handed to another shard and waiting there (initiations: one per handshake).
const HANDOFF_QUEUE: usize = 1024;

async fn run(config: Config, descriptors: u64) -> anyhow::Result<()> {
    let key_bytes = prepare_data_dir(&config)?;
    let cores = std::thread::available_parallelism().ok().map(usize::from);
    let count = u32::try_from(config.wireguard.shards(cores)).unwrap_or(1);
    let seed = if count > 1 { rand::random() } else { 0 };
    let shard_at = |index| Shard { index, count, seed };
    let device_shards = shard::DeviceShards::new(shard_at(0));
    let drops = Arc::new(drops::RuntimeDrops::default());
    let wall = UNIX_EPOCH + unix_now();
    let ca = crate::tls::load_ca(&config.data_dir, wall)?;
    let dns_tls = crate::tls::gateway_dns_tls(&ca, &config, wall)?;
    let settings = core_settings(&config, descriptors, count)?;
    let (dns, dns_out) = resolver::spawn(
        &config,
        host::dns_queries_for_descriptors(descriptors),
        dns_tls,
        &settings.local,
        drops.clone(),
        device_shards.clone(),
    )
    .context("dns")?;
    let host_addresses = (
        host::interface_addresses().context("cannot list the host's addresses")?,
        host::local_ipv6_prefixes(),
    );
    let steering = config.wireguard.steering;
    let sockets = shard::bind_sockets(config.wireguard.listen, count, SOCKET_BUFFER, steering)?;

    let (device_tx, device_rx) = watch::channel(Arc::new(RegistrySnapshot::default()));
    // Every shard's receiver exists before the first snapshot is sent, so none misses it.
    let devices: Vec<_> = (0..count).map(|_| device_rx.clone()).collect();
    drop(device_rx);
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<Seen>>();
    let watcher = {
        let data_dir = config.data_dir.clone();
        let tunnel = config.tunnel.clone();
        std::thread::Builder::new()
            .name("waygate-registry".into())
            .spawn(move || watch_registry(&data_dir, &tunnel, device_tx, seen_rx, device_shards))?
    };
    let uapi = start_uapi(&config, key_bytes, count as usize);
    let reloads = Arc::new(reload::ReloadCounters::default());
    let inspector = http::start(&config, wall, count as usize)?;
    let (reload_rx, rules_loaded, loaded) =
        start_reloads(&config, &dns, reloads.clone(), inspector.as_ref())?;
    let logs = start_logs(&config, &dns)?;
    if let (Some(inspector), Some(logs)) = (&inspector, &logs) {
        inspector.log_to(logs.clone());
    }
    let (probe_tx, probe_rx) = mpsc::channel(PROBE_QUEUE);
    health::spawn_probes(&config.egress.locations, probe_tx);
    let device_api = device_api::DeviceApi::new(
        config.clone(),
        Registry::open(&config.data_dir, &config.tunnel).context("the device API's registry")?,
        unix_seconds,
    );
    dns.local.set_device_api(Arc::new(Arc::new(device_api)));
    let local: Arc<dyn local::LocalHost> = dns.local.clone();
    let stats = Arc::new(shard::StatsBoard::new(count as usize));
    // Dropped at the end of this function, which removes the socket.
    let _admin = start_admin(&config, &ca, wall, stats.subscribe(), rules_loaded)?;
    if let Some(listen) = config.metrics.listen {
        let registry = metrics::registry(metrics::Sources {
            stats: stats.subscribe(),
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

    let (handoffs_out, handoffs_in): (Vec<_>, Vec<_>) =
        (0..count).map(|_| mpsc::channel(HANDOFF_QUEUE)).unzip();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (vnets_tx, vnets_rx) = watch::channel(Arc::new(HashMap::new()));
    let mut vnets_tx = Some(vnets_tx);
    let inputs = devices
        .into_iter()
        .zip(spread(probe_rx, count))
        .zip(spread(reload_rx, count))
        .zip(dns_out.answers.into_iter().zip(dns_out.learned))
        .zip(handoffs_in);
    let mut parts = Vec::new();
    for (index, ((((devices, probes), reloads), (answers, learned)), handoffs)) in
        (0..count).zip(inputs)
    {
        let (event_tx, events) = mpsc::channel(upstream::EVENT_QUEUE);
        let mut upstreams = Upstreams::new(event_tx, Some(local.clone()), drops.clone());
        upstreams.set_inspector(inspector.clone());
        parts.push(ShardParts {
            shard: shard_at(index),
            key: key_bytes,
            // Each shard's TCP stack draws its own sequence numbers.
            settings: CoreSettings {
                random_seed: rand::random(),
                ..settings.clone()
            },
            host_addresses: host_addresses.clone(),
            loaded: loaded.clone(),
            logs: logs.clone(),
            dns: dns.clone(),
            inspector: inspector.clone(),
            upstreams,
            drops: drops.clone(),
            uapi_snapshot: uapi.snapshot.clone(),
            stats: stats.clone(),
            seen_tx: seen_tx.clone(),
            handoffs_out: handoffs_out.clone(),
            egress_locations: config.egress.locations.len(),
            receives: index == 0 || steering == waygate_config::Steering::Kernel,
            vnets_out: vnets_tx.take(),
            inputs: Inputs {
                devices,
                events,
                probes,
                reloads,
                answers,
                learned,
                handoffs,
                vnet_routes: (index > 0).then(|| vnets_rx.clone()),
                stop: Stop::Shutdown(shutdown_rx.clone()),
            },
        });
    }
    drop((seen_tx, handoffs_out, vnets_rx, shutdown_rx));

    let mut sockets = sockets.into_iter();
    let mut parts = parts.into_iter();
    let (Some(lead), Some(lead_socket)) = (parts.next(), sockets.next()) else {
        anyhow::bail!("no data-plane shard to run");
    };
    let mut threads = Vec::new();
    for (part, socket) in parts.zip(sockets) {
        threads.push(spawn_shard(part, socket)?);
    }
    let (mut serving, mut inputs) = lead.start(lead_socket, Instant::now())?;
    tracing::info!(
        listen = %config.wireguard.listen,
        public_key = %waygate_keys::PublicKey::from_bytes(serving.core.public_key()),
        gateway = %settings.gateway_v4,
        local_services = settings.local.routes().len(),
        egress = ?settings.egress.default_ipv4,
        threads = count,
        "waygate serving"
    );
    inputs.stop = Stop::Signals {
        terminate: signal(tokio::signal::unix::SignalKind::terminate())?,
        interrupt: signal(tokio::signal::unix::SignalKind::interrupt())?,
    };
    let result = serving.serve(&mut inputs).await;
    tracing::info!("waygate stopping");
    let _ = shutdown_tx.send(true);
    serving.stop();
    drop(serving);
    drop(inputs);
    for thread in threads {
        let _ = thread.join();
    }
    let _ = std::fs::remove_file(&uapi.path);
    let _ = watcher.join();
    result
}

/// One receiver per shard for what `rx` carries: `rx` itself for one shard, else copies made by
/// [`shard::fan_out`].
fn spread<T: Clone + Send + 'static>(rx: mpsc::Receiver<T>, count: u32) -> Vec<mpsc::Receiver<T>> {
    if count <= 1 {
        return vec![rx];
    }
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..count).map(|_| mpsc::channel(PROBE_QUEUE)).unzip();
    shard::fan_out(rx, txs);
    rxs
}

/// Runs a shard other than the first on a thread of its own, with its own runtime; returns once
/// it serves (or why it could not start).
fn spawn_shard(
    parts: ShardParts,
    socket: std::net::UdpSocket,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let index = parts.shard.index;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("waygate-shard{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("shard {index} runtime: {err}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let (mut serving, mut inputs) = match parts.start(socket, Instant::now()) {
                    Ok(started) => started,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if let Err(err) = serving.serve(&mut inputs).await {
                    tracing::error!(shard = index, "{err:#}");
                }
                serving.stop();
            });
        })?;
    ready_rx
        .recv()
        .with_context(|| format!("shard {index} stopped while starting"))??;
    Ok(thread)
}

/// What one shard is made of, before it runs on its thread.
struct ShardParts {
    shard: Shard,
    key: [u8; 32],
    settings: CoreSettings,
    host_addresses: (Vec<waygate_engine::protect::HostAddress>, Vec<ipnet::IpNet>),
    loaded: Loaded,
    logs: Option<waygate_observe::LogSender>,
    dns: resolver::ResolverHandle,
    inspector: Option<waygate_http::Inspector>,
    upstreams: Upstreams,
    drops: Arc<drops::RuntimeDrops>,
    uapi_snapshot: Arc<SharedSnapshot>,
    stats: Arc<shard::StatsBoard>,
    seen_tx: std::sync::mpsc::Sender<Vec<Seen>>,
    handoffs_out: Vec<mpsc::Sender<Handoff>>,
    egress_locations: usize,
    /// Whether the shard reads its socket (with `steering = "reader"` only the first does).
    receives: bool,
    /// The first shard's: where it publishes virtual-network routes for the others.
    vnets_out: Option<watch::Sender<Arc<VnetRouteMap>>>,
    inputs: Inputs,
}

impl ShardParts {
    /// The shard's core and loop; inside the runtime that will run it.
    fn start(self, socket: std::net::UdpSocket, now: Instant) -> anyhow::Result<(Serving, Inputs)> {
        let socket = BatchSocket::from_std(socket).context("the WireGuard socket")?;
        let mut core = GatewayCore::new(self.key, self.settings, now).with_shard(self.shard);
        core.set_host_addresses(&self.host_addresses.0, &self.host_addresses.1);
        if let Some(policy) = self.loaded.policy {
            core.set_policy(policy);
        }
        core.set_geoip(self.loaded.geoip);
        core.record_activity(self.logs.is_some());
        let leads = self.vnets_out.is_some();
        let serving = Serving {
            core,
            socket,
            upstreams: self.upstreams,
            dns: self.dns,
            drops: self.drops,
            host_addresses: self.host_addresses,
            flows_peak: 0,
            vnets: Vec::new(),
            vnets_unresolved: false,
            next_hops: leads.then(NextHops::default),
            vnets_out: self.vnets_out,
            uapi_snapshot: self.uapi_snapshot,
            next_housekeeping: now,
            drop_report: drops::DropReport::new(now),
            seen_tx: self.seen_tx,
            next_seen: now + LAST_SEEN_EVERY,
            reported: HashMap::new(),
            stats: self.stats,
            inspector: self.inspector,
            egress_locations: self.egress_locations,
            receives: self.receives,
            logs: self.logs,
            handoffs_out: self.handoffs_out,
            deadline: deadline::DeadlineTimer::new().context("the shard's timer")?,
        };
        Ok((serving, self.inputs))
    }
}

/// Each virtual network's routes, resolved (vnet id -> routes).
type VnetRouteMap = HashMap<String, Vec<VnetRoute>>;

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

/// Serves the WireGuard UAPI socket from a snapshot the `shards` loops refresh when asked.
fn start_uapi(config: &Config, key_bytes: [u8; 32], shards: usize) -> Uapi {
    let snapshot = Arc::new(SharedSnapshot::new(
        UapiSnapshot {
            private_key: key_bytes,
            listen_port: config.wireguard.listen.port(),
            peers: Vec::new(),
        },
        shards,
    ));
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

/// Starts the activity log writer when `logs.dir` is set, and has the resolver report to it;
/// each shard's core reports through a sender of its own. The writer thread is left to end with
/// the process: it writes what is buffered at least every `write::BUSY_WAIT`, so at most the
/// lines of that last moment are not on disk at exit.
fn start_logs(
    config: &Config,
    dns: &resolver::ResolverHandle,
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
    tracing::info!(dir = %dir.display(), max_size = config.logs.max_size, keep = config.logs.keep, "activity logs on");
    Ok(Some(sender))
}

/// The rules and GeoIP database loaded at the start, for every shard's core.
#[derive(Clone)]
struct Loaded {
    policy: Option<Arc<waygate_stages::policy::Loaded>>,
    geoip: Option<Arc<waygate_geoip::GeoIp>>,
}

/// Loads the followed files (rules, categories, GeoIP) into the resolver and the inspector, and
/// starts the thread that reports their changes; returns its channel, the count of rules
/// running and what the cores start with.
fn start_reloads(
    config: &Config,
    dns: &resolver::ResolverHandle,
    counters: Arc<reload::ReloadCounters>,
    inspector: Option<&waygate_http::Inspector>,
) -> anyhow::Result<(
    mpsc::Receiver<reload::Reloaded>,
    Arc<std::sync::atomic::AtomicUsize>,
    Loaded,
)> {
    let (followed, policy, geoip, categories) = reload::Followed::load(config)?;
    let rules_loaded = followed.rules_loaded();
    let categories = categories.map(Arc::new);
    dns.set_categories(categories.clone());
    let policy = policy.map(Arc::new);
    if let Some(policy) = &policy {
        if let Some(inspector) = inspector {
            inspector.set_policy(policy.clone());
        }
        dns.set_policy(policy.clone());
    }
    let geoip = geoip.map(Arc::new);
    if let Some(inspector) = inspector {
        inspector.set_geoip(geoip.clone());
        inspector.set_categories(categories);
    }
    dns.set_geoip(geoip.clone());
    let (reload_tx, reload_rx) = mpsc::channel(2);
    std::thread::Builder::new()
        .name("waygate-reload".into())
        .spawn(move || followed.run(reload_tx, &counters))?;
    Ok((reload_rx, rules_loaded, Loaded { policy, geoip }))
}

/// Everything the loop waits on.
struct Inputs {
    devices: watch::Receiver<Arc<RegistrySnapshot>>,
    events: mpsc::Receiver<waygate_engine::flow::UpstreamEvent>,
    probes: mpsc::Receiver<(usize, waygate_stages::egress::Probe)>,
    reloads: mpsc::Receiver<reload::Reloaded>,
    answers: mpsc::Receiver<resolver::Answer>,
    learned: mpsc::Receiver<resolver::Learned>,
    /// Datagrams other shards received for this shard's peers.
    handoffs: mpsc::Receiver<Handoff>,
    /// Virtual-network routes as the first shard resolved them (the others' only).
    vnet_routes: Option<watch::Receiver<Arc<VnetRouteMap>>>,
    stop: Stop,
}

/// What ends a loop.
enum Stop {
    /// SIGTERM or SIGINT (the first shard, on the main thread).
    Signals {
        terminate: tokio::signal::unix::Signal,
        interrupt: tokio::signal::unix::Signal,
    },
    /// The first shard's word (the others).
    Shutdown(watch::Receiver<bool>),
}

impl Stop {
    async fn wait(&mut self) {
        match self {
            Stop::Signals {
                terminate,
                interrupt,
            } => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            Stop::Shutdown(rx) => {
                // Changed, or the sender is gone: either way, stop.
                let _ = rx.changed().await;
            }
        }
    }
}

/// The next routes the first shard published; never, for the first shard itself.
async fn next_vnet_routes(rx: &mut Option<watch::Receiver<Arc<VnetRouteMap>>>) -> VnetRouteMap {
    if let Some(rx) = rx {
        if rx.changed().await.is_ok() {
            return (**rx.borrow_and_update()).clone();
        }
    }
    std::future::pending().await
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
    /// The first shard's, which resolves the virtual networks' routes for all: removes the
    /// kernel routes it installed when the loop ends, also on error.
    next_hops: Option<NextHops>,
    /// The first shard's: where the other shards get the resolved routes.
    vnets_out: Option<watch::Sender<Arc<VnetRouteMap>>>,
    /// This shard's peers for `wg show` go to their slot here when a client asks.
    uapi_snapshot: Arc<SharedSnapshot>,
    next_housekeeping: Instant,
    drop_report: drops::DropReport,
    seen_tx: std::sync::mpsc::Sender<Vec<Seen>>,
    next_seen: Instant,
    /// Where each device was last reported to the registry.
    reported: HashMap<String, SocketAddr>,
    stats: Arc<shard::StatsBoard>,
    /// The HTTP stage's inspector, which follows rule, category and GeoIP reloads.
    inspector: Option<waygate_http::Inspector>,
    /// Configured egress locations, for the snapshot's health.
    egress_locations: usize,
    /// Whether this shard reads the WireGuard socket (see [`ShardParts`]).
    receives: bool,
    /// Where the core's activity records go, while `logs.dir` is set.
    logs: Option<waygate_observe::LogSender>,
    /// Every shard's queue of handed-over datagrams, by shard.
    handoffs_out: Vec<mpsc::Sender<Handoff>>,
    /// Wakes the core at its deadline to the microsecond (paced flows need better than
    /// tokio's millisecond wheel).
    deadline: deadline::DeadlineTimer,
}

impl Serving {
    /// Runs until a signal, or until the registry watcher stops (an error).
    async fn serve(&mut self, inputs: &mut Inputs) -> anyhow::Result<()> {
        loop {
            let deadline = self.core.poll_timeout();
            tokio::select! {
                biased;
                _ = inputs.stop.wait() => return Ok(()),
                changed = inputs.devices.changed() => match changed {
                    Ok(()) => {
                        let snapshot = inputs.devices.borrow_and_update().clone();
                        self.sync_registry(&snapshot);
                    }
                    Err(_) => anyhow::bail!("the registry watcher stopped"),
                },
                ready = self.socket.readable(), if self.receives => {
                    ready?;
                    receive(&mut self.socket, &mut self.core);
                }
                Some(event) = inputs.events.recv() => {
                    let now = Instant::now();
                    self.core.handle_upstream(event, now);
                    drain(&mut inputs.events, |e| self.core.handle_upstream(e, now));
                }
                Some(handoff) = inputs.handoffs.recv() => {
                    let now = Instant::now();
                    self.core.handle_handoff(&handoff, now);
                    drain(&mut inputs.handoffs, |h| self.core.handle_handoff(&h, now));
                }
                routes = next_vnet_routes(&mut inputs.vnet_routes) => self.core.sync_vnets(routes),
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
                _ = self.deadline.sleep_until(deadline) => {}
            }
            self.finish_turn().await;
        }
    }

    /// A new device list and virtual networks from the registry: this shard's devices become
    /// its peers; the first shard resolves the networks' routes for all.
    fn sync_registry(&mut self, snapshot: &RegistrySnapshot) {
        let devices = snapshot
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let resume = resumable(&devices, unix_now().as_secs() as i64);
        let shard = self.core.shard();
        let mine = devices
            .iter()
            .filter(|d| shard.owns_key(d.public_key.as_bytes()));
        self.core.sync_peers(peers_of(mine), Instant::now());
        drop(devices);
        // Devices already heard from since the start, and other shards' devices, are skipped.
        for (key, at) in resume {
            self.core.resume_peer(&key, at);
        }
        if let Some(next_hops) = &mut self.next_hops {
            let (routes, unresolved) = resolve_vnet_routes(&snapshot.vnets, next_hops);
            self.vnets = snapshot.vnets.clone();
            self.vnets_unresolved = unresolved;
            self.publish_vnet_routes(routes);
        }
        // The device list was read into a copy per device and compared: at 100,000 devices
        // tens of MB freed in the middle of the heap, kept mapped by glibc without this. The
        // trim walks the whole process's heap, so the last shard to finish does it for all:
        // the first one alone left the others' garbage mapped (100,000 idle devices: 139 MB
        // with two shards against 83 MB with one). A shard that skipped a snapshot (the watch
        // keeps only the newest) leaves that one untrimmed; the next is counted afresh.
        let synced = snapshot
            .synced
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        if synced == shard.count {
            drop(std::mem::take(
                &mut *snapshot
                    .devices
                    .write()
                    .unwrap_or_else(PoisonError::into_inner),
            ));
            host::return_freed_memory();
        }
    }

    /// The first shard's newly resolved routes, for its core and the other shards'.
    fn publish_vnet_routes(&mut self, routes: VnetRouteMap) {
        if let Some(out) = &self.vnets_out {
            out.send_replace(Arc::new(routes.clone()));
        }
        self.core.sync_vnets(routes);
    }

    /// Stops: where every device of this shard is now, for the next start to reach them; sent
    /// before the registry channel closes, which tells the watcher to write what it has and end.
    fn stop(&mut self) {
        let _ = self.seen_tx.send(recently_seen(&self.core));
    }

    /// Whether this is the first shard, which also keeps the shared services' state.
    fn leads(&self) -> bool {
        self.next_hops.is_some()
    }

    /// A followed file changed: every shard's core takes it; the first also hands it to the
    /// resolver and the inspector.
    fn reload(&mut self, reloaded: reload::Reloaded) {
        if !self.leads() {
            match reloaded {
                reload::Reloaded::Policy(policy) => self.core.set_policy(policy),
                reload::Reloaded::GeoIp(db) => self.core.set_geoip(Some(db)),
                reload::Reloaded::Categories(_) => {}
            }
            return;
        }
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
        while let Some(handoff) = self.core.poll_handoff() {
            let to = self.handoffs_out.get(handoff.shard as usize);
            if to.is_none_or(|to| to.try_send(handoff).is_err()) {
                self.drops.add(drops::RuntimeDrop::HandoffQueueFull);
            }
        }
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

    /// Once a second: the host's addresses, memory (idle flows' buffers included), late
    /// interfaces, `wg show`, drops, last-seen times and the stats snapshot.
    fn housekeeping(&mut self, now: Instant) {
        self.follow_host_addresses();
        let (tcp, udp) = self.core.open_flows();
        let flows = tcp + udp;
        self.flows_peak = self.flows_peak.max(flows);
        self.core.release_idle_buffers(&mut host::release_pages);
        if flows + FLOWS_BEFORE_TRIM <= self.flows_peak {
            host::return_freed_memory();
            self.flows_peak = flows;
        }
        if let (true, Some(next_hops)) = (self.vnets_unresolved, &mut self.next_hops) {
            // An interface named by a route may come up after the gateway.
            let (routes, unresolved) = resolve_vnet_routes(&self.vnets, next_hops);
            self.vnets_unresolved = unresolved;
            self.publish_vnet_routes(routes);
        }
        let index = self.core.shard().index as usize;
        if self.uapi_snapshot.take_wanted(index) {
            self.uapi_snapshot.set_peers(index, uapi_peers(&self.core));
        }
        let wg_drops = self.core.wireguard().drops();
        // The runtime's queues are shared: the first shard reports their drops.
        let no_drops = drops::RuntimeDrops::default();
        let runtime_drops = if self.leads() {
            &*self.drops
        } else {
            &no_drops
        };
        if let Some(dropped) =
            self.drop_report
                .poll(now, wg_drops, self.core.flow_drops(), runtime_drops)
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
        self.stats.publish(index, snapshot);
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

/// What each of `shards` cores needs, derived from the config.
fn core_settings(config: &Config, descriptors: u64, shards: u32) -> anyhow::Result<CoreSettings> {
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
            // The descriptors are the process's: each shard gets its share.
            total: (host::flows_for_descriptors(descriptors) / shards.max(1) as usize).max(1),
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

/// What the registry watcher hands to the serving loops on every change.
#[derive(Default)]
struct RegistrySnapshot {
    /// Emptied by the last shard to sync: each shard keeps what it needs of its devices, and the
    /// list itself (100,000 devices: about 50 MB) would otherwise stay in the channel for good.
    devices: std::sync::RwLock<Vec<Device>>,
    vnets: Vec<Vnet>,
    /// Shards done with this snapshot: the last one hands freed memory back for all.
    synced: std::sync::atomic::AtomicU32,
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
fn peers_of<'a>(devices: impl Iterator<Item = &'a Device>) -> Vec<([u8; 32], DeviceInfo)> {
    let mut extras: HashMap<waygate_model::IdentityExtras, Arc<waygate_model::IdentityExtras>> =
        HashMap::new();
    devices
        .filter(|d| d.is_active())
        .map(|d| {
            let shared = match extras.get(&d.extras) {
                Some(shared) => shared.clone(),
                None => {
                    let shared = Arc::new(d.extras.clone());
                    extras.insert(d.extras.clone(), shared.clone());
                    shared
                }
            };
            (
                *d.public_key.as_bytes(),
                DeviceInfo {
                    id: d.id.clone(),
                    name: d.name.clone(),
                    email: d.email.clone(),
                    user_name: d.user_name.clone(),
                    groups: d.groups.clone(),
                    extras: shared,
                    vnet_id: d.vnet_id.clone(),
                    ipv4: d.ipv4,
                    ipv6: d.ipv6,
                    log_fields: Default::default(),
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
    devices: watch::Sender<Arc<RegistrySnapshot>>,
    seen: std::sync::mpsc::Receiver<Vec<Seen>>,
    shards: shard::DeviceShards,
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
                        shards.update(
                            list.iter()
                                .map(|d| (d.id.as_str(), d.public_key.as_bytes())),
                        );
                        let snapshot = RegistrySnapshot {
                            devices: std::sync::RwLock::new(list),
                            vnets,
                            synced: Default::default(),
                        };
                        if devices.send(Arc::new(snapshot)).is_err() {
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
