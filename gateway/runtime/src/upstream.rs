//! Upstream connections: one small task per flow, carrying bytes between a kernel socket (or, for
//! the gateway's own services, an in-memory pipe) and the core's event channel. The core decides;
//! these tasks only move bytes and report.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};

use super::drops::{RuntimeDrop, RuntimeDrops};
use super::local::LocalHost;
use waygate_engine::flow::{Command, FlowId, LocalEndpoint, Upstream, UpstreamEvent, Via};

/// How long a TCP connect may take before the device gets a RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest read from an upstream socket; every flow's download window is at least this.
const READ_CHUNK: usize = waygate_engine::flow::tcp::UPSTREAM_READ;
/// The smallest read from an upstream socket, and the buffer an idle flow waits on. Reading
/// READ_CHUNK at once, each of `scripts/bench-http.sh`'s 1,000 idle inspected connections held a
/// 64 KiB buffer here.
const FIRST_READ: usize = 4 * 1024;
/// Datagrams queued per UDP flow before new ones are dropped.
const UDP_QUEUE: usize = 256;
/// Bytes buffered each way in the pipe between a flow and a local service: one upstream read,
/// so the service sees the same back-pressure a socket would give.
const LOCAL_PIPE: usize = READ_CHUNK;
/// Writes queued per TCP flow. The core keeps at most the flow's upload window in flight and
/// batches a flush's segments into one write, so only a flow whose upstream stalls through a
/// thousand tiny writes reaches this; it is reset rather than left to grow.
const TCP_OPS_QUEUE: usize = 1024;
/// Events from all upstream tasks to the data plane. TCP tasks wait for room (their sockets
/// then push back); datagrams that find it full are dropped and counted.
pub const EVENT_QUEUE: usize = 8192;

enum TcpOp {
    Send(Bytes),
    ShutdownWrite,
}

enum Handle {
    Tcp {
        ops: mpsc::Sender<TcpOp>,
        credit: Arc<Semaphore>,
        task: tokio::task::AbortHandle,
    },
    Udp {
        datagrams: mpsc::Sender<Bytes>,
        task: tokio::task::AbortHandle,
    },
}

/// The runtime's side of every flow: executes [`Command`]s, reports [`UpstreamEvent`]s.
pub struct Upstreams {
    handles: HashMap<FlowId, Handle>,
    events: mpsc::Sender<UpstreamEvent>,
    local: Option<Arc<dyn LocalHost>>,
    inspector: Option<waygate_http::Inspector>,
    drops: Arc<RuntimeDrops>,
}

impl Upstreams {
    /// Upstreams reporting into `events` (at most [`EVENT_QUEUE`] waiting) and counting what
    /// their queues drop in `drops`; flows to the gateway's own services go to `local`.
    pub fn new(
        events: mpsc::Sender<UpstreamEvent>,
        local: Option<Arc<dyn LocalHost>>,
        drops: Arc<RuntimeDrops>,
    ) -> Self {
        Upstreams {
            handles: HashMap::new(),
            events,
            local,
            inspector: None,
            drops,
        }
    }

    /// Flows the engine sends to the HTTP stage ([`LocalEndpoint::Inspect`]) go to `inspector`;
    /// without one they are refused.
    pub fn set_inspector(&mut self, inspector: Option<waygate_http::Inspector>) {
        self.inspector = inspector;
    }

    /// Reports `event` from outside a flow's task, without blocking the loop.
    fn report(&self, event: UpstreamEvent) {
        let events = self.events.clone();
        tokio::spawn(async move { events.send(event).await });
    }

    /// Queues `op` for a TCP flow's upstream; a flow whose queue is full is reset.
    fn tcp_op(&mut self, flow: FlowId, op: TcpOp) {
        let Some(Handle::Tcp { ops, task, .. }) = self.handles.get(&flow) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = ops.try_send(op) {
            self.drops.add(RuntimeDrop::TcpOpsQueueFull);
            task.abort();
            self.handles.remove(&flow);
            self.report(UpstreamEvent::TcpError { flow });
        }
    }

