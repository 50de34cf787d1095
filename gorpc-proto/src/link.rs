//! What client and server connections share: splitting frames off the read buffer, the
//! control frames (ping, pong, go-away), keepalive, the transmit queue and closing.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};

use crate::batch;
use crate::config::ConnConfig;
use crate::error::{ProtoError, SendError};
use crate::flow::{
    decode_increment, effective_window, RecvWindow, SendWindow, INITIAL_CONNECTION_WINDOW,
    INITIAL_STREAM_WINDOW,
};
use crate::frame::{flags, FrameHeader, FrameType, HEADER_LEN};
use crate::head::{encode_response_head, ResponseHeadRef};
use crate::status::{Code, Status};
use crate::timers::{Keepalive, KeepaliveAction};
use crate::transmit::{FrameInfo, Oversize, Payload, TransmitQueue, ZERO_COPY_LEN};

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
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

/// A whole call frame (request, response, cancel or message), head and body sliced from the read
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
    /// Credit from the peer, already checked: for the connection (id 0, already applied)
    /// or for one call.
    WindowUpdate { id: u32, increment: u32 },
    /// A control frame the link handled itself.
    Handled,
}

/// Where a connection is in its life.
#[derive(Debug)]
enum Life {
    /// Calls start.
    Open,
    /// No new calls: a go-away went one way or both; closed once both went and no call
    /// is left.
    Draining {
        sent: bool,
        received: bool,
    },
    Closed(CloseReason),
}

#[derive(Debug)]
pub(crate) struct Link {
    life: Life,
    pub(crate) keepalive: Keepalive,
    pub(crate) out: TransmitQueue,
    /// Message bytes this side may still send on the connection.
    pub(crate) send_window: SendWindow,
    /// Message bytes the peer may still send on the connection.
    pub(crate) recv_window: RecvWindow,
    /// This side's receive window per stream, and per connection, in bytes.
    pub(crate) stream_window: u32,
    pub(crate) connection_window: u32,
}

impl Link {
    pub(crate) fn new(config: ConnConfig, now: Instant) -> Self {
        let connection_window =
            effective_window(config.connection_window, INITIAL_CONNECTION_WINDOW);
        let mut link = Link {
            life: Life::Open,
            keepalive: Keepalive::new(config.keepalive, now),
            out: TransmitQueue::new(config.limits),
            send_window: SendWindow::new(INITIAL_CONNECTION_WINDOW),
            recv_window: RecvWindow::new(INITIAL_CONNECTION_WINDOW),
            stream_window: effective_window(config.stream_window, INITIAL_STREAM_WINDOW),
            connection_window,
        };
        if let Some(increment) = link
            .recv_window
            .widen(INITIAL_CONNECTION_WINDOW, connection_window)
        {
            link.push_window_update(0, increment);
        }
        link
    }

