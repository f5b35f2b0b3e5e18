//! `waygate serve`.
use std::path::Path;
use std::process::ExitCode;

/// Runs `waygate serve`.
pub fn run(_config: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
