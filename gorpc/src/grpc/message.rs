//! gRPC's Length-Prefixed-Message framing: a compressed flag, a 4-byte big-endian length,
//! the message; and gzip, the one compression gorpc speaks.

use std::io::{Read, Write};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use gorpc_proto::{Code, Status};

/// Bytes in front of each message: the compressed flag and the length.
pub(crate) const PREFIX: usize = 5;

/// How messages on one call are compressed, from its `grpc-encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// From a `grpc-encoding` value; `None` for codings gorpc does not speak.
    pub(crate) fn parse(value: &[u8]) -> Option<Encoding> {
        match value.trim_ascii() {
            b"identity" => Some(Encoding::Identity),
            b"gzip" => Some(Encoding::Gzip),
            _ => None,
        }
    }

    /// Whether a `grpc-accept-encoding` list names gzip.
    pub(crate) fn accepts_gzip(list: &[u8]) -> bool {
        list.split(|&b| b == b',')
            .any(|coding| coding.trim_ascii() == b"gzip")
    }
}

/// What `grpc-accept-encoding` says on everything gorpc sends.
pub(crate) const ACCEPT_ENCODING: &str = "gzip, identity";

/// Splits a call's DATA bytes into messages, whatever the boundaries of the pieces.
#[derive(Debug)]
pub(crate) struct Decoder {
    buf: BytesMut,
    /// The largest message taken, compressed or not (`max_frame_len`).
    max: usize,
    encoding: Encoding,
}

impl Decoder {
    pub(crate) fn new(max: usize, encoding: Encoding) -> Self {
        Decoder {
            buf: BytesMut::new(),
            max,
            encoding,
        }
    }

    /// Adds a piece. One that holds a whole message alone is kept without a copy when
    /// nothing is buffered (see [`next`](Self::next)).
    pub(crate) fn push(&mut self, piece: Bytes) {
        if self.buf.is_empty() {
            // Reuses the piece's allocation when it is not shared.
            self.buf = BytesMut::from(piece);
        } else {
            self.buf.extend_from_slice(&piece);
        }
    }

    /// The next whole message, if one has arrived. A message over the limit, or compressed
    /// when the call said nothing of compression, is an error.
    pub(crate) fn next(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        let compressed = match self.buf[0] {
            0 => false,
            1 => true,
            flag => {
                return Err(Status::new(
                    Code::Internal,
                    format!("gRPC message with compressed flag {flag}"),
                ))
            }
        };
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(too_large(len, self.max));
        }
        if self.buf.len() < PREFIX + len {
            // Room for the rest at once, now that its length is known and checked.
            self.buf.reserve(PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        let message = self.buf.split_to(len).freeze();
        if !compressed {
            return Ok(Some(message));
        }
        match self.encoding {
            Encoding::Gzip => gunzip(&message, self.max).map(Some),
            Encoding::Identity => Err(Status::new(
                Code::Internal,
                "a compressed gRPC message on a call without grpc-encoding",
            )),
        }
    }

    /// Bytes of a message begun and not finished.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }
}

fn too_large(len: usize, max: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("gRPC message of {len} bytes is over the limit of {max} bytes"),
    )
}

/// Decompresses a gzip message, refusing more than `max` bytes out (a small message must
/// not inflate into a large one past the limit).
fn gunzip(compressed: &[u8], max: usize) -> Result<Bytes, Status> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::GzDecoder::new(compressed)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| {
            Status::new(
                Code::Internal,
                format!("gzip message does not inflate: {e}"),
            )
        })?;
    if out.len() > max {
        return Err(too_large(out.len(), max));
    }
    Ok(Bytes::from(out))
}

/// Gzips one message.
pub(crate) fn gzip(message: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(
        BytesMut::with_capacity(message.len() / 2 + 32).writer(),
        flate2::Compression::fast(),
    );
    // Writing into memory cannot fail.
    let _ = encoder.write_all(message);
    encoder
        .finish()
        .map(|w| w.into_inner().freeze())
        .unwrap_or_default()
}

