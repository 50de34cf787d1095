//! The client side of one connection.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hashbrown::HashMap;

use crate::batch;
use crate::calls::{CallCore, CallTable, Core, HasCore, Side};
use crate::config::ConnConfig;
use crate::error::{ProtoError, SendError};
use crate::events::{EventQueue, MessageEvent};
use crate::flow::{SendWindow, INITIAL_STREAM_WINDOW};
use crate::frame::{flags, FrameType};
use crate::head::{encode_request_head, ResponseHead};
use crate::link::{CallFrame, CloseReason, Link};
use crate::status::{Code, Status};
use crate::timers::timeout_micros;
use crate::transmit::{FrameInfo, Oversize, Payload};
use crate::{CallId, IdHasher};

/// The next id not in `in_use`, advancing `next_id`. Ids wrap around after 2^32 calls,
/// skipping 0 and any id still in use; a response can only match the call it was sent for,
/// because the server never answers an id after receiving its cancel.
pub(crate) fn allocate_id<V>(next_id: &mut u32, in_use: &HashMap<u32, V, IdHasher>) -> u32 {
    loop {
        let id = *next_id;
        *next_id = next_id.wrapping_add(1).max(1);
        if !in_use.contains_key(&id) {
            return id;
        }
    }
}

/// A finished call's answer from the server. Its status may be an error the server returned.
#[derive(Clone, Debug)]
pub struct Response {
    /// Codec id of the body (see [`crate::codec`]).
    pub codec: u8,
    /// The status the server sent; may be an error.
    pub status: Status,
    /// The response head, for its metadata.
    pub head: ResponseHead,
    /// The response body, encoded with `codec`.
    pub body: Bytes,
}

/// What a [`ClientConn`] reports to its driver.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientEvent<T> {
    /// A call ended, exactly once per started call: `Ok` with the server's response (whose
    /// status may be an error), or `Err` when it ended locally (deadline, connection lost,
    /// malformed response).
    Finished {
        /// The call.
        id: CallId,
        /// The user data the call was started with.
        user: T,
        /// The server's response, or the local reason the call ended.
        result: Result<Response, Status>,
    },
    /// One message of a stream call's response stream, in order. Its bytes count against
    /// the call's flow-control window until [`ClientConn::release`](crate::Conn::release)
    /// gives them back.
    Message {
        /// The call.
        id: CallId,
        /// The encoded message.
        body: Bytes,
    },
    /// A stream call whose [`ClientConn::send_message`] was refused with
    /// [`SendError::NoCredit`] may send again: credit came back.
    Writable {
        /// The call.
        id: CallId,
    },
    /// The server accepts no new calls on this connection; calls in flight still finish.
    GoAway(Status),
    /// The connection is over. Flush
    /// [`ClientConn::poll_transmit`](crate::Conn::poll_transmit), then close the transport.
    Closed(CloseReason),
}

impl<T> MessageEvent for ClientEvent<T> {
    fn message(id: CallId, body: Bytes) -> Self {
        ClientEvent::Message { id, body }
    }
}

/// A call that could not start; `user` is handed back.
#[derive(Debug)]
pub struct Rejected<T> {
    /// Why the call could not start.
    pub status: Status,
    /// The user data the call was given.
    pub user: T,
}

/// The options of a call besides its body.
#[derive(Clone, Copy, Debug)]
pub struct CallHead<'a, M> {
    /// "/package.Service/Method".
    pub method: &'a str,
    /// Codec id of the body (see [`crate::codec`]).
    pub codec: u8,
    /// When the caller stops waiting. Sent as the remaining time, so clocks need not agree.
    pub deadline: Option<Instant>,
    /// Key-value pairs sent with the call.
    pub metadata: M,
}

/// Which sides of a stream call send a stream of messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// One request message, a stream of response messages.
    ServerStreaming,
    /// A stream of request messages, one response message.
    ClientStreaming,
    /// Streams both ways.
    Bidirectional,
}

impl StreamKind {
    /// Whether the client sends a stream of messages.
    pub fn client_streams(self) -> bool {
        matches!(
            self,
            StreamKind::ClientStreaming | StreamKind::Bidirectional
        )
    }

    /// Whether the server sends a stream of messages.
    pub fn server_streams(self) -> bool {
        matches!(
            self,
            StreamKind::ServerStreaming | StreamKind::Bidirectional
        )
    }
}

