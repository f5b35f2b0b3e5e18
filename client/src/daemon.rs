//! The tunnel daemon (`waygate-client daemon`, started in the background by `up`).
//!
//! It creates the TUN device (tun-rs, with the kernel's segmentation offload when available),
//! routes and DNS ([`crate::netconf`]), and runs one loop on one thread: IP packets from the TUN
//! are encrypted by the WireGuard [`Initiator`] and sent in GSO runs on a batched UDP socket
//! that carries [`netconf::FWMARK`]; datagrams from the gateway are decrypted and written to
//! the TUN coalesced (GRO). A local control socket (`DIR/control.sock`, 0600) answers `status`
//! and `stop`. SIGTERM/SIGINT or `stop` undo everything `up` changed.
//!
//! Roaming: every second the daemon asks the kernel which source address it would use for the
//! gateway (a marked, connected UDP socket); when that changes (a new network, a new address)
//! it starts a handshake at once instead of waiting for the keepalive. A gateway that lost the
//! session (a restart) is found by boringtun's retry after 15 s of unanswered data, or sooner
//! by the gateway's own handshake to the device's last address.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
use waygate_udp::BatchSocket;
use waygate_wg::initiator::{FromGateway, Initiator};
use waygate_wg::transmit::TransmitQueue;

use crate::netconf::{self, Plan, Routing, Undo};
use crate::state::{self, ClientConfig};

/// The control socket's name inside `--dir`.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The daemon's pid file inside `--dir`.
pub const PID_FILE: &str = "daemon.pid";
/// The daemon's log (stderr) when `up` started it, inside `--dir`.
pub const LOG_FILE: &str = "daemon.log";
/// The TUN interface's name unless `--interface` says otherwise.
pub const DEFAULT_INTERFACE: &str = "waygate0";
/// Keepalive interval: keeps NAT mappings and the gateway's idea of the endpoint fresh (the
/// WireGuard apps' usual 25 s).
const KEEPALIVE_SECS: u16 = 25;
/// A session older than this is over (WireGuard's REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// How often the route to the gateway is checked for a new source address.
const ROUTE_CHECK: Duration = Duration::from_secs(1);
/// Until the first handshake completes, a new initiation this often instead of WireGuard's 5 s:
/// a gateway takes up to a second to accept a device enrolled just before (measured: `up` right
/// after `enroll` took 5.1 s instead of 0.3-0.8 s).
const FIRST_HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// UDP socket buffers: the architecture notes measured receive-buffer overflow as the main
/// loss in userspace tunnels at 212 KiB.
const SOCKET_BUFFER: usize = 8 << 20;
/// Packets taken from the TUN before the datagrams they made are sent.
const TUN_BATCH: usize = 256;
/// Room for one offloaded TUN read (virtio header and a 64 KiB packet).
const TUN_READ_BUFFER: usize = VIRTIO_NET_HDR_LEN + 65_535;
/// Bytes of datagrams in one UDP GSO send: the kernel refuses a run whose total does not fit
/// one UDP length field (64 runs of 1,452 bytes failed with EMSGSIZE: 9 Mbit/s uploads).
const GSO_BYTES: usize = 65_000;

/// What `status` reports; kept by the daemon, read by the control socket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// A session younger than [`SESSION_LIFETIME`] exists.
    pub connected: bool,
    /// Seconds since the last handshake.
    pub handshake_age_secs: Option<u64>,
    /// The gateway's endpoint.
    pub endpoint: String,
    /// Payload bytes received through the tunnel.
    pub rx_bytes: u64,
    /// Payload bytes sent through the tunnel.
    pub tx_bytes: u64,
    /// The tunnel addresses.
    pub addresses: Vec<String>,
    /// The TUN interface.
    pub interface: String,
    /// The virtual network in use (`None`: the default one).
    pub vnet: Option<String>,
    /// Posture results the gateway reported: check id -> passed.
    pub posture: BTreeMap<String, bool>,
    /// The device's name at the gateway.
    pub name: String,
    /// The device's id at the gateway.
    pub device_id: String,
    /// The daemon's pid.
    pub pid: u32,
    /// Handshakes completed since the daemon started.
    pub handshakes: u64,
    /// Datagrams from the gateway that were dropped.
    pub dropped: u64,
}

