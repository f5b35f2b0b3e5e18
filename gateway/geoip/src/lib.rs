//! Geolocation of addresses: country and continent codes from a MaxMind database (GeoLite2 or
//! GeoIP2, Country or City), and the writer behind `waygate geoip build` that turns
//! `network,country,continent` lines into such a database (for private ranges and for tests).
//!
//! Codes are what policy fields compare: ISO 3166-1 alpha-2 countries and the continent codes
//! AF AN AS EU NA OC SA, with `T1` standing for Tor as Cloudflare writes it.
//!
//! Inputs: a database file (read whole when opened) and addresses. Outputs: a [`Geo`] per
//! address. The stages and the resolver look addresses up for each decision; the runtime opens
//! (and reopens) the file.

use std::fmt;
use std::io::BufRead;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Serialize;

/// Continent codes a database may carry.
pub const CONTINENTS: [&str; 8] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA", "T1"];

/// A two-letter code (country or continent), stored inline so lookups do not allocate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code([u8; 2]);

impl Code {
    /// Parses a two-letter code, upper-casing it; anything else is `None`.
    pub fn parse(s: &str) -> Option<Code> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => {
                Some(Code([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII alphanumerics by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geo {
    /// Country, when the database knows it.
    pub country: Option<Code>,
    /// Continent, when the database knows it.
    pub continent: Option<Code>,
}

/// An open database.
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata().database_type)
            .field("build_epoch", &self.reader.metadata().build_epoch)
            .finish()
    }
}

/// Why a database could not be opened or built; each message names the file or the line.
#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    /// The file is unreadable.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The OS's reason.
        reason: std::io::Error,
    },
    /// The bytes are not a MaxMind database.
    #[error("{what} is not a MaxMind database: {reason}")]
    NotMaxMind {
        /// The file, or "the input".
        what: String,
        /// The reader's reason.
        reason: String,
    },
    /// A line of the CSV input is wrong.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The CSV input holds no network.
    #[error("no networks in the input")]
    Empty,
    /// The database could not be written.
    #[error("cannot write the database: {0}")]
    Write(String),
}

