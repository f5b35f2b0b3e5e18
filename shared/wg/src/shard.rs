//! Peers spread over shards: which shard owns a peer, which shard a datagram is for, and the
//! kernel program that steers datagrams to their shard's socket.
//!
//! Each shard runs its own [`crate::Endpoint`] on its own socket of a `SO_REUSEPORT` group bound
//! to the same address. A peer belongs to one shard for the life of the process:
//! [`Shard::owner_of_key`] (its public key, hashed with a per-process seed) decides. The owner
//! hands out the peer's receiver indices with the shard number in them (peer id modulo the
//! shard count, [`Shard::owns_id`]), so every message that carries a receiver index (handshake
//! response, cookie reply, data) names its shard in plain bytes, and [`steering_program`] has the
//! kernel deliver it to that shard's socket. A handshake initiation names no index: the kernel
//! spreads those by its own 4-tuple hash, and the shard that opens one for a peer it does not own
//! hands it over ([`crate::Received::Handoff`]), once per handshake.
//!
//! Inputs: the shard's place, datagrams' first bytes, public keys. Outputs: shard numbers and a
//! classic BPF program. No I/O: the runtime attaches the program (`SO_ATTACH_REUSEPORT_CBPF`).

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

/// The program for a `SO_REUSEPORT` group of `count` sockets bound in shard order: it sees the
/// UDP payload and returns [`steer`]'s shard, or [`ANY_SHARD`]. A datagram too short for its
/// index makes the kernel stop the program with 0: shard 0, which drops it.
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
    let n = cookie_or_data.len() as u8;
    let mut p = vec![
        i(op::LD_B_ABS, 0, 0, 0),
        // 2: the response's block, after the other one (set below).
        i(op::JEQ_K, 0, 0, 2),
        i(op::JEQ_K, 2, 0, 3),
        i(op::JEQ_K, 1, 0, 4),
        // An initiation or no WireGuard message.
        i(op::RET_K, 0, 0, ANY_SHARD),
    ];
    // Jumps count from the next instruction: the response block starts `n` past this one.
    p[1].jt = 3 + n;
    p.extend(cookie_or_data);
    p.extend(response);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Runs a program the way the kernel's classic BPF does for the ops it uses: a load past
    /// the end stops it with 0.
    fn run(program: &[Insn], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        for _ in 0..4096 {
            let ins = program[pc];
            pc += 1;
            match ins.code {
                op::LD_B_ABS => match packet.get(ins.k as usize) {
                    Some(&b) => a = u32::from(b),
                    None => return 0,
                },
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
    fn initiations_and_other_bytes_are_left_to_the_kernels_hash() {
        let program = steering_program(4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut init = vec![0u8; 148];
        rng.fill(&mut init[..]);
        init[0] = 1;
        assert_eq!(steer(&init, 4), None);
        assert_eq!(run(&program, &init), ANY_SHARD);
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
