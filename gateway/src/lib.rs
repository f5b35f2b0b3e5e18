//! The Waygate gateway: WireGuard endpoint, flow table, policy stages, egress, registry and CLI.
//!
//! Data flows one way: `wg` (datagrams to IP packets) -> `flow` (packets to flows) -> stages ->
//! `egress` (flows to upstream sockets). Only `runtime` touches sockets, files and the clock.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod core;
pub mod datadir;
pub mod dns;
pub mod egress;
pub mod flow;
pub mod geoip;
pub mod handshake_limit;
pub mod loglimit;
pub mod policy;
pub mod protect;
pub mod registry;
pub mod runtime;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tls;
pub mod transmit;
pub mod uapi;
pub mod vnet;
pub mod wg;
