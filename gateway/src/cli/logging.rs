//! Log output of `waygate serve`: lines go through a bounded queue to a writer thread, so a slow
//! or stalled reader of stderr never blocks the threads that log (the data plane, the resolver).
//! When the queue is full, lines are dropped and counted; the count is reported as a WARN at most
//! once per [`DROP_REPORT_EVERY`] while it grows, and once more, straight to stderr, at exit.

use std::io::{self, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines waiting for stderr before new ones are dropped. At a few hundred bytes a line this
/// bounds the queue to a few MB (an unbounded one grew to 100 MB under a query flood).
pub const QUEUE_LINES: usize = 8192;
/// Dropped lines are reported at most this often.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// A non-blocking writer around `sink` that drops (and counts) lines beyond `lines` queued.
pub fn lossy<W: Write + Send + 'static>(sink: W, lines: usize) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines)
        .thread_name("waygate-log")
        .finish(sink)
}

/// Installed logging; keep it alive while the gateway runs. Dropping it flushes the queued lines
/// and reports the lines that were dropped.
pub struct Logging {
    counter: ErrorCounter,
    stop: Option<mpsc::Sender<()>>,
    reporter: Option<JoinHandle<()>>,
    guard: Option<WorkerGuard>,
}

/// Installs the global subscriber: `WAYGATE_LOG` filter (default `info`), ANSI colours when
/// stderr is a terminal, lines written to stderr off the calling thread.
pub fn init_stderr() -> anyhow::Result<Logging> {
    let filter = EnvFilter::try_from_env("WAYGATE_LOG")
        .or_else(|_| EnvFilter::try_new("info"))
        .context("invalid WAYGATE_LOG filter")?;
    let (writer, guard) = lossy(io::stderr(), QUEUE_LINES);
    let counter = writer.error_counter();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
    let (stop, stopped) = mpsc::channel();
    let reporter = {
        let counter = counter.clone();
        std::thread::Builder::new()
            .name("waygate-log-drops".into())
            .spawn(move || report_drops(&counter, &stopped))
            .context("cannot start the log reporter thread")?
    };
    Ok(Logging {
        counter,
        stop: Some(stop),
        reporter: Some(reporter),
        guard: Some(guard),
    })
}

/// Warns whenever the dropped-line count grew since the last look, until `stop` is dropped.
/// The warning itself goes through the same queue and may be dropped too; the next one then
/// carries the total.
fn report_drops(counter: &ErrorCounter, stop: &mpsc::Receiver<()>) {
    let mut seen = 0;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(DROP_REPORT_EVERY) {
        if let Some(new) = newly_dropped(&mut seen, counter.dropped_lines()) {
            tracing::warn!(
                dropped_lines = new,
                dropped_total = seen,
                "log lines dropped: stderr is not read fast enough"
            );
        }
    }
}

/// Lines dropped since `seen` was last updated, if any.
fn newly_dropped(seen: &mut usize, total: usize) -> Option<usize> {
    let new = total.checked_sub(*seen).filter(|&n| n > 0)?;
    *seen = total;
    Some(new)
}

impl Drop for Logging {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(reporter) = self.reporter.take() {
            let _ = reporter.join();
        }
        let before = self.counter.dropped_lines();
        if before > 0 {
            tracing::warn!(
                dropped_total = before,
                "log lines dropped: stderr was not read fast enough"
            );
        }
        // Flushes what is queued; tracing-appender gives up after about a second.
        drop(self.guard.take());
        let after = self.counter.dropped_lines();
        if after > before {
            // The line above may be among the dropped: say it straight, but never hang the
            // exit on a reader that has stopped reading.
            let line = format!(
                "waygate: {after} log line(s) were dropped because stderr was not read fast enough\n"
            );
            write_within(line, EXIT_WRITE_TIMEOUT);
        }
    }
}

/// How long the exit waits to tell stderr about dropped lines.
const EXIT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Writes `line` to stderr from a helper thread, waiting at most `timeout` for it: a stalled
/// pipe blocks the write (and holds stderr's lock) for good, and the process exits anyway.
fn write_within(line: String, timeout: Duration) {
    let (done, wait) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("waygate-log-exit".into())
        .spawn(move || {
            let _ = io::stderr().write_all(line.as_bytes());
            let _ = done.send(());
        });
    if spawned.is_ok() {
        let _ = wait.recv_timeout(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// A sink that blocks every write until the test lets go, like a stalled pipe reader.
    struct Stalled {
        gate: Arc<Mutex<()>>,
        written: Arc<Mutex<usize>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            *self.written.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_costs_writers_nothing_and_drops_are_counted() {
        let gate = Arc::new(Mutex::new(()));
        let written = Arc::new(Mutex::new(0));
        let closed = gate.lock().unwrap();
        let sink = Stalled {
            gate: gate.clone(),
            written: written.clone(),
        };
        let (mut writer, guard) = lossy(sink, 16);
        let counter = writer.error_counter();
        #[allow(clippy::disallowed_methods)] // measuring the test itself
        let started = Instant::now();
        for i in 0..1_000 {
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        #[allow(clippy::disallowed_methods)]
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "writers blocked for {took:?}"
        );
        // At most the queue and the one line the worker holds get through.
        let dropped = counter.dropped_lines();
        assert!(dropped >= 1_000 - 16 - 1, "dropped {dropped}");
        drop(closed);
        drop(guard);
        let written = *written.lock().unwrap();
        assert_eq!(written + dropped, 1_000, "every line written or counted");
    }

    #[test]
    fn drops_are_reported_only_when_they_grew() {
        let mut seen = 0;
        assert_eq!(newly_dropped(&mut seen, 0), None);
        assert_eq!(newly_dropped(&mut seen, 5), Some(5));
        assert_eq!(newly_dropped(&mut seen, 5), None);
        assert_eq!(newly_dropped(&mut seen, 12), Some(7));
        assert_eq!(seen, 12);
    }
}
