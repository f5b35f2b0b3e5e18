//! Files the gateway follows while it runs: the rule set, its lists, the GeoIP database and the
//! domain categories; and, when the config names no rules file, the rules and lists the admin
//! API keeps in the registry.
//! A thread notices changes by modification time and size (files, every second) or by the
//! registry's policy counter (every 200 ms, so an API write runs within a second), loads and
//! compiles the new version off the serving loop, and hands it over whole; a version that fails
//! to load is reported and the running one stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::mpsc;

use waygate_policy::category_db::{CategoryDb, CategorySource};

use waygate_config::Config;
use waygate_geoip::GeoIp;
use waygate_policy::fields::Stage;
use waygate_registry::Registry;
use waygate_stages::policy;

/// How often the registry's policy counter is looked at.
const POLL: Duration = Duration::from_millis(200);
/// Registry polls per look at the files (once a second).
const POLLS_PER_FILE_CHECK: u32 = 5;

/// Enabled rules in a compiled policy, over every stage.
pub fn rules_in(loaded: &policy::Loaded) -> usize {
    Stage::ALL
        .iter()
        .map(|s| loaded.policy.stage(*s).rules().len())
        .sum()
}

/// The rules and lists the admin API keeps in the registry, and the counter seen last.
struct RegistryRules {
    config: Config,
    registry: Registry,
    counter: u64,
}

impl RegistryRules {
    fn compile(&self) -> anyhow::Result<policy::Loaded> {
        let (set, lists) = waygate_control::rules::registry_policy(&self.config, &self.registry)
            .context("registry rules")?;
        policy::Loaded::compile(&set, &lists).map_err(|errors| {
            let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("registry rules: {}", all.join("; "))
        })
    }
}

/// A newly loaded version of a followed file.
#[derive(Clone)]
pub enum Reloaded {
    /// The rule set (with its lists).
    Policy(Arc<policy::Loaded>),
    /// The GeoIP database.
    GeoIp(Arc<GeoIp>),
    /// The domain categories.
    Categories(Arc<CategoryDb>),
}

/// A followed file, as the reload metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadFile {
    /// `policy.rules` with `policy.lists`.
    Rules,
    /// `geoip.database`.
    GeoIp,
    /// `dns.categories`.
    Categories,
}

impl ReloadFile {
    /// Every followed file.
    pub const ALL: [ReloadFile; 3] = [ReloadFile::Rules, ReloadFile::GeoIp, ReloadFile::Categories];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            ReloadFile::Rules => "rules",
            ReloadFile::GeoIp => "geoip",
            ReloadFile::Categories => "categories",
        }
    }
}

/// Reloads since the start by file, done and failed (the old version stayed), for metrics.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    counts: [[AtomicU64; 2]; ReloadFile::ALL.len()],
}

impl ReloadCounters {
    fn add(&self, file: ReloadFile, ok: bool) {
        self.counts[file as usize][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Reloads of `file` that took effect.
    pub fn done(&self, file: ReloadFile) -> u64 {
        self.counts[file as usize][0].load(Ordering::Relaxed)
    }

    /// Reloads of `file` that failed.
    pub fn failed(&self, file: ReloadFile) -> u64 {
        self.counts[file as usize][1].load(Ordering::Relaxed)
    }
}

/// What identifies a version of a file without reading it.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A category source's version: a file's stamp, or for a directory the newest modification and
/// total size of the files in it and one level below (the UT1 layout).
fn tree_stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return stamp(path);
    }
    let mut newest = meta.modified().ok()?;
    let mut total = 0u64;
    let mut visit = |p: &Path| {
        if let Some((m, len)) = stamp(p) {
            newest = newest.max(m);
            total = total.wrapping_add(len).wrapping_add(1);
        }
    };
    for entry in std::fs::read_dir(path).ok()?.flatten() {
        let p = entry.path();
        visit(&p);
        if p.is_dir() {
            for inner in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                visit(&inner.path());
            }
        }
    }
    Some((newest, total))
}

fn load_categories(sources: &[CategorySource]) -> anyhow::Result<CategoryDb> {
    let (db, warnings) = CategoryDb::load(sources)?;
    for w in warnings {
        tracing::warn!("dns.categories: {w}");
    }
    tracing::info!(domains = db.len(), "domain categories loaded");
    Ok(db)
}

/// The files to follow, and their versions when last loaded.
pub struct Followed {
    rules: Option<PathBuf>,
    lists: Option<PathBuf>,
    geoip: Option<PathBuf>,
    stamps: [Stamp; 3],
    categories: Vec<CategorySource>,
    category_stamps: Vec<Stamp>,
    /// Set when the config names no rules file: the rules come from the registry.
    registry: Option<RegistryRules>,
    /// Enabled rules of the policy last handed over, for `GET /status`.
    rules_loaded: Arc<AtomicUsize>,
}

