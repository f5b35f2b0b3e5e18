//! Test kit of the engine: the builders of the crates below (devices, flows, packets, keys, DNS
//! queries), core settings, and a simulated network ([`sim`]) with a device on the far side.
//!
//! Compiled for this crate's tests and, with the `testkit` feature, for the sim crate
//! (`gateway/sim`); nothing in the gateway uses it.

pub use waygate_dns::testkit::dns_query;
pub use waygate_wg::testkit::*;

use waygate_stages::egress::EgressSettings;

use crate::flow::{FlowLimits, LocalServices};
use crate::gateway::CoreSettings;
use crate::protect::Protected;

pub mod sim;

/// Core settings for the tests: pools 100.96.0.0/16 and fd77:6761:7465::/64, gateway `.1`,
/// [`MTU`], no local services, DNS to the gateway forwarded to [`DNS`], default egress
/// [`EGRESS`], nothing protected, default limits, a fixed random seed.
pub fn core_settings() -> CoreSettings {
    CoreSettings {
        pool_v4: "100.96.0.0/16".parse().expect("pool"),
        pool_v6: "fd77:6761:7465::/64".parse().expect("pool"),
        gateway_v4: GW_V4,
        gateway_v6: GW_V6,
        mtu: MTU,
        local: LocalServices::none(),
        dns_upstream: Some(DNS),
        dns_intercept: false,
        egress: EgressSettings {
            default_ipv4: Some(EGRESS),
            ..EgressSettings::default()
        },
        protected: Protected::default(),
        limits: FlowLimits::default(),
        random_seed: 7,
        http_ports: waygate_config::HttpPorts::List(Vec::new()),
        drop_quic: false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};

    use super::*;

    /// boringtun's `mock-instant` feature is for the sim crate only (`gateway/sim`, a workspace of
    /// its own). Here, and so in the `waygate` binary built by the same `cargo test --workspace`
    /// for the end-to-end tests (one boringtun per invocation), its sessions age in real time.
    #[test]
    fn boringtun_reads_the_real_clock_in_this_workspace() {
        let tunn = |mine: u8, theirs: u8, index| {
            Tunn::new(
                StaticSecret::from(key(mine)),
                PublicKey::from(public(key(theirs))),
                None,
                None,
                index,
                None,
            )
        };
        let (mut a, mut b) = (tunn(1, 2, 1), tunn(2, 1, 2));
        let mut buf = vec![0u8; 2048];
        let mut back = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation")
        };
        let TunnResult::WriteToNetwork(response) = b.decapsulate(None, init, &mut back) else {
            panic!("no response")
        };
        let _ = a.decapsulate(None, response, &mut buf);
        let before = a.time_since_last_handshake().expect("a session");
        std::thread::sleep(Duration::from_millis(20));
        let after = a.time_since_last_handshake().expect("a session");
        assert!(
            after >= before + Duration::from_millis(20),
            "boringtun's clock did not move: built with mock-instant? {before:?} -> {after:?}"
        );
    }
}
