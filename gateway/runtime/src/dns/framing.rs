//! DNS over a byte stream (RFC 1035 4.2.2): every message behind its two-byte length. Used by
//! the plain TCP and the DNS-over-TLS upstream clients alike, so neither depends on the other.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Sends one length-prefixed query (RFC 1035 4.2.2 framing: TCP and DNS over TLS) and reads
/// the answer with the same id.
pub async fn exchange<S>(stream: &mut S, query: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    stream.flush().await?;
    loop {
        let n = usize::from(stream.read_u16().await?);
        let mut answer = vec![0u8; n];
        stream.read_exact(&mut answer).await?;
        // An answer to an earlier query that timed out on this connection: skip it.
        if answer.len() >= 2 && query.len() >= 2 && answer[..2] == query[..2] {
            return Ok(answer);
        }
    }
}
