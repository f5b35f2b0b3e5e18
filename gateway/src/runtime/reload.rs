//! Files the gateway follows while it runs: the rule set, its lists and the GeoIP database.
//! A thread notices changes by modification time and size, loads and compiles the new version
//! off the serving loop, and hands it over whole; a version that fails to load is reported and
//! the running one stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::geoip::GeoIp;
use crate::policy;

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);

/// A newly loaded version of a followed file.
pub enum Reloaded {
    /// The rule set (with its lists).
    Policy(Arc<policy::Loaded>),
    /// The GeoIP database.
    GeoIp(Arc<GeoIp>),
}

/// What identifies a version of a file without reading it.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The files to follow, and their versions when last loaded.
pub struct Followed {
    rules: Option<PathBuf>,
    lists: Option<PathBuf>,
    geoip: Option<PathBuf>,
    stamps: [Stamp; 3],
}

impl Followed {
    /// Loads the configured files now (any failure stops the start) and remembers their
    /// versions.
    pub fn load(
        config: &Config,
    ) -> anyhow::Result<(Followed, Option<policy::Loaded>, Option<GeoIp>)> {
        let mut followed = Followed {
            rules: config.policy.rules.clone(),
            lists: config.policy.lists.clone(),
            geoip: config.geoip.database.clone(),
            stamps: [None, None, None],
        };
        followed.stamps = followed.current();
        let policy = match &followed.rules {
            Some(rules) => {
                Some(policy::load(rules, followed.lists.as_deref()).context("policy.rules")?)
            }
            None => None,
        };
        let geoip = match &followed.geoip {
            Some(path) => Some(GeoIp::open(path).context("geoip.database")?),
            None => None,
        };
        Ok((followed, policy, geoip))
    }

    fn current(&self) -> [Stamp; 3] {
        [&self.rules, &self.lists, &self.geoip].map(|p| p.as_deref().and_then(stamp))
    }

    /// Follows the files until `out` closes.
    pub fn run(mut self, out: mpsc::Sender<Reloaded>) {
        loop {
            std::thread::sleep(POLL);
            if out.is_closed() {
                return;
            }
            let now = self.current();
            let policy_changed = now[0] != self.stamps[0] || now[1] != self.stamps[1];
            if let (true, Some(rules)) = (policy_changed, &self.rules) {
                match policy::load(rules, self.lists.as_deref()) {
                    Ok(p) => {
                        tracing::info!(rules = %rules.display(), "rule set reloaded");
                        if out.blocking_send(Reloaded::Policy(Arc::new(p))).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(rules = %rules.display(), "rule set not reloaded, the previous one stays: {err:#}")
                    }
                }
                self.stamps[0] = now[0];
                self.stamps[1] = now[1];
            }
            if let (true, Some(path)) = (now[2] != self.stamps[2], &self.geoip) {
                match GeoIp::open(path) {
                    Ok(db) => {
                        tracing::info!(database = %path.display(), "GeoIP database reloaded");
                        if out.blocking_send(Reloaded::GeoIp(Arc::new(db))).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(database = %path.display(), "GeoIP database not reloaded, the previous one stays: {err:#}")
                    }
                }
                self.stamps[2] = now[2];
            }
        }
    }
}
