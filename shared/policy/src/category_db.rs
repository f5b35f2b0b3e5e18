//! Domain categories: which Cloudflare content and security category ids a domain has, loaded
//! from files an admin provides (no lists ship with Waygate).
//!
//! Sources ([`CategorySource`]) and their formats:
//! - `csv`: one `domain,category_id` per line; a domain in several categories takes several
//!   lines; `#` starts a comment.
//! - `dir`: a directory with one file per category, named by its id (`99` or `99.txt`), one
//!   domain per line.
//! - `ut1`: the UT1 blacklists layout, a directory per category with a `domains` file; the
//!   category names map to Cloudflare ids by [`UT1_CATEGORIES`]; others are skipped with a
//!   warning.
//! - `hosts`: a hosts file (`0.0.0.0 name`, `127.0.0.1 name`) or plain domain lines, every
//!   domain in the one category the source names (threat feeds: 117 Malware, 131 Phishing...).
//!
//! A domain without categories of its own has its nearest parent's ([`CategoryDb::lookup`]).
//! Addresses take categories too: a `csv` line whose first column is an IP address, or a line
//! of a domain file that is an address alone (threat feeds list C2 servers so); the activity
//! logs show them as `ResolvedIPCategoryIDs` ([`CategoryDb::ip_ids`]). Unspecified and loopback
//! addresses alone on a line are a hosts file's leftovers and are skipped.
//! Matching a rule on a parent category against a subcategory is the compiled rules' job.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The security categories (Cloudflare's "security threats", parent 21); every other id is a
/// content category.
pub const SECURITY_CATEGORIES: [u16; 15] = [
    21, 68, 80, 83, 117, 131, 134, 151, 153, 175, 176, 178, 187, 188, 191,
];

/// UT1 category names and the Cloudflare category each maps to.
pub const UT1_CATEGORIES: &[(&str, u16)] = &[
    ("adult", 133),
    ("agressif", 29),
    ("audio-video", 164),
    ("bank", 3),
    ("bitcoin", 183),
    ("chat", 77),
    ("cryptojacking", 83),
    ("dangerous_material", 166),
    ("dating", 84),
    ("ddos", 21),
    ("dialer", 117),
    ("drogue", 87),
    ("financial", 3),
    ("gambling", 99),
    ("games", 100),
    ("hacking", 102),
    ("jobsearch", 113),
    ("lingerie", 125),
    ("malware", 117),
    ("mixed_adult", 2),
    ("phishing", 131),
    ("press", 122),
    ("publicite", 66),
    ("sexual_education", 146),
    ("shopping", 22),
    ("social_networks", 149),
    ("sports", 25),
    ("stalkerware", 153),
    ("vpn", 68),
    ("warez", 17),
    ("webmail", 168),
];

/// How a source's files are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CategoryFormat {
    /// `domain,category_id` lines.
    Csv,
    /// A file of domains per category id.
    Dir,
    /// The UT1 blacklists directory.
    Ut1,
    /// A hosts file (or plain domains), all in the source's `category`.
    Hosts,
}

/// One file or directory of categorized domains.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategorySource {
    /// File or directory.
    pub path: PathBuf,
    /// Its layout.
    pub format: CategoryFormat,
    /// The category of every domain of a `hosts` source.
    #[serde(default)]
    pub category: Option<u16>,
}

/// A source that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CategoryError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not what the format wants.
    #[error("{path}:{line}: {message}")]
    Line {
        /// File.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A `hosts` source without a category.
    #[error("{path}: a hosts source needs `category`")]
    NoCategory {
        /// The source.
        path: PathBuf,
    },
}

/// A non-fatal finding while loading (an unknown UT1 category, an odd line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryWarning(pub String);

impl fmt::Display for CategoryWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A domain's categories, split as the rule fields want them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categories {
    /// Content category ids (`dns.content_category`).
    pub content: Vec<i64>,
    /// Security category ids (`dns.security_category`).
    pub security: Vec<i64>,
}

/// Domains and their categories. Category sets are interned: most domains share a handful.
#[derive(Debug, Default)]
pub struct CategoryDb {
    domains: HashMap<Box<str>, u32>,
    ips: HashMap<IpAddr, u32>,
    sets: Vec<Box<[u16]>>,
    set_index: HashMap<Box<[u16]>, u32>,
}