impl<'a> CallHead<'a, [(&'a str, &'a [u8]); 0]> {
    /// A call with no deadline and no metadata.
    pub fn new(method: &'a str, codec: u8) -> Self {
        CallHead {
            method,
            codec,
            deadline: None,
            metadata: [],
        }
    }
}

impl<'a, M> CallHead<'a, M> {
    /// The same call with a deadline.
    pub fn with_deadline(self, deadline: Instant) -> Self {
        CallHead {
            deadline: Some(deadline),
            ..self
        }
    }

    /// The same call with these metadata entries.
    pub fn with_metadata<'m, N>(self, metadata: N) -> CallHead<'a, N>
    where
        N: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        CallHead {
            method: self.method,
            codec: self.codec,
            deadline: self.deadline,
            metadata,
        }
    }
}

#[derive(Debug)]
pub(crate) struct ClientCall<T> {
    core: CallCore,
    user: T,
    /// The client may still send messages (a client stream not yet half-closed).
    sending: bool,
    /// The server answers with a stream of messages.
    receives_stream: bool,
}

impl<T> HasCore for ClientCall<T> {
    fn core(&self) -> &CallCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut CallCore {
        &mut self.core
    }
}

/// The client half of a connection: a state machine fed bytes and time, never doing I/O.
///
/// `T` is the driver's per-call data (e.g. the waker or channel of the caller), stored in
/// the call's slot and handed back in [`ClientEvent::Finished`], so the driver needs no map
/// of its own.
///
/// # Driving it
///
/// After any input (`start_call`, `cancel`, `handle_read`, `handle_timeout`, `go_away`,
/// `handle_eof`, `abort`):
/// 1. drain [`poll_event`](Self::poll_event);
/// 2. write out everything [`poll_transmit`](crate::Conn::poll_transmit) returns, in order;
/// 3. re-arm the timer to [`poll_timeout`](crate::Conn::poll_timeout) and call
///    [`handle_timeout`](crate::Conn::handle_timeout) when it fires.
///
/// Feed every byte read from the transport to `handle_read`; it consumes whole frames and
/// leaves a partial one in the buffer for next time.
#[derive(Debug)]
pub struct ClientConn<T = ()> {
    core: Core<ClientCall<T>>,
    next_id: u32,
    events: EventQueue<ClientEvent<T>>,
    /// The refusal a server's go-away carried (`ResourceExhausted`: it turned the
    /// connection away at its limit): what calls still in flight end with when it then
    /// closes, so that callers back off instead of retrying at once. Other go-away errors
    /// (the server saw a protocol violation, say) leave the close `Unavailable`.
    refusal: Option<Status>,
}

impl<T> ClientConn<T> {
    /// A client connection starting at `now`. With a `connection_window` above the
    /// protocol's initial one, its window update is the first thing queued.
    pub fn new(config: ConnConfig, now: Instant) -> Self {
        ClientConn {
            core: Core {
                link: Link::new(config, now),
                calls: CallTable::new(IdHasher::default()),
            },
            next_id: 1,
            events: EventQueue::new(),
            refusal: None,
        }
    }

