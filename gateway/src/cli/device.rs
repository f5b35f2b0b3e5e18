//! `waygate device`.
use std::path::Path;
use std::process::ExitCode;

/// Runs `waygate device`.
pub fn run(_config: Option<&Path>, _cmd: super::DeviceCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
