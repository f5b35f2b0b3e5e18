//! Reading the flow key out of a device's IP packet, and writing the few packets the gateway
//! builds itself (UDP replies, TCP resets), through smoltcp's checked wire views.
//!
//! Input is hostile: every view is length-checked before a field is read, and nothing here
//! indexes a buffer it has not checked.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};

pub use waygate_model::Protocol;

/// TCP header bits the flow table acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN set.
    pub syn: bool,
    /// ACK set.
    pub ack: bool,
    /// RST set.
    pub rst: bool,
    /// FIN set.
    pub fin: bool,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful when `ack`).
    pub ack_number: u32,
    /// Length of the segment's payload.
    pub payload_len: usize,
}

/// What a device packet is, once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// Source address and port. For an ICMP echo request the port is its identifier, which is
    /// what tells one `ping` from another; other ICMP has port 0.
    pub src: SocketAddr,
    /// Destination address and port (port 0 for ICMP).
    pub dst: SocketAddr,
    /// Transport.
    pub protocol: Protocol,
    /// TCP header bits, for TCP.
    pub tcp: Option<TcpFlags>,
    /// UDP: the datagram's payload. ICMP echo request: the whole ICMP message.
    pub payload: &'a [u8],
    /// ICMP echo request (v4 type 8 or v6 type 128).
    pub icmp_echo_request: bool,
}

/// Why a device packet cannot be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Too short, bad header length or version.
    Malformed,
    /// A fragment; the tunnel MTU makes fragments unnecessary, so they are not reassembled.
    Fragment,
    /// A transport the gateway does not proxy (or IPv6 extension headers).
    UnsupportedProtocol,
}

/// Parses a device's IP packet far enough to route it to a flow.
pub fn parse(packet: &[u8]) -> Result<Parsed<'_>, ParseError> {
    let version = packet.first().ok_or(ParseError::Malformed)? >> 4;
    let (src, dst, proto, payload) = match version {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).map_err(|_| ParseError::Malformed)?;
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Err(ParseError::Fragment);
            }
            let header = usize::from(ip.header_len());
            let total = usize::from(ip.total_len());
            let payload = packet.get(header..total).ok_or(ParseError::Malformed)?;
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                ip.next_header(),
                payload,
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).map_err(|_| ParseError::Malformed)?;
            let start = ip.header_len();
            let end = start + usize::from(ip.payload_len());
            let payload = packet.get(start..end).ok_or(ParseError::Malformed)?;
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                ip.next_header(),
                payload,
            )
        }
        _ => return Err(ParseError::Malformed),
    };
    match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(payload).map_err(|_| ParseError::Malformed)?;
            let header = usize::from(tcp.header_len());
            Ok(Parsed {
                src: SocketAddr::new(src, tcp.src_port()),
                dst: SocketAddr::new(dst, tcp.dst_port()),
                protocol: Protocol::Tcp,
                tcp: Some(TcpFlags {
                    syn: tcp.syn(),
                    ack: tcp.ack(),
                    rst: tcp.rst(),
                    fin: tcp.fin(),
                    seq: tcp.seq_number().0 as u32,
                    ack_number: tcp.ack_number().0 as u32,
                    payload_len: payload.len().saturating_sub(header),
                }),
                payload: &[],
                icmp_echo_request: false,
            })
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(payload).map_err(|_| ParseError::Malformed)?;
            let len = usize::from(udp.len());
            let body = payload.get(8..len).ok_or(ParseError::Malformed)?;
            Ok(Parsed {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
                protocol: Protocol::Udp,
                tcp: None,
                payload: body,
                icmp_echo_request: false,
            })
        }
        IpProtocol::Icmp | IpProtocol::Icmpv6 => {
            let kind = *payload.first().ok_or(ParseError::Malformed)?;
            let echo = match proto {
                IpProtocol::Icmp => kind == 8,
                _ => kind == 128,
            };
            // Type, code, checksum, identifier, sequence: an echo shorter than that is broken.
            if echo && payload.len() < 8 {
                return Err(ParseError::Malformed);
            }
            let ident = if echo {
                u16::from_be_bytes([payload[4], payload[5]])
            } else {
                0
            };
            Ok(Parsed {
                src: SocketAddr::new(src, ident),
                dst: SocketAddr::new(dst, 0),
                protocol: Protocol::Icmp,
                tcp: None,
                payload: if echo { payload } else { &[] },
                icmp_echo_request: echo,
            })
        }
        _ => Err(ParseError::UnsupportedProtocol),
    }
}

/// Checksums the gateway computes on what it builds.
fn checksums() -> ChecksumCapabilities {
    ChecksumCapabilities::default()
}

fn ip_header_len(addr: IpAddr) -> usize {
    match addr {
        IpAddr::V4(_) => 20,
        IpAddr::V6(_) => 40,
    }
}

