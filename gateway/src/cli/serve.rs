//! `waygate serve`: load the config, start logging, run the gateway.
use std::path::Path;
use std::process::ExitCode;

use waygate_config::Config;

/// Runs `waygate serve`.
pub fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    // Lives until serve returns, so queued lines are flushed (and drops reported) on the way out.
    let _logging = super::logging::init_stderr()?;
    waygate_runtime::serve(config)?;
    Ok(ExitCode::SUCCESS)
}
