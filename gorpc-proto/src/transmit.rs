//! The outgoing byte queue of a connection.
//!
//! Small frames are encoded back to back into one buffer, so everything produced in one
//! poll cycle leaves in one write. A large body is queued as its own `Bytes` chunk instead of
//! being copied, so a 1 MiB payload costs no copy inside the core.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use crate::config::Limits;
use crate::frame::{FrameHeader, FrameType, HEADER_LEN};

/// Bodies at least this long are queued by reference (split off the caller's buffer, or a
/// `Bytes` kept as it is) instead of copied into the outgoing buffer.
pub(crate) const ZERO_COPY_LEN: usize = 8 * 1024;

/// A message body handed to the core for sending.
#[derive(Clone, Debug)]
pub enum Payload<'a> {
    /// Copied into the outgoing buffer.
    Slice(&'a [u8]),
    /// Sent without a copy when large; copied (cheaper than a separate write) when small.
    Bytes(Bytes),
}

impl Payload<'_> {
    /// The body's length, bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Slice(s) => s.len(),
            Payload::Bytes(b) => b.len(),
        }
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a [u8]> for Payload<'a> {
    fn from(s: &'a [u8]) -> Self {
        Payload::Slice(s)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Payload<'a> {
    fn from(s: &'a [u8; N]) -> Self {
        Payload::Slice(s)
    }
}

impl From<Bytes> for Payload<'_> {
    fn from(b: Bytes) -> Self {
        Payload::Bytes(b)
    }
}

impl From<Vec<u8>> for Payload<'_> {
    fn from(v: Vec<u8>) -> Self {
        Payload::Bytes(Bytes::from(v))
    }
}

/// Why a frame was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Oversize {
    Head,
    Frame,
}

#[derive(Debug)]
pub(crate) struct TransmitQueue {
    /// The peer's limits, assumed equal to this side's: no frame over them is queued.
    limits: Limits,
    /// Chunks ready to go, in order, before `tail`.
    chunks: VecDeque<Bytes>,
    /// Frames encoded after the last chunk.
    tail: BytesMut,
    /// How long the last popped tail was: a fresh tail starts that big, so a busy
    /// connection's buffer does not grow by doubling (copying itself each time) after every
    /// write whose bytes are still in flight.
    last_tail: usize,
}

/// The most a fresh tail reserves up front.
const MAX_TAIL_HINT: usize = 1 << 20;

/// A frame to queue: its header fields but the lengths.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameInfo {
    pub(crate) frame_type: FrameType,
    pub(crate) flags: u8,
    pub(crate) codec: u8,
    pub(crate) call_id: u32,
}

impl FrameInfo {
    pub(crate) fn new(frame_type: FrameType, flags: u8, codec: u8, call_id: u32) -> Self {
        FrameInfo {
            frame_type,
            flags,
            codec,
            call_id,
        }
    }
}

impl TransmitQueue {
    pub(crate) fn new(limits: Limits) -> Self {
        TransmitQueue {
            limits,
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            last_tail: 0,
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Drops the buffers of an empty queue (a fresh frame allocates again).
    pub(crate) fn shrink_to_fit(&mut self) {
        if self.chunks.is_empty() && self.tail.is_empty() {
            self.chunks = VecDeque::new();
            self.tail = BytesMut::new();
            self.last_tail = 0;
        }
    }

    /// Encodes one frame. The head is written by `write_head` straight into the buffer; the
    /// frame is rolled back, and nothing is queued, if it breaks `max_head_len` or
    /// `max_frame_len` (the limits the peer is assumed to enforce too).
    pub(crate) fn push_frame(
        &mut self,
        frame: FrameInfo,
        write_head: impl FnOnce(&mut BytesMut),
        body: Payload<'_>,
    ) -> Result<(), Oversize> {
        let copied = match &body {
            Payload::Bytes(b) if b.len() >= ZERO_COPY_LEN => 0,
            other => other.len(),
        };
        let wanted = HEADER_LEN + copied + 64;
        if self.tail.capacity() - self.tail.len() < wanted {
            self.tail.reserve(wanted.max(self.last_tail));
        }
        let start = self.tail.len();
        self.tail.put_bytes(0, HEADER_LEN);
        write_head(&mut self.tail);
        let head_len = self.tail.len() - start - HEADER_LEN;
        let frame_len = HEADER_LEN as u64 + head_len as u64 + body.len() as u64;
        let oversize = if head_len as u64 > self.limits.max_head_len as u64 {
            Some(Oversize::Head)
        } else if frame_len > self.limits.max_frame_len as u64 {
            Some(Oversize::Frame)
        } else {
            None
        };
        if let Some(why) = oversize {
            self.tail.truncate(start);
            return Err(why);
        }
        let header = FrameHeader {
            frame_type: frame.frame_type,
            flags: frame.flags,
            codec: frame.codec,
            call_id: frame.call_id,
            head_len: head_len as u32,
            body_len: body.len() as u32,
        };
        self.tail[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        match body {
            Payload::Bytes(b) if b.len() >= ZERO_COPY_LEN => {
                if !self.tail.is_empty() {
                    self.chunks.push_back(self.tail.split().freeze());
                }
                self.chunks.push_back(b);
            }
            Payload::Bytes(b) => self.tail.put_slice(&b),
            Payload::Slice(s) => self.tail.put_slice(s),
        }
        Ok(())
    }

    /// A frame with no head, whose body (a window update's increment) is within any limit.
    pub(crate) fn push_small(&mut self, frame: FrameInfo, body: &[u8]) {
        let _ = self.push_frame(frame, |_| {}, Payload::Slice(body));
    }

    /// A frame with neither head nor body.
    pub(crate) fn push_control(&mut self, frame_type: FrameType, id: u32) {
        let header = FrameHeader {
            frame_type,
            flags: 0,
            codec: 0,
            call_id: id,
            head_len: 0,
            body_len: 0,
        };
        header.encode(&mut self.tail);
    }

    /// Total bytes waiting.
    pub(crate) fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum::<usize>() + self.tail.len()
    }

    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Some(chunk);
        }
        if self.tail.is_empty() {
            return None;
        }
        self.last_tail = self.tail.len().min(MAX_TAIL_HINT);
        Some(self.tail.split().freeze())
    }
}
