//! What the data-plane shards share (`wireguard.threads`): the WireGuard port, bound once per
//! shard as a `SO_REUSEPORT` group that the kernel steers by receiver index
//! ([`waygate_wg::shard`]); which shard each device is on, for the resolver's answers; events
//! every shard must see; and one stats snapshot summed over the shards.
//!
//! Shard 0 runs on the main thread beside the admin API, the UAPI socket and the fan-out of
//! events; shard `i > 0` on a thread of its own, with its own tokio runtime. Nothing here is on a
//! packet's path except the kernel's program.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use waygate_config::Steering;
use waygate_wg::shard::{steering_program, Shard};
use waygate_wg::PeerId;

use crate::stats::StatsSnapshot;

/// Which shard each device is on: the resolver sends a device's answers and learned names there.
#[derive(Clone)]
pub struct DeviceShards {
    shard: Shard,
    /// Device id -> shard, written by the registry watcher (empty with one shard).
    by_device: Arc<RwLock<HashMap<String, u32>>>,
}

impl DeviceShards {
    /// For `shard.count` shards, owners decided with `shard.seed`.
    pub fn new(shard: Shard) -> Self {
        DeviceShards {
            shard,
            by_device: Arc::default(),
        }
    }

    /// Shards in all.
    pub fn count(&self) -> usize {
        self.shard.count as usize
    }

    /// The shard of a peer id (ids carry their shard).
    pub fn of_peer(&self, peer: PeerId) -> usize {
        self.shard.owner_of_id(peer) as usize
    }

    /// The shard of a device; 0 for one no longer enrolled.
    pub fn of_device(&self, device_id: &str) -> usize {
        if self.shard.count <= 1 {
            return 0;
        }
        let map = self
            .by_device
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(device_id).map_or(0, |&s| s as usize)
    }

    /// Records the devices' owners: `(device id, public key)` of every active device.
    pub fn update<'a>(&self, devices: impl Iterator<Item = (&'a str, &'a [u8; 32])>) {
        if self.shard.count <= 1 {
            return;
        }
        let map: HashMap<String, u32> = devices
            .map(|(id, key)| (id.to_string(), self.shard.owner_of_key(key)))
            .collect();
        *self
            .by_device
            .write()
            .unwrap_or_else(PoisonError::into_inner) = map;
    }
}

/// The WireGuard sockets, one per shard in shard order. One shard binds a plain socket, as a
/// gateway without shards always did; more bind a `SO_REUSEPORT` group with the steering
/// program attached ([`Steering::Kernel`]), or share one socket ([`Steering::Reader`]: copies of
/// one descriptor, which only the first shard reads; the others send on theirs).
pub fn bind_sockets(
    listen: SocketAddr,
    count: u32,
    kernel_buffer: usize,
    steering: Steering,
) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    let bound = if count <= 1 {
        waygate_udp::bind_plain(listen, kernel_buffer).map(|s| vec![s])
    } else if steering == Steering::Reader {
        waygate_udp::bind_plain(listen, kernel_buffer).and_then(|first| {
            let mut sockets = Vec::with_capacity(count as usize);
            for _ in 1..count {
                sockets.push(first.try_clone()?);
            }
            sockets.insert(0, first);
            Ok(sockets)
        })
    } else {
        waygate_udp::bind_group(listen, count as usize, kernel_buffer)
    };
    let sockets = bound.with_context(|| format!("cannot listen on UDP {listen}"))?;
    if count > 1 && steering == Steering::Kernel {
        let program: Vec<(u16, u8, u8, u32)> = steering_program(count)
            .into_iter()
            .map(|i| (i.code, i.jt, i.jf, i.k))
            .collect();
        waygate_udp::steer_group(&sockets[0], &program).context(
            "cannot attach the shards' steering program (SO_ATTACH_REUSEPORT_CBPF); \
             wireguard.steering = \"reader\" needs no kernel program",
        )?;
    }
    Ok(sockets)
}

/// Copies every item of `rx` to each of `txs` (egress probes, reloads: rare, and every shard
/// needs them), on the current runtime; what a full queue cannot take is dropped.
pub fn fan_out<T: Clone + Send + 'static>(mut rx: mpsc::Receiver<T>, txs: Vec<mpsc::Sender<T>>) {
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            for tx in &txs {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(item.clone()) {
                    tracing::warn!("a shard's event queue is full; an event was dropped");
                }
            }
        }
    });
}

/// Each shard's latest stats snapshot, and their sum for the admin API and metrics.
pub struct StatsBoard {
    slots: Mutex<Vec<StatsSnapshot>>,
    sum: watch::Sender<StatsSnapshot>,
}

impl StatsBoard {
    /// A board for `count` shards.
    pub fn new(count: usize) -> Self {
        StatsBoard {
            slots: Mutex::new(vec![StatsSnapshot::default(); count]),
            sum: watch::channel(StatsSnapshot::default()).0,
        }
    }

    /// The sum, updated at every publish.
    pub fn subscribe(&self) -> watch::Receiver<StatsSnapshot> {
        self.sum.subscribe()
    }

