//! Drives one server connection: bytes between the socket and a [`ServerConn`], requests to
//! the service, replies back.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{AbortHandle, Abortable};
use futures::FutureExt;
use gorpc_proto::Conn as _;
use gorpc_proto::{
    CallId, CancelReason, Code, ConnConfig, SendError, ServerConn, ServerEvent, Status, StreamKind,
};
use tracing::Instrument as _;

use crate::io::{drive, earliest, Transport};
use crate::observe::{answered, CallEnd, CallWatch, MethodSlots};
use crate::runtime::{Io, PeerCertificates, Runtime};
use crate::service::{CallStreams, ServerReply, ServerRequest};
use crate::stream::handoff::{
    hold_write, unsendable, Delivering, Fed, Inbox, InboxReader, Outbox, OutboxDrain, OutboxSender,
    StreamControl,
};
use crate::stream::{RawRequestStream, RawResponseSink};
use crate::{mailbox, CallMap};

use super::idle::IdleSlot;
use super::stop::SignalRx;
use super::Served;

/// What handlers tell their connection's driver.
enum HandlerOutput {
    Reply(CallId, ServerReply),
    /// A stream call's outbox has new messages.
    Ready(CallId),
    /// Bytes of a client stream the handler has consumed.
    Release(CallId, usize),
}

/// A handler's way back to its connection's driver.
struct HandlerOut(mailbox::Sender<HandlerOutput>);

impl StreamControl for HandlerOut {
    fn ready(&self, id: CallId) -> bool {
        self.0.send(HandlerOutput::Ready(id)).is_ok()
    }

    fn release(&self, id: CallId, bytes: usize) {
        let _ = self.0.send(HandlerOutput::Release(id, bytes));
    }
}

/// A call from its dispatch until it is answered, cancelled or cut off.
struct Running {
    /// Stops the handler's task; `None` once the handler finished, or while it runs inline.
    abort: Option<AbortHandle>,
    watch: CallWatch,
}

/// The driver's side of one running stream call.
struct ServerStream {
    /// The response messages the handler queued.
    outbox: Arc<Outbox>,
    /// Those taken and not yet accepted by the core.
    drain: OutboxDrain,
    /// Where the client's messages go until it half-closes.
    incoming: Option<Arc<Inbox<()>>>,
    /// The handler's reply, held until every message before it is in the core.
    reply: Option<ServerReply>,
}

impl Drop for ServerStream {
    /// The call ended: the handler's sends fail from now on, its reading ends.
    fn drop(&mut self) {
        self.outbox.end();
        if let Some(incoming) = &self.incoming {
            incoming.close();
        }
    }
}

/// How long a closed connection (refused, drained, or broken by its client) keeps reading
/// and dropping what the client sends, so that the client reads every last frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Unsent response bytes past which a connection stops reading requests.
const MAX_WRITE_BACKLOG: usize = 1 << 20;

/// Signals from the server to its connections. Each is a channel that is closed, never
/// sent on: closing wakes every receiver at once.
#[derive(Clone, Debug)]
pub(crate) struct Signals {
    /// Closed when the server starts a graceful shutdown.
    pub(crate) drain: async_channel::Receiver<()>,
    /// Closed when the grace period is over: connections drop what is left.
    pub(crate) abort: async_channel::Receiver<()>,
    /// What health checks report.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) serving: Arc<super::Serving>,
    /// This connection's place in the server's idle table: where it says when it went
    /// idle, and hears that it should go to make room for a new one.
    pub(crate) idle: Arc<IdleSlot>,
    /// The server's `idle_timeout`.
    pub(crate) idle_timeout: Option<Duration>,
}

