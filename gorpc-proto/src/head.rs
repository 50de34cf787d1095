//! Frame heads: the prost-encoded metadata part of request, response and go-away frames.
//!
//! The schema (docs/PROTOCOL.md, "Heads") is ordinary protobuf:
//!
//! ```proto
//! message RequestHead  { string method = 1; uint64 timeout_micros = 2; repeated Entry metadata = 3; }
//! message ResponseHead { uint32 code = 1;   string message = 2;        repeated Entry metadata = 3; }
//! message Entry        { string key = 1;    bytes value = 2; }
//! ```
//!
//! Encoding writes straight into the caller's buffer and decoding borrows from the frame, so
//! a head costs no allocation on either side. The bytes are exactly what prost's derived
//! encoder produces (a property test checks it), and unknown fields are skipped, so fields can
//! be added later without a version bump.

use bytes::{BufMut, Bytes};
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::status::{Code, Status};

/// Why a head did not decode. Refers to the one call it came with, never the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadError(pub &'static str);

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed head: {}", self.0)
    }
}

impl std::error::Error for HeadError {}

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

const METADATA_TAG: u32 = 3;

fn put_key(tag: u32, wire: u64, out: &mut impl BufMut) {
    encode_varint(((tag as u64) << 3) | wire, out);
}

fn put_len_field(tag: u32, bytes: &[u8], out: &mut impl BufMut) {
    if !bytes.is_empty() {
        put_key(tag, WIRE_LEN, out);
        encode_varint(bytes.len() as u64, out);
        out.put_slice(bytes);
    }
}

fn put_varint_field(tag: u32, v: u64, out: &mut impl BufMut) {
    if v != 0 {
        put_key(tag, WIRE_VARINT, out);
        encode_varint(v, out);
    }
}

fn len_field_size(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

fn put_metadata<'m>(
    metadata: impl IntoIterator<Item = (&'m str, &'m [u8])>,
    out: &mut impl BufMut,
) {
    for (key, value) in metadata {
        put_key(METADATA_TAG, WIRE_LEN, out);
        let entry_len = len_field_size(key.len()) + len_field_size(value.len());
        encode_varint(entry_len as u64, out);
        put_len_field(1, key.as_bytes(), out);
        put_len_field(2, value, out);
    }
}

/// Writes a request head. `timeout_micros == 0` means no deadline.
pub fn encode_request_head<'m>(
    method: &str,
    timeout_micros: u64,
    metadata: impl IntoIterator<Item = (&'m str, &'m [u8])>,
    out: &mut impl BufMut,
) {
    put_len_field(1, method.as_bytes(), out);
    put_varint_field(2, timeout_micros, out);
    put_metadata(metadata, out);
}

/// Writes a response (or go-away) head.
pub fn encode_response_head<'m>(
    code: u32,
    message: &str,
    metadata: impl IntoIterator<Item = (&'m str, &'m [u8])>,
    out: &mut impl BufMut,
) {
    put_varint_field(1, code as u64, out);
    put_len_field(2, message.as_bytes(), out);
    put_metadata(metadata, out);
}

enum Field<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Skipped,
}

fn take_varint(buf: &mut &[u8]) -> Result<u64, HeadError> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some((&b, rest)) = buf.split_first() else {
            return Err(HeadError("truncated varint"));
        };
        *buf = rest;
        if i == 9 && b > 1 {
            return Err(HeadError("varint overflows 64 bits"));
        }
        value |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HeadError("varint overflows 64 bits"))
}

fn take_bytes<'a>(buf: &mut &'a [u8], n: u64) -> Result<&'a [u8], HeadError> {
    if n > buf.len() as u64 {
        return Err(HeadError("field length runs past the end"));
    }
    let (taken, rest) = buf.split_at(n as usize);
    *buf = rest;
    Ok(taken)
}

/// The next (tag, field) of a protobuf message, or `None` at its end.
fn next_field<'a>(buf: &mut &'a [u8]) -> Result<Option<(u32, Field<'a>)>, HeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let key = take_varint(buf)?;
    let tag = key >> 3;
    if tag == 0 || tag > u32::MAX as u64 >> 3 {
        return Err(HeadError("invalid field tag"));
    }
    let field = match key & 7 {
        WIRE_VARINT => Field::Varint(take_varint(buf)?),
        WIRE_LEN => {
            let n = take_varint(buf)?;
            Field::Len(take_bytes(buf, n)?)
        }
        WIRE_FIXED64 => {
            take_bytes(buf, 8)?;
            Field::Skipped
        }
        WIRE_FIXED32 => {
            take_bytes(buf, 4)?;
            Field::Skipped
        }
        _ => return Err(HeadError("unsupported wire type")),
    };
    Ok(Some((tag as u32, field)))
}

fn utf8(bytes: &[u8]) -> Result<&str, HeadError> {
    std::str::from_utf8(bytes).map_err(|_| HeadError("string is not UTF-8"))
}

/// Validates one metadata entry and returns it.
fn parse_entry(mut buf: &[u8]) -> Result<(&str, &[u8]), HeadError> {
    let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
    while let Some((tag, field)) = next_field(&mut buf)? {
        match (tag, field) {
            (1, Field::Len(b)) => key = b,
            (2, Field::Len(b)) => value = b,
            (1 | 2, _) => return Err(HeadError("metadata entry field has the wrong wire type")),
            _ => {}
        }
    }
    Ok((utf8(key)?, value))
}