/// Writes an IP header for `payload_len` bytes of `proto` from `src` to `dst` into `buf` and
/// returns the header length. Both addresses must be of one family.
fn emit_ip(
    buf: &mut [u8],
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    payload_len: usize,
) -> Option<usize> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let repr = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len,
                hop_limit: 64,
            };
            let mut ip = Ipv4Packet::new_unchecked(buf.get_mut(..20 + payload_len)?);
            repr.emit(&mut ip, &checksums());
            Some(20)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let repr = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len,
                hop_limit: 64,
            };
            let mut ip = Ipv6Packet::new_unchecked(buf.get_mut(..40 + payload_len)?);
            repr.emit(&mut ip);
            Some(40)
        }
        _ => None,
    }
}

/// Builds a UDP packet from `src` to `dst` carrying `payload` into `buf`; returns its length, or
/// `None` when `buf` is too small or the families differ.
pub fn build_udp(
    buf: &mut [u8],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<usize> {
    let udp_len = 8 + payload.len();
    let header = ip_header_len(src.ip());
    let total = header + udp_len;
    if buf.len() < total || u16::try_from(udp_len).is_err() {
        return None;
    }
    emit_ip(buf, src.ip(), dst.ip(), IpProtocol::Udp, udp_len)?;
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let mut udp = UdpPacket::new_unchecked(&mut buf[header..total]);
    repr.emit(
        &mut udp,
        &IpAddress::from(src.ip()),
        &IpAddress::from(dst.ip()),
        payload.len(),
        |out| out.copy_from_slice(payload),
        &checksums(),
    );
    Some(total)
}

/// Builds the RST answering a segment from `peer_side` to `our_side` (RFC 9293 3.10.7.1): a
/// segment that carried an ACK is answered with `seq = its ack`; one without (a SYN) with an ACK of
/// its sequence space (`seq + seg_len`, a SYN counting one).
pub fn build_rst(
    buf: &mut [u8],
    our_side: SocketAddr,
    peer_side: SocketAddr,
    segment: &TcpFlags,
) -> Option<usize> {
    let seg_len = segment.payload_len as u32 + u32::from(segment.syn) + u32::from(segment.fin);
    let (seq_number, ack_number) = if segment.ack {
        (TcpSeqNumber(segment.ack_number as i32), None)
    } else {
        (
            TcpSeqNumber(0),
            Some(TcpSeqNumber(segment.seq.wrapping_add(seg_len) as i32)),
        )
    };
    let repr = TcpRepr {
        src_port: our_side.port(),
        dst_port: peer_side.port(),
        control: TcpControl::Rst,
        seq_number,
        ack_number,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let tcp_len = repr.header_len();
    let header = ip_header_len(our_side.ip());
    let total = header + tcp_len;
    if buf.len() < total {
        return None;
    }
    emit_ip(buf, our_side.ip(), peer_side.ip(), IpProtocol::Tcp, tcp_len)?;
    let mut tcp = TcpPacket::new_unchecked(&mut buf[header..total]);
    repr.emit(
        &mut tcp,
        &IpAddress::from(our_side.ip()),
        &IpAddress::from(peer_side.ip()),
        &checksums(),
    );
    Some(total)
}

/// Builds the packet that carries an upstream's echo reply `message` (ICMP header onwards) back
/// to the device, from `from` to `to`, with the identifier the device chose; returns its length.
/// Anything but an echo reply of the right family gives `None`.
pub fn build_ping_reply(
    buf: &mut [u8],
    from: IpAddr,
    to: IpAddr,
    ident: u16,
    message: &[u8],
) -> Option<usize> {
    if message.len() < 8 {
        return None;
    }
    let (header, next, reply_type) = match (from, to) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (20, IpProtocol::Icmp, 0u8),
        (IpAddr::V6(_), IpAddr::V6(_)) => (40, IpProtocol::Icmpv6, 129u8),
        _ => return None,
    };
    if message[0] != reply_type {
        return None;
    }
    let total = header + message.len();
    let out = buf.get_mut(..total)?;
    let (ip_part, icmp_part) = out.split_at_mut(header);
    icmp_part.copy_from_slice(message);
    icmp_part[4..6].copy_from_slice(&ident.to_be_bytes());
    match (from, to) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let repr = Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: next,
                payload_len: message.len(),
                hop_limit: 64,
            };
            repr.emit(&mut Ipv4Packet::new_unchecked(ip_part), &checksums());
            let mut icmp = Icmpv4Packet::new_unchecked(icmp_part);
            icmp.fill_checksum();
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let repr = Ipv6Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: next,
                payload_len: message.len(),
                hop_limit: 64,
            };
            repr.emit(&mut Ipv6Packet::new_unchecked(ip_part));
            let mut icmp = Icmpv6Packet::new_unchecked(icmp_part);
            icmp.fill_checksum(&src, &dst);
        }
        _ => return None,
    }
    Some(total)
}

