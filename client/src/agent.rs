//! The agent the tunnel daemon runs on its own thread once the tunnel is up: it fetches the
//! device's profile, collects the facts the posture rules ask for, sends them to the gateway
//! (which decides), and publishes what the daemon reports in `status`: the virtual network and
//! each check's verdict.
//!
//! Every report carries the facts of every rule (the gateway evaluates them all, and a rule
//! without its fact fails), so all checks run together on the shortest schedule among them;
//! the profile is read again each round, so new rules and a changed virtual network are seen
//! within one schedule. With no rules it reads the profile every [`IDLE_REFRESH`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::device_api::{Api, DeviceApi};
use crate::posture::Host;

/// How often the profile is read when it has no posture checks.
pub const IDLE_REFRESH: Duration = Duration::from_secs(60);
/// First wait after a failed round (the tunnel may be re-handshaking); doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest wait after failed rounds.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a wait looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

/// What the agent publishes after each successful round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The device's virtual network (name); `None`: the default network.
    pub vnet: Option<String>,
    /// Each posture check's verdict, by check id, as the gateway decided it.
    pub posture: BTreeMap<String, bool>,
}

/// Runs the agent for the client in `dir` until `stop` is set, calling `publish` after each
/// round. Blocks; the daemon starts it on a thread of its own once the tunnel is up:
///
/// ```ignore
/// let stop = Arc::new(AtomicBool::new(false));
/// let flag = stop.clone();
/// std::thread::spawn(move || agent::run(&dir, &flag, |report| state.lock().report = report));
/// ```
pub fn run(dir: &Path, stop: &AtomicBool, publish: impl FnMut(Report)) -> anyhow::Result<()> {
    let api = DeviceApi::for_dir(dir)?;
    run_with(&api, &Host::real(), stop, publish, |d| {
        sleep_unless(stop, d)
    });
    Ok(())
}

/// Sleeps `d`, or less once `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let step = left.min(STOP_POLL);
        std::thread::sleep(step);
        left -= step;
    }
}

/// One round: the profile, the facts, the gateway's verdicts; and how long until the next.
pub fn round(api: &dyn Api, host: &Host) -> anyhow::Result<(Report, Duration)> {
    let profile = api.profile()?;
    let rules = profile.linux_checks();
    let mut report = Report {
        vnet: profile.vnet.clone(),
        posture: BTreeMap::new(),
    };
    let Some(every) = rules.iter().map(|r| r.schedule_secs()).min() else {
        return Ok((report, IDLE_REFRESH));
    };
    let facts = host.facts(&rules);
    for (check, result) in api.report(&facts)? {
        report.posture.insert(check, result.passed);
    }
    Ok((report, Duration::from_secs(every)))
}

/// [`run`] with its API, host and waiting given (tests).
pub fn run_with(
    api: &dyn Api,
    host: &Host,
    stop: &AtomicBool,
    mut publish: impl FnMut(Report),
    mut wait: impl FnMut(Duration),
) {
    let mut retry = RETRY_MIN;
    while !stop.load(Ordering::Relaxed) {
        match round(api, host) {
            Ok((report, next)) => {
                publish(report);
                retry = RETRY_MIN;
                wait(next);
            }
            Err(e) => {
                eprintln!("waygate-client: posture round failed (next try in {retry:?}): {e:#}");
                wait(retry);
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_api::{CheckResult, Profile};
    use std::cell::RefCell;
    use waygate_posture::Facts;

    /// A gateway that evaluates the file rule itself, and fails its first profile request.
    struct Fake {
        calls: RefCell<usize>,
        reports: RefCell<Vec<Facts>>,
    }

    impl Api for Fake {
        fn profile(&self) -> anyhow::Result<Profile> {
            *self.calls.borrow_mut() += 1;
            if *self.calls.borrow() == 1 {
                anyhow::bail!("tunnel not up yet");
            }
            Ok(serde_json::from_value(serde_json::json!({
                "device_id": "d", "name": "laptop", "vnet": "office",
                "posture_checks": [{"id": "agent", "name": "agent", "type": "file",
                    "schedule": "2m", "match": [{"platform": "linux"}],
                    "input": {"path": "/etc/agent.conf"}},
                    {"id": "slow", "name": "s", "type": "client_version", "schedule": "10m",
                    "input": {"version": "0.0.1", "operator": ">="}}]
            }))?)
        }

        fn report(&self, facts: &Facts) -> anyhow::Result<BTreeMap<String, CheckResult>> {
            self.reports.borrow_mut().push(facts.clone());
            let rules = self.profile()?.linux_checks();
            Ok(rules
                .iter()
                .map(|r| {
                    let env = waygate_posture::Env {
                        now: 0,
                        serials: &|_| None,
                        ca: &|_| None,
                    };
                    let v = waygate_posture::evaluate(r, facts, &env);
                    let result = CheckResult {
                        name: r.name.clone(),
                        passed: v.passed,
                        reason: v.reason,
                        expires_at: 0,
                    };
                    (r.id.clone(), result)
                })
                .collect())
        }
    }

    #[test]
    fn the_agent_retries_reports_on_the_shortest_schedule_and_publishes_verdicts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let host = Host::at(tmp.path());
        let api = Fake {
            calls: RefCell::new(0),
            reports: RefCell::new(Vec::new()),
        };
        let stop = AtomicBool::new(false);
        let mut published = Vec::new();
        let mut waits = Vec::new();
        run_with(
            &api,
            &host,
            &stop,
            |r| published.push(r),
            |d| {
                waits.push(d);
                // The file appears after the second wait; stop after the third round.
                if waits.len() == 2 {
                    std::fs::create_dir_all(tmp.path().join("etc")).expect("etc");
                    std::fs::write(tmp.path().join("etc/agent.conf"), "x").expect("file");
                }
                if waits.len() == 3 {
                    stop.store(true, Ordering::Relaxed);
                }
            },
        );
        assert_eq!(
            waits,
            [
                RETRY_MIN,
                Duration::from_secs(120),
                Duration::from_secs(120)
            ]
        );
        assert_eq!(published.len(), 2);
        assert_eq!(published[0].vnet.as_deref(), Some("office"));
        assert_eq!(published[0].posture.get("agent"), Some(&false));
        assert_eq!(published[1].posture.get("agent"), Some(&true));
        assert_eq!(published[1].posture.get("slow"), Some(&true));
        let sent = api.reports.borrow();
        assert_eq!(sent[0].platform, "linux");
        assert_eq!(sent[0].files.len(), 1);
        assert!(!sent[0].files[0].exists && sent[1].files[0].exists);
    }
}