impl CategoryDb {
    /// An empty database.
    pub fn new() -> CategoryDb {
        CategoryDb::default()
    }

    /// Loads every source; the first unreadable file or bad line is an error naming it.
    pub fn load(
        sources: &[CategorySource],
    ) -> Result<(CategoryDb, Vec<CategoryWarning>), CategoryError> {
        let mut db = CategoryDb::new();
        let mut warnings = Vec::new();
        for source in sources {
            db.load_source(source, &mut warnings)?;
        }
        Ok((db, warnings))
    }

    /// Domains with categories of their own.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// Whether no domain has a category.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Adds `category` to `domain` (lowercased, without a trailing dot).
    pub fn insert(&mut self, domain: &str, category: u16) {
        let domain = normalize(domain);
        if domain.is_empty() {
            return;
        }
        let current = self.domains.get(domain.as_str()).copied();
        if let Some(index) = self.with(current, category) {
            self.domains.insert(domain.into_boxed_str(), index);
        }
    }

    /// Adds `category` to the address `ip`.
    pub fn insert_ip(&mut self, ip: IpAddr, category: u16) {
        let current = self.ips.get(&ip).copied();
        if let Some(index) = self.with(current, category) {
            self.ips.insert(ip, index);
        }
    }

    /// The index of set `current` (or the empty set) with `category` added; `None` when it is
    /// in `current` already.
    fn with(&mut self, current: Option<u32>, category: u16) -> Option<u32> {
        let mut set: Vec<u16> = current
            .map(|i| self.sets[i as usize].to_vec())
            .unwrap_or_default();
        if set.contains(&category) {
            return None;
        }
        set.push(category);
        set.sort_unstable();
        let set: Box<[u16]> = set.into();
        let next = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        let index = *self.set_index.entry(set.clone()).or_insert(next);
        if index == next {
            self.sets.push(set);
        }
        Some(index)
    }

    /// The categories of `fqdn`, or of its nearest parent that has some.
    pub fn lookup(&self, fqdn: &str) -> Categories {
        let mut out = Categories::default();
        for &id in self.ids(fqdn) {
            if SECURITY_CATEGORIES.contains(&id) {
                out.security.push(i64::from(id));
            } else {
                out.content.push(i64::from(id));
            }
        }
        out
    }

    /// The category ids of `fqdn` (or of its nearest parent that has some), content and
    /// security together, sorted; nothing is allocated.
    pub fn ids(&self, fqdn: &str) -> &[u16] {
        let name = fqdn.trim_end_matches('.');
        std::iter::successors(Some(name), |s| s.split_once('.').map(|(_, rest)| rest))
            .find_map(|suffix| self.domains.get(suffix))
            .map_or(&[], |&i| &self.sets[i as usize])
    }

    /// The category ids of the address `ip`, sorted.
    pub fn ip_ids(&self, ip: IpAddr) -> &[u16] {
        if self.ips.is_empty() {
            return &[];
        }
        self.ips.get(&ip).map_or(&[], |&i| &self.sets[i as usize])
    }