/// Appends `message` framed: flag and length, then the bytes.
pub(crate) fn put_message(out: &mut BytesMut, compressed: bool, message: &[u8]) {
    out.reserve(PREFIX + message.len());
    out.put_u8(u8::from(compressed));
    out.put_u32(message.len() as u32);
    out.put_slice(message);
}

/// Messages framed back to back (as an outbox holds them), each gzipped.
pub(crate) fn gzip_all(mut framed: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(framed.len() / 2);
    while framed.len() >= PREFIX {
        let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        let end = (PREFIX + len).min(framed.len());
        put_message(&mut out, true, &gzip(&framed[PREFIX..end]));
        framed = &framed[end..];
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(messages: &[&[u8]]) -> BytesMut {
        let mut out = BytesMut::new();
        for m in messages {
            put_message(&mut out, false, m);
        }
        out
    }

    #[test]
    fn messages_split_at_any_boundary() {
        let wire = framed(&[b"one", b"", b"three"]).freeze();
        for cut in 0..wire.len() {
            let mut decoder = Decoder::new(1024, Encoding::Identity);
            let mut got = Vec::new();
            for piece in [wire.slice(..cut), wire.slice(cut..)] {
                decoder.push(piece);
                while let Some(m) = decoder.next().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, [&b"one"[..], b"", b"three"], "cut at {cut}");
            assert_eq!(decoder.pending(), 0);
        }
    }

    #[test]
    fn limits_and_flags_are_checked() {
        let mut decoder = Decoder::new(4, Encoding::Identity);
        decoder.push(framed(&[b"hello"]).freeze());
        assert_eq!(decoder.next().unwrap_err().code(), Code::ResourceExhausted);

        let mut decoder = Decoder::new(64, Encoding::Identity);
        decoder.push(Bytes::from_static(&[2, 0, 0, 0, 0]));
        assert_eq!(decoder.next().unwrap_err().code(), Code::Internal);

        let mut compressed = BytesMut::new();
        put_message(&mut compressed, true, &gzip(b"x"));
        let mut decoder = Decoder::new(64, Encoding::Identity);
        decoder.push(compressed.clone().freeze());
        assert_eq!(decoder.next().unwrap_err().code(), Code::Internal);
        let mut decoder = Decoder::new(64, Encoding::Gzip);
        decoder.push(compressed.freeze());
        assert_eq!(decoder.next().unwrap().unwrap(), Bytes::from_static(b"x"));
    }

    #[test]
    fn gzip_round_trips_and_bombs_are_refused() {
        let big = vec![7u8; 100_000];
        let mut wire = BytesMut::new();
        put_message(&mut wire, true, &gzip(&big));
        assert!(wire.len() < 1000, "compresses");
        let mut decoder = Decoder::new(200_000, Encoding::Gzip);
        decoder.push(wire.clone().freeze());
        assert_eq!(decoder.next().unwrap().unwrap().len(), big.len());
        let mut small = Decoder::new(50_000, Encoding::Gzip);
        small.push(wire.freeze());
        assert_eq!(small.next().unwrap_err().code(), Code::ResourceExhausted);

        let all = gzip_all(&framed(&[b"a", b"bb"]));
        let mut decoder = Decoder::new(64, Encoding::Gzip);
        decoder.push(all);
        assert_eq!(decoder.next().unwrap().unwrap(), Bytes::from_static(b"a"));
        assert_eq!(decoder.next().unwrap().unwrap(), Bytes::from_static(b"bb"));
    }

    #[test]
    fn encodings() {
        assert_eq!(Encoding::parse(b"gzip"), Some(Encoding::Gzip));
        assert_eq!(Encoding::parse(b"identity"), Some(Encoding::Identity));
        assert_eq!(Encoding::parse(b"br"), None);
        assert!(Encoding::accepts_gzip(b"identity, deflate,gzip"));
        assert!(!Encoding::accepts_gzip(b"identity"));
    }
}
