//! `waygate vnet create|list|delete`: virtual networks in the gateway's registry. A running
//! gateway picks changes up within a second.
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use super::admin::with_admin;
use super::VnetCommand;
use waygate_config::Config;
use waygate_control::ops::{Admin, NewVnet};
use waygate_registry::{Vnet, VnetRoute};

/// Runs `waygate vnet`, through the running gateway's API or on the registry.
pub fn run(config: Option<&Path>, cmd: VnetCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    with_admin(&cfg, |ops| run_with(ops, cmd))?;
    Ok(ExitCode::SUCCESS)
}

fn run_with(ops: &dyn Admin, cmd: VnetCommand) -> anyhow::Result<()> {
    match cmd {
        VnetCommand::Create { name, routes } => {
            // Checked here too, so a bad route is reported the same way on either path.
            for r in &routes {
                VnetRoute::parse(r)?;
            }
            let vnet = ops.create_vnet(NewVnet { name, routes })?;
            eprintln!("created virtual network {}", vnet.name);
            println!("{}", vnet.id);
        }
        VnetCommand::List { json } => {
            let vnets = ops.vnets()?;
            let devices: Vec<_> = ops
                .devices()?
                .into_iter()
                .filter(|d| d.is_active())
                .collect();
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
            let gone = ops.delete_vnet(&vnet)?;
            eprintln!("deleted virtual network {} ({})", gone.name, gone.id);
        }
    }
    Ok(())
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
