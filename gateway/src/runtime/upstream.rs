//! Upstream connections: one small task per flow, carrying bytes between a kernel socket and the
//! core's event channel. The core decides; these tasks only move bytes and report.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};

use crate::flow::{Command, FlowId, Upstream, UpstreamEvent};

/// How long a TCP connect may take before the device gets a RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes the runtime may read from an upstream before the device has taken them.
const DOWNLOAD_WINDOW: usize = 512 * 1024;
/// Largest read from an upstream socket.
const READ_CHUNK: usize = 64 * 1024;
/// Datagrams queued per UDP flow before new ones are dropped.
const UDP_QUEUE: usize = 256;

enum TcpOp {
    Send(Bytes),
    ShutdownWrite,
}

enum Handle {
    Tcp {
        ops: mpsc::UnboundedSender<TcpOp>,
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
    events: mpsc::UnboundedSender<UpstreamEvent>,
}

impl Upstreams {
    /// Upstreams reporting into `events`.
    pub fn new(events: mpsc::UnboundedSender<UpstreamEvent>) -> Self {
        Upstreams {
            handles: HashMap::new(),
            events,
        }
    }

    /// Carries out one command from the core.
    pub fn execute(&mut self, command: Command) {
        match command {
            Command::TcpConnect { flow, upstream } => {
                let (ops_tx, ops_rx) = mpsc::unbounded_channel();
                let credit = Arc::new(Semaphore::new(DOWNLOAD_WINDOW));
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
            Command::TcpSend { flow, data } => {
                if let Some(Handle::Tcp { ops, .. }) = self.handles.get(&flow) {
                    let _ = ops.send(TcpOp::Send(data));
                }
            }
            Command::TcpShutdownWrite { flow } => {
                if let Some(Handle::Tcp { ops, .. }) = self.handles.get(&flow) {
                    let _ = ops.send(TcpOp::ShutdownWrite);
                }
            }
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
                let task = tokio::spawn(udp_flow(flow, upstream, rx, events));
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
                    let _ = datagrams.try_send(data);
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

async fn connect(upstream: Upstream) -> io::Result<TcpStream> {
    let socket = match upstream.dst.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(bind) = upstream.bind {
        socket.bind(SocketAddr::new(bind, 0))?;
    }
    socket.set_nodelay(true)?;
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(upstream.dst))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn tcp_flow(
    flow: FlowId,
    upstream: Upstream,
    mut ops: mpsc::UnboundedReceiver<TcpOp>,
    credit: Arc<Semaphore>,
    events: mpsc::UnboundedSender<UpstreamEvent>,
) {
    let stream = match connect(upstream).await {
        Ok(s) => s,
        Err(err) => {
            tracing::debug!(flow, %upstream.dst, %err, "upstream connect failed");
            let _ = events.send(UpstreamEvent::TcpConnectFailed { flow });
            return;
        }
    };
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::new(upstream.dst.ip(), 0));
    if events
        .send(UpstreamEvent::TcpConnected { flow, local })
        .is_err()
    {
        return;
    }
    let (mut reader, mut writer) = stream.into_split();
    let down_events = events.clone();
    let download = async move {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            // Wait for the device to have room before reading more: the upstream's TCP window
            // then closes and the origin slows down instead of our memory growing.
            let Ok(mut permit) = credit.acquire_many(READ_CHUNK as u32).await else {
                return;
            };
            buf.reserve(READ_CHUNK);
            let read = reader.read_buf(&mut buf).await;
            match read {
                Ok(0) => {
                    let _ = down_events.send(UpstreamEvent::TcpEof { flow });
                    return;
                }
                Ok(n) => {
                    // What was read stays consumed until the core hands it back as credit;
                    // the rest of the permit returns to the pool on drop.
                    if let Some(used) = permit.split(n) {
                        used.forget();
                    }
                    drop(permit);
                    let data = buf.split().freeze();
                    if down_events
                        .send(UpstreamEvent::TcpData { flow, data })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(_) => {
                    let _ = down_events.send(UpstreamEvent::TcpError { flow });
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
                        let _ = events.send(UpstreamEvent::TcpError { flow });
                        return;
                    }
                    let _ = events.send(UpstreamEvent::TcpWritten { flow, bytes: n });
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

fn udp_socket(upstream: Upstream) -> io::Result<UdpSocket> {
    let domain = match upstream.dst {
        SocketAddr::V4(_) => Domain::IPV4,
        SocketAddr::V6(_) => Domain::IPV6,
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(SockProtocol::UDP))?;
    socket.set_nonblocking(true)?;
    if let Some(bind) = upstream.bind {
        socket.bind(&SocketAddr::new(bind, 0).into())?;
    }
    socket.connect(&upstream.dst.into())?;
    UdpSocket::from_std(socket.into())
}

async fn udp_flow(
    flow: FlowId,
    upstream: Upstream,
    mut datagrams: mpsc::Receiver<Bytes>,
    events: mpsc::UnboundedSender<UpstreamEvent>,
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
                    if events.send(UpstreamEvent::UdpData { flow, data }).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
