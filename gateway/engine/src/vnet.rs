//! Virtual networks in the data plane: each network's private routes, looked up for every new
//! flow of a device in that network. The longest matching prefix wins; a flow no route covers
//! goes to the Internet through the egress stage.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::flow::Via;

/// One private route, resolved to how its flows leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnetRoute {
    /// Destinations.
    pub cidr: IpNet,
    /// Interface name or next hop, for logs.
    pub via: String,
    /// How its sockets are set up.
    pub path: Via,
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
    use std::num::NonZeroU32;

    fn route(cidr: &str, via: &str, index: u32) -> VnetRoute {
        VnetRoute {
            cidr: cidr.parse().unwrap(),
            via: via.into(),
            path: Via::Interface(NonZeroU32::new(index).unwrap()),
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
            routes.route(Some("a"), dst).map(|r| r.via.as_str()),
            Some("site-a")
        );
        assert_eq!(
            routes.route(Some("b"), dst).map(|r| r.via.as_str()),
            Some("site-b")
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
