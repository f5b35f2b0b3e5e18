//! The SACK scoreboard (RFC 6675): the data above the cumulative ACK the remote reported
//! holding, as sorted, disjoint blocks.

use crate::wire::TcpSeqNumber;

/// Most blocks kept; above it the lowest are kept (holes low in the window are repaired
/// first). A queue that overflows under a sender at twice the link's rate or more drops every
/// other packet for a while and leaves a hole between every two that got through: one 40 ms
/// download behind a 100 Mbit/s link with a 50 ms queue left 80 blocks (scripts/bench-far.sh
/// with BENCH_CAPTURE). Holding 32, the scoreboard forgot the higher ones, and recovery resent
/// about 600 segments the device already had and left the link without new data for 100 ms,
/// twice in the first two seconds. Without `alloc` the blocks live in the socket.
#[cfg(feature = "alloc")]
const MAX_BLOCKS: usize = 1024;
#[cfg(not(feature = "alloc"))]
const MAX_BLOCKS: usize = 32;

/// Kept on the heap with `alloc`, so that a socket that never saw a loss pays nothing for them.
#[cfg(feature = "alloc")]
type Blocks = alloc::vec::Vec<(TcpSeqNumber, TcpSeqNumber)>;
#[cfg(not(feature = "alloc"))]
type Blocks = heapless::Vec<(TcpSeqNumber, TcpSeqNumber), MAX_BLOCKS>;

/// SACKed blocks above the cumulative ACK, sorted and disjoint.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) struct Scoreboard {
    blocks: Blocks,
    /// Octets in all blocks, kept up to date by every change (the sender's pipe needs them
    /// for every segment).
    bytes: usize,
}

