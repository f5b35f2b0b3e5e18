//! A UDP relay that adds a fixed one-way delay in each direction: the lab's stand-in for a long
//! path (this kernel has no netem). Devices put `--listen` in their `Endpoint`; the relay sends
//! their datagrams to `--to` from its own socket and the answers back to the last device
//! address it heard from.
//!
//!     lab-delay --listen 198.51.100.1:51900 --to 198.51.100.1:51820 --delay-ms 20

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    listen: SocketAddr,
    to: SocketAddr,
    delay: Duration,
}

fn parse_args() -> Result<Args> {
    let mut listen = None;
    let mut to = None;
    let mut delay = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().context("--listen")?),
            "--to" => to = Some(value.parse().context("--to")?),
            "--delay-ms" => {
                delay = Some(Duration::from_millis(value.parse().context("--delay-ms")?))
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        listen: listen.context("--listen is required")?,
        to: to.context("--to is required")?,
        delay: delay.context("--delay-ms is required")?,
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

/// Reads datagrams and queues them with their deadline.
fn receiver(
    socket: UdpSocket,
    delay: Duration,
    queue: mpsc::Sender<(Instant, Vec<u8>)>,
    on_from: impl Fn(SocketAddr),
) {
    let mut buf = vec![0u8; 65_535];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        on_from(from);
        #[allow(clippy::disallowed_methods)] // a lab tool on the real clock
        let due = Instant::now() + delay;
        if queue.send((due, buf[..n].to_vec())).is_err() {
            return;
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
    let to = args.to;
    let threads = vec![
        {
            let (s, d) = (front.try_clone()?, device.clone());
            thread::spawn(move || {
                receiver(s, args.delay, up_tx, |from| {
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
            let s = back.try_clone()?;
            thread::spawn(move || receiver(s, args.delay, down_tx, |_| {}))
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
