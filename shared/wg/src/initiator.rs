//! The device's side of WireGuard: one tunnel to one gateway, sans I/O.
//!
//! Input: IP packets from the device's TUN ([`Initiator::encapsulate`]) and datagrams from the
//! gateway ([`Initiator::handle_datagram`]). Output: datagrams for the gateway's endpoint
//! appended to a [`TransmitQueue`], and decrypted IP packets written into the caller's buffer.
//! Unlike [`crate::Endpoint`] there is no cryptokey routing by source: everything the gateway
//! sends (any Internet source) belongs in the tunnel, and the session itself authenticates it.
//!
//! The caller ticks [`Initiator::update_timers`] every [`crate::TIMER_TICK`]: boringtun's
//! timers send keepalives, rekey after two minutes, and start a new handshake when data went
//! out without an answer for 15 s, which is how a tunnel comes back after the gateway restarted.
//! [`Initiator::force_handshake`] is for the caller's own reasons (its address changed).

use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::transmit::TransmitQueue;
use crate::{DropCounters, DropReason, Traffic, HANDSHAKE_INIT_LEN, OVERHEAD};

/// What a datagram from the gateway gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromGateway {
    /// Nothing for the TUN (handshake, keepalive, cookie); replies, if any, are queued.
    Nothing,
    /// A decrypted IP packet of this many bytes at the start of the output buffer.
    Packet(usize),
    /// Dropped, and counted.
    Dropped(DropReason),
}

/// The state of the tunnel, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitiatorStats {
    /// Time since the last completed handshake (`None`: never, or the session expired).
    pub since_handshake: Option<Duration>,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
}

/// One WireGuard tunnel from a device to its gateway.
pub struct Initiator {
    tunn: Tunn,
    endpoint: SocketAddr,
    traffic: Traffic,
    drops: DropCounters,
}

impl Initiator {
    /// A tunnel with the device's private key to the gateway's public key at `endpoint`,
    /// keepalives every `keepalive` seconds (`None`: none). `index` is this side's session index
    /// (24 bits used; random, so a restarted client does not reuse the last one).
    pub fn new(
        private_key: [u8; 32],
        gateway_public_key: [u8; 32],
        endpoint: SocketAddr,
        keepalive: Option<u16>,
        index: u32,
    ) -> Initiator {
        Initiator {
            tunn: Tunn::new(
                StaticSecret::from(private_key),
                PublicKey::from(gateway_public_key),
                None,
                keepalive,
                index & 0x00FF_FFFF,
                None,
            ),
            endpoint,
            traffic: Traffic::default(),
            drops: DropCounters::default(),
        }
    }

    /// Where datagrams go.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Sends datagrams to `endpoint` from now on (the gateway's name resolved anew).
    pub fn set_endpoint(&mut self, endpoint: SocketAddr) {
        self.endpoint = endpoint;
    }

    /// Encrypts an IP packet and queues it. Without a session the packet waits inside
    /// boringtun and a handshake initiation is queued instead.
    pub fn encapsulate(&mut self, packet: &[u8], tx: &mut TransmitQueue) {
        let tunn = &mut self.tunn;
        self.traffic.tx_packets += 1;
        self.traffic.tx_bytes += packet.len() as u64;
        tx.push_with(
            self.endpoint,
            (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN),
            |buf| match tunn.encapsulate(packet, buf) {
                TunnResult::WriteToNetwork(out) => out.len(),
                _ => 0,
            },
        );
    }

