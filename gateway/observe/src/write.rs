//! The writer: each reporting thread encodes its records into line buffers of its own, and one
//! thread takes those buffers and appends them to their files, rotating a file once it would
//! pass `max_size`.
//!
//! The data plane only ever calls [`LogSender::send`] or [`LogSender::dns`], which never block:
//! the record is encoded at once into the sender's buffer for its log (no record crosses a
//! thread, nothing is allocated per line), and when the buffer already holds its limit of lines
//! the record is dropped and counted. The thread swaps the buffers out in batches (every
//! [`BUSY_WAIT`] while lines keep coming, at once after a quiet spell), so a busy gateway makes a
//! few large writes rather than one per line. A failed write (a full disk: ENOSPC, or any other
//! error) drops the batch's lines for that file, counts them and cuts the file back to its last
//! whole line, so a reader never sees half a line; the next batch tries again.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime};

use waygate_model::activity::{Activity, DnsActivity};

use crate::record::{Clock, Encoder, LogKind};

/// Lines each sender holds per log before the writer takes them. A DNS flood of 100,000
/// queries a second fills it in 0.08 s if the disk stalls; what does not fit is dropped and
/// counted, never waited for.
pub const QUEUE: usize = 8192;
/// How long the thread waits for a line while quiet before it looks again (a sender wakes it
/// with its first line, so this only bounds a missed wake-up).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// How long the thread sleeps between batches while lines keep coming: at most this late on
/// disk, and the buffers ([`QUEUE`]) hold 800,000 lines a second at this pace.
pub const BUSY_WAIT: Duration = Duration::from_millis(10);
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

/// One log's lines encoded by a sender and not yet taken by the writer.
#[derive(Debug, Default)]
struct Lines {
    bytes: Vec<u8>,
    count: u64,
}

/// A sender's buffers, one per log, and the encoder filling them.
#[derive(Debug)]
struct Buffers {
    encoder: Encoder,
    logs: [Lines; LogKind::ALL.len()],
}

/// What the senders and the writer share.
#[derive(Debug)]
struct Shared {
    stats: Arc<LogStats>,
    /// Every live sender's buffers (a dropped sender's stay until the writer has taken them).
    buffers: Mutex<Vec<Arc<Mutex<Buffers>>>>,
    /// Live senders; the writer ends once this is zero and everything is written.
    senders: AtomicUsize,
    /// Lines a sender holds per log ([`LogSettings::queue`]).
    limit: u64,
    clock: Clock,
    writer: OnceLock<Thread>,
}

