//! The server side of one connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::batch;
use crate::calls::{CallCore, CallTable, Core, HasCore, Side};
use crate::config::ConnConfig;
use crate::error::{ProtoError, SendError};
use crate::events::{EventQueue, MessageEvent};
use crate::flow::{SendWindow, INITIAL_STREAM_WINDOW};
use crate::frame::{flags, FrameType};
use crate::head::{encode_response_head, RequestHead};
use crate::link::{CallFrame, CloseReason, Link};
use crate::status::{Code, Status};
use crate::timers::deadline_after;
use crate::transmit::{FrameInfo, Oversize, Payload};
use crate::{CallId, IdHasher};

/// A call for the server to run.
#[derive(Clone, Debug)]
pub struct Request {
    /// The call's id on this connection.
    pub id: CallId,
    /// Codec id of the request (and of the response and every message).
    pub codec: u8,
    /// Method, timeout and metadata.
    pub head: RequestHead,
    /// The request message; empty when the client streams (its messages follow as
    /// [`ServerEvent::Message`]).
    pub body: Bytes,
    /// The client sends a stream of messages, ended by [`ServerEvent::HalfClosed`].
    pub client_streams: bool,
    /// When the client stops waiting, on this side's clock: the relative timeout it sent,
    /// counted from when the request arrived. `None`: no deadline.
    pub deadline: Option<Instant>,
}

/// Why a call the driver was running must stop. No response will be sent for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// The client cancelled it.
    Peer,
    /// Its deadline passed.
    DeadlineExceeded,
}

/// What a [`ServerConn`] reports to its driver.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerEvent {
    /// Run this call and answer it with [`ServerConn::respond`] (which also ends a stream
    /// call; stream responses go out first through [`ServerConn::send_message`]).
    Request(Request),
    /// One message of a client stream, in order. Its bytes count against the call's
    /// flow-control window until [`ServerConn::release`](crate::Conn::release) gives them back.
    Message {
        /// The call.
        id: CallId,
        /// The encoded message.
        body: Bytes,
    },
    /// The client sent its last message on this call (half-close).
    HalfClosed {
        /// The call.
        id: CallId,
    },
    /// A call whose [`ServerConn::send_message`] was refused with [`SendError::NoCredit`]
    /// may send again: credit came back.
    Writable {
        /// The call.
        id: CallId,
    },
    /// Stop running this call (drop its handler); a response to it would be discarded.
    Cancelled {
        /// The call.
        id: CallId,
        /// Why it stopped.
        reason: CancelReason,
    },
    /// The client will start no new calls on this connection.
    GoAway(Status),
    /// The connection is over: every call still running is cancelled. Flush
    /// [`ServerConn::poll_transmit`](crate::Conn::poll_transmit), then close the transport.
    Closed(CloseReason),
}

impl MessageEvent for ServerEvent {
    fn message(id: CallId, body: Bytes) -> Self {
        ServerEvent::Message { id, body }
    }
}

#[derive(Debug)]
pub(crate) struct ServerCall {
    core: CallCore,
    /// The client's message stream is open.
    receiving: bool,
}

impl HasCore for ServerCall {
    fn core(&self) -> &CallCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut CallCore {
        &mut self.core
    }
}

/// A request read at the concurrency limit, with whatever arrived for it meanwhile.
#[derive(Debug)]
struct Waiting {
    request: Request,
    call: ServerCall,
    /// Messages of its client stream, handed out after the request when it starts.
    early: VecDeque<Bytes>,
    half_closed: bool,
}

/// The server half of a connection: a state machine fed bytes and time, never doing I/O.
///
/// # Driving it
///
/// The same loop as [`ClientConn`](crate::ClientConn): after every input drain
/// [`poll_event`](Self::poll_event), write out
/// [`poll_transmit`](crate::Conn::poll_transmit), re-arm the timer to
/// [`poll_timeout`](crate::Conn::poll_timeout). In addition, read from the transport only
/// while [`wants_read`](Self::wants_read) is true: at the concurrency limit the server stops
/// reading, and TCP pushes back on the client. When a slot frees up (a response, a cancel, a
/// deadline), requests already read are started and `wants_read` turns true again.
#[derive(Debug)]
pub struct ServerConn {
    core: Core<ServerCall>,
    /// Requests read while at the concurrency limit, started as slots free up.
    waiting: VecDeque<Waiting>,
    events: EventQueue<ServerEvent>,
}

