//! The fixed frame header and frame boundaries (docs/PROTOCOL.md, "Frames").
//!
//! Every frame is a 20-byte header followed by `head_len` bytes of prost-encoded head and
//! `body_len` bytes of body. Lengths are checked against [`Limits`] before anything is
//! buffered or allocated for the frame.

use bytes::BufMut;

use crate::config::Limits;
use crate::error::ProtoError;

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"GR";
/// The protocol version this crate speaks. A frame carrying any other version is refused.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 20;

/// What a frame is. The numeric values are the wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Opens a call: request head (method, deadline, metadata) and the request message.
    Request = 1,
    /// Ends a call: response head (status, metadata) and the response message.
    Response = 2,
    /// The client no longer wants the call; the server drops it and sends nothing more for it.
    Cancel = 3,
    /// Liveness probe; `call_id` carries an opaque ping id echoed by the [`Pong`](Self::Pong).
    Ping = 4,
    /// Answer to a ping, echoing its id.
    Pong = 5,
    /// The sender starts no new calls (client) or accepts no new calls (server).
    GoAway = 6,
    /// One message of a stream call, in either direction: no head, the message as body.
    Message = 7,
    /// Flow-control credit: no head, a 4-byte big-endian increment as body; call id 0 credits
    /// the connection window, any other id that call's window.
    WindowUpdate = 8,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Cancel,
            4 => Self::Ping,
            5 => Self::Pong,
            6 => Self::GoAway,
            7 => Self::Message,
            8 => Self::WindowUpdate,
            _ => return None,
        })
    }
}

/// Frame flag bits.
pub mod flags {
    /// The last frame its sender sends on this call. Always set on unary requests and on
    /// every response; a request without it opens the client's message stream, and a
    /// message with it is the client's last (half-close).
    pub const END_STREAM: u8 = 0x01;
    /// Reserved: the body is compressed. Refused in version 1 (nothing negotiates it yet).
    pub const COMPRESSED: u8 = 0x02;
    /// Only on a MESSAGE that also carries END_STREAM and an empty body: the client
    /// half-closes without a final message.
    pub const NO_MESSAGE: u8 = 0x04;
    /// Only on a MESSAGE: the body holds one or more messages, each behind its 4-byte
    /// big-endian length (see [`crate::batch`]).
    pub const BATCH: u8 = 0x08;
    /// Flags a version-1 receiver understands.
    pub(crate) const KNOWN: u8 = END_STREAM | NO_MESSAGE | BATCH;
}

/// The length of the frame starting at `buf`, read from its header without checking it;
/// `None` until the 20 header bytes are there. A sizing hint for a reader holding part of
/// a frame that the connection has already checked.
pub fn frame_len_hint(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..HEADER_LEN)?;
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]) as usize;
    Some(HEADER_LEN + u32_at(12) + u32_at(16))
}

/// The decoded fixed header of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame is.
    pub frame_type: FrameType,
    /// Bits of [`flags`].
    pub flags: u8,
    /// Codec of the body: see [`crate::codec`]. Zero on frames without a body.
    pub codec: u8,
    /// Call id for call frames, ping id for ping/pong, zero for go-away.
    pub call_id: u32,
    /// Length of the head after the fixed header, bytes.
    pub head_len: u32,
    /// Length of the body after the head, bytes.
    pub body_len: u32,
}

