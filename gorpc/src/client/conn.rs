//! One client connection: a driver task that owns the socket and a [`ClientConn`], and a
//! cheap handle callers use to start calls on it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc_proto::Conn as _;
use gorpc_proto::{
    CallHead, CallId, ClientConn, ClientEvent, Code, ConnConfig, SendError, Status, StreamKind,
};

use super::call::OutgoingCall;
use crate::io::{drive, earliest, Transport};
use crate::mailbox::{self, Receiver, Sender};
use crate::metadata::Metadata;
use crate::observe::{ConnectionGauge, Side};
use crate::runtime::{timeout, Io, Runtime};
use crate::stream::handoff::{hold_write, unsendable, Delivering, Fed, Inbox, Outbox, OutboxDrain};
use crate::CallMap;

/// How a call on one connection ended, before any retry.
#[derive(Debug)]
pub(crate) enum CallOutcome {
    Answered(gorpc_proto::Response),
    Failed(Status),
    /// The connection closed before the request was written: safe to send elsewhere.
    NotSent(OutgoingCall),
}

/// Where a connection's driver leaves a call's outcome for the waiting caller.
#[derive(Debug, Default)]
pub(crate) struct CallSlot {
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    id: Option<CallId>,
    outcome: Option<CallOutcome>,
    waker: Option<Waker>,
    /// The caller stopped waiting.
    abandoned: bool,
}

impl CallSlot {
    fn finish(&self, outcome: CallOutcome) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.outcome = Some(outcome);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

pub(crate) enum Command {
    Call(OutgoingCall, Arc<CallSlot>),
    /// Boxed: a rare command, and the common one stays small to move.
    Stream(Box<(OutgoingCall, StreamKind, ClientStream)>),
    /// A client stream's outbox has new messages, or its half-close.
    Ready(CallId),
    /// Bytes of a response stream the application has taken.
    Release(CallId, usize),
    Cancel(CallId),
}

/// How a stream call ends for its receiving half: the server's answer (its status may be
/// an error), or why there is none.
pub(crate) type StreamEnd = Result<StreamAnswer, Status>;

/// The answer that ends a stream call, whatever protocol carried it.
#[derive(Debug)]
pub(crate) struct StreamAnswer {
    pub(crate) status: Status,
    pub(crate) codec: u8,
    /// The handler's end metadata (trailers).
    pub(crate) metadata: Metadata,
    /// The one response of a client-streaming call; empty otherwise.
    pub(crate) body: Bytes,
}

impl From<gorpc_proto::Response> for StreamAnswer {
    fn from(response: gorpc_proto::Response) -> Self {
        StreamAnswer {
            metadata: Metadata::from_wire(response.head.metadata(), response.head.as_bytes()),
            status: response.status,
            codec: response.codec,
            body: response.body,
        }
    }
}

/// What a stream call's halves share with the driver.
#[derive(Debug)]
pub(crate) struct ClientStream {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) inbox: Arc<Inbox<StreamEnd>>,
}

impl ClientStream {
    fn end(self, result: StreamEnd) {
        self.outbox.end();
        self.inbox.end(result);
    }
}

impl Drop for ClientStream {
    /// Dropped without an end, the driver stopped: the halves learn so.
    fn drop(&mut self) {
        self.outbox.end();
        self.inbox.close();
    }
}

/// The driver's side of a running stream call's halves.
#[derive(Debug)]
struct StreamIo {
    outbox: Arc<Outbox>,
    /// Client-stream messages taken and not yet accepted by the core.
    drain: OutboxDrain,
    inbox: Arc<Inbox<StreamEnd>>,
}

/// A call's data in the core: where its outcome goes.
#[derive(Debug)]
enum CallUser {
    Unary(Arc<CallSlot>),
    Stream(ClientStream),
}

#[derive(Debug)]
struct Shared {
    peer: SocketAddr,
    /// False once the connection closed or is draining: the pool must not hand it out.
    usable: AtomicBool,
    /// The server turned this connection away (a `ResourceExhausted` go-away, at its
    /// connection limit): calls that find it closed end with this status rather than go
    /// to a new connection at once, which would be turned away too.
    refusal: OnceLock<Status>,
}

