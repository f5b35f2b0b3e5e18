//! `waygate geoip build|lookup`: write a MaxMind database from CSV, and look addresses up in one.
use std::fs::File;
use std::io::{BufReader, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use super::GeoipCommand;
use waygate_config::Config;
use waygate_geoip::GeoIp;

/// Runs a `waygate geoip` subcommand.
pub fn run(config: Option<&Path>, cmd: GeoipCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GeoipCommand::Build { csv, out } => build(&csv, &out),
        GeoipCommand::Lookup { database, ips } => {
            let database = match database {
                Some(d) => d,
                None => Config::load(config)?
                    .geoip
                    .database
                    .context("no database: pass --database or set geoip.database in the config")?,
            };
            lookup(&database, &ips)
        }
    }
}

fn build(csv: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    let input = File::open(csv).with_context(|| format!("cannot open {}", csv.display()))?;
    let bytes = waygate_geoip::build_from_csv(BufReader::new(input))
        .with_context(|| format!("{}", csv.display()))?;
    // Written beside the target and renamed over it, so a gateway reloading the database never
    // reads half a file.
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(&bytes)?;
    tmp.persist(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(ExitCode::SUCCESS)
}

fn lookup(database: &Path, ips: &[IpAddr]) -> anyhow::Result<ExitCode> {
    let db = GeoIp::open(database)?;
    for ip in ips {
        let geo = db.lookup(*ip);
        let show =
            |c: Option<waygate_geoip::Code>| c.map_or_else(|| "-".to_string(), |c| c.to_string());
        println!("{ip} {} {}", show(geo.country), show(geo.continent));
    }
    Ok(ExitCode::SUCCESS)
}