/// Drives one accepted connection over `I`: the runtime's socket, or a TLS session over it.
pub(crate) struct ServerConnection<R: Runtime, I: Io = <R as Runtime>::Io> {
    runtime: R,
    transport: Transport<R, I>,
    conn: ServerConn,
    served: Arc<Served>,
    /// The metrics slots of the methods this connection's calls named.
    method_slots: MethodSlots,
    peer: SocketAddr,
    /// Read from the socket once (after any TLS handshake) and shared by every request.
    peer_certificates: Option<PeerCertificates>,
    outputs_tx: mailbox::Sender<HandlerOutput>,
    outputs_rx: mailbox::Receiver<HandlerOutput>,
    /// What handlers sent, taken from `outputs_rx` in one batch.
    outputs: Vec<HandlerOutput>,
    /// The same channel, shared by every stream half of this connection.
    handler_out: Arc<HandlerOut>,
    /// Calls not yet answered: those whose handler did not finish when first polled (it
    /// runs as its own task), and stream calls.
    running: CallMap<Running>,
    /// Stream calls running.
    streams: CallMap<ServerStream>,
    /// Client-stream messages read for one call, delivered together.
    delivering: Delivering,
    /// This pass made room for a handler that filled its outbox.
    refilling: bool,
    drain_signal: SignalRx,
    abort_signal: SignalRx,
    draining: bool,
    idle: Arc<IdleSlot>,
    idle_timeout: Option<Duration>,
    /// A refused connection reads and drops until then, once its go-away is written.
    linger_until: Option<Instant>,
    /// The write side is shut.
    finished: bool,
    /// When the last call ended, while none is in flight.
    idle_since: Option<Instant>,
    /// Set once the core closed: flush, shut the socket, stop.
    closing: bool,
    /// The grace period ended: stop without flushing.
    aborted: bool,
}

impl<R: Runtime, I: Io> ServerConnection<R, I> {
    /// `io` must have finished any handshake: the peer's identity is read from it here.
    pub(crate) fn new(
        runtime: R,
        io: I,
        peer: SocketAddr,
        config: ConnConfig,
        served: Arc<Served>,
        signals: Signals,
    ) -> Self {
        let now = Instant::now();
        let (outputs_tx, outputs_rx) = mailbox::mailbox();
        ServerConnection {
            peer_certificates: io.peer_certificates(),
            transport: Transport::new(&runtime, io),
            runtime,
            conn: ServerConn::new(config, now, fastrand::u64(..)),
            served,
            method_slots: MethodSlots::default(),
            peer,
            handler_out: Arc::new(HandlerOut(outputs_tx.clone())),
            outputs_tx,
            outputs_rx,
            outputs: Vec::new(),
            running: CallMap::default(),
            streams: CallMap::default(),
            delivering: Delivering::default(),
            refilling: false,
            drain_signal: SignalRx::new(&signals.drain),
            abort_signal: SignalRx::new(&signals.abort),
            draining: false,
            idle: signals.idle,
            idle_timeout: signals.idle_timeout,
            linger_until: None,
            finished: false,
            // Idle from the start, as its slot in the idle table says.
            idle_since: Some(now),
            closing: false,
            aborted: false,
        }
    }

    /// Hands the driver the bytes read before it took the connection (see
    /// `crate::http::serve_sniffed`); their requests are served on the first poll.
    #[cfg(feature = "http")]
    pub(crate) fn feed_read(&mut self, bytes: bytes::BytesMut) {
        self.transport
            .feed_read(&mut self.conn, Instant::now(), bytes);
    }

    /// Turns the connection away: a go-away naming why, then close, reading what the
    /// client sent meanwhile for up to a second so that it gets to read why.
    pub(crate) fn refuse(&mut self, status: Status) {
        self.conn.refuse(status);
    }

    /// One pass over every source of work. Returns whether anything happened.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> bool {
        // One clock reading per pass: calls handled in the same pass share it.
        let now = Instant::now();
        let mut progress = false;
        if !self.aborted && self.abort_signal.poll_given(cx) {
            self.aborted = true;
            self.conn
                .abort(Status::new(Code::Unavailable, "server shut down"));
            progress = true;
        }
        if !self.closing && !self.draining && self.drain_signal.poll_given(cx) {
            self.draining = true;
            self.conn.go_away();
            progress = true;
        }

        let mut outputs = std::mem::take(&mut self.outputs);
        if self.outputs_rx.poll_take(cx, &mut outputs).is_ready() {
            progress = true;
        }
        for output in outputs.drain(..) {
            match output {
                HandlerOutput::Reply(id, reply) => {
                    if let Some(running) = self.running.get_mut(&id) {
                        running.abort = None; // the handler is done
                    }
                    self.finish(now, id, reply);
                }
                HandlerOutput::Ready(id) => self.feed_stream(now, id),
                HandlerOutput::Release(id, bytes) => self.conn.release(id, bytes),
            }
        }
        self.outputs = outputs;

