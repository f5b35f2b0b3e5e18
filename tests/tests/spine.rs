//! The spine: real wg-quick + wireguard-go devices reach the Internet through `waygate serve`,
//! and the gateway enforces who may send what (issue "The spine").
//!
//! Each test builds its own lab (`scripts/lab.sh`), so they can fail independently; checks that
//! need no fresh state share one lab to keep the file well under two minutes. The numbered
//! comments are the behaviours: `spine_traffic` 1-6, 9, 10 (egress address, refusal, UDP,
//! two devices, isolation, spoofing, iperf3, ping), `spine_revoke` 7, `spine_restart` 8.
// Wall-clock deadlines are what these tests measure.
#![allow(clippy::disallowed_methods)]

use std::thread;
use std::time::{Duration, Instant};

use waygate_e2e::{
    assert_blocked, iperf_mbits, report, skip, wait_until, Device, Lab, Output, Stopped, EGRESS_V4,
    GATEWAY_TUNNEL_V4, HTTP_ORIGIN, IPERF_ORIGIN, UDP_ORIGIN,
};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An address in the tunnel pool that belongs to no device: the spoofed inner source.
const SPOOFED_V4: &str = "100.96.200.200";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Behaviours 1 and 4's check: HTTP from `device` reaches the origin from the egress address.
fn assert_egress(lab: &Lab, device: &Device, what: &str) {
    match lab.http_src(device, secs(5)) {
        Ok(src) => assert_eq!(
            src, EGRESS_V4,
            "{what}: the HTTP origin saw {} come from {src}, want the gateway's egress.default_ipv4 \
             {EGRESS_V4}",
            device.name
        ),
        Err(out) => panic!(
            "{what}: HTTP GET http://{HTTP_ORIGIN}/ from {} through the tunnel failed: {}",
            device.name,
            out.describe()
        ),
    }
}

/// A ping that must go unanswered got no reply (exit 1), rather than an answer (0) or an error
/// such as an unknown source address (2).
fn assert_no_reply(result: Result<Output, Output>, what: &str) {
    match result {
        Ok(out) => panic!(
            "{what}: want no reply, but it was answered: {}",
            out.describe()
        ),
        Err(out) => assert_eq!(
            out.code,
            Some(1),
            "{what}: want ping to exit 1 (no reply): {}",
            out.describe()
        ),
    }
}

#[test]
fn parses_iperf_intervals() {
    let text = "Connecting to host 203.0.113.20, port 5201\n\
        [ ID] Interval           Transfer     Bitrate\n\
        [  5]   0.00-0.50   sec  1.25 MBytes  20966 Kbits/sec\n\
        [  5]   1.00-1.50   sec   600 KBytes  9820 Kbits/sec\n\
        [  5]   1.50-2.00   sec  0.00 Bytes  0.00 bits/sec\n";
    assert_eq!(
        iperf_intervals(text),
        vec![
            (0.0, 1.25 * 1024.0 * 1024.0),
            (1.0, 600.0 * 1024.0),
            (1.5, 0.0)
        ]
    );
}