impl Shared {
    fn register(&self) -> Arc<Mutex<Buffers>> {
        let buffers = Arc::new(Mutex::new(Buffers {
            encoder: Encoder::new(self.clock),
            logs: Default::default(),
        }));
        lock(&self.buffers).push(buffers.clone());
        self.senders.fetch_add(1, Ordering::AcqRel);
        buffers
    }

    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

/// A lock that a panicked holder did not poison for the others: the buffers stay usable (at
/// worst a half-encoded line, which the writer cuts at the last newline).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The data plane's end: each clone has buffers of its own, so give each reporting thread its
/// own clone (they never wait for one another).
#[derive(Debug)]
pub struct LogSender {
    buffers: Arc<Mutex<Buffers>>,
    shared: Arc<Shared>,
}

impl Clone for LogSender {
    fn clone(&self) -> Self {
        LogSender {
            buffers: self.shared.register(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for LogSender {
    fn drop(&mut self) {
        self.shared.senders.fetch_sub(1, Ordering::AcqRel);
        self.shared.wake_writer();
    }
}

impl LogSender {
    /// Encodes `activity` into this sender's buffer for its file, or drops and counts it when
    /// the buffer is full; never blocks.
    pub fn send(&self, activity: Activity) {
        let kind = LogKind::of(&activity);
        self.put(kind, |enc, out| enc.encode(&activity, out));
    }

    /// Encodes the DNS record `activity` into this sender's buffer for `dns.jsonl`, or drops
    /// and counts it when the buffer is full; never blocks.
    pub fn dns(&self, activity: &DnsActivity<'_>) {
        self.put(LogKind::Dns, |enc, out| enc.encode_dns(activity, out));
    }

    fn put(&self, kind: LogKind, encode: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
        let first = {
            let mut b = lock(&self.buffers);
            let b = &mut *b;
            let lines = &mut b.logs[kind as usize];
            if lines.count >= self.shared.limit {
                self.shared
                    .stats
                    .add_dropped(kind, DropReason::QueueFull, 1);
                return;
            }
            encode(&mut b.encoder, &mut lines.bytes);
            lines.count += 1;
            lines.count == 1
        };
        // The writer sleeps while nothing is buffered: the first line wakes it (later ones
        // find it awake, or due within BUSY_WAIT).
        if first {
            self.shared.wake_writer();
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<LogStats> {
        &self.shared.stats
    }
}

/// The writer thread; it ends once every [`LogSender`] is dropped, after writing what was
/// buffered.
#[derive(Debug)]
pub struct LogWriter {
    thread: JoinHandle<()>,
}

impl LogWriter {
    /// Waits for the thread to write what is buffered and end (drop every sender first).
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
    #[allow(clippy::disallowed_methods)] // a shell: the one reading of the clocks for the lines
    let clock = Clock {
        instant: Instant::now(),
        wall: SystemTime::now(),
    };
    let shared = Arc::new(Shared {
        stats: Arc::new(LogStats::default()),
        buffers: Mutex::new(Vec::new()),
        senders: AtomicUsize::new(0),
        limit: settings.queue.max(1) as u64,
        clock,
        writer: OnceLock::new(),
    });
    let sender = LogSender {
        buffers: shared.register(),
        shared: shared.clone(),
    };
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("waygate-logs".into())
        .spawn(move || run(&for_thread, files))?;
    let _ = shared.writer.set(thread.thread().clone());
    Ok((sender, LogWriter { thread }))
}

fn run(shared: &Shared, mut files: Vec<Rotating>) {
    loop {
        // Read before taking the buffers: a sender that is gone by now buffered its last line
        // before it said so, and this round takes it.
        let closing = shared.senders.load(Ordering::Acquire) == 0;
        let taken = take_and_write(shared, &mut files);
        if closing {
            return;
        }
        // Busy: sleep, then take everything buffered meanwhile, so a flood costs one wake-up
        // and one write per file every BUSY_WAIT rather than one per line. Quiet: sleep until
        // a sender's first line wakes the thread, so a lone line is written at once.
        if taken > 1 {
            std::thread::sleep(BUSY_WAIT);
        } else {
            std::thread::park_timeout(IDLE_WAIT);
        }
    }
}

/// Swaps every sender's buffers for the files' empty ones and writes them; drops the buffers
/// of senders that are gone. The lines taken.
fn take_and_write(shared: &Shared, files: &mut [Rotating]) -> u64 {
    let all: Vec<Arc<Mutex<Buffers>>> = {
        let mut list = lock(&shared.buffers);
        let all = list.clone();
        // Only the list and `all` hold a gone sender's buffers: taken below for the last time.
        list.retain(|b| Arc::strong_count(b) > 2);
        all
    };
    let mut taken = 0;
    for buffers in &all {
        for (kind, file) in files.iter_mut().enumerate() {
            let count = {
                let mut b = lock(buffers);
                let lines = &mut b.logs[kind];
                if lines.count == 0 {
                    continue;
                }
                // The file's buffer is empty (written and cleared) and keeps its capacity: the
                // sender gets it back, so neither side allocates once both have grown.
                std::mem::swap(&mut lines.bytes, &mut file.pending);
                std::mem::take(&mut lines.count)
            };
            taken += count;
            file.flush(count, &shared.stats);
        }
    }
    taken
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

    /// Sends a DNS line for `name` through `tx`.
    #[allow(clippy::disallowed_methods)] // records need some instant
    fn dns(tx: &LogSender, name: &str) {
        let device = waygate_model::testkit::device().arc();
        tx.dns(&DnsActivity {
            at: Instant::now(),
            device: Some(&device),
            location: None,
            src_ip: "100.96.0.2".parse().unwrap(),
            query_name: name,
            query_type: 1,
            query_type_name: "A",
            rcode: 0,
            resolved_ips: &["203.0.113.7".parse().unwrap()],
            decision: ResolverDecision::AllowedOnNoPolicyMatch,
            policy: None,
            protocol: "udp",
            cache_hit: false,
            upstream_latency: None,
            query_categories: &[],
            matched_categories: &[],
            resolved_ip_categories: &[],
        });
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
            dns(&tx, &format!("host{i}.example"));
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
            dns(&tx, &format!("host{i}.example"));
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
            dns(&tx, &format!("host{i}.example"));
        }
        let stats = tx.stats().clone();
        drop(tx);
        writer.join();
        assert_eq!(stats.written(LogKind::Dns), 0);
        assert_eq!(stats.dropped(LogKind::Dns, DropReason::WriteError), 50);
        assert_eq!(stats.dropped(LogKind::Dns, DropReason::QueueFull), 0);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a clock for the encoder
    fn a_full_buffer_drops_lines_and_counts_them_without_blocking() {
        // No writer takes these buffers.
        let shared = Arc::new(Shared {
            stats: Arc::new(LogStats::default()),
            buffers: Mutex::new(Vec::new()),
            senders: AtomicUsize::new(0),
            limit: 2,
            clock: Clock {
                instant: Instant::now(),
                wall: SystemTime::now(),
            },
            writer: OnceLock::new(),
        });
        let tx = LogSender {
            buffers: shared.register(),
            shared,
        };
        for i in 0..5 {
            dns(&tx, &format!("host{i}.example"));
        }
        assert_eq!(tx.stats().dropped(LogKind::Dns, DropReason::QueueFull), 3);
        assert_eq!(
            tx.stats().dropped(LogKind::Network, DropReason::QueueFull),
            0
        );
        let b = lock(&tx.buffers);
        assert_eq!(b.logs[LogKind::Dns as usize].count, 2);
        assert_eq!(
            b.logs[LogKind::Dns as usize]
                .bytes
                .iter()
                .filter(|c| **c == b'\n')
                .count(),
            2
        );
    }

    #[test]
    fn every_clone_writes_and_the_writer_ends_when_the_last_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, writer) = spawn(settings(dir.path(), 1 << 24, 2)).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        dns(&tx, &format!("t{t}-{i}.example"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stats = tx.stats().clone();
        drop(tx);
        writer.join();
        assert_eq!(stats.written(LogKind::Dns), 4000);
        let text = std::fs::read_to_string(dir.path().join("dns.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 4000);
        for t in 0..4 {
            let names: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split("\"QueryName\":\"").nth(1))
                .filter(|n| n.starts_with(&format!("t{t}-")))
                .collect();
            assert_eq!(names.len(), 1000);
            // One sender's lines stay in the order it sent them.
            assert!(names[999].starts_with(&format!("t{t}-999.example")));
        }
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
