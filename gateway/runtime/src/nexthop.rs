//! Virtual-network routes through a next hop, in the kernel. Two networks may send the same range
//! to different next hops, which one routing table cannot hold: each route gets a table of its
//! own holding just that route, chosen by a policy rule on a firewall mark, and the flows of that
//! route carry the mark on their sockets (what wg-quick does for its default route).
//!
//! Tables and marks are [`TABLE_BASE`] plus the route's position, rule priorities
//! [`PRIORITY_BASE`] plus it (ahead of the main table's 32766, whose default route would
//! otherwise win); everything installed is removed again when the routes change or the gateway
//! stops.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::process::Command;

use ipnet::IpNet;

/// First routing table, firewall mark and rule priority used (wg-quick uses 51820).
pub const TABLE_BASE: u32 = 51900;
/// First rule priority used.
pub const PRIORITY_BASE: u32 = 31000;
/// Most next-hop routes at once.
pub const MAX_ROUTES: u32 = 1000;

/// A route through a next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHopRoute {
    /// Destinations.
    pub cidr: IpNet,
    /// The router they are sent to.
    pub next_hop: IpAddr,
}

/// The next-hop routes installed in the kernel.
#[derive(Debug, Default)]
pub struct NextHops {
    installed: Vec<NextHopRoute>,
    /// Why each installed route failed, if it did.
    failures: Vec<Option<String>>,
}

impl NextHops {
    /// Makes the kernel hold exactly `wanted`; returns each route's mark, or why it could not be
    /// installed. Nothing is touched when `wanted` is what is installed.
    pub fn sync(&mut self, wanted: &[NextHopRoute]) -> Vec<Result<NonZeroU32, String>> {
        if wanted != self.installed.as_slice() {
            self.remove_all();
            self.failures = wanted
                .iter()
                .enumerate()
                .map(|(i, route)| {
                    if i as u32 >= MAX_ROUTES {
                        return Some(format!("more than {MAX_ROUTES} next-hop routes"));
                    }
                    install(route, mark_of(i)).err()
                })
                .collect();
            self.installed = wanted.to_vec();
        }
        self.failures
            .iter()
            .enumerate()
            .map(|(i, failure)| match failure {
                Some(why) => Err(why.clone()),
                None => NonZeroU32::new(mark_of(i)).ok_or_else(|| "no mark".to_string()),
            })
            .collect()
    }

    fn remove_all(&mut self) {
        for (i, route) in self.installed.iter().enumerate() {
            remove(route, mark_of(i));
        }
        self.installed.clear();
        self.failures.clear();
    }
}

impl Drop for NextHops {
    fn drop(&mut self) {
        self.remove_all();
    }
}

fn mark_of(i: usize) -> u32 {
    TABLE_BASE + u32::try_from(i).unwrap_or(MAX_ROUTES).min(MAX_ROUTES)
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn install(route: &NextHopRoute, mark: u32) -> Result<(), String> {
    if route.cidr.addr().is_ipv4() != route.next_hop.is_ipv4() {
        return Err("the next hop's address family differs from the range's".into());
    }
    let fam = family(&route.cidr);
    let (table, prio) = (mark.to_string(), priority_of(mark).to_string());
    let (cidr, via) = (route.cidr.to_string(), route.next_hop.to_string());
    ip(&[fam, "route", "replace", &cidr, "via", &via, "table", &table])?;
    // A stale rule from a gateway that was killed would duplicate; remove it first.
    let _ = ip(&[fam, "rule", "del", "priority", &prio]);
    ip(&[
        fam, "rule", "add", "priority", &prio, "fwmark", &table, "lookup", &table,
    ])
}

fn priority_of(mark: u32) -> u32 {
    PRIORITY_BASE + (mark - TABLE_BASE)
}

fn remove(route: &NextHopRoute, mark: u32) {
    let fam = family(&route.cidr);
    let _ = ip(&[
        fam,
        "rule",
        "del",
        "priority",
        &priority_of(mark).to_string(),
    ]);
    let _ = ip(&[fam, "route", "flush", "table", &mark.to_string()]);
}