    /// Starts a call and queues its request.
    ///
    /// Fails without sending anything when the connection is closed or draining
    /// (`Unavailable`; the server's own status if its go-away refused the connection with
    /// `ResourceExhausted`), at the concurrency limit or when the request exceeds the frame
    /// limits (`ResourceExhausted`), or when the deadline has already passed
    /// (`DeadlineExceeded`).
    pub fn start_call<'m, M>(
        &mut self,
        now: Instant,
        head: CallHead<'_, M>,
        body: impl Into<Payload<'m>>,
        user: T,
    ) -> Result<CallId, Rejected<T>>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        self.start(now, head, None, body.into(), user)
    }

    /// Starts a stream call and queues its request.
    ///
    /// For [`StreamKind::ServerStreaming`] `request` is the one request message. When the
    /// client streams, the request opens its message stream and carries no message:
    /// `request` must be empty (else the call is rejected with `InvalidArgument`), and the
    /// messages follow through [`send_message`](Self::send_message), under flow control.
    /// Response messages arrive as [`ClientEvent::Message`]; the call ends, as every call
    /// does, with one [`ClientEvent::Finished`] carrying the final status and trailing
    /// metadata. Fails like [`start_call`](Self::start_call); a stream counts as one call
    /// towards the concurrency limit.
    pub fn start_stream<'m, M>(
        &mut self,
        now: Instant,
        head: CallHead<'_, M>,
        kind: StreamKind,
        request: impl Into<Payload<'m>>,
        user: T,
    ) -> Result<CallId, Rejected<T>>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        let request = request.into();
        if kind.client_streams() && !request.is_empty() {
            return Err(Rejected {
                status: Status::new(
                    Code::InvalidArgument,
                    "a client stream's messages go through send_message, not the request",
                ),
                user,
            });
        }
        self.start(now, head, Some(kind), request, user)
    }

    fn start<'m, M>(
        &mut self,
        now: Instant,
        head: CallHead<'_, M>,
        kind: Option<StreamKind>,
        body: Payload<'m>,
        user: T,
    ) -> Result<CallId, Rejected<T>>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        let reject = |code, message: &'static str, user| {
            Err(Rejected {
                status: Status::new(code, message),
                user,
            })
        };
        if let Some(refusal) = &self.refusal {
            // Turned away: another try here or at once elsewhere would be too.
            return Err(Rejected {
                status: refusal.clone(),
                user,
            });
        }
        if self.core.link.is_closed() {
            return reject(Code::Unavailable, "connection closed", user);
        }
        if !self.core.link.is_open() {
            return reject(Code::Unavailable, "connection is draining", user);
        }
        if self.core.calls.len() >= self.core.link.limits().max_concurrent_calls as usize {
            return reject(
                Code::ResourceExhausted,
                "too many calls in flight on this connection",
                user,
            );
        }
        let Some(timeout_micros) = timeout_micros(head.deadline, now) else {
            return reject(
                Code::DeadlineExceeded,
                "deadline passed before the call started",
                user,
            );
        };
        let sending = kind.is_some_and(StreamKind::client_streams);
        let receives_stream = kind.is_some_and(StreamKind::server_streams);
        let id = allocate_id(&mut self.next_id, self.core.calls.ids());
        let flags = if sending { 0 } else { flags::END_STREAM };
        let frame = FrameInfo::new(FrameType::Request, flags, head.codec, id);
        let pushed = self.core.link.out.push_frame(
            frame,
            |out| encode_request_head(head.method, timeout_micros, head.metadata, out),
            body,
        );
        match pushed {
            Ok(()) => {}
            Err(Oversize::Head) => {
                return reject(
                    Code::ResourceExhausted,
                    "request head exceeds max_head_len",
                    user,
                )
            }
            Err(Oversize::Frame) => {
                return reject(
                    Code::ResourceExhausted,
                    "request exceeds max_frame_len",
                    user,
                )
            }
        }
        let recv_window = self.core.link.open_recv_window(id, receives_stream);
        self.core.calls.insert(
            id,
            ClientCall {
                core: CallCore {
                    deadline: head.deadline,
                    codec: head.codec,
                    wants_writable: false,
                    send_window: SendWindow::new(INITIAL_STREAM_WINDOW),
                    recv_window,
                },
                user,
                sending,
                receives_stream,
            },
        );
        Ok(CallId(id))
    }

    /// Sends one message on a call's request stream; with `end`, it is the last one
    /// (half-close). Nothing is queued on error:
    ///
    /// - [`SendError::NoCredit`]: a flow-control window is used up; a
    ///   [`ClientEvent::Writable`] for this call follows once credit is back.
    /// - [`SendError::CallGone`]: the call has finished or been cancelled.
    /// - [`SendError::TooLarge`]: the message would exceed `max_frame_len`.
    /// - [`SendError::SendClosed`]: the call's request stream already ended (or the call
    ///   does not stream requests).
    pub fn send_message<'m>(
        &mut self,
        id: CallId,
        body: impl Into<Payload<'m>>,
        end: bool,
    ) -> Result<(), SendError> {
        let flags = if end { flags::END_STREAM } else { 0 };
        self.send_on(id, end, |link, window, codec| {
            link.send_message(window, id.0, codec, flags, body.into())
        })
    }

    /// Sends the messages at the front of `messages`, a buffer built with
    /// [`batch::push_message`](crate::batch::push_message), as far as credit goes, several
    /// to a frame, none carrying the half-close. Like [`send_message`](Self::send_message)
    /// for each; those that did not go stay in `messages`, and [`SendError::NoCredit`]
    /// means a [`ClientEvent::Writable`] follows. [`SendError::MalformedBatch`]: `messages`
    /// does not hold whole length-prefixed messages.
    pub fn send_batch(&mut self, id: CallId, messages: &mut BytesMut) -> Result<(), SendError> {
        self.send_on(id, false, |link, window, codec| {
            link.send_batch(window, id.0, codec, messages)
        })
    }

    /// Runs `send` on a call whose request stream is open (closed after it, with `end`).
    fn send_on(
        &mut self,
        id: CallId,
        end: bool,
        send: impl FnOnce(&mut Link, &mut SendWindow, u8) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        let open = |call: &mut ClientCall<T>| match call.sending {
            true => Ok(()),
            false => Err(SendError::SendClosed),
        };
        let sent = self
            .core
            .calls
            .send_on(&mut self.core.link, id.0, open, send);
        if sent.is_ok() && end {
            if let Some(call) = self.core.calls.get_mut(id.0) {
                call.sending = false;
            }
        }
        sent
    }

    /// Ends a call's request stream without a final message (half-close); needs no credit.
    /// Errors as [`send_message`](Self::send_message).
    pub fn close_send(&mut self, id: CallId) -> Result<(), SendError> {
        self.send_on(id, true, |link, _, codec| {
            link.send_end_of_messages(id.0, codec);
            Ok(())
        })
    }

    /// Gives up on a call: the server is told to drop it and no event will follow for it.
    /// Returns the call's data, or `None` if it already finished.
    pub fn cancel(&mut self, id: CallId) -> Option<T> {
        let call = self.core.calls.remove(&mut self.core.link, id.0)?;
        if !self.core.link.is_closed() {
            self.core.link.out.push_control(FrameType::Cancel, id.0);
        }
        self.after_removal();
        Some(call.user)
    }

    fn handle_call_frame(&mut self, now: Instant, frame: CallFrame) -> Result<(), ProtoError> {
        let id = frame.header.call_id;
        match frame.header.frame_type {
            FrameType::Response => {
                let Some(call) = self.core.calls.remove(&mut self.core.link, id) else {
                    return Ok(()); // late answer to a call cancelled or timed out here
                };
                // Read at or after the deadline (the driver woke late, and found the answer
                // and the expiry together): the deadline decides, whichever the driver
                // happened to look at first.
                let expired = call.core.deadline.is_some_and(|deadline| deadline <= now);
                let result = if expired {
                    Err(Status::new(
                        Code::DeadlineExceeded,
                        "no response before the deadline",
                    ))
                } else if frame.header.flags & flags::END_STREAM == 0 {
                    Err(Status::new(
                        Code::Internal,
                        "server sent a response without END_STREAM",
                    ))
                } else {
                    match ResponseHead::decode(frame.head) {
                        Ok((head, status)) => Ok(Response {
                            codec: frame.header.codec,
                            status,
                            head,
                            body: frame.body,
                        }),
                        Err(e) => Err(Status::new(Code::Internal, format!("server sent a {e}"))),
                    }
                };
                self.events.push(ClientEvent::Finished {
                    id: CallId(id),
                    user: call.user,
                    result,
                });
                self.after_removal();
            }
            FrameType::Message => {
                if frame.header.flags & flags::END_STREAM != 0 {
                    return Err(ProtoError::MalformedMessage(
                        "a server ends a call with a response, never with END_STREAM on a message",
                    ));
                }
                let batched = frame.header.flags & flags::BATCH != 0;
                // A batch's length prefixes are the protocol's, not the application's:
                // they count against the windows with the messages and go back at once.
                let prefixes = if batched {
                    batch::count(&frame.body)? * batch::LENGTH_PREFIX
                } else {
                    0
                };
                let len = frame.body.len();
                self.core.link.receive_message(len)?;
                match self.core.calls.get_mut(id) {
                    // A late message for a call that ended here: its credit goes straight back.
                    None => self.core.link.release(len as u64),
                    Some(call) if call.receives_stream => {
                        if !call.core.recv_window.receive(len) {
                            return Err(ProtoError::FlowControl { call_id: id });
                        }
                        self.events
                            .push_messages(CallId(id), frame.body, batched, true);
                        if prefixes > 0 {
                            let core = &mut self.core;
                            core.calls.release(&mut core.link, id, prefixes);
                        }
                    }
                    // The server streams a method this client calls as unary: the two
                    // disagree about this method, not about the connection. Fail the call.
                    Some(_) => {
                        let core = &mut self.core;
                        let call = core
                            .calls
                            .remove(&mut core.link, id)
                            .expect("call looked up above");
                        self.core.link.release(len as u64);
                        self.core.link.out.push_control(FrameType::Cancel, id);
                        self.events.push(ClientEvent::Finished {
                            id: CallId(id),
                            user: call.user,
                            result: Err(Status::new(
                                Code::Internal,
                                "server sent a message stream to a call expecting one response",
                            )),
                        });
                        self.after_removal();
                    }
                }
            }
            // Reserved in this direction.
            FrameType::Cancel => {}
            other => return Err(ProtoError::UnexpectedFrame(other)),
        }
        Ok(())
    }

    /// The next event for the driver, if any; poll after every input.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent<T>> {
        self.events.pop()
    }

    /// Starts a graceful close: no new calls; the connection closes once the server has
    /// acknowledged and every call in flight has finished.
    pub fn go_away(&mut self) {
        if !self.core.link.is_closed() && !self.core.link.goaway_sent() {
            self.core.link.send_goaway(&Status::ok());
            self.check_drained();
        }
    }

    /// The data of a call in flight.
    pub fn user(&self, id: CallId) -> Option<&T> {
        self.core.calls.get(id.0).map(|c| &c.user)
    }

    /// Whether new calls can start: not closed and no go-away sent or received.
    pub fn is_accepting_calls(&self) -> bool {
        self.core.link.is_open()
    }

    fn after_removal(&mut self) {
        self.core.calls.prune();
        self.check_drained();
    }

    fn check_drained(&mut self) {
        if !self.core.link.is_closed()
            && self.core.link.is_draining_done(!self.core.calls.is_empty())
        {
            self.close(CloseReason::Drained);
        }
    }
}

