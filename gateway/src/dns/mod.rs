//! The gateway's resolver: a sans-IO DNS core (parse, policy, cache, name memory) with async
//! upstream and server shells around it.
//!
//! Layers, one way: [`policy`] (the seam the rule engine plugs into) and [`cache`] / [`memory`]
//! (plain data structures) -> [`core`] (the sans-IO [`Resolver`]: bytes and `now` in, bytes and a
//! [`Handled`] out) -> [`upstream`] and [`server`] (tokio shells, the only code here reading the
//! clock or touching sockets).

pub mod batch;
pub mod cache;
pub mod core;
pub mod doh;
pub mod encrypted;
pub mod memory;
pub mod policy;
pub mod rules;
pub mod server;
pub mod upstream;
pub mod wire;

#[cfg(test)]
mod socket_tests;
#[cfg(test)]
mod tests;

pub use self::core::{Handled, Resolver, ResolverConfig, Stats, Ticket, Transport};
pub use memory::Names;
pub use policy::{
    AllowAll, BlockMode, ClientCtx, ClientKey, Decision, DnsPolicy, PolicyVerdict, QueryInfo,
};
pub use server::{DnsServer, ServerConfig, StreamKind, StreamListener, TlsConfigs};
pub use upstream::{Upstream, UpstreamClient, UpstreamError};

/// Fixed origin of the fake clock in tests.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_epoch() -> std::time::Instant {
    std::time::Instant::now()
}
