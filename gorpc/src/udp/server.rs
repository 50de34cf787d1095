//! The UDP server: one driver task owns the socket and a [`DatagramServer`], runs each
//! request's handler inline once and in a task of its own only if it has to wait, and sends
//! each answer to the request's sender.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::{AbortHandle, Abortable};
use futures::{FutureExt, StreamExt};
use gorpc_proto::datagram::{
    DatagramConfig, DatagramRequest, DatagramServer, DatagramServerStats, ReplyToken, ServerInput,
};
use gorpc_proto::{Code, Status};

use super::{recv_buf, RECV_BATCH};
use crate::interceptor::{server_listeners, ServerChain, ServerInterceptor};
use crate::io::{drive, Timer};
use crate::observe::{answered, CallEnd, CallWatch, MethodSlots};
use crate::runtime::{Runtime, UdpSocket};
use crate::server::stop::{self, SignalRx, Stopper};
use crate::server::{Served, Shutdown};
use crate::service::{ServerReply, ServerRequest, Service};
use tracing::Instrument as _;

/// Unsent answers, in bytes, past which the server stops reading requests until the socket
/// takes them: the kernel then drops new requests instead of this process buffering them.
const MAX_SEND_BACKLOG: usize = 1 << 20;

/// A UDP server that is not running yet.
pub struct UdpServer<R: Runtime> {
    runtime: R,
    service: Arc<dyn Service>,
    interceptors: Vec<Arc<dyn ServerInterceptor>>,
    config: DatagramConfig,
}

impl<R: Runtime> std::fmt::Debug for UdpServer<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> UdpServer<R> {
    /// A UDP server of `service` on `runtime`, with the default datagram settings.
    pub fn new(runtime: R, service: impl Service) -> Self {
        UdpServer {
            runtime,
            service: Arc::new(service),
            interceptors: Vec::new(),
            config: DatagramConfig::default(),
        }
    }

    /// Datagram size limit, frame limits, concurrency limit and duplicate window.
    pub fn config(mut self, config: DatagramConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds an interceptor around every call; interceptors run in the order added.
    pub fn interceptor(mut self, interceptor: impl ServerInterceptor) -> Self {
        self.interceptors.push(Arc::new(interceptor));
        self
    }

    /// Binds a UDP socket to `addr` and starts serving in the background.
    pub async fn bind(self, addr: SocketAddr) -> io::Result<UdpServerHandle<R>> {
        let socket = self.runtime.bind_udp(addr).await?;
        self.serve(socket)
    }

    /// Serves requests arriving on `socket`, in the background.
    pub fn serve(self, socket: R::UdpSocket) -> io::Result<UdpServerHandle<R>> {
        let local_addr = socket.local_addr()?;
        let (stopper, signals, alive, keep_open) = stop::stopper(Default::default());
        let stats = Arc::new(SharedStats::default());
        let (replies_tx, replies_rx) = mpsc::unbounded();
        let driver = UdpServerDriver {
            timer: Timer::new(&self.runtime),
            runtime: self.runtime.clone(),
            socket,
            core: DatagramServer::new(self.config, fastrand::u64(..)),
            method_slots: MethodSlots::default(),
            served: {
                let listeners = server_listeners(&self.interceptors);
                let service = ServerChain::wrap(self.interceptors, self.service);
                Arc::new(Served::new(service, listeners))
            },
            recv_buf: recv_buf(),
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            replies_tx,
            replies_rx,
            running: HashMap::new(),
            next_task: 0,
            deadlines: BinaryHeap::new(),
            drain_signal: SignalRx::new(&signals.drain),
            abort_signal: SignalRx::new(&signals.abort),
            draining: false,
            aborted: false,
            stats: stats.clone(),
            published: DatagramServerStats::default(),
            _keep_open: keep_open,
            _alive: alive,
        };
        self.runtime.spawn(driver);
        Ok(UdpServerHandle {
            runtime: self.runtime,
            local_addr,
            stopper,
            stats,
        })
    }
}

/// Controls a running UDP server. Dropping it leaves the server running.
#[derive(Debug)]
pub struct UdpServerHandle<R: Runtime> {
    runtime: R,
    local_addr: SocketAddr,
    stopper: Stopper,
    stats: Arc<SharedStats>,
}

impl<R: Runtime> UdpServerHandle<R> {
    /// The address the socket is bound to (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Datagrams ignored (malformed, truncated, not one request frame) and duplicates
    /// answered from the cache or dropped, so far.
    pub fn stats(&self) -> DatagramServerStats {
        self.stats.load()
    }

    /// Stops reading requests and waits for the handlers running to be answered; after
    /// `grace`, drops whatever is left. Returns once the socket is closed.
    pub async fn shutdown(self, grace: Duration) -> Shutdown {
        let deadline = stop::grace_deadline(grace);
        self.stopper.drain(&self.runtime, deadline).await
    }