    /// Carries out one command from the core.
    pub fn execute(&mut self, command: Command) {
        match command {
            Command::DnsQuery { .. } => {
                // The runtime hands these to its resolver before commands reach here.
                tracing::debug!("dns query without a resolver dropped");
            }
            Command::TcpConnect { flow, upstream } => {
                let (ops_tx, ops_rx) = mpsc::channel(TCP_OPS_QUEUE);
                // The core grants the flow's download window right after this command.
                let credit = Arc::new(Semaphore::new(0));
                let events = self.events.clone();
                let task = tokio::spawn(tcp_flow(flow, upstream, ops_rx, credit.clone(), events));
                self.handles.insert(
                    flow,
                    Handle::Tcp {
                        ops: ops_tx,
                        credit,
                        task: task.abort_handle(),
                    },
                );
            }
            Command::LocalConnect {
                flow,
                endpoint: LocalEndpoint::Inspect(target),
                ctx,
            } => {
                let (ops_tx, ops_rx) = mpsc::channel(TCP_OPS_QUEUE);
                let credit = Arc::new(Semaphore::new(0));
                let events = self.events.clone();
                let Some(inspector) = self.inspector.clone() else {
                    tracing::debug!(flow, "no HTTP inspector: flow refused");
                    self.report(UpstreamEvent::TcpConnectFailed { flow });
                    return;
                };
                let pumped = credit.clone();
                let task = tokio::spawn(async move {
                    let (dst, bind, via) = (target.dst, target.bind, target.via);
                    let route = waygate_http::Route {
                        dst,
                        bind,
                        via: via.map(via_key),
                        connect: Arc::new(move || {
                            Box::pin(connect_from(dst, bind, via, CONNECT_TIMEOUT))
                        }),
                    };
                    // The origin first: the device is answered only if it answers (a live
                    // pooled connection to it counts).
                    let stream = match inspector.connect(&route).await {
                        Ok(s) => s,
                        Err(err) => {
                            tracing::debug!(flow, dst = %target.dst, %err, "upstream connect failed");
                            let _ = events.send(UpstreamEvent::TcpConnectFailed { flow }).await;
                            return;
                        }
                    };
                    let local = stream
                        .as_ref()
                        .and_then(|s| s.local_addr().ok())
                        .or_else(|| bind.map(|ip| SocketAddr::new(ip, 0)))
                        .unwrap_or_else(|| SocketAddr::new(target.dst.ip(), 0));
                    let (ours, theirs) = tokio::io::duplex(LOCAL_PIPE);
                    let reset = waygate_http::reset::ResetFlag::default();
                    inspector.inspect(*ctx, route, stream, theirs, reset.clone());
                    if events
                        .send(UpstreamEvent::TcpConnected { flow, local })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (reader, writer) = tokio::io::split(ours);
                    // A read error is what resets the device's connection.
                    let reader = waygate_http::reset::ResetOnEof::new(reader, reset);
                    pump(flow, reader, writer, ops_rx, pumped, events).await;
                });
                self.handles.insert(
                    flow,
                    Handle::Tcp {
                        ops: ops_tx,
                        credit,
                        task: task.abort_handle(),
                    },
                );
            }
            Command::LocalConnect {
                flow,
                endpoint,
                ctx,
            } => {
                let (ops_tx, ops_rx) = mpsc::channel(TCP_OPS_QUEUE);
                let credit = Arc::new(Semaphore::new(0));
                let events = self.events.clone();
                let Some(host) = &self.local else {
                    tracing::debug!(flow, ?endpoint, "no local services: flow refused");
                    self.report(UpstreamEvent::TcpConnectFailed { flow });
                    return;
                };
                // The service's end of the pipe goes to it with the flow's context; ours is
                // pumped exactly like a socket.
                let (ours, theirs) = tokio::io::duplex(LOCAL_PIPE);
                let local = ctx.dst;
                host.serve(endpoint, *ctx, theirs);
                let pumped = credit.clone();
                let task = tokio::spawn(async move {
                    if events
                        .send(UpstreamEvent::TcpConnected { flow, local })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (reader, writer) = tokio::io::split(ours);
                    pump(flow, reader, writer, ops_rx, pumped, events).await;
                });
                self.handles.insert(
                    flow,
                    Handle::Tcp {
                        ops: ops_tx,
                        credit,
                        task: task.abort_handle(),
                    },
                );
            }
            Command::TcpSend { flow, data } => self.tcp_op(flow, TcpOp::Send(data)),
            Command::TcpShutdownWrite { flow } => self.tcp_op(flow, TcpOp::ShutdownWrite),
            Command::TcpCredit { flow, bytes } => {
                if let Some(Handle::Tcp { credit, .. }) = self.handles.get(&flow) {
                    credit.add_permits(bytes);
                }
            }
            Command::TcpClose { flow } | Command::UdpClose { flow } => {
                if let Some(handle) = self.handles.remove(&flow) {
                    match handle {
                        Handle::Tcp { task, .. } | Handle::Udp { task, .. } => task.abort(),
                    }
                }
            }
            Command::UdpOpen { flow, upstream } => {
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                let events = self.events.clone();
                let drops = self.drops.clone();
                let task = tokio::spawn(udp_flow(flow, upstream, rx, events, drops));
                self.handles.insert(
                    flow,
                    Handle::Udp {
                        datagrams: tx,
                        task: task.abort_handle(),
                    },
                );
            }
            Command::PingOpen { flow, upstream } => {
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                let events = self.events.clone();
                let drops = self.drops.clone();
                let task = tokio::spawn(ping_flow(flow, upstream, rx, events, drops));
                self.handles.insert(
                    flow,
                    Handle::Udp {
                        datagrams: tx,
                        task: task.abort_handle(),
                    },
                );
            }
            Command::UdpSend { flow, data } => {
                if let Some(Handle::Udp { datagrams, .. }) = self.handles.get(&flow) {
                    // A full queue means the upstream socket cannot keep up: drop, as a
                    // router would.
                    if let Err(mpsc::error::TrySendError::Full(_)) = datagrams.try_send(data) {
                        self.drops.add(RuntimeDrop::UdpSendQueueFull);
                    }
                }
            }
        }
    }

