//! A smoltcp `Device` lent to one poll of one flow: at most one received packet in, every
//! transmitted packet straight out through a [`PacketSink`] to the flow's peer.

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::PacketSink;
use waygate_wg::PeerId;

/// The device for one poll.
pub struct FlowDevice<'a, S: PacketSink> {
    rx: Option<&'a [u8]>,
    sink: &'a mut S,
    peer: PeerId,
    mtu: usize,
    scratch: &'a mut [u8],
}

impl<'a, S: PacketSink> FlowDevice<'a, S> {
    /// A device that delivers `rx` (if any) and sends to `peer`. `scratch` must hold `mtu` bytes.
    pub fn new(
        rx: Option<&'a [u8]>,
        sink: &'a mut S,
        peer: PeerId,
        mtu: usize,
        scratch: &'a mut [u8],
    ) -> Self {
        FlowDevice {
            rx,
            sink,
            peer,
            mtu,
            scratch,
        }
    }
}

/// Capabilities shared by every flow device and the interface.
pub fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    // Packets from devices were authenticated by WireGuard's AEAD, so corruption in transit is
    // impossible; verifying their checksums again would only cost time. Outgoing ones are
    // computed as usual.
    let mut checksum = ChecksumCapabilities::default();
    checksum.ipv4 = Checksum::Tx;
    checksum.tcp = Checksum::Tx;
    checksum.udp = Checksum::Tx;
    checksum.icmpv4 = Checksum::Tx;
    checksum.icmpv6 = Checksum::Tx;
    caps.checksum = checksum;
    caps
}

impl<S: PacketSink> phy::Device for FlowDevice<'_, S> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b, S>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_, S>)> {
        let packet = self.rx.take()?;
        Some((
            RxToken(packet),
            TxToken {
                sink: self.sink,
                peer: self.peer,
                scratch: self.scratch,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_, S>> {
        Some(TxToken {
            sink: self.sink,
            peer: self.peer,
            scratch: self.scratch,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

/// The received packet.
pub struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

/// Where one outgoing packet is written, then handed to the sink.
pub struct TxToken<'a, S: PacketSink> {
    sink: &'a mut S,
    peer: PeerId,
    scratch: &'a mut [u8],
}

impl<S: PacketSink> phy::TxToken for TxToken<'_, S> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(self.scratch.len());
        let buf = &mut self.scratch[..len];
        let r = f(buf);
        self.sink.send(self.peer, buf);
        r
    }
}
