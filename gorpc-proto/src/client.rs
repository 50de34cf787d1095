//! The client side of one connection.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hashbrown::HashMap;

use crate::config::ConnConfig;
use crate::error::ProtoError;
use crate::frame::{flags, FrameType};
use crate::head::{encode_request_head, ResponseHead};
use crate::link::{CloseReason, Inbound, Link};
use crate::status::{Code, Status};
use crate::timers::Deadlines;
use crate::transmit::{Oversize, Payload};
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
    pub codec: u8,
    pub status: Status,
    pub head: ResponseHead,
    pub body: Bytes,
}

/// What a [`ClientConn`] reports to its driver.
#[derive(Debug)]
pub enum ClientEvent<T> {
    /// A call ended, exactly once per started call: `Ok` with the server's response (whose
    /// status may be an error), or `Err` when it ended locally (deadline, connection lost,
    /// malformed response).
    Finished {
        id: CallId,
        user: T,
        result: Result<Response, Status>,
    },
    /// The server accepts no new calls on this connection; calls in flight still finish.
    GoAway(Status),
    /// The connection is over. Flush [`ClientConn::poll_transmit`], then close the transport.
    Closed(CloseReason),
}

/// A call that could not start; `user` is handed back.
#[derive(Debug)]
pub struct Rejected<T> {
    pub status: Status,
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
    pub fn with_deadline(self, deadline: Instant) -> Self {
        CallHead {
            deadline: Some(deadline),
            ..self
        }
    }

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
struct ClientCall<T> {
    deadline: Option<Instant>,
    user: T,
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
/// 2. write out everything [`poll_transmit`](Self::poll_transmit) returns, in order;
/// 3. re-arm the timer to [`poll_timeout`](Self::poll_timeout) and call
///    [`handle_timeout`](Self::handle_timeout) when it fires.
///
/// Feed every byte read from the transport to `handle_read`; it consumes whole frames and
/// leaves a partial one in the buffer for next time.
#[derive(Debug)]
pub struct ClientConn<T = ()> {
    link: Link,
    calls: HashMap<u32, ClientCall<T>, IdHasher>,
    next_id: u32,
    deadlines: Deadlines,
    events: VecDeque<ClientEvent<T>>,
}

impl<T> ClientConn<T> {
    pub fn new(config: ConnConfig, now: Instant) -> Self {
        ClientConn {
            link: Link::new(config, now),
            calls: HashMap::with_hasher(IdHasher::default()),
            next_id: 1,
            deadlines: Deadlines::default(),
            events: VecDeque::new(),
        }
    }

    /// Starts a call and queues its request.
    ///
    /// Fails without sending anything when the connection is closed or draining
    /// (`Unavailable`), at the concurrency limit or when the request exceeds the frame limits
    /// (`ResourceExhausted`), or when the deadline has already passed (`DeadlineExceeded`).
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
        let reject = |code, message: &'static str, user| {
            Err(Rejected {
                status: Status::new(code, message),
                user,
            })
        };
        if self.link.closed {
            return reject(Code::Unavailable, "connection closed", user);
        }
        if self.link.goaway_sent || self.link.goaway_received {
            return reject(Code::Unavailable, "connection is draining", user);
        }
        if self.calls.len() >= self.link.limits.max_concurrent_calls as usize {
            return reject(
                Code::ResourceExhausted,
                "too many calls in flight on this connection",
                user,
            );
        }
        let timeout_micros = match head.deadline {
            None => 0,
            Some(deadline) => match deadline.checked_duration_since(now) {
                Some(left) if !left.is_zero() => (left.as_micros() as u64).max(1),
                _ => {
                    return reject(
                        Code::DeadlineExceeded,
                        "deadline passed before the call started",
                        user,
                    )
                }
            },
        };
        let id = allocate_id(&mut self.next_id, &self.calls);
        let limits = self.link.limits;
        let pushed = self.link.out.push_frame(
            FrameType::Request,
            flags::END_STREAM,
            head.codec,
            id,
            |out| encode_request_head(head.method, timeout_micros, head.metadata, out),
            body.into(),
            limits.max_head_len,
            limits.max_frame_len,
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
        if let Some(deadline) = head.deadline {
            self.deadlines.push(deadline, id);
        }
        self.calls.insert(
            id,
            ClientCall {
                deadline: head.deadline,
                user,
            },
        );
        Ok(CallId(id))
    }

    /// Gives up on a call: the server is told to drop it and no event will follow for it.
    /// Returns the call's data, or `None` if it already finished.
    pub fn cancel(&mut self, id: CallId) -> Option<T> {
        let call = self.calls.remove(&id.0)?;
        if !self.link.closed {
            self.link.out.push_control(FrameType::Cancel, id.0);
        }
        self.after_removal();
        Some(call.user)
    }