impl ServerConn {
    /// `hash_seed` keys the table of call ids the client chooses; give each connection a
    /// random one so a client cannot pick colliding ids.
    pub fn new(config: ConnConfig, now: Instant, hash_seed: u64) -> Self {
        ServerConn {
            core: Core {
                link: Link::new(config, now),
                calls: CallTable::new(IdHasher::with_seed(hash_seed)),
            },
            waiting: VecDeque::new(),
            events: EventQueue::new(),
        }
    }

    fn handle_call_frame(&mut self, now: Instant, frame: CallFrame) -> Result<(), ProtoError> {
        let id = frame.header.call_id;
        match frame.header.frame_type {
            FrameType::Request => {}
            FrameType::Message => return self.handle_message(frame),
            FrameType::Cancel => {
                if self.core.calls.remove(&mut self.core.link, id).is_some() {
                    self.events.push(ServerEvent::Cancelled {
                        id: CallId(id),
                        reason: CancelReason::Peer,
                    });
                    self.after_removal();
                } else if let Some(i) = self.waiting.iter().position(|w| w.request.id.0 == id) {
                    if let Some(w) = self.waiting.remove(i) {
                        self.core.link.release(w.call.core.recv_window.unreleased());
                    }
                    self.check_drained();
                }
                return Ok(());
            }
            other => return Err(ProtoError::UnexpectedFrame(other)),
        }
        if id == 0 {
            return Err(ProtoError::ReservedCallId);
        }
        if self.core.link.goaway_received() {
            return Err(ProtoError::RequestAfterGoAway(id));
        }
        if self.core.calls.contains(id) || self.waiting.iter().any(|w| w.request.id.0 == id) {
            return Err(ProtoError::DuplicateCallId(id));
        }
        let codec = frame.header.codec;
        let client_streams = frame.header.flags & flags::END_STREAM == 0;
        if client_streams && !frame.body.is_empty() {
            let status = Status::new(
                Code::InvalidArgument,
                "a request opening a client stream must have an empty body",
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
            client_streams,
            deadline,
        };
        let recv_window = self.core.link.open_recv_window(id, client_streams);
        let call = ServerCall {
            core: CallCore {
                deadline,
                codec,
                wants_writable: false,
                send_window: SendWindow::new(INITIAL_STREAM_WINDOW),
                recv_window,
            },
            receiving: client_streams,
        };
        if self.core.calls.len() < self.core.link.limits().max_concurrent_calls as usize {
            self.start(request, call);
        } else {
            self.waiting.push_back(Waiting {
                request,
                call,
                early: VecDeque::new(),
                half_closed: false,
            });
        }
        Ok(())
    }

    fn handle_message(&mut self, frame: CallFrame) -> Result<(), ProtoError> {
        let id = frame.header.call_id;
        let end = frame.header.flags & flags::END_STREAM != 0;
        // The frame decoder allows NO_MESSAGE only on an empty message with END_STREAM.
        let message = frame.header.flags & flags::NO_MESSAGE == 0;
        let batched = frame.header.flags & flags::BATCH != 0;
        // A batch's length prefixes are the protocol's, not the handler's: they count
        // against the windows with the messages and are given back at once.
        let prefixes = if batched {
            batch::count(&frame.body)? * batch::LENGTH_PREFIX
        } else {
            0
        };
        let len = frame.body.len();
        if message {
            self.core.link.receive_message(len)?;
        }
        let waiting_at = if self.core.calls.contains(id) {
            None
        } else if let Some(i) = self.waiting.iter().position(|w| w.request.id.0 == id) {
            Some(i)
        } else {
            // A late message for a call that ended here: its credit goes straight back.
            self.core.link.release(len as u64);
            return Ok(());
        };
        let call = match waiting_at {
            None => self.core.calls.get_mut(id),
            Some(i) => self.waiting.get_mut(i).map(|w| &mut w.call),
        };
        let Some(call) = call else {
            return Ok(());
        };
        if !call.receiving {
            return Err(ProtoError::MessageAfterEndStream(id));
        }
        if message && !call.core.recv_window.receive(len) {
            return Err(ProtoError::FlowControl { call_id: id });
        }
        call.receiving = !end;
        if prefixes > 0 {
            if let Some(increment) = call
                .core
                .recv_window
                .release(prefixes as u64, self.core.link.stream_window)
            {
                self.core.link.push_window_update(id, increment);
            }
            self.core.link.release(prefixes as u64);
        }
        if let Some(w) = waiting_at.and_then(|i| self.waiting.get_mut(i)) {
            w.early
                .extend(batch::messages(frame.body, batched, message));
            w.half_closed = end;
            return Ok(());
        }
        let id = CallId(id);
        self.events.push_messages(id, frame.body, batched, message);
        if end {
            self.events.push(ServerEvent::HalfClosed { id });
        }
        Ok(())
    }

    fn start(&mut self, request: Request, call: ServerCall) {
        let id = request.id;
        self.core.calls.insert(id.0, call);
        self.events.push(ServerEvent::Request(request));
    }

    /// Sends one message of a call's response stream. The call still ends with
    /// [`respond`](Self::respond) (an empty body for a server stream). Nothing is queued on
    /// error:
    ///
    /// - [`SendError::NoCredit`]: a flow-control window is used up; a
    ///   [`ServerEvent::Writable`] for this call follows once credit is back.
    /// - [`SendError::CallGone`]: the call was answered, cancelled, is past its deadline,
    ///   or the connection closed.
    /// - [`SendError::TooLarge`]: the message would exceed `max_frame_len`.
    pub fn send_message<'m>(
        &mut self,
        id: CallId,
        body: impl Into<Payload<'m>>,
    ) -> Result<(), SendError> {
        self.send_on(id, |link, window, codec| {
            link.send_message(window, id.0, codec, 0, body.into())
        })
    }