impl FrameHeader {
    /// Total length of the frame on the wire, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.head_len as usize + self.body_len as usize
    }

    /// Writes the 20 header bytes.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_slice(&self.to_bytes());
    }

    /// The 20 header bytes, built in registers rather than byte by byte into a buffer.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = self.frame_type as u8;
        h[4] = self.flags;
        h[5] = self.codec;
        // h[6..8] reserved, zero
        h[8..12].copy_from_slice(&self.call_id.to_be_bytes());
        h[12..16].copy_from_slice(&self.head_len.to_be_bytes());
        h[16..20].copy_from_slice(&self.body_len.to_be_bytes());
        h
    }

    /// Parses and validates a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when fewer than [`HEADER_LEN`] bytes are present. Every length is
    /// checked against `limits` here, so a caller may reserve `frame_len()` bytes safely.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<Self>, ProtoError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            // Reject garbage as early as the bytes allow, not only once 20 have arrived.
            let n = buf.len().min(2);
            if buf[..n] != MAGIC[..n] {
                return Err(ProtoError::BadMagic);
            }
            if buf.len() > 2 && buf[2] != VERSION {
                return Err(ProtoError::UnsupportedVersion(buf[2]));
            }
            return Ok(None);
        };
        if h[0..2] != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        if h[2] != VERSION {
            return Err(ProtoError::UnsupportedVersion(h[2]));
        }
        let frame_type = FrameType::from_u8(h[3]).ok_or(ProtoError::UnknownFrameType(h[3]))?;
        let flags = h[4];
        if flags & !flags::KNOWN != 0 {
            return Err(ProtoError::UnsupportedFlags { frame_type, flags });
        }
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let header = FrameHeader {
            frame_type,
            flags,
            codec: h[5],
            call_id: u32_at(8),
            head_len: u32_at(12),
            body_len: u32_at(16),
        };
        if header.head_len > limits.max_head_len {
            return Err(ProtoError::HeadTooLarge {
                len: header.head_len,
                max: limits.max_head_len,
            });
        }
        let frame_len = HEADER_LEN as u64 + header.head_len as u64 + header.body_len as u64;
        if frame_len > limits.max_frame_len as u64 {
            return Err(ProtoError::FrameTooLarge {
                len: frame_len,
                max: limits.max_frame_len,
            });
        }
        header.check_shape()?;
        Ok(Some(header))
    }

    /// Control frames carry no body, only go-away carries a head, messages and window
    /// updates carry no head, and a window update's body is exactly its 4-byte increment.
    fn check_shape(&self) -> Result<(), ProtoError> {
        let (head_allowed, body_allowed) = match self.frame_type {
            FrameType::Request | FrameType::Response => (true, true),
            FrameType::Message | FrameType::WindowUpdate => (false, true),
            FrameType::GoAway => (true, false),
            FrameType::Cancel | FrameType::Ping | FrameType::Pong => (false, false),
        };
        if (!head_allowed && self.head_len != 0) || (!body_allowed && self.body_len != 0) {
            return Err(ProtoError::UnexpectedPayload(self.frame_type));
        }
        if self.frame_type == FrameType::WindowUpdate && self.body_len != 4 {
            return Err(ProtoError::MalformedWindowUpdate(
                "body must be exactly 4 bytes",
            ));
        }
        if self.flags & flags::NO_MESSAGE != 0
            && (self.frame_type != FrameType::Message
                || self.flags & flags::END_STREAM == 0
                || self.body_len != 0)
        {
            return Err(ProtoError::MalformedMessage(
                "NO_MESSAGE is only valid on an empty MESSAGE with END_STREAM",
            ));
        }
        if self.flags & flags::BATCH != 0
            && (self.frame_type != FrameType::Message || self.flags & flags::NO_MESSAGE != 0)
        {
            return Err(ProtoError::MalformedMessage(
                "BATCH is only valid on a MESSAGE without NO_MESSAGE",
            ));
        }
        Ok(())
    }
}

