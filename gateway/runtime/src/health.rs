//! Health checks of egress locations: every interval, a TCP connect to the location's target
//! from the location's own address. Results go to the core, which decides what is up.
//!
//! How fast a dead location is left: the egress stage takes a location down after two failed
//! probes in a row, and a failed probe is confirmed by a second one at once instead of a whole
//! interval later. With the default 1 s interval the worst case is the interval (the location
//! dies just after a good probe) plus two probe timeouts: 1 + 2 x 0.7 = 2.4 s, inside the 3 s a
//! device's new flows may take to move (scripts/bench-scale.sh measures it: "egress location
//! gone": 1.60 s with its packets dropped, 2-core lab). A location whose address vanished fails
//! at once (no route/address), so ~1 s there.

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::upstream::connect_from;
use waygate_config::{EgressLocationConfig, HealthCheckConfig};
use waygate_stages::egress::{device_address, Probe};

/// Longest a probe may take. A TCP connect is one round trip (<= 300 ms between continents),
/// and one whose SYN was lost takes a 1 s retransmit, which is failing its users too; 700 ms
/// keeps two failed probes plus the interval under 3 s (module doc).
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

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
    let mut failing = false;
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
        let down = probe == Probe::Down;
        if down && !failing {
            // The first failure is confirmed at once: waiting a whole interval would add it
            // to the time the location's users keep getting dead flows.
            ticks.reset_immediately();
        }
        failing = down;
        if results.send((index, probe)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    /// A port on loopback nothing listens on (bound, then closed).
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        l.local_addr().expect("local addr")
    }

    #[tokio::test]
    async fn a_failed_probe_is_confirmed_at_once_not_an_interval_later() {
        let check = HealthCheckConfig {
            target: closed_port(),
            interval: Duration::from_secs(30),
        };
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(probe_location(
            0,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            check,
            tx,
        ));
        let started = std::time::Instant::now();
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            assert_eq!(got.ok().flatten(), Some((0, Probe::Down)));
        }
        // Two failures take the location down; both came well inside one interval.
        assert!(started.elapsed() < Duration::from_secs(5));
        // Still failing: the third waits for the interval again.
        let third = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(third.is_err(), "a third probe came early: {third:?}");
        task.abort();
    }

    #[tokio::test]
    async fn a_good_location_is_probed_once_per_interval() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let target = listener.local_addr().expect("local addr");
        let accept = tokio::spawn(async move {
            loop {
                if listener.accept().await.is_err() {
                    return;
                }
            }
        });
        let check = HealthCheckConfig {
            target,
            interval: Duration::from_secs(30),
        };
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(probe_location(
            3,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            check,
            tx,
        ));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(first.ok().flatten(), Some((3, Probe::Up(_)))));
        let second = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(
            second.is_err(),
            "a good probe was repeated early: {second:?}"
        );
        task.abort();
        accept.abort();
    }
}
