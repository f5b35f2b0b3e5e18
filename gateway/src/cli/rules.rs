//! `waygate rules check|eval`.
use std::process::ExitCode;

/// Runs `waygate rules ...`.
pub fn run(_cmd: super::RulesCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
