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

use bytes::BytesMut;
use futures::channel::mpsc;
use futures::future::{AbortHandle, Abortable};
use futures::{FutureExt, Stream, StreamExt};
use gorpc_proto::{CallId, Code, ConnConfig, ServerConn, ServerEvent, Status};

use crate::io::{reserve_for_read, WriteQueue};
use crate::runtime::{Io, Runtime, Sleep};
use crate::service::{ServerReply, ServerRequest, Service};

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

pub(crate) struct ServerConnection<R: Runtime> {
    runtime: R,
    io: R::Io,
    conn: ServerConn,
    read_buf: BytesMut,
    write_queue: WriteQueue,
    sleep: R::Sleep,
    armed: Option<Instant>,
    service: Arc<dyn Service>,
    peer: SocketAddr,
    replies_tx: mpsc::UnboundedSender<(CallId, ServerReply)>,
    replies_rx: mpsc::UnboundedReceiver<(CallId, ServerReply)>,
    /// Handlers that did not finish when first polled, running as their own tasks.
    running: HashMap<CallId, AbortHandle>,
    drain_signal: SignalRx,
    abort_signal: SignalRx,
    draining: bool,
    read_closed: bool,
    /// Set once the core closed: flush, shut the socket, stop.
    closing: bool,
    /// The grace period ended: stop without flushing.
    aborted: bool,
}

impl<R: Runtime> ServerConnection<R> {
    pub(crate) fn new(
        runtime: R,
        io: R::Io,
        peer: SocketAddr,
        config: ConnConfig,
        service: Arc<dyn Service>,
        signals: Signals,
    ) -> Self {
        let now = Instant::now();
        let (replies_tx, replies_rx) = mpsc::unbounded();
        ServerConnection {
            sleep: runtime.sleep_until(now),
            runtime,
            io,
            conn: ServerConn::new(config, now, fastrand::u64(..)),
            read_buf: BytesMut::new(),
            write_queue: WriteQueue::default(),
            armed: None,
            service,
            peer,
            replies_tx,
            replies_rx,
            running: HashMap::new(),
            drain_signal: Box::pin(signals.drain),
            abort_signal: Box::pin(signals.abort),
            draining: false,
            read_closed: false,
            closing: false,
            aborted: false,
        }
    }

    /// Turns the connection away: a go-away naming why, then close.
    pub(crate) fn refuse(&mut self, status: Status) {
        self.conn.refuse(status);
    }

    /// One pass over every source of work. Returns whether anything happened.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> bool {
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
            self.respond(id, reply);
            progress = true;
        }

        if !self.read_closed && !self.closing && self.conn.wants_read() {
            reserve_for_read(&mut self.read_buf);
            match self.io.poll_read_buf(cx, &mut self.read_buf) {
                Poll::Ready(Ok(0)) => {
                    self.read_closed = true;
                    self.conn.handle_eof();
                    progress = true;
                }
                Poll::Ready(Ok(_)) => {
                    // A protocol error is reported as a Closed event below.
                    let _ = self.conn.handle_read(Instant::now(), &mut self.read_buf);
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    self.read_closed = true;
                    self.conn
                        .abort(Status::new(Code::Unavailable, format!("read failed: {e}")));
                    progress = true;
                }
                Poll::Pending => {}
            }
        }

        while let Some(event) = self.conn.poll_event() {
            progress = true;
            match event {
                ServerEvent::Request(request) => self.dispatch(cx, request),
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

        if let Some(at) = self.conn.poll_timeout() {
            let now = Instant::now();
            if at <= now {
                self.conn.handle_timeout(now);
                progress = true;
            } else {
                if self.armed != Some(at) {
                    self.sleep.reset(at);
                    self.armed = Some(at);
                }
                if Pin::new(&mut self.sleep).poll(cx).is_ready() {
                    self.armed = None;
                    self.conn.handle_timeout(Instant::now());
                    progress = true;
                }
            }
        }

        while let Some(chunk) = self.conn.poll_transmit() {
            self.write_queue.push(chunk);
        }
        match self.write_queue.poll_write(&mut self.io, cx) {
            Poll::Ready(Ok(())) | Poll::Pending => {}
            Poll::Ready(Err(e)) => {
                if !self.closing {
                    self.conn
                        .abort(Status::new(Code::Unavailable, format!("write failed: {e}")));
                    progress = true;
                } else {
                    self.write_queue = WriteQueue::default();
                }
            }
        }
        progress
    }

    /// Runs the handler inline once; only a handler that has to wait gets a task of its own.
    fn dispatch(&mut self, cx: &mut Context<'_>, request: gorpc_proto::Request) {
        let id = request.id;
        let request = ServerRequest {
            head: request.head,
            codec: request.codec,
            body: request.body,
            deadline: request.deadline,
            peer: Some(self.peer),
        };
        let mut future =
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.service.call(request))) {
                Ok(future) => future,
                Err(_) => return self.respond(id, panicked()),
            };
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll_unpin(cx))) {
            Ok(Poll::Ready(reply)) => self.respond(id, reply),
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
            Err(_) => self.respond(id, panicked()),
        }
    }

    fn respond(&mut self, id: CallId, reply: ServerReply) {
        let ServerReply {
            status,
            metadata,
            body,
        } = reply;
        self.conn
            .respond(Instant::now(), id, &status, metadata.iter(), body);
    }
}

fn panicked() -> ServerReply {
    ServerReply::error(Status::new(Code::Internal, "handler panicked"))
}

impl<R: Runtime> Future for ServerConnection<R> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Bound the work per wake-up so other tasks on this thread get their turn; a pass
        // that still made progress may have left a source unregistered, so ask to be polled
        // again.
        let mut budget = 64;
        while this.poll_once(cx) {
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
        }
        if this.aborted {
            return Poll::Ready(());
        }
        if this.closing && this.write_queue.is_empty() {
            // Best effort: the peer learns of the close from EOF either way.
            let _ = this.io.poll_shutdown(cx);
            return Poll::Ready(());
        }
        if this.closing && this.read_closed {
            // Nobody is listening; do not wait on a write that cannot drain.
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
