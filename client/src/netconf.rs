//! Routes, rules and DNS for the tunnel, set the way wg-quick sets them and undone exactly.
//!
//! Every change is made with `ip` (or `sysctl` values written to /proc, `resolvectl`,
//! `resolvconf`) and recorded with its inverse in an [`Undo`] list, which the daemon keeps in
//! memory and in `DIR/undo.json`: `down` (or the next start, after a crash) plays it backwards,
//! so routes, rules, sysctls and the resolver are as they were before `up`.
//!
//! Routing ([`Routing`]): the tunnel's UDP socket carries [`FWMARK`]; everything else is looked
//! up in table [`TABLE`] first (`ip rule add not fwmark MARK table TABLE`), where the tunnel's
//! routes live. Full tunnel puts default routes there and adds `ip rule add table main
//! suppress_prefixlength 0`, so the main table's specific routes (the LAN) still win but its
//! default route does not; the marked datagrams to the gateway skip table TABLE and leave by the
//! main table, so the endpoint's route never enters the tunnel. Include puts only the listed
//! prefixes in table TABLE; exclude is full tunnel with `throw` routes for the listed prefixes.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// The firewall mark of the tunnel's own datagrams (wg-quick uses 51820 for both mark and
/// table; a different value lets both run on one host).
pub const FWMARK: u32 = 0x5767;
/// The routing table of the tunnel's routes.
pub const TABLE: u32 = 0x5767;
/// The file the daemon keeps its undo list in, inside `--dir`.
pub const UNDO_FILE: &str = "undo.json";
/// The resolver file every mode but systemd-resolved ends up writing.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What goes through the tunnel. The enrollment config gives full tunnel; the device profile
/// (split tunnel include/exclude) will choose the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// Everything (0.0.0.0/0 and ::/0).
    Full,
    /// Only these prefixes.
    Include(Vec<ipnet::IpNet>),
    /// Everything but these prefixes.
    Exclude(Vec<ipnet::IpNet>),
}

/// One recorded change and how to take it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Run this command (`ip rule del ...`).
    Command {
        /// argv.
        argv: Vec<String>,
    },
    /// Write this value back to a /proc/sys file.
    Sysctl {
        /// The file.
        path: PathBuf,
        /// Its old value.
        value: String,
    },
    /// Put the resolver back.
    Dns(DnsUndo),
}

/// How the resolver was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsUndo {
    /// The mechanism used.
    pub mode: DnsMode,
    /// The interface the servers were set for.
    pub interface: String,
    /// /etc/resolv.conf before `up` (`None`: it did not exist).
    pub before: Option<String>,
    /// /etc/resolv.conf right after the change: if it still reads so at `down`, nobody else
    /// changed it meanwhile, and `before` goes back byte for byte.
    pub ours: Option<String>,
}

/// The DNS mechanism: systemd-resolved when it manages /etc/resolv.conf, else resolvconf
/// (openresolv), else the file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsMode {
    /// `resolvectl dns|domain|default-route IF`.
    Resolved,
    /// `resolvconf -a IF -m 0 -x`.
    Resolvconf,
    /// /etc/resolv.conf written in place.
    File,
}

/// Changes made so far, oldest first.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undo {
    /// The steps, in the order they were made.
    pub steps: Vec<Step>,
}

/// Runs `argv`, failing with its stderr in the message.
pub fn run(argv: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", argv[0]))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn owned(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|s| (*s).to_string()).collect()
}

impl Undo {
    /// Sets a /proc/sys value, recording the old one; nothing is recorded when it already holds it.
    fn sysctl(&mut self, path: &str, value: &str) -> anyhow::Result<()> {
        let old = fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?
            .trim()
            .to_string();
        if old == value {
            return Ok(());
        }
        fs::write(path, value).map_err(|e| anyhow::anyhow!("cannot write {path}: {e}"))?;
        self.steps.push(Step::Sysctl {
            path: path.into(),
            value: old,
        });
        Ok(())
    }

    /// Plays the steps backwards; every failure is reported and the rest still run.
    pub fn revert(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(step) = self.steps.pop() {
            let result = match &step {
                Step::Command { argv } => {
                    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
                    run(&args).map(drop)
                }
                Step::Sysctl { path, value } => fs::write(path, value)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display())),
                Step::Dns(d) => revert_dns(d),
            };
            if let Err(e) = result {
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }

