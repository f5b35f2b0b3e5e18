//! The gateway's resolver core, sans IO: parse, policy, cache and name memory.
//!
//! Inputs: query bytes with the asking device and `now`; answers from upstreams. Outputs: answer
//! bytes and a [`Handled`] saying what happened. Polled by the runtime's resolver task, which
//! owns the sockets and the clock (`waygate-runtime`'s `dns` shells).
//!
//! Layers, one way: [`policy`] (the seam the rule engine plugs into) and [`cache`] / [`memory`]
//! (plain data structures) -> [`resolver`] (the sans-IO [`Resolver`]: bytes and `now` in, bytes and a
//! [`Handled`] out).
#![deny(missing_docs)]

pub mod cache;
pub mod loglimit;
pub mod memory;
pub mod policy;
pub mod resolver;
pub mod rules;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod wire;

#[cfg(test)]
mod tests;

pub use memory::Names;
pub use policy::{
    AllowAll, BlockMode, ClientCtx, ClientKey, Decision, DnsPolicy, LogCategories, PolicyVerdict,
    QueryInfo,
};
pub use resolver::{Handled, Resolver, ResolverConfig, Stats, Ticket, Transport};

/// Fixed origin of the fake clock in tests.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) fn test_epoch() -> std::time::Instant {
    std::time::Instant::now()
}
