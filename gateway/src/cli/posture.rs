//! `waygate posture create|list|delete`: device posture rules in Cloudflare's JSON, through the
//! running gateway's API or on the registry (the same checks either way).
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value as Json;

use super::admin::with_admin;
use super::PostureCommand;
use waygate_config::Config;
use waygate_control::ops::Admin;

/// Runs `waygate posture`.
pub fn run(config: Option<&Path>, cmd: PostureCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    // Read before any registry is opened, so a bad file changes nothing.
    let rule = match &cmd {
        PostureCommand::Create { file } => {
            let text =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let value: Json = serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: line {}, column {}: {e}",
                    file.display(),
                    e.line(),
                    e.column()
                )
            })?;
            Some(value)
        }
        _ => None,
    };
    with_admin(&cfg, |ops| run_with(ops, cmd, rule))?;
    Ok(ExitCode::SUCCESS)
}

fn run_with(ops: &dyn Admin, cmd: PostureCommand, rule: Option<Json>) -> anyhow::Result<()> {
    match cmd {
        PostureCommand::Create { file } => {
            let made = ops
                .create_posture_rule(rule.unwrap_or(Json::Null))
                .with_context(|| format!("posture rule {}", file.display()))?;
            let id = made["id"].as_str().unwrap_or_default();
            eprintln!(
                "created posture rule {} ({})",
                made["name"].as_str().unwrap_or_default(),
                made["type"].as_str().unwrap_or_default()
            );
            println!("{id}");
        }
        PostureCommand::List { json } => {
            let rules = ops.posture_rules()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rules)?);
            } else {
                print!("{}", table(&rules));
            }
        }
        PostureCommand::Delete { id } => {
            ops.delete_posture_rule(&id)?;
            eprintln!("deleted posture rule {id}");
        }
    }
    Ok(())
}

fn table(rules: &[Json]) -> String {
    let mut out = format!(
        "{:<36}  {:<24}  {:<16}  {:<8}  {:<10}  INPUT\n",
        "ID", "NAME", "TYPE", "SCHEDULE", "EXPIRATION"
    );
    let text = |v: &Json| v.as_str().unwrap_or_default().to_string();
    for r in rules {
        let expiration = match text(&r["expiration"]) {
            e if e.is_empty() => "-".to_string(),
            e => e,
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<24}  {:<16}  {:<8}  {:<10}  {}",
            text(&r["id"]),
            text(&r["name"]),
            text(&r["type"]),
            text(&r["schedule"]),
            expiration,
            r["input"]
        );
    }
    out
}
