//! Outgoing UDP datagrams, packed back to back in one buffer so the runtime can hand runs of
//! equal-sized datagrams to the kernel in one `sendmsg` (UDP GSO) without copying them again.

use std::net::SocketAddr;
use std::ops::Range;

/// Largest datagram the queue accepts (a WireGuard message around a 64 KiB IP packet).
pub const MAX_DATAGRAM: usize = 65_535;

/// One queued datagram: where it goes and where its bytes are in the queue's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Destination.
    pub dst: SocketAddr,
    /// Byte range in [`TransmitQueue::bytes`].
    pub range: Range<usize>,
}

/// Datagrams waiting to be sent, in order.
#[derive(Debug, Default)]
pub struct TransmitQueue {
    buf: Vec<u8>,
    items: Vec<Datagram>,
}

impl TransmitQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a datagram written by `fill` into a buffer of `max_len` bytes; `fill` returns how
    /// many bytes it wrote (0 queues nothing).
    pub fn push_with(
        &mut self,
        dst: SocketAddr,
        max_len: usize,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) {
        let start = self.buf.len();
        self.buf.resize(start + max_len.min(MAX_DATAGRAM), 0);
        let written = fill(&mut self.buf[start..]).min(max_len);
        self.buf.truncate(start + written);
        if written > 0 {
            self.items.push(Datagram {
                dst,
                range: start..start + written,
            });
        }
    }

    /// Appends a copy of `bytes`.
    pub fn push(&mut self, dst: SocketAddr, bytes: &[u8]) {
        self.push_with(dst, bytes.len(), |buf| {
            buf[..bytes.len()].copy_from_slice(bytes);
            bytes.len()
        });
    }

    /// Queued datagrams, oldest first.
    pub fn datagrams(&self) -> &[Datagram] {
        &self.items
    }

    /// The buffer the datagrams' ranges point into.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Number of queued datagrams.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Forgets everything (keeps the allocation).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }

    /// Splits the queue into runs the kernel can send in one GSO call: consecutive datagrams to
    /// the same destination, all of one size except a possibly shorter last one, at most
    /// `max_segments` of them.
    pub fn gso_runs(&self, max_segments: usize) -> GsoRuns<'_> {
        GsoRuns {
            queue: self,
            next: 0,
            max_segments: max_segments.max(1),
        }
    }
}

/// A run of datagrams sendable in one call: `contents` is `segment_size`-byte datagrams back to back.
#[derive(Debug, PartialEq, Eq)]
pub struct GsoRun<'a> {
    /// Destination of every datagram in the run.
    pub dst: SocketAddr,
    /// The datagrams, concatenated.
    pub contents: &'a [u8],
    /// Size of each datagram but the last.
    pub segment_size: usize,
}

/// Iterator over [`GsoRun`]s; see [`TransmitQueue::gso_runs`].
#[derive(Debug)]
pub struct GsoRuns<'a> {
    queue: &'a TransmitQueue,
    next: usize,
    max_segments: usize,
}

impl<'a> Iterator for GsoRuns<'a> {
    type Item = GsoRun<'a>;

    fn next(&mut self) -> Option<GsoRun<'a>> {
        let items = &self.queue.items;
        let first = items.get(self.next)?;
        let size = first.range.len();
        let mut end = self.next + 1;
        let mut bytes_end = first.range.end;
        while end < items.len() && end - self.next < self.max_segments {
            let d = &items[end];
            // Contiguity holds by construction; the size check keeps every segment but the
            // last full-sized, which is what the kernel's GSO requires.
            if d.dst != first.dst || d.range.len() > size || d.range.start != bytes_end {
                break;
            }
            bytes_end = d.range.end;
            end += 1;
            if d.range.len() < size {
                break;
            }
        }
        self.next = end;
        Some(GsoRun {
            dst: first.dst,
            contents: &self.queue.buf[first.range.start..bytes_end],
            segment_size: size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 11], port))
    }

    #[test]
    fn runs_group_equal_sizes_to_one_destination() {
        let mut q = TransmitQueue::new();
        q.push(addr(1), &[1; 100]);
        q.push(addr(1), &[2; 100]);
        q.push(addr(1), &[3; 40]); // shorter last segment ends the run
        q.push(addr(1), &[4; 100]);
        q.push(addr(2), &[5; 100]); // other destination
        q.push(addr(2), &[6; 120]); // bigger: new run
        let runs: Vec<_> = q.gso_runs(64).collect();
        let shape: Vec<_> = runs
            .iter()
            .map(|r| (r.dst.port(), r.contents.len(), r.segment_size))
            .collect();
        assert_eq!(
            shape,
            vec![(1, 240, 100), (1, 100, 100), (2, 100, 100), (2, 120, 120)]
        );
        assert_eq!(runs[0].contents[100], 2);
    }

    #[test]
    fn runs_respect_the_segment_cap() {
        let mut q = TransmitQueue::new();
        for _ in 0..5 {
            q.push(addr(1), &[0; 10]);
        }
        let sizes: Vec<_> = q.gso_runs(2).map(|r| r.contents.len()).collect();
        assert_eq!(sizes, vec![20, 20, 10]);
    }

    #[test]
    fn push_with_zero_queues_nothing() {
        let mut q = TransmitQueue::new();
        q.push_with(addr(1), 100, |_| 0);
        assert!(q.is_empty());
        assert!(q.bytes().is_empty());
    }
}
