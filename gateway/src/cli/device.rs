//! `waygate device enroll|list|show|revoke`: the operator's side of the registry.
//!
//! Every subcommand loads the same config as `waygate serve` to find the data directory and the
//! tunnel pools, so it acts on that gateway's registry: through the gateway's admin API when it
//! runs, else directly (see [`super::admin::with_admin`]); a running server picks the change up
//! within a second. Results go to stdout (the wg-quick config or its QR code, the table, the
//! JSON), everything meant for the operator's eyes only goes to stderr.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use super::admin::with_admin;
use super::{now, DeviceCommand, EnrollArgs};
use waygate_config::Config;
use waygate_control::ops::{Admin, Posture, SetVnet};
use waygate_control::time::utc;
use waygate_control::EnrollRequest;
use waygate_registry::Device;

/// Runs `waygate device`.
pub fn run(config: Option<&Path>, cmd: DeviceCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let out = with_admin(&cfg, |ops| run_with(ops, cmd))?;
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // `waygate device list | head` is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// One subcommand on `ops`; returns what goes to stdout.
fn run_with(ops: &dyn Admin, cmd: DeviceCommand) -> anyhow::Result<String> {
    Ok(match cmd {
        DeviceCommand::Enroll(args) => enroll(ops, args)?,
        DeviceCommand::List { json } => list(&ops.devices()?, json, now())?,
        DeviceCommand::Show { device } => {
            let d = ops.device(&device)?;
            let results = ops.posture_results(&d.id)?;
            format!("{}{}", show(&d), posture_lines(&results, now()))
        }
        DeviceCommand::SetVnet { device, vnet } => {
            let target = (vnet != "default").then_some(vnet);
            let d = ops.set_vnet(&device, SetVnet { vnet: target })?;
            eprintln!(
                "device {} is now in virtual network {}; new flows use it within a second",
                d.name,
                d.vnet_id.as_deref().unwrap_or("default")
            );
            String::new()
        }
        DeviceCommand::Posture {
            device,
            passed,
            failed,
        } => {
            let d = ops.set_posture(&device, Posture { passed, failed })?;
            eprintln!(
                "device {}: {} check(s) passed, {} failed; rules see them within a second",
                d.name,
                d.extras.posture_passed.len(),
                d.extras.posture_failed.len()
            );
            String::new()
        }
        DeviceCommand::Revoke { device } => {
            let d = ops.revoke(&device)?;
            eprintln!(
                "revoked device {} ({}) of {}; a running gateway drops it within a second",
                d.name, d.id, d.email
            );
            String::new()
        }
    })
}

fn enroll(ops: &dyn Admin, args: EnrollArgs) -> anyhow::Result<String> {
    let enrolled = ops.enroll(EnrollRequest {
        name: args.name,
        email: args.email,
        user_name: args.user_name,
        groups: args.groups,
        attributes: args.attributes,
        vnet: args.vnet,
        public_key: args.public_key,
    })?;
    let device = &enrolled.device;
    eprintln!(
        "enrolled device {} ({}) for {}, address {}, {}",
        device.name, device.id, device.email, device.ipv4, device.ipv6
    );
    if enrolled.endpoint_derived {
        eprintln!(
            "warning: wireguard.public_endpoint is not set; the config uses {}, derived \
             from this host's addresses. Set wireguard.public_endpoint if devices reach the \
             gateway through another address or name.",
            enrolled.endpoint
        );
    }
    if args.qr {
        return qr(&enrolled.wg_quick);
    }
    Ok(enrolled.wg_quick)
}

/// The text as a QR code in half blocks (two modules per character cell), light on dark as
/// terminals show it, with the quiet zone the scanners need.
fn qr(text: &str) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    // Level L keeps a full config (two keys, addresses, endpoint) at a size a phone reads off a
    // terminal; the screen is not a damaged print, so higher correction buys nothing.
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
        .context("the config does not fit in a QR code")?;
    let mut out = code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    out.push('\n');
    Ok(out)
}