        // Stop reading at the concurrency limit (the core says so) and while answers pile up
        // unsent (the client is not reading): TCP then pushes back on the client.
        let read_held = self.transport.write_backlog() >= MAX_WRITE_BACKLOG;
        if self.conn.wants_read() && !read_held {
            progress |= self.transport.poll_read(cx, &mut self.conn, now);
        }

        while let Some(event) = self.conn.poll_event() {
            progress = true;
            if !matches!(event, ServerEvent::Message { .. }) {
                // Whatever else happened comes after the messages read before it.
                self.deliver();
            }
            match event {
                ServerEvent::Request(request) => self.dispatch(cx, now, request),
                ServerEvent::Message { id, body } => {
                    if let Some(running) = self.running.get(&id) {
                        self.served
                            .observer
                            .request_bytes(&running.watch, body.len());
                    }
                    if !self.delivering.joins(id) {
                        self.deliver();
                    }
                    self.delivering.push(id, body);
                }
                ServerEvent::HalfClosed { id } => {
                    // The reader takes what was delivered, then the stream ends.
                    if let Some(inbox) = self.streams.get_mut(&id).and_then(|s| s.incoming.take()) {
                        inbox.end(());
                    }
                }
                ServerEvent::Writable { id } => self.feed_stream(now, id),
                ServerEvent::Cancelled { id, reason } => {
                    self.streams.remove(&id);
                    let end = match reason {
                        CancelReason::Peer => CallEnd::Cancelled,
                        CancelReason::DeadlineExceeded => CallEnd::DeadlineExceeded,
                        _ => CallEnd::Cancelled,
                    };
                    if let Some(running) = self.running.remove(&id) {
                        self.stop(running, end);
                    }
                }
                ServerEvent::GoAway(_) => {}
                ServerEvent::Closed(reason) => {
                    tracing::debug!(peer = %self.peer, ?reason, "connection closed");
                    self.closing = true;
                    if self.linger_until.is_none() {
                        // The client may still be sending: a window update or a ping after
                        // a drain, the rest of what broke the protocol. Closing with bytes
                        // unread makes the kernel reset the connection and drop what is
                        // not yet sent (the last answers, the go-away saying why), so read
                        // until the client's EOF instead.
                        self.linger_until = Some(now + CLOSE_LINGER);
                    }
                    self.streams.clear();
                    for (_, running) in std::mem::take(&mut self.running) {
                        self.stop(running, CallEnd::ConnectionLost);
                    }
                }
                // Events a later core adds are ignored until this driver learns them.
                _ => {}
            }
        }
        self.deliver();

        let idle_deadline = self.track_idle(now);
        if idle_deadline.is_some_and(|at| at <= now)
            || (self.can_go() && self.idle.poll_evicted(cx))
        {
            // Idle too long, or the longest idle when a new connection needed room.
            tracing::debug!(peer = %self.peer, "closing an idle connection");
            self.draining = true;
            self.conn.go_away();
            progress = true;
        }

        let (released, release_at) = self.transport.release_when_idle(&mut self.conn, now);
        if released {
            self.running.shrink_to_fit();
            self.streams.shrink_to_fit();
            self.delivering.shrink_to_fit();
            self.outputs = Vec::new();
            self.outputs_rx.shrink_to_fit();
        }
        let next = earliest(
            earliest(self.conn.poll_timeout(), release_at),
            idle_deadline.filter(|_| self.can_go()),
        );
        if self.transport.poll_timer(cx, next, now) {
            self.conn.handle_timeout(now);
            progress = true;
        }