    /// Number of live upstream tasks.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        for (_, handle) in self.handles.drain() {
            match handle {
                Handle::Tcp { task, .. } | Handle::Udp { task, .. } => task.abort(),
            }
        }
    }
}

/// A socket of `kind` for talking to `dst`, bound to `bind` when given. IPv6 sources are
/// per-device addresses inside an egress prefix that the host routes locally without
/// configuring each one, so they are bound with `IPV6_FREEBIND`.
pub fn bound_socket(
    dst: SocketAddr,
    bind: Option<IpAddr>,
    via: Option<Via>,
    kind: Type,
    protocol: SockProtocol,
) -> io::Result<Socket> {
    let domain = match dst {
        SocketAddr::V4(_) => Domain::IPV4,
        SocketAddr::V6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, kind, Some(protocol))?;
    socket.set_nonblocking(true)?;
    // A virtual network's route: the kernel picks the route through this interface, or in the
    // table this mark selects, so the same range can lead to different sites for different
    // networks.
    match via {
        Some(Via::Interface(index)) => match dst {
            SocketAddr::V4(_) => socket.bind_device_by_index_v4(Some(index))?,
            SocketAddr::V6(_) => socket.bind_device_by_index_v6(Some(index))?,
        },
        Some(Via::Mark(mark)) => socket.set_mark(mark.get())?,
        None => {}
    }
    if let Some(bind) = bind {
        if bind.is_ipv6() {
            socket.set_freebind_v6(true)?;
        }
        socket.bind(&SocketAddr::new(bind, 0).into())?;
    }
    Ok(socket)
}

/// A virtual network route as the HTTP inspector's pool key: equal for the same route.
fn via_key(via: Via) -> u64 {
    match via {
        Via::Interface(index) => (1 << 32) | u64::from(index.get()),
        Via::Mark(mark) => (2 << 32) | u64::from(mark.get()),
    }
}

/// Connects to `dst` from `bind` (when given) within `timeout`.
pub async fn connect_from(
    dst: SocketAddr,
    bind: Option<IpAddr>,
    via: Option<Via>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = bound_socket(dst, bind, via, Type::STREAM, SockProtocol::TCP)?;
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn connect(upstream: Upstream) -> io::Result<TcpStream> {
    connect_from(upstream.dst, upstream.bind, upstream.via, CONNECT_TIMEOUT).await
}

async fn tcp_flow(
    flow: FlowId,
    upstream: Upstream,
    ops: mpsc::Receiver<TcpOp>,
    credit: Arc<Semaphore>,
    events: mpsc::Sender<UpstreamEvent>,
) {
    let stream = match connect(upstream).await {
        Ok(s) => s,
        Err(err) => {
            tracing::debug!(flow, %upstream.dst, %err, "upstream connect failed");
            let _ = events.send(UpstreamEvent::TcpConnectFailed { flow }).await;
            return;
        }
    };
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(upstream.dst.ip(), 0));
    if events
        .send(UpstreamEvent::TcpConnected { flow, local })
        .await
        .is_err()
    {
        return;
    }
    let (reader, writer) = stream.into_split();
    pump(flow, reader, writer, ops, credit, events).await;
}

