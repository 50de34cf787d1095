//! Request bodies in HTTP/1.1's chunked transfer coding (RFC 9112, section 7.1), decoded
//! as they arrive: each chunk a size in hex (extensions ignored), CRLF, the data, CRLF; then
//! a zero-size chunk and a trailer section, whose fields are ignored.
//!
//! Strict where parsers that disagree open the door to request smuggling: a size line must
//! start with a hex digit, chunk data must end in CRLF, and lines end in CRLF only.

use bytes::{Bytes, BytesMut};

/// A chunk size line longer than this (extensions included) is refused.
const MAX_SIZE_LINE: usize = 1024;

/// Why a chunked body cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ChunkedError {
    Malformed(&'static str),
    /// The decoded body would pass the limit.
    TooLarge,
}

/// How far decoding one chunked body got. The encoded bytes stay in the caller's buffer
/// until the body is complete; each call to [`decode`](Self::decode) goes on from here.
#[derive(Debug, Default)]
pub(crate) struct ChunkedBody {
    body: BytesMut,
    /// Encoded bytes decoded so far.
    at: usize,
    /// In the trailer section: the bytes of trailer fields so far.
    trailer_len: Option<usize>,
}

impl ChunkedBody {
    /// Goes on decoding `encoded`, everything after the request head received so far.
    /// `Ok(Some(n))`: the body is complete, in the first `n` bytes of `encoded`;
    /// `Ok(None)`: it needs more bytes. The body may hold at most `max_body` bytes, the
    /// trailer section `max_trailers`.
    pub(crate) fn decode(
        &mut self,
        encoded: &[u8],
        max_body: usize,
        max_trailers: usize,
    ) -> Result<Option<usize>, ChunkedError> {
        use ChunkedError::*;
        loop {
            let rest = &encoded[self.at..];
            if let Some(trailer_len) = self.trailer_len {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    if trailer_len + rest.len() > max_trailers {
                        return Err(Malformed("trailer section too long"));
                    }
                    return Ok(None);
                };
                self.at += end + 2;
                if end == 0 {
                    return Ok(Some(self.at));
                }
                self.trailer_len = Some(trailer_len + end + 2);
                if trailer_len + end + 2 > max_trailers {
                    return Err(Malformed("trailer section too long"));
                }
                continue;
            }
            if rest.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                return Err(Malformed("chunk size is not a hex number"));
            }
            let (line_len, size) = match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete(parsed)) => parsed,
                Ok(httparse::Status::Partial) if rest.len() > MAX_SIZE_LINE => {
                    return Err(Malformed("chunk size line too long"))
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(Malformed("invalid chunk size line")),
            };
            if line_len > MAX_SIZE_LINE {
                return Err(Malformed("chunk size line too long"));
            }
            if size == 0 {
                self.at += line_len;
                self.trailer_len = Some(0);
                continue;
            }
            let size = usize::try_from(size).map_err(|_| TooLarge)?;
            if size > max_body - self.body.len() {
                return Err(TooLarge);
            }
            let data_end = line_len + size;
            if rest.len() < data_end + 2 {
                return Ok(None);
            }
            if &rest[data_end..data_end + 2] != b"\r\n" {
                return Err(Malformed("chunk data not followed by CRLF"));
            }
            self.body.extend_from_slice(&rest[line_len..data_end]);
            self.at += data_end + 2;
        }
    }

    /// The decoded body, once [`decode`](Self::decode) said it is complete.
    pub(crate) fn into_body(self) -> Bytes {
        self.body.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `encoded` fed `step` bytes at a time.
    fn decode_in_steps(encoded: &[u8], step: usize) -> Result<(Bytes, usize), ChunkedError> {
        let mut body = ChunkedBody::default();
        let mut fed = 0;
        loop {
            fed = (fed + step).min(encoded.len());
            if let Some(n) = body.decode(&encoded[..fed], 1 << 20, 1024)? {
                return Ok((body.into_body(), n));
            }
            assert!(fed < encoded.len(), "incomplete at the end of the input");
        }
    }

    #[test]
    fn chunks_extensions_and_trailers_decode_whatever_the_reads() {
        let encoded =
            b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, encoded.len()] {
            let (body, n) = decode_in_steps(encoded, step).unwrap();
            assert_eq!(&body[..], b"Wikipedia in\r\n\r\nchunks.", "step {step}");
            assert_eq!(
                &encoded[n..],
                b"NEXT",
                "step {step}: the next request is left"
            );
        }
        let (body, n) = decode_in_steps(b"0\r\n\r\n", 1).unwrap();
        assert!(body.is_empty());
        assert_eq!(n, 5);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let malformed = |encoded: &[u8]| {
            let mut body = ChunkedBody::default();
            match body.decode(encoded, 1 << 20, 64) {
                Err(ChunkedError::Malformed(why)) => why,
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(encoded)),
            }
        };
        assert!(malformed(b"\r\n\r\n").contains("hex"), "an empty size line");
        assert!(malformed(b"-1\r\n").contains("hex"));
        assert!(malformed(b"4x\r\nWiki\r\n").contains("size line"));
        assert!(malformed(b"4\nWiki\r\n").contains("size line"), "bare LF");
        assert!(malformed(b"4\r\nWikiXX0\r\n\r\n").contains("CRLF"));
        assert!(
            malformed(b"10000000000000000\r\n").contains("size line"),
            "overflow"
        );
        let long_extension = [&b"1;"[..], &[b'a'; MAX_SIZE_LINE]].concat();
        assert!(malformed(&long_extension).contains("too long"));
        let long_trailer = [&b"0\r\nx: "[..], &[b'y'; 100], b"\r\n\r\n"].concat();
        assert!(malformed(&long_trailer).contains("trailer"));
    }

    proptest::proptest! {
        /// Any body, cut into any chunks and received in any pieces, decodes to itself and
        /// leaves what follows it untouched.
        #[test]
        fn any_chunking_round_trips(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(1usize..300, 1..20),
            step in 1usize..64,
            upper in proptest::prelude::any::<bool>(),
        ) {
            let mut encoded = Vec::new();
            let mut rest = &body[..];
            for &cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, after) = rest.split_at(cut.min(rest.len()));
                let size = if upper { format!("{:X}", chunk.len()) } else { format!("{:x}", chunk.len()) };
                encoded.extend_from_slice(size.as_bytes());
                encoded.extend_from_slice(b";ext=1\r\n");
                encoded.extend_from_slice(chunk);
                encoded.extend_from_slice(b"\r\n");
                rest = after;
            }
            encoded.extend_from_slice(b"0\r\nx-trailer: y\r\n\r\nPOST /next");
            let (decoded, n) = decode_in_steps(&encoded, step).unwrap();
            proptest::prop_assert_eq!(&decoded[..], &body[..]);
            proptest::prop_assert_eq!(&encoded[n..], b"POST /next");
        }

        /// Arbitrary bytes, received in any pieces, never panic, and a body that is
        /// complete took no more bytes than it was given.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            step in 1usize..32,
        ) {
            let mut body = ChunkedBody::default();
            let mut fed = 0;
            while fed < bytes.len() {
                fed = (fed + step).min(bytes.len());
                match body.decode(&bytes[..fed], 256, 64) {
                    Ok(None) => {}
                    Ok(Some(n)) => {
                        proptest::prop_assert!(n <= fed);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn the_body_limit_counts_decoded_bytes() {
        let mut body = ChunkedBody::default();
        assert_eq!(body.decode(b"4\r\nWiki\r\n", 8, 64), Ok(None));
        assert_eq!(
            body.decode(b"4\r\nWiki\r\n5\r\n", 8, 64),
            Err(ChunkedError::TooLarge),
            "refused on the size line, before its data arrives"
        );
        let mut body = ChunkedBody::default();
        assert_eq!(
            body.decode(b"4\r\nWiki\r\n4\r\npedi\r\n0\r\n\r\n", 8, 64),
            Ok(Some(23))
        );
        assert_eq!(&body.into_body()[..], b"Wikipedi");
    }
}
