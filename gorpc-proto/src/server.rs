//! The server side of one connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hashbrown::HashMap;

use crate::config::ConnConfig;
use crate::error::ProtoError;
use crate::frame::{flags, FrameType};
use crate::head::{encode_response_head, RequestHead};
use crate::link::{CallFrame, CloseReason, Inbound, Link};
use crate::status::{Code, Status};
use crate::timers::{deadline_after, Deadlines};
use crate::transmit::{Oversize, Payload};
use crate::{CallId, IdHasher};

/// A call for the server to run.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: CallId,
    pub codec: u8,
    pub head: RequestHead,
    pub body: Bytes,
    /// When the client stops waiting, on this side's clock: the relative timeout it sent,
    /// counted from when the request arrived. `None`: no deadline.
    pub deadline: Option<Instant>,
}

/// Why a call the driver was running must stop. No response will be sent for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// The client cancelled it.
    Peer,
    /// Its deadline passed.
    DeadlineExceeded,
}

/// What a [`ServerConn`] reports to its driver.
#[derive(Debug)]
pub enum ServerEvent {
    /// Run this call and answer it with [`ServerConn::respond`].
    Request(Request),
    /// Stop running this call (drop its handler); a response to it would be discarded.
    Cancelled { id: CallId, reason: CancelReason },
    /// The client will start no new calls on this connection.
    GoAway(Status),
    /// The connection is over: every call still running is cancelled. Flush
    /// [`ServerConn::poll_transmit`], then close the transport.
    Closed(CloseReason),
}

#[derive(Debug)]
struct ServerCall {
    deadline: Option<Instant>,
    codec: u8,
}

/// The server half of a connection: a state machine fed bytes and time, never doing I/O.
///
/// # Driving it
///
/// The same loop as [`ClientConn`](crate::ClientConn): after every input drain
/// [`poll_event`](Self::poll_event), write out [`poll_transmit`](Self::poll_transmit), re-arm
/// the timer to [`poll_timeout`](Self::poll_timeout). In addition, read from the transport
/// only while [`wants_read`](Self::wants_read) is true: at the concurrency limit the server
/// stops reading, and TCP pushes back on the client. When a slot frees up (a response, a
/// cancel, a deadline), requests already read are started and `wants_read` turns true again.
#[derive(Debug)]
pub struct ServerConn {
    link: Link,
    calls: HashMap<u32, ServerCall, IdHasher>,
    /// Requests read while at the concurrency limit, started as slots free up.
    waiting: VecDeque<Request>,
    deadlines: Deadlines,
    events: VecDeque<ServerEvent>,
}

impl ServerConn {
    /// `hash_seed` keys the table of call ids the client chooses; give each connection a
    /// random one so a client cannot pick colliding ids.
    pub fn new(config: ConnConfig, now: Instant, hash_seed: u64) -> Self {
        ServerConn {
            link: Link::new(config, now),
            calls: HashMap::with_hasher(IdHasher::with_seed(hash_seed)),
            waiting: VecDeque::new(),
            deadlines: Deadlines::default(),
            events: VecDeque::new(),
        }
    }

    /// Consumes every whole frame at the front of `buf`.
    ///
    /// A protocol violation closes the connection (reported as [`ServerEvent::Closed`], and
    /// returned). A request that is malformed but well framed is answered with an error
    /// status and harms nothing else.
    pub fn handle_read(&mut self, now: Instant, buf: &mut BytesMut) -> Result<(), ProtoError> {
        if self.link.closed {
            buf.clear();
            return Ok(());
        }
        loop {
            let result = match self.link.next_frame(now, buf) {
                Ok(Some(Inbound::Call(frame))) => self.handle_call_frame(now, frame),
                Ok(Some(Inbound::GoAway(status))) => {
                    self.events.push_back(ServerEvent::GoAway(status));
                    self.check_drained();
                    Ok(())
                }
                Ok(Some(Inbound::Handled)) => Ok(()),
                Ok(None) => return Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                buf.clear();
                self.close(CloseReason::Error(e.clone()));
                return Err(e);
            }
        }
    }

