//! Reading the logs back (`waygate logs`): every file of a log from the oldest rotated one to
//! the current one, filtered by time and device, and following the current file across
//! rotations.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::record::{parse_datetime, LogKind};
use crate::write::rotated_index;

/// Which lines to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Lines at or after this time only.
    pub since: Option<SystemTime>,
    /// Lines of this device only: its id or its name.
    pub device: Option<String>,
}

impl Filter {
    /// Whether `line` passes.
    pub fn matches(&self, line: &Value) -> bool {
        if let Some(since) = self.since {
            let at = line
                .get("Datetime")
                .and_then(Value::as_str)
                .and_then(parse_datetime);
            if at.is_none_or(|at| at < since) {
                return false;
            }
        }
        if let Some(device) = &self.device {
            let is = |key: &str| line.get(key).and_then(Value::as_str) == Some(device.as_str());
            if !is("DeviceID") && !is("DeviceName") {
                return false;
            }
        }
        true
    }
}

/// The files of `kind` in `dir`, oldest first: `NAME.<n>.jsonl` down to `NAME.1.jsonl`, then
/// `NAME.jsonl`.
pub fn files(dir: &Path, kind: LogKind) -> Vec<PathBuf> {
    let mut rotated: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = rotated_index(kind, &e.file_name().to_string_lossy())?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(kind.file_name());
    if current.exists() {
        out.push(current);
    }
    out
}

/// Calls `show` for every line of `kind`'s files that passes `filter`, oldest first. Lines
/// that are not JSON objects are skipped.
pub fn read_all(
    dir: &Path,
    kind: LogKind,
    filter: &Filter,
    show: &mut dyn FnMut(LogKind, &str, &Value),
) -> io::Result<()> {
    for path in files(dir, kind) {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Rotated away between listing and opening: its lines are in the next file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).lines() {
            let line = line?;
            emit(kind, &line, filter, show);
        }
    }
    Ok(())
}

fn emit(kind: LogKind, line: &str, filter: &Filter, show: &mut dyn FnMut(LogKind, &str, &Value)) {
    if let Ok(value) = serde_json::from_str::<Value>(line) {
        if value.is_object() && filter.matches(&value) {
            show(kind, line, &value);
        }
    }
}

/// Follows one log's current file from its end: [`Follower::poll`] hands over the lines
/// appended since, and when the file is rotated reads what is left of the old one and goes on
/// with the new one.
#[derive(Debug)]
pub struct Follower {
    kind: LogKind,
    path: PathBuf,
    file: Option<(File, u64)>,
    partial: Vec<u8>,
}

impl Follower {
    /// Starts at the end of `kind`'s current file in `dir` (or at its start once it appears).
    pub fn new(dir: &Path, kind: LogKind) -> Follower {
        let path = dir.join(kind.file_name());
        let file = File::open(&path).ok().and_then(|mut f| {
            let ino = f.metadata().ok()?.ino();
            f.seek(SeekFrom::End(0)).ok()?;
            Some((f, ino))
        });
        Follower {
            kind,
            path,
            file,
            partial: Vec::new(),
        }
    }