    /// Stops at once, answering nothing more.
    pub async fn abort(self) {
        self.stopper.abort().await;
    }
}

/// The core's counters, published by the driver for [`UdpServerHandle::stats`].
#[derive(Debug, Default)]
struct SharedStats {
    ignored: AtomicU64,
    duplicates_answered: AtomicU64,
    duplicates_dropped: AtomicU64,
    evicted: AtomicU64,
}

impl SharedStats {
    fn store(&self, stats: DatagramServerStats) {
        self.ignored.store(stats.ignored, Ordering::Relaxed);
        self.duplicates_answered
            .store(stats.duplicates_answered, Ordering::Relaxed);
        self.duplicates_dropped
            .store(stats.duplicates_dropped, Ordering::Relaxed);
        self.evicted.store(stats.evicted, Ordering::Relaxed);
    }

    fn load(&self) -> DatagramServerStats {
        DatagramServerStats {
            ignored: self.ignored.load(Ordering::Relaxed),
            duplicates_answered: self.duplicates_answered.load(Ordering::Relaxed),
            duplicates_dropped: self.duplicates_dropped.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }
}

/// A handler running in its own task.
struct Running {
    abort: AbortHandle,
    from: SocketAddr,
    token: ReplyToken<SocketAddr>,
    watch: CallWatch,
}

struct UdpServerDriver<R: Runtime> {
    runtime: R,
    socket: R::UdpSocket,
    core: DatagramServer<SocketAddr>,
    served: Arc<Served>,
    /// The metrics slots of the methods called.
    method_slots: MethodSlots,
    recv_buf: Box<[u8]>,
    /// Answers the socket has not taken yet, with their destination.
    unsent: VecDeque<(SocketAddr, Bytes)>,
    unsent_bytes: usize,
    replies_tx: mpsc::UnboundedSender<(u64, ServerReply)>,
    replies_rx: mpsc::UnboundedReceiver<(u64, ServerReply)>,
    /// Handlers that did not finish when first polled, by task number.
    running: HashMap<u64, Running>,
    next_task: u64,
    /// Deadlines of running handlers; entries of tasks no longer running are skipped.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    timer: Timer<R>,
    drain_signal: SignalRx,
    abort_signal: SignalRx,
    draining: bool,
    aborted: bool,
    stats: Arc<SharedStats>,
    published: DatagramServerStats,
    _keep_open: (async_channel::Sender<()>, async_channel::Sender<()>),
    /// Dropped with the driver: tells `shutdown` the socket is closed.
    _alive: async_channel::Sender<()>,
}

impl<R: Runtime> UdpServerDriver<R> {
    /// One pass over every source of work. Returns whether anything happened.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> bool {
        let now = Instant::now();
        let mut progress = false;
        if self.abort_signal.poll_given(cx) {
            self.aborted = true;
            for (_, running) in self.running.drain() {
                running.abort.abort();
                self.served
                    .observer
                    .end(&running.watch, CallEnd::ConnectionLost, None);
            }
            return false;
        }
        if !self.draining && self.drain_signal.poll_given(cx) {
            self.draining = true;
            progress = true;
        }

        while let Poll::Ready(Some((task, reply))) = self.replies_rx.poll_next_unpin(cx) {
            progress = true;
            // Absent when the deadline fired first: that answer has been sent.
            if let Some(running) = self.running.remove(&task) {
                self.respond(now, running.from, running.token, reply, running.watch);
            }
        }
        // Handlers that finish early leave their deadline behind; keep the heap near the
        // number running.
        if self.deadlines.len() > 2 * self.running.len() + 64 {
            let running = &self.running;
            self.deadlines
                .retain(|Reverse((_, task))| running.contains_key(task));
        }

        if !self.draining && self.unsent_bytes < MAX_SEND_BACKLOG {
            progress |= self.poll_recv(cx, now);
        }

        progress |= self.expire_handlers(cx, now);
        progress |= self.poll_send(cx);
        progress
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut received = 0;
        while received < RECV_BATCH {
            let (len, from) = match self.socket.poll_recv_from(cx, &mut self.recv_buf) {
                Poll::Pending => break,
                Poll::Ready(Ok(datagram)) => datagram,
                Poll::Ready(Err(e)) => {
                    // ICMP errors from earlier sends surface here on some systems; they
                    // concern one peer, not the socket.
                    tracing::debug!(error = %e, "UDP receive failed");
                    received += 1;
                    continue;
                }
            };
            received += 1;
            let datagram = &self.recv_buf[..len];
            match self.core.handle_datagram(now, from, datagram) {
                Some(ServerInput::Request(request)) => self.dispatch(cx, now, request),
                Some(ServerInput::Reply { to, datagram }) => self.queue(to, datagram),
                None => {
                    if self.core.stats().ignored > self.published.ignored {
                        tracing::debug!(%from, len, "ignored a datagram that is not one whole request frame");
                    }
                }
            }
            self.publish_stats();
        }
        received > 0
    }

