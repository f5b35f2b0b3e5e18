//! Peers spread over shards: which shard owns a peer, which shard a datagram is for, and the
//! kernel program that steers datagrams to their shard's socket.
//!
//! Each shard runs its own [`crate::Endpoint`] on its own socket of a `SO_REUSEPORT` group bound
//! to the same address. A peer belongs to one shard for the life of the process:
//! [`Shard::owner_of_key`] (its public key, hashed with a per-process seed) decides. The owner
//! hands out the peer's receiver indices with the shard number in them (peer id modulo the
//! shard count, [`Shard::owns_id`]), so every message that carries a receiver index (handshake
//! response, cookie reply, data) names its shard in plain bytes, and [`steering_program`] has the
//! kernel deliver it to that shard's socket. A handshake initiation names no index: the program
//! sends it to a shard chosen by its source address ([`steer_initiation`]), so every initiation
//! of one address meets one shard's per-source limit however many ports it comes from, and the
//! shard that opens one for a peer it does not own hands it over ([`crate::Received::Handoff`]),
//! once per handshake.
//!
//! Inputs: the shard's place, datagrams' first bytes, public keys. Outputs: shard numbers and a
//! classic BPF program. No I/O: the runtime attaches the program (`SO_ATTACH_REUSEPORT_CBPF`).

use std::net::IpAddr;

use crate::PeerId;

/// Most shards: a classic BPF program's return value is the index of the socket in the group,
/// and more threads than this would not be cores of one host.
pub const MAX_SHARDS: u32 = 64;

/// One shard's place among all shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, from 0.
    pub index: u32,
    /// Shards in all, from 1 to [`MAX_SHARDS`].
    pub count: u32,
    /// Mixed into [`Shard::owner_of_key`], drawn once per process and the same for every shard,
    /// so nobody outside can line up keys on one shard.
    pub seed: u64,
}

impl Default for Shard {
    /// The only shard.
    fn default() -> Self {
        Shard {
            index: 0,
            count: 1,
            seed: 0,
        }
    }
}

impl Shard {
    /// The shard that owns the peer with this public key.
    pub fn owner_of_key(&self, public_key: &[u8; 32]) -> u32 {
        if self.count <= 1 {
            return 0;
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&public_key[..8]);
        // Public keys are uniform already; the seed and the multiply keep a chosen key from
        // picking its shard.
        let mixed = (u64::from_le_bytes(first) ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((mixed >> 32) % u64::from(self.count)) as u32
    }

    /// Whether this shard owns the peer with this public key.
    pub fn owns_key(&self, public_key: &[u8; 32]) -> bool {
        self.owner_of_key(public_key) == self.index
    }

    /// The shard whose endpoint handed out peer id `id`.
    pub fn owner_of_id(&self, id: PeerId) -> u32 {
        id % self.count.max(1)
    }

    /// Whether peer id `id` is one this shard hands out.
    pub fn owns_id(&self, id: PeerId) -> bool {
        self.owner_of_id(id) == self.index
    }
}

/// Offset of the receiver index in a handshake response (type 2), after type and sender index.
const RESPONSE_RECEIVER_AT: usize = 8;
/// Offset of the receiver index in a cookie reply (type 3) and a data message (type 4).
const RECEIVER_AT: usize = 4;

/// The peer id in a datagram's receiver index, for the messages that carry one: the index is
/// little-endian with the session ring in its low byte, so the id is the next three bytes.
pub fn peer_id_of(datagram: &[u8]) -> Option<PeerId> {
    let at = match *datagram.first()? {
        2 => RESPONSE_RECEIVER_AT,
        3 | 4 => RECEIVER_AT,
        _ => return None,
    };
    let b = datagram.get(at + 1..at + 4)?;
    Some(u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16)
}

/// The shard a datagram must reach, as [`steering_program`] decides it in the kernel. `None`:
/// any shard (a handshake initiation, or not a WireGuard message).
pub fn steer(datagram: &[u8], count: u32) -> Option<u32> {
    if count <= 1 {
        return Some(0);
    }
    peer_id_of(datagram).map(|id| id % count)
}

/// The shard a handshake initiation from `src` goes to, as [`steering_program`] decides it in
/// the kernel: an IPv4 source as a big-endian number, an IPv6 source's /64 (the unit the
/// per-source limit counts) as its two big-endian words XORed, modulo the shard count. Before,
/// the kernel's 4-tuple hash spread one address's initiations over every shard, each with its
/// own limit: a flood from 64 ports of one address reached X25519 615 times in 8 s on two shards
/// against 160 on one (scripts/bench-scale.sh section 5).
pub fn steer_initiation(src: IpAddr, count: u32) -> u32 {
    let count = count.max(1);
    match src.to_canonical() {
        IpAddr::V4(v4) => u32::from_be_bytes(v4.octets()) % count,
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let hi = u32::from_be_bytes([o[0], o[1], o[2], o[3]]);
            let lo = u32::from_be_bytes([o[4], o[5], o[6], o[7]]);
            (hi ^ lo) % count
        }
    }
}

