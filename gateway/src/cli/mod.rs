//! The `waygate` command line: argument definitions and dispatch. Each subcommand lives in its own
//! module; this one only parses and routes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub mod admin;
pub mod device;
pub mod geoip;
pub mod group;
pub mod health;
pub mod logging;
pub mod logs;
pub mod posture;
pub mod rules;
pub mod serve;
pub mod token;
pub mod vnet;

/// `waygate`: a self-hosted Zero Trust gateway for WireGuard devices.
#[derive(Debug, Parser)]
#[command(name = "waygate", version, about, propagate_version = true)]
pub struct Cli {
    /// Gateway config file (TOML); without it the embedded defaults are used.
    #[arg(long, global = true, value_name = "FILE", env = "WAYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Enroll, list, show and revoke devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Validate and evaluate Cloudflare Gateway-format rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Create, list and delete virtual networks.
    #[command(subcommand)]
    Vnet(VnetCommand),
    /// Create, list and delete user groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Device posture rules (Cloudflare's JSON) that devices report on.
    #[command(subcommand)]
    Posture(PostureCommand),
    /// Build and query GeoIP databases.
    #[command(subcommand)]
    Geoip(GeoipCommand),
    /// The gateway's certificate authority, for devices to trust.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check that a gateway is serving on this config (exit 0) or not (exit 1).
    Health,
    /// The admin API: bearer tokens for its TLS listener.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Show the activity logs of `logs.dir` (DNS queries, flows, egress decisions).
    Logs(LogsArgs),
    /// Enrollment tokens for `waygate-client enroll`.
    #[command(subcommand)]
    Token(EnrollTokenCommand),
}

/// `waygate token ...`
#[derive(Debug, Subcommand)]
pub enum EnrollTokenCommand {
    /// Create an enrollment token and print it (alone, on stdout); it is shown only this once.
    Create {
        /// The email of the user the devices are enrolled for.
        #[arg(long)]
        email: String,
        /// Device name (default: derived from the email).
        #[arg(long)]
        name: Option<String>,
        /// Group the devices get (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Virtual network the devices start in (name or id).
        #[arg(long)]
        vnet: Option<String>,
        /// How long it stays valid: 90s, 30m, 24h, 7d (default 24h).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// How many devices it may enroll (default 1; 0: any number until it expires).
        #[arg(long, value_name = "N")]
        uses: Option<i64>,
        /// Print the token and its record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List enrollment tokens (their prefixes, never the secrets).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an enrollment token; enrollments with it are refused at once.
    Revoke {
        /// Its id or prefix (as `token list` shows it).
        token: String,
    },
}

/// `waygate admin ...`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Bearer tokens for the admin API's TLS listener (`admin.listen`).
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `waygate admin token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (alone, on stdout); it is shown only this once.
    Create {
        /// The token may only read (GET); without this flag it may also change things.
        #[arg(long)]
        read_only: bool,
        /// A name to recognise it by in `admin token list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (their prefixes, never the secrets).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token; requests with it are refused at once.
    Revoke {
        /// Its id, name or prefix (as `admin token list` shows it).
        token: String,
    },
}

/// Arguments of `waygate logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Which log (default: all of them).
    #[arg(long = "type", value_parser = ["dns", "network", "http", "egress"])]
    pub kind: Option<String>,
    /// Only this device's lines (its id or name).
    #[arg(long)]
    pub device: Option<String>,
    /// Keep printing lines as they are written, across rotations.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only lines from this long ago on: `30s`, `10m`, `2h`, `1d`.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Print the JSON lines as written instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `waygate ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA if the data dir has none yet.
    Show,
}

/// `waygate vnet ...`
#[derive(Debug, Subcommand)]
pub enum VnetCommand {
    /// Create a virtual network.
    Create {
        /// Its name.
        name: String,
        /// A private route, `CIDR=INTERFACE` or `CIDR=NEXT_HOP` (repeatable): flows of the
        /// network's devices to CIDR leave through the gateway's INTERFACE, or via the router
        /// at NEXT_HOP.
        #[arg(long = "route", value_name = "CIDR=INTERFACE|NEXT_HOP")]
        routes: Vec<String>,
    },
    /// List virtual networks.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a virtual network no device is in.
    Delete {
        /// Name or id.
        vnet: String,
    },
}

/// `waygate posture ...`
#[derive(Debug, Subcommand)]
pub enum PostureCommand {
    /// Create a device posture rule from one rule in Cloudflare's JSON; prints its id.
    Create {
        /// The rule (`{"name", "type", "schedule", "input", ...}`; `id` is kept when given).
        #[arg(long, value_name = "RULE.json")]
        file: std::path::PathBuf,
    },
    /// List device posture rules.
    List {
        /// Print JSON (the rules as the admin API returns them) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a device posture rule; devices' results for it expire.
    Delete {
        /// The rule's id.
        id: String,
    },
}

/// `waygate geoip ...`
#[derive(Debug, Subcommand)]
pub enum GeoipCommand {
    /// Write a MaxMind database from `network,country,continent` lines.
    Build {
        /// Input: one `network,country,continent` per line (e.g. `198.51.100.0/24,US,NA`).
        #[arg(long, value_name = "FILE")]
        csv: PathBuf,
        /// The database to write (`.mmdb`).
        #[arg(long, value_name = "FILE.mmdb")]
        out: PathBuf,
    },
    /// Print the country and continent of addresses.
    Lookup {
        /// Database (default: `geoip.database` of the config).
        #[arg(long, value_name = "FILE.mmdb")]
        database: Option<PathBuf>,
        /// Addresses to look up.
        #[arg(required = true)]
        ips: Vec<std::net::IpAddr>,
    },
}

/// `waygate device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Enroll a device and print its wg-quick config.
    Enroll(EnrollArgs),
    /// List enrolled devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        /// Device id, name or public key.
        device: String,
    },
    /// Move a device into a virtual network (`default`: the Internet-only network).
    SetVnet {
        /// Device id, name or public key.
        device: String,
        /// Virtual network name or id, or `default`.
        vnet: String,
    },
    /// Record a device's posture-check results (`device_posture.checks.*` in rules); replaces
    /// the previous results.
    Posture {
        /// Device id, name or public key.
        device: String,
        /// A check the device passed (repeatable).
        #[arg(long = "passed", value_name = "CHECK_ID")]
        passed: Vec<String>,
        /// A check the device failed (repeatable).
        #[arg(long = "failed", value_name = "CHECK_ID")]
        failed: Vec<String>,
    },
    /// Revoke a device; its traffic stops within a second.
    Revoke {
        /// Device id, name or public key.
        device: String,
    },
}