    /// Handles one datagram from `from`. A decrypted packet is written to the start of `out`;
    /// replies (a handshake response, packets queued behind a handshake) go to `tx`.
    ///
    /// # Panics
    /// If `out` is shorter than `datagram` (size it [`crate::transmit::MAX_DATAGRAM`]).
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut TransmitQueue,
    ) -> FromGateway {
        assert!(out.len() >= datagram.len());
        if datagram.is_empty() {
            // boringtun reads an empty input as "flush what is queued", not as a message.
            self.drops.add(DropReason::Malformed);
            return FromGateway::Dropped(DropReason::Malformed);
        }
        let result = match self.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => Ok(None),
            TunnResult::WriteToNetwork(reply) => {
                tx.push(self.endpoint, reply);
                // A completed handshake releases the packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) = self.tunn.decapsulate(None, &[], out)
                {
                    tx.push(self.endpoint, queued);
                }
                Ok(None)
            }
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                Ok(Some(packet.len()))
            }
            TunnResult::Err(WireGuardError::InvalidPacket) => Err(DropReason::BadInnerPacket),
            TunnResult::Err(e) => Err(DropReason::from_wg(&e)),
        };
        match result {
            Ok(Some(len)) => {
                self.traffic.rx_packets += 1;
                self.traffic.rx_bytes += len as u64;
                FromGateway::Packet(len)
            }
            Ok(None) => {
                if matches!(datagram.first(), Some(1 | 2)) {
                    self.traffic.handshakes += 1;
                }
                FromGateway::Nothing
            }
            Err(reason) => {
                self.drops.add(reason);
                FromGateway::Dropped(reason)
            }
        }
    }

    /// Runs the session's timers (keepalive, rekey, handshake retries, expiry).
    pub fn update_timers(&mut self, tx: &mut TransmitQueue) {
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        match self.tunn.update_timers(&mut buf) {
            TunnResult::WriteToNetwork(out) => tx.push(self.endpoint, out),
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                tracing::debug!("session expired; the next packet or keepalive starts a handshake")
            }
            _ => {}
        }
    }

    /// Starts a new handshake now, even while one is under way (the network changed, so the
    /// last initiation may have left from an address that is gone).
    pub fn force_handshake(&mut self, tx: &mut TransmitQueue) {
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        if let TunnResult::WriteToNetwork(init) =
            self.tunn.format_handshake_initiation(&mut buf, true)
        {
            tx.push(self.endpoint, init);
        }
    }

    /// Handshake age and bytes.
    pub fn stats(&self) -> InitiatorStats {
        let (since_handshake, tx, rx, _, _) = self.tunn.stats();
        InitiatorStats {
            since_handshake,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
        }
    }

    /// Packets, bytes and handshakes since the start.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Drop counters.
    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{key, public, DEV_V4, DEV_V6};
    use crate::transmit::MAX_DATAGRAM;
    use crate::{Endpoint, Received};
    use std::net::Ipv4Addr;

    const GW: &str = "198.51.100.1:51820";
    const DEV: &str = "198.51.100.11:40000";

    /// Delivers everything queued in `tx` to the other side until nothing moves; returns the
    /// packets each side decrypted (gateway's, device's).
    fn exchange(
        dev: &mut Initiator,
        gw: &mut Endpoint<()>,
        dev_tx: &mut TransmitQueue,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (gw_addr, dev_addr): (SocketAddr, SocketAddr) =
            (GW.parse().unwrap(), DEV.parse().unwrap());
        let now = crate::testkit::epoch();
        let mut scratch = vec![0u8; MAX_DATAGRAM];
        let mut gw_tx = TransmitQueue::new();
        let (mut at_gw, mut at_dev) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            let to_gw: Vec<(SocketAddr, Vec<u8>)> = dev_tx
                .datagrams()
                .iter()
                .map(|d| (d.dst, dev_tx.bytes()[d.range.clone()].to_vec()))
                .collect();
            dev_tx.clear();
            for (dst, d) in to_gw {
                assert_eq!(dst, gw_addr);
                if let Received::Packet { packet, .. } =
                    gw.handle_datagram(dev_addr, &d, now, &mut scratch, &mut gw_tx)
                {
                    at_gw.push(packet.to_vec());
                }
            }
            let to_dev: Vec<Vec<u8>> = gw_tx
                .datagrams()
                .iter()
                .map(|d| gw_tx.bytes()[d.range.clone()].to_vec())
                .collect();
            gw_tx.clear();
            for d in &to_dev {
                if let FromGateway::Packet(n) =
                    dev.handle_datagram(gw_addr, d, &mut scratch, dev_tx)
                {
                    at_dev.push(scratch[..n].to_vec());
                }
            }
            if dev_tx.is_empty() && to_dev.is_empty() {
                break;
            }
        }
        (at_gw, at_dev)
    }

    fn pair() -> (Initiator, Endpoint<()>) {
        let mut gw = Endpoint::new(key(1));
        gw.upsert_peer(public(key(2)), DEV_V4, DEV_V6, ());
        let dev = Initiator::new(key(2), public(key(1)), GW.parse().unwrap(), Some(25), 7);
        (dev, gw)
    }

    #[test]
    fn the_first_packet_waits_for_the_handshake_and_then_both_ways_carry_data() {
        let (mut dev, mut gw) = pair();
        let mut tx = TransmitQueue::new();
        let out = crate::testkit::ipv4_udp(DEV_V4, Ipv4Addr::new(203, 0, 113, 30), 7, b"hi");
        dev.encapsulate(&out, &mut tx);
        assert_eq!(tx.len(), 1, "a handshake initiation");
        let (at_gw, _) = exchange(&mut dev, &mut gw, &mut tx);
        assert_eq!(at_gw, vec![out.clone()]);
        assert!(dev.stats().since_handshake.is_some());

        // The gateway answers from any Internet source: the device takes it.
        let peer = gw.peer_by_key(&public(key(2))).unwrap();
        let back = crate::testkit::ipv4_udp(Ipv4Addr::new(203, 0, 113, 30), DEV_V4, 7, b"ho");
        let mut gw_tx = TransmitQueue::new();
        assert!(gw.encapsulate(peer, &back, &mut gw_tx));
        let d = &gw_tx.datagrams()[0];
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let got = dev.handle_datagram(
            GW.parse().unwrap(),
            &gw_tx.bytes()[d.range.clone()],
            &mut buf,
            &mut tx,
        );
        assert_eq!(got, FromGateway::Packet(back.len()));
        assert_eq!(&buf[..back.len()], &back[..]);
        assert_eq!(dev.traffic().rx_packets, 1);
        assert_eq!(dev.stats().rx_bytes, back.len() as u64);
    }

    #[test]
    fn a_gateway_that_lost_the_session_is_handshaken_again() {
        let (mut dev, mut gw) = pair();
        let mut tx = TransmitQueue::new();
        let out = crate::testkit::ipv4_udp(DEV_V4, Ipv4Addr::new(203, 0, 113, 30), 7, b"1");
        dev.encapsulate(&out, &mut tx);
        exchange(&mut dev, &mut gw, &mut tx);
        // The gateway restarts: a fresh endpoint with the same keys knows no session, so the
        // old session's data is dropped there until a new handshake.
        let (_, mut gw) = pair();
        dev.encapsulate(&out, &mut tx);
        let (lost, _) = exchange(&mut dev, &mut gw, &mut tx);
        assert!(lost.is_empty());
        assert_eq!(gw.drops().total(), 1);
        dev.force_handshake(&mut tx);
        exchange(&mut dev, &mut gw, &mut tx);
        dev.encapsulate(&out, &mut tx);
        let (at_gw, _) = exchange(&mut dev, &mut gw, &mut tx);
        assert_eq!(at_gw, vec![out]);
    }

    #[test]
    fn garbage_is_dropped_and_counted() {
        let (mut dev, _) = pair();
        let mut tx = TransmitQueue::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for case in [
            vec![],
            vec![4u8; 32],
            vec![1u8; 148],
            vec![2u8; 92],
            vec![9u8; 9],
        ] {
            let r = dev.handle_datagram(GW.parse().unwrap(), &case, &mut buf, &mut tx);
            assert!(matches!(r, FromGateway::Dropped(_)), "{case:?} -> {r:?}");
        }
        assert_eq!(dev.drops().total(), 5);
        assert!(tx.is_empty());
    }
}