    /// Sends the messages at the front of `messages`, a buffer built with
    /// [`batch::push_message`](crate::batch::push_message), as far as credit goes, several
    /// to a frame. Like [`send_message`](Self::send_message) for each; those that did not
    /// go stay in `messages`, and [`SendError::NoCredit`] means a [`ServerEvent::Writable`]
    /// follows. [`SendError::MalformedBatch`]: `messages` does not hold whole
    /// length-prefixed messages.
    pub fn send_batch(&mut self, id: CallId, messages: &mut BytesMut) -> Result<(), SendError> {
        self.send_on(id, |link, window, codec| {
            link.send_batch(window, id.0, codec, messages)
        })
    }

    fn send_on(
        &mut self,
        id: CallId,
        send: impl FnOnce(&mut Link, &mut SendWindow, u8) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        self.core
            .calls
            .send_on(&mut self.core.link, id.0, |_| Ok(()), send)
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
        if self.core.link.is_closed() {
            return false;
        }
        let Some(call) = self.core.calls.remove(&mut self.core.link, id.0) else {
            return false;
        };
        self.send_response(id.0, call.core.codec, status, metadata, body.into());
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
        let (code, message) = (status.code() as u32, status.message());
        let frame = FrameInfo::new(FrameType::Response, flags::END_STREAM, codec, id);
        let pushed = self.core.link.out.push_frame(
            frame,
            |out| encode_response_head(code, message, metadata, out),
            body,
        );
        if let Err(why) = pushed {
            let message = match why {
                Oversize::Head => "response head exceeds max_head_len",
                Oversize::Frame => "response exceeds max_frame_len",
            };
            let code = Code::ResourceExhausted as u32;
            let _ = self.core.link.out.push_frame(
                frame,
                |out| encode_response_head(code, message, [], out),
                Payload::Slice(&[]),
            );
        }
    }

    /// Starts requests that waited for a slot. One whose deadline passed while it waited
    /// is dropped unseen: its client has already given up.
    fn start_waiting(&mut self, now: Instant) {
        while self.core.calls.len() < self.core.link.limits().max_concurrent_calls as usize {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            if w.request.deadline.is_some_and(|at| at <= now) {
                self.core.link.release(w.call.core.recv_window.unreleased());
                continue;
            }
            let id = w.request.id;
            self.start(w.request, w.call);
            for body in w.early {
                self.events.push(ServerEvent::Message { id, body });
            }
            if w.half_closed {
                self.events.push(ServerEvent::HalfClosed { id });
            }
        }
        self.check_drained();
    }

