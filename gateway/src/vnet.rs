//! Virtual networks in the data plane: each network's private routes, looked up for every new
//! flow of a device in that network. The longest matching prefix wins; a flow no route covers
//! goes to the Internet through the egress stage.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;

use ipnet::IpNet;

/// One private route, resolved to the interface it leaves through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnetRoute {
    /// Destinations.
    pub cidr: IpNet,
    /// Interface name, for logs.
    pub via: String,
    /// Interface index, for binding sockets.
    pub ifindex: NonZeroU32,
}

/// The routes of every virtual network.
#[derive(Debug, Clone, Default)]
pub struct VnetRoutes {
    by_vnet: HashMap<String, Vec<VnetRoute>>,
}

impl VnetRoutes {
    /// Routes keyed by virtual network id; each list is kept longest prefix first.
    pub fn new(mut by_vnet: HashMap<String, Vec<VnetRoute>>) -> Self {
        for routes in by_vnet.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.cidr.prefix_len()));
        }
        VnetRoutes { by_vnet }
    }

    /// Whether any network has a route to `dst`.
    pub fn covers(&self, dst: IpAddr) -> bool {
        self.by_vnet
            .values()
            .flatten()
            .any(|r| r.cidr.contains(&dst))
    }

    /// The route a flow of a device in `vnet` to `dst` takes, if any.
    pub fn route(&self, vnet: Option<&str>, dst: IpAddr) -> Option<&VnetRoute> {
        self.by_vnet
            .get(vnet?)?
            .iter()
            .find(|r| r.cidr.contains(&dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(cidr: &str, via: &str, index: u32) -> VnetRoute {
        VnetRoute {
            cidr: cidr.parse().unwrap(),
            via: via.into(),
            ifindex: NonZeroU32::new(index).unwrap(),
        }
    }

    #[test]
    fn the_same_range_leads_to_each_networks_own_site() {
        let routes = VnetRoutes::new(HashMap::from([
            ("a".to_string(), vec![route("198.18.0.0/16", "site-a", 7)]),
            (
                "b".to_string(),
                vec![
                    route("198.18.0.0/16", "site-b", 8),
                    route("198.18.5.0/24", "site-b2", 9),
                ],
            ),
        ]));
        let dst: IpAddr = "198.18.0.10".parse().unwrap();
        assert_eq!(
            routes.route(Some("a"), dst).map(|r| r.ifindex.get()),
            Some(7)
        );
        assert_eq!(
            routes.route(Some("b"), dst).map(|r| r.ifindex.get()),
            Some(8)
        );
        let deeper: IpAddr = "198.18.5.1".parse().unwrap();
        assert_eq!(
            routes.route(Some("b"), deeper).map(|r| r.via.as_str()),
            Some("site-b2"),
            "longest prefix"
        );
        assert_eq!(
            routes.route(None, dst),
            None,
            "the default network has no routes"
        );
        assert_eq!(routes.route(Some("c"), dst), None);
        assert_eq!(
            routes.route(Some("a"), "203.0.113.10".parse().unwrap()),
            None
        );
    }
}
