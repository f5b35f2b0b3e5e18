//! `waygate-client`: the device side of Waygate.
//!
//! `enroll` makes the device's WireGuard key pair here, sends only the public key with an
//! enrollment token to the gateway's enrollment listener (TLS trusted by the CA hash inside the
//! token) and writes `client.toml` and `private.key` into its directory. `up` starts the tunnel
//! daemon ([`daemon`]) in the background and returns once it has a handshake; `daemon` runs it
//! in the foreground (systemd); `down` stops it, which undoes its routes, rules and DNS;
//! `status` asks the running daemon over `DIR/control.sock`, or reads the files when none runs.
//!
//! Inputs: the command line, the token (argument or file), the gateway's answer. Outputs: the
//! files in `--dir`, lines on stdout/stderr, the exit code.
#![deny(missing_docs)]

mod agent;
mod daemon;
mod device_api;
mod enroll;
mod netconf;
mod pin;
mod posture;
mod state;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    /// Start the tunnel daemon in the background; returns once the tunnel has a handshake.
    Up {
        #[command(flatten)]
        tunnel: TunnelArgs,
        /// How long to wait for the handshake.
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        wait: u64,
    },
    /// Run the tunnel in the foreground (for systemd); stops on SIGTERM, SIGINT or `down`.
    Daemon {
        #[command(flatten)]
        tunnel: TunnelArgs,
    },
    /// Stop the tunnel daemon; routes, rules and DNS go back to what they were.
    Down,
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

/// Options of the tunnel (`up`, `daemon`).
#[derive(clap::Args, Clone)]
struct TunnelArgs {
    /// The TUN interface's name.
    #[arg(long, value_name = "NAME", default_value = daemon::DEFAULT_INTERFACE)]
    interface: String,
    /// Do not use the TUN's segmentation offload (one packet per read and write).
    #[arg(long)]
    no_offload: bool,
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
        Command::Up { tunnel, wait } => up(&cli.dir, &tunnel, Duration::from_secs(wait)),
        Command::Daemon { tunnel } => {
            init_logs();
            daemon::run(&daemon::Options {
                dir: cli.dir.clone(),
                interface: tunnel.interface,
                offload: !tunnel.no_offload,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Down => down(&cli.dir),
        Command::Posture(PostureCommand::Run { json, report }) => {
            posture::run_cmd(&cli.dir, json, report)
        }
        Command::Vnet(VnetCommand::List { json }) => device_api::vnet_list_cmd(&cli.dir, json),
        Command::Vnet(VnetCommand::Use { name }) => device_api::vnet_use_cmd(&cli.dir, Some(&name)),
        Command::Vnet(VnetCommand::Default) => device_api::vnet_use_cmd(&cli.dir, None),
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WAYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// How often `up` and `down` ask the daemon while they wait.
const POLL: Duration = Duration::from_millis(100);

// `up` and `down` wait on the wall clock: they are the CLI shell.
#[allow(clippy::disallowed_methods)]
fn up(dir: &Path, tunnel: &TunnelArgs, wait: Duration) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt as _;
    if state::read_config(dir)?.is_none() {
        anyhow::bail!(
            "{} is not enrolled; run `waygate-client enroll` first",
            dir.display()
        );
    }
    let log_path = dir.join(daemon::LOG_FILE);
    let deadline = std::time::Instant::now() + wait;
    if daemon::ask(dir, "status").is_some() {
        // Already running: wait for its handshake rather than start a second one.
        loop {
            match daemon::ask(dir, "status") {
                Some(status) if status["connected"] == true => {
                    print_status(&status);
                    return Ok(ExitCode::SUCCESS);
                }
                Some(_) => {}
                None => anyhow::bail!("the running daemon stopped; see {}", log_path.display()),
            }
            if std::time::Instant::now() >= deadline {
                eprintln!(
                    "waygate-client: the daemon already runs but has no handshake with the \
                     gateway; log in {}",
                    log_path.display()
                );
                return Ok(ExitCode::FAILURE);
            }
            std::thread::sleep(POLL);
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", log_path.display()))?;
    let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--dir")
        .arg(dir)
        .arg("daemon")
        .args(["--interface", &tunnel.interface]);
    if tunnel.no_offload {
        cmd.arg("--no-offload");
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for `up` does not reach the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the daemon: {e}"))?;
    loop {
        if let Some(code) = child.try_wait()? {
            anyhow::bail!(
                "the daemon exited ({code}): {}",
                log_since(&log_path, log_offset).trim()
            );
        }
        if let Some(status) = daemon::ask(dir, "status") {
            if status["connected"] == true {
                print_status(&status);
                return Ok(ExitCode::SUCCESS);
            }
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "waygate-client: no handshake with the gateway within {}s; the daemon (pid {})                  keeps trying: `waygate-client status`, `waygate-client down`, log in {}",
                wait.as_secs(),
                child.id(),
                log_path.display()
            );
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(POLL);
    }
}

fn log_since(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(text.len());
    String::from_utf8_lossy(&text[start..]).into_owned()
}

#[allow(clippy::disallowed_methods)]
fn down(dir: &Path) -> anyhow::Result<ExitCode> {
    let pid_file = dir.join(daemon::PID_FILE);
    let pid: Option<u32> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    if daemon::ask(dir, "stop").is_some() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The daemon removes its pid file once everything is undone; then it exits.
        let running = || {
            pid_file.exists() || pid.is_some_and(|p| Path::new(&format!("/proc/{p}/exe")).exists())
        };
        while running() {
            if std::time::Instant::now() >= deadline {
                anyhow::bail!("the daemon did not stop within 10s");
            }
            std::thread::sleep(POLL);
        }
        eprintln!("tunnel down");
        return Ok(ExitCode::SUCCESS);
    }
    // No daemon answers: one that died may have left its changes behind.
    match netconf::Undo::load(dir)? {
        Some(mut undo) => {
            let errors = undo.revert();
            netconf::Undo::forget(dir);
            let _ = std::fs::remove_file(daemon::socket_path(dir));
            for e in &errors {
                eprintln!("waygate-client: {e}");
            }
            eprintln!("no daemon was running; undid the changes it left behind");
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        None => {
            eprintln!("not running");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(status: &serde_json::Value) {
    let age = status["handshake_age_secs"]
        .as_u64()
        .map_or("never".to_string(), |s| format!("{s}s ago"));
    println!(
        "{} {} via {} ({}), gateway {}, handshake {}, rx {} B, tx {} B, vnet {}",
        if status["connected"] == true {
            "connected:"
        } else {
            "not connected:"
        },
        status["name"].as_str().unwrap_or("?"),
        status["interface"].as_str().unwrap_or("?"),
        status["addresses"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        status["endpoint"].as_str().unwrap_or("?"),
        age,
        status["rx_bytes"],
        status["tx_bytes"],
        status["vnet"].as_str().unwrap_or("default"),
    );
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
        include: Vec::new(),
        exclude: Vec::new(),
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
    if let Some(mut live) = daemon::ask(dir, "status") {
        if let Some(obj) = live.as_object_mut() {
            obj.insert("enrolled".into(), true.into());
            obj.insert("running".into(), true.into());
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&live)?);
        } else {
            print_status(&live);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config = state::read_config(dir)?;
    let value = serde_json::json!({
        "connected": false,
        "running": false,
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
