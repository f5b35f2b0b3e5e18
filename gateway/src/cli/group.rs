//! `waygate group create|list|delete`: user groups in the gateway's registry. Devices name their
//! groups at enrollment; a group created here gives them its id and email for rules. A running
//! gateway picks changes up within a second.
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use super::admin::with_admin;
use super::GroupCommand;
use waygate_config::Config;
use waygate_control::ops::{Admin, NewGroup};
use waygate_registry::Group;

/// Runs `waygate group`, through the running gateway's API or on the registry.
pub fn run(config: Option<&Path>, cmd: GroupCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    with_admin(&cfg, |ops| run_with(ops, cmd))?;
    Ok(ExitCode::SUCCESS)
}

fn run_with(ops: &dyn Admin, cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create { name, email, id } => {
            let group = ops.create_group(NewGroup { name, email, id })?;
            eprintln!("created group {}", group.name);
            println!("{}", group.id);
        }
        GroupCommand::List { json } => {
            let groups = ops.groups()?;
            let devices: Vec<_> = ops
                .devices()?
                .into_iter()
                .filter(|d| d.is_active())
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
            } else {
                print!(
                    "{}",
                    table(&groups, |name| {
                        devices
                            .iter()
                            .filter(|d| d.groups.iter().any(|g| g == name))
                            .count()
                    })
                );
            }
        }
        GroupCommand::Delete { group } => {
            let gone = ops.delete_group(&group)?;
            eprintln!("deleted group {} ({})", gone.name, gone.id);
        }
    }
    Ok(())
}

fn table(groups: &[Group], members: impl Fn(&str) -> usize) -> String {
    let mut out = format!("{:<36}  {:<20}  {:>7}  EMAIL\n", "ID", "NAME", "DEVICES");
    for g in groups {
        let _ = writeln!(
            out,
            "{:<36}  {:<20}  {:>7}  {}",
            g.id,
            g.name,
            members(&g.name),
            g.email.as_deref().unwrap_or("-")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_counts_members() {
        let groups = vec![Group {
            id: "7b6c3bc0-0000-4000-8000-000000000001".into(),
            name: "eng".into(),
            email: Some("eng@example.com".into()),
            created_at: 0,
        }];
        let t = table(&groups, |n| usize::from(n == "eng") * 2);
        assert!(
            t.contains("eng@example.com") && t.contains("      2  "),
            "{t}"
        );
    }
}