#[test]
fn spine_traffic() {
    if skip("spine_traffic") {
        return;
    }
    let mut lab = Lab::up();
    let d1 = lab.add_device("d1", "d1").expect("bring up device d1");
    let d2 = lab.add_device("d2", "d2").expect("bring up device d2");

    // 10. The gateway answers pings on its own tunnel address.
    if let Err(out) = lab.ping(&d1, GATEWAY_TUNNEL_V4, None, 2) {
        panic!(
            "ping to the gateway's tunnel address {GATEWAY_TUNNEL_V4} from d1 failed: {}",
            out.describe()
        );
    }

    // 1. HTTP leaves from the egress address.
    assert_egress(&lab, &d1, "HTTP egress");

    // 2. A refused upstream is a prompt refusal (RST), not a timeout.
    let out = lab.curl(&d1, &format!("http://{HTTP_ORIGIN}:81/"), secs(5), &[]);
    assert_eq!(
        out.code,
        Some(7),
        "closed port {HTTP_ORIGIN}:81: want curl exit 7 (connection refused): {}",
        out.describe()
    );
    assert!(
        out.elapsed < secs(1),
        "closed port {HTTP_ORIGIN}:81: refused only after {:.3}s, want well under 1 s: {}",
        out.elapsed.as_secs_f64(),
        out.describe()
    );
    report(&format!("refusal took {:.3}s", out.elapsed.as_secs_f64()));

    // 3. UDP echo, and UDP too leaves from the egress address.
    let probe = lab.lab_origin().to_string_lossy().into_owned();
    let payload = format!("waygate-e2e-{}", std::process::id());
    let out = lab.run_in(
        &d1.ns,
        &[
            &probe,
            "udp-probe",
            &format!("{UDP_ORIGIN}:7"),
            "--payload",
            &payload,
            "--timeout-ms",
            "3000",
        ],
        secs(10),
    );
    assert!(
        out.ok() && out.stdout.trim() == payload,
        "UDP echo {UDP_ORIGIN}:7 from d1: want {payload:?} back: {}",
        out.describe()
    );
    let out = lab.run_in(
        &d1.ns,
        &[
            &probe,
            "udp-probe",
            &format!("{UDP_ORIGIN}:8"),
            "--timeout-ms",
            "3000",
        ],
        secs(10),
    );
    let src = serde_json::from_str::<serde_json::Value>(out.stdout.trim())
        .ok()
        .and_then(|v| v["src"].as_str().map(str::to_string));
    assert_eq!(
        src.as_deref(),
        Some(EGRESS_V4),
        "UDP whoami {UDP_ORIGIN}:8 from d1: want the egress address as source: {}",
        out.describe()
    );

    // 4. Two devices at once, a few requests each.
    let fetch = |device: &Device| {
        (0..3)
            .map(|_| lab.http_src(device, secs(5)))
            .collect::<Vec<_>>()
    };
    thread::scope(|s| {
        let a = s.spawn(|| fetch(&d1));
        let b = s.spawn(|| fetch(&d2));
        for (device, results) in [(&d1, a.join()), (&d2, b.join())] {
            for result in results.expect("curl thread") {
                match result {
                    Ok(src) => assert_eq!(
                        src, EGRESS_V4,
                        "concurrent HTTP from d1 and d2: {} was seen from {src}, want {EGRESS_V4}",
                        device.name
                    ),
                    Err(out) => panic!(
                        "concurrent HTTP from d1 and d2: {} failed: {}",
                        device.name,
                        out.describe()
                    ),
                }
            }
        }
    });

    // 5. Devices cannot reach each other. d2 runs a listener on its tunnel address, so a failure
    // from d1 means the gateway did not carry the flow, not that nothing was there.
    let d2_url = format!("http://{}:8080/", d2.ipv4);
    lab.spawn_in(
        &d2.ns,
        &[&probe, "serve", "--http", &format!("{}:8080", d2.ipv4)],
    )
    .expect("start a listener in d2");
    let local = wait_until(secs(5), ms(50), || {
        let out = lab.curl(&d2, &d2_url, secs(1), &[]);
        out.ok().then_some(out)
    });
    assert!(
        local.is_some(),
        "d2's listener on {d2_url} does not answer d2 itself"
    );
    let out = lab.curl(&d1, &d2_url, secs(1), &[]);
    assert_blocked(
        &out,
        &format!("isolation: d1 fetching {d2_url} on d2's tunnel address"),
    );
    assert_no_reply(
        lab.ping(&d1, &d2.ipv4.to_string(), None, 1),
        &format!("isolation: d1 pinging d2's tunnel address {}", d2.ipv4),
    );

    // 9. Bulk TCP both ways.
    for (dir, extra) in [("upload", None), ("download", Some("-R"))] {
        let mut args = vec!["iperf3", "-c", IPERF_ORIGIN, "-t", "2", "-J"];
        args.extend(extra);
        let out = lab.run_in(&d1.ns, &args, secs(20));
        let mbits = iperf_mbits(&out.stdout);
        assert!(
            out.ok() && mbits.is_some_and(|m| m > 0.0),
            "iperf3 {dir} from d1 to {IPERF_ORIGIN}: want a completed run with nonzero \
             throughput (got {mbits:?} Mbit/s): {}",
            out.describe()
        );
        report(&format!(
            "iperf3 {dir}: {:.0} Mbit/s",
            mbits.unwrap_or_default()
        ));
    }

    // 6. A spoofed inner source is dropped; the real one keeps working. The address sits on the
    // wg interface, so wg-quick's policy routing sends it into the tunnel.
    let add = lab.run_in(
        &d1.ns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{SPOOFED_V4}/32"),
            "dev",
            &d1.iface,
        ],
        secs(5),
    );
    assert!(add.ok(), "adding {SPOOFED_V4} to d1: {}", add.describe());
    let sent_before = lab.tunnel_tx_bytes(&d1);
    let out = lab.curl(
        &d1,
        &format!("http://{HTTP_ORIGIN}/"),
        secs(1),
        &["--interface", SPOOFED_V4],
    );
    // A timeout (28) is what a dropped SYN looks like; anything else (a bind error, a refusal)
    // would mean the check did not test the gateway.
    assert_eq!(
        out.code,
        Some(28),
        "spoofing: HTTP from d1 with inner source {SPOOFED_V4}: want a timeout (curl exit 28, \
         SYN dropped by the gateway): {}",
        out.describe()
    );
    let sent_after = lab.tunnel_tx_bytes(&d1);
    assert!(
        sent_after > sent_before,
        "spoofing: d1's tunnel sent nothing during the spoofed request ({sent_before:?} -> \
         {sent_after:?} bytes), so the check did not reach the gateway"
    );
    assert_no_reply(
        lab.ping(&d1, GATEWAY_TUNNEL_V4, Some(SPOOFED_V4), 1),
        &format!("spoofing: ping from d1 to {GATEWAY_TUNNEL_V4} with inner source {SPOOFED_V4}"),
    );
    let out = lab.run_in(
        &d1.ns,
        &[
            &probe,
            "udp-probe",
            &format!("{UDP_ORIGIN}:7"),
            "--bind",
            &format!("{SPOOFED_V4}:0"),
            "--timeout-ms",
            "1000",
        ],
        secs(5),
    );
    // udp-probe exits 1 when no reply came, 2 on errors such as a failed bind.
    assert_eq!(
        out.code,
        Some(1),
        "spoofing: UDP echo from d1 with inner source {SPOOFED_V4}: want no reply (exit 1): {}",
        out.describe()
    );
    assert_egress(&lab, &d1, "d1's real address after the spoofing attempts");
}

