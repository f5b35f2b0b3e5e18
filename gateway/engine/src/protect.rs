//! Protected destinations: what a device must not reach through the gateway, whatever the rules
//! say.
//!
//! A gateway that proxies every flow from its own sockets hands devices the host's position in
//! the network: its own services (on every address, and on `0.0.0.0` listeners), the cloud
//! metadata service at 169.254.169.254, and the neighbours on its directly connected networks.
//! So flows there are refused by default, after the stages decided and before anything connects:
//!
//! 1. the host's own addresses (every interface, followed as they change; prefixes routed
//!    `local`, as an IPv6 egress prefix is; the egress addresses and IPv6 egress prefixes of the
//!    config) — always;
//! 2. what `network.allow_private` names — allowed;
//! 3. link-local ranges (169.254.0.0/16, fe80::/10) — refused;
//! 4. ranges a virtual network of the device routes — allowed;
//! 5. the host's directly connected networks, then the private ranges (RFC 1918, 100.64.0.0/10,
//!    fc00::/7) — refused.
//!
//! The gateway's own tunnel addresses and device-to-device traffic are decided before this (see
//! the core). Nothing here does I/O: the runtime reads the interfaces and hands them over.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::flow::FlowDrop;

/// Private ranges refused unless a virtual network routes them or the admin allows them.
const PRIVATE: [IpNet; 5] = [
    IpNet::V4(v4(Ipv4Addr::new(10, 0, 0, 0), 8)),
    IpNet::V4(v4(Ipv4Addr::new(172, 16, 0, 0), 12)),
    IpNet::V4(v4(Ipv4Addr::new(192, 168, 0, 0), 16)),
    // Carrier-grade NAT space, where cloud providers also put internal services.
    IpNet::V4(v4(Ipv4Addr::new(100, 64, 0, 0), 10)),
    IpNet::V6(v6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)),
];

/// Link-local ranges: instance metadata services live here.
const LINK_LOCAL: [IpNet; 2] = [
    IpNet::V4(v4(Ipv4Addr::new(169, 254, 0, 0), 16)),
    IpNet::V6(v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10)),
];

const fn v4(addr: Ipv4Addr, len: u8) -> Ipv4Net {
    match Ipv4Net::new(addr, len) {
        Ok(net) => net,
        Err(_) => panic!("invalid constant prefix"),
    }
}

const fn v6(addr: Ipv6Addr, len: u8) -> Ipv6Net {
    match Ipv6Net::new(addr, len) {
        Ok(net) => net,
        Err(_) => panic!("invalid constant prefix"),
    }
}

/// One address of one of the host's interfaces, with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddress {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length: the directly connected network is `addr/prefix`.
    pub prefix: u8,
}

/// The protected destinations, checked for every new flow.
#[derive(Debug, Clone, Default)]
pub struct Protected {
    /// The host's own addresses and the prefixes it owns as a whole.
    own: Vec<IpNet>,
    /// Owned by configuration (egress addresses and prefixes): kept across interface updates.
    configured: Vec<IpNet>,
    /// Directly connected networks.
    connected: Vec<IpNet>,
    /// `network.allow_private`.
    allowed: Vec<IpNet>,
}

impl Protected {
    /// Protection with `configured` as the host's own (egress addresses and prefixes) and
    /// `allowed` opened by the admin; interfaces come with [`Protected::set_interfaces`].
    pub fn new(configured: Vec<IpNet>, allowed: Vec<IpNet>) -> Self {
        let mut protected = Protected {
            own: Vec::new(),
            configured,
            connected: Vec::new(),
            allowed,
        };
        protected.set_host(&[], &[]);
        protected
    }

    /// Replaces the host's interface addresses and the prefixes it routes to itself as a whole
    /// (`ip route add local PREFIX dev lo`); the runtime reads them as they change.
    pub fn set_host(&mut self, addrs: &[HostAddress], local: &[IpNet]) {
        self.own = self.configured.clone();
        self.own.extend(local.iter().map(|n| {
            let addr = canonical(n.network());
            IpNet::new(addr, n.prefix_len()).map_or(*n, |n| n.trunc())
        }));
        self.connected.clear();
        for a in addrs {
            let addr = canonical(a.addr);
            self.own.push(IpNet::from(addr));
            if let Ok(net) = IpNet::new(addr, a.prefix) {
                // A /32 or /128 (a point-to-point or loopback address) connects nothing more.
                if net.prefix_len() < net.max_prefix_len() {
                    self.connected.push(net.trunc());
                }
            }
        }
    }