    /// Writes the list to `DIR/undo.json` (0600), so a `down` after a crash can still undo it.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(UNDO_FILE);
        let text = serde_json::to_vec_pretty(self)?;
        waygate_keys::write_secret_file(&path, &text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    /// The list a previous daemon left in `DIR/undo.json`, if any.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Undo>> {
        let path = dir.join(UNDO_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    /// Removes `DIR/undo.json`.
    pub fn forget(dir: &Path) {
        let _ = fs::remove_file(dir.join(UNDO_FILE));
    }
}

/// What to route and resolve through the tunnel.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The TUN interface.
    pub interface: String,
    /// The device's tunnel addresses with their prefix lengths.
    pub addresses: Vec<ipnet::IpNet>,
    /// The MTU.
    pub mtu: u16,
    /// What goes through the tunnel.
    pub routing: Routing,
    /// Resolvers inside the tunnel (empty: DNS is left alone).
    pub dns: Vec<IpAddr>,
    /// The host has IPv6 (`false`: IPv6 addresses, routes, rules and resolvers are left out).
    pub ipv6: bool,
}

/// Whether the host has IPv6 turned on.
pub fn host_has_ipv6() -> bool {
    fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").is_ok_and(|v| v.trim() == "0")
}

/// One command of a [`Plan`] and the command that takes it back (`None`: it goes with the
/// interface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What to run.
    pub apply: Vec<String>,
    /// What undoes it.
    pub revert: Option<Vec<String>>,
}

impl Change {
    fn with_interface(apply: &[&str]) -> Change {
        Change {
            apply: owned(apply),
            revert: None,
        }
    }

    /// An `ip ... add ...` undone by the same arguments with `del`.
    fn add_del(apply: &[&str]) -> Change {
        let revert = apply
            .iter()
            .map(|a| if *a == "add" { "del" } else { a })
            .collect::<Vec<_>>();
        Change {
            apply: owned(apply),
            revert: Some(owned(&revert)),
        }
    }
}

/// The interface, routes and rules of `plan`, in order, as `ip` commands.
pub fn changes(plan: &Plan) -> Vec<Change> {
    let ifname = plan.interface.as_str();
    let mtu = plan.mtu.to_string();
    let mut out = vec![Change::with_interface(&[
        "ip", "link", "set", "dev", ifname, "mtu", &mtu, "up",
    ])];
    for addr in plan
        .addresses
        .iter()
        .filter(|a| plan.ipv6 || a.addr().is_ipv4())
    {
        let family = if addr.addr().is_ipv4() { "-4" } else { "-6" };
        out.push(Change::with_interface(&[
            "ip",
            family,
            "address",
            "add",
            &addr.to_string(),
            "dev",
            ifname,
        ]));
    }
    let mark = FWMARK.to_string();
    let table = TABLE.to_string();
    let families: &[&str] = if plan.ipv6 { &["-4", "-6"] } else { &["-4"] };
    for &family in families {
        let v4 = family == "-4";
        let default = if v4 { "0.0.0.0/0" } else { "::/0" };
        let of_family = |nets: &[ipnet::IpNet]| -> Vec<String> {
            nets.iter()
                .filter(|n| n.addr().is_ipv4() == v4)
                .map(ToString::to_string)
                .collect()
        };
        let (routes, throws) = match &plan.routing {
            Routing::Full => (vec![default.to_string()], vec![]),
            Routing::Include(nets) => (of_family(nets), vec![]),
            Routing::Exclude(nets) => (vec![default.to_string()], of_family(nets)),
        };
        if routes.is_empty() {
            continue;
        }
        for net in &routes {
            out.push(Change::with_interface(&[
                "ip", family, "route", "add", net, "dev", ifname, "table", &table,
            ]));
        }
        for net in &throws {
            out.push(Change::add_del(&[
                "ip", family, "route", "add", "throw", net, "table", &table,
            ]));
        }
        out.push(Change::add_del(&[
            "ip", family, "rule", "add", "not", "fwmark", &mark, "table", &table,
        ]));
        if routes.iter().any(|r| r == default) {
            out.push(Change::add_del(&[
                "ip",
                family,
                "rule",
                "add",
                "table",
                "main",
                "suppress_prefixlength",
                "0",
            ]));
        }
    }
    out
}