impl Scoreboard {
    /// The blocks, lowest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (TcpSeqNumber, TcpSeqNumber)> + '_ {
        self.blocks.iter().copied()
    }

    /// Forgets every block and gives back their memory.
    pub(super) fn clear(&mut self) {
        self.blocks = Blocks::new();
        self.bytes = 0;
    }

    /// Octets in all blocks.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The end of the highest block.
    pub(super) fn highest(&self) -> Option<TcpSeqNumber> {
        self.blocks.last().map(|&(_, right)| right)
    }

    /// Whether one block holds all of `left..right`.
    pub(super) fn covers(&self, left: TcpSeqNumber, right: TcpSeqNumber) -> bool {
        self.iter().any(|(l, r)| l <= left && right <= r)
    }

    /// Adds `left..right`, merged with the blocks it touches. When no slot is left, a block
    /// above all others is not kept, and one below them takes the highest one's place.
    pub(super) fn insert(&mut self, left: TcpSeqNumber, right: TcpSeqNumber) {
        if left >= right {
            return;
        }
        // The first block that ends at or after `left`: it and those after it that start at
        // or before `right` merge with the new one.
        let at = self.blocks.partition_point(|&(_, r)| r < left);
        let mut merged = (left, right);
        while let Some(&(l, r)) = self.blocks.get(at)
            && l <= right
        {
            merged = (merged.0.min(l), merged.1.max(r));
            self.blocks.remove(at);
            self.bytes -= r - l;
        }
        if self.blocks.len() >= MAX_BLOCKS {
            if at >= self.blocks.len() {
                return;
            }
            if let Some((l, r)) = self.blocks.pop() {
                self.bytes -= r - l;
            }
        }
        self.bytes += merged.1 - merged.0;
        #[cfg(feature = "alloc")]
        self.blocks.insert(at, merged);
        // Cannot fail: a slot is free.
        #[cfg(not(feature = "alloc"))]
        let _ = self.blocks.insert(at, merged);
    }

    /// Drops what lies below `una`, the new cumulative ACK: whole blocks, and the start of
    /// the block it falls in.
    pub(super) fn acknowledge(&mut self, una: TcpSeqNumber) {
        let mut gone = 0;
        self.blocks.retain(|&(left, right)| {
            let keep = right > una;
            if !keep {
                gone += right - left;
            }
            keep
        });
        if let Some(first) = self.blocks.first_mut()
            && first.0 < una
        {
            gone += una - first.0;
            first.0 = una;
        }
        self.bytes -= gone;
        if self.blocks.is_empty() {
            self.clear();
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn seq(n: i32) -> TcpSeqNumber {
        TcpSeqNumber(n)
    }

    /// The blocks, after checking the byte count kept with them.
    fn blocks(board: &Scoreboard) -> std::vec::Vec<(i32, i32)> {
        let sum: usize = board.iter().map(|(l, r)| r - l).sum();
        assert_eq!(board.bytes(), sum);
        board.iter().map(|(l, r)| (l.0, r.0)).collect()
    }

    #[test]
    fn blocks_stay_sorted_and_merge_what_they_touch() {
        let mut board = Scoreboard::default();
        board.insert(seq(300), seq(400));
        board.insert(seq(100), seq(200));
        board.insert(seq(500), seq(600));
        assert_eq!(blocks(&board), [(100, 200), (300, 400), (500, 600)]);
        // Touching one end of a block, and bridging two.
        board.insert(seq(200), seq(250));
        board.insert(seq(350), seq(550));
        assert_eq!(blocks(&board), [(100, 250), (300, 600)]);
        // Inside a block: nothing new.
        board.insert(seq(310), seq(320));
        assert_eq!(blocks(&board), [(100, 250), (300, 600)]);
        assert_eq!(board.bytes(), 450);
        assert_eq!(board.highest(), Some(seq(600)));
        assert!(board.covers(seq(320), seq(600)));
        assert!(!board.covers(seq(200), seq(310)));
        // Empty ranges are no blocks.
        board.insert(seq(700), seq(700));
        assert_eq!(board.highest(), Some(seq(600)));
    }

    #[test]
    fn sequence_numbers_that_wrap_keep_their_order() {
        let mut board = Scoreboard::default();
        let past_wrap = i32::MIN + 100;
        board.insert(seq(past_wrap), seq(past_wrap + 100));
        board.insert(seq(i32::MAX - 99), seq(i32::MIN + 50));
        assert_eq!(
            blocks(&board),
            [(i32::MAX - 99, i32::MIN + 50), (past_wrap, past_wrap + 100)]
        );
        board.acknowledge(seq(i32::MIN + 10));
        assert_eq!(
            blocks(&board),
            [(i32::MIN + 10, i32::MIN + 50), (past_wrap, past_wrap + 100)]
        );
        assert_eq!(board.bytes(), 140);
    }

    #[test]
    fn an_acknowledgment_drops_what_it_covers() {
        let mut board = Scoreboard::default();
        board.insert(seq(100), seq(200));
        board.insert(seq(300), seq(400));
        board.acknowledge(seq(150));
        assert_eq!(blocks(&board), [(150, 200), (300, 400)]);
        board.acknowledge(seq(300));
        assert_eq!(blocks(&board), [(300, 400)]);
        board.acknowledge(seq(400));
        assert_eq!(board, Scoreboard::default());
        assert_eq!(board.highest(), None);
    }

    #[test]
    fn a_full_board_keeps_its_lowest_blocks() {
        let mut board = Scoreboard::default();
        // Every other segment of a burst got through: one block each.
        let block = |i: i32| (seq(i * 20), seq(i * 20 + 10));
        for i in 1..=MAX_BLOCKS as i32 {
            let (l, r) = block(i);
            board.insert(l, r);
        }
        assert_eq!(blocks(&board).len(), MAX_BLOCKS);
        // Above all: not kept.
        let (l, r) = block(MAX_BLOCKS as i32 + 1);
        board.insert(l, r);
        assert_eq!(board.highest(), Some(block(MAX_BLOCKS as i32).1));
        // Below all: kept, in the highest one's place.
        board.insert(seq(0), seq(5));
        assert_eq!(blocks(&board).len(), MAX_BLOCKS);
        assert_eq!(board.iter().next(), Some((seq(0), seq(5))));
        assert_eq!(board.highest(), Some(block(MAX_BLOCKS as i32 - 1).1));
        // Merging frees slots: a block that spans two leaves room for one above.
        let (l, _) = block(1);
        let (_, r) = block(2);
        board.insert(l, r);
        let (l, r) = block(MAX_BLOCKS as i32);
        board.insert(l, r);
        assert_eq!(board.highest(), Some(r));
        assert_eq!(blocks(&board).len(), MAX_BLOCKS);
    }
}
