//! The writer: a bounded queue into one thread that encodes the records and appends them to
//! their files, rotating a file once it would pass `max_size`.
//!
//! The data plane only ever calls [`LogSender::send`], which never blocks: when the queue is
//! full the record is dropped and counted. The thread writes in batches (everything queued,
//! then one write per file), so a busy gateway makes a few large writes rather than one per
//! line. A failed write (a full disk: ENOSPC, or any other error) drops the batch's lines for
//! that file, counts them and cuts the file back to its last whole line, so a reader never
//! sees half a line; the next batch tries again.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use waygate_model::activity::Activity;

use crate::record::{Clock, Encoder, LogKind};

/// Records waiting for the writer thread. A DNS flood of 100,000 queries a second fills it in
/// 0.08 s if the disk stalls; what does not fit is dropped and counted, never waited for.
pub const QUEUE: usize = 8192;
/// Encoded bytes per file kept before they are written even while more records are queued.
const BATCH_BYTES: usize = 256 * 1024;
/// How long the thread waits for a record while quiet before it looks again.
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// How long the thread sleeps between batches while records keep coming: at most this late on
/// disk, and the queue ([`QUEUE`]) holds 800,000 records a second at this pace.
const BUSY_WAIT: Duration = Duration::from_millis(10);
/// Write errors are logged at most this often per file.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Where and how much: `logs.dir`, `logs.max_size`, `logs.keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The directory of the files (created if missing).
    pub dir: PathBuf,
    /// Size in bytes at which a file is rotated.
    pub max_size: u64,
    /// Rotated files kept per log.
    pub keep: usize,
    /// Records the queue holds (see [`QUEUE`]).
    pub queue: usize,
}

/// Why a line was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The writer's queue was full.
    QueueFull,
    /// The write failed (a full disk, a removed directory, ...).
    WriteError,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 2] = [DropReason::QueueFull, DropReason::WriteError];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::WriteError => "write_error",
        }
    }
}

/// Lines written and dropped per log, shared by the senders and the writer.
#[derive(Debug, Default)]
pub struct LogStats {
    written: [AtomicU64; LogKind::ALL.len()],
    dropped: [[AtomicU64; DropReason::ALL.len()]; LogKind::ALL.len()],
    rotations: [AtomicU64; LogKind::ALL.len()],
}

impl LogStats {
    /// Lines written to `kind`'s files.
    pub fn written(&self, kind: LogKind) -> u64 {
        self.written[kind as usize].load(Ordering::Relaxed)
    }

    /// Lines of `kind` dropped for `reason`.
    pub fn dropped(&self, kind: LogKind, reason: DropReason) -> u64 {
        self.dropped[kind as usize][reason as usize].load(Ordering::Relaxed)
    }

    /// Times `kind`'s file was rotated.
    pub fn rotations(&self, kind: LogKind) -> u64 {
        self.rotations[kind as usize].load(Ordering::Relaxed)
    }