        let waiting = self.conn.transmit_len() + self.transport.write_backlog();
        if hold_write(std::mem::take(&mut self.refilling), waiting) && !self.closing {
            cx.waker().wake_by_ref();
            return false;
        }
        progress |= self.transport.poll_write(cx, &mut self.conn);
        // The socket's readiness went to a pass that held its read back: once the backlog is
        // under the limit, pass again to read, or bytes that arrived meanwhile sit unread
        // with nothing left to wake the connection.
        progress || (read_held && self.transport.write_backlog() < MAX_WRITE_BACKLOG)
    }

    /// Whether the connection is still open to calls, so that going idle can close it.
    fn can_go(&self) -> bool {
        !self.draining && !self.closing
    }

    /// Notes whether calls are in flight, in this connection and in the server's idle
    /// table (only when that changes); when the idle timeout would close the connection.
    fn track_idle(&mut self, now: Instant) -> Option<Instant> {
        if self.conn.calls_in_flight() > 0 {
            if self.idle_since.take().is_some() {
                self.idle.set_busy();
            }
            return None;
        }
        let since = *self.idle_since.get_or_insert_with(|| {
            self.idle.set_idle(now);
            now
        });
        self.idle_timeout
            .filter(|_| self.can_go())
            .and_then(|limit| since.checked_add(limit))
    }

    /// Runs the handler inline once; only a handler that has to wait gets a task of its own.
    fn dispatch(&mut self, cx: &mut Context<'_>, now: Instant, request: gorpc_proto::Request) {
        // Busy before the handler runs, so that the server never picks this connection as
        // idle while its call is in flight.
        if self.idle_since.take().is_some() {
            self.idle.set_busy();
        }
        let id = request.id;
        let served = self.served.clone();
        // Read once: the path is checked as UTF-8 on every read.
        let method = request.head.method();
        let cached = Some(&mut self.method_slots);
        let call_id = Some(u64::from(id.as_u32()));
        let watch = served.watch(&request.head, method, cached, self.peer, call_id, now);
        served.observer.request_bytes(&watch, request.body.len());
        let kind = served.service.stream_kind(method);
        let streams = match (kind, request.client_streams) {
            (None, false) => CallStreams::default(),
            (Some(kind), client_streams) if kind.client_streams() == client_streams => {
                self.open_stream(id, kind)
            }
            (kind, _) => {
                let status = Status::new(
                    Code::Unimplemented,
                    format!(
                        "{} is {}; the call was framed {}",
                        method,
                        kind.map_or("not a client-streaming method", describe_kind),
                        if request.client_streams {
                            "with a client stream"
                        } else {
                            "with one request message"
                        },
                    ),
                );
                self.conn
                    .respond(now, id, &status, std::iter::empty(), Bytes::new());
                return served
                    .observer
                    .end(&watch, CallEnd::Refused(status.code()), Some(&status));
            }
        };
        let is_stream = kind.is_some();
        let request = ServerRequest {
            streams,
            head: request.head,
            edited: None,
            codec: request.codec,
            body: request.body,
            deadline: request.deadline,
            peer: Some(self.peer),
            peer_certificates: self.peer_certificates.clone(),
        };
        let polled = served.call_inline(request, &watch.span, cx);
        let (future, reply) = match polled {
            Ok((_, Poll::Ready(reply))) => (None, reply),
            Ok((future, Poll::Pending)) => (Some(future), ServerReply::ok(Bytes::new())),
            Err(_) => (None, panicked()),
        };
        let Some(future) = future else {
            if is_stream {
                // Its handler may have queued messages on the mailbox before finishing:
                // the reply goes behind them.
                let _ = self.outputs_tx.send(HandlerOutput::Reply(id, reply));
                self.running.insert(id, Running { abort: None, watch });
            } else {
                self.send_reply(now, id, reply, Some(watch));
            }
            return;
        };
        let (handle, registration) = AbortHandle::new_pair();
        let outputs = self.outputs_tx.clone();
        let task = Abortable::new(AssertUnwindSafe(future).catch_unwind(), registration);
        self.runtime.spawn(
            async move {
                if let Ok(result) = task.await {
                    let reply = result.unwrap_or_else(|_| panicked());
                    let _ = outputs.send(HandlerOutput::Reply(id, reply));
                }
            }
            .instrument(watch.span.clone()),
        );
        let abort = Some(handle);
        self.running.insert(id, Running { abort, watch });
    }

    /// Stops a call that ends unanswered: its handler is dropped, its end reported.
    fn stop(&mut self, running: Running, end: CallEnd) {
        if let Some(handle) = running.abort {
            handle.abort();
        }
        self.served.observer.end(&running.watch, end, None);
    }

    /// The halves a stream call's handler gets, and the driver's side of them.
    fn open_stream(&mut self, id: CallId, kind: StreamKind) -> CallStreams {
        let outbox = Arc::new(Outbox::new(Some(id)));
        let (incoming, requests) = if kind.client_streams() {
            let inbox = Arc::new(Inbox::default());
            let stream = RawRequestStream {
                id,
                reader: InboxReader::new(inbox.clone()),
                control: self.handler_out.clone(),
                done: false,
            };
            (Some(inbox), Some(stream))
        } else {
            (None, None)
        };
        let responses = kind.server_streams().then(|| RawResponseSink {
            sender: OutboxSender {
                outbox: outbox.clone(),
                control: self.handler_out.clone(),
            },
        });
        self.streams.insert(
            id,
            ServerStream {
                outbox,
                drain: OutboxDrain::default(),
                incoming,
                reply: None,
            },
        );
        CallStreams {
            requests,
            responses,
        }
    }

    /// Hands the client-stream messages gathered for one call to its handler.
    fn deliver(&mut self) {
        let streams = &self.streams;
        // A refused call's, or one whose handler dropped its stream.
        if let Some((id, len)) = self
            .delivering
            .deliver(|id| streams.get(&id).and_then(|s| s.incoming.as_deref()))
        {
            self.conn.release(id, len);
        }
    }

    /// Moves a stream call's queued messages into the core as far as its credit goes, and
    /// answers the call once its handler's reply has nothing left ahead of it.
    fn feed_stream(&mut self, now: Instant, id: CallId) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return; // the call ended; its handler learns at its next send
        };
        let conn = &mut self.conn;
        let mut sent = 0;
        let fed = stream.drain.feed(&stream.outbox, |messages| {
            let before = messages.len();
            let result = conn.send_batch(id, messages);
            sent = before - messages.len();
            result
        });
        self.refilling |= stream.drain.made_room();
        if let Some(running) = self.running.get(&id).filter(|_| sent > 0) {
            self.served.observer.response_bytes(&running.watch, sent);
        }
        match fed {
            Ok(Fed::Blocked) => {} // the rest goes at the call's `Writable`
            Ok(Fed::Idle | Fed::CloseSend) => {
                if let Some(reply) = stream.reply.take() {
                    self.streams.remove(&id);
                    self.respond(now, id, reply);
                }
            }
            Err(e @ (SendError::TooLarge | SendError::MalformedBatch)) => {
                if let Some(handle) = self.running.get_mut(&id).and_then(|r| r.abort.take()) {
                    handle.abort();
                }
                self.streams.remove(&id);
                self.respond(now, id, ServerReply::error(unsendable("response", e)));
            }
            // The call is gone from the core; its end comes as an event.
            Err(_) => {
                stream.outbox.end();
            }
        }
    }

    /// Ends a call with `reply`; a stream call once every message its handler queued
    /// before returning is in the core. Messages sent after that are refused.
    fn finish(&mut self, now: Instant, id: CallId, mut reply: ServerReply) {
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.outbox.end();
            reply.metadata.append_all(stream.outbox.take_trailers());
            stream.reply = Some(reply);
            return self.feed_stream(now, id);
        }
        self.respond(now, id, reply);
    }

    /// Answers a running call, which ends with the answer.
    fn respond(&mut self, now: Instant, id: CallId, reply: ServerReply) {
        let watch = self.running.remove(&id).map(|running| running.watch);
        self.send_reply(now, id, reply, watch);
    }

    fn send_reply(
        &mut self,
        now: Instant,
        id: CallId,
        reply: ServerReply,
        watch: Option<CallWatch>,
    ) {
        let ServerReply {
            status,
            metadata,
            body,
        } = reply;
        let observer = &self.served.observer;
        if let Some(watch) = &watch {
            observer.response_bytes(watch, body.len());
        }
        self.conn.respond(now, id, &status, metadata.iter(), body);
        if let Some(watch) = watch {
            observer.end(&watch, answered(&status), Some(&status));
        }
    }
}

fn describe_kind(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::ServerStreaming => "a server-streaming method",
        StreamKind::ClientStreaming => "a client-streaming method",
        StreamKind::Bidirectional => "a bidirectional method",
    }
}

fn panicked() -> ServerReply {
    ServerReply::error(Status::new(Code::Internal, "handler panicked"))
}

impl<R: Runtime, I: Io> Future for ServerConnection<R, I> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        drive(cx, |cx| this.poll_once(cx));
        if this.aborted {
            return Poll::Ready(());
        }
        if this.closing && !this.finished {
            this.finished = this.transport.poll_finish(cx);
        }
        if this.finished {
            match this.linger_until {
                Some(until) if !this.transport.poll_linger(cx, until) => {}
                _ => return Poll::Ready(()),
            }
        }
        Poll::Pending
    }
}