/// A handle to one connection. Cloning is cheap; the connection closes when its driver
/// sees it fail, drain, or sit idle, or when every handle is dropped.
#[derive(Clone, Debug)]
pub struct Connection {
    commands: Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Call(call, _) => f.debug_tuple("Call").field(&call.method).finish(),
            Command::Stream(stream) => f
                .debug_tuple("Stream")
                .field(&stream.0.method)
                .field(&stream.1)
                .finish(),
            Command::Ready(id) => f.debug_tuple("Ready").field(id).finish(),
            Command::Release(id, n) => f.debug_tuple("Release").field(id).field(n).finish(),
            Command::Cancel(id) => f.debug_tuple("Cancel").field(id).finish(),
        }
    }
}

/// Client connection settings.
#[derive(Clone, Debug)]
pub struct ConnectionConfig {
    /// The protocol core's settings: limits, windows, keepalive.
    pub conn: ConnConfig,
    /// Bounds the TCP connect and the TLS handshake together.
    pub connect_timeout: Duration,
    /// Close a connection with no call in flight for this long. `None`: keep it.
    pub idle_timeout: Option<Duration>,
    /// Speak TLS: `None` (the default) is plain TCP.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            conn: ConnConfig::default(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(300)),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl Connection {
    /// Connects to `addr` (completing the TLS handshake if `config.tls` says so) and starts
    /// the connection's driver on `runtime`.
    pub async fn connect<R: Runtime>(
        runtime: &R,
        addr: SocketAddr,
        config: ConnectionConfig,
    ) -> Result<Self, Status> {
        let deadline = Instant::now() + config.connect_timeout;
        let io = connect_socket(runtime, addr, deadline, &config).await?;
        #[cfg(feature = "tls")]
        if let Some(tls) = config.tls.clone() {
            let io = tls_connect(runtime, io, addr, deadline, tls, &config).await?;
            return Ok(Self::from_io(runtime, io, addr, config));
        }
        Ok(Self::from_io(runtime, io, addr, config))
    }

    /// Starts a driver over an already connected stream: the runtime's socket, a TLS
    /// session over it, a Unix socket... Each stream type gets its own driver code, so the
    /// plain path pays nothing for the others.
    pub fn from_io<R: Runtime, I: Io>(
        runtime: &R,
        io: I,
        peer: SocketAddr,
        config: ConnectionConfig,
    ) -> Self {
        let (tx, rx) = mailbox::mailbox();
        let shared = Arc::new(Shared {
            peer,
            usable: AtomicBool::new(true),
            refusal: OnceLock::new(),
        });
        let now = Instant::now();
        let driver = ClientDriver::<R, I> {
            transport: Transport::new(runtime, io),
            conn: ClientConn::new(config.conn, now),
            commands: rx,
            batch: Vec::new(),
            streams: CallMap::default(),
            delivering: Delivering::default(),
            refilling: false,
            shared: shared.clone(),
            idle_timeout: config.idle_timeout,
            idle_since: Some(now),
            _gauge: ConnectionGauge::new(Side::Client),
        };
        runtime.spawn(driver);
        Connection {
            commands: tx,
            shared,
        }
    }

    /// Whether new calls can go on this connection.
    pub fn is_usable(&self) -> bool {
        self.shared.usable.load(Ordering::Acquire) && !self.commands.is_closed()
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The status the server turned this connection away with, if it did.
    pub(crate) fn refusal(&self) -> Option<&Status> {
        self.shared.refusal.get()
    }

    /// Queues a call. Its future resolves when the call ends; dropping it cancels the call.
    pub(crate) fn start(&self, call: OutgoingCall) -> Result<PendingCall, OutgoingCall> {
        let slot = Arc::new(CallSlot::default());
        match self.commands.send(Command::Call(call, slot.clone())) {
            Ok(()) => Ok(PendingCall {
                slot,
                commands: self.commands.clone(),
                done: false,
            }),
            Err(Command::Call(call, _)) => Err(call),
            Err(_) => unreachable!("sent a call"),
        }
    }

    /// Queues a stream call; its halves follow it through `stream`.
    pub(crate) fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
        stream: ClientStream,
    ) -> Result<(), OutgoingCall> {
        match self
            .commands
            .send(Command::Stream(Box::new((call, kind, stream))))
        {
            Ok(()) => Ok(()),
            Err(Command::Stream(stream)) => Err(stream.0),
            Err(_) => unreachable!("sent a stream"),
        }
    }

    /// Where stream halves send their commands.
    pub(crate) fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    /// Asks the connection to finish its calls and close.
    pub fn close(&self) {
        self.shared.usable.store(false, Ordering::Release);
        self.commands.close();
    }
}

