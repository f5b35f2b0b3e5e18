//! The data plane in shards (`wireguard.threads = 2`, issue 20): the gateway runs a second
//! shard thread, `wg show` lists the peers of every shard, and two wg-quick devices move data
//! through it at the same time (downloads and an upload), also after both reconnect from new
//! source ports (their handshakes land on whichever socket the kernel's hash picks and are
//! handed to the shard that owns the device).
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::thread;
use std::time::Duration;

use waygate_e2e::{iperf_mbits, report, skip, Device, Lab, EGRESS_V4, HTTP_ORIGIN, IPERF_ORIGIN};

/// Bytes each device downloads per fetch: enough for many GSO runs, seconds at lab speed.
const DOWNLOAD: u64 = 16_000_000;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// `GET /bytes/DOWNLOAD` from the device: the size curl received.
fn download(lab: &Lab, device: &Device) -> Result<u64, String> {
    let url = format!("http://{HTTP_ORIGIN}/bytes/{DOWNLOAD}");
    let out = lab.curl(
        device,
        &url,
        secs(20),
        &["-o", "/dev/null", "-w", "%{size_download}"],
    );
    if !out.ok() {
        return Err(out.describe());
    }
    out.stdout.trim().parse().map_err(|_| out.describe())
}

/// Both devices at once: two downloads each and their egress address, while d1 also uploads.
fn both_at_once(lab: &Lab, d1: &Device, d2: &Device, when: &str) {
    thread::scope(|s| {
        let upload = s.spawn(|| {
            lab.run_in(
                &d1.ns,
                &["iperf3", "-c", IPERF_ORIGIN, "-t", "2", "-J"],
                secs(20),
            )
        });
        let fetches: Vec<_> = [d1, d2]
            .into_iter()
            .map(|device| {
                s.spawn(move || (0..2).map(|_| download(lab, device)).collect::<Vec<_>>())
            })
            .collect();
        for (device, fetch) in [d1, d2].into_iter().zip(fetches) {
            for got in fetch.join().expect("download thread") {
                match got {
                    Ok(bytes) => assert_eq!(
                        bytes, DOWNLOAD,
                        "{when}: {} downloaded {bytes} of {DOWNLOAD} bytes",
                        device.name
                    ),
                    Err(why) => panic!("{when}: download from {} failed: {why}", device.name),
                }
            }
            match lab.http_src(device, secs(5)) {
                Ok(src) => assert_eq!(src, EGRESS_V4, "{when}: {} egress", device.name),
                Err(out) => panic!(
                    "{when}: HTTP from {} failed: {}",
                    device.name,
                    out.describe()
                ),
            }
        }
        let out = upload.join().expect("iperf3 thread");
        match iperf_mbits(&out.stdout) {
            Some(mbits) if out.ok() && mbits > 1.0 => report(&format!(
                "{when}: d1 uploaded {mbits:.0} Mbit/s beside the downloads"
            )),
            _ => panic!("{when}: iperf3 upload from d1 failed: {}", out.describe()),
        }
    });
}

#[test]
fn two_shards_carry_two_devices_at_once() {
    if skip("two_shards_carry_two_devices_at_once") {
        return;
    }
    let mut lab = Lab::up();
    let config = fs::read_to_string(lab.config()).expect("read the lab's config");
    assert!(config.contains("[wireguard]\n"), "{config}");
    // Whatever WAYGATE_E2E_THREADS asked for, this test runs two shards.
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("threads = "))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(
        lab.config(),
        config.replacen("[wireguard]\n", "[wireguard]\nthreads = 2\n", 1),
    )
    .expect("write the config");
    lab.stop_gateway();
    lab.start_gateway()
        .expect("gateway with wireguard.threads = 2");
    let pid = lab.gateway_pid().expect("gateway pid");
    // The first shard runs on the main thread; the second has its own.
    assert_eq!(
        threads_named(pid, "waygate-shard"),
        1,
        "want one shard thread besides the main one; log:\n{}",
        lab.gateway_log_tail()
    );

    let d1 = lab.add_device("d1", "d1").expect("bring up device d1");
    let d2 = lab.add_device("d2", "d2").expect("bring up device d2");
    // `wg show` is one interface over both shards.
    let peers = lab.gateway_peers();
    for device in [&d1, &d2] {
        assert!(
            peers.contains(&device.public_key),
            "wg show lists {peers:?}, not {}'s key",
            device.name
        );
    }
    both_at_once(&lab, &d1, &d2, "first connection");

    // New tunnels from new source ports: new handshakes, spread by the kernel's hash.
    for device in [&d1, &d2] {
        lab.device_down(device).expect("device down");
        lab.device_up(device).expect("device up again");
        assert!(
            lab.wait_tunnel(device, secs(10)),
            "{} did not reconnect; log:\n{}",
            device.name,
            lab.gateway_log_tail()
        );
    }
    both_at_once(&lab, &d1, &d2, "after reconnecting");
}
