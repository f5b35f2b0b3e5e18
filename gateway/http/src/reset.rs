//! Ending a device's connection with a reset instead of a FIN.
//!
//! The inspector talks to an intercepted device over an in-process pipe, whose end is only ever
//! a close. When the inspector means a reset (an SNI-only block, as Cloudflare resets such
//! connections) it raises the flow's [`ResetFlag`] before dropping its end; the runtime reads
//! its end through [`ResetOnEof`], which turns that close into `ConnectionReset`, and the
//! runtime answers a read error on a device flow with an RST.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Raised by the inspector when the device's connection is to be reset.
#[derive(Debug, Clone, Default)]
pub struct ResetFlag(Arc<AtomicBool>);

impl ResetFlag {
    /// Asks for a reset; call before dropping the pipe's end.
    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a reset was asked for.
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The runtime's end of a device pipe: reads as `inner`, except that the end of the stream is
/// `ConnectionReset` when the flag was raised.
pub struct ResetOnEof<R> {
    inner: R,
    flag: ResetFlag,
}

impl<R> ResetOnEof<R> {
    /// Reads `inner`, watching `flag`.
    pub fn new(inner: R, flag: ResetFlag) -> Self {
        ResetOnEof { inner, flag }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ResetOnEof<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            if buf.filled().len() == before && buf.remaining() > 0 && self.flag.raised() {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_raised_flag_turns_the_close_into_a_reset() {
        for raise in [false, true] {
            let (ours, mut theirs) = tokio::io::duplex(64);
            let flag = ResetFlag::default();
            let mut reader = ResetOnEof::new(ours, flag.clone());
            theirs.write_all(b"hi").await.unwrap();
            if raise {
                flag.raise();
            }
            drop(theirs);
            let mut got = Vec::new();
            let end = reader.read_to_end(&mut got).await;
            // What was written before still arrives; only the end differs.
            assert_eq!(got, b"hi");
            assert_eq!(
                end.err().map(|e| e.kind()),
                raise.then_some(io::ErrorKind::ConnectionReset)
            );
        }
    }
}