impl GeoIp {
    /// Opens the database at `path`.
    pub fn open(path: &Path) -> Result<GeoIp, GeoIpError> {
        let bytes = std::fs::read(path).map_err(|reason| GeoIpError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        GeoIp::from_bytes(bytes).map_err(|e| match e {
            GeoIpError::NotMaxMind { reason, .. } => GeoIpError::NotMaxMind {
                what: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Opens a database held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GeoIp, GeoIpError> {
        let reader = maxminddb::Reader::from_source(bytes).map_err(|e| GeoIpError::NotMaxMind {
            what: "the input".to_string(),
            reason: e.to_string(),
        })?;
        Ok(GeoIp { reader })
    }

    /// The database's type as its metadata names it (`GeoLite2-Country`, ...).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// Country and continent of `ip`; unknown parts are `None`.
    pub fn lookup(&self, ip: IpAddr) -> Geo {
        let Ok(found) = self.reader.lookup(ip) else {
            return Geo::default();
        };
        // City databases have the same `country` and `continent` maps, so one shape reads both.
        match found.decode::<maxminddb::geoip2::Country<'_>>() {
            Ok(Some(record)) => Geo {
                country: record.country.iso_code.and_then(Code::parse),
                continent: record.continent.code.and_then(Code::parse),
            },
            _ => Geo::default(),
        }
    }
}

#[derive(Serialize)]
struct CountryRecord<'a> {
    iso_code: &'a str,
}

#[derive(Serialize)]
struct ContinentRecord<'a> {
    code: &'a str,
}

/// The part of a GeoIP2 Country record that `GeoIp::lookup` (and any GeoIP2 reader) uses.
#[derive(Serialize)]
struct Record<'a> {
    country: CountryRecord<'a>,
    continent: ContinentRecord<'a>,
}

/// Builds a database from `network,country,continent` lines (CIDR or single address; `#`
/// comments, blank lines and a header line are skipped). Errors name the line.
pub fn build_from_csv(input: impl BufRead) -> Result<Vec<u8>, GeoIpError> {
    let mut writer = mmdb_writer::Writer::new("Waygate-GeoIP2-Country");
    let mut networks = 0usize;
    for (index, line) in input.lines().enumerate() {
        let n = index + 1;
        let bad = |message: String| GeoIpError::Line { line: n, message };
        let line = line.map_err(|e| bad(format!("cannot read: {e}")))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [network, country, continent] = fields[..] else {
            return Err(bad(format!(
                "expected `network,country,continent`, found {} field(s)",
                fields.len()
            )));
        };
        if n == 1 && network.eq_ignore_ascii_case("network") {
            continue;
        }
        let net: IpNet = match network.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match network.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(bad(format!(
                        "`{network}` is not a network (CIDR) or an address"
                    )))
                }
            },
        };
        let country = Code::parse(country)
            .ok_or_else(|| bad(format!("`{country}` is not a two-letter country code")))?;
        let continent_code = Code::parse(continent).filter(|c| CONTINENTS.contains(&c.as_str()));
        let Some(continent) = continent_code else {
            return Err(bad(format!(
                "`{continent}` is not a continent code (one of {})",
                CONTINENTS.join(" ")
            )));
        };
        let record = Record {
            country: CountryRecord {
                iso_code: country.as_str(),
            },
            continent: ContinentRecord {
                code: continent.as_str(),
            },
        };
        writer
            .insert(net, &record)
            .map_err(|e| bad(format!("cannot add {net}: {e}")))?;
        networks += 1;
    }
    if networks == 0 {
        return Err(GeoIpError::Empty);
    }
    writer
        .to_bytes()
        .map_err(|e| GeoIpError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = "\
network,country,continent
# the lab's ranges
198.51.100.0/25,US,NA
198.51.100.128/25,DE,EU
203.0.113.0/24,JP,AS
203.0.113.66,T1,T1
2001:db8:3::/48,BR,SA
";

    fn lab() -> GeoIp {
        GeoIp::from_bytes(build_from_csv(LAB.as_bytes()).unwrap()).unwrap()
    }

    fn geo(country: &str, continent: &str) -> Geo {
        Geo {
            country: Code::parse(country),
            continent: Code::parse(continent),
        }
    }

    #[test]
    fn built_databases_answer_for_both_families() {
        let db = lab();
        assert_eq!(db.lookup("198.51.100.11".parse().unwrap()), geo("US", "NA"));
        assert_eq!(
            db.lookup("198.51.100.200".parse().unwrap()),
            geo("DE", "EU")
        );
        assert_eq!(db.lookup("203.0.113.10".parse().unwrap()), geo("JP", "AS"));
        assert_eq!(
            db.lookup("2001:db8:3::10".parse().unwrap()),
            geo("BR", "SA")
        );
        assert_eq!(db.database_type(), "Waygate-GeoIP2-Country");
    }

    #[test]
    fn a_more_specific_network_wins_and_tor_is_t1() {
        let db = lab();
        assert_eq!(db.lookup("203.0.113.66".parse().unwrap()), geo("T1", "T1"));
        assert_eq!(db.lookup("203.0.113.67".parse().unwrap()), geo("JP", "AS"));
    }

    #[test]
    fn unknown_addresses_have_no_geo() {
        let db = lab();
        assert_eq!(db.lookup("192.0.2.1".parse().unwrap()), Geo::default());
        assert_eq!(db.lookup("2001:db8:9::1".parse().unwrap()), Geo::default());
    }

    #[test]
    fn bad_lines_are_errors_that_name_the_line() {
        let cases = [
            ("198.51.100.0/24,US\n", "line 1: expected"),
            (
                "# c\n198.51.100.0/33,US,NA\n",
                "line 2: `198.51.100.0/33` is not a network",
            ),
            (
                "198.51.100.0/24,USA,NA\n",
                "line 1: `USA` is not a two-letter country",
            ),
            (
                "198.51.100.0/24,US,XX\n",
                "line 1: `XX` is not a continent code",
            ),
            ("# nothing\n\n", "no networks"),
        ];
        for (input, want) in cases {
            let err = build_from_csv(input.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn codes_are_upper_cased_and_checked() {
        assert_eq!(Code::parse("us").map(|c| c.to_string()), Some("US".into()));
        assert_eq!(Code::parse("U"), None);
        assert_eq!(Code::parse("U-"), None);
        assert_eq!(Code::parse("ÜS"), None);
    }

    #[test]
    fn garbage_is_not_a_database() {
        assert!(GeoIp::from_bytes(b"not a database".to_vec()).is_err());
        assert!(GeoIp::from_bytes(Vec::new()).is_err());
    }
}
