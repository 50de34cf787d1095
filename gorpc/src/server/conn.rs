//! Drives one server connection: bytes between the socket and a [`ServerConn`], requests to
//! the service, replies back.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::channel::mpsc;
use futures::future::{AbortHandle, Abortable};
use futures::{FutureExt, Stream, StreamExt};
use gorpc_proto::{CallId, Code, ConnConfig, ServerConn, ServerEvent, Status};

use crate::io::{drive, Transport};
use crate::runtime::{Io, PeerCertificates, Runtime};
use crate::service::{ServerReply, ServerRequest, Service};

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
}

/// A signal channel as one connection polls it.
pub(crate) type SignalRx = Pin<Box<async_channel::Receiver<()>>>;

/// Whether a signal channel has been closed; registers for wake-up otherwise.
pub(crate) fn poll_closed(rx: &mut SignalRx, cx: &mut Context<'_>) -> bool {
    rx.as_mut().poll_next(cx).is_ready()
}

/// Drives one accepted connection over `I`: the runtime's socket, or a TLS session over it.
pub(crate) struct ServerConnection<R: Runtime, I: Io = <R as Runtime>::Io> {
    runtime: R,
    transport: Transport<R, I>,
    conn: ServerConn,
    service: Arc<dyn Service>,
    peer: SocketAddr,
    /// Read from the socket once (after any TLS handshake) and shared by every request.
    peer_certificates: Option<PeerCertificates>,
    replies_tx: mpsc::UnboundedSender<(CallId, ServerReply)>,
    replies_rx: mpsc::UnboundedReceiver<(CallId, ServerReply)>,
    /// Handlers that did not finish when first polled, running as their own tasks.
    running: HashMap<CallId, AbortHandle>,
    drain_signal: SignalRx,
    abort_signal: SignalRx,
    draining: bool,
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
        service: Arc<dyn Service>,
        signals: Signals,
    ) -> Self {
        let now = Instant::now();
        let (replies_tx, replies_rx) = mpsc::unbounded();
        ServerConnection {
            peer_certificates: io.peer_certificates(),
            transport: Transport::new(&runtime, io),
            runtime,
            conn: ServerConn::new(config, now, fastrand::u64(..)),
            service,
            peer,
            replies_tx,
            replies_rx,
            running: HashMap::new(),
            drain_signal: Box::pin(signals.drain),
            abort_signal: Box::pin(signals.abort),
            draining: false,
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

    /// Turns the connection away: a go-away naming why, then close.
    pub(crate) fn refuse(&mut self, status: Status) {
        self.conn.refuse(status);
    }

    /// One pass over every source of work. Returns whether anything happened.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> bool {
        // One clock reading per pass: calls handled in the same pass share it.
        let now = Instant::now();
        let mut progress = false;
        if !self.aborted && poll_closed(&mut self.abort_signal, cx) {
            self.aborted = true;
            self.conn
                .abort(Status::new(Code::Unavailable, "server shut down"));
            progress = true;
        }
        if !self.closing && !self.draining && poll_closed(&mut self.drain_signal, cx) {
            self.draining = true;
            self.conn.go_away();
            progress = true;
        }

        while let Poll::Ready(Some((id, reply))) = self.replies_rx.poll_next_unpin(cx) {
            self.running.remove(&id);
            self.respond(now, id, reply);
            progress = true;
        }

        // Stop reading at the concurrency limit (the core says so) and while answers pile up
        // unsent (the client is not reading): TCP then pushes back on the client.
        if self.conn.wants_read() && self.transport.write_backlog() < MAX_WRITE_BACKLOG {
            progress |= self.transport.poll_read(cx, &mut self.conn, now);
        }

        while let Some(event) = self.conn.poll_event() {
            progress = true;
            match event {
                ServerEvent::Request(request) if request.client_streams => {
                    let status = Status::new(
                        Code::Unimplemented,
                        "streaming calls are not served by this server yet",
                    );
                    self.respond(now, request.id, ServerReply::error(status));
                }
                ServerEvent::Request(request) => self.dispatch(cx, now, request),
                // Messages of a refused client stream (racing the refusal, or queued while
                // it waited for a slot): give the credit back so the connection window
                // never shrinks.
                ServerEvent::Message { id, body } => self.conn.release(id, body.len()),
                ServerEvent::HalfClosed { .. } | ServerEvent::Writable { .. } => {}
                ServerEvent::Cancelled { id, .. } => {
                    if let Some(handle) = self.running.remove(&id) {
                        handle.abort();
                    }
                }
                ServerEvent::GoAway(_) => {}
                ServerEvent::Closed(reason) => {
                    tracing::debug!(peer = %self.peer, ?reason, "connection closed");
                    self.closing = true;
                    for (_, handle) in self.running.drain() {
                        handle.abort();
                    }
                }
            }
        }

        if self.transport.poll_timer(cx, self.conn.poll_timeout(), now) {
            self.conn.handle_timeout(now);
            progress = true;
        }

        progress |= self.transport.poll_write(cx, &mut self.conn);
        progress
    }

    /// Runs the handler inline once; only a handler that has to wait gets a task of its own.
    fn dispatch(&mut self, cx: &mut Context<'_>, now: Instant, request: gorpc_proto::Request) {
        let id = request.id;
        let request = ServerRequest {
            head: request.head,
            edited: None,
            codec: request.codec,
            body: request.body,
            deadline: request.deadline,
            peer: Some(self.peer),
            peer_certificates: self.peer_certificates.clone(),
        };
        let mut future =
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.service.call(request))) {
                Ok(future) => future,
                Err(_) => return self.respond(now, id, panicked()),
            };
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll_unpin(cx))) {
            Ok(Poll::Ready(reply)) => self.respond(now, id, reply),
            Ok(Poll::Pending) => {
                let (handle, registration) = AbortHandle::new_pair();
                let replies = self.replies_tx.clone();
                let task = Abortable::new(AssertUnwindSafe(future).catch_unwind(), registration);
                self.runtime.spawn(async move {
                    if let Ok(result) = task.await {
                        let _ = replies.unbounded_send((id, result.unwrap_or_else(|_| panicked())));
                    }
                });
                self.running.insert(id, handle);
            }
            Err(_) => self.respond(now, id, panicked()),
        }
    }

    fn respond(&mut self, now: Instant, id: CallId, reply: ServerReply) {
        let ServerReply {
            status,
            metadata,
            body,
        } = reply;
        self.conn.respond(now, id, &status, metadata.iter(), body);
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
        this.transport.release_if_idle(&this.conn, Instant::now());
        if this.aborted || (this.closing && this.transport.poll_finish(cx)) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
