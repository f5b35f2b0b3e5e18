//! Harness for Waygate's end-to-end tests: the lab's namespaces, processes and their cleanup.
//!
//! A [`Lab`] is one `scripts/lab.sh up <prefix>` (gateway, two device and an Internet namespace)
//! with a `waygate serve` running in the gateway namespace on a fresh data dir. Devices are
//! enrolled with `waygate device enroll` and brought up with stock `wg-quick` + `wireguard-go`.
//! Dropping the lab (also while unwinding from a failed assertion) kills every process it started
//! by pid and deletes its namespaces; on a failure it first prints the gateway's log tail.
//!
//! Env: `WAYGATE_SKIP_E2E=1` skips the tests when not root; `WAYGATE_BIN`, `WAYGATE_CLIENT_BIN`,
//! `LAB_ORIGIN` name the binaries (default: `$CARGO_TARGET_DIR` or `<root>/target`, `debug/`);
//! `WAYGATE_E2E_LOG` is the gateway's `WAYGATE_LOG` (default `info`); `WAYGATE_E2E_KEEP=1` keeps
//! each lab's temp dir (config, data dir, gateway log, device configs); `WAYGATE_E2E_THREADS=N`
//! sets the gateway's `wireguard.threads` (default: the gateway's own, one shard per core).
#![deny(missing_docs)]
// The harness is an I/O shell: it measures wall-clock deadlines itself.
#![allow(clippy::disallowed_methods)]

pub mod dns_floor;
pub mod dns_origin;
pub mod link;
pub mod wg_flood;

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Env var that turns the e2e tests into no-ops when not running as root.
pub const SKIP_ENV: &str = "WAYGATE_SKIP_E2E";
/// The gateway's egress address in the lab (`egress.default_ipv4`).
pub const EGRESS_V4: &str = "192.0.2.1";
/// The gateway's own tunnel address.
pub const GATEWAY_TUNNEL_V4: &str = "100.96.0.1";
/// HTTP echo origin: `GET /` answers `{"src": ..., "port": ...}`.
pub const HTTP_ORIGIN: &str = "203.0.113.10";
/// iperf3 server origin.
pub const IPERF_ORIGIN: &str = "203.0.113.20";
/// UDP echo origin (port 7; port 8 answers with the sender's address).
pub const UDP_ORIGIN: &str = "203.0.113.30";

/// How long output of an exited command may still take to arrive.
const PIPE_GRACE: Duration = Duration::from_millis(500);
/// Lines of the gateway log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// Whether the calling e2e test should return at once: true (after saying so) when not root and
/// `WAYGATE_SKIP_E2E=1`; panics with instructions when not root otherwise.
pub fn skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        report(&format!("{test}: skipped ({SKIP_ENV}=1 and not root)"));
        return true;
    }
    panic!(
        "{test}: the end-to-end tests need root (network namespaces, wg-quick); run them as root \
         (e.g. sudo scripts/test.sh), or set {SKIP_ENV}=1 to skip them"
    );
}

/// Polls `f` every `every` until it returns `Some` or `timeout` has passed (then `None`); `f` is
/// always tried at least once.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(every);
    }
}

/// The workspace root (this crate is `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where cargo put the debug binaries: `$CARGO_TARGET_DIR` at run time, else at build time, else
/// `<root>/target`.
fn target_debug_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    };
    target.join("debug")
}