    fn load_source(
        &mut self,
        source: &CategorySource,
        warnings: &mut Vec<CategoryWarning>,
    ) -> Result<(), CategoryError> {
        let path = &source.path;
        match source.format {
            CategoryFormat::Csv => {
                let text = read(path)?;
                for (n, line) in text.lines().enumerate() {
                    let line = strip_comment(line);
                    if line.is_empty() {
                        continue;
                    }
                    let bad = |message: String| CategoryError::Line {
                        path: path.clone(),
                        line: n + 1,
                        message,
                    };
                    let (domain, id) = line
                        .split_once(',')
                        .ok_or_else(|| bad(format!("expected domain,category_id, got {line:?}")))?;
                    let id: u16 = id
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("{:?} is no category id", id.trim())))?;
                    if let Ok(ip) = domain.trim().parse::<IpAddr>() {
                        self.insert_ip(ip, id);
                        continue;
                    }
                    check_domain(domain.trim()).map_err(bad)?;
                    self.insert(domain.trim(), id);
                }
            }
            CategoryFormat::Dir => {
                for entry in read_dir(path)? {
                    let file = entry.file_name().to_string_lossy().to_string();
                    let stem = file.strip_suffix(".txt").unwrap_or(&file);
                    let Ok(id) = stem.parse::<u16>() else {
                        warnings.push(CategoryWarning(format!(
                            "{}: not named by a category id, skipped",
                            entry.path().display()
                        )));
                        continue;
                    };
                    self.load_domains(&entry.path(), id, warnings)?;
                }
            }
            CategoryFormat::Ut1 => {
                for entry in read_dir(path)? {
                    let name = entry.file_name().to_string_lossy().to_string();
                    let domains = entry.path().join("domains");
                    if !domains.is_file() {
                        continue;
                    }
                    match UT1_CATEGORIES.iter().find(|(n, _)| *n == name) {
                        Some((_, id)) => self.load_domains(&domains, *id, warnings)?,
                        None => warnings.push(CategoryWarning(format!(
                            "{}: UT1 category {name:?} has no Cloudflare counterpart, skipped",
                            entry.path().display()
                        ))),
                    }
                }
            }
            CategoryFormat::Hosts => {
                let id = source
                    .category
                    .ok_or_else(|| CategoryError::NoCategory { path: path.clone() })?;
                self.load_domains(path, id, warnings)?;
            }
        }
        Ok(())
    }

    /// One domain per line, hosts-file lines accepted; unusable lines are warnings.
    fn load_domains(
        &mut self,
        path: &Path,
        id: u16,
        warnings: &mut Vec<CategoryWarning>,
    ) -> Result<(), CategoryError> {
        let text = read(path)?;
        let mut odd = 0usize;
        for line in text.lines() {
            let line = strip_comment(line);
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or_default();
            let domain = match first.parse::<IpAddr>() {
                Ok(ip) => match words.next() {
                    Some(domain) => domain,
                    // An address alone: a listed address, unless a hosts file's sink.
                    None if !ip.is_unspecified() && !ip.is_loopback() => {
                        self.insert_ip(ip, id);
                        continue;
                    }
                    None => "",
                },
                Err(_) => first,
            };
            if matches!(
                domain,
                "localhost" | "localhost.localdomain" | "broadcasthost"
            ) || check_domain(domain).is_err()
            {
                odd += 1;
                continue;
            }
            self.insert(domain, id);
        }
        if odd > 0 {
            warnings.push(CategoryWarning(format!(
                "{}: {odd} lines without a usable domain skipped",
                path.display()
            )));
        }
        Ok(())
    }
}

fn normalize(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn strip_comment(line: &str) -> &str {
    line.split('#').next().unwrap_or_default().trim()
}

fn check_domain(domain: &str) -> Result<(), String> {
    let d = domain.trim_end_matches('.');
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{domain:?} is no domain"))
    }
}

