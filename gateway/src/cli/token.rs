//! `waygate token create|list|revoke`: enrollment tokens for `waygate-client enroll`. Tokens
//! live in the registry, which the CLI opens itself whether or not a gateway runs; the token
//! carries the hash of the data dir's CA, which is created here if it does not exist yet.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use waygate_config::Config;
use waygate_control::enrollment::{self, NewEnrollToken};
use waygate_control::time::rfc3339;
use waygate_registry::{Registry, StoredEnrollToken};

use super::{now, EnrollTokenCommand};

/// Runs `waygate token`.
pub fn run(config: Option<&Path>, cmd: EnrollTokenCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    waygate_registry::datadir::ensure_data_dir(&cfg.data_dir)?;
    let registry = Registry::open(&cfg.data_dir, &cfg.tunnel)?;
    let now = now();
    match cmd {
        EnrollTokenCommand::Create {
            email,
            name,
            groups,
            vnet,
            ttl,
            uses,
            json,
        } => {
            let ttl_secs = ttl.as_deref().map(enrollment::parse_ttl).transpose()?;
            #[allow(clippy::disallowed_methods)] // the CLI is a shell
            let wall = std::time::SystemTime::now();
            let ca = waygate_runtime::tls::load_ca(&cfg.data_dir, wall)?;
            let (token, stored) = enrollment::create(
                &registry,
                NewEnrollToken {
                    email,
                    name,
                    groups,
                    vnet,
                    ttl_secs,
                    uses,
                },
                ca.cert_der(),
                &mut rand::rngs::OsRng,
                now,
            )?;
            if json {
                let mut value = serde_json::to_value(&stored)?;
                value["token"] = serde_json::Value::String(token.to_string());
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                eprintln!(
                    "created enrollment token {} for {} ({}, expires {}); it is shown only this once",
                    stored.prefix,
                    stored.email,
                    uses_text(&stored),
                    rfc3339(stored.expires_at)
                );
                println!("{token}");
            }
        }
        EnrollTokenCommand::List { json } => {
            let tokens = enrollment::list(&registry)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                print!("{}", table(&registry, &tokens, now));
            }
        }
        EnrollTokenCommand::Revoke { token } => {
            let t = enrollment::revoke(&registry, &token, now)?;
            eprintln!("revoked enrollment token {} ({})", t.prefix, t.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn uses_text(t: &StoredEnrollToken) -> String {
    if t.uses == 0 {
        format!("{} used, no limit", t.used)
    } else {
        format!("{}/{} used", t.used, t.uses)
    }
}

fn table(registry: &Registry, tokens: &[StoredEnrollToken], now: i64) -> String {
    let mut out = format!(
        "{:<36}  {:<12}  {:<24}  {:<16}  {:<12}  {:<9}  {:<20}  STATUS\n",
        "ID", "PREFIX", "EMAIL", "GROUPS", "VNET", "USES", "EXPIRES"
    );
    for t in tokens {
        let vnet = match &t.vnet_id {
            Some(id) => registry
                .find_vnet(id)
                .map_or_else(|_| id.clone(), |v| v.name),
            None => "-".into(),
        };
        let status = if t.revoked_at.is_some() {
            "revoked"
        } else if now >= t.expires_at {
            "expired"
        } else if t.spent() {
            "used up"
        } else {
            "active"
        };
        let groups = if t.groups.is_empty() {
            "-".to_string()
        } else {
            t.groups.join(",")
        };
        let uses = if t.uses == 0 {
            format!("{}/-", t.used)
        } else {
            format!("{}/{}", t.used, t.uses)
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<12}  {:<24}  {:<16}  {:<12}  {:<9}  {:<20}  {status}",
            t.id,
            t.prefix,
            t.email,
            groups,
            vnet,
            uses,
            rfc3339(t.expires_at)
        );
    }
    out
}
