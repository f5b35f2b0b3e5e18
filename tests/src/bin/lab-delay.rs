//! A UDP relay that emulates a long, lossy or narrow path in each direction: the lab's stand-in
//! for netem, which this kernel lacks. Devices put `--listen` in their `Endpoint`; the relay sends
//! their datagrams to `--to` from its own socket and the answers back to the last device
//! address it heard from. Each direction is a [`Link`]: random loss, a bottleneck queue drained at
//! a rate, a one-way delay and jitter.
//!
//!     lab-delay --listen 198.51.100.1:51900 --to 198.51.100.1:51820 --delay-ms 20 \
//!         [--jitter-ms 2] [--loss-up 0.5] [--loss-down 0.5] [--rate-mbit 100 --queue-ms 50] \
//!         [--seed 1]
//!
//! `--delay-ms` is one way (the round trip is twice it); losses are percentages; the bottleneck
//! applies to both directions, as an access link's does. On SIGTERM or SIGINT it prints what each
//! direction dropped on stderr.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use waygate_e2e::link::{Fate, Link, LinkConfig};

struct Args {
    listen: SocketAddr,
    to: SocketAddr,
    up: LinkConfig,
    down: LinkConfig,
    seed: u64,
}

fn percent(flag: &str, value: &str) -> Result<f64> {
    let p: f64 = value
        .parse()
        .with_context(|| format!("{flag}: not a number"))?;
    ensure!(
        (0.0..=100.0).contains(&p),
        "{flag}: a percentage from 0 to 100"
    );
    Ok(p / 100.0)
}

fn millis(flag: &str, value: &str) -> Result<Duration> {
    Ok(Duration::from_millis(
        value
            .parse()
            .with_context(|| format!("{flag}: whole milliseconds"))?,
    ))
}

fn parse_args() -> Result<Args> {
    let (mut listen, mut to, mut delay) = (None, None, None);
    let (mut jitter, mut queue) = (Duration::ZERO, None);
    let (mut loss_up, mut loss_down, mut rate_bps, mut seed) = (0.0, 0.0, None, 1u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().context("--listen")?),
            "--to" => to = Some(value.parse().context("--to")?),
            "--delay-ms" => delay = Some(millis(&flag, &value)?),
            "--jitter-ms" => jitter = millis(&flag, &value)?,
            "--loss-up" => loss_up = percent(&flag, &value)?,
            "--loss-down" => loss_down = percent(&flag, &value)?,
            "--rate-mbit" => {
                let mbit: f64 = value.parse().context("--rate-mbit: not a number")?;
                ensure!(mbit > 0.0, "--rate-mbit: must be more than 0");
                rate_bps = Some((mbit * 1e6) as u64);
            }
            "--queue-ms" => queue = Some(millis(&flag, &value)?),
            "--seed" => seed = value.parse().context("--seed")?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(
        queue.is_none() || rate_bps.is_some(),
        "--queue-ms needs --rate-mbit (the queue drains at that rate)"
    );
    let base = LinkConfig {
        delay: delay.context("--delay-ms is required")?,
        jitter,
        loss: 0.0,
        rate_bps,
        // A bottleneck without a stated queue gets a generous one: 100 ms.
        queue: queue.unwrap_or(Duration::from_millis(100)),
    };
    Ok(Args {
        listen: listen.context("--listen is required")?,
        to: to.context("--to is required")?,
        up: LinkConfig {
            loss: loss_up,
            ..base.clone()
        },
        down: LinkConfig {
            loss: loss_down,
            ..base
        },
        seed,
    })
}

