//! The gateway core and one device over lossy, reordering wires, in simulated time: boringtun's
//! clock (mocked, thread-local) moves with the simulation's, so handshake retries, rekeys and
//! keepalives fire as they would over minutes of real time, in milliseconds.
//!
//! Every run is deterministic: the wires draw from seeded RNGs and nothing reads a real clock
//! after the start (boringtun's TAI64N timestamps add the mocked time to one real instant, which
//! only ever moves them forward).

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use smoltcp::wire::Icmpv4Packet;
use waygate_engine::flow::{Command, UpstreamEvent};
use waygate_engine::testkit::sim::{credited, Conditions, Origin, Sim, SimConfig};
use waygate_engine::testkit::{fill_ipv4_checksum, DEV_V4, EGRESS, GW_V4, ORIGIN};
use waygate_sim::advance_boringtun_clock;

/// 5% loss each way, 20 to 30 ms one way: datagrams overtake each other.
const LOSSY: Conditions = Conditions {
    latency: Duration::from_millis(20),
    jitter: Duration::from_millis(10),
    loss: 0.05,
};

/// Seeds every test runs with.
const SEEDS: [u64; 3] = [1, 2, 3];

fn lossy_sim(seed: u64, persistent_keepalive: Option<u16>) -> Sim {
    let mut sim = Sim::with(SimConfig {
        seed,
        up: LOSSY,
        down: LOSSY,
        persistent_keepalive,
        ..SimConfig::default()
    });
    sim.on_advance(advance_boringtun_clock);
    sim
}

/// `n` bytes that differ from any shift of themselves over short distances.
fn body(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i / 251) as u8) ^ salt)
        .collect()
}

#[test]
fn a_tcp_flow_carries_every_byte_both_ways_through_5_percent_loss() {
    const SIZE: usize = 256 * 1024;
    for seed in SEEDS {
        let mut sim = lossy_sim(seed, None);
        // The SYN waits for a handshake the wires may lose; boringtun retries it.
        let h = sim.tcp_connect(ORIGIN);
        let mut cmds = Vec::new();
        assert!(
            sim.advance_until(Duration::from_secs(60), Duration::from_millis(10), |s| {
                cmds.extend(s.take_commands());
                cmds.iter().any(|c| matches!(c, Command::TcpConnect { .. }))
            }),
            "seed {seed}: the flow never reached the gateway"
        );
        let (flow, upstream) = waygate_engine::testkit::sim::connect_flow(&cmds);
        assert_eq!(upstream.dst, ORIGIN);
        sim.upstream(UpstreamEvent::TcpConnected {
            flow,
            local: std::net::SocketAddr::new(IpAddr::V4(EGRESS), 50000),
        });
        let down = body(SIZE, 0x5a);
        let up = body(SIZE, 0xa5);
        let mut origin = Origin::new(flow, credited(&cmds, flow), Bytes::from(down.clone()));
        let mut got = Vec::with_capacity(SIZE);
        let mut sent = 0;
        let mut buf = vec![0u8; 65536];
        let done = sim.advance_until(Duration::from_secs(600), Duration::from_millis(10), |s| {
            origin.serve(s);
            let socket = s.tcp(h);
            if socket.can_send() && sent < up.len() {
                sent += socket.send_slice(&up[sent..]).unwrap_or(0);
            }
            while let Ok(n) = socket.recv_slice(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.run();
            origin.serve(s);
            got.len() == SIZE && origin.received.len() == SIZE
        });
        assert!(
            done,
            "seed {seed}: after {:?}, device got {} of {SIZE}, origin got {} of {SIZE}; origin {} left, credit {}; device socket {:?}",
            sim.elapsed(),
            got.len(),
            origin.received.len(),
            origin.to_send.len(),
            origin.credit,
            sim.tcp(h).state(),
        );

        assert!(got == down, "seed {seed}: the device got other bytes");
        assert!(
            origin.received == up,
            "seed {seed}: the origin got other bytes"
        );

        // Both sides close; the FINs cross the same lossy wires.
        sim.tcp(h).close();
        assert!(
            sim.advance_until(Duration::from_secs(60), Duration::from_millis(10), |s| {
                origin.serve(s);
                origin.shut
            }),
            "seed {seed}: the device's FIN never reached the upstream"
        );
        sim.upstream(UpstreamEvent::TcpEof { flow });
        assert!(
            sim.advance_until(Duration::from_secs(60), Duration::from_millis(10), |s| {
                !s.tcp(h).may_recv()
            }),
            "seed {seed}: the origin's FIN never reached the device"
        );

        // The wires did lose and reorder, both ways.
        for (name, wire) in [("up", &sim.up), ("down", &sim.down)] {
            let stats = wire.stats();
            let (sent, lost): (u64, u64) = (stats.sent.iter().sum(), stats.lost.iter().sum());
            assert!(sent > 150, "seed {seed}: {name}: {stats:?}");
            assert!(lost * 100 > sent * 2, "seed {seed}: {name}: {stats:?}");
            assert!(stats.reordered > 0, "seed {seed}: {name}: {stats:?}");
        }
        eprintln!(
            "seed {seed}: {SIZE} bytes each way in {:?} simulated; up {:?}; down {:?}",
            sim.elapsed(),
            sim.up.stats(),
            sim.down.stats()
        );
    }
}

/// An ICMP echo request from the device to the gateway's tunnel address, sequence `seq`.
fn ping(seq: u16) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 32, 0, 1, 0, 0, 64, 1, 0, 0, // IPv4, ICMP
        0, 0, 0, 0, 0, 0, 0, 0, // src, dst
        8, 0, 0, 0, 0x12, 0x34, 0, 0, // echo request, identifier 0x1234
        b'w', b'a', b'y', b'g',
    ];
    p[12..16].copy_from_slice(&DEV_V4.octets());
    p[16..20].copy_from_slice(&GW_V4.octets());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    fill_ipv4_checksum(&mut p);
    Icmpv4Packet::new_unchecked(&mut p[20..]).fill_checksum();
    p
}