/// A call in flight on one connection.
#[derive(Debug)]
pub(crate) struct PendingCall {
    slot: Arc<CallSlot>,
    commands: Sender<Command>,
    done: bool,
}

impl Future for PendingCall {
    type Output = CallOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CallOutcome> {
        let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(outcome) = state.outcome.take() {
            drop(state);
            self.done = true;
            return Poll::Ready(outcome);
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let id = {
            let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
            state.abandoned = true;
            if state.outcome.is_some() {
                return;
            }
            state.id
        };
        // Not started yet: the driver sees `abandoned` and never sends it.
        if let Some(id) = id {
            let _ = self.commands.send(Command::Cancel(id));
        }
    }
}

struct ClientDriver<R: Runtime, I: Io> {
    transport: Transport<R, I>,
    conn: ClientConn<CallUser>,
    commands: Receiver<Command>,
    /// The commands taken from `commands` in one go; kept for its capacity.
    batch: Vec<Command>,
    /// Each stream call's halves. Its own map, not the call's slot in the core: the core
    /// may have finished the call (a response read in the same batch) by the time the
    /// driver handles the messages before it.
    streams: CallMap<StreamIo>,
    /// Messages read for one stream call, delivered together (one lock, one wake-up).
    delivering: Delivering,
    /// This pass made room for a sender that filled its outbox.
    refilling: bool,
    shared: Arc<Shared>,
    idle_timeout: Option<Duration>,
    /// When the last call finished, while none is in flight.
    idle_since: Option<Instant>,
    /// Counts this connection in `gorpc_client_connections` until the driver ends.
    _gauge: ConnectionGauge,
}

impl<R: Runtime, I: Io> ClientDriver<R, I> {
    fn poll_once(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let now = Instant::now();

        if !self.conn.is_closed() {
            match self.commands.poll_take(cx, &mut self.batch) {
                Poll::Ready(true) => {
                    progress = true;
                    let mut batch = std::mem::take(&mut self.batch);
                    for command in batch.drain(..) {
                        self.run(now, command);
                    }
                    self.batch = batch;
                }
                Poll::Ready(false) => {
                    // Every handle is gone, or the pool closed us: drain and stop.
                    if self.conn.is_accepting_calls() {
                        self.conn.go_away();
                        progress = true;
                    }
                }
                Poll::Pending => {}
            }
        }

        progress |= self.transport.poll_read(cx, &mut self.conn, now);

        while let Some(event) = self.conn.poll_event() {
            progress = true;
            if !matches!(event, ClientEvent::Message { .. }) {
                // Whatever else happened comes after the messages read before it.
                self.deliver();
            }
            match event {
                ClientEvent::Finished {
                    user: CallUser::Unary(slot),
                    result,
                    ..
                } => slot.finish(match result {
                    Ok(response) => CallOutcome::Answered(response),
                    Err(status) => CallOutcome::Failed(status),
                }),
                ClientEvent::Finished {
                    id,
                    user: CallUser::Stream(stream),
                    result,
                } => {
                    self.streams.remove(&id);
                    stream.end(result.map(StreamAnswer::from));
                }
                ClientEvent::Message { id, body } => {
                    if !self.delivering.joins(id) {
                        self.deliver();
                    }
                    self.delivering.push(id, body);
                }
                ClientEvent::Writable { id } => self.feed_stream(id),
                ClientEvent::GoAway(status) => {
                    tracing::debug!(peer = %self.shared.peer, %status, "server sent go-away");
                    self.shared.usable.store(false, Ordering::Release);
                    if status.code() == Code::ResourceExhausted {
                        let _ = self.shared.refusal.set(status);
                    }
                }
                ClientEvent::Closed(reason) => {
                    tracing::debug!(peer = %self.shared.peer, ?reason, "connection closed");
                    self.shared.usable.store(false, Ordering::Release);
                    // Calls queued behind the close never left: the closed core refuses
                    // them, so they go back for a retry, or end with the server's refusal.
                    let mut left = Vec::new();
                    self.commands.close_and_take(&mut left);
                    for command in left {
                        match command {
                            Command::Call(call, slot) => self.start_call(now, call, slot),
                            Command::Stream(stream) => stream.2.end(Err(Status::new(
                                Code::Unavailable,
                                "connection closed before the stream started",
                            ))),
                            _ => {}
                        }
                    }
                }
                // Events a later core adds are ignored until this driver learns them.
                _ => {}
            }
        }

        self.deliver();

        let in_flight = self.conn.calls_in_flight();
        if in_flight > 0 {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
        let idle_deadline = match (self.idle_since, self.idle_timeout) {
            (Some(since), Some(limit)) if self.conn.is_accepting_calls() => {
                since.checked_add(limit)
            }
            _ => None,
        };
        if idle_deadline.is_some_and(|at| at <= now) {
            self.shared.usable.store(false, Ordering::Release);
            self.conn.go_away();
            progress = true;
        }

        let (released, release_at) = self.transport.release_when_idle(&mut self.conn, now);
        if released {
            self.batch = Vec::new();
            self.commands.shrink_to_fit();
        }
        let next = earliest(
            earliest(self.conn.poll_timeout(), idle_deadline),
            release_at,
        );
        if self.transport.poll_timer(cx, next, now) {
            self.conn.handle_timeout(now);
            progress = true;
        }

        let waiting = self.conn.transmit_len() + self.transport.write_backlog();
        if hold_write(std::mem::take(&mut self.refilling), waiting) && !self.conn.is_closed() {
            cx.waker().wake_by_ref();
            return false;
        }
        progress |= self.transport.poll_write(cx, &mut self.conn);
        progress
    }

    fn run(&mut self, now: Instant, command: Command) {
        match command {
            Command::Call(call, slot) => self.start_call(now, call, slot),
            Command::Stream(stream) => {
                let (call, kind, stream) = *stream;
                self.start_stream(now, call, kind, stream)
            }
            Command::Ready(id) => self.feed_stream(id),
            Command::Release(id, bytes) => self.conn.release(id, bytes),
            Command::Cancel(id) => {
                self.streams.remove(&id);
                if let Some(CallUser::Stream(stream)) = self.conn.cancel(id) {
                    stream.end(Err(Status::new(Code::Cancelled, "call cancelled")));
                }
            }
        }
    }

    fn start_call(&mut self, now: Instant, call: OutgoingCall, slot: Arc<CallSlot>) {
        if slot
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abandoned
        {
            return;
        }
        let head = CallHead::new(&call.method, call.codec).with_metadata(call.metadata.iter());
        let head = match call.deadline {
            Some(deadline) => head.with_deadline(deadline),
            None => head,
        };
        match self
            .conn
            .start_call(now, head, call.body.clone(), CallUser::Unary(slot))
        {
            Ok(id) => {
                let Some(CallUser::Unary(slot)) = self.conn.user(id) else {
                    return;
                };
                let abandoned = {
                    let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.id = Some(id);
                    state.abandoned
                };
                // The caller left between the two checks: cancel it ourselves.
                if abandoned {
                    self.conn.cancel(id);
                }
            }
            Err(rejected) => {
                let outcome = if rejected.status.code() == Code::Unavailable {
                    CallOutcome::NotSent(call)
                } else {
                    CallOutcome::Failed(rejected.status)
                };
                if let CallUser::Unary(slot) = rejected.user {
                    slot.finish(outcome);
                }
            }
        }
    }

    fn start_stream(
        &mut self,
        now: Instant,
        call: OutgoingCall,
        kind: StreamKind,
        stream: ClientStream,
    ) {
        // Both halves already gone: nobody wants this call.
        if stream.outbox.is_ended() || stream.inbox.is_reader_gone() {
            stream.end(Err(Status::new(Code::Cancelled, "call cancelled")));
            return;
        }
        let head = CallHead::new(&call.method, call.codec).with_metadata(call.metadata.iter());
        let head = match call.deadline {
            Some(deadline) => head.with_deadline(deadline),
            None => head,
        };
        let io = StreamIo {
            outbox: stream.outbox.clone(),
            drain: OutboxDrain::default(),
            inbox: stream.inbox.clone(),
        };
        match self
            .conn
            .start_stream(now, head, kind, call.body.clone(), CallUser::Stream(stream))
        {
            Ok(id) => {
                // A half was dropped before it could learn the id: cancel it ourselves.
                if io.outbox.start(id) {
                    if let Some(CallUser::Stream(stream)) = self.conn.cancel(id) {
                        stream.end(Err(Status::new(Code::Cancelled, "call cancelled")));
                    }
                    return;
                }
                self.streams.insert(id, io);
                // The sender may have queued a half-close before the call had its id.
                self.feed_stream(id);
            }
            Err(rejected) => {
                if let CallUser::Stream(stream) = rejected.user {
                    stream.end(Err(rejected.status));
                }
            }
        }
    }

    /// Hands the messages gathered for one stream call to its receiver.
    fn deliver(&mut self) {
        let streams = &self.streams;
        // Nobody will take them (the receiver is gone and its cancel is on the way).
        if let Some((id, len)) = self
            .delivering
            .deliver(|id| streams.get(&id).map(|stream| &*stream.inbox))
        {
            self.conn.release(id, len);
        }
    }

    /// Moves a client stream's queued messages (and its half-close) into the core as far
    /// as its credit goes; the rest waits for the call's `Writable`.
    fn feed_stream(&mut self, id: CallId) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let conn = &mut self.conn;
        let fed = stream
            .drain
            .feed(&stream.outbox, |messages| conn.send_batch(id, messages));
        self.refilling |= stream.drain.made_room();
        match fed {
            Ok(Fed::Idle | Fed::Blocked) => {}
            Ok(Fed::CloseSend) => {
                let _ = self.conn.close_send(id);
            }
            Err(e @ (SendError::TooLarge | SendError::MalformedBatch)) => {
                self.streams.remove(&id);
                if let Some(CallUser::Stream(stream)) = self.conn.cancel(id) {
                    stream.end(Err(unsendable("request", e)));
                }
            }
            // The call ended (its halves learn from the end event) or already half-closed.
            Err(_) => {}
        }
    }
}

impl<R: Runtime, I: Io> Future for ClientDriver<R, I> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        drive(cx, |cx| this.poll_once(cx));
        if this.conn.is_closed() && this.transport.poll_finish(cx) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Connects a socket to `addr` by `deadline` (the connect timeout of `config` from now),
/// failing with `Unavailable` and why; the status's source is the `io::Error` (of kind
/// `TimedOut` when the connect timeout passed).
pub(crate) async fn connect_socket<R: Runtime>(
    runtime: &R,
    addr: SocketAddr,
    deadline: Instant,
    config: &ConnectionConfig,
) -> Result<R::Io, Status> {
    match timeout(runtime, deadline, runtime.connect(addr)).await {
        Some(Ok(io)) => Ok(io),
        Some(Err(e)) => {
            Err(Status::unavailable(format!("connect to {addr} failed: {e}")).with_source(e))
        }
        None => Err(Status::unavailable(format!(
            "connect to {addr} timed out after {:?}",
            config.connect_timeout
        ))
        .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut))),
    }
}

