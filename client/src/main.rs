//! `waygate-client`: the device side of Waygate.
//!
//! `enroll` makes the device's WireGuard key pair here, sends only the public key with an
//! enrollment token to the gateway's enrollment listener (TLS trusted by the CA hash inside the
//! token) and writes `client.toml` and `private.key` into its directory; `status` reports from
//! those files. Bringing the tunnel up is not built yet.
//!
//! Inputs: the command line, the token (argument or file), the gateway's answer. Outputs: the
//! files in `--dir`, lines on stdout/stderr, the exit code. Nothing polls it.
#![deny(missing_docs)]

#[allow(dead_code)] // `agent::run` is started by the tunnel daemon (client/src/main.rs daemon)
mod agent;
mod device_api;
mod enroll;
mod pin;
mod posture;
mod state;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use waygate_keys::{EnrollToken, PrivateKey};

/// Command line of `waygate-client`.
#[derive(Parser)]
#[command(name = "waygate-client", version, about = "Waygate device client")]
struct Cli {
    /// The client's directory (config and private key).
    #[arg(long, global = true, value_name = "DIR", default_value = state::DEFAULT_DIR)]
    dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// `waygate-client` subcommands.
#[derive(Subcommand)]
enum Command {
    /// Enroll this device with a token from `waygate token create`.
    Enroll {
        /// The gateway's enrollment listener, `https://HOST:PORT` (its `control.listen`).
        #[arg(long, value_name = "URL")]
        server: String,
        /// The enrollment token.
        #[arg(
            long,
            value_name = "TOKEN",
            conflicts_with = "token_file",
            required_unless_present = "token_file"
        )]
        token: Option<String>,
        /// A file holding the enrollment token (kept out of the process list and shell history).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Enroll again even if this directory holds an enrollment already.
        #[arg(long)]
        force: bool,
    },
    /// Print the client's state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Device posture: the facts this device reports to the gateway.
    #[command(subcommand)]
    Posture(PostureCommand),
    /// Virtual networks: list them, or choose one (through the tunnel's device API).
    #[command(subcommand)]
    Vnet(VnetCommand),
}

/// `waygate-client posture ...`
#[derive(Subcommand)]
enum PostureCommand {
    /// Collect the facts the gateway's posture checks ask for and print them.
    Run {
        /// Print the facts as the JSON body that would be sent.
        #[arg(long)]
        json: bool,
        /// Also send them, and print the gateway's verdicts.
        #[arg(long)]
        report: bool,
    },
}

/// `waygate-client vnet ...`
#[derive(Subcommand)]
enum VnetCommand {
    /// List the virtual networks this device may use, marking the current one.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move this device into a virtual network.
    Use {
        /// Its name (or id).
        name: String,
    },
    /// Move this device back to the default network.
    Default,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("waygate-client: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Enroll {
            server,
            token,
            token_file,
            force,
        } => {
            let token = match (token, token_file) {
                (Some(t), _) => t,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", file.display()))?,
                (None, None) => anyhow::bail!("give --token or --token-file"),
            };
            enroll_cmd(&cli.dir, &server, token.trim(), force)
        }
        Command::Status { json } => status(&cli.dir, json),
        Command::Posture(PostureCommand::Run { json, report }) => {
            posture::run_cmd(&cli.dir, json, report)
        }
        Command::Vnet(VnetCommand::List { json }) => device_api::vnet_list_cmd(&cli.dir, json),
        Command::Vnet(VnetCommand::Use { name }) => device_api::vnet_use_cmd(&cli.dir, Some(&name)),
        Command::Vnet(VnetCommand::Default) => device_api::vnet_use_cmd(&cli.dir, None),
    }
}

fn enroll_cmd(dir: &Path, server: &str, token: &str, force: bool) -> anyhow::Result<ExitCode> {
    let url: enroll::ServerUrl = server.parse()?;
    let parsed: EnrollToken = token.parse()?;
    if !force && state::read_config(dir)?.is_some() {
        anyhow::bail!(
            "{} is enrolled already; use --force to enroll again (a new key and device)",
            dir.display()
        );
    }
    state::ensure_dir(dir)?;
    let private = PrivateKey::generate(&mut rand::rngs::OsRng);
    let public = private.public_key().to_base64();
    let got = enroll::enroll(&url, token, parsed.ca_sha256, &public)?;
    // The key is written only once the gateway accepted it, so a refusal leaves nothing behind.
    let key = state::key_path(dir);
    waygate_keys::write_private_key(&key, &private)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", key.display()))?;
    let config = state::ClientConfig {
        server: server.trim_end_matches('/').to_string(),
        ca_sha256: waygate_keys::enroll_token::hex(&parsed.ca_sha256),
        device_id: got.device_id,
        name: got.name,
        addresses: got.addresses,
        gateway_public_key: got.gateway_public_key,
        endpoint: got.endpoint,
        dns: got.dns,
        mtu: got.mtu,
        vnet: got.vnet,
    };
    state::write_config(dir, &config)?;
    eprintln!(
        "enrolled as {} ({}), addresses {}, gateway {}; config in {}",
        config.name,
        config.device_id,
        config.addresses.join(", "),
        config.endpoint,
        state::config_path(dir).display()
    );
    Ok(ExitCode::SUCCESS)
}

fn status(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = state::read_config(dir)?;
    let value = serde_json::json!({
        "connected": false,
        "enrolled": config.is_some(),
        "name": config.as_ref().map(|c| c.name.clone()),
        "device_id": config.as_ref().map(|c| c.device_id.clone()),
        "addresses": config.as_ref().map(|c| c.addresses.clone()).unwrap_or_default(),
        "endpoint": config.as_ref().map(|c| c.endpoint.clone()),
        "server": config.as_ref().map(|c| c.server.clone()),
        "vnet": config.as_ref().and_then(|c| c.vnet.clone()),
        "posture": {},
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match &config {
            Some(c) => println!(
                "enrolled as {} ({}), addresses {}, gateway {}; not connected",
                c.name,
                c.device_id,
                c.addresses.join(", "),
                c.endpoint
            ),
            None => println!("not enrolled (no {})", state::config_path(dir).display()),
        }
    }
    Ok(ExitCode::SUCCESS)
}