/// The daemon's shared state: the data path writes the tunnel's numbers, the device-API agent
/// writes vnet and posture, the control socket reads all of it.
#[derive(Debug, Default)]
pub struct DaemonState {
    status: Mutex<Status>,
    stop: Notify,
}

impl DaemonState {
    /// Stores what the device-API agent learned from the gateway: the virtual network in use
    /// and the posture results (check id -> passed). `status` reports them from then on.
    pub fn apply_agent_report(&self, vnet: Option<String>, posture: BTreeMap<String, bool>) {
        let mut s = self.lock();
        s.vnet = vnet;
        s.posture = posture;
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    /// Asks the daemon to stop (and undo its changes).
    pub fn request_stop(&self) {
        self.stop.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        // A panic elsewhere while holding it leaves plain numbers behind; keep serving them.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `DIR/control.sock`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Options of `daemon` (and `up`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The client's directory.
    pub dir: PathBuf,
    /// The TUN interface's name.
    pub interface: String,
    /// Use the TUN's segmentation offload when the kernel offers it.
    pub offload: bool,
}

/// Runs the daemon until it is told to stop; undoes its changes before returning.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let config = state::read_config(&opts.dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is not enrolled; run `waygate-client enroll` first",
            opts.dir.display()
        )
    })?;
    let key_path = state::key_path(&opts.dir);
    let private = waygate_keys::read_private_key(&key_path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", key_path.display()))?;
    let gateway: waygate_keys::PublicKey = config
        .gateway_public_key
        .parse()
        .map_err(|e| anyhow::anyhow!("gateway_public_key in client.toml: {e}"))?;
    let endpoint = resolve(&config.endpoint)?;
    let addresses = config
        .addresses
        .iter()
        .map(|a| {
            a.parse::<ipnet::IpNet>()
                .map_err(|e| anyhow::anyhow!("address {a:?} in client.toml: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    if let Some(status) = ask(&opts.dir, "status") {
        anyhow::bail!(
            "a daemon already runs for {} (pid {}); `waygate-client down` stops it",
            opts.dir.display(),
            status["pid"]
        );
    }
    // A daemon that died without cleaning up left its undo list: play it first.
    if let Some(mut old) = Undo::load(&opts.dir)? {
        tracing::warn!("undoing the changes of a daemon that did not stop cleanly");
        for e in old.revert() {
            tracing::warn!(error = %e, "undo step failed");
        }
        Undo::forget(&opts.dir);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let shared = Arc::new(DaemonState::default());
    {
        let mut s = shared.lock();
        s.endpoint = endpoint.to_string();
        s.addresses = config.addresses.clone();
        s.interface = opts.interface.clone();
        s.name = config.name.clone();
        s.device_id = config.device_id.clone();
        s.pid = std::process::id();
    }
    // Until the agent reports, the virtual network is the one enrollment gave, and no posture
    // results are known.
    shared.apply_agent_report(config.vnet.clone(), BTreeMap::new());
    let mut undo = Undo::default();
    let stop_agent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = runtime.block_on(async {
        let tun = DeviceBuilder::new()
            .name(&opts.interface)
            .mtu(config.mtu)
            .offload(opts.offload)
            .build_async()
            .map_err(|e| anyhow::anyhow!("cannot create TUN device {}: {e}", opts.interface))?;
        let bind: SocketAddr = if endpoint.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let udp = BatchSocket::bind(bind, SOCKET_BUFFER)
            .map_err(|e| anyhow::anyhow!("cannot bind the tunnel's UDP socket: {e}"))?;
        udp.set_mark(netconf::FWMARK)
            .map_err(|e| anyhow::anyhow!("cannot set SO_MARK on the UDP socket: {e}"))?;
        let plan = Plan {
            interface: opts.interface.clone(),
            addresses: addresses.clone(),
            mtu: config.mtu,
            routing: routing_of(&config)?,
            dns: config.dns.clone(),
            ipv6: netconf::host_has_ipv6(),
        };
        let applied = netconf::apply(&plan, &mut undo, &opts.dir);
        if let Err(e) = applied {
            return Err(e.context("configuring routes and DNS"));
        }
        let listener = bind_control(&opts.dir)?;
        write_pid(&opts.dir)?;
        tokio::spawn(serve_control(listener, shared.clone()));
        // The device-API agent (profile, posture reports) runs on a thread of its own beside
        // the data path (its HTTP client blocks); its requests to the gateway's tunnel address
        // carry no mark, so they go through this tunnel.
        let agent_state = shared.clone();
        let agent_dir = opts.dir.clone();
        let agent_stop = stop_agent.clone();
        std::thread::Builder::new()
            .name("waygate-agent".into())
            .spawn(move || {
                let publish = |r: crate::agent::Report| {
                    agent_state.apply_agent_report(r.vnet, r.posture);
                };
                if let Err(e) = crate::agent::run(&agent_dir, &agent_stop, publish) {
                    tracing::warn!(error = %format!("{e:#}"), "device API agent not started");
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot start the device API agent: {e}"))?;
        tracing::info!(
            interface = %opts.interface,
            endpoint = %endpoint,
            tcp_offload = tun.tcp_gso(),
            udp_offload = tun.udp_gso(),
            mark = netconf::FWMARK,
            table = netconf::TABLE,
            "tunnel up; waiting for the handshake"
        );
        let initiator = Initiator::new(
            *private.to_bytes(),
            *gateway.as_bytes(),
            endpoint,
            Some(KEEPALIVE_SECS),
            rand::RngCore::next_u32(&mut rand::rngs::OsRng),
        );
        let mut path = DataPath::new(tun, udp, initiator, config.mtu);
        path.run(&shared).await
    });
    stop_agent.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = std::fs::remove_file(socket_path(&opts.dir));
    let errors = undo.revert();
    for e in &errors {
        tracing::warn!(error = %e, "undo step failed");
    }
    Undo::forget(&opts.dir);
    tracing::info!("tunnel down; routes, rules and DNS restored");
    // Last: `down` waits for the pid file to go.
    let _ = std::fs::remove_file(opts.dir.join(PID_FILE));
    result
}

/// What goes through the tunnel: `include` or `exclude` of client.toml (the device profile's
/// split-tunnel entries once the agent writes them), else everything. In include mode the DNS
/// servers are routed too, or the resolver the tunnel sets would be unreachable.
fn routing_of(config: &ClientConfig) -> anyhow::Result<Routing> {
    match (config.include.is_empty(), config.exclude.is_empty()) {
        (true, true) => Ok(Routing::Full),
        (false, true) => {
            let mut nets = config.include.clone();
            nets.extend(config.dns.iter().map(|&ip| ipnet::IpNet::from(ip)));
            Ok(Routing::Include(nets))
        }
        (true, false) => Ok(Routing::Exclude(config.exclude.clone())),
        (false, false) => anyhow::bail!("client.toml has both include and exclude; keep one"),
    }
}

fn resolve(endpoint: &str) -> anyhow::Result<SocketAddr> {
    endpoint
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve the gateway endpoint {endpoint:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("the gateway endpoint {endpoint:?} has no address"))
}

fn write_pid(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(PID_FILE);
    std::fs::write(&path, format!("{}\n", std::process::id()))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

fn bind_control(dir: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = socket_path(dir);
    // A socket file left by a daemon that died: nobody answers on it (checked by `up`).
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| anyhow::anyhow!("cannot chmod 0600 {}: {e}", path.display()))?;
    Ok(listener)
}

/// One request per connection: a line `status` or `stop`, answered with one JSON line.
async fn serve_control(listener: UnixListener, shared: Arc<DaemonState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(256));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match line.trim() {
                "status" => serde_json::to_string(&shared.status()).unwrap_or_default(),
                "stop" => {
                    shared.request_stop();
                    r#"{"stopping": true}"#.to_string()
                }
                other => {
                    serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string()
                }
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

use tokio::io::AsyncReadExt as _;

/// The packet loop's buffers and endpoints.
struct DataPath {
    tun: AsyncDevice,
    udp: BatchSocket,
    wg: Initiator,
    tx: TransmitQueue,
    /// One offloaded TUN read, before it is split.
    tun_read: Vec<u8>,
    /// The split packets and their sizes.
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Decrypted packets for the TUN, each after [`VIRTIO_NET_HDR_LEN`] bytes of headroom.
    to_tun: Vec<Vec<u8>>,
    gro: GROTable,
    /// Datagrams in one GSO send, so a run of full-sized ones stays under [`GSO_BYTES`].
    gso_segments: usize,
    /// The source address the kernel picked towards the gateway at the last check.
    last_source: Option<IpAddr>,
    send_errors: u64,
}

impl DataPath {
    fn new(tun: AsyncDevice, udp: BatchSocket, wg: Initiator, mtu: u16) -> DataPath {
        let packet_buffer = usize::from(mtu).max(1500) + VIRTIO_NET_HDR_LEN;
        let largest = usize::from(mtu) + waygate_wg::OVERHEAD;
        let gso_segments = udp.max_gso_segments().min(GSO_BYTES / largest).max(1);
        DataPath {
            gso_segments,
            tun,
            udp,
            wg,
            tx: TransmitQueue::new(),
            tun_read: vec![0; TUN_READ_BUFFER],
            packets: vec![vec![0; packet_buffer]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            to_tun: Vec::new(),
            gro: GROTable::default(),
            last_source: None,
            send_errors: 0,
        }
    }

    async fn run(&mut self, shared: &DaemonState) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(waygate_wg::TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        #[allow(clippy::disallowed_methods)] // the daemon is an I/O shell
        let mut next_route_check = Instant::now();
        let mut next_first_retry = next_route_check + FIRST_HANDSHAKE_RETRY;
        // The first handshake, without waiting for a packet.
        self.wg.force_handshake(&mut self.tx);
        self.flush().await;
        loop {
            tokio::select! {
                got = self.tun.recv_multiple(&mut self.tun_read, &mut self.packets, &mut self.sizes, 0) => {
                    match got {
                        Ok(n) => self.on_tun(n).await,
                        // The device is gone (deleted under us): nothing more can pass.
                        Err(e) if e.raw_os_error().is_some_and(|c| {
                            c == libc::ENODEV || c == libc::EBADFD || c == libc::EIO
                        }) => {
                            return Err(anyhow::anyhow!("TUN device: {e}"));
                        }
                        // A malformed offloaded read: that packet is lost, the next one counts.
                        Err(e) => tracing::debug!(error = %e, "TUN read"),
                    }
                    self.publish(shared);
                }
                ready = self.udp.readable() => {
                    ready.map_err(|e| anyhow::anyhow!("UDP socket: {e}"))?;
                    self.on_udp().await;
                    self.publish(shared);
                }
                _ = tick.tick() => {
                    self.wg.update_timers(&mut self.tx);
                    #[allow(clippy::disallowed_methods)] // the daemon is an I/O shell
                    let now = Instant::now();
                    if now >= next_route_check {
                        next_route_check = now + ROUTE_CHECK;
                        self.check_route();
                    }
                    if now >= next_first_retry && self.wg.traffic().handshakes == 0 {
                        next_first_retry = now + FIRST_HANDSHAKE_RETRY;
                        self.wg.force_handshake(&mut self.tx);
                    }
                    self.flush().await;
                    self.publish(shared);
                }
                _ = shared.stop.notified() => {
                    tracing::info!("stop requested");
                    return Ok(());
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM");
                    return Ok(());
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT");
                    return Ok(());
                }
            }
        }
    }

    /// `n` packets are in `packets`; encrypts them and whatever else the TUN holds, up to
    /// [`TUN_BATCH`], then sends.
    async fn on_tun(&mut self, mut n: usize) {
        let mut taken = 0;
        loop {
            for i in 0..n {
                let len = self.sizes[i];
                self.wg.encapsulate(&self.packets[i][..len], &mut self.tx);
            }
            taken += n;
            if taken >= TUN_BATCH {
                break;
            }
            match self.tun.try_recv_multiple(
                &mut self.tun_read,
                &mut self.packets,
                &mut self.sizes,
                0,
            ) {
                Ok(more) => n = more,
                Err(_) => break,
            }
        }
        self.flush().await;
    }

    /// Decrypts what the UDP socket holds (several batches) and writes it to the TUN.
    async fn on_udp(&mut self) {
        let mut count = 0;
        for _ in 0..8 {
            let (wg, tx, to_tun) = (&mut self.wg, &mut self.tx, &mut self.to_tun);
            let got = self.udp.receive_batch(|from, datagram| {
                if to_tun.len() <= count {
                    to_tun.push(Vec::with_capacity(VIRTIO_NET_HDR_LEN + 2048));
                }
                let buf = &mut to_tun[count];
                buf.resize(VIRTIO_NET_HDR_LEN + datagram.len(), 0);
                if let FromGateway::Packet(len) =
                    wg.handle_datagram(from, datagram, &mut buf[VIRTIO_NET_HDR_LEN..], tx)
                {
                    buf.truncate(VIRTIO_NET_HDR_LEN + len);
                    count += 1;
                }
            });
            match got {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive");
                    break;
                }
            }
        }
        if count > 0 {
            if let Err(e) = self
                .tun
                .send_multiple(&mut self.gro, &mut self.to_tun[..count], VIRTIO_NET_HDR_LEN)
                .await
            {
                tracing::debug!(error = %e, "TUN write");
            }
        }
        self.flush().await;
    }

    /// Sends the queued datagrams in GSO runs. A failed send (no route while the network
    /// changes) drops them: WireGuard's timers retry what matters.
    async fn flush(&mut self) {
        if self.tx.is_empty() {
            return;
        }
        for run in self.tx.gso_runs(self.gso_segments) {
            if let Err(e) = self
                .udp
                .send_run(run.dst, run.contents, run.segment_size)
                .await
            {
                self.send_errors += 1;
                if self.send_errors.is_power_of_two() {
                    tracing::warn!(error = %e, to = %run.dst, count = self.send_errors, "cannot send to the gateway");
                }
            }
        }
        self.tx.clear();
    }

    /// Starts a handshake when the source address towards the gateway changed.
    fn check_route(&mut self) {
        let endpoint = self.wg.endpoint();
        // A fresh socket each time: a connected UDP socket keeps the source it got first.
        let bind = if endpoint.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let Ok(probe) = std::net::UdpSocket::bind(bind) else {
            return;
        };
        // Marked like the tunnel's socket, so the lookup is the one its datagrams get.
        if socket2::SockRef::from(&probe)
            .set_mark(netconf::FWMARK)
            .is_err()
        {
            return;
        }
        // connect() on UDP sends nothing; it makes the kernel pick a route and a source.
        let source = probe
            .connect(endpoint)
            .and_then(|()| probe.local_addr())
            .ok()
            .map(|a| a.ip());
        if source != self.last_source {
            if self.last_source.is_some() && source.is_some() {
                tracing::info!(
                    from = ?self.last_source,
                    to = ?source,
                    "the route to the gateway changed; handshaking again"
                );
                self.wg.force_handshake(&mut self.tx);
            }
            self.last_source = source;
        }
    }

    fn publish(&self, shared: &DaemonState) {
        let stats = self.wg.stats();
        let traffic = self.wg.traffic();
        let mut s = shared.lock();
        s.connected = stats.since_handshake.is_some_and(|d| d < SESSION_LIFETIME);
        s.handshake_age_secs = stats.since_handshake.map(|d| d.as_secs());
        s.rx_bytes = traffic.rx_bytes;
        s.tx_bytes = traffic.tx_bytes;
        s.handshakes = traffic.handshakes;
        s.dropped = self.wg.drops().total();
    }
}

/// Asks the daemon behind `DIR/control.sock`; `None` when none answers.
pub fn ask(dir: &Path, request: &str) -> Option<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket_path(dir)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("{request}\n").as_bytes()).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_report_is_what_status_shows() {
        let state = DaemonState::default();
        state.apply_agent_report(Some("lab".into()), BTreeMap::from([("c1".into(), true)]));
        let status = serde_json::to_value(state.status()).unwrap();
        assert_eq!(status["vnet"], "lab");
        assert_eq!(status["posture"]["c1"], true);
        assert_eq!(status["connected"], false);
    }

    #[test]
    fn include_routes_the_dns_servers_and_both_lists_are_refused() {
        let mut config: ClientConfig = toml::from_str(
            r#"
            server = "https://198.51.100.1:8444"
            ca_sha256 = "00"
            device_id = "id"
            name = "ada"
            addresses = ["100.96.0.2/32"]
            gateway_public_key = "k"
            endpoint = "198.51.100.1:51820"
            dns = ["100.96.0.1"]
            mtu = 1420
            "#,
        )
        .unwrap();
        assert_eq!(routing_of(&config).unwrap(), Routing::Full);
        config.include = vec!["198.18.0.0/15".parse().unwrap()];
        assert_eq!(
            routing_of(&config).unwrap(),
            Routing::Include(vec![
                "198.18.0.0/15".parse().unwrap(),
                "100.96.0.1/32".parse().unwrap()
            ])
        );
        config.exclude = vec!["192.168.0.0/16".parse().unwrap()];
        assert!(routing_of(&config).is_err());
    }
}