    /// Calls `show` for every whole line appended since the last poll that passes `filter`.
    /// After a rotation the rest of the old file is read, then the rotated files newer than it
    /// (when the log rotated more than once since the last poll), then the new current file.
    /// Lines are lost only when rotated past `logs.keep` before a poll sees them.
    pub fn poll(
        &mut self,
        filter: &Filter,
        show: &mut dyn FnMut(LogKind, &str, &Value),
    ) -> io::Result<()> {
        loop {
            self.drain(filter, show)?;
            let now = std::fs::metadata(&self.path).ok().map(|m| m.ino());
            let ours = self.file.as_ref().map(|(_, ino)| *ino);
            if now.is_none() || now == ours {
                return Ok(());
            }
            // The writer renames its file only after its last write to it, so this read gets
            // the old file's end.
            self.drain(filter, show)?;
            if let (Some(ours), Some(dir)) = (ours, self.path.parent()) {
                let rotated: Vec<PathBuf> = files(dir, self.kind)
                    .into_iter()
                    .filter(|p| *p != self.path)
                    .collect();
                let inode = |p: &PathBuf| std::fs::metadata(p).ok().map(|m| m.ino());
                let newer = match rotated.iter().position(|p| inode(p) == Some(ours)) {
                    Some(i) => &rotated[i + 1..],
                    // Ours is gone already: every rotated file left is newer.
                    None => &rotated[..],
                };
                for path in newer {
                    if let Ok(f) = File::open(path) {
                        for line in BufReader::new(f).lines() {
                            emit(self.kind, &line?, filter, show);
                        }
                    }
                }
            }
            self.partial.clear();
            self.file = match File::open(&self.path) {
                Ok(f) => {
                    let ino = f.metadata()?.ino();
                    Some((f, ino))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
        }
    }

    /// Shows what was appended to the file held open.
    fn drain(
        &mut self,
        filter: &Filter,
        show: &mut dyn FnMut(LogKind, &str, &Value),
    ) -> io::Result<()> {
        if let Some((file, _)) = &mut self.file {
            file.read_to_end(&mut self.partial)?;
            self.show_lines(filter, show);
        }
        Ok(())
    }

    fn show_lines(&mut self, filter: &Filter, show: &mut dyn FnMut(LogKind, &str, &Value)) {
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let whole: Vec<u8> = self.partial.drain(..=end).collect();
        for line in String::from_utf8_lossy(&whole).lines() {
            emit(self.kind, line, filter, show);
        }
    }
}

/// One line as a row of `waygate logs`' table.
pub fn human(kind: LogKind, v: &Value) -> String {
    let s = |key: &str| -> String {
        match v.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    };
    let or_dash = |text: String| {
        if text.is_empty() {
            "-".to_string()
        } else {
            text
        }
    };
    let device = or_dash(if s("DeviceName").is_empty() {
        s("SrcIP")
    } else {
        s("DeviceName")
    });
    let time = s("Datetime");
    let detail = match kind {
        LogKind::Dns => {
            let ips: Vec<String> = v
                .get("ResolvedIPs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let ids = |key: &str| -> String {
                v.get(key)
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            };
            let mut row = format!(
                "{} {} rcode={} {} policy={}",
                s("QueryName"),
                s("QueryTypeName"),
                s("RCode"),
                s("ResolverDecision"),
                or_dash(s("PolicyID")),
            );
            if v.get("IsResponseCached").and_then(Value::as_bool) == Some(true) {
                row.push_str(" cached");
            }
            for (key, label) in [
                ("QueryCategoryIDs", "categories"),
                ("MatchedCategoryIDs", "matched"),
            ] {
                let list = ids(key);
                if !list.is_empty() {
                    row.push_str(&format!(" {label}={list}"));
                }
            }
            row.push(' ');
            row.push_str(&ips.join(","));
            row
        }
        LogKind::Network => format!(
            "{} {}:{} -> {}:{} {} policy={} sent={} received={} {}ms",
            s("Transport"),
            s("SourceIP"),
            s("SourcePort"),
            s("DestinationIP"),
            s("DestinationPort"),
            s("Action"),
            or_dash(s("PolicyID")),
            s("BytesSent"),
            s("BytesReceived"),
            s("DurationMs"),
        ),
        LogKind::Egress => format!(
            "{} {}:{} -> {}:{} egress={} policy={} {}",
            s("Transport"),
            s("SourceIP"),
            s("SourcePort"),
            s("DestinationIP"),
            s("DestinationPort"),
            or_dash(s("EgressIP")),
            or_dash(s("PolicyID")),
            s("Fqdn"),
        ),
        LogKind::Http => format!("{} {} {}", s("HTTPMethod"), s("URL"), s("Action")),
    };
    format!(
        "{time:<24}  {:<7}  {device:<16}  {}",
        kind.name(),
        detail.trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn filters_by_time_and_device() {
        let line: Value = serde_json::from_str(
            r#"{"Datetime":"2026-07-27T00:01:07.123Z","DeviceID":"d-1","DeviceName":"laptop"}"#,
        )
        .unwrap();
        let at = parse_datetime("2026-07-27T00:01:07.123Z").unwrap();
        let f = |since: Option<SystemTime>, device: Option<&str>| Filter {
            since,
            device: device.map(String::from),
        };
        assert!(f(None, None).matches(&line));
        assert!(f(Some(at), Some("laptop")).matches(&line));
        assert!(f(None, Some("d-1")).matches(&line));
        assert!(!f(None, Some("phone")).matches(&line));
        assert!(!f(Some(at + std::time::Duration::from_millis(1)), None).matches(&line));
    }

    #[test]
    fn dns_rows_show_the_answer_the_cache_and_the_categories() {
        let line: Value = serde_json::from_str(
            r#"{"Datetime":"2026-07-27T00:01:07.123Z","QueryID":"x","DeviceID":"d-1",
                "DeviceName":"laptop","Email":"ada@example.com","QueryName":"casino.example",
                "QueryTypeName":"A","RCode":0,"ResolvedIPs":["203.0.113.7"],
                "ResolverDecision":"allowedByQueryName","PolicyID":"r1","IsResponseCached":true,
                "QueryCategoryIDs":[8,99],"MatchedCategoryIDs":[99]}"#,
        )
        .unwrap();
        assert_eq!(
            human(LogKind::Dns, &line),
            "2026-07-27T00:01:07.123Z  dns      laptop            casino.example A rcode=0 \
             allowedByQueryName policy=r1 cached categories=8,99 matched=99 203.0.113.7"
        );
        // A location's query: no device name, no policy, not cached, no categories.
        let line: Value = serde_json::from_str(
            r#"{"Datetime":"2026-07-27T00:01:07.123Z","DeviceID":"","Email":"","SrcIP":"192.0.2.9",
                "QueryName":"b.example","QueryTypeName":"AAAA","RCode":5,
                "ResolverDecision":"blockedByQueryName","PolicyID":"","IsResponseCached":false}"#,
        )
        .unwrap();
        assert_eq!(
            human(LogKind::Dns, &line),
            "2026-07-27T00:01:07.123Z  dns      192.0.2.9         b.example AAAA rcode=5 \
             blockedByQueryName policy=-"
        );
    }

    #[test]
    fn following_goes_on_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join("dns.jsonl");
        append(&current, "{\"QueryName\":\"before.example\"}\n");
        let mut follower = Follower::new(dir.path(), LogKind::Dns);
        let seen = std::cell::RefCell::new(Vec::new());
        let mut show = |_: LogKind, _: &str, v: &Value| {
            seen.borrow_mut()
                .push(v["QueryName"].as_str().unwrap_or("").to_string())
        };
        let filter = Filter::default();
        follower.poll(&filter, &mut show).unwrap();
        append(
            &current,
            "{\"QueryName\":\"one.example\"}\n{\"QueryName\":\"tw",
        );
        follower.poll(&filter, &mut show).unwrap();
        append(&current, "o.example\"}\n");
        // Rotated: the old file gets no more lines, a new one starts.
        std::fs::rename(&current, dir.path().join("dns.1.jsonl")).unwrap();
        append(&current, "{\"QueryName\":\"three.example\"}\n");
        follower.poll(&filter, &mut show).unwrap();
        assert_eq!(
            *seen.borrow(),
            ["one.example", "two.example", "three.example"]
        );
        // Two rotations between polls: the file in between is read from the rotated ones.
        append(&current, "{\"QueryName\":\"four.example\"}\n");
        std::fs::rename(
            dir.path().join("dns.1.jsonl"),
            dir.path().join("dns.2.jsonl"),
        )
        .unwrap();
        std::fs::rename(&current, dir.path().join("dns.1.jsonl")).unwrap();
        append(&current, "{\"QueryName\":\"five.example\"}\n");
        std::fs::rename(
            dir.path().join("dns.1.jsonl"),
            dir.path().join("dns.2.jsonl"),
        )
        .unwrap();
        std::fs::rename(&current, dir.path().join("dns.1.jsonl")).unwrap();
        append(&current, "{\"QueryName\":\"six.example\"}\n");
        follower.poll(&filter, &mut show).unwrap();
        assert_eq!(
            *seen.borrow(),
            [
                "one.example",
                "two.example",
                "three.example",
                "four.example",
                "five.example",
                "six.example"
            ]
        );
    }
}