/// One whole frame borrowed from a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// The fixed header.
    pub header: FrameHeader,
    /// The encoded head (protobuf), `header.head_len` bytes.
    pub head: &'a [u8],
    /// The body, `header.body_len` bytes.
    pub body: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// Parses the first frame of `buf` without copying or allocating.
    ///
    /// `Ok(None)`: the frame is not complete yet. `Ok(Some((frame, n)))`: the frame takes the
    /// first `n` bytes.
    pub fn decode(buf: &'a [u8], limits: &Limits) -> Result<Option<(Self, usize)>, ProtoError> {
        let Some(header) = FrameHeader::decode(buf, limits)? else {
            return Ok(None);
        };
        let len = header.frame_len();
        let Some(frame) = buf.get(..len) else {
            return Ok(None);
        };
        let (head, body) = frame[HEADER_LEN..].split_at(header.head_len as usize);
        Ok(Some((FrameRef { header, head, body }, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(frame_type: FrameType, head_len: u32, body_len: u32) -> FrameHeader {
        FrameHeader {
            frame_type,
            flags: flags::END_STREAM,
            codec: 2,
            call_id: 0xdead_beef,
            head_len,
            body_len,
        }
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let mut buf = Vec::new();
        header(FrameType::Request, 3, 5).encode(&mut buf);
        assert_eq!(
            buf,
            [b'G', b'R', 1, 1, 1, 2, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 3, 0, 0, 0, 5]
        );
    }

    #[test]
    fn round_trip_and_partial() {
        let limits = Limits::default();
        let mut buf = Vec::new();
        header(FrameType::Response, 2, 3).encode(&mut buf);
        buf.extend_from_slice(b"hhbbb");
        for cut in 0..buf.len() {
            assert_eq!(
                FrameRef::decode(&buf[..cut], &limits),
                Ok(None),
                "cut at {cut}"
            );
        }
        let (frame, n) = FrameRef::decode(&buf, &limits).unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(frame.head, b"hh");
        assert_eq!(frame.body, b"bbb");
    }

    #[test]
    fn refuses_bad_magic_version_type_flags() {
        let limits = Limits::default();
        let mut good = Vec::new();
        header(FrameType::Request, 0, 0).encode(&mut good);
        let mutate = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            FrameHeader::decode(&b, &limits)
        };
        assert_eq!(mutate(0, b'X'), Err(ProtoError::BadMagic));
        assert_eq!(
            FrameHeader::decode(b"X", &limits),
            Err(ProtoError::BadMagic)
        );
        assert_eq!(mutate(2, 2), Err(ProtoError::UnsupportedVersion(2)));
        assert_eq!(
            FrameHeader::decode(b"GR\x07", &limits),
            Err(ProtoError::UnsupportedVersion(7))
        );
        assert_eq!(mutate(3, 0), Err(ProtoError::UnknownFrameType(0)));
        assert_eq!(mutate(3, 9), Err(ProtoError::UnknownFrameType(9)));
        assert!(matches!(
            mutate(4, flags::COMPRESSED),
            Err(ProtoError::UnsupportedFlags { .. })
        ));
    }

    #[test]
    fn limits_are_checked_from_the_header_alone() {
        let limits = Limits {
            max_head_len: 10,
            max_frame_len: 100,
            ..Limits::default()
        };
        let mut buf = Vec::new();
        header(FrameType::Request, 11, 0).encode(&mut buf);
        assert_eq!(
            FrameHeader::decode(&buf, &limits),
            Err(ProtoError::HeadTooLarge { len: 11, max: 10 })
        );
        buf.clear();
        header(FrameType::Request, 10, u32::MAX).encode(&mut buf);
        assert!(matches!(
            FrameHeader::decode(&buf, &limits),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        buf.clear();
        header(FrameType::Request, 10, 70).encode(&mut buf);
        assert!(FrameHeader::decode(&buf, &limits).unwrap().is_some());
    }

    #[test]
    fn control_frames_carry_no_payload() {
        let limits = Limits::default();
        for t in [FrameType::Cancel, FrameType::Ping, FrameType::Pong] {
            let mut buf = Vec::new();
            header(t, 0, 1).encode(&mut buf);
            assert_eq!(
                FrameHeader::decode(&buf, &limits),
                Err(ProtoError::UnexpectedPayload(t))
            );
        }
        let mut buf = Vec::new();
        header(FrameType::GoAway, 4, 1).encode(&mut buf);
        assert_eq!(
            FrameHeader::decode(&buf, &limits),
            Err(ProtoError::UnexpectedPayload(FrameType::GoAway))
        );
    }
}