/// Builds the echo reply to an ICMP/ICMPv6 echo request addressed to us; returns its length.
pub fn build_echo_reply(buf: &mut [u8], request: &[u8]) -> Option<usize> {
    let out = buf.get_mut(..request.len())?;
    out.copy_from_slice(request);
    match request.first()? >> 4 {
        4 => {
            let mut ip = Ipv4Packet::new_checked(&mut out[..]).ok()?;
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            ip.set_src_addr(dst);
            ip.set_dst_addr(src);
            ip.set_hop_limit(64);
            ip.fill_checksum();
            let header = usize::from(ip.header_len());
            let mut icmp = Icmpv4Packet::new_checked(out.get_mut(header..)?).ok()?;
            if icmp.msg_type() != Icmpv4Message::EchoRequest {
                return None;
            }
            icmp.set_msg_type(Icmpv4Message::EchoReply);
            icmp.fill_checksum();
        }
        6 => {
            let mut ip = Ipv6Packet::new_checked(&mut out[..]).ok()?;
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            ip.set_src_addr(dst);
            ip.set_dst_addr(src);
            ip.set_hop_limit(64);
            let header = ip.header_len();
            let mut icmp = Icmpv6Packet::new_checked(out.get_mut(header..)?).ok()?;
            if icmp.msg_type() != Icmpv6Message::EchoRequest {
                return None;
            }
            icmp.set_msg_type(Icmpv6Message::EchoReply);
            icmp.fill_checksum(&dst, &src);
        }
        _ => return None,
    }
    Some(request.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn udp_round_trip_v4_and_v6() {
        for (src, dst) in [
            ("203.0.113.30:7", "100.96.0.2:5000"),
            ("[2001:db8::30]:7", "[fd77:6761:7465::2]:5000"),
        ] {
            let mut buf = [0u8; 200];
            let n = build_udp(&mut buf, sa(src), sa(dst), b"hello").unwrap();
            let p = parse(&buf[..n]).unwrap();
            assert_eq!(p.src, sa(src));
            assert_eq!(p.dst, sa(dst));
            assert_eq!(p.protocol, Protocol::Udp);
            assert_eq!(p.payload, b"hello");
        }
    }

    #[test]
    fn rst_answers_a_syn() {
        let mut buf = [0u8; 100];
        let syn = TcpFlags {
            syn: true,
            ack: false,
            rst: false,
            fin: false,
            seq: 1000,
            ack_number: 0,
            payload_len: 0,
        };
        let n = build_rst(
            &mut buf,
            sa("203.0.113.10:81"),
            sa("100.96.0.2:40000"),
            &syn,
        )
        .unwrap();
        let p = parse(&buf[..n]).unwrap();
        let flags = p.tcp.unwrap();
        assert!(flags.rst && !flags.syn);
        let tcp = TcpPacket::new_checked(&buf[20..n]).unwrap();
        assert_eq!(tcp.ack_number(), TcpSeqNumber(1001));
        assert!(tcp.ack());
        assert_eq!(p.src, sa("203.0.113.10:81"));
    }

    #[test]
    fn mixed_families_are_refused() {
        let mut buf = [0u8; 100];
        assert_eq!(
            build_udp(&mut buf, sa("203.0.113.1:1"), sa("[::1]:1"), b""),
            None
        );
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        let mut udp = [0u8; 100];
        let n = build_udp(&mut udp, sa("203.0.113.30:7"), sa("100.96.0.2:5000"), b"hi").unwrap();
        // Every truncation and a sample of corruptions must parse or fail cleanly.
        for cut in 0..n {
            let _ = parse(&udp[..cut]);
        }
        for i in 0..n {
            for v in [0u8, 0xff, 0x0f, 0x45, 0x60] {
                let mut p = udp;
                p[i] = v;
                let _ = parse(&p[..n]);
            }
        }
        assert_eq!(parse(&[]), Err(ParseError::Malformed));
        assert_eq!(parse(&[0x70; 40]), Err(ParseError::Malformed));
        // UDP length field larger than the packet.
        let mut bad = udp;
        bad[24..26].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(parse(&bad[..n]), Err(ParseError::Malformed));
    }

    #[test]
    fn fragments_are_refused() {
        let mut buf = [0u8; 100];
        let n = build_udp(&mut buf, sa("100.96.0.2:1"), sa("203.0.113.30:7"), b"x").unwrap();
        buf[6] = 0x20; // more fragments
        assert_eq!(parse(&buf[..n]), Err(ParseError::Fragment));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }
    }
}
