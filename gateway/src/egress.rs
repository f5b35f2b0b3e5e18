//! The egress stage: which source address a flow's upstream connection leaves from.
//!
//! Today every flow leaves from the configured default address of its family (or the OS's
//! choice). Egress policies plug in here: one function from the flow context to a source.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::FlowCtx;

/// Egress addresses from the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressSettings {
    /// Source of IPv4 upstream connections; `None`: the OS picks.
    pub default_ipv4: Option<Ipv4Addr>,
    /// Source of IPv6 upstream connections; `None`: the OS picks.
    pub default_ipv6: Option<Ipv6Addr>,
}

/// Chooses the source address for a flow going to `upstream`; `None` lets the OS choose.
pub fn select_source(
    _ctx: &FlowCtx,
    upstream: IpAddr,
    settings: &EgressSettings,
) -> Option<IpAddr> {
    match upstream {
        IpAddr::V4(_) => settings.default_ipv4.map(IpAddr::V4),
        IpAddr::V6(_) => settings.default_ipv6.map(IpAddr::V6),
    }
}
