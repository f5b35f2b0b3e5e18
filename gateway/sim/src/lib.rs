//! Simulation tests of the gateway core with boringtun's clock mocked; see `tests/`.
//!
//! The harness is `waygate_engine::testkit::sim`. This crate is its own workspace so that boringtun's
//! `mock-instant` feature never reaches the `waygate` binary (see `Cargo.toml`).
#![deny(missing_docs)]

use std::time::Duration;

/// Moves boringtun's mocked clock (thread-local: each test thread has its own) by `by`; give it
/// to `Sim::on_advance`.
pub fn advance_boringtun_clock(by: Duration) {
    mock_instant::MockClock::advance(by);
}