    /// Consumes every whole frame at the front of `buf`.
    ///
    /// A protocol violation closes the connection (reported as [`ClientEvent::Closed`], and
    /// returned); a malformed response head fails only its own call.
    pub fn handle_read(&mut self, now: Instant, buf: &mut BytesMut) -> Result<(), ProtoError> {
        if self.link.closed {
            buf.clear();
            return Ok(());
        }
        loop {
            let inbound = match self.link.next_frame(now, buf) {
                Ok(Some(inbound)) => inbound,
                Ok(None) => break,
                Err(e) => {
                    buf.clear();
                    self.close(CloseReason::Error(e.clone()));
                    return Err(e);
                }
            };
            match inbound {
                Inbound::Call(frame) => match frame.header.frame_type {
                    FrameType::Response => {
                        let Some(call) = self.calls.remove(&frame.header.call_id) else {
                            continue; // late answer to a call cancelled or timed out here
                        };
                        let result = if frame.header.flags & flags::END_STREAM == 0 {
                            Err(Status::new(
                                Code::Internal,
                                "server opened a response stream on a unary call",
                            ))
                        } else {
                            match ResponseHead::decode(frame.head) {
                                Ok((head, status)) => Ok(Response {
                                    codec: frame.header.codec,
                                    status,
                                    head,
                                    body: frame.body,
                                }),
                                Err(e) => {
                                    Err(Status::new(Code::Internal, format!("server sent a {e}")))
                                }
                            }
                        };
                        self.events.push_back(ClientEvent::Finished {
                            id: CallId(frame.header.call_id),
                            user: call.user,
                            result,
                        });
                        self.after_removal();
                    }
                    // Reserved in this direction.
                    FrameType::Cancel => {}
                    other => {
                        let e = ProtoError::UnexpectedFrame(other);
                        buf.clear();
                        self.close(CloseReason::Error(e.clone()));
                        return Err(e);
                    }
                },
                Inbound::GoAway(status) => {
                    self.events.push_back(ClientEvent::GoAway(status));
                    self.check_drained();
                }
                Inbound::Handled => {}
            }
        }
        Ok(())
    }

    /// Fails every call whose deadline is at or before `now`, and runs keepalive.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link.closed {
            return;
        }
        while let Some((at, id)) = self.deadlines.pop_due(now) {
            if !matches!(self.calls.get(&id), Some(c) if c.deadline == Some(at)) {
                continue;
            }
            let Some(call) = self.calls.remove(&id) else {
                continue;
            };
            // Free the server's work now rather than at its own copy of the deadline.
            self.link.out.push_control(FrameType::Cancel, id);
            self.events.push_back(ClientEvent::Finished {
                id: CallId(id),
                user: call.user,
                result: Err(Status::new(
                    Code::DeadlineExceeded,
                    "no response before the deadline",
                )),
            });
        }
        self.after_removal();
        if let Err(e) = self.link.handle_keepalive(now) {
            self.close(CloseReason::Error(e));
        }
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout(self.deadlines.next())
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent<T>> {
        self.events.pop_front()
    }

    /// The next bytes to write, in order. Everything queued since the last call comes out
    /// as one chunk, except large bodies, which come out as their own chunk uncopied.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.link.out.pop()
    }

    /// Bytes queued for the transport.
    pub fn transmit_len(&self) -> usize {
        self.link.out.len()
    }

    /// Starts a graceful close: no new calls; the connection closes once the server has
    /// acknowledged and every call in flight has finished.
    pub fn go_away(&mut self) {
        if !self.link.closed && !self.link.goaway_sent {
            self.link.send_goaway(&Status::ok());
            self.check_drained();
        }
    }

    /// The peer closed its side of the byte stream.
    pub fn handle_eof(&mut self) {
        if !self.link.closed {
            self.close(CloseReason::PeerClosed);
        }
    }

    /// The driver gave up on the transport; calls in flight fail with `status`.
    pub fn abort(&mut self, status: Status) {
        if !self.link.closed {
            self.close(CloseReason::Aborted(status));
        }
    }

    /// The data of a call in flight.
    pub fn user(&self, id: CallId) -> Option<&T> {
        self.calls.get(&id.0).map(|c| &c.user)
    }

    /// Calls in flight.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    /// No call in flight.
    pub fn is_idle(&self) -> bool {
        self.calls.is_empty()
    }

    /// Whether new calls can start: not closed and no go-away sent or received.
    pub fn is_accepting_calls(&self) -> bool {
        !self.link.closed && !self.link.goaway_sent && !self.link.goaway_received
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
        if !self.link.closed && self.link.is_draining_done(!self.calls.is_empty()) {
            self.close(CloseReason::Drained);
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.link.close(&reason);
        let status = reason.status();
        for (id, call) in self.calls.drain() {
            self.events.push_back(ClientEvent::Finished {
                id: CallId(id),
                user: call.user,
                result: Err(status.clone()),
            });
        }
        self.deadlines.clear();
        self.events.push_back(ClientEvent::Closed(reason));
    }
}