    /// Runs the handler inline once; only a handler that has to wait gets a task of its own.
    fn dispatch(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
        request: DatagramRequest<SocketAddr>,
    ) {
        let DatagramRequest {
            from,
            id,
            codec,
            head,
            body,
            deadline,
            token,
            ..
        } = request;
        let served = self.served.clone();
        let method = head.method();
        let cached = Some(&mut self.method_slots);
        let call_id = Some(u64::from(id.as_u32()));
        let watch = served.watch(&head, method, cached, from, call_id, now);
        served.observer.request_bytes(&watch, body.len());
        if served.service.stream_kind(method).is_some() {
            let status = Status::new(
                Code::Unimplemented,
                format!(
                    "{method} is a stream method: UDP carries unary calls only; call it over TCP"
                ),
            );
            return self.respond(now, from, token, ServerReply::error(status), watch);
        }
        let request = ServerRequest {
            head,
            edited: None,
            codec,
            body,
            deadline,
            peer: Some(from),
            peer_certificates: None,
            streams: Default::default(),
        };
        let polled = served.call_inline(request, &watch.span, cx);
        let future = match polled {
            Ok((_, Poll::Ready(reply))) => return self.respond(now, from, token, reply, watch),
            Ok((future, Poll::Pending)) => future,
            Err(_) => return self.respond(now, from, token, panicked(), watch),
        };
        let task = self.next_task;
        self.next_task += 1;
        let (abort, registration) = AbortHandle::new_pair();
        let replies = self.replies_tx.clone();
        let handler = Abortable::new(AssertUnwindSafe(future).catch_unwind(), registration);
        self.runtime.spawn(
            async move {
                if let Ok(result) = handler.await {
                    let reply = result.unwrap_or_else(|_| panicked());
                    let _ = replies.unbounded_send((task, reply));
                }
            }
            .instrument(watch.span.clone()),
        );
        let running = Running {
            abort,
            from,
            token,
            watch,
        };
        self.running.insert(task, running);
        if let Some(deadline) = deadline {
            self.deadlines.push(Reverse((deadline, task)));
        }
    }

    /// Stops handlers whose client has stopped waiting, answering `DeadlineExceeded` (which
    /// also frees their place under the concurrency limit and is cached for repeats).
    fn expire_handlers(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        loop {
            // Drop entries of handlers that finished before their deadline.
            while let Some(Reverse((_, task))) = self.deadlines.peek() {
                if self.running.contains_key(task) {
                    break;
                }
                self.deadlines.pop();
            }
            let next = self.deadlines.peek().map(|Reverse((at, _))| *at);
            if !self.timer.poll(cx, next, now) {
                break;
            }
            let Some(Reverse((_, task))) = self.deadlines.pop() else {
                break;
            };
            if let Some(running) = self.running.remove(&task) {
                running.abort.abort();
                let status = Status::new(Code::DeadlineExceeded, "deadline passed on the server");
                let status =
                    self.send(now, running.from, running.token, ServerReply::error(status));
                let observer = &self.served.observer;
                observer.end(&running.watch, CallEnd::DeadlineExceeded, Some(&status));
                progress = true;
            }
        }
        progress
    }

    /// Answers a call, which ends with the status that went out.
    fn respond(
        &mut self,
        now: Instant,
        to: SocketAddr,
        token: ReplyToken<SocketAddr>,
        reply: ServerReply,
        watch: CallWatch,
    ) {
        self.served
            .observer
            .response_bytes(&watch, reply.body.len());
        let status = self.send(now, to, token, reply);
        self.served
            .observer
            .end(&watch, answered(&status), Some(&status));
    }

    /// Sends an answer; returns the status that went out (the reply's, or the error sent
    /// instead when the reply does not fit in a datagram).
    fn send(
        &mut self,
        now: Instant,
        to: SocketAddr,
        token: ReplyToken<SocketAddr>,
        reply: ServerReply,
    ) -> Status {
        let ServerReply {
            status,
            metadata,
            body,
        } = reply;
        match self
            .core
            .respond(now, token, &status, metadata.iter(), body)
        {
            Ok(datagram) => {
                self.queue(to, datagram);
                status
            }
            Err(error) => {
                tracing::warn!(%to, status = %error, "no answer fits in max_datagram");
                error
            }
        }
    }

    fn queue(&mut self, to: SocketAddr, datagram: Bytes) {
        self.unsent_bytes += datagram.len();
        self.unsent.push_back((to, datagram));
    }

    /// Sends queued answers until the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while let Some((to, datagram)) = self.unsent.front() {
            match self.socket.poll_send_to(cx, datagram, *to) {
                Poll::Pending => break,
                Poll::Ready(result) => {
                    if let Err(e) = result {
                        tracing::debug!(%to, error = %e, "UDP send failed; answer dropped");
                    }
                    self.unsent_bytes -= datagram.len();
                    self.unsent.pop_front();
                    progress = true;
                }
            }
        }
        progress
    }

    fn publish_stats(&mut self) {
        let stats = self.core.stats();
        if stats != self.published {
            self.stats.store(stats);
            self.published = stats;
        }
    }

    fn is_drained(&self) -> bool {
        self.draining && self.running.is_empty() && self.unsent.is_empty()
    }
}

fn panicked() -> ServerReply {
    ServerReply::error(Status::new(Code::Internal, "handler panicked"))
}

impl<R: Runtime> Future for UdpServerDriver<R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        drive(cx, |cx| this.poll_once(cx));
        if this.aborted || this.is_drained() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
