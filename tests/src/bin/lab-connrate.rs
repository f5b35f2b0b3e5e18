//! Short TCP connections per second: each worker connects, sends one HTTP/1.0 request, reads the
//! answer to the end and closes, over and over, for a fixed time. Prints the rate as JSON.
//!
//!     lab-connrate --to 203.0.113.10:80 [--seconds 5] [--workers 8]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let mut to: Option<SocketAddr> = None;
    let mut seconds = 5u64;
    let mut workers = 8usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--to" => to = Some(value.parse().context("--to")?),
            "--seconds" => seconds = value.parse().context("--seconds")?,
            "--workers" => workers = value.parse().context("--workers")?,
            other => bail!("unknown flag {other}"),
        }
    }
    let to = to.context("--to is required")?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    #[allow(clippy::disallowed_methods)] // a lab tool on the real clock
    let start = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match exchange(to, &mut buf) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = done.load(Ordering::Relaxed);
    println!(
        "{{\"connections\": {ok}, \"failed\": {}, \"seconds\": {elapsed:.3}, \"per_second\": {:.1}}}",
        failed.load(Ordering::Relaxed),
        ok as f64 / elapsed
    );
    Ok(())
}

fn exchange(to: SocketAddr, buf: &mut [u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut total = 0;
    loop {
        match s.read(buf)? {
            0 => break,
            n => total += n,
        }
    }
    if total == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
