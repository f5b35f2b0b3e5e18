//! The sans-IO engine: device packets in, flows, stage decisions and packets for devices out.
//!
//! Inputs: datagrams from the WireGuard socket, upstream events (connected, data, closed) and
//! `now`, all handed in by the runtime. Outputs: datagrams for the socket and [`flow::Command`]s
//! for the runtime to carry out (connect, send, open a UDP socket, ask the resolver). The runtime
//! polls [`GatewayCore`] from one task; nothing here does I/O or reads the clock.
//!
//! Data flows one way: [`waygate_wg`] (datagrams to IP packets) -> [`flow`] (packets to flows) ->
//! stages ([`waygate_stages`], with [`protect`] and [`vnet`] routing) -> commands for the egress.
#![deny(missing_docs)]

pub mod flow;
pub mod gateway;
pub mod protect;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod vnet;

pub use gateway::{CoreSettings, GatewayCore};