fn read(path: &Path) -> Result<String, CategoryError> {
    std::fs::read_to_string(path).map_err(|source| CategoryError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_dir(path: &Path) -> Result<Vec<std::fs::DirEntry>, CategoryError> {
    let io = |source| CategoryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn source(path: &Path, format: CategoryFormat, category: Option<u16>) -> CategorySource {
        CategorySource {
            path: path.to_path_buf(),
            format,
            category,
        }
    }

    #[test]
    fn every_format_loads_and_subdomains_inherit() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("cats.csv");
        std::fs::write(
            &csv,
            "# domain,category\ncasino.example,99\nnews.example,122\nnews.example,164\n",
        )
        .unwrap();
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).unwrap();
        std::fs::write(by_id.join("149.txt"), "social.example\n").unwrap();
        std::fs::write(by_id.join("README"), "not a category\n").unwrap();
        let ut1 = dir.path().join("ut1");
        std::fs::create_dir_all(ut1.join("phishing")).unwrap();
        std::fs::create_dir_all(ut1.join("liste_bu")).unwrap();
        std::fs::write(ut1.join("phishing/domains"), "bait.example\n").unwrap();
        std::fs::write(ut1.join("liste_bu/domains"), "library.example\n").unwrap();
        let hosts = dir.path().join("urlhaus.txt");
        std::fs::write(
            &hosts,
            "127.0.0.1 localhost\n0.0.0.0 evil.example # malware\nplain.example\n0.0.0.0\n",
        )
        .unwrap();
        let (db, warnings) = CategoryDb::load(&[
            source(&csv, CategoryFormat::Csv, None),
            source(&by_id, CategoryFormat::Dir, None),
            source(&ut1, CategoryFormat::Ut1, None),
            source(&hosts, CategoryFormat::Hosts, Some(117)),
        ])
        .unwrap();
        assert_eq!(db.lookup("casino.example").content, vec![99]);
        assert_eq!(
            db.lookup("www.casino.example.").content,
            vec![99],
            "inherited"
        );
        assert_eq!(db.lookup("news.example").content, vec![122, 164]);
        assert_eq!(db.lookup("social.example").content, vec![149]);
        assert_eq!(db.lookup("login.bait.example").security, vec![131]);
        assert_eq!(db.lookup("evil.example").security, vec![117]);
        assert_eq!(db.lookup("plain.example").security, vec![117]);
        assert_eq!(db.lookup("unknown.example"), Categories::default());
        assert_eq!(db.lookup("library.example"), Categories::default());
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert_eq!(db.ids("www.news.example"), &[122, 164]);
        assert_eq!(db.ids("unknown.example"), &[] as &[u16]);
    }

    #[test]
    fn addresses_take_categories_from_csv_and_feeds() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("cats.csv");
        std::fs::write(
            &csv,
            "203.0.113.66,117
2001:db8::66,117
203.0.113.66,131
",
        )
        .unwrap();
        let feed = dir.path().join("c2.txt");
        std::fs::write(
            &feed,
            "198.51.100.9
0.0.0.0
127.0.0.1
c2.example
",
        )
        .unwrap();
        let (db, warnings) = CategoryDb::load(&[
            source(&csv, CategoryFormat::Csv, None),
            source(&feed, CategoryFormat::Hosts, Some(80)),
        ])
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(db.ip_ids(ip("203.0.113.66")), &[117, 131]);
        assert_eq!(db.ip_ids(ip("2001:db8::66")), &[117]);
        assert_eq!(db.ip_ids(ip("198.51.100.9")), &[80]);
        assert_eq!(db.ip_ids(ip("0.0.0.0")), &[] as &[u16]);
        assert_eq!(db.ip_ids(ip("203.0.113.67")), &[] as &[u16]);
        assert_eq!(db.ids("c2.example"), &[80]);
        assert_eq!(warnings.len(), 1, "the two sinks: {warnings:?}");
        assert!(CategoryDb::new().ip_ids(ip("203.0.113.66")).is_empty());
    }

    #[test]
    fn bad_input_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("cats.csv");
        std::fs::write(&csv, "ok.example,99\nbad.example,ninety\n").unwrap();
        let err = CategoryDb::load(&[source(&csv, CategoryFormat::Csv, None)]).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("cats.csv:2: \"ninety\" is no category id"),
            "{err}"
        );
        let err = CategoryDb::load(&[source(&csv, CategoryFormat::Hosts, None)]).unwrap_err();
        assert!(err.to_string().contains("needs `category`"), "{err}");
        let missing = dir.path().join("missing");
        assert!(CategoryDb::load(&[source(&missing, CategoryFormat::Ut1, None)]).is_err());
    }

    #[test]
    fn category_sets_are_shared() {
        let mut db = CategoryDb::new();
        for i in 0..1000 {
            db.insert(&format!("d{i}.example"), 99);
        }
        db.insert("both.example", 99);
        db.insert("both.example", 8);
        assert_eq!(db.sets.len(), 2);
        assert_eq!(db.lookup("both.example").content, vec![8, 99]);
    }

    proptest! {
        #[test]
        fn hostile_files_never_panic(text in "\\PC{0,300}") {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("f");
            std::fs::write(&f, &text).unwrap();
            let _ = CategoryDb::load(&[source(&f, CategoryFormat::Csv, None)]);
            if let Ok((db, _)) = CategoryDb::load(&[source(&f, CategoryFormat::Hosts, Some(117))]) {
                let _ = db.lookup(&text);
            }
        }
    }
}