/// A classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Operation.
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// Classic BPF opcodes (linux/filter.h), the few the program uses.
pub mod op {
    /// `A = byte at [k]` (BPF_LD | BPF_B | BPF_ABS).
    pub const LD_B_ABS: u16 = 0x30;
    /// `A = big-endian word at [k]` (BPF_LD | BPF_W | BPF_ABS).
    pub const LD_W_ABS: u16 = 0x20;
    /// `A >>= k` (BPF_ALU | BPF_RSH | BPF_K).
    pub const RSH_K: u16 = 0x74;
    /// `A ^= X` (BPF_ALU | BPF_XOR | BPF_X).
    pub const XOR_X: u16 = 0xac;
    /// `if A == k` (BPF_JMP | BPF_JEQ | BPF_K).
    pub const JEQ_K: u16 = 0x15;
    /// `A <<= k` (BPF_ALU | BPF_LSH | BPF_K).
    pub const LSH_K: u16 = 0x64;
    /// `A |= X` (BPF_ALU | BPF_OR | BPF_X).
    pub const OR_X: u16 = 0x4c;
    /// `A %= k` (BPF_ALU | BPF_MOD | BPF_K).
    pub const MOD_K: u16 = 0x94;
    /// `X = A` (BPF_MISC | BPF_TAX).
    pub const TAX: u16 = 0x07;
    /// `return A` (BPF_RET | BPF_A).
    pub const RET_A: u16 = 0x16;
    /// `return k` (BPF_RET | BPF_K).
    pub const RET_K: u16 = 0x06;
}

/// What the program returns for "any socket": past the group's end, so the kernel falls back to
/// its 4-tuple hash.
pub const ANY_SHARD: u32 = u32::MAX;

/// Where a classic BPF load reads the network (IP) header instead of the UDP payload
/// (`SKF_NET_OFF`, linux/filter.h), as an unsigned offset.
pub const NET_OFF: u32 = (-0x10_0000i32) as u32;
/// Offset of the source address in an IPv4 header.
const IPV4_SRC_AT: u32 = 12;
/// Offset of the source address in an IPv6 header.
const IPV6_SRC_AT: u32 = 8;