/// Iterates the metadata entries of a decoded head, in wire order. Duplicate keys are kept.
#[derive(Clone, Debug)]
pub struct MetadataIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for MetadataIter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The head was validated when it was decoded, so errors cannot occur here; stopping
        // on one keeps this total anyway.
        while let Ok(Some((tag, field))) = next_field(&mut self.rest) {
            if let (METADATA_TAG, Field::Len(entry)) = (tag, field) {
                return parse_entry(entry).ok();
            }
        }
        None
    }
}

/// A request head borrowed from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeadRef<'a> {
    /// The method path, "/package.Service/Method"; never empty.
    pub method: &'a str,
    /// Time the client still waits, in microseconds; 0: no deadline.
    pub timeout_micros: u64,
    raw: &'a [u8],
}

impl<'a> RequestHeadRef<'a> {
    /// Decodes and validates a request head: UTF-8 strings, well-formed metadata.
    pub fn decode(raw: &'a [u8]) -> Result<Self, HeadError> {
        let mut buf = raw;
        let (mut method, mut timeout_micros): (&[u8], u64) = (b"", 0);
        while let Some((tag, field)) = next_field(&mut buf)? {
            match (tag, field) {
                (1, Field::Len(b)) => method = b,
                (2, Field::Varint(v)) => timeout_micros = v,
                (METADATA_TAG, Field::Len(entry)) => {
                    parse_entry(entry)?;
                }
                (1..=3, _) => return Err(HeadError("request head field has the wrong wire type")),
                _ => {}
            }
        }
        let method = utf8(method)?;
        if method.is_empty() {
            return Err(HeadError("empty method"));
        }
        Ok(RequestHeadRef {
            method,
            timeout_micros,
            raw,
        })
    }

    /// The metadata entries, in wire order.
    pub fn metadata(&self) -> MetadataIter<'a> {
        MetadataIter { rest: self.raw }
    }
}

/// A response or go-away head borrowed from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeadRef<'a> {
    /// Status code, gRPC numbering; see [`crate::Code::from_u32`].
    pub code: u32,
    /// The status message; empty if none was sent.
    pub message: &'a str,
    raw: &'a [u8],
}

impl<'a> ResponseHeadRef<'a> {
    /// Decodes and validates a response head: UTF-8 message, well-formed metadata.
    pub fn decode(raw: &'a [u8]) -> Result<Self, HeadError> {
        let mut buf = raw;
        let (mut code, mut message): (u64, &[u8]) = (0, b"");
        while let Some((tag, field)) = next_field(&mut buf)? {
            match (tag, field) {
                (1, Field::Varint(v)) => code = v,
                (2, Field::Len(b)) => message = b,
                (METADATA_TAG, Field::Len(entry)) => {
                    parse_entry(entry)?;
                }
                (1..=3, _) => return Err(HeadError("response head field has the wrong wire type")),
                _ => {}
            }
        }
        // protobuf truncates uint32 fields encoded as wider varints; do the same.
        Ok(ResponseHeadRef {
            code: code as u32,
            message: utf8(message)?,
            raw,
        })
    }

    /// The metadata entries, in wire order.
    pub fn metadata(&self) -> MetadataIter<'a> {
        MetadataIter { rest: self.raw }
    }
}

/// An owned, validated request head: a view into the received frame, not a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    raw: Bytes,
    method: std::ops::Range<usize>,
    timeout_micros: u64,
}

impl RequestHead {
    /// Decodes and validates a head held in `raw`, keeping `raw` as the backing store.
    pub fn decode(raw: Bytes) -> Result<Self, HeadError> {
        let parsed = RequestHeadRef::decode(&raw)?;
        let start = parsed.method.as_ptr() as usize - raw.as_ptr() as usize;
        let method = start..start + parsed.method.len();
        let timeout_micros = parsed.timeout_micros;
        Ok(RequestHead {
            raw,
            method,
            timeout_micros,
        })
    }

    /// The encoded head, as received.
    pub fn as_bytes(&self) -> &Bytes {
        &self.raw
    }

    /// The method path, "/package.Service/Method".
    pub fn method(&self) -> &str {
        // Validated in `decode`; the fallback is unreachable.
        std::str::from_utf8(&self.raw[self.method.clone()]).unwrap_or_default()
    }

    /// The client's remaining wait when it sent the call, in microseconds; 0: no deadline.
    pub fn timeout_micros(&self) -> u64 {
        self.timeout_micros
    }

    /// The metadata entries, in wire order.
    pub fn metadata(&self) -> MetadataIter<'_> {
        MetadataIter { rest: &self.raw }
    }

    /// The first value for `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&[u8]> {
        self.metadata().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// An owned, validated response head: a view into the received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    raw: Bytes,
}

impl ResponseHead {
    /// Decodes a head and the status it carries. Allocates only for a non-empty message.
    pub(crate) fn decode(raw: Bytes) -> Result<(Self, Status), HeadError> {
        let parsed = ResponseHeadRef::decode(&raw)?;
        let code = Code::from_u32(parsed.code);
        let status = if parsed.message.is_empty() {
            Status::new(code, "")
        } else {
            Status::new(code, parsed.message.to_owned())
        };
        Ok((ResponseHead { raw }, status))
    }

    /// The metadata entries, in wire order.
    pub fn metadata(&self) -> MetadataIter<'_> {
        MetadataIter { rest: &self.raw }
    }

    /// The first value for `key`.
    pub fn metadata_value(&self, key: &str) -> Option<&[u8]> {
        self.metadata().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The encoded head, as received.
    pub fn as_bytes(&self) -> &Bytes {
        &self.raw
    }
}