    /// Shard `index`'s snapshot; the sum is published at once.
    pub fn publish(&self, index: usize, snapshot: StatsSnapshot) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = StatsSnapshot::sum(
            &snapshot,
            slots
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, s)| s),
        );
        if let Some(slot) = slots.get_mut(index) {
            *slot = snapshot;
        }
        drop(slots);
        self.sum.send_replace(sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use waygate_udp::BatchSocket;

    /// A message of `kind` with receiver index `receiver` where WireGuard puts it.
    fn message(kind: u8, receiver: u32) -> Vec<u8> {
        let mut d = vec![0u8; 48];
        d[0] = kind;
        let at = if kind == 2 { 8 } else { 4 };
        d[at..at + 4].copy_from_slice(&receiver.to_le_bytes());
        d
    }

    #[test]
    fn a_reader_socket_is_one_port_that_every_shard_sends_from() {
        let sockets =
            bind_sockets("127.0.0.1:0".parse().unwrap(), 3, 1 << 16, Steering::Reader).unwrap();
        let addr = sockets[0].local_addr().unwrap();
        assert_eq!(sockets.len(), 3);
        assert!(sockets.iter().all(|s| s.local_addr().unwrap() == addr));
        let device = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        device
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // What any shard sends comes from the one port; what the device sends reaches the first.
        for (i, s) in sockets.iter().enumerate() {
            s.send_to(&[i as u8], device.local_addr().unwrap()).unwrap();
            let mut buf = [0u8; 4];
            let (n, from) = device.recv_from(&mut buf).unwrap();
            assert_eq!((n, buf[0], from), (1, i as u8, addr));
        }
        device.send_to(&message(4, 2 << 8 | 2), addr).unwrap();
        // The sockets are non-blocking (tokio registers them).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 64];
        let n = loop {
            match sockets[0].recv(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "nothing arrived");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, 48);
    }

    /// A loopback group of `count` sockets with the steering program; their address.
    fn kernel_group(count: u32) -> (SocketAddr, Vec<BatchSocket>) {
        let sockets = bind_sockets(
            "127.0.0.1:0".parse().unwrap(),
            count,
            1 << 16,
            Steering::Kernel,
        )
        .unwrap();
        let dst = sockets[0].local_addr().unwrap();
        let sockets = sockets
            .into_iter()
            .map(|s| BatchSocket::from_std(s).unwrap())
            .collect();
        (dst, sockets)
    }

    #[tokio::test]
    async fn the_kernel_delivers_one_addresses_initiations_to_one_shard_from_any_port() {
        let count = 3;
        let (dst, mut sockets) = kernel_group(count);
        let mut init = vec![0u8; 148];
        init[0] = 1;
        // 24 source ports: the kernel's 4-tuple hash would spread them over all three.
        for _ in 0..24 {
            let device = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
            device.send_run(dst, &init, init.len()).await.unwrap();
        }
        let mut got = vec![0usize; count as usize];
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.iter().sum::<usize>() < 24 {
            assert!(Instant::now() < deadline, "{got:?}");
            for (i, s) in sockets.iter_mut().enumerate() {
                s.receive_batch(|_, _| got[i] += 1).unwrap();
            }
            tokio::task::yield_now().await;
        }
        let want = waygate_wg::shard::steer_initiation("127.0.0.1".parse().unwrap(), count);
        assert_eq!(got[want as usize], 24, "{got:?}");
    }

    #[tokio::test]
    async fn the_kernel_delivers_each_peers_datagrams_to_its_shards_socket() {
        let count = 3;
        let (dst, mut sockets) = kernel_group(count);
        let device = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        let mut sent = 0;
        for id in 1..=30u32 {
            for kind in [2u8, 3, 4] {
                device
                    .send_run(dst, &message(kind, id << 8 | 1), 48)
                    .await
                    .unwrap();
                sent += 1;
            }
        }
        let mut got = vec![Vec::new(); count as usize];
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.iter().map(Vec::len).sum::<usize>() < sent {
            assert!(Instant::now() < deadline, "{got:?}");
            for (i, s) in sockets.iter_mut().enumerate() {
                s.receive_batch(|_, d| got[i].push(d.to_vec())).unwrap();
            }
            tokio::task::yield_now().await;
        }
        for (i, datagrams) in got.iter().enumerate() {
            assert_eq!(datagrams.len(), 30, "shard {i}");
            for d in datagrams {
                let id = waygate_wg::shard::peer_id_of(d).unwrap();
                assert_eq!(id % count, i as u32, "{d:?}");
            }
        }
    }

    #[test]
    fn devices_answers_go_to_their_shard() {
        let shards = DeviceShards::new(Shard {
            index: 0,
            count: 4,
            seed: 5,
        });
        let keys: Vec<[u8; 32]> = (0..16u8).map(|i| [i.wrapping_mul(37); 32]).collect();
        let ids: Vec<String> = (0..16).map(|i| format!("dev-{i}")).collect();
        shards.update(ids.iter().map(String::as_str).zip(keys.iter()));
        let owner = Shard {
            index: 0,
            count: 4,
            seed: 5,
        };
        for (id, key) in ids.iter().zip(&keys) {
            assert_eq!(shards.of_device(id), owner.owner_of_key(key) as usize);
        }
        assert_eq!(shards.of_device("gone"), 0);
        assert_eq!(shards.of_peer(4 * 1000 + 3), 3);
    }
}