/// The program for a `SO_REUSEPORT` group of `count` sockets bound in shard order: it sees the
/// UDP payload and returns [`steer`]'s shard, for an initiation [`steer_initiation`]'s, or
/// [`ANY_SHARD`]. A datagram too short for its index makes the kernel stop the program with 0:
/// shard 0, which drops it.
pub fn steering_program(count: u32) -> Vec<Insn> {
    let i = |code, jt, jf, k| Insn { code, jt, jf, k };
    // A = id bytes at at+1.. (little-endian, 24 bits) % count; return A.
    let index_at = |at: u32| {
        vec![
            i(op::LD_B_ABS, 0, 0, at + 3),
            i(op::LSH_K, 0, 0, 16),
            i(op::TAX, 0, 0, 0),
            i(op::LD_B_ABS, 0, 0, at + 2),
            i(op::LSH_K, 0, 0, 8),
            i(op::OR_X, 0, 0, 0),
            i(op::TAX, 0, 0, 0),
            i(op::LD_B_ABS, 0, 0, at + 1),
            i(op::OR_X, 0, 0, 0),
            i(op::MOD_K, 0, 0, count.max(1)),
            i(op::RET_A, 0, 0, 0),
        ]
    };
    let cookie_or_data = index_at(RECEIVER_AT as u32);
    let response = index_at(RESPONSE_RECEIVER_AT as u32);
    let count = count.max(1);
    // The IP header's version: 4 -> the source word, 6 -> the /64's two words XORed.
    let initiation = vec![
        i(op::LD_B_ABS, 0, 0, NET_OFF),
        i(op::RSH_K, 0, 0, 4),
        i(op::JEQ_K, 2, 0, 4),
        i(op::JEQ_K, 4, 0, 6),
        i(op::RET_K, 0, 0, ANY_SHARD),
        i(op::LD_W_ABS, 0, 0, NET_OFF + IPV4_SRC_AT),
        i(op::MOD_K, 0, 0, count),
        i(op::RET_A, 0, 0, 0),
        i(op::LD_W_ABS, 0, 0, NET_OFF + IPV6_SRC_AT),
        i(op::TAX, 0, 0, 0),
        i(op::LD_W_ABS, 0, 0, NET_OFF + IPV6_SRC_AT + 4),
        i(op::XOR_X, 0, 0, 0),
        i(op::MOD_K, 0, 0, count),
        i(op::RET_A, 0, 0, 0),
    ];
    let n = cookie_or_data.len() as u8;
    let mut p = vec![
        i(op::LD_B_ABS, 0, 0, 0),
        // 2: the response's block, after the other one (set below).
        i(op::JEQ_K, 0, 0, 2),
        i(op::JEQ_K, 3, 0, 3),
        i(op::JEQ_K, 2, 0, 4),
        // 1: the initiation's block, after both (set below).
        i(op::JEQ_K, 0, 0, 1),
        // No WireGuard message.
        i(op::RET_K, 0, 0, ANY_SHARD),
    ];
    // Jumps count from the next instruction: the blocks follow in this order.
    p[1].jt = 4 + n;
    p[4].jt = 1 + 2 * n;
    p.extend(cookie_or_data);
    p.extend(response);
    p.extend(initiation);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Runs a program the way the kernel's classic BPF does for the ops it uses, on a UDP
    /// payload with the IP header `net` before it: a load past the end stops it with 0.
    fn run_from(program: &[Insn], net: &[u8], packet: &[u8]) -> u32 {
        let bytes = |k: u32, len: usize| -> Option<&[u8]> {
            if k >= NET_OFF {
                let at = (k - NET_OFF) as usize;
                net.get(at..at + len)
            } else {
                packet.get(k as usize..k as usize + len)
            }
        };
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        for _ in 0..4096 {
            let ins = program[pc];
            pc += 1;
            match ins.code {
                op::LD_B_ABS => match bytes(ins.k, 1) {
                    Some(b) => a = u32::from(b[0]),
                    None => return 0,
                },
                op::LD_W_ABS => match bytes(ins.k, 4) {
                    Some(b) => a = u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    None => return 0,
                },
                op::RSH_K => a >>= ins.k,
                op::XOR_X => a ^= x,
                op::JEQ_K => pc += usize::from(if a == ins.k { ins.jt } else { ins.jf }),
                op::LSH_K => a <<= ins.k,
                op::OR_X => a |= x,
                op::MOD_K => a %= ins.k,
                op::TAX => x = a,
                op::RET_A => return a,
                op::RET_K => return ins.k,
                other => panic!("unknown op {other:#x}"),
            }
        }
        panic!("no return");
    }

    /// An IPv4 header from 198.51.100.7.
    const NET4: [u8; 20] = [
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 198, 51, 100, 7, 198, 51, 100, 1,
    ];

    fn run(program: &[Insn], packet: &[u8]) -> u32 {
        run_from(program, &NET4, packet)
    }

    /// An IP header (no options) with source `src`.
    fn header(src: IpAddr) -> Vec<u8> {
        match src {
            IpAddr::V4(v4) => {
                let mut h = NET4.to_vec();
                h[12..16].copy_from_slice(&v4.octets());
                h
            }
            IpAddr::V6(v6) => {
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[8..24].copy_from_slice(&v6.octets());
                h
            }
        }
    }

    #[test]
    fn initiations_go_to_the_shard_of_their_source_address() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut init = vec![0u8; 148];
        rng.fill(&mut init[..]);
        init[0] = 1;
        for count in [2u32, 3, 4, 7, 16, MAX_SHARDS] {
            let program = steering_program(count);
            let mut seen = vec![0usize; count as usize];
            for _ in 0..500 {
                let src = if rng.gen_bool(0.5) {
                    IpAddr::from(rng.gen::<[u8; 4]>())
                } else {
                    IpAddr::from(rng.gen::<[u8; 16]>())
                };
                let shard = steer_initiation(src, count);
                assert!(shard < count);
                assert_eq!(
                    run_from(&program, &header(src), &init),
                    shard,
                    "{src} of {count}"
                );
                seen[shard as usize] += 1;
                // Another address of the same IPv6 /64 goes to the same shard.
                if let IpAddr::V6(v6) = src {
                    let mut o = v6.octets();
                    o[15] ^= 0xff;
                    assert_eq!(steer_initiation(IpAddr::from(o), count), shard);
                }
            }
            if count <= 4 {
                assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
            }
        }
        // An IPv4 address mapped into IPv6 is the IPv4 address.
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(steer_initiation(mapped, 5), steer_initiation(v4, 5));
        // Not IPv4 or IPv6: any shard.
        let mut odd = NET4.to_vec();
        odd[0] = 0x25;
        assert_eq!(run_from(&steering_program(4), &odd, &init), ANY_SHARD);
    }

    fn message(kind: u8, receiver_at: usize, receiver: u32, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        d[0] = kind;
        if receiver_at + 4 <= len {
            d[receiver_at..receiver_at + 4].copy_from_slice(&receiver.to_le_bytes());
        }
        d
    }

    #[test]
    fn the_program_sends_each_indexed_message_to_the_shard_that_owns_its_index() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for count in [2u32, 3, 4, 7, 16, MAX_SHARDS] {
            let program = steering_program(count);
            for shard in 0..count {
                let s = Shard {
                    index: shard,
                    count,
                    seed: 1,
                };
                for _ in 0..200 {
                    // An id this shard would hand out, with any session ring byte.
                    let id =
                        (rng.gen_range(0..(0x00FF_FFFF / count)) * count + shard) & 0x00FF_FFFF;
                    assert!(s.owns_id(id));
                    let receiver = id << 8 | rng.gen_range(0..=255u32);
                    for (kind, at, len) in [(2u8, 8, 92), (3, 4, 64), (4, 4, 32), (4, 4, 1452)] {
                        let d = message(kind, at, receiver, len);
                        assert_eq!(peer_id_of(&d), Some(id));
                        assert_eq!(steer(&d, count), Some(shard));
                        assert_eq!(run(&program, &d), shard, "type {kind}, count {count}");
                    }
                }
            }
        }
    }

    #[test]
    fn initiations_go_by_source_and_other_bytes_to_the_kernels_hash() {
        let program = steering_program(4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut init = vec![0u8; 148];
        rng.fill(&mut init[..]);
        init[0] = 1;
        assert_eq!(steer(&init, 4), None);
        assert_eq!(
            run(&program, &init),
            steer_initiation("198.51.100.7".parse().unwrap(), 4)
        );
        for _ in 0..2_000 {
            let len = rng.gen_range(0..200);
            let mut d = vec![0u8; len];
            rng.fill(&mut d[..]);
            if len > 0 && rng.gen_bool(0.5) {
                d[0] = rng.gen_range(0..6);
            }
            let got = run(&program, &d);
            match steer(&d, 4) {
                Some(shard) => assert_eq!(got, shard, "{d:?}"),
                None if d.first() == Some(&1) => {
                    assert_eq!(got, steer_initiation("198.51.100.7".parse().unwrap(), 4))
                }
                // Too short for its index (the kernel's 0), or no index at all.
                None => assert!(got == ANY_SHARD || got == 0, "{d:?} -> {got}"),
            }
        }
    }

    #[test]
    fn keys_spread_over_every_shard_and_stay_with_their_owner() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let count = 4;
        let shards: Vec<Shard> = (0..count)
            .map(|index| Shard {
                index,
                count,
                seed: 0x5eed,
            })
            .collect();
        let mut per_shard = [0usize; 4];
        for _ in 0..4_000 {
            let mut key = [0u8; 32];
            rng.fill(&mut key);
            let owner = shards[0].owner_of_key(&key);
            // Every shard agrees, and exactly one owns it.
            assert!(shards.iter().all(|s| s.owner_of_key(&key) == owner));
            assert_eq!(shards.iter().filter(|s| s.owns_key(&key)).count(), 1);
            per_shard[owner as usize] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| (800..1200).contains(&n)),
            "{per_shard:?}"
        );
        // One shard owns everything.
        assert_eq!(Shard::default().owner_of_key(&[9; 32]), 0);
        assert_eq!(steer(&[4; 32], 1), Some(0));
    }
}