    fn handle_call_frame(&mut self, now: Instant, frame: CallFrame) -> Result<(), ProtoError> {
        let id = frame.header.call_id;
        match frame.header.frame_type {
            FrameType::Request => {}
            FrameType::Cancel => {
                if self.calls.remove(&id).is_some() {
                    self.events.push_back(ServerEvent::Cancelled {
                        id: CallId(id),
                        reason: CancelReason::Peer,
                    });
                    self.after_removal();
                } else if let Some(i) = self.waiting.iter().position(|r| r.id.0 == id) {
                    self.waiting.remove(i);
                    self.check_drained();
                }
                return Ok(());
            }
            other => return Err(ProtoError::UnexpectedFrame(other)),
        }
        if id == 0 {
            return Err(ProtoError::ReservedCallId);
        }
        if self.link.goaway_received {
            return Err(ProtoError::RequestAfterGoAway(id));
        }
        if self.calls.contains_key(&id) || self.waiting.iter().any(|r| r.id.0 == id) {
            return Err(ProtoError::DuplicateCallId(id));
        }
        let codec = frame.header.codec;
        if frame.header.flags & flags::END_STREAM == 0 {
            let status = Status::new(
                Code::Unimplemented,
                "streaming calls are not supported by this server",
            );
            self.send_response(id, codec, &status, [], Payload::Slice(&[]));
            return Ok(());
        }
        let head = match RequestHead::decode(frame.head) {
            Ok(head) => head,
            Err(e) => {
                let status = Status::new(Code::InvalidArgument, format!("client sent a {e}"));
                self.send_response(id, codec, &status, [], Payload::Slice(&[]));
                return Ok(());
            }
        };
        let deadline = match head.timeout_micros() {
            0 => None,
            micros => deadline_after(now, Duration::from_micros(micros)),
        };
        let request = Request {
            id: CallId(id),
            codec,
            head,
            body: frame.body,
            deadline,
        };
        if self.calls.len() < self.link.limits.max_concurrent_calls as usize {
            self.start(request);
        } else {
            self.waiting.push_back(request);
        }
        Ok(())
    }

    fn start(&mut self, request: Request) {
        let deadline = request.deadline;
        if let Some(at) = deadline {
            self.deadlines.push(at, request.id.0);
        }
        self.calls.insert(
            request.id.0,
            ServerCall {
                deadline,
                codec: request.codec,
            },
        );
        self.events.push_back(ServerEvent::Request(request));
    }

