//! Health checks of egress locations: every interval, a TCP connect to the location's target
//! from the location's own address. Results go to the core, which decides what is up.

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::upstream::connect_from;
use waygate_config::{EgressLocationConfig, HealthCheckConfig};
use waygate_stages::egress::{device_address, Probe};

/// Longest a probe may take: a location that cannot connect within a second is failing its
/// users too.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts one probing task per location that has a health check.
pub fn spawn_probes(locations: &[EgressLocationConfig], results: mpsc::Sender<(usize, Probe)>) {
    for (index, location) in locations.iter().enumerate() {
        let Some(check) = location.health_check else {
            continue;
        };
        let source = match check.target.ip() {
            IpAddr::V4(_) => location.ipv4.first().map(|a| IpAddr::V4(*a)),
            IpAddr::V6(_) => location
                .ipv6
                .map(|p| IpAddr::V6(device_address(p, "waygate-health-check"))),
        };
        let Some(source) = source else {
            tracing::warn!(
                location = %location.name,
                target = %check.target,
                "egress location has no address of the health-check target's family; not probed"
            );
            continue;
        };
        tokio::spawn(probe_location(index, source, check, results.clone()));
    }
}

async fn probe_location(
    index: usize,
    source: IpAddr,
    check: HealthCheckConfig,
    results: mpsc::Sender<(usize, Probe)>,
) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let timeout = check.interval.min(PROBE_TIMEOUT);
        let probe = match connect_from(check.target, Some(source), None, timeout).await {
            Ok(_) => Probe::Up(started.elapsed()),
            Err(err) => {
                tracing::debug!(%source, target = %check.target, %err, "egress health probe failed");
                Probe::Down
            }
        };
        if results.send((index, probe)).await.is_err() {
            return;
        }
    }
}