/// Wraps a connected socket in TLS and completes the handshake by `deadline`. A refused
/// handshake's status has the rustls error as its source (the `io::Error` when the socket
/// failed instead).
#[cfg(feature = "tls")]
pub(crate) async fn tls_connect<R: Runtime>(
    runtime: &R,
    io: R::Io,
    addr: SocketAddr,
    deadline: Instant,
    tls: crate::tls::ClientTls,
    config: &ConnectionConfig,
) -> Result<crate::tls::TlsIo<R::Io>, Status> {
    let failed = |e: &dyn std::fmt::Display| {
        Status::unavailable(format!("TLS handshake with {addr} failed: {e}"))
    };
    let mut io = crate::tls::TlsIo::client(io, tls.config, tls.server_name)
        .map_err(|e| failed(&e).with_source(e))?;
    match timeout(runtime, deadline, io.handshake()).await {
        Some(Ok(())) => Ok(io),
        Some(Err(e)) => {
            let status = failed(&e);
            // The session's own verdict (a certificate refused...) is the better cause.
            let rustls = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .cloned();
            Err(match rustls {
                Some(rustls) => status.with_source(rustls),
                None => status.with_source(e),
            })
        }
        None => Err(Status::unavailable(format!(
            "TLS handshake with {addr} timed out (connect timeout {:?})",
            config.connect_timeout
        ))
        .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut))),
    }
}

/// A stream half's way to its connection's driver.
pub(crate) struct Commands(pub(crate) Sender<Command>);

impl crate::stream::handoff::StreamControl for Commands {
    fn ready(&self, id: CallId) -> bool {
        self.0.send(Command::Ready(id)).is_ok()
    }

    fn release(&self, id: CallId, bytes: usize) {
        let _ = self.0.send(Command::Release(id, bytes));
    }
}

impl crate::stream::StreamDriver for Commands {
    fn cancel(&self, id: CallId) {
        let _ = self.0.send(Command::Cancel(id));
    }
}