/// Configures the interface, routes, rules and DNS, recording each change in `undo` and saving
/// it to `dir` after each, so a crash half-way still leaves a complete record.
pub fn apply(plan: &Plan, undo: &mut Undo, dir: &Path) -> anyhow::Result<()> {
    for change in changes(plan) {
        let argv: Vec<&str> = change.apply.iter().map(String::as_str).collect();
        run(&argv)?;
        if let Some(revert) = change.revert {
            undo.steps.push(Step::Command { argv: revert });
            undo.save(dir)?;
        }
    }
    if matches!(plan.routing, Routing::Full | Routing::Exclude(_)) {
        // As wg-quick: reverse-path checks must see the mark, or replies to the marked
        // datagrams fail them.
        undo.sysctl("/proc/sys/net/ipv4/conf/all/src_valid_mark", "1")?;
        undo.save(dir)?;
    }
    let dns: Vec<IpAddr> = plan
        .dns
        .iter()
        .copied()
        .filter(|ip| plan.ipv6 || ip.is_ipv4())
        .collect();
    if !dns.is_empty() {
        let d = set_dns(&plan.interface, &dns)?;
        undo.steps.push(Step::Dns(d));
        undo.save(dir)?;
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

/// The mechanism in charge of /etc/resolv.conf here.
pub fn dns_mode() -> DnsMode {
    let resolved = fs::read_link(RESOLV_CONF)
        .is_ok_and(|target| target.to_string_lossy().contains("/run/systemd/resolve/"))
        && on_path("resolvectl");
    if resolved {
        DnsMode::Resolved
    } else if on_path("resolvconf") {
        DnsMode::Resolvconf
    } else {
        DnsMode::File
    }
}

fn read_resolv() -> Option<String> {
    fs::read_to_string(RESOLV_CONF).ok()
}

/// Writes /etc/resolv.conf in place (not by rename): inside `ip netns exec` it is a bind mount,
/// which a rename cannot replace.
fn write_resolv(text: &str) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(RESOLV_CONF)
        .map_err(|e| anyhow::anyhow!("cannot open {RESOLV_CONF}: {e}"))?;
    f.write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {RESOLV_CONF}: {e}"))
}

fn nameservers(servers: &[IpAddr]) -> String {
    servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect()
}

fn set_dns(ifname: &str, servers: &[IpAddr]) -> anyhow::Result<DnsUndo> {
    let mode = dns_mode();
    let before = read_resolv();
    match mode {
        DnsMode::Resolved => {
            let mut argv = vec!["resolvectl", "dns", ifname];
            let texts: Vec<String> = servers.iter().map(ToString::to_string).collect();
            argv.extend(texts.iter().map(String::as_str));
            run(&argv)?;
            run(&["resolvectl", "domain", ifname, "~."])?;
            run(&["resolvectl", "default-route", ifname, "yes"])?;
        }
        DnsMode::Resolvconf => {
            let mut child = Command::new("resolvconf")
                .args(["-a", ifname, "-m", "0", "-x"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot run resolvconf: {e}"))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(nameservers(servers).as_bytes())
                    .map_err(|e| anyhow::anyhow!("resolvconf: {e}"))?;
            }
            let out = child
                .wait_with_output()
                .map_err(|e| anyhow::anyhow!("resolvconf: {e}"))?;
            if !out.status.success() {
                anyhow::bail!(
                    "`resolvconf -a {ifname} -m 0 -x` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        DnsMode::File => {
            write_resolv(&format!(
                "# written by waygate-client for {ifname}; put back by `waygate-client down`\n{}",
                nameservers(servers)
            ))?;
        }
    }
    Ok(DnsUndo {
        mode,
        interface: ifname.to_string(),
        before,
        ours: read_resolv(),
    })
}

fn revert_dns(d: &DnsUndo) -> anyhow::Result<()> {
    let untouched = read_resolv() == d.ours;
    match d.mode {
        DnsMode::Resolved => {
            // The interface is usually gone already, and resolved forgot it with it.
            let _ = run(&["resolvectl", "revert", &d.interface]);
        }
        DnsMode::Resolvconf => {
            run(&["resolvconf", "-d", &d.interface, "-f"])?;
        }
        DnsMode::File => {}
    }
    // resolvconf regenerates the file from its own records, which need not be what was there
    // (a hand-written file): when nobody else changed it while the tunnel was up, the old
    // bytes go back exactly.
    if untouched && d.mode != DnsMode::Resolved && read_resolv() != d.before {
        match &d.before {
            Some(text) => write_resolv(text)?,
            None => {
                let _ = fs::remove_file(RESOLV_CONF);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undo_list_survives_its_file_and_reverts_backwards() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        let mut undo = Undo::default();
        for word in ["first", "second"] {
            undo.steps.push(Step::Command {
                argv: owned(&["sh", "-c", &format!("echo {word} >> {}", log.display())]),
            });
        }
        let sys = tmp.path().join("value");
        fs::write(&sys, "1").unwrap();
        undo.steps.push(Step::Sysctl {
            path: sys.clone(),
            value: "0".into(),
        });
        undo.save(tmp.path()).unwrap();
        let mut back = Undo::load(tmp.path()).unwrap().unwrap();
        assert_eq!(back, undo);
        assert!(back.revert().is_empty());
        assert_eq!(fs::read_to_string(&log).unwrap(), "second\nfirst\n");
        assert_eq!(fs::read_to_string(&sys).unwrap(), "0");
        Undo::forget(tmp.path());
        assert_eq!(Undo::load(tmp.path()).unwrap(), None);
    }

    fn plan(routing: Routing) -> Plan {
        Plan {
            interface: "wg9".into(),
            addresses: vec![
                "100.96.0.2/32".parse().unwrap(),
                "fd77::2/128".parse().unwrap(),
            ],
            mtu: 1420,
            routing,
            dns: vec![],
            ipv6: true,
        }
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match &c.revert {
                Some(r) => format!("{} / {}", c.apply.join(" "), r.join(" ")),
                None => c.apply.join(" "),
            })
            .collect()
    }

    #[test]
    fn full_tunnel_is_routed_as_wg_quick_routes_it() {
        let got = lines(&changes(&plan(Routing::Full)));
        let t = TABLE;
        let m = FWMARK;
        assert_eq!(
            got,
            [
                "ip link set dev wg9 mtu 1420 up".to_string(),
                "ip -4 address add 100.96.0.2/32 dev wg9".into(),
                "ip -6 address add fd77::2/128 dev wg9".into(),
                format!("ip -4 route add 0.0.0.0/0 dev wg9 table {t}"),
                format!("ip -4 rule add not fwmark {m} table {t} / ip -4 rule del not fwmark {m} table {t}"),
                "ip -4 rule add table main suppress_prefixlength 0 / ip -4 rule del table main suppress_prefixlength 0".into(),
                format!("ip -6 route add ::/0 dev wg9 table {t}"),
                format!("ip -6 rule add not fwmark {m} table {t} / ip -6 rule del not fwmark {m} table {t}"),
                "ip -6 rule add table main suppress_prefixlength 0 / ip -6 rule del table main suppress_prefixlength 0".into(),
            ]
        );
    }

    #[test]
    fn a_host_without_ipv6_gets_only_ipv4_changes() {
        let mut p = plan(Routing::Full);
        p.ipv6 = false;
        let got = lines(&changes(&p));
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(
            got.iter().all(|l| !l.contains("-6") && !l.contains("fd77")),
            "{got:?}"
        );
    }

    #[test]
    fn split_tunnels_route_only_what_they_name() {
        let t = TABLE;
        let include = lines(&changes(&plan(Routing::Include(vec!["198.18.0.0/15"
            .parse()
            .unwrap()]))));
        assert!(include.contains(&format!("ip -4 route add 198.18.0.0/15 dev wg9 table {t}")));
        assert!(
            !include.iter().any(|l| l.contains("suppress_prefixlength")),
            "{include:?}"
        );
        assert!(
            !include.iter().any(|l| l.starts_with("ip -6 rule")),
            "no IPv6 entries: {include:?}"
        );

        let exclude = lines(&changes(&plan(Routing::Exclude(vec!["192.168.0.0/16"
            .parse()
            .unwrap()]))));
        assert!(exclude.contains(&format!("ip -4 route add 0.0.0.0/0 dev wg9 table {t}")));
        assert!(exclude.contains(&format!(
            "ip -4 route add throw 192.168.0.0/16 table {t} / ip -4 route del throw 192.168.0.0/16 table {t}"
        )));
        assert!(exclude.iter().any(|l| l.contains("suppress_prefixlength")));
    }

    #[test]
    fn a_failed_step_is_reported_and_the_rest_still_run() {
        let tmp = tempfile::tempdir().unwrap();
        let mark = tmp.path().join("ran");
        let mut undo = Undo {
            steps: vec![
                Step::Command {
                    argv: owned(&["touch", mark.to_str().unwrap()]),
                },
                Step::Command {
                    argv: owned(&["false"]),
                },
            ],
        };
        let errors = undo.revert();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("`false` failed"), "{errors:?}");
        assert!(mark.exists());
    }
}
