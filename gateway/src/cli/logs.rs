//! `waygate logs`: the activity logs of `logs.dir`, as a table or as the JSON lines written,
//! filtered by log, device and age, optionally followed as they grow (across rotations).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use serde_json::Value;
use waygate_observe::read::{self, Filter, Follower};
use waygate_observe::LogKind;

use super::LogsArgs;

/// How often a followed log is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// A duration such as `30s`, `10m`, `2h` or `1d`.
fn parse_since(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// Runs `waygate logs`.
pub fn run(config: Option<&Path>, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let config = waygate_config::Config::load(config)?;
    let Some(dir) = config.logs.dir else {
        bail!("logs.dir is not set in the config: the gateway keeps no activity logs");
    };
    let kinds: Vec<LogKind> = match &args.kind {
        Some(k) => vec![LogKind::from_name(k).context("unknown --type")?],
        None => LogKind::ALL.to_vec(),
    };
    #[allow(clippy::disallowed_methods)] // the CLI is a shell
    let now = SystemTime::now();
    let since = match &args.since {
        Some(text) => Some(
            now.checked_sub(parse_since(text).with_context(|| {
                format!("--since: expected a duration like 30s, 10m, 2h or 1d, got {text:?}")
            })?)
            .unwrap_or(SystemTime::UNIX_EPOCH),
        ),
        None => None,
    };
    let filter = Filter {
        since,
        device: args.device.clone(),
    };
    let mut printer = Printer {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        json: args.json,
        failed: None,
    };
    // Followers start before the files are read, so no line falls between the two.
    let mut followers: Vec<Follower> = if args.follow {
        kinds.iter().map(|k| Follower::new(&dir, *k)).collect()
    } else {
        Vec::new()
    };
    if let [kind] = kinds.as_slice() {
        read::read_all(&dir, *kind, &filter, &mut |k, l, v| printer.show(k, l, v))?;
    } else {
        // Several logs: one listing ordered by Datetime (each file is in order already).
        let mut lines: Vec<(String, LogKind, String, Value)> = Vec::new();
        for kind in &kinds {
            read::read_all(&dir, *kind, &filter, &mut |k, line, v| {
                let at = v.get("Datetime").and_then(Value::as_str).unwrap_or("");
                lines.push((at.to_string(), k, line.to_string(), v.clone()));
            })?;
        }
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, k, line, v) in &lines {
            printer.show(*k, line, v);
        }
    }
    printer.flush();
    while args.follow && printer.failed.is_none() {
        for f in &mut followers {
            f.poll(&filter, &mut |k, l, v| printer.show(k, l, v))?;
        }
        printer.flush();
        std::thread::sleep(FOLLOW_EVERY);
    }
    match printer.failed {
        // A closed pipe (`| head`) ends the listing quietly.
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Prints lines until stdout fails, then remembers why.
struct Printer<W: std::io::Write> {
    out: W,
    json: bool,
    failed: Option<std::io::Error>,
}

impl<W: std::io::Write> Printer<W> {
    fn show(&mut self, kind: LogKind, line: &str, value: &Value) {
        if self.failed.is_some() {
            return;
        }
        let written = if self.json {
            writeln!(self.out, "{line}")
        } else {
            writeln!(self.out, "{}", read::human(kind, value))
        };
        if let Err(e) = written {
            self.failed = Some(e);
        }
    }

    fn flush(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.out.flush() {
                self.failed = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_seconds_minutes_hours_and_days() {
        assert_eq!(parse_since("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_since("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_since("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_since("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_since("10"), None);
        assert_eq!(parse_since("m"), None);
        assert_eq!(parse_since("5w"), None);
    }
}