#[test]
fn spine_revoke() {
    if skip("spine_revoke") {
        return;
    }
    let mut lab = Lab::up();
    let d1 = lab.add_device("d1", "d1").expect("bring up device d1");
    let d2 = lab.add_device("d2", "d2").expect("bring up device d2");
    assert_egress(&lab, &d1, "d1 before revocation");
    assert_egress(&lab, &d2, "d2 before revocation");

    // 7. Revocation while the gateway runs stops d1 within a second, new and established flows
    // alike; d2 is untouched. The established flow is a paced iperf3 download (reverse mode), so
    // its per-interval report shows when bytes stopped arriving.
    thread::scope(|s| {
        let started = Instant::now();
        let stream = s.spawn(|| {
            lab.run_in(
                &d1.ns,
                &[
                    "iperf3",
                    "-c",
                    IPERF_ORIGIN,
                    "-R",
                    "-b",
                    "20M",
                    "-t",
                    "4",
                    "-i",
                    "0.5",
                    "--forceflush",
                ],
                // A stalled iperf3 never ends by itself: this timeout ends it.
                ms(5500),
            )
        });
        thread::sleep(secs(1));
        let out = lab
            .waygate(&["device", "revoke", "d1"])
            .expect("run revoke");
        assert!(out.ok(), "waygate device revoke d1: {}", out.describe());
        let revoked = Instant::now();
        let revoked_at = started.elapsed();
        revoke_checks(&lab, &d1, &d2, revoked, out.elapsed);
        let stream = stream.join().expect("iperf3 thread");
        let intervals = iperf_intervals(&stream.stdout);
        assert!(
            intervals.first().is_some_and(|&(_, bytes)| bytes > 0.0),
            "revocation: d1's download did not get going before the revocation: {}",
            stream.describe()
        );
        // iperf3's clock starts after its connect, so an interval starting at t began at least t
        // after `started`.
        let after: Vec<_> = intervals
            .iter()
            .filter(|&&(start, _)| start >= revoked_at.as_secs_f64() + 1.0)
            .collect();
        assert!(
            !after.is_empty() && after.iter().all(|&&(_, bytes)| bytes == 0.0),
            "revocation: d1's established download (revoked {:.2}s into it) still received \
             bytes more than 1 s after revocation, or reported no interval after it: {}",
            revoked_at.as_secs_f64(),
            stream.describe()
        );
    });
}

