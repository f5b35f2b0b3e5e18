//! File types from what bodies hold, never from names or Content-Type: a short prefix of the
//! body is held until the rules decide, then passed on with the rest, streamed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};

/// Bytes held to recognise a file: Office XML formats need their first zip entries (8-16 KiB).
pub const SNIFF: usize = 16 * 1024;

/// Types in the `compressed` group (infer counts PDF and others as archives too).
const COMPRESSED: [&str; 12] = [
    "zip", "rar", "7z", "gz", "bz2", "xz", "tar", "zst", "lz", "lz4", "cab", "Z",
];

/// The file types of `prefix` as rules name them: the type (`"exe"`, `"pdf"`, `"zip"`) and its
/// group (`"compressed"` for archives).
pub fn types_of(prefix: &[u8]) -> Vec<&'static str> {
    let Some(kind) = infer::get(prefix) else {
        return Vec::new();
    };
    let extension = kind.extension();
    let mut types = vec![extension];
    if COMPRESSED.contains(&extension) {
        types.push("compressed");
    }
    types
}

/// The file types of the parts of a `multipart/form-data` body whose first `prefix` bytes are
/// known (parts past the prefix are not seen).
pub async fn multipart_types(prefix: Bytes, boundary: &str) -> Vec<&'static str> {
    // multer yields nothing of a part cut off by the end of its input, so the prefix is closed
    // with a final boundary: a cut part ends there, and a complete body ends before it.
    let close = Bytes::from(format!("\r\n--{boundary}--\r\n"));
    let stream = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(prefix), Ok(close)]);
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut types = Vec::new();
    // A part cut off by the prefix's end yields what it has, then an error that ends the loop.
    while let Ok(Some(mut field)) = multipart.next_field().await {
        let mut head = BytesMut::new();
        while head.len() < SNIFF {
            match field.chunk().await {
                Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                _ => break,
            }
        }
        for t in types_of(&head) {
            if !types.contains(&t) {
                types.push(t);
            }
        }
    }
    types
}

/// The boundary of a `multipart/form-data` Content-Type.
pub fn multipart_boundary(content_type: &str) -> Option<String> {
    multer::parse_boundary(content_type).ok()
}

/// A body whose first bytes were read ahead, then the rest.
pub struct Prefixed {
    prefix: Option<Bytes>,
    held: Option<Frame<Bytes>>,
    rest: Option<Incoming>,
}

impl Prefixed {
    /// `body` untouched.
    pub fn whole(body: Incoming) -> Prefixed {
        Prefixed {
            prefix: None,
            held: None,
            rest: Some(body),
        }
    }

    /// Reads up to [`SNIFF`] bytes of `body` (less if it ends first); the prefix read and the
    /// body that replays it.
    pub async fn read(mut body: Incoming) -> Result<(Bytes, Prefixed), hyper::Error> {
        let mut prefix = BytesMut::new();
        let mut held = None;
        let mut ended = false;
        while prefix.len() < SNIFF {
            match body.frame().await {
                None => {
                    ended = true;
                    break;
                }
                Some(frame) => match frame?.into_data() {
                    Ok(data) => prefix.extend_from_slice(&data),
                    // Trailers: the body is over once they are passed on.
                    Err(trailers) => {
                        held = Some(trailers);
                        ended = true;
                        break;
                    }
                },
            }
        }
        let prefix = prefix.freeze();
        Ok((
            prefix.clone(),
            Prefixed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                held,
                rest: (!ended).then_some(body),
            },
        ))
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(frame) = self.held.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.held.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PE executable's first bytes: "MZ", then the PE header at the offset at 0x3c.
    pub(crate) fn exe() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0] = b'M';
        b[1] = b'Z';
        b[0x3c] = 0x80;
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b
    }

    #[test]
    fn types_come_from_signatures() {
        assert_eq!(types_of(&exe()), vec!["exe"]);
        assert_eq!(types_of(b"%PDF-1.7\n"), vec!["pdf"]);
        assert_eq!(
            types_of(b"PK\x03\x04\x14\x00\x00\x00\x08\x00"),
            vec!["zip", "compressed"]
        );
        assert!(types_of(b"just some text").is_empty());
    }

    #[tokio::test]
    async fn multipart_parts_are_typed_by_their_bytes() {
        let mut body = Vec::new();
        body.extend_from_slice(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
              --XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"report.txt\"\r\n\
              Content-Type: text/plain\r\n\r\n",
        );
        body.extend_from_slice(&exe());
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        assert_eq!(
            multipart_boundary("multipart/form-data; boundary=XyZ").as_deref(),
            Some("XyZ")
        );
        assert_eq!(
            multipart_types(Bytes::from(body.clone()), "XyZ").await,
            vec!["exe"]
        );
        // Cut inside the file part: what the prefix shows still counts.
        let cut = body.len() - 200;
        assert_eq!(
            multipart_types(Bytes::from(body[..cut].to_vec()), "XyZ").await,
            vec!["exe"]
        );
    }
}