/// Moves a connected flow's bytes: upstream -> core as far as the device's credit allows, core
/// -> upstream as the core sends them. Ends when the upstream's side ends.
async fn pump<R, W>(
    flow: FlowId,
    mut reader: R,
    mut writer: W,
    mut ops: mpsc::Receiver<TcpOp>,
    credit: Arc<Semaphore>,
    events: mpsc::Sender<UpstreamEvent>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let down_events = events.clone();
    let download = async move {
        let mut size = FIRST_READ;
        loop {
            // Wait for the device to have room before reading more: the upstream's TCP window
            // then closes and the origin slows down instead of our memory growing.
            let Ok(mut permit) = credit.acquire_many(READ_CHUNK as u32).await else {
                return;
            };
            // A fresh buffer per read, handed whole to the core, sized by the reads before:
            // an idle flow waits on a small one, a download reads READ_CHUNK at a time.
            let mut buf = BytesMut::with_capacity(size);
            let read = reader.read_buf(&mut buf).await;
            size = next_read_size(size, read.as_ref().map_or(0, |n| *n));
            match read {
                Ok(0) => {
                    let _ = down_events.send(UpstreamEvent::TcpEof { flow }).await;
                    return;
                }
                Ok(n) => {
                    // What was read stays consumed until the core hands it back as credit;
                    // the rest of the permit returns to the pool on drop.
                    if let Some(used) = permit.split(n) {
                        used.forget();
                    }
                    drop(permit);
                    let data = buf.freeze();
                    if down_events
                        .send(UpstreamEvent::TcpData { flow, data })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(_) => {
                    let _ = down_events.send(UpstreamEvent::TcpError { flow }).await;
                    return;
                }
            }
        }
    };
    let upload = async move {
        while let Some(op) = ops.recv().await {
            match op {
                TcpOp::Send(data) => {
                    let n = data.len();
                    if writer.write_all(&data).await.is_err() {
                        let _ = events.send(UpstreamEvent::TcpError { flow }).await;
                        return;
                    }
                    let _ = events
                        .send(UpstreamEvent::TcpWritten { flow, bytes: n })
                        .await;
                }
                TcpOp::ShutdownWrite => {
                    let _ = writer.shutdown().await;
                }
            }
        }
        // The core dropped the flow: keep the write side open until the task is aborted.
        std::future::pending::<()>().await;
    };
    // The task ends when the download side ends; the core closes the flow (aborting the
    // upload side) once the device side is done too.
    tokio::join!(download, upload);
}

/// The size of the read after one of `size` bytes that got `got`: doubled (up to
/// [`READ_CHUNK`]) when it filled the buffer, halved (down to [`FIRST_READ`]) when it got less
/// than half.
fn next_read_size(size: usize, got: usize) -> usize {
    if got >= size {
        (size * 2).min(READ_CHUNK)
    } else if got < size / 2 {
        (size / 2).max(FIRST_READ)
    } else {
        size
    }
}

/// Hands a datagram from an upstream to the data plane, dropping (and counting) it when the
/// queue is full, as a router would; false once the data plane is gone.
fn report_datagram(
    events: &mpsc::Sender<UpstreamEvent>,
    drops: &RuntimeDrops,
    flow: FlowId,
    data: Bytes,
) -> bool {
    match events.try_send(UpstreamEvent::UdpData { flow, data }) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            drops.add(RuntimeDrop::UdpEventQueueFull);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

fn udp_socket(upstream: Upstream) -> io::Result<UdpSocket> {
    let socket = bound_socket(
        upstream.dst,
        upstream.bind,
        upstream.via,
        Type::DGRAM,
        SockProtocol::UDP,
    )?;
    socket.connect(&upstream.dst.into())?;
    UdpSocket::from_std(socket.into())
}

async fn udp_flow(
    flow: FlowId,
    upstream: Upstream,
    mut datagrams: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<UpstreamEvent>,
    drops: Arc<RuntimeDrops>,
) {
    let socket = match udp_socket(upstream) {
        Ok(s) => s,
        Err(err) => {
            tracing::debug!(flow, %upstream.dst, %err, "upstream UDP socket failed");
            return;
        }
    };
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            next = datagrams.recv() => match next {
                Some(data) => {
                    // ICMP errors surface as send errors on a connected socket; they end nothing.
                    let _ = socket.send(&data).await;
                }
                None => return,
            },
            got = socket.recv(&mut buf) => {
                if let Ok(n) = got {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if !report_datagram(&events, &drops, flow, data) {
                        return;
                    }
                }
            }
        }
    }
}