/// A binary of the workspace: `$<env>` if set, else `<target>/debug/<name>`; it must exist,
/// since tests of one package cannot build another's binaries.
fn workspace_bin(env: &str, name: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => target_debug_dir().join(name),
    };
    if !path.is_file() {
        bail!(
            "{name} binary not found at {} (set {env}, or build it first: cargo build --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The `waygate-client` binary: `$WAYGATE_CLIENT_BIN`, else `<target>/debug/waygate-client`.
pub fn client_bin() -> Result<PathBuf> {
    let bin = workspace_bin("WAYGATE_CLIENT_BIN", "waygate-client")?;
    warn_if_stale(&bin, &["client/src", "keys/src"]);
    Ok(bin)
}

/// Says so (once per process) when a source file under the workspace dirs `crates` is newer
/// than `bin`: `cargo test -p waygate-e2e` does not rebuild other packages' binaries, and a stale
/// gateway makes for confusing results.
fn warn_if_stale(bin: &Path, crates: &[&str]) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let Ok(built) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let mut stack: Vec<PathBuf> = crates.iter().map(|c| workspace_root().join(c)).collect();
    let mut newer = None;
    while let Some(path) = stack.pop() {
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if path.extension().is_some_and(|e| e == "rs" || e == "toml")
            && meta.modified().is_ok_and(|m| m > built)
        {
            newer = Some(path);
            break;
        }
    }
    if let Some(path) = newer {
        WARNED.call_once(|| {
            report(&format!(
                "warning: {} is older than {}; run `cargo build --bins` to test the current code",
                bin.display(),
                path.display()
            ));
        });
    }
}

/// What a command run by the harness did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit code; `None` if killed by a signal (also on timeout).
    pub code: Option<i32>,
    /// Whether the harness killed it because its timeout passed.
    pub timed_out: bool,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// Wall-clock time from spawn to exit.
    pub elapsed: Duration,
}

impl Output {
    /// Exited 0 within its timeout.
    pub fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// One paragraph for assertion messages: command, outcome, time and both streams.
    pub fn describe(&self) -> String {
        let outcome = if self.timed_out {
            "killed after its timeout".to_string()
        } else {
            match self.code {
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".to_string(),
            }
        };
        let mut s = format!(
            "`{}`: {outcome} after {:.3}s",
            self.command,
            self.elapsed.as_secs_f64()
        );
        for (name, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = text.trim_end();
            if !text.is_empty() {
                let _ = write!(s, "\n  {name}: {}", text.replace('\n', "\n          "));
            }
        }
        s
    }
}

/// Runs `cmd` with piped output; kills its whole process group if it outlives `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Its own process group, so a timeout also kills anything it forked (which would otherwise
    // hold the pipes open).
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning `{command}`"))?;
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    for (mut pipe, tx) in [
        (
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
            out_tx,
        ),
        (Box::new(child.stderr.take().expect("piped")), err_tx),
    ] {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    let deadline = start + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            kill_group(&child);
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    // A daemon the command started (wg-quick's wireguard-go) may keep the pipes open: take what
    // came within a moment rather than waiting for EOF, and never kill the group after a normal
    // exit, since that daemon is meant to outlive it.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        String::from_utf8_lossy(&rx.recv_timeout(PIPE_GRACE).unwrap_or_default()).into_owned()
    };
    let stdout = collect(out_rx);
    let stderr = collect(err_rx);
    Ok(Output {
        command,
        code: status.code(),
        timed_out,
        stdout,
        stderr,
        elapsed,
    })
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain syscall; the group is the one we created for this child.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// Sends `sig` to `child`, waits up to `grace`, then SIGKILLs it; reaps it either way.
fn stop_child(child: &mut Child, sig: i32, grace: Duration) -> Stopped {
    if let Ok(Some(status)) = child.try_wait() {
        return Stopped::Before(Some(status));
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain syscall on our own, not yet reaped child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
    let start = Instant::now();
    let exited = wait_until(grace, Duration::from_millis(10), || {
        child.try_wait().ok().flatten()
    });
    match exited {
        Some(status) => Stopped::Exited(status, start.elapsed()),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Stopped::Killed
        }
    }
}

/// How a stopped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running (never started, or had already exited with this status).
    Before(Option<ExitStatus>),
    /// It exited with this status this long after the signal.
    Exited(ExitStatus, Duration),
    /// It ignored the signal for the whole grace period and was SIGKILLed.
    Killed,
}

/// Writes a line to the real stderr, past the test harness's capture, so CI logs show it.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// curl exit codes of a request the network did not carry: couldn't connect, timeout, empty
/// reply, receive error. Others (bad URL, bind failure) mean the check itself is broken.
pub const CURL_BLOCKED: [i32; 4] = [7, 28, 52, 56];