/// New flows from the revoked `d1` fail within a second of `revoked`; `d2` keeps working.
fn revoke_checks(lab: &Lab, d1: &Device, d2: &Device, revoked: Instant, took: Duration) {
    // Short probes show when it took effect (the start of the first failed one); the fresh
    // request at +1 s below is what decides.
    let first_failure = wait_until(secs(1), ms(20), || {
        let started = revoked.elapsed();
        lab.http_src(d1, ms(300)).is_err().then_some(started)
    });
    report(&format!(
        "revoke command took {:.3}s; d1's first failed request started {} after it returned",
        took.as_secs_f64(),
        first_failure.map_or("none within 1 s".into(), |t| format!(
            "{:.3}s",
            t.as_secs_f64()
        ))
    ));
    if let Some(left) = secs(1).checked_sub(revoked.elapsed()) {
        thread::sleep(left);
    }
    match lab.http_src(d1, secs(1)) {
        Ok(src) => panic!(
            "revocation: d1 still reached the origin (as {src}) 1 s after `waygate device revoke \
             d1` returned"
        ),
        Err(out) => assert_blocked(&out, "revocation: d1's HTTP 1 s after revocation"),
    }
    assert_no_reply(
        lab.ping(d1, GATEWAY_TUNNEL_V4, None, 1),
        "revocation: d1 pinging the gateway after revocation",
    );
    assert_egress(lab, d2, "d2 after d1 was revoked");
    // The UAPI lists live peers only (it refreshes about once a second).
    let gone = wait_until(secs(3), ms(100), || {
        (!lab.gateway_peers().contains(&d1.public_key)).then_some(())
    });
    assert!(
        gone.is_some(),
        "revocation: `wg show {}gw peers` still lists d1 ({}) 3 s after revocation",
        lab.prefix(),
        d1.public_key
    );
    assert!(
        lab.gateway_peers().contains(&d2.public_key),
        "revocation of d1: `wg show {}gw peers` no longer lists d2",
        lab.prefix()
    );
}

/// `(start seconds, bytes)` of each interval line of iperf3's text report (`[  5]   1.00-1.50
/// sec  600 KBytes  9820 Kbits/sec`); the summary lines after the run are not intervals but are
/// never reached when the flow is cut.
fn iperf_intervals(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('[')?;
            let (_, rest) = rest.split_once(']')?;
            let mut words = rest.split_whitespace();
            let (start, _) = words.next()?.split_once('-')?;
            if words.next()? != "sec" {
                return None;
            }
            let amount: f64 = words.next()?.parse().ok()?;
            let scale = match words.next()? {
                "Bytes" => 1.0,
                "KBytes" => 1024.0,
                "MBytes" => 1024.0 * 1024.0,
                "GBytes" => 1024.0 * 1024.0 * 1024.0,
                _ => return None,
            };
            Some((start.parse().ok()?, amount * scale))
        })
        .collect()
}

