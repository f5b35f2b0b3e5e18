//! `waygate vnet create|list|delete`: virtual networks in the gateway's registry. A running
//! gateway picks changes up within a second.
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use super::now;
use super::VnetCommand;
use waygate_config::Config;
use waygate_registry::{Registry, Vnet, VnetRoute};

/// Runs `waygate vnet`.
pub fn run(config: Option<&Path>, cmd: VnetCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let registry = Registry::open(&cfg.data_dir, &cfg.tunnel)?;
    match cmd {
        VnetCommand::Create { name, routes } => {
            let routes = routes
                .iter()
                .map(|r| VnetRoute::parse(r))
                .collect::<Result<Vec<_>, _>>()?;
            let vnet = registry.create_vnet(&name, &routes, now())?;
            eprintln!("created virtual network {}", vnet.name);
            println!("{}", vnet.id);
        }
        VnetCommand::List { json } => {
            let vnets = registry.vnets()?;
            let devices = registry.active_devices()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vnets)?);
            } else {
                print!(
                    "{}",
                    table(&vnets, |id| {
                        devices
                            .iter()
                            .filter(|d| d.vnet_id.as_deref() == Some(id))
                            .count()
                    })
                );
            }
        }
        VnetCommand::Delete { vnet } => {
            let gone = registry.delete_vnet(&vnet)?;
            eprintln!("deleted virtual network {} ({})", gone.name, gone.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn table(vnets: &[Vnet], members: impl Fn(&str) -> usize) -> String {
    let mut out = format!("{:<36}  {:<20}  {:>7}  ROUTES\n", "ID", "NAME", "DEVICES");
    for v in vnets {
        let routes: Vec<String> = v
            .routes
            .iter()
            .map(|r| format!("{}={}", r.cidr, r.via))
            .collect();
        let routes = if routes.is_empty() {
            "-".to_string()
        } else {
            routes.join(" ")
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<20}  {:>7}  {}",
            v.id,
            v.name,
            members(&v.id),
            routes
        );
    }
    out
}