/// `waygate group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group; devices enrolled with `--group NAME` carry its id and email.
    Create {
        /// Its name.
        name: String,
        /// Its email (`identity.groups.email`).
        #[arg(long)]
        email: Option<String>,
        /// Its id (`identity.groups.id`; default: a new UUID), e.g. the id your rules use.
        #[arg(long)]
        id: Option<String>,
    },
    /// List groups.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (devices keep its name).
    Delete {
        /// Name or id.
        group: String,
    },
}

/// Arguments of `waygate device enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The user's email.
    #[arg(long)]
    pub email: String,
    /// Device name (default: derived from the email).
    #[arg(long)]
    pub name: Option<String>,
    /// The user's display name (`identity.name` in rules).
    #[arg(long, value_name = "NAME")]
    pub user_name: Option<String>,
    /// Group the user belongs to (repeatable).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// An attribute of the user, `NAME=VALUE` (repeatable; `identity.saml_attributes` in rules).
    #[arg(long = "attribute", value_name = "NAME=VALUE")]
    pub attributes: Vec<String>,
    /// Virtual network (name or id).
    #[arg(long)]
    pub vnet: Option<String>,
    /// The device's own public key; the config then carries no private key.
    #[arg(long)]
    pub public_key: Option<String>,
    /// Print the wg-quick config as a QR code (for the WireGuard apps on phones to scan)
    /// instead of as text.
    #[arg(long)]
    pub qr: bool,
}

/// `waygate rules ...`
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Validate a rules file; prints errors with line and column.
    Check {
        /// Rules file (JSON array, or `{"result": [...]}`).
        file: PathBuf,
        /// Lists file the rules may refer to.
        #[arg(long)]
        lists: Option<PathBuf>,
    },
    /// Evaluate rules against one flow and print the decision as JSON.
    Eval {
        /// Rules file.
        #[arg(long)]
        rules: PathBuf,
        /// Which stage's rules to run.
        #[arg(long, value_parser = ["dns", "http", "l4", "egress"])]
        filter: String,
        /// Flow as JSON: field name to value.
        #[arg(long)]
        input: PathBuf,
        /// Lists file.
        #[arg(long)]
        lists: Option<PathBuf>,
    },
}

/// Unix seconds now. The CLI is an I/O shell: it reads the clock and hands the time to the
/// registry.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An error and its causes on one line, `outer: inner: ...`, leaving out a cause whose text an
/// outer message already includes: many errors print their source in their own message, and
/// `{:#}` would then print it twice ("... Permission denied (os error 13): Permission denied
/// (os error 13)").
pub fn error_report(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => serve::run(cli.config.as_deref()),
        Command::Device(cmd) => device::run(cli.config.as_deref(), cmd),
        Command::Rules(cmd) => rules::run(cmd),
        Command::Geoip(cmd) => geoip::run(cli.config.as_deref(), cmd),
        Command::Vnet(cmd) => vnet::run(cli.config.as_deref(), cmd),
        Command::Group(cmd) => group::run(cli.config.as_deref(), cmd),
        Command::Posture(cmd) => posture::run(cli.config.as_deref(), cmd),
        Command::Health => health::run(cli.config.as_deref()),
        Command::Admin(AdminCommand::Token(cmd)) => admin::token(cli.config.as_deref(), cmd),
        Command::Logs(args) => logs::run(cli.config.as_deref(), &args),
        Command::Token(cmd) => token::run(cli.config.as_deref(), cmd),
        Command::Ca(CaCommand::Show) => {
            let config = waygate_config::Config::load(cli.config.as_deref())?;
            waygate_registry::datadir::ensure_data_dir(&config.data_dir)?;
            #[allow(clippy::disallowed_methods)] // the CLI is a shell
            let now = std::time::SystemTime::now();
            print!(
                "{}",
                waygate_runtime::tls::load_ca(&config.data_dir, now)?.cert_pem()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_in_a_message_are_not_repeated() {
        let os = std::io::Error::from_raw_os_error(libc::EACCES);
        let err = anyhow::Error::new(waygate_registry::RegistryError::Create {
            path: "/srv/waygate/registry.db".into(),
            source: os,
        })
        .context("cannot open the registry");
        let text = error_report(&err);
        assert_eq!(text.matches("os error 13").count(), 1, "{text}");
        assert!(
            text.starts_with("cannot open the registry: cannot create /srv/waygate/registry.db: ")
        );
        // A cause not yet mentioned is kept.
        let err = anyhow::anyhow!("inner detail").context("outer");
        assert_eq!(error_report(&err), "outer: inner detail");
    }
}