/// A request that must not get through failed, and for a network reason.
pub fn assert_blocked(out: &Output, what: &str) {
    assert!(
        out.code.is_some_and(|c| CURL_BLOCKED.contains(&c)),
        "{what}: want the request to fail with curl exit {CURL_BLOCKED:?} (not carried): {}",
        out.describe()
    );
}

/// Mbit/s the receiver counted in an `iperf3 -J` run.
pub fn iperf_mbits(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64()?;
    Some(bps / 1e6)
}

/// The one-line report a background tool writes to `path` once done, waited for up to `timeout`.
pub fn wait_report(path: &Path, timeout: Duration) -> Option<String> {
    wait_until(timeout, Duration::from_millis(200), || {
        fs::read_to_string(path).ok().filter(|s| s.ends_with('\n'))
    })
}

/// A device enrolled in the lab's gateway.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its name in the registry.
    pub name: String,
    /// Its namespace's suffix in the lab (`d1`, `d2`).
    pub ns: String,
    /// Its wg-quick config file (named after its WireGuard interface).
    pub conf: PathBuf,
    /// Its WireGuard interface name (unique per run).
    pub iface: String,
    /// Its tunnel address.
    pub ipv4: Ipv4Addr,
    /// Its WireGuard public key (base64).
    pub public_key: String,
}

/// One lab: namespaces from `scripts/lab.sh`, a running gateway, enrolled devices.
pub struct Lab {
    prefix: String,
    root: PathBuf,
    dir: tempfile::TempDir,
    waygate: PathBuf,
    lab_origin: PathBuf,
    config: PathBuf,
    gateway_log: PathBuf,
    gateway: Option<Child>,
    starts: u32,
    created: Instant,
    devices: Vec<Device>,
    background: Vec<Child>,
    /// The soft descriptor limit the gateway starts with (`None`: the test process's).
    gateway_soft_nofile: Option<u64>,
    /// When set, the gateway's stderr is a pipe read one line per this long (a slow reader).
    gateway_stderr_pace: Option<Duration>,
}

/// Distinguishes labs of one test process.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

impl Lab {
    /// Builds a lab with a unique prefix and starts the gateway in it; panics (after cleaning up)
    /// if that fails.
    pub fn up() -> Lab {
        match Lab::try_up() {
            Ok(lab) => lab,
            Err(e) => panic!("lab setup failed: {e:#}"),
        }
    }

    fn try_up() -> Result<Lab> {
        let waygate = workspace_bin("WAYGATE_BIN", "waygate")?;
        warn_if_stale(&waygate, &["gateway/src", "shared/src", "keys/src"]);
        let lab_origin = workspace_bin("LAB_ORIGIN", "lab-origin")?;
        let created = Instant::now();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        // 2 + 5 (pid_max is at most 2^22, padded so pid and counter cannot run together) + up
        // to 3 characters: lab.sh allows 10.
        let prefix = format!(
            "e2{:0>5}{}",
            base36(u64::from(std::process::id())),
            base36(u64::from(n % (36 * 36 * 36)))
        );
        let root = workspace_root();
        let lab_sh = root.join("scripts/lab.sh");
        if Path::new("/run/waygate-lab").join(&prefix).exists() {
            // Left over by an earlier process with the same pid that was killed before its Drop.
            let _ = run_with_timeout(lab_cmd(&lab_sh, &lab_origin, ["down", &prefix]), secs(30));
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("waygate-e2e-{prefix}-"))
            .tempdir()
            .context("creating the lab's temp dir")?;
        let out = run_with_timeout(lab_cmd(&lab_sh, &lab_origin, ["up", &prefix]), secs(60))?;
        if !out.ok() {
            bail!("scripts/lab.sh up {prefix} failed: {}", out.describe());
        }
        let config = dir.path().join("waygate.toml");
        let gateway_log = dir.path().join("gateway.log");
        let mut lab = Lab {
            prefix,
            root,
            waygate,
            lab_origin,
            config,
            gateway_log,
            dir,
            gateway: None,
            starts: 0,
            created,
            devices: Vec::new(),
            background: Vec::new(),
            gateway_soft_nofile: None,
            gateway_stderr_pace: None,
        };
        let toml = format!(
            "data_dir = \"{data}\"\n\
             [wireguard]\n\
             listen = \"198.51.100.1:51820\"\n\
             public_endpoint = \"198.51.100.1:51820\"\n\
             interface_name = \"{p}gw\"\n\
             {threads}\
             [egress]\n\
             default_ipv4 = \"{EGRESS_V4}\"\n\
             [dns]\n\
             upstreams = [\"203.0.113.53:53\"]\n",
            data = lab.dir.path().join("data").display(),
            p = lab.prefix,
            threads = std::env::var("WAYGATE_E2E_THREADS")
                .ok()
                .and_then(|n| n.trim().parse::<u32>().ok())
                .map(|n| format!("threads = {n}\n"))
                .unwrap_or_default(),
        );
        fs::write(&lab.config, toml).context("writing the gateway config")?;
        lab.start_gateway()?;
        Ok(lab)
    }