/// How a ping flow's socket sees ICMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PingSocket {
    /// An unprivileged ICMP datagram socket: the kernel picks the identifier, fills the
    /// checksum and hands back only this socket's replies.
    Datagram,
    /// A raw socket (when `net.ipv4.ping_group_range` excludes us, as in a fresh namespace):
    /// we set the identifier and checksum and pick our replies out of all ICMP from the peer.
    Raw {
        /// The identifier this flow's requests carry.
        ident: u16,
    },
}

fn ping_socket(flow: FlowId, upstream: Upstream) -> io::Result<(UdpSocket, PingSocket)> {
    let protocol = match upstream.dst {
        SocketAddr::V4(_) => SockProtocol::ICMPV4,
        SocketAddr::V6(_) => SockProtocol::ICMPV6,
    };
    let (socket, kind) = match bound_socket(
        upstream.dst,
        upstream.bind,
        upstream.via,
        Type::DGRAM,
        protocol,
    ) {
        Ok(s) => (s, PingSocket::Datagram),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let ident = (flow as u16) ^ 0x5747;
            (
                bound_socket(
                    upstream.dst,
                    upstream.bind,
                    upstream.via,
                    Type::RAW,
                    protocol,
                )?,
                PingSocket::Raw { ident },
            )
        }
        Err(e) => return Err(e),
    };
    // Connected: a raw socket then only receives ICMP from this destination.
    socket.connect(&SocketAddr::new(upstream.dst.ip(), 0).into())?;
    Ok((UdpSocket::from_std(socket.into())?, kind))
}

/// The Internet checksum of `data`.
fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The echo reply message in what a ping socket received, if it is one of ours.
fn ping_reply(received: &[u8], kind: PingSocket, v4: bool) -> Option<&[u8]> {
    let PingSocket::Raw { ident } = kind else {
        return Some(received);
    };
    // Raw IPv4 sockets deliver the IP header too; raw ICMPv6 sockets do not.
    let message = if v4 {
        let ihl = usize::from(received.first()? & 0x0f) * 4;
        received.get(ihl..)?
    } else {
        received
    };
    let reply_type = if v4 { 0 } else { 129 };
    (message.len() >= 8
        && message[0] == reply_type
        && u16::from_be_bytes([message[4], message[5]]) == ident)
        .then_some(message)
}

