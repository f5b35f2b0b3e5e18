//! The resolver's tokio shells around the sans-IO core of `waygate-dns`: the UDP, TCP, DoT and DoH
//! servers, and the upstream clients (plain, DoT, DoH). The only DNS code reading the clock or
//! touching sockets.

pub mod batch;
pub mod doh;
pub mod encrypted;
pub mod framing;
pub mod server;
pub mod upstream;

#[cfg(test)]
mod socket_tests;

pub use server::{DnsServer, ServerConfig, StreamKind, StreamListener, TlsConfigs};
pub use upstream::{Upstream, UpstreamClient, UpstreamError};
pub use waygate_dns::*;
