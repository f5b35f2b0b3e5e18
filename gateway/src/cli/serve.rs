//! `waygate serve`: load the config, start logging, run the gateway.
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;

use crate::config::Config;

/// Runs `waygate serve`.
pub fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let filter = EnvFilter::try_from_env("WAYGATE_LOG")
        .or_else(|_| EnvFilter::try_new("info"))
        .context("invalid WAYGATE_LOG filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    crate::runtime::serve(config)?;
    Ok(ExitCode::SUCCESS)
}