    /// Why `dst` is refused, if it is; `routed`: a virtual network of the device routes it.
    pub fn check(&self, dst: IpAddr, routed: bool) -> Option<FlowDrop> {
        let dst = canonical(dst);
        let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&dst));
        if within(&self.own) {
            return Some(FlowDrop::HostAddress);
        }
        if within(&self.allowed) {
            return None;
        }
        if within(&LINK_LOCAL) {
            return Some(FlowDrop::LinkLocal);
        }
        if routed {
            return None;
        }
        if within(&self.connected) {
            return Some(FlowDrop::ConnectedNetwork);
        }
        if within(&PRIVATE) {
            return Some(FlowDrop::PrivateRange);
        }
        None
    }
}

/// IPv4-mapped IPv6 addresses reach the IPv4 host they embed, so they are judged as it.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lab() -> Protected {
        let mut p = Protected::new(
            vec![
                "192.0.2.10/32".parse().unwrap(),
                "2001:db8:2:10::/64".parse().unwrap(),
            ],
            vec!["10.20.0.0/16".parse().unwrap()],
        );
        p.set_host(
            &[
                HostAddress {
                    addr: ip("198.51.100.1"),
                    prefix: 24,
                },
                HostAddress {
                    addr: ip("192.0.2.1"),
                    prefix: 24,
                },
                HostAddress {
                    addr: ip("2001:db8:1::1"),
                    prefix: 64,
                },
                HostAddress {
                    addr: ip("127.0.0.1"),
                    prefix: 8,
                },
            ],
            &["2001:db8:4::/64".parse().unwrap()],
        );
        p
    }

    #[test]
    fn the_hosts_own_addresses_are_refused_even_when_allowed_or_routed() {
        let mut p = lab();
        p.allowed.push("198.51.100.0/24".parse().unwrap());
        for a in ["198.51.100.1", "192.0.2.1", "192.0.2.10", "2001:db8:1::1"] {
            assert_eq!(p.check(ip(a), false), Some(FlowDrop::HostAddress), "{a}");
            assert_eq!(p.check(ip(a), true), Some(FlowDrop::HostAddress), "{a}");
        }
        // The whole IPv6 egress prefix is the host's: it answers on every address of it.
        assert_eq!(
            p.check(ip("2001:db8:2:10::77"), false),
            Some(FlowDrop::HostAddress)
        );
        // So is a prefix routed to the host itself.
        assert_eq!(
            p.check(ip("2001:db8:4::9"), false),
            Some(FlowDrop::HostAddress)
        );
        // A mapped address is the IPv4 host it embeds.
        assert_eq!(
            p.check(ip("::ffff:198.51.100.1"), false),
            Some(FlowDrop::HostAddress)
        );
    }

    #[test]
    fn link_local_connected_and_private_are_refused_by_default() {
        let p = lab();
        assert_eq!(
            p.check(ip("169.254.169.254"), false),
            Some(FlowDrop::LinkLocal)
        );
        assert_eq!(p.check(ip("fe80::1"), true), Some(FlowDrop::LinkLocal));
        assert_eq!(
            p.check(ip("198.51.100.12"), false),
            Some(FlowDrop::ConnectedNetwork)
        );
        assert_eq!(
            p.check(ip("2001:db8:1::12"), false),
            Some(FlowDrop::ConnectedNetwork)
        );
        for a in [
            "10.0.0.1",
            "172.20.1.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert_eq!(p.check(ip(a), false), Some(FlowDrop::PrivateRange), "{a}");
        }
        assert_eq!(
            p.check(ip("::ffff:169.254.169.254"), false),
            Some(FlowDrop::LinkLocal)
        );
    }

    #[test]
    fn the_internet_allow_private_and_vnet_routes_pass() {
        let p = lab();
        for a in ["203.0.113.10", "2001:db8:3::10", "8.8.8.8", "172.32.0.1"] {
            assert_eq!(p.check(ip(a), false), None, "{a}");
        }
        assert_eq!(p.check(ip("10.20.3.4"), false), None);
        assert_eq!(
            p.check(ip("10.21.3.4"), false),
            Some(FlowDrop::PrivateRange)
        );
        // A virtual network's route opens private and connected ranges, not the host itself.
        assert_eq!(p.check(ip("10.21.3.4"), true), None);
        assert_eq!(p.check(ip("198.51.100.12"), true), None);
    }

    #[test]
    fn interfaces_follow_changes_and_configured_addresses_stay() {
        let mut p = lab();
        p.set_host(
            &[HostAddress {
                addr: ip("203.0.113.99"),
                prefix: 32,
            }],
            &[],
        );
        assert_eq!(p.check(ip("198.51.100.1"), false), None);
        assert_eq!(
            p.check(ip("203.0.113.99"), false),
            Some(FlowDrop::HostAddress)
        );
        // A /32 connects no network around it.
        assert_eq!(p.check(ip("203.0.113.98"), false), None);
        assert_eq!(
            p.check(ip("192.0.2.10"), false),
            Some(FlowDrop::HostAddress)
        );
    }
}