/// Sends each datagram once its deadline passes; a fixed delay keeps arrival order.
fn sender(
    socket: UdpSocket,
    queue: mpsc::Receiver<(Instant, Vec<u8>)>,
    dst: impl Fn() -> Option<SocketAddr>,
) {
    let mut pending: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match queue.recv() {
                Ok(item) => pending.push_back(item),
                Err(_) => return,
            }
        }
        while let Ok(item) = queue.try_recv() {
            pending.push_back(item);
        }
        let Some((due, _)) = pending.front() else {
            continue;
        };
        #[allow(clippy::disallowed_methods)] // a lab tool on the real clock
        let now = Instant::now();
        if *due > now {
            thread::sleep((*due - now).min(Duration::from_micros(200)));
            continue;
        }
        if let (Some((_, bytes)), Some(dst)) = (pending.pop_front(), dst()) {
            let _ = socket.send_to(&bytes, dst);
        }
    }
}

/// What one direction dropped, for the report at exit.
#[derive(Default)]
struct Drops {
    lost: AtomicU64,
    queue_full: AtomicU64,
}

/// Reads datagrams, decides each one's fate on `link` and queues the survivors with their
/// deadline.
fn receiver(
    socket: UdpSocket,
    mut link: Link,
    drops: Arc<Drops>,
    queue: mpsc::Sender<(Instant, Vec<u8>)>,
    on_from: impl Fn(SocketAddr),
) {
    let mut buf = vec![0u8; 65_535];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        on_from(from);
        #[allow(clippy::disallowed_methods)] // a lab tool on the real clock
        let now = Instant::now();
        match link.send(now, n) {
            Fate::Due(due) => {
                if queue.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Fate::Lost => {
                drops.lost.fetch_add(1, Ordering::Relaxed);
            }
            Fate::QueueFull => {
                drops.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let front = UdpSocket::bind(args.listen).context("bind --listen")?;
    let back = UdpSocket::bind(SocketAddr::new(args.listen.ip(), 0)).context("bind relay")?;
    let device: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let (up_tx, up_rx) = mpsc::channel();
    let (down_tx, down_rx) = mpsc::channel();
    let (up_drops, down_drops) = (Arc::new(Drops::default()), Arc::new(Drops::default()));
    report_drops_on_exit(up_drops.clone(), down_drops.clone())?;
    let to = args.to;
    let up = Link::new(args.up, args.seed);
    let down = Link::new(args.down, args.seed.wrapping_add(1));
    let threads = vec![
        {
            let (s, d, drops) = (front.try_clone()?, device.clone(), up_drops);
            thread::spawn(move || {
                receiver(s, up, drops, up_tx, |from| {
                    if let Ok(mut dev) = d.lock() {
                        *dev = Some(from);
                    }
                })
            })
        },
        {
            let s = back.try_clone()?;
            thread::spawn(move || sender(s, up_rx, || Some(to)))
        },
        {
            let (s, drops) = (back.try_clone()?, down_drops);
            thread::spawn(move || receiver(s, down, drops, down_tx, |_| {}))
        },
        {
            let (s, d) = (front.try_clone()?, device.clone());
            thread::spawn(move || sender(s, down_rx, || d.lock().ok().and_then(|d| *d)))
        },
    ];
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Prints each direction's drops when the benchmark stops the relay. SIGTERM and SIGINT are
/// blocked in every thread (spawned threads inherit the mask) and taken by one thread with
/// `sigwait`, where printing is safe, unlike in a signal handler.
fn report_drops_on_exit(up: Arc<Drops>, down: Arc<Drops>) -> Result<()> {
    // SAFETY: plain libc calls on a zeroed, then initialised, local signal set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    };
    // SAFETY: `set` is initialised; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    ensure!(rc == 0, "blocking SIGTERM: error {rc}");
    thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and `signal` is a valid place for the answer.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            eprintln!(
                "lab-delay: up lost {} queue-full {}; down lost {} queue-full {}",
                up.lost.load(Ordering::Relaxed),
                up.queue_full.load(Ordering::Relaxed),
                down.lost.load(Ordering::Relaxed),
                down.queue_full.load(Ordering::Relaxed)
            );
            std::process::exit(0);
        }
    });
    Ok(())
}