    /// The next event for the driver, if any; poll after every input.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop()
    }

    /// Whether the driver should read more from the transport: false at the concurrency
    /// limit with requests already waiting, and once closed.
    pub fn wants_read(&self) -> bool {
        !self.core.link.is_closed() && self.waiting.is_empty()
    }

    /// Starts a graceful drain: the client is told to start no new calls. Every request it
    /// sent before it saw the go-away is still served; the connection closes once the client
    /// has acknowledged and every call has been answered.
    pub fn go_away(&mut self) {
        if !self.core.link.is_closed() && !self.core.link.goaway_sent() {
            self.core
                .link
                .send_goaway(&Status::new(Code::Unavailable, "server is shutting down"));
            self.check_drained();
        }
    }

    /// Turns the connection away without serving it: a go-away carrying `status` (e.g.
    /// `ResourceExhausted` at a connection limit), then closed.
    pub fn refuse(&mut self, status: Status) {
        if !self.core.link.is_closed() {
            if !self.core.link.goaway_sent() {
                self.core.link.send_goaway(&status);
            }
            self.close(CloseReason::Aborted(status));
        }
    }

    /// Requests read but not started, waiting for a free slot.
    pub fn calls_waiting(&self) -> usize {
        self.waiting.len()
    }

    fn after_removal(&mut self) {
        self.core.calls.prune();
        self.check_drained();
    }

    fn check_drained(&mut self) {
        let busy = !self.core.calls.is_empty() || !self.waiting.is_empty();
        if !self.core.link.is_closed() && self.core.link.is_draining_done(busy) {
            self.close(CloseReason::Drained);
        }
    }
}

impl Side for ServerConn {
    type Call = ServerCall;

    fn core(&mut self) -> &mut Core<ServerCall> {
        &mut self.core
    }

    fn core_ref(&self) -> &Core<ServerCall> {
        &self.core
    }

    fn on_call_frame(&mut self, now: Instant, frame: CallFrame) -> Result<(), ProtoError> {
        self.handle_call_frame(now, frame)
    }

    fn on_credit(&mut self, id: u32, increment: u32) -> Result<(), ProtoError> {
        let (events, waiting) = (&mut self.events, &mut self.waiting);
        self.core.calls.credit(
            &self.core.link,
            id,
            increment,
            // A request waiting for a slot takes credit too.
            move |id| {
                waiting
                    .iter_mut()
                    .find(|w| w.request.id.0 == id)
                    .map(|w| &mut w.call)
            },
            |id| events.push(ServerEvent::Writable { id: CallId(id) }),
        )
    }

    fn on_go_away(&mut self, status: Status) {
        self.events.push(ServerEvent::GoAway(status));
        self.check_drained();
    }

    fn close(&mut self, reason: CloseReason) {
        self.core.link.close(reason.clone());
        self.core.calls.drain().for_each(drop);
        self.waiting.clear();
        self.events.push(ServerEvent::Closed(reason));
    }
}

impl crate::Conn for ServerConn {
    /// Cancels every call whose deadline is at or before `now`, and runs keepalive.
    fn handle_timeout(&mut self, now: Instant) {
        if self.core.link.is_closed() {
            return;
        }
        while let Some((id, _)) = self.core.calls.pop_expired(&mut self.core.link, now) {
            self.events.push(ServerEvent::Cancelled {
                id: CallId(id),
                reason: CancelReason::DeadlineExceeded,
            });
        }
        self.after_removal();
        self.start_waiting(now);
        if let Err(e) = self.core.link.handle_keepalive(now) {
            self.close(CloseReason::Error(e));
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.core.link.poll_timeout(self.core.calls.next_deadline())
    }

    /// No call running or waiting.
    fn is_idle(&self) -> bool {
        self.core.calls.is_empty() && self.waiting.is_empty()
    }

    fn shrink_to_fit(&mut self) {
        self.core.shrink_to_fit();
        self.waiting.shrink_to_fit();
        self.events.shrink_to_fit();
    }

    /// Calls running (requests handed out and not yet answered or cancelled).
    fn calls_in_flight(&self) -> usize {
        self.core.calls.len()
    }
}