impl<T> Side for ClientConn<T> {
    type Call = ClientCall<T>;

    fn core(&mut self) -> &mut Core<ClientCall<T>> {
        &mut self.core
    }

    fn core_ref(&self) -> &Core<ClientCall<T>> {
        &self.core
    }

    fn on_call_frame(&mut self, now: Instant, frame: CallFrame) -> Result<(), ProtoError> {
        self.handle_call_frame(now, frame)
    }

    fn on_credit(&mut self, id: u32, increment: u32) -> Result<(), ProtoError> {
        let events = &mut self.events;
        self.core.calls.credit(
            &self.core.link,
            id,
            increment,
            |_| None,
            |id| events.push(ClientEvent::Writable { id: CallId(id) }),
        )
    }

    fn on_go_away(&mut self, status: Status) {
        if status.code() == Code::ResourceExhausted {
            self.refusal = Some(status.clone());
        }
        self.events.push(ClientEvent::GoAway(status));
        self.check_drained();
    }

    fn close(&mut self, reason: CloseReason) {
        let status = match (&reason, &self.refusal) {
            (CloseReason::PeerClosed, Some(refusal)) => refusal.clone(),
            _ => reason.status(),
        };
        self.core.link.close(reason.clone());
        for (id, call) in self.core.calls.drain() {
            self.events.push(ClientEvent::Finished {
                id: CallId(id),
                user: call.user,
                result: Err(status.clone()),
            });
        }
        self.events.push(ClientEvent::Closed(reason));
    }
}

impl<T> crate::Conn for ClientConn<T> {
    /// Fails every call whose deadline is at or before `now`, and runs keepalive.
    fn handle_timeout(&mut self, now: Instant) {
        if self.core.link.is_closed() {
            return;
        }
        while let Some((id, call)) = self.core.calls.pop_expired(&mut self.core.link, now) {
            // No CANCEL: the server holds its own copy of the deadline, which ends the call
            // there too (as DEADLINE_EXCEEDED, not as a cancel that raced it), and a CANCEL
            // sent now would reach it no sooner.
            self.events.push(ClientEvent::Finished {
                id: CallId(id),
                user: call.user,
                result: Err(Status::new(
                    Code::DeadlineExceeded,
                    "no response before the deadline",
                )),
            });
        }
        self.after_removal();
        if let Err(e) = self.core.link.handle_keepalive(now) {
            self.close(CloseReason::Error(e));
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.core.link.poll_timeout(self.core.calls.next_deadline())
    }

    fn calls_in_flight(&self) -> usize {
        self.core.calls.len()
    }

    fn is_idle(&self) -> bool {
        self.core.calls.is_empty()
    }

    fn shrink_to_fit(&mut self) {
        self.core.shrink_to_fit();
        self.events.shrink_to_fit();
    }
}