fn list(devices: &[Device], json: bool, now: i64) -> anyhow::Result<String> {
    if json {
        let mut s = serde_json::to_string_pretty(&devices)?;
        s.push('\n');
        return Ok(s);
    }
    let header = [
        "ID",
        "NAME",
        "EMAIL",
        "IPV4",
        "PUBLIC KEY",
        "LAST SEEN",
        "STATUS",
    ];
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|d| {
            [
                d.id.clone(),
                d.name.clone(),
                d.email.clone(),
                d.ipv4.to_string(),
                d.public_key.to_string(),
                d.last_seen
                    .map_or_else(|| "never".to_string(), |t| ago(now, t)),
                status(d),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
            }
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    Ok(s)
}

fn status(d: &Device) -> String {
    match d.revoked_at {
        None => "active".to_string(),
        Some(_) => "revoked".to_string(),
    }
}

fn show(d: &Device) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_string());
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let fields: [(&str, String); 18] = [
        ("id", d.id.clone()),
        ("name", d.name.clone()),
        ("status", status(d)),
        ("email", d.email.clone()),
        ("user name", dash(&d.user_name)),
        (
            "groups",
            if d.groups.is_empty() {
                "-".to_string()
            } else {
                d.groups.join(", ")
            },
        ),
        ("group ids", list(&d.extras.group_ids)),
        ("attributes", list(&d.extras.attributes)),
        ("posture passed", list(&d.extras.posture_passed)),
        ("posture failed", list(&d.extras.posture_failed)),
        ("virtual network", dash(&d.vnet_id)),
        ("public key", d.public_key.to_string()),
        ("ipv4", d.ipv4.to_string()),
        ("ipv6", d.ipv6.to_string()),
        ("created", utc(d.created_at)),
        ("last seen", d.last_seen.map_or_else(|| "never".into(), utc)),
        (
            "last endpoint",
            d.last_endpoint
                .map_or_else(|| "-".into(), |e| e.to_string()),
        ),
        ("revoked", d.revoked_at.map_or_else(|| "-".into(), utc)),
    ];
    let mut s = String::new();
    for (k, v) in fields {
        let _ = writeln!(s, "{:<16} {v}", format!("{k}:"));
    }
    s
}

/// One line per posture result: the verdict (a pass past its expiry reads `expired`), when it
/// was reported, until when it counts, and the gateway's reason.
fn posture_lines(results: &[waygate_registry::PostureResult], now: i64) -> String {
    let mut s = String::new();
    for r in results {
        let verdict = match (r.passed, r.expires_at) {
            (true, Some(at)) if now >= at => "expired",
            (true, _) => "passed",
            (false, _) => "failed",
        };
        let until = r
            .expires_at
            .map_or_else(|| "never expires".into(), |at| format!("until {}", utc(at)));
        let _ = writeln!(
            s,
            "{:<16} {} {verdict} (reported {}, {until}){}",
            "posture check:",
            r.check_id,
            utc(r.reported_at),
            r.reason
                .as_deref()
                .map(|w| format!(": {w}"))
                .unwrap_or_default()
        );
    }
    s
}