    /// Answers a call. Returns `false`, sending nothing, when the call is no longer running
    /// (cancelled, past its deadline, or the connection closed): late responses are dropped.
    ///
    /// A response too large for the frame limits is replaced by a `ResourceExhausted`
    /// status, so the client learns why instead of the connection failing.
    pub fn respond<'m, M>(
        &mut self,
        now: Instant,
        id: CallId,
        status: &Status,
        metadata: M,
        body: impl Into<Payload<'m>>,
    ) -> bool
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        if self.link.closed {
            return false;
        }
        let Some(call) = self.calls.remove(&id.0) else {
            return false;
        };
        self.send_response(id.0, call.codec, status, metadata, body.into());
        self.after_removal();
        self.start_waiting(now);
        true
    }

    fn send_response<'m, M>(
        &mut self,
        id: u32,
        codec: u8,
        status: &Status,
        metadata: M,
        body: Payload<'m>,
    ) where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        let limits = self.link.limits;
        let (code, message) = (status.code() as u32, status.message());
        let pushed = self.link.out.push_frame(
            FrameType::Response,
            flags::END_STREAM,
            codec,
            id,
            |out| encode_response_head(code, message, metadata, out),
            body,
            limits.max_head_len,
            limits.max_frame_len,
        );
        if let Err(why) = pushed {
            let message = match why {
                Oversize::Head => "response head exceeds max_head_len",
                Oversize::Frame => "response exceeds max_frame_len",
            };
            let _ = self.link.out.push_frame(
                FrameType::Response,
                flags::END_STREAM,
                codec,
                id,
                |out| encode_response_head(Code::ResourceExhausted as u32, message, [], out),
                Payload::Slice(&[]),
                limits.max_head_len,
                limits.max_frame_len,
            );
        }
    }

    /// Starts requests that waited for a slot. One whose deadline passed while it waited
    /// is dropped unseen: its client has already given up.
    fn start_waiting(&mut self, now: Instant) {
        while self.calls.len() < self.link.limits.max_concurrent_calls as usize {
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            if request.deadline.is_some_and(|at| at <= now) {
                continue;
            }
            self.start(request);
        }
        self.check_drained();
    }

    /// Cancels every call whose deadline is at or before `now`, and runs keepalive.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link.closed {
            return;
        }
        while let Some((at, id)) = self.deadlines.pop_due(now) {
            if !matches!(self.calls.get(&id), Some(c) if c.deadline == Some(at)) {
                continue;
            }
            self.calls.remove(&id);
            self.events.push_back(ServerEvent::Cancelled {
                id: CallId(id),
                reason: CancelReason::DeadlineExceeded,
            });
        }
        self.after_removal();
        self.start_waiting(now);
        if let Err(e) = self.link.handle_keepalive(now) {
            self.close(CloseReason::Error(e));
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout(self.deadlines.next())
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// The next bytes to write, in order; see [`ClientConn::poll_transmit`](crate::ClientConn::poll_transmit).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.link.out.pop()
    }

    pub fn transmit_len(&self) -> usize {
        self.link.out.len()
    }

    /// Whether the driver should read more from the transport: false at the concurrency
    /// limit with requests already waiting, and once closed.
    pub fn wants_read(&self) -> bool {
        !self.link.closed && self.waiting.is_empty()
    }

    /// Starts a graceful drain: the client is told to start no new calls. Every request it
    /// sent before it saw the go-away is still served; the connection closes once the client
    /// has acknowledged and every call has been answered.
    pub fn go_away(&mut self) {
        if !self.link.closed && !self.link.goaway_sent {
            self.link
                .send_goaway(&Status::new(Code::Unavailable, "server is shutting down"));
            self.check_drained();
        }
    }

    /// Turns the connection away without serving it: a go-away carrying `status` (e.g.
    /// `ResourceExhausted` at a connection limit), then closed.
    pub fn refuse(&mut self, status: Status) {
        if !self.link.closed {
            if !self.link.goaway_sent {
                self.link.send_goaway(&status);
            }
            self.close(CloseReason::Aborted(status));
        }
    }

    pub fn handle_eof(&mut self) {
        if !self.link.closed {
            self.close(CloseReason::PeerClosed);
        }
    }

    pub fn abort(&mut self, status: Status) {
        if !self.link.closed {
            self.close(CloseReason::Aborted(status));
        }
    }

    /// Calls running (requests handed out and not yet answered or cancelled).
    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Requests read but not started, waiting for a free slot.
    pub fn calls_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// No call running or waiting.
    pub fn is_idle(&self) -> bool {
        self.calls.is_empty() && self.waiting.is_empty()
    }

    pub fn is_closed(&self) -> bool {
        self.link.closed
    }

    fn after_removal(&mut self) {
        let calls = &self.calls;
        self.deadlines.prune(
            calls.len(),
            |at, id| matches!(calls.get(&id), Some(c) if c.deadline == Some(at)),
        );
        self.check_drained();
    }

    fn check_drained(&mut self) {
        let busy = !self.calls.is_empty() || !self.waiting.is_empty();
        if !self.link.closed && self.link.is_draining_done(busy) {
            self.close(CloseReason::Drained);
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.link.close(&reason);
        self.calls.clear();
        self.waiting.clear();
        self.deadlines.clear();
        self.events.push_back(ServerEvent::Closed(reason));
    }
}