/// Sequence numbers of the echo replies the device got, in `delivered[from..]`.
fn replies(sim: &Sim, from: usize) -> Vec<u16> {
    sim.delivered[from..]
        .iter()
        .filter(|p| p.len() >= 28 && p[9] == 1 && p[20] == 0)
        .filter(|p| p[12..16] == GW_V4.octets())
        .map(|p| u16::from_be_bytes([p[26], p[27]]))
        .collect()
}

fn handshake_age(sim: &Sim) -> Option<Duration> {
    sim.core.wireguard().stats()[0].since_handshake
}

#[test]
fn a_wireguard_session_survives_5_percent_loss_with_retries_rekeys_and_keepalives() {
    const PINGS: u16 = 600;
    for seed in SEEDS {
        let mut sim = lossy_sim(seed, Some(25));
        // The first initiation is lost whatever the seed: boringtun must retry it.
        sim.up.lose_next(1);
        let mut first_reply = None;
        let mut seen = 0;
        let mut answered = std::collections::BTreeSet::new();
        for seq in 0..PINGS {
            sim.send_raw(&ping(seq));
            sim.advance(Duration::from_secs(1));
            let got = replies(&sim, seen);
            seen = sim.delivered.len();
            if first_reply.is_none() && !got.is_empty() {
                first_reply = Some(sim.elapsed());
            }
            answered.extend(got);
            if seq == 60 {
                // A minute in: the gateway has a session, about as old as the simulation says.
                let age = handshake_age(&sim).expect("a session");
                assert!(age <= Duration::from_secs(60), "seed {seed}: {age:?}");
            }
        }
        // The retry came after REKEY_TIMEOUT (5 s) of simulated time, not of real time.
        let first = first_reply.expect("an echo reply");
        assert!(
            first >= Duration::from_secs(5) && first < Duration::from_secs(30),
            "seed {seed}: first reply at {first:?}"
        );
        // Pings queued during the first handshake are lost with it; of the rest, each of the
        // request and the reply crosses a 5% wire.
        let expected = (PINGS - first.as_secs() as u16) as usize;
        assert!(
            answered.len() * 100 >= expected * 80,
            "seed {seed}: {} of {expected} answered",
            answered.len()
        );
        let up = sim.up.stats().clone();
        let down = sim.down.stats().clone();
        // The device rekeys every REKEY_AFTER_TIME (120 s) while it sends: 10 minutes, at least
        // four more handshakes after the first, each answered by the gateway.
        assert!(
            up.sent[1] >= 6,
            "seed {seed}: initiations {up:?} / {down:?}"
        );
        assert!(down.sent[2] >= 5, "seed {seed}: responses {down:?}");
        let age = handshake_age(&sim).expect("a session");
        assert!(
            age < Duration::from_secs(180),
            "seed {seed}: the session is {age:?} old: rekeys did not happen"
        );

        // Idle for two minutes: the device's persistent keepalive (25 s) keeps the path open, and
        // the session lives on without data.
        let keepalives = up.keepalives;
        sim.advance(Duration::from_secs(120));
        let idle = sim.up.stats().keepalives - keepalives;
        assert!(
            (3..=6).contains(&idle),
            "seed {seed}: {idle} keepalives in 120 s idle"
        );
        assert!(handshake_age(&sim).is_some(), "seed {seed}");
        let before = sim.delivered.len();
        let mut back = false;
        for seq in PINGS..PINGS + 10 {
            sim.send_raw(&ping(seq));
            sim.advance(Duration::from_secs(1));
            back |= !replies(&sim, before).is_empty();
        }
        assert!(back, "seed {seed}: no reply after the idle time");
        assert_eq!(
            sim.core.open_flows(),
            (0, 0),
            "pings to the gateway hold no flow"
        );
        eprintln!(
            "seed {seed}: first reply at {first:?}, {} of {expected} answered; up {:?}; down {:?}; errors {:?}",
            answered.len(),
            sim.up.stats(),
            sim.down.stats(),
            sim.device_errors
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut sim = lossy_sim(seed, Some(25));
        for seq in 0..30 {
            sim.send_raw(&ping(seq));
            sim.advance(Duration::from_secs(1));
        }
        (
            sim.up.stats().clone(),
            sim.down.stats().clone(),
            replies(&sim, 0),
        )
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}