/// `42s ago`, `5m ago`, `3h ago`, `2d ago`; the full time for anything older than a week.
fn ago(now: i64, then: i64) -> String {
    let d = now.saturating_sub(then).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        86_400..=604_799 => format!("{}d ago", d / 86_400),
        _ => utc(then),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use waygate_keys::PrivateKey;
    use waygate_registry::{NewDevice, Registry};

    fn device() -> Device {
        Device {
            id: "0b0e6a52-3f1e-4c1a-9d7e-1b2c3d4e5f60".into(),
            name: "alice".into(),
            public_key: PrivateKey::generate(&mut StdRng::seed_from_u64(1)).public_key(),
            ipv4: Ipv4Addr::new(100, 96, 0, 2),
            ipv6: "fd77:6761:7465::2".parse().unwrap(),
            email: "alice@example.com".into(),
            user_name: None,
            groups: vec!["eng".into(), "sre".into()],
            extras: Default::default(),
            vnet_id: None,
            created_at: 1_795_000_000,
            last_seen: None,
            last_endpoint: None,
            revoked_at: None,
        }
    }

    #[test]
    fn the_qr_code_is_square_half_blocks_with_a_quiet_zone() {
        let text = "[Interface]\nPrivateKey = x\n";
        let code = qr(text).unwrap();
        let lines: Vec<&str> = code.lines().collect();
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{code}");
        // One module per column, two per line, 4 quiet modules a side.
        let modules = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::L)
            .unwrap()
            .width();
        assert_eq!(width, modules + 8);
        assert_eq!(lines.len(), (modules + 8).div_ceil(2));
        assert!(code
            .chars()
            .all(|c| matches!(c, ' ' | '\u{2580}' | '\u{2584}' | '\u{2588}' | '\n')));
        // The quiet zone is light, printed as full blocks on a dark terminal.
        assert!(lines[0].chars().all(|c| c == '\u{2588}'), "{}", lines[0]);
    }

    #[test]
    fn times_are_readable() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_361_096), "2026-11-22 15:24:56 UTC");
        assert_eq!(ago(100, 58), "42s ago");
        assert_eq!(ago(4000, 100), "1h ago");
        assert_eq!(ago(10_000_000, 0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn posture_lines_say_expired_passes_and_reasons() {
        let r = |check: &str, passed, expires_at| waygate_registry::PostureResult {
            check_id: check.into(),
            passed,
            reported_at: 1_795_000_000,
            expires_at,
            reason: Some(format!("{check} reason")),
        };
        let text = posture_lines(
            &[
                r("a", true, Some(1_795_000_180)),
                r("b", true, Some(1_795_000_100)),
                r("c", false, Some(1_795_000_180)),
                r("d", true, None),
            ],
            1_795_000_150,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("a passed") && lines[0].contains(": a reason"),
            "{text}"
        );
        assert!(lines[1].contains("b expired"), "{text}");
        assert!(lines[2].contains("c failed"), "{text}");
        assert!(
            lines[3].contains("d passed") && lines[3].contains("never expires"),
            "{text}"
        );
    }

    #[test]
    fn show_lists_every_field() {
        let mut d = device();
        d.revoked_at = Some(1_795_000_100);
        let text = show(&d);
        for needle in [
            "id:              0b0e6a52",
            "status:          revoked",
            "groups:          eng, sre",
            "user name:       -",
            "last seen:       never",
            "ipv6:            fd77:6761:7465::2",
            "revoked:         2026-11-18",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
    }

    #[test]
    fn list_aligns_columns_and_json_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(tmp.path(), &Config::default().tunnel).unwrap();
        let mut new = NewDevice {
            name: None,
            email: "alice@example.com".into(),
            user_name: None,
            groups: vec!["eng".into()],
            attributes: vec![],
            vnet_id: None,
            public_key: device().public_key,
        };
        let a = reg.enroll(new.clone(), 10).unwrap();
        new.public_key = PrivateKey::generate(&mut StdRng::seed_from_u64(5)).public_key();
        new.name = Some("bob-laptop-with-a-long-name".into());
        reg.enroll(new, 11).unwrap();
        reg.record_last_seen(&[waygate_registry::Seen {
            device_id: a.id.clone(),
            at: 70,
            endpoint: None,
        }])
        .unwrap();
        reg.revoke("bob-laptop-with-a-long-name", 80).unwrap();

        let all = reg.all_devices().unwrap();
        let table = list(&all, false, 100).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let col = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(col(lines[0], "EMAIL"), col(lines[1], "alice@"));
        assert_eq!(col(lines[0], "STATUS"), col(lines[2], "revoked"));
        assert!(lines[1].contains("30s ago"), "{table}");
        assert!(lines[2].contains("never"), "{table}");

        let json: Vec<serde_json::Value> =
            serde_json::from_str(&list(&all, true, 100).unwrap()).unwrap();
        assert_eq!(json.len(), 2);
        assert_eq!(json[0]["name"], "alice");
        assert_eq!(json[0]["groups"][0], "eng");
        assert_eq!(json[1]["revoked_at"], 80);
    }
}