    /// The lab's prefix (namespaces are `<prefix>gw`, `<prefix>d1`, ...).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of the lab's namespace with this suffix (`gw`, `d1`, `d2`, `in`).
    pub fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// Writes `csv` (`network,country,continent` lines) to the lab's dir and builds a GeoIP
    /// database from it with `waygate geoip build`; returns the database's path.
    pub fn build_geoip(&self, csv: &str) -> Result<PathBuf> {
        let csv_path = self.dir().join("geo.csv");
        let db = self.dir().join("geo.mmdb");
        fs::write(&csv_path, csv).context("writing geo.csv")?;
        let out = self.waygate(&[
            "geoip",
            "build",
            "--csv",
            &csv_path.to_string_lossy(),
            "--out",
            &db.to_string_lossy(),
        ])?;
        if !out.ok() {
            bail!("waygate geoip build: {}", out.describe());
        }
        Ok(db)
    }

    /// The gateway's config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The lab's temp dir (config, data dir, logs, device configs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `lab-load` binary (one device's load: held connections, DNS floods).
    pub fn lab_load(&self) -> Result<PathBuf> {
        workspace_bin("LAB_LOAD", "lab-load")
    }

    /// The `lab-https` binary (an HTTPS origin speaking HTTP/1.1 and HTTP/2).
    pub fn lab_https(&self) -> Result<PathBuf> {
        workspace_bin("LAB_HTTPS", "lab-https")
    }

    /// The `lab-origin` binary (origins and probes).
    pub fn lab_origin(&self) -> &Path {
        &self.lab_origin
    }

    /// Has `scripts/lab.sh down` kill `pid` too (a process the test started indirectly, such as
    /// the daemon `waygate-client up` leaves running).
    pub fn record_pid(&self, pid: u32, name: &str) -> Result<()> {
        self.lab_sh(
            ["record-pid", &self.prefix, &pid.to_string(), name],
            secs(10),
        )
        .map(drop)
    }

    fn lab_sh<const N: usize>(&self, args: [&str; N], timeout: Duration) -> Result<Output> {
        let out = run_with_timeout(
            lab_cmd(&self.root.join("scripts/lab.sh"), &self.lab_origin, args),
            timeout,
        )?;
        if !out.ok() {
            bail!("scripts/lab.sh failed: {}", out.describe());
        }
        Ok(out)
    }

