//! `waygate admin token create|list|revoke`, and the choice every registry command makes: talk
//! to the running gateway's admin API when its socket `<data_dir>/admin.sock` answers, else open
//! the registry here (no gateway runs). Either way the command runs the control crate's
//! [`Admin`] operations and prints their results with the same code, so the output is the same.
//! `WAYGATE_CLI_DEBUG=1` says on stderr which way was taken.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use waygate_admin::client::Client;
use waygate_config::Config;
use waygate_control::ops::{Admin, Local};
use waygate_registry::{Registry, TokenScope};

use super::{now, TokenCommand};

/// Runs `f` on the running gateway's API, or on the registry when no gateway answers.
pub fn with_admin<R>(
    cfg: &Config,
    f: impl FnOnce(&dyn Admin) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let debug = std::env::var_os("WAYGATE_CLI_DEBUG").is_some_and(|v| v == "1");
    if let Some(client) = Client::if_running(&cfg.data_dir) {
        if debug {
            eprintln!(
                "waygate: via the admin API at {}",
                waygate_admin::socket_path(&cfg.data_dir).display()
            );
        }
        return f(&client);
    }
    let registry = Registry::open(&cfg.data_dir, &cfg.tunnel)?;
    if debug {
        eprintln!("waygate: via the registry at {}", registry.path().display());
    }
    f(&Local {
        config: cfg,
        registry: &registry,
        now: now(),
    })
}

/// Runs `waygate admin token`. Tokens live in the registry, which the CLI opens itself whether
/// or not a gateway runs (the API does not hand out tokens: a token must not mint tokens).
pub fn token(config: Option<&Path>, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let registry = Registry::open(&cfg.data_dir, &cfg.tunnel)?;
    match cmd {
        TokenCommand::Create { read_only, name } => {
            let scope = if read_only {
                TokenScope::Read
            } else {
                TokenScope::Write
            };
            let (secret, token) = waygate_control::tokens::create(
                &registry,
                name.as_deref(),
                scope,
                &mut rand::rngs::OsRng,
                now(),
            )?;
            eprintln!(
                "created {} token {} ({}); it is shown only this once",
                token.scope.as_str(),
                token.prefix,
                token.id
            );
            println!("{secret}");
        }
        TokenCommand::List { json } => {
            let tokens = waygate_control::tokens::list(&registry)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                let mut out = format!(
                    "{:<36}  {:<12}  {:<20}  {:<5}  STATUS\n",
                    "ID", "PREFIX", "NAME", "SCOPE"
                );
                for t in &tokens {
                    let _ = writeln!(
                        out,
                        "{:<36}  {:<12}  {:<20}  {:<5}  {}",
                        t.id,
                        t.prefix,
                        if t.name.is_empty() { "-" } else { &t.name },
                        t.scope.as_str(),
                        if t.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
                print!("{out}");
            }
        }
        TokenCommand::Revoke { token } => {
            let t = waygate_control::tokens::revoke(&registry, &token, now())?;
            eprintln!("revoked token {} ({})", t.prefix, t.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
