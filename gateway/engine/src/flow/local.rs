//! The gateway's own services at its tunnel addresses, as data: a table of (protocol, port[, HTTP
//! path prefix]) -> [`LocalService`]. The core consults it for every flow to the gateway and hands
//! matching TCP flows to the runtime as an in-process upstream ([`Command::LocalConnect`]); ports
//! without an entry stay closed.
//!
//! A port whose entries carry path prefixes is an HTTPS port: its service terminates TLS once and
//! routes each request by path, so the DNS over HTTPS endpoint and, later, a device API share 443.
//!
//! [`Command::LocalConnect`]: super::Command::LocalConnect

use std::net::{IpAddr, SocketAddr};

use super::{Protocol, Via};

/// A service the gateway itself runs for devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalService {
    /// DNS over UDP, answered by the resolver ([`super::Command::DnsQuery`]).
    DnsUdp,
    /// Length-prefixed DNS over TCP (RFC 7766).
    DnsTcp,
    /// DNS over TLS (RFC 7858).
    DnsOverTls,
    /// DNS over HTTPS (RFC 8484): an HTTP route of an HTTPS port.
    DnsOverHttps,
    /// The device API: plain HTTP with JSON on its own port ([`DEVICE_API_PORT`]); the tunnel
    /// authenticates the device, so it needs no TLS and no token.
    DeviceApi,
}

/// The device API's TCP port at the gateway's tunnel addresses.
pub const DEVICE_API_PORT: u16 = 80;

impl LocalService {
    /// The transport the service speaks.
    pub fn protocol(self) -> Protocol {
        match self {
            LocalService::DnsUdp => Protocol::Udp,
            LocalService::DnsTcp
            | LocalService::DnsOverTls
            | LocalService::DnsOverHttps
            | LocalService::DeviceApi => Protocol::Tcp,
        }
    }

    /// Whether the service is reached by HTTP path (it needs a path prefix).
    pub fn is_http(self) -> bool {
        self == LocalService::DnsOverHttps
    }
}

/// What a connection to one of the gateway's ports is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalEndpoint {
    /// The one service owning the port.
    Service(LocalService),
    /// TLS terminated once, then each request goes to the port's route for its path
    /// ([`LocalServices::http_routes`]).
    Https {
        /// The port, whose routes apply.
        port: u16,
    },
    /// The HTTP stage's inspector: the runtime connects to the upstream first (the device is
    /// answered only once it answers), then hands both ends to the inspector.
    Inspect(InspectTarget),
}

/// Where an inspected flow's upstream connection goes, as the egress and network stages chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InspectTarget {
    /// Address to connect to.
    pub dst: SocketAddr,
    /// Source address (the egress address); `None` lets the OS choose.
    pub bind: Option<IpAddr>,
    /// A virtual network's private route.
    pub via: Option<Via>,
}

/// One entry of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRoute {
    /// Transport.
    pub protocol: Protocol,
    /// Port at the gateway's tunnel addresses.
    pub port: u16,
    /// For HTTP services: the request paths this route takes (the longest prefix wins).
    pub path_prefix: Option<String>,
    /// Who answers.
    pub service: LocalService,
}

/// Why a route cannot join the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalRouteError {
    /// The service speaks another transport.
    #[error("{service:?} does not speak {protocol:?}")]
    WrongProtocol {
        /// The service.
        service: LocalService,
        /// The route's transport.
        protocol: Protocol,
    },
    /// HTTP services need a path prefix; others must not have one.
    #[error("{service:?} {}", if service.is_http() { "needs an HTTP path prefix" } else { "takes no HTTP path prefix" })]
    PathPrefix {
        /// The service.
        service: LocalService,
    },
    /// The port is taken by a service that does not share it.
    #[error("{protocol:?} port {port} is already taken")]
    PortTaken {
        /// Transport.
        protocol: Protocol,
        /// Port.
        port: u16,
    },
}

/// The port table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalServices {
    routes: Vec<LocalRoute>,
}

impl LocalServices {
    /// No services: every port of the gateway is closed (flows to it are refused).
    pub fn none() -> Self {
        LocalServices::default()
    }

    /// The gateway's resolver: DNS on UDP and TCP 53, DNS over TLS on 853, DNS over HTTPS at
    /// `/dns-query` on 443.
    pub fn resolver() -> Self {
        let mut table = LocalServices::none();
        let routes = [
            (Protocol::Udp, 53, None, LocalService::DnsUdp),
            (Protocol::Tcp, 53, None, LocalService::DnsTcp),
            (Protocol::Tcp, 853, None, LocalService::DnsOverTls),
            (
                Protocol::Tcp,
                443,
                // RFC 8484's path, as every DoH client expects it.
                Some("/dns-query"),
                LocalService::DnsOverHttps,
            ),
        ];
        for (protocol, port, path_prefix, service) in routes {
            let added = table.add(LocalRoute {
                protocol,
                port,
                path_prefix: path_prefix.map(String::from),
                service,
            });
            debug_assert!(added.is_ok(), "the resolver's routes are consistent");
        }
        table
    }

    /// The table plus the device API on TCP [`DEVICE_API_PORT`].
    pub fn with_device_api(mut self) -> Self {
        let added = self.add(LocalRoute {
            protocol: Protocol::Tcp,
            port: DEVICE_API_PORT,
            path_prefix: None,
            service: LocalService::DeviceApi,
        });
        debug_assert!(added.is_ok(), "port 80 is free in the resolver's table");
        self
    }

