//! Whether an HTTP/2 origin accepts extended CONNECT (RFC 8441: WebSockets over HTTP/2), read
//! from the first frame it sends, its SETTINGS (RFC 9113 section 3.4), as the bytes pass to
//! hyper. The device is offered extended CONNECT only when its origin accepts it: a browser
//! that was offered it opens its WebSockets that way and does not fall back to HTTP/1.1 when
//! the CONNECT fails.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 section 3).
const ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
/// A frame header: length (24 bits), type, flags, stream (RFC 9113 section 4.1).
const HEADER: usize = 9;
/// A SETTINGS entry: identifier (16 bits), value (32 bits).
const ENTRY: usize = 6;
const TYPE_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
/// The largest frame a peer may send before our own SETTINGS say otherwise.
const MAX_FRAME: usize = 16_384;

/// Reads the first frame of an origin's byte stream as it arrives, in pieces of any size,
/// holding at most one header and one entry.
#[derive(Debug, Default, Clone)]
pub struct FirstSettings {
    header: [u8; HEADER],
    header_len: usize,
    entry: [u8; ENTRY],
    entry_len: usize,
    /// Payload bytes still to come.
    left: usize,
    connect: bool,
    done: Option<bool>,
}

impl FirstSettings {
    /// Feeds the next bytes of the stream: `Some(accepts extended CONNECT)` once the first
    /// frame is read (`Some(false)` when it is not a well-formed SETTINGS frame), `None`
    /// while more is needed.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<bool> {
        while self.done.is_none() && !bytes.is_empty() {
            if self.header_len < HEADER {
                let n = (HEADER - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == HEADER {
                    let h = &self.header;
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let settings = h[3] == TYPE_SETTINGS
                        && h[4] & FLAG_ACK == 0
                        && stream == 0
                        && len % ENTRY == 0
                        && len <= MAX_FRAME;
                    self.left = len;
                    if !settings || len == 0 {
                        self.done = Some(false);
                    }
                }
                continue;
            }
            let n = self.left.min(bytes.len()).min(ENTRY - self.entry_len);
            self.entry[self.entry_len..self.entry_len + n].copy_from_slice(&bytes[..n]);
            self.entry_len += n;
            self.left -= n;
            bytes = &bytes[n..];
            if self.entry_len == ENTRY {
                self.entry_len = 0;
                let e = &self.entry;
                if u16::from_be_bytes([e[0], e[1]]) == ENABLE_CONNECT_PROTOCOL {
                    // A later entry for the same setting wins (RFC 9113 section 6.5.3).
                    self.connect = u32::from_be_bytes([e[2], e[3], e[4], e[5]]) == 1;
                }
            }
            if self.left == 0 {
                self.done = Some(self.connect);
            }
        }
        self.done
    }
}

/// An origin's stream, unchanged, telling once whether its first frame accepts extended
/// CONNECT (`false` when the stream ends or fails first, or the frame is something else).
pub struct Watched<IO> {
    io: IO,
    watch: Option<(FirstSettings, oneshot::Sender<bool>)>,
}

impl<IO> Watched<IO> {
    /// Watches `io`; the answer arrives on the receiver.
    pub fn new(io: IO) -> (Watched<IO>, oneshot::Receiver<bool>) {
        let (tx, rx) = oneshot::channel();
        (
            Watched {
                io,
                watch: Some((FirstSettings::default(), tx)),
            },
            rx,
        )
    }

    fn tell(&mut self, accepts: bool) {
        if let Some((_, tx)) = self.watch.take() {
            let _ = tx.send(accepts);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Some((first, _)) = self.watch.as_mut() {
            let answer = match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() == before => Some(false),
                Poll::Ready(Ok(())) => first.feed(&buf.filled()[before..]),
                Poll::Ready(Err(_)) => Some(false),
                Poll::Pending => None,
            };
            if let Some(accepts) = answer {
                self.tell(accepts);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)], flags: u8, stream: u32) -> Vec<u8> {
        let len = entries.len() * ENTRY;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            TYPE_SETTINGS,
            flags,
        ];
        f.extend_from_slice(&stream.to_be_bytes());
        for (id, value) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&value.to_be_bytes());
        }
        f
    }

    /// The answer for `bytes` fed whole and fed one byte at a time, which must agree.
    fn read(bytes: &[u8]) -> Option<bool> {
        let whole = FirstSettings::default().feed(bytes);
        let mut split = FirstSettings::default();
        let mut answer = None;
        for b in bytes {
            answer = split.feed(std::slice::from_ref(b));
        }
        assert_eq!(whole, answer, "{bytes:?}");
        whole
    }

    #[test]
    fn the_first_settings_frame_tells_whether_extended_connect_is_accepted() {
        // hyper's and nginx's first frames, with and without the setting.
        let on = settings(&[(0x3, 200), (0x8, 1), (0x4, 1 << 20)], 0, 0);
        assert_eq!(read(&on), Some(true));
        let mut then_more = on.clone();
        then_more.extend_from_slice(&settings(&[(0x8, 0)], 0, 0));
        assert_eq!(read(&then_more), Some(true), "only the first frame counts");
        assert_eq!(
            read(&settings(&[(0x3, 128), (0x4, 65_536)], 0, 0)),
            Some(false)
        );
        assert_eq!(read(&settings(&[(0x8, 1), (0x8, 0)], 0, 0)), Some(false));
        assert_eq!(read(&settings(&[], 0, 0)), Some(false));
        // Not a preface: an ACK, another stream, another type, a ragged length.
        assert_eq!(read(&settings(&[(0x8, 1)], FLAG_ACK, 0)), Some(false));
        assert_eq!(read(&settings(&[(0x8, 1)], 0, 1)), Some(false));
        let mut ping = settings(&[(0x8, 1)], 0, 0);
        ping[3] = 0x6;
        assert_eq!(read(&ping), Some(false));
        let mut ragged = settings(&[(0x8, 1)], 0, 0);
        ragged[2] = 5;
        assert_eq!(read(&ragged), Some(false));
        // Incomplete: no answer yet.
        assert_eq!(read(&on[..on.len() - 1]), None);
        assert_eq!(read(&on[..4]), None);
    }

    #[tokio::test]
    async fn the_watched_stream_passes_bytes_unchanged_and_answers_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let frame = settings(&[(0x8, 1)], 0, 0);
        let (mut origin, ours) = tokio::io::duplex(64);
        let (mut watched, answer) = Watched::new(ours);
        origin.write_all(&frame[..5]).await.expect("write");
        origin.write_all(&frame[5..]).await.expect("write");
        origin.write_all(b"rest").await.expect("write");
        drop(origin);
        let mut got = Vec::new();
        watched.read_to_end(&mut got).await.expect("read");
        assert_eq!(got[..frame.len()], frame[..]);
        assert_eq!(&got[frame.len()..], b"rest");
        assert_eq!(answer.await, Ok(true));

        let (origin, ours) = tokio::io::duplex(64);
        let (mut watched, answer) = Watched::new(ours);
        drop(origin);
        assert_eq!(watched.read(&mut [0u8; 8]).await.expect("read"), 0);
        assert_eq!(answer.await, Ok(false), "ended before a frame");
    }
}
