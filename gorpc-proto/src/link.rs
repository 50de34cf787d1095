//! What client and server connections share: splitting frames off the read buffer, the
//! control frames (ping, pong, go-away), keepalive, the transmit queue and closing.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};

use crate::config::{ConnConfig, Limits};
use crate::error::ProtoError;
use crate::frame::{FrameHeader, FrameType, HEADER_LEN};
use crate::head::{encode_response_head, ResponseHeadRef};
use crate::status::{Code, Status};
use crate::timers::{Keepalive, KeepaliveAction};
use crate::transmit::{Payload, TransmitQueue};

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides sent go-away and every call finished: a clean end.
    Drained,
    /// The peer closed the byte stream before the connection drained.
    PeerClosed,
    /// The peer broke the protocol or stopped answering keepalives.
    Error(ProtoError),
    /// The driver gave up on the transport (I/O error, shutdown timeout).
    Aborted(Status),
}

impl CloseReason {
    /// The status given to calls that this close cut short.
    pub fn status(&self) -> Status {
        match self {
            CloseReason::Drained => Status::new(Code::Unavailable, "connection drained"),
            CloseReason::PeerClosed => Status::new(Code::Unavailable, "connection closed by peer"),
            CloseReason::Error(e) => {
                Status::new(Code::Unavailable, format!("connection failed: {e}"))
            }
            CloseReason::Aborted(s) => s.clone(),
        }
    }
}

/// A whole call frame (request, response or cancel), head and body sliced from the read
/// buffer without copying.
#[derive(Debug)]
pub(crate) struct CallFrame {
    pub(crate) header: FrameHeader,
    pub(crate) head: Bytes,
    pub(crate) body: Bytes,
}

/// What [`Link::next_frame`] found.
pub(crate) enum Inbound {
    /// A call frame for the endpoint to handle.
    Call(CallFrame),
    /// The peer's go-away (already acknowledged when needed).
    GoAway(Status),
    /// A control frame the link handled itself.
    Handled,
}

#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) limits: Limits,
    pub(crate) keepalive: Keepalive,
    pub(crate) out: TransmitQueue,
    pub(crate) goaway_sent: bool,
    pub(crate) goaway_received: bool,
    pub(crate) closed: bool,
}

impl Link {
    pub(crate) fn new(config: ConnConfig, now: Instant) -> Self {
        Link {
            limits: config.limits,
            keepalive: Keepalive::new(config.keepalive, now),
            out: TransmitQueue::default(),
            goaway_sent: false,
            goaway_received: false,
            closed: false,
        }
    }

    /// Takes the next whole frame off the front of `buf`; `Ok(None)` when it is incomplete.
    ///
    /// Nothing is reserved for an announced frame: memory grows only as the peer's bytes
    /// actually arrive, so a header announcing a large frame costs nothing by itself.
    pub(crate) fn next_frame(
        &mut self,
        now: Instant,
        buf: &mut BytesMut,
    ) -> Result<Option<Inbound>, ProtoError> {
        let Some(header) = FrameHeader::decode(buf, &self.limits)? else {
            return Ok(None);
        };
        let len = header.frame_len();
        if buf.len() < len {
            return Ok(None);
        }
        self.keepalive.on_frame(now);
        let inbound = match header.frame_type {
            FrameType::Request | FrameType::Response | FrameType::Cancel => {
                let mut frame = buf.split_to(len).freeze();
                frame.advance(HEADER_LEN);
                let body = frame.split_off(header.head_len as usize);
                return Ok(Some(Inbound::Call(CallFrame {
                    header,
                    head: frame,
                    body,
                })));
            }
            FrameType::Ping => {
                self.out.push_control(FrameType::Pong, header.call_id);
                Inbound::Handled
            }
            FrameType::GoAway => {
                let head = ResponseHeadRef::decode(&buf[HEADER_LEN..len])
                    .map_err(|e| ProtoError::MalformedGoAway(e.0))?;
                let status = Status::new(Code::from_u32(head.code), head.message.to_owned());
                self.goaway_received = true;
                if !self.goaway_sent {
                    self.send_goaway(&Status::ok());
                }
                Inbound::GoAway(status)
            }
            // Pong: its arrival already counted as a sign of life. Message and window-update
            // belong to streams, which a version-1 peer refuses to open, so they can only
            // concern calls that are gone.
            FrameType::Pong | FrameType::Message | FrameType::WindowUpdate => Inbound::Handled,
        };
        buf.advance(len);
        Ok(Some(inbound))
    }

    pub(crate) fn send_goaway(&mut self, status: &Status) {
        self.goaway_sent = true;
        let (code, message) = (status.code() as u32, status.message());
        let max_head = self.limits.max_head_len;
        // A message too long for the peer's head limit is dropped rather than the go-away.
        let pushed = self.out.push_frame(
            FrameType::GoAway,
            0,
            0,
            0,
            |out| encode_response_head(code, message, [], out),
            Payload::Slice(&[]),
            max_head,
            self.limits.max_frame_len,
        );
        if pushed.is_err() {
            let _ = self.out.push_frame(
                FrameType::GoAway,
                0,
                0,
                0,
                |out| encode_response_head(code, "", [], out),
                Payload::Slice(&[]),
                max_head,
                self.limits.max_frame_len,
            );
        }
    }

    /// Runs the keepalive timer; `Err` when the peer is dead.
    pub(crate) fn handle_keepalive(&mut self, now: Instant) -> Result<(), ProtoError> {
        match self.keepalive.on_timeout(now) {
            KeepaliveAction::Nothing => Ok(()),
            KeepaliveAction::SendPing(id) => {
                self.out.push_control(FrameType::Ping, id);
                Ok(())
            }
            KeepaliveAction::PeerDead => Err(ProtoError::KeepaliveTimeout),
        }
    }

    /// Marks the link closed. A protocol error caused by the peer is reported to it in a
    /// final go-away, which the driver flushes before closing the transport.
    pub(crate) fn close(&mut self, reason: &CloseReason) {
        if let CloseReason::Error(e) = reason {
            if !matches!(e, ProtoError::KeepaliveTimeout) {
                self.send_goaway(&Status::new(Code::Internal, e.to_string()));
            }
        }
        self.closed = true;
    }

    /// The earlier of the next call deadline and the keepalive timer; none once closed.
    pub(crate) fn poll_timeout(&self, next_deadline: Option<Instant>) -> Option<Instant> {
        if self.closed {
            return None;
        }
        match (next_deadline, self.keepalive.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Both sides said go-away; with no calls left, the connection is done.
    pub(crate) fn is_draining_done(&self, calls_left: bool) -> bool {
        self.goaway_sent && self.goaway_received && !calls_left
    }
}