async fn ping_flow(
    flow: FlowId,
    upstream: Upstream,
    mut requests: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<UpstreamEvent>,
    drops: Arc<RuntimeDrops>,
) {
    let (socket, kind) = match ping_socket(flow, upstream) {
        Ok(s) => s,
        Err(err) => {
            tracing::debug!(flow, %upstream.dst, %err, "upstream ping socket failed");
            return;
        }
    };
    let v4 = upstream.dst.is_ipv4();
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            next = requests.recv() => match next {
                Some(data) => {
                    let mut message = data.to_vec();
                    if let (PingSocket::Raw { ident }, true) = (kind, message.len() >= 8) {
                        message[4..6].copy_from_slice(&ident.to_be_bytes());
                        // The kernel fills ICMPv6 checksums on raw sockets, not ICMPv4 ones.
                        if v4 {
                            message[2..4].copy_from_slice(&[0, 0]);
                            let sum = icmp_checksum(&message);
                            message[2..4].copy_from_slice(&sum.to_be_bytes());
                        }
                    }
                    let _ = socket.send(&message).await;
                }
                None => return,
            },
            got = socket.recv(&mut buf) => {
                let Ok(n) = got else { continue };
                if let Some(reply) = ping_reply(&buf[..n], kind, v4) {
                    let data = Bytes::copy_from_slice(reply);
                    if !report_datagram(&events, &drops, flow, data) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waygate_engine::flow::{FlowCtx, LocalEndpoint, LocalService};

    /// Echoes what it reads, naming the device first.
    struct Echo;

    impl LocalHost for Echo {
        fn serve(&self, _: LocalEndpoint, ctx: FlowCtx, stream: tokio::io::DuplexStream) {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                let _ = w.write_all(ctx.device.name.as_bytes()).await;
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    }

    #[test]
    fn reads_grow_while_they_fill_the_buffer_and_shrink_when_the_flow_goes_quiet() {
        let mut size = FIRST_READ;
        let mut sizes = Vec::new();
        for _ in 0..6 {
            size = next_read_size(size, size);
            sizes.push(size);
        }
        assert_eq!(sizes.last(), Some(&READ_CHUNK));
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
        assert_eq!(next_read_size(READ_CHUNK, READ_CHUNK / 2), READ_CHUNK);
        for _ in 0..6 {
            size = next_read_size(size, 100);
        }
        assert_eq!(size, FIRST_READ, "an idle flow waits on the small buffer");
        assert_eq!(next_read_size(FIRST_READ, 0), FIRST_READ);
    }

    async fn next(events: &mut mpsc::Receiver<UpstreamEvent>) -> UpstreamEvent {
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event in time")
            .expect("open channel")
    }

    #[tokio::test]
    async fn a_local_service_is_pumped_like_a_socket_within_the_devices_credit() {
        let (tx, mut events) = mpsc::channel(16);
        let drops = Arc::new(RuntimeDrops::default());
        let mut upstreams = Upstreams::new(tx, Some(Arc::new(Echo)), drops);
        let ctx = super::super::local::tests::ctx("laptop", 53);
        let endpoint = LocalEndpoint::Service(LocalService::DnsTcp);
        upstreams.execute(Command::LocalConnect {
            flow: 3,
            endpoint,
            ctx: Box::new(ctx.clone()),
        });
        assert_eq!(
            next(&mut events).await,
            UpstreamEvent::TcpConnected {
                flow: 3,
                local: ctx.dst
            }
        );
        upstreams.execute(Command::TcpSend {
            flow: 3,
            data: Bytes::from_static(b" hello"),
        });
        assert_eq!(
            next(&mut events).await,
            UpstreamEvent::TcpWritten { flow: 3, bytes: 6 }
        );
        // Without credit nothing comes back, as with a socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(events.try_recv().is_err(), "no data before credit");
        upstreams.execute(Command::TcpCredit {
            flow: 3,
            bytes: READ_CHUNK,
        });
        let mut got = Vec::new();
        while got.len() < b"laptop hello".len() {
            match next(&mut events).await {
                UpstreamEvent::TcpData { flow: 3, data } => got.extend_from_slice(&data),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, b"laptop hello");
        upstreams.execute(Command::TcpClose { flow: 3 });
        assert!(upstreams.is_empty());
    }

    #[tokio::test]
    async fn without_local_services_the_flow_is_refused() {
        let (tx, mut events) = mpsc::channel(16);
        let mut upstreams = Upstreams::new(tx, None, Arc::default());
        upstreams.execute(Command::LocalConnect {
            flow: 4,
            endpoint: LocalEndpoint::Service(LocalService::DnsTcp),
            ctx: Box::new(super::super::local::tests::ctx("laptop", 53)),
        });
        assert_eq!(
            next(&mut events).await,
            UpstreamEvent::TcpConnectFailed { flow: 4 }
        );
    }

    #[test]
    fn checksum_of_an_echo_request() {
        // An echo request whose checksum field holds the right value sums to zero.
        let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'b', b'c'];
        let sum = icmp_checksum(&m);
        m[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(icmp_checksum(&m), 0);
    }

    #[test]
    fn raw_sockets_keep_only_their_own_replies() {
        let kind = PingSocket::Raw { ident: 0x0102 };
        let mut packet = vec![0x45; 20];
        packet.extend_from_slice(&[0, 0, 0, 0, 0x01, 0x02, 0, 7, b'x']);
        assert_eq!(ping_reply(&packet, kind, true), Some(&packet[20..]));
        packet[24] = 9; // another flow's identifier
        assert_eq!(ping_reply(&packet, kind, true), None);
        let request = [128, 0, 0, 0, 0x01, 0x02, 0, 1];
        assert_eq!(
            ping_reply(&request, kind, false),
            None,
            "requests are not replies"
        );
        let reply = [129, 0, 0, 0, 0x01, 0x02, 0, 1];
        assert_eq!(ping_reply(&reply, kind, false), Some(&reply[..]));
        assert_eq!(ping_reply(&[0x45], kind, true), None);
        assert_eq!(
            ping_reply(&[1, 2, 3], PingSocket::Datagram, true),
            Some(&[1u8, 2, 3][..])
        );
    }
}