    /// Adds a route; HTTP routes share their port with other HTTP routes only.
    pub fn add(&mut self, route: LocalRoute) -> Result<(), LocalRouteError> {
        let service = route.service;
        if service.protocol() != route.protocol {
            return Err(LocalRouteError::WrongProtocol {
                service,
                protocol: route.protocol,
            });
        }
        if service.is_http() != route.path_prefix.is_some() {
            return Err(LocalRouteError::PathPrefix { service });
        }
        let clash = self
            .routes
            .iter()
            .filter(|r| r.protocol == route.protocol && r.port == route.port)
            .any(|r| {
                !service.is_http() || r.path_prefix.is_none() || r.path_prefix == route.path_prefix
            });
        if clash {
            return Err(LocalRouteError::PortTaken {
                protocol: route.protocol,
                port: route.port,
            });
        }
        self.routes.push(route);
        Ok(())
    }

    /// Who takes a flow to `port`; `None`: the port is closed.
    pub fn lookup(&self, protocol: Protocol, port: u16) -> Option<LocalEndpoint> {
        let route = self
            .routes
            .iter()
            .find(|r| r.protocol == protocol && r.port == port)?;
        Some(match route.path_prefix {
            Some(_) => LocalEndpoint::Https { port },
            None => LocalEndpoint::Service(route.service),
        })
    }

    /// The HTTP routes of an HTTPS port, as (path prefix, service).
    pub fn http_routes(&self, port: u16) -> impl Iterator<Item = (&str, LocalService)> + '_ {
        self.routes
            .iter()
            .filter(move |r| r.protocol == Protocol::Tcp && r.port == port)
            .filter_map(|r| Some((r.path_prefix.as_deref()?, r.service)))
    }

    /// Every route.
    pub fn routes(&self) -> &[LocalRoute] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        protocol: Protocol,
        port: u16,
        prefix: Option<&str>,
        service: LocalService,
    ) -> LocalRoute {
        LocalRoute {
            protocol,
            port,
            path_prefix: prefix.map(String::from),
            service,
        }
    }

    #[test]
    fn the_resolver_table_names_each_dns_port_and_leaves_the_rest_closed() {
        let t = LocalServices::resolver();
        assert_eq!(
            t.lookup(Protocol::Udp, 53),
            Some(LocalEndpoint::Service(LocalService::DnsUdp))
        );
        assert_eq!(
            t.lookup(Protocol::Tcp, 53),
            Some(LocalEndpoint::Service(LocalService::DnsTcp))
        );
        assert_eq!(
            t.lookup(Protocol::Tcp, 853),
            Some(LocalEndpoint::Service(LocalService::DnsOverTls))
        );
        assert_eq!(
            t.lookup(Protocol::Tcp, 443),
            Some(LocalEndpoint::Https { port: 443 })
        );
        assert_eq!(
            t.http_routes(443).collect::<Vec<_>>(),
            vec![("/dns-query", LocalService::DnsOverHttps)]
        );
        assert_eq!(t.lookup(Protocol::Udp, 443), None);
        assert_eq!(t.lookup(Protocol::Tcp, 80), None);
        assert_eq!(t.lookup(Protocol::Udp, 853), None);
        assert_eq!(LocalServices::none().lookup(Protocol::Udp, 53), None);
        let t = t.with_device_api();
        assert_eq!(
            t.lookup(Protocol::Tcp, DEVICE_API_PORT),
            Some(LocalEndpoint::Service(LocalService::DeviceApi))
        );
        assert_eq!(t.lookup(Protocol::Udp, DEVICE_API_PORT), None);
    }

    #[test]
    fn inconsistent_routes_are_refused() {
        let mut t = LocalServices::resolver();
        assert_eq!(
            t.add(route(Protocol::Udp, 5353, None, LocalService::DnsTcp)),
            Err(LocalRouteError::WrongProtocol {
                service: LocalService::DnsTcp,
                protocol: Protocol::Udp
            })
        );
        assert!(matches!(
            t.add(route(Protocol::Tcp, 8443, None, LocalService::DnsOverHttps)),
            Err(LocalRouteError::PathPrefix { .. })
        ));
        assert!(matches!(
            t.add(route(Protocol::Tcp, 853, Some("/x"), LocalService::DnsTcp)),
            Err(LocalRouteError::PathPrefix { .. })
        ));
        // 853 belongs to DoT alone; 443's path is taken; 443 takes no non-HTTP service.
        assert!(matches!(
            t.add(route(Protocol::Tcp, 853, None, LocalService::DnsTcp)),
            Err(LocalRouteError::PortTaken { port: 853, .. })
        ));
        assert!(matches!(
            t.add(route(
                Protocol::Tcp,
                443,
                Some("/dns-query"),
                LocalService::DnsOverHttps
            )),
            Err(LocalRouteError::PortTaken { port: 443, .. })
        ));
        assert!(matches!(
            t.add(route(Protocol::Tcp, 443, None, LocalService::DnsTcp)),
            Err(LocalRouteError::PortTaken { port: 443, .. })
        ));
        // A second path on 443 shares the port.
        t.add(route(
            Protocol::Tcp,
            443,
            Some("/dns-query-2"),
            LocalService::DnsOverHttps,
        ))
        .expect("a second HTTP route");
        assert_eq!(t.http_routes(443).count(), 2);
    }
}