    fn add_dropped(&self, kind: LogKind, reason: DropReason, n: u64) {
        self.dropped[kind as usize][reason as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// The data plane's end of the queue; clone it for each thread that reports.
#[derive(Debug, Clone)]
pub struct LogSender {
    queue: SyncSender<Activity>,
    stats: Arc<LogStats>,
}

impl LogSender {
    /// Queues `activity` for its file, or drops and counts it when the queue is full; never
    /// blocks.
    pub fn send(&self, activity: Activity) {
        match self.queue.try_send(activity) {
            Ok(()) => {}
            Err(TrySendError::Full(a)) => {
                self.stats
                    .add_dropped(LogKind::of(&a), DropReason::QueueFull, 1);
            }
            // The writer is gone (the gateway is stopping): nothing to count.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }
}

/// The writer thread; it ends once every [`LogSender`] is dropped, after writing what was
/// queued.
#[derive(Debug)]
pub struct LogWriter {
    thread: JoinHandle<()>,
}

impl LogWriter {
    /// Waits for the thread to write what is queued and end (drop every sender first).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Creates `settings.dir`, opens the files and starts the writer thread. The HTTP log is
/// created too, empty until the HTTP stage writes to it.
pub fn spawn(settings: LogSettings) -> io::Result<(LogSender, LogWriter)> {
    std::fs::create_dir_all(&settings.dir)?;
    let mut files = Vec::with_capacity(LogKind::ALL.len());
    for kind in LogKind::ALL {
        files.push(Rotating::open(
            &settings.dir,
            kind,
            settings.max_size,
            settings.keep,
        )?);
    }
    let (queue, rx) = mpsc::sync_channel(settings.queue.max(1));
    let stats = Arc::new(LogStats::default());
    let shared = stats.clone();
    #[allow(clippy::disallowed_methods)] // a shell: the one reading of the clocks for the lines
    let clock = Clock {
        instant: Instant::now(),
        wall: SystemTime::now(),
    };
    let thread = std::thread::Builder::new()
        .name("waygate-logs".into())
        .spawn(move || run(rx, files, clock, &shared))?;
    Ok((LogSender { queue, stats }, LogWriter { thread }))
}

fn run(rx: Receiver<Activity>, mut files: Vec<Rotating>, clock: Clock, stats: &LogStats) {
    let mut encoder = Encoder::new(clock);
    let mut lines = [0u64; LogKind::ALL.len()];
    let mut busy = false;
    loop {
        // Busy: sleep, then take everything queued meanwhile, so a flood costs one wake-up and
        // one write per file every BUSY_WAIT rather than one per record. Quiet: wait for the
        // next record, so a lone line is written at once.
        let first = if busy {
            std::thread::sleep(BUSY_WAIT);
            match rx.try_recv() {
                Ok(a) => Some(a),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv_timeout(IDLE_WAIT) {
                Ok(a) => Some(a),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut taken = 0usize;
        let mut next = first;
        while let Some(activity) = next {
            let kind = LogKind::of(&activity);
            encoder.encode(&activity, &mut files[kind as usize].pending);
            drop(activity);
            lines[kind as usize] += 1;
            taken += 1;
            if files[kind as usize].pending.len() >= BATCH_BYTES {
                let n = std::mem::take(&mut lines[kind as usize]);
                files[kind as usize].flush(n, stats);
            }
            next = rx.try_recv().ok();
        }
        for (file, n) in files.iter_mut().zip(lines.iter_mut()) {
            if *n > 0 {
                file.flush(std::mem::take(n), stats);
            }
        }
        busy = taken > 1;
    }
}

/// One log's current file, its rotated files and the lines waiting for it.
struct Rotating {
    kind: LogKind,
    dir: PathBuf,
    max_size: u64,
    keep: usize,
    file: Option<File>,
    /// Bytes of whole lines in the current file.
    size: u64,
    pending: Vec<u8>,
    last_error_log: Option<Instant>,
}

impl Rotating {
    fn open(dir: &Path, kind: LogKind, max_size: u64, keep: usize) -> io::Result<Rotating> {
        let mut r = Rotating {
            kind,
            dir: dir.to_path_buf(),
            max_size,
            keep,
            file: None,
            size: 0,
            pending: Vec::new(),
            last_error_log: None,
        };
        r.reopen()?;
        r.prune();
        Ok(r)
    }

    fn current(&self) -> PathBuf {
        self.dir.join(self.kind.file_name())
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.current())?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    /// Removes rotated files past `keep` (left by a larger `keep` before).
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(n) = rotated_index(self.kind, &name.to_string_lossy()) else {
                continue;
            };
            if n > self.keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// `NAME.jsonl` becomes `NAME.1.jsonl`, each `NAME.i.jsonl` becomes `NAME.(i+1).jsonl`, and
    /// the one past `keep` goes.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let path = |n: usize| self.dir.join(self.kind.rotated_name(n));
        if self.keep == 0 {
            std::fs::remove_file(self.current())?;
        } else {
            let _ = std::fs::remove_file(path(self.keep));
            for n in (1..self.keep).rev() {
                match std::fs::rename(path(n), path(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(self.current(), path(1))?;
        }
        self.reopen()
    }

    /// Writes the `lines` waiting (rotating whenever the next lines would pass `max_size`), or
    /// drops and counts the ones that could not be written.
    fn flush(&mut self, lines: u64, stats: &LogStats) {
        let mut rotations = 0;
        let result = self.write_pending(&mut rotations);
        let kind = self.kind as usize;
        stats.rotations[kind].fetch_add(rotations, Ordering::Relaxed);
        match result {
            Ok(()) => {
                stats.written[kind].fetch_add(lines, Ordering::Relaxed);
            }
            Err((err, done)) => {
                let lost = self.pending[done..].iter().filter(|b| **b == b'\n').count() as u64;
                stats.written[kind].fetch_add(lines.saturating_sub(lost), Ordering::Relaxed);
                stats.add_dropped(self.kind, DropReason::WriteError, lost);
                self.log_error(&err, lost);
            }
        }
        self.pending.clear();
    }

    /// Writes `pending` in runs of whole lines that fit the current file; on failure, the
    /// error and how many bytes were written.
    fn write_pending(&mut self, rotations: &mut u64) -> Result<(), (io::Error, usize)> {
        let mut start = 0;
        while start < self.pending.len() {
            let room =
                usize::try_from(self.max_size.saturating_sub(self.size)).unwrap_or(usize::MAX);
            let rest = &self.pending[start..];
            // The longest run of whole lines that fits.
            let fit = if rest.len() <= room {
                rest.len()
            } else {
                rest[..room]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1)
            };
            let take = if fit > 0 {
                fit
            } else if self.size > 0 {
                *rotations += 1;
                self.rotate().map_err(|e| (e, start))?;
                continue;
            } else {
                // One line longer than max_size: a file of its own.
                rest.iter()
                    .position(|b| *b == b'\n')
                    .map_or(rest.len(), |i| i + 1)
            };
            self.write_run(start, take).map_err(|e| (e, start))?;
            start += take;
        }
        Ok(())
    }

    fn write_run(&mut self, start: usize, len: usize) -> io::Result<()> {
        if self.file.is_none() {
            self.reopen()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("log file not open"));
        };
        match file.write_all(&self.pending[start..start + len]) {
            Ok(()) => {
                self.size += len as u64;
                Ok(())
            }
            Err(err) => {
                // Part of the run may be on disk: cut back to the last whole line, which also
                // frees what the failed write took on a full disk.
                let _ = file.set_len(self.size);
                Err(err)
            }
        }
    }

    fn log_error(&mut self, err: &io::Error, lines: u64) {
        #[allow(clippy::disallowed_methods)] // a shell: paces its own warnings
        let now = Instant::now();
        if self
            .last_error_log
            .is_some_and(|t| now.saturating_duration_since(t) < ERROR_LOG_EVERY)
        {
            return;
        }
        self.last_error_log = Some(now);
        tracing::warn!(
            file = %self.current().display(),
            %err,
            lines,
            "activity log lines dropped: cannot write (counted in waygate_log_lines_dropped_total; said at most once per 10 s per file)"
        );
    }
}

/// `n` for `NAME.n.jsonl` of `kind`.
pub fn rotated_index(kind: LogKind, file_name: &str) -> Option<usize> {
    let rest = file_name.strip_prefix(kind.name())?.strip_prefix('.')?;
    let n = rest.strip_suffix(".jsonl")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use waygate_model::activity::{DnsActivity, ResolverDecision};

    #[allow(clippy::disallowed_methods)] // records need some instant
    fn dns(name: &str) -> Activity {
        Activity::Dns(DnsActivity {
            at: Instant::now(),
            device: Some(waygate_model::testkit::device().arc()),
            location: None,
            src_ip: "100.96.0.2".parse().unwrap(),
            query_id: 1,
            query_name: Arc::from(name),
            query_type: 1,
            query_type_name: "A",
            rcode: 0,
            resolved_ips: vec!["203.0.113.7".parse().unwrap()],
            decision: ResolverDecision::AllowedOnNoPolicyMatch,
            policy: None,
            protocol: "udp",
            cache_hit: false,
            upstream_latency: None,
        })
    }

    fn settings(dir: &Path, max_size: u64, keep: usize) -> LogSettings {
        LogSettings {
            dir: dir.to_path_buf(),
            max_size,
            keep,
            queue: QUEUE,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn files_rotate_by_size_and_keep_at_most_keep_rotated_ones() {
        let dir = tempfile::tempdir().unwrap();
        // A stale rotated file past `keep`, from an earlier larger `keep`.
        std::fs::write(dir.path().join("dns.7.jsonl"), "{}\n").unwrap();
        let (tx, writer) = spawn(settings(dir.path(), 4096, 2)).unwrap();
        for i in 0..400 {
            tx.send(dns(&format!("host{i}.example")));
        }
        let stats = tx.stats().clone();
        drop(tx);
        writer.join();
        assert_eq!(
            names(dir.path()),
            [
                "dns.1.jsonl",
                "dns.2.jsonl",
                "dns.jsonl",
                "egress.jsonl",
                "http.jsonl",
                "network.jsonl"
            ]
        );
        assert_eq!(stats.written(LogKind::Dns), 400);
        assert!(
            stats.rotations(LogKind::Dns) > 2,
            "{}",
            stats.rotations(LogKind::Dns)
        );
        let mut last = String::new();
        for name in ["dns.2.jsonl", "dns.1.jsonl", "dns.jsonl"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.len() as u64 <= 4096, "{name} has {} bytes", text.len());
            assert!(text.ends_with('\n'));
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                last = v["QueryName"].as_str().unwrap().to_string();
            }
        }
        // Oldest to newest, the current file ends with the last line sent.
        assert_eq!(last, "host399.example");
        // The reader sees the same files in the same order.
        let mut seen = Vec::new();
        crate::read::read_all(
            dir.path(),
            LogKind::Dns,
            &Default::default(),
            &mut |_, _, v| seen.push(v["QueryName"].as_str().unwrap().to_string()),
        )
        .unwrap();
        assert_eq!(seen.last().map(String::as_str), Some("host399.example"));
        let first: usize = seen[0]
            .trim_start_matches("host")
            .trim_end_matches(".example")
            .parse()
            .unwrap();
        assert_eq!(seen.len(), 400 - first, "contiguous up to the last line");
    }

    #[test]
    fn keep_zero_keeps_only_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, writer) = spawn(settings(dir.path(), 4096, 0)).unwrap();
        for i in 0..200 {
            tx.send(dns(&format!("host{i}.example")));
        }
        drop(tx);
        writer.join();
        assert!(!dir.path().join("dns.1.jsonl").exists());
        let text = std::fs::read_to_string(dir.path().join("dns.jsonl")).unwrap();
        assert!(text.len() <= 4096 && text.contains("host199.example"));
    }

    #[test]
    fn a_full_disk_drops_lines_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        // Every write to /dev/full fails with ENOSPC.
        std::os::unix::fs::symlink("/dev/full", dir.path().join("dns.jsonl")).unwrap();
        let (tx, writer) = spawn(settings(dir.path(), 1 << 20, 2)).unwrap();
        for i in 0..50 {
            tx.send(dns(&format!("host{i}.example")));
        }
        let stats = tx.stats().clone();
        drop(tx);
        writer.join();
        assert_eq!(stats.written(LogKind::Dns), 0);
        assert_eq!(stats.dropped(LogKind::Dns, DropReason::WriteError), 50);
        assert_eq!(stats.dropped(LogKind::Dns, DropReason::QueueFull), 0);
    }

    #[test]
    fn a_full_queue_drops_records_and_counts_them_without_blocking() {
        // No writer drains this queue.
        let (queue, _rx) = mpsc::sync_channel(2);
        let tx = LogSender {
            queue,
            stats: Arc::new(LogStats::default()),
        };
        for i in 0..5 {
            tx.send(dns(&format!("host{i}.example")));
        }
        assert_eq!(tx.stats().dropped(LogKind::Dns, DropReason::QueueFull), 3);
        assert_eq!(
            tx.stats().dropped(LogKind::Network, DropReason::QueueFull),
            0
        );
    }

    #[test]
    fn rotated_names_are_recognised() {
        assert_eq!(rotated_index(LogKind::Dns, "dns.3.jsonl"), Some(3));
        assert_eq!(rotated_index(LogKind::Dns, "dns.jsonl"), None);
        assert_eq!(rotated_index(LogKind::Dns, "dns.0.jsonl"), None);
        assert_eq!(rotated_index(LogKind::Dns, "network.1.jsonl"), None);
        assert_eq!(rotated_index(LogKind::Dns, "dns.x.jsonl"), None);
    }
}