impl Followed {
    /// Loads the configured files now (any failure stops the start) and remembers their
    /// versions.
    #[allow(clippy::type_complexity)]
    pub fn load(
        config: &Config,
    ) -> anyhow::Result<(
        Followed,
        Option<policy::Loaded>,
        Option<GeoIp>,
        Option<CategoryDb>,
    )> {
        let mut followed = Followed {
            rules: config.policy.rules.clone(),
            lists: config.policy.lists.clone(),
            geoip: config.geoip.database.clone(),
            stamps: [None, None, None],
            categories: config.dns.categories.clone(),
            category_stamps: Vec::new(),
            registry: None,
            rules_loaded: Arc::new(AtomicUsize::new(0)),
        };
        followed.stamps = followed.current();
        followed.category_stamps = followed.current_categories();
        let categories = if followed.categories.is_empty() {
            None
        } else {
            Some(load_categories(&followed.categories).context("dns.categories")?)
        };
        let policy = match &followed.rules {
            Some(rules) => Some(policy::load(rules, followed.lists.as_deref())?),
            None => {
                let registry = Registry::open(&config.data_dir, &config.tunnel)
                    .context("the registry's rules")?;
                let mut source = RegistryRules {
                    config: config.clone(),
                    counter: registry.policy_counter()?,
                    registry,
                };
                let loaded = source.compile()?;
                tracing::info!(
                    rules = rules_in(&loaded),
                    "rules loaded from the registry (managed by the admin API)"
                );
                source.counter = source.registry.policy_counter()?;
                followed.registry = Some(source);
                Some(loaded)
            }
        };
        if let Some(p) = &policy {
            followed.rules_loaded.store(rules_in(p), Ordering::Relaxed);
        }
        let geoip = match &followed.geoip {
            Some(path) => Some(GeoIp::open(path).context("geoip.database")?),
            None => None,
        };
        Ok((followed, policy, geoip, categories))
    }

    /// The count of enabled rules running, kept current by [`Followed::run`].
    pub fn rules_loaded(&self) -> Arc<AtomicUsize> {
        self.rules_loaded.clone()
    }

    /// Recompiles the registry's rules when its policy counter moved; false when `out` closed.
    fn follow_registry(&mut self, out: &mpsc::Sender<Reloaded>) -> bool {
        let Some(source) = &mut self.registry else {
            return true;
        };
        let counter = match source.registry.policy_counter() {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(%err, "cannot read the registry's policy counter");
                return true;
            }
        };
        if counter == source.counter {
            return true;
        }
        source.counter = counter;
        match source.compile() {
            Ok(p) => {
                let n = rules_in(&p);
                tracing::info!(rules = n, "registry rules reloaded");
                self.rules_loaded.store(n, Ordering::Relaxed);
                out.blocking_send(Reloaded::Policy(Arc::new(p))).is_ok()
            }
            Err(err) => {
                tracing::warn!("registry rules not reloaded, the previous ones stay: {err:#}");
                true
            }
        }
    }

    fn current(&self) -> [Stamp; 3] {
        [&self.rules, &self.lists, &self.geoip].map(|p| p.as_deref().and_then(stamp))
    }

    fn current_categories(&self) -> Vec<Stamp> {
        self.categories
            .iter()
            .map(|s| tree_stamp(&s.path))
            .collect()
    }

    /// Follows the files until `out` closes, counting reloads in `counters`.
    pub fn run(mut self, out: mpsc::Sender<Reloaded>, counters: &ReloadCounters) {
        // The first pass returns what the initial load left behind.
        let mut trim = true;
        let mut polls = 0u32;
        loop {
            std::thread::sleep(POLL);
            if out.is_closed() || !self.follow_registry(&out) {
                return;
            }
            polls += 1;
            if polls < POLLS_PER_FILE_CHECK {
                continue;
            }
            polls = 0;
            if std::mem::take(&mut trim) {
                // By now the replaced rules are dropped.
                release_free_memory();
            }
            let now = self.current();
            let policy_changed = now[0] != self.stamps[0] || now[1] != self.stamps[1];
            if let (true, Some(rules)) = (policy_changed, &self.rules) {
                match policy::load(rules, self.lists.as_deref()) {
                    Ok(p) => {
                        counters.add(ReloadFile::Rules, true);
                        tracing::info!(rules = %rules.display(), "rule set reloaded");
                        self.rules_loaded.store(rules_in(&p), Ordering::Relaxed);
                        trim = true;
                        if out.blocking_send(Reloaded::Policy(Arc::new(p))).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        counters.add(ReloadFile::Rules, false);
                        tracing::warn!(rules = %rules.display(), "rule set not reloaded, the previous one stays: {err:#}")
                    }
                }
                self.stamps[0] = now[0];
                self.stamps[1] = now[1];
            }
            if let (true, Some(path)) = (now[2] != self.stamps[2], &self.geoip) {
                match GeoIp::open(path) {
                    Ok(db) => {
                        counters.add(ReloadFile::GeoIp, true);
                        tracing::info!(database = %path.display(), "GeoIP database reloaded");
                        if out.blocking_send(Reloaded::GeoIp(Arc::new(db))).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        counters.add(ReloadFile::GeoIp, false);
                        tracing::warn!(database = %path.display(), "GeoIP database not reloaded, the previous one stays: {err:#}")
                    }
                }
                self.stamps[2] = now[2];
            }
            let now = self.current_categories();
            if now != self.category_stamps {
                // Built here, off the resolver: queries keep the old set until the swap.
                match load_categories(&self.categories) {
                    Ok(db) => {
                        counters.add(ReloadFile::Categories, true);
                        trim = true;
                        if out
                            .blocking_send(Reloaded::Categories(Arc::new(db)))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(err) => {
                        counters.add(ReloadFile::Categories, false);
                        tracing::warn!(
                            "domain categories not reloaded, the previous ones stay: {err:#}"
                        )
                    }
                }
                self.category_stamps = now;
            }
        }
    }
}

/// Hands freed heap pages back to the OS. Loading a large list parses its JSON into strings that
/// are dropped once compiled; glibc keeps such pages mapped, and a million-domain list would
/// otherwise leave its parsing scratch in the gateway's RSS for good.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it has no
    // preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