    /// Starts `waygate serve` in the gateway namespace (stderr appended to the gateway log) and
    /// waits until it serves.
    pub fn start_gateway(&mut self) -> Result<()> {
        if self.gateway.is_some() {
            bail!("the gateway is already running");
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.gateway_log)
            .context("opening the gateway log")?;
        writeln!(log, "=== e2e harness: gateway start #{} ===", self.starts)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns("gw")])
            .arg(&self.waygate)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env(
                "WAYGATE_LOG",
                std::env::var("WAYGATE_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?);
        let pace = self.gateway_stderr_pace;
        match pace {
            Some(_) => cmd.stderr(Stdio::piped()),
            None => cmd.stderr(log.try_clone()?),
        };
        if let Some(soft) = self.gateway_soft_nofile {
            // SAFETY: only async-signal-safe calls (getrlimit, setrlimit) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // `ip netns exec` execs the gateway, so this pid is the gateway's.
        let mut child = cmd.spawn().context("spawning the gateway")?;
        if let (Some(pace), Some(stderr)) = (pace, child.stderr.take()) {
            // Ends when the gateway closes its stderr (it exits).
            thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    thread::sleep(pace);
                }
            });
        }
        let pid = child.id().to_string();
        self.gateway = Some(child);
        self.lab_sh(["record-pid", &self.prefix, &pid, "waygate"], secs(10))?;
        // Ready when its UAPI answers (documented: `wg show <interface_name>`); the gateway
        // creates it after binding the WireGuard socket. A socket a killed gateway left behind
        // refuses connections, so it does not count.
        let iface = self.ns("gw");
        let ready = wait_until(secs(20), Duration::from_millis(20), || {
            if let Some(Ok(Some(status))) = self.gateway.as_mut().map(Child::try_wait) {
                return Some(Err(anyhow::anyhow!("the gateway exited: {status}")));
            }
            self.run_in("gw", &["wg", "show", &iface, "public-key"], secs(5))
                .ok()
                .then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                self.gateway = None;
                Err(e.context(format!("gateway log:\n{}", self.gateway_log_tail())))
            }
            None => bail!(
                "the gateway's UAPI (`wg show {iface}`) did not answer within 20 s of its start; \
                 log:\n{}",
                self.gateway_log_tail()
            ),
        }
    }

    /// Stops the gateway the way an operator would: SIGTERM to its pid, SIGKILL after 5 s.
    pub fn stop_gateway(&mut self) -> Stopped {
        match self.gateway.take() {
            Some(mut child) => stop_child(&mut child, libc::SIGTERM, secs(5)),
            None => Stopped::Before(None),
        }
    }

    /// Kills the gateway like a crash would (SIGKILL: no cleanup of its UAPI socket or registry).
    pub fn kill_gateway(&mut self) -> Stopped {
        match self.gateway.take() {
            Some(mut child) => stop_child(&mut child, libc::SIGKILL, secs(5)),
            None => Stopped::Before(None),
        }
    }

    /// Starts the gateway from now on with this soft descriptor limit, as systemd does (1,024).
    pub fn set_gateway_soft_nofile(&mut self, soft: Option<u64>) {
        self.gateway_soft_nofile = soft;
    }

    /// Starts the gateway from now on with its stderr on a pipe that the harness reads one line
    /// per `pace` into the gateway log (`None`: straight to the log file).
    pub fn set_gateway_stderr_pace(&mut self, pace: Option<Duration>) {
        self.gateway_stderr_pace = pace;
    }

    /// The gateway's resident memory in KiB (`VmRSS`), while it runs.
    pub fn gateway_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.gateway_pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The gateway's pid, while it runs.
    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }

    /// The last lines of the gateway's log (all its starts).
    pub fn gateway_log_tail(&self) -> String {
        let text = fs::read_to_string(&self.gateway_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[from..].join("\n")
    }

    /// `waygate --config <lab config> ARGS...` on the host, for the caller to spawn (a command
    /// that runs until stopped, such as `logs --follow`).
    pub fn waygate_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.waygate);
        cmd.arg("--config").arg(&self.config).args(args);
        cmd
    }

    /// Runs `waygate --config <lab config> ARGS...` on the host (the CLI only touches the data
    /// dir); 30 s timeout.
    pub fn waygate(&self, args: &[&str]) -> Result<Output> {
        run_with_timeout(self.waygate_command(args), secs(30))
    }

    /// Enrolls a device named `name`, writes its wg-quick config (0600) and brings it up with
    /// wg-quick in namespace `<prefix><ns>`, then waits until it pings the gateway.
    pub fn add_device(&mut self, name: &str, ns: &str) -> Result<Device> {
        self.add_device_with(name, ns, &[])
    }

    /// [`Lab::add_device`] with more `waygate device enroll` arguments (`--group G`, `--vnet V`).
    pub fn add_device_with(
        &mut self,
        name: &str,
        ns: &str,
        enroll_args: &[&str],
    ) -> Result<Device> {
        let device = self.enroll_with(name, ns, enroll_args)?;
        self.device_up(&device)?;
        if !self.wait_tunnel(&device, secs(10)) {
            bail!(
                "device {name} in {} does not ping the gateway {GATEWAY_TUNNEL_V4} within 10 s \
                 of wg-quick up\n{}",
                self.ns(ns),
                self.wg_show(&device)
            );
        }
        Ok(device)
    }

    /// Enrolls a device named `name` (to live in namespace `<prefix><ns>`), writes its wg-quick
    /// config (0600), and waits until the running gateway lists it as a peer.
    pub fn enroll(&mut self, name: &str, ns: &str) -> Result<Device> {
        self.enroll_with(name, ns, &[])
    }

    /// [`Lab::enroll`] with more `waygate device enroll` arguments.
    pub fn enroll_with(&mut self, name: &str, ns: &str, enroll_args: &[&str]) -> Result<Device> {
        let email = format!("{name}@example.com");
        let mut args = vec!["device", "enroll", "--email", &email, "--name", name];
        args.extend_from_slice(enroll_args);
        let out = self.waygate(&args)?;
        if !out.ok() {
            bail!("enrolling {name} failed: {}", out.describe());
        }
        let enrolled = Instant::now();
        let ipv4 = parse_address(&out.stdout)
            .with_context(|| format!("no IPv4 Address in the enroll output:\n{}", out.stdout))?;
        let private = out
            .stdout
            .lines()
            .filter_map(|l| l.trim().strip_prefix("PrivateKey"))
            .filter_map(|rest| rest.trim_start().strip_prefix('='))
            .map(str::trim)
            .next()
            .with_context(|| format!("no PrivateKey in the enroll output:\n{}", out.stdout))?;
        let public_key = waygate_keys::PrivateKey::from_base64(private)
            .map_err(|e| anyhow::anyhow!("bad PrivateKey in the enroll output: {e}"))?
            .public_key()
            .to_base64();
        let letter = char::from(b'a' + u8::try_from(self.devices.len()).unwrap_or(25).min(25));
        let iface = format!("{}{letter}", self.prefix);
        let conf = self.dir.path().join(format!("{iface}.conf"));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf)
            .with_context(|| format!("creating {}", conf.display()))?;
        file.write_all(out.stdout.as_bytes())?;
        drop(file);
        let device = Device {
            name: name.to_string(),
            ns: ns.to_string(),
            conf,
            iface,
            ipv4,
            public_key,
        };
        self.devices.push(device.clone());
        // Until the gateway has picked the device up from the registry it drops the device's
        // handshake, and wireguard-go only retries after 5 s.
        if self.gateway.is_some() {
            let known = wait_until(secs(5), Duration::from_millis(20), || {
                self.gateway_peers()
                    .contains(&device.public_key)
                    .then_some(())
            });
            if known.is_none() {
                bail!(
                    "the running gateway does not list device {name} ({}) as a peer within 5 s \
                     of enrolling it (`wg show {}gw peers`)",
                    device.public_key,
                    self.prefix
                );
            }
            if enrolled.elapsed() > Duration::from_millis(1500) {
                report(&format!(
                    "note: the gateway took {:.1}s to list device {name} (contract: within a \
                     second)",
                    enrolled.elapsed().as_secs_f64()
                ));
            }
        }
        Ok(device)
    }

    /// The public keys the gateway's UAPI (`wg show <prefix>gw peers`) lists.
    pub fn gateway_peers(&self) -> Vec<String> {
        let iface = self.ns("gw");
        let out = self.run_in("gw", &["wg", "show", &iface, "peers"], secs(5));
        out.stdout.split_whitespace().map(str::to_string).collect()
    }

    /// `scripts/lab.sh device-up` for an enrolled device (its config file as it is).
    pub fn device_up(&self, device: &Device) -> Result<()> {
        let conf = device.conf.to_string_lossy();
        self.lab_sh(["device-up", &self.prefix, &device.ns, &conf], secs(30))?;
        Ok(())
    }

    /// `scripts/lab.sh device-down`: the device's wg-quick tunnel gone (it stays enrolled).
    pub fn device_down(&self, device: &Device) -> Result<()> {
        let conf = device.conf.to_string_lossy();
        self.lab_sh(["device-down", &self.prefix, &device.ns, &conf], secs(30))?;
        Ok(())
    }

    /// Whether `device` gets an answer from the gateway's tunnel address within `timeout`.
    pub fn wait_tunnel(&self, device: &Device, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(50), || {
            self.ping(device, GATEWAY_TUNNEL_V4, None, 1).ok().map(drop)
        })
        .is_some()
    }

    /// Runs `ARGS` in namespace `<prefix><ns>`, killed after `timeout`.
    pub fn run_in(&self, ns: &str, args: &[&str], timeout: Duration) -> Output {
        self.try_run_in(ns, args, timeout)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Lab::run_in`] that returns spawn errors instead of panicking (for use in `Drop`).
    fn try_run_in(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns)]).args(args);
        run_with_timeout(cmd, timeout)
    }

    /// Starts `ARGS` in the background in namespace `<prefix><ns>`; the lab kills it on drop.
    pub fn spawn_in(&mut self, ns: &str, args: &[&str]) -> Result<u32> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("spawning {args:?}"))?;
        let pid = child.id();
        self.background.push(child);
        self.lab_sh(
            ["record-pid", &self.prefix, &pid.to_string(), "background"],
            secs(10),
        )?;
        Ok(pid)
    }

    /// `curl` from the device: `-sS --max-time MAX [EXTRA...] URL`.
    pub fn curl(&self, device: &Device, url: &str, max_time: Duration, extra: &[&str]) -> Output {
        let max = format!("{:.3}", max_time.as_secs_f64());
        let mut args = vec!["curl", "-sS", "--max-time", &max];
        args.extend_from_slice(extra);
        args.push(url);
        self.run_in(&device.ns, &args, max_time + secs(5))
    }

    /// The source address the HTTP echo origin saw for a `GET /` from the device.
    pub fn http_src(&self, device: &Device, max_time: Duration) -> Result<String, Output> {
        self.http_src_of(device, &format!("http://{HTTP_ORIGIN}/"), max_time, &[])
    }

    /// The source address an HTTP echo origin at `url` saw for a `GET` from the device, with
    /// extra curl arguments (`--local-port N`, `-6`).
    pub fn http_src_of(
        &self,
        device: &Device,
        url: &str,
        max_time: Duration,
        extra: &[&str],
    ) -> Result<String, Output> {
        let out = self.curl(device, url, max_time, extra);
        if !out.ok() {
            return Err(out);
        }
        match serde_json::from_str::<serde_json::Value>(&out.stdout) {
            Ok(v) => match v.get("src").and_then(|s| s.as_str()) {
                Some(src) => Ok(src.to_string()),
                None => Err(out),
            },
            Err(_) => Err(out),
        }
    }

    /// `ping -c COUNT -W 1 [-I SRC] DST` from the device; `Err` carries the output on failure.
    pub fn ping(
        &self,
        device: &Device,
        dst: &str,
        src: Option<&str>,
        count: u32,
    ) -> Result<Output, Output> {
        let count = count.to_string();
        let mut args = vec!["ping", "-n", "-c", &count, "-W", "1"];
        if let Some(src) = src {
            args.extend_from_slice(&["-I", src]);
        }
        args.push(dst);
        let out = self.run_in(&device.ns, &args, secs(10));
        if out.ok() {
            Ok(out)
        } else {
            Err(out)
        }
    }

    /// Bytes the device's WireGuard interface has sent to the gateway (`wg show IFACE transfer`).
    pub fn tunnel_tx_bytes(&self, device: &Device) -> Option<u64> {
        let out = self.run_in(
            &device.ns,
            &["wg", "show", &device.iface, "transfer"],
            secs(5),
        );
        // One line per peer: PUBLIC_KEY RX TX.
        out.stdout.split_whitespace().nth(2)?.parse().ok()
    }

    /// When (unix seconds) the device last completed a handshake with the gateway; 0 for never.
    pub fn latest_handshake(&self, device: &Device) -> Option<u64> {
        let out = self.run_in(
            &device.ns,
            &["wg", "show", &device.iface, "latest-handshakes"],
            secs(5),
        );
        // One line per peer: PUBLIC_KEY UNIX_SECONDS.
        out.stdout.split_whitespace().nth(1)?.parse().ok()
    }

    /// `wg show` of the device's interface, for messages.
    pub fn wg_show(&self, device: &Device) -> String {
        match self.try_run_in(&device.ns, &["wg", "show", &device.iface], secs(5)) {
            Ok(out) => out.describe(),
            Err(e) => format!("{e:#}"),
        }
    }
}

/// `scripts/lab.sh ARGS`, with the lab-origin binary the harness found (so lab.sh never builds).
fn lab_cmd<const N: usize>(lab_sh: &Path, lab_origin: &Path, args: [&str; N]) -> Command {
    let mut cmd = Command::new(lab_sh);
    cmd.args(args).env("LAB_ORIGIN", lab_origin);
    cmd
}

/// The IPv4 address of a wg-quick config's `Address = a.b.c.d/32, ...` line.
fn parse_address(conf: &str) -> Option<Ipv4Addr> {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("Address"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().split('/').next()?.parse().ok())
        .next()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            let mut report = format!(
                "\n===== lab {} failed; gateway log tail ({}):\n{}\n",
                self.prefix,
                self.gateway_log.display(),
                self.gateway_log_tail()
            );
            if self.gateway.is_some() {
                let iface = self.ns("gw");
                let out = match self.try_run_in("gw", &["wg", "show", &iface], secs(5)) {
                    Ok(out) => out.describe(),
                    Err(e) => format!("{e:#}"),
                };
                let _ = writeln!(report, "===== gateway UAPI: {out}");
            }
            for d in &self.devices {
                let _ = writeln!(report, "===== {} ({}): {}", d.name, d.ns, self.wg_show(d));
            }
            eprintln!("{report}=====");
        }
        self.stop_gateway();
        // Left behind when the gateway was SIGKILLed and not restarted; the name is this lab's.
        let _ = fs::remove_file(format!("/var/run/wireguard/{}gw.sock", self.prefix));
        for child in &mut self.background {
            stop_child(child, libc::SIGTERM, secs(2));
        }
        let down = run_with_timeout(
            lab_cmd(
                &self.root.join("scripts/lab.sh"),
                &self.lab_origin,
                ["down", &self.prefix],
            ),
            secs(60),
        );
        match down {
            Ok(out) if out.ok() => {}
            Ok(out) => eprintln!("lab {}: down failed: {}", self.prefix, out.describe()),
            Err(e) => eprintln!("lab {}: down failed: {e:#}", self.prefix),
        }
        report(&format!(
            "e2e lab {} ({}): {:.1}s{}",
            self.prefix,
            thread::current().name().unwrap_or("?"),
            self.created.elapsed().as_secs_f64(),
            if thread::panicking() { ", FAILED" } else { "" }
        ));
        if std::env::var("WAYGATE_E2E_KEEP").as_deref() == Ok("1") {
            self.dir.disable_cleanup(true);
            report(&format!(
                "lab {}: kept {}",
                self.prefix,
                self.dir.path().display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wg_quick_address() {
        let conf = "[Interface]\nPrivateKey = x\nAddress = 100.96.0.2/32, fd77:6761:7465::2/128\n";
        assert_eq!(parse_address(conf), Some(Ipv4Addr::new(100, 96, 0, 2)));
        assert_eq!(parse_address("[Interface]\n"), None);
    }

    #[test]
    fn base36_prefixes_fit_lab_sh() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // pid_max on Linux is at most 2^22.
        assert!(base36(1 << 22).len() <= 5);
    }

    #[test]
    fn timeout_kills_and_reports() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hi; sleep 10"]);
        let out = run_with_timeout(cmd, Duration::from_millis(300)).unwrap();
        assert!(out.timed_out && !out.ok());
        assert_eq!(out.stdout.trim(), "hi");
        assert!(out.elapsed < Duration::from_secs(5));
    }
}