/// Polls until `device` fetches from the origin again; the time it took.
fn wait_reconnect(lab: &Lab, device: &Device, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut last = None;
    let ok = wait_until(timeout, ms(100), || match lab.http_src(device, secs(1)) {
        Ok(src) => Some(src),
        Err(out) => {
            last = Some(out);
            None
        }
    });
    match ok {
        Some(src) if src == EGRESS_V4 => Ok(start.elapsed()),
        Some(src) => Err(format!("seen from {src}, want {EGRESS_V4}")),
        None => Err(format!(
            "no success within {}s; last attempt: {}",
            timeout.as_secs(),
            last.map(|o| o.describe()).unwrap_or_default()
        )),
    }
}

#[test]
fn spine_restart() {
    if skip("spine_restart") {
        return;
    }
    let mut lab = Lab::up();
    let d1 = lab.add_device("d1", "d1").expect("bring up device d1");
    let d2 = lab.add_device("d2", "d2").expect("bring up device d2");
    assert_egress(&lab, &d1, "d1 before the restart");
    assert_egress(&lab, &d2, "d2 before the restart");

    // 8. Restart on the same data dir: the devices come back with their configs unchanged (same
    // server key, same registry), the gateway handshaking first with each at its last address.
    // First the way an operator stops it (SIGTERM), then like a crash (SIGKILL: stale UAPI
    // socket, no clean registry shutdown).
    match lab.stop_gateway() {
        Stopped::Exited(status, took) => assert!(
            status.success(),
            "SIGTERM: the gateway exited with {status} after {:.3}s, want a clean exit",
            took.as_secs_f64()
        ),
        other => panic!("SIGTERM: the gateway did not exit within 5 s: {other:?}"),
    }
    let out = lab.curl(&d1, &format!("http://{HTTP_ORIGIN}/"), secs(1), &[]);
    assert_blocked(&out, "d1's HTTP with the gateway stopped");
    for how in ["SIGTERM", "SIGKILL"] {
        if how == "SIGKILL" {
            assert!(
                matches!(lab.kill_gateway(), Stopped::Exited(..)),
                "SIGKILL did not stop the gateway"
            );
        }
        let before = [&d1, &d2].map(|d| lab.latest_handshake(d).unwrap_or(0));
        // Handshake times are whole seconds: start in a later second than the last one.
        let newest = before[0].max(before[1]);
        while unix_now() <= newest {
            thread::sleep(ms(100));
        }
        lab.start_gateway()
            .unwrap_or_else(|e| panic!("restart after {how}: the gateway did not start: {e:#}"));
        // The gateway starts the handshake at each device's last address, while the devices send
        // nothing (their keepalives do not make wireguard-go handshake again; after the SIGKILL
        // nothing else would).
        let started = Instant::now();
        for (device, before) in [(&d1, before[0]), (&d2, before[1])] {
            let resumed = wait_until(secs(10), ms(100), || {
                lab.latest_handshake(device).filter(|&t| t > before)
            });
            assert!(
                resumed.is_some(),
                "restart after {how}: the gateway did not reach {} first\n{}",
                device.name,
                lab.wg_show(device)
            );
            report(&format!(
                "{} handshaken by the gateway within {:.1}s of its restart after {how}",
                device.name,
                started.elapsed().as_secs_f64()
            ));
        }
        let (r1, r2) = thread::scope(|s| {
            let a = s.spawn(|| wait_reconnect(&lab, &d1, secs(30)));
            let b = s.spawn(|| wait_reconnect(&lab, &d2, secs(30)));
            (a.join().expect("d1 poller"), b.join().expect("d2 poller"))
        });
        for (device, r) in [(&d1, r1), (&d2, r2)] {
            match r {
                Ok(t) => report(&format!(
                    "{} reconnected {:.1}s after the restart after {how}",
                    device.name,
                    t.as_secs_f64()
                )),
                Err(e) => panic!(
                    "restart after {how}: {} did not reconnect without re-enrolling: {e}\n{}",
                    device.name,
                    lab.wg_show(device)
                ),
            }
        }
    }
}