    /// New calls may start: no go-away either way, not closed.
    pub(crate) fn is_open(&self) -> bool {
        matches!(self.life, Life::Open)
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.life, Life::Closed(_))
    }

    /// Why the connection closed, once it has.
    pub(crate) fn close_reason(&self) -> Option<&CloseReason> {
        match &self.life {
            Life::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn goaway_sent(&self) -> bool {
        matches!(self.life, Life::Draining { sent: true, .. })
    }

    pub(crate) fn goaway_received(&self) -> bool {
        matches!(self.life, Life::Draining { received: true, .. })
    }

    fn mark_goaway(&mut self, sent_now: bool, received_now: bool) {
        let (sent, received) = match self.life {
            Life::Open => (false, false),
            Life::Draining { sent, received } => (sent, received),
            Life::Closed(_) => return,
        };
        self.life = Life::Draining {
            sent: sent || sent_now,
            received: received || received_now,
        };
    }

    pub(crate) fn limits(&self) -> &crate::config::Limits {
        self.out.limits()
    }

    /// A new call's receive window: the protocol's initial one, widened at once (with a
    /// window update to the peer) to the configured stream window if the peer streams to
    /// the call.
    pub(crate) fn open_recv_window(&mut self, id: u32, peer_streams: bool) -> RecvWindow {
        let mut window = RecvWindow::new(INITIAL_STREAM_WINDOW);
        if peer_streams {
            if let Some(increment) = window.widen(INITIAL_STREAM_WINDOW, self.stream_window) {
                self.push_window_update(id, increment);
            }
        }
        window
    }

    pub(crate) fn push_window_update(&mut self, id: u32, increment: u32) {
        let frame = FrameInfo::new(FrameType::WindowUpdate, 0, 0, id);
        self.out.push_small(frame, &increment.to_be_bytes());
    }

    /// Queues one stream message if both the call's window and the connection's are open,
    /// and spends the credit. `flags` may carry END_STREAM.
    pub(crate) fn send_message(
        &mut self,
        window: &mut SendWindow,
        id: u32,
        codec: u8,
        flags: u8,
        body: Payload<'_>,
    ) -> Result<(), SendError> {
        if !window.is_open() || !self.send_window.is_open() {
            return Err(SendError::NoCredit);
        }
        let len = body.len();
        let frame = FrameInfo::new(FrameType::Message, flags, codec, id);
        match self.out.push_frame(frame, |_| {}, body) {
            Ok(()) => {
                window.spend(len);
                self.send_window.spend(len);
                Ok(())
            }
            Err(Oversize::Head | Oversize::Frame) => Err(SendError::TooLarge),
        }
    }

    /// Sends messages from the front of `messages` (a buffer of batched messages, see
    /// [`crate::batch`]) as MESSAGE frames: each message while both windows are open, as
    /// many per frame as `max_frame_len` allows, a lone message without the batch framing.
    /// What was sent is split off `messages` without a copy. `Ok` once it is empty.
    pub(crate) fn send_batch(
        &mut self,
        window: &mut SendWindow,
        id: u32,
        codec: u8,
        messages: &mut BytesMut,
    ) -> Result<(), SendError> {
        let max_frame = self.limits().max_frame_len as usize;
        let max_body = max_frame.saturating_sub(HEADER_LEN);
        while !messages.is_empty() {
            let credit = window.available().min(self.send_window.available());
            if credit <= 0 {
                return Err(SendError::NoCredit);
            }
            // Whole messages that fit one frame, each starting while credit is left.
            let (mut end, mut count) = (0, 0);
            while end < messages.len() && (end as i64) < credit {
                let len = batch::length_at(&messages[end..])
                    .filter(|len| end + batch::LENGTH_PREFIX + len <= messages.len())
                    .ok_or(SendError::MalformedBatch)?;
                let next = end + batch::LENGTH_PREFIX + len;
                if next > max_body {
                    break;
                }
                (end, count) = (next, count + 1);
            }
            if count == 0 {
                // Its message alone is over the frame limit (as a lone message it carries
                // no length, so it may still fit).
                let len = batch::length_at(messages).expect("checked above");
                if HEADER_LEN + len > max_frame {
                    return Err(SendError::TooLarge);
                }
                end = batch::LENGTH_PREFIX + len;
                count = 1;
            }
            // A large body goes by reference: the caller's buffer keeps the rest of its
            // allocation, shared with the bytes on their way out (a caller that refills it
            // at a high rate recycles its buffers; see gorpc's `OutboxDrain`).
            let (flags, start) = if count == 1 {
                (0, batch::LENGTH_PREFIX)
            } else {
                (flags::BATCH, 0)
            };
            let len = end - start;
            let frame = FrameInfo::new(FrameType::Message, flags, codec, id);
            let mut push = |payload: Payload<'_>| {
                self.out
                    .push_frame(frame, |_| {}, payload)
                    .expect("sized to the frame limit above")
            };
            if len >= ZERO_COPY_LEN {
                messages.advance(start);
                push(Payload::Bytes(messages.split_to(len).freeze()));
            } else {
                push(Payload::Slice(&messages[start..end]));
                messages.advance(end);
            }
            window.spend(len);
            self.send_window.spend(len);
        }
        Ok(())
    }

    /// Ends this side's message stream without a final message; needs no credit.
    pub(crate) fn send_end_of_messages(&mut self, id: u32, codec: u8) {
        let flags = flags::END_STREAM | flags::NO_MESSAGE;
        let frame = FrameInfo::new(FrameType::Message, flags, codec, id);
        self.out.push_small(frame, &[]);
    }

    /// Counts a received message against the connection window; `Err` when the peer had no
    /// credit for it.
    pub(crate) fn receive_message(&mut self, len: usize) -> Result<(), ProtoError> {
        if self.recv_window.receive(len) {
            Ok(())
        } else {
            Err(ProtoError::FlowControl { call_id: 0 })
        }
    }

    /// Returns `len` received bytes to the connection window (the application released
    /// them, or they belonged to a call that is gone), granting credit back in batches.
    pub(crate) fn release(&mut self, len: u64) {
        if let Some(increment) = self.recv_window.release(len, self.connection_window) {
            if !self.is_closed() {
                self.push_window_update(0, increment);
            }
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
        let Some(header) = FrameHeader::decode(buf, self.out.limits())? else {
            return Ok(None);
        };
        let len = header.frame_len();
        if buf.len() < len {
            return Ok(None);
        }
        self.keepalive.on_frame(now);
        let inbound = match header.frame_type {
            FrameType::Request | FrameType::Response | FrameType::Cancel | FrameType::Message => {
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
                self.mark_goaway(false, true);
                if !self.goaway_sent() {
                    self.send_goaway(&Status::ok());
                }
                Inbound::GoAway(status)
            }
            FrameType::WindowUpdate => {
                let increment = decode_increment(&buf[HEADER_LEN..len])?;
                if header.call_id == 0 {
                    self.send_window.grant(increment)?;
                }
                Inbound::WindowUpdate {
                    id: header.call_id,
                    increment,
                }
            }
            // Pong: its arrival already counted as a sign of life.
            FrameType::Pong => Inbound::Handled,
        };
        buf.advance(len);
        Ok(Some(inbound))
    }

    pub(crate) fn send_goaway(&mut self, status: &Status) {
        self.mark_goaway(true, false);
        let (code, message) = (status.code() as u32, status.message());
        let frame = FrameInfo::new(FrameType::GoAway, 0, 0, 0);
        // A message too long for the peer's head limit is dropped rather than the go-away.
        for message in [message, ""] {
            let write = |out: &mut BytesMut| encode_response_head(code, message, [], out);
            if self
                .out
                .push_frame(frame, write, Payload::Slice(&[]))
                .is_ok()
            {
                return;
            }
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
    pub(crate) fn close(&mut self, reason: CloseReason) {
        if let CloseReason::Error(e) = &reason {
            if !matches!(e, ProtoError::KeepaliveTimeout) {
                self.send_goaway(&Status::new(Code::Internal, e.to_string()));
            }
        }
        self.life = Life::Closed(reason);
    }

    /// The earlier of the next call deadline and the keepalive timer; none once closed.
    pub(crate) fn poll_timeout(&self, next_deadline: Option<Instant>) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        match (next_deadline, self.keepalive.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Both sides said go-away; with no calls left, the connection is done.
    pub(crate) fn is_draining_done(&self, calls_left: bool) -> bool {
        matches!(
            self.life,
            Life::Draining {
                sent: true,
                received: true
            }
        ) && !calls_left
    }
}
