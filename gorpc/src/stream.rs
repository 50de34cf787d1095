//! Stream calls as the application sees them: the halves a handler or a caller holds, and
//! the small shared state a half and its connection's driver use to hand messages across.
//!
//! Flow control stays in the core. A sending half may hand the driver one message at a
//! time: it waits until the driver took the previous one into the core's send window (the
//! [`SendGate`] opens again) or parked it for lack of credit (the gate stays shut until the
//! core reports the call writable). A producer therefore never holds more than its window,
//! one overdraft message and one parked message. A receiving half holds what the driver
//! delivered; those bytes count against the window until the application takes them, and
//! the credit goes back in batches (or whenever the reader runs dry), so a slow reader
//! stops the producer on the other side.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::task::AtomicWaker;
use futures::Stream;
use gorpc_proto::{CallId, Code, Status};

use crate::codec::Codec;

/// Taken bytes a receiving half lets accumulate before giving them back to the driver.
/// A quarter of the initial window: the core grants credit in half-window batches, so
/// the peer is never stalled waiting for this side's bookkeeping.
pub(crate) const RELEASE_BATCH: usize = 16 * 1024;

const GATE_SHUT: u8 = 0;
const GATE_OPEN: u8 = 1;
const GATE_CLOSED: u8 = 2;

/// Whether a sending half may hand the driver its next message.
#[derive(Debug)]
pub(crate) struct SendGate {
    state: AtomicU8,
    /// The call's id once its driver started it (client calls start after the halves exist).
    id: OnceLock<CallId>,
    waker: AtomicWaker,
}

impl SendGate {
    pub(crate) fn new(open: bool, id: Option<CallId>) -> Self {
        SendGate {
            state: AtomicU8::new(if open { GATE_OPEN } else { GATE_SHUT }),
            id: id.map_or_else(OnceLock::new, OnceLock::from),
            waker: AtomicWaker::new(),
        }
    }

    pub(crate) fn set_id(&self, id: CallId) {
        let _ = self.id.set(id);
    }

    /// The call id, once set.
    pub(crate) fn id(&self) -> Option<CallId> {
        self.id.get().copied()
    }

    /// The driver is ready for the next message.
    pub(crate) fn open(&self) {
        if self
            .state
            .compare_exchange(GATE_SHUT, GATE_OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// The call ended: no message will be taken any more.
    pub(crate) fn close(&self) {
        self.state.store(GATE_CLOSED, Ordering::Release);
        self.waker.wake();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == GATE_CLOSED
    }

    /// Ready with `true` when the caller may hand over one message (the gate shuts behind
    /// it), `false` once the call ended.
    pub(crate) fn poll_pass(&self, cx: &mut Context<'_>) -> Poll<bool> {
        if let Some(pass) = self.try_pass() {
            return Poll::Ready(pass);
        }
        self.waker.register(cx.waker());
        match self.try_pass() {
            Some(pass) => Poll::Ready(pass),
            None => Poll::Pending,
        }
    }

    fn try_pass(&self) -> Option<bool> {
        match self
            .state
            .compare_exchange(GATE_OPEN, GATE_SHUT, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Some(true),
            Err(GATE_CLOSED) => Some(false),
            Err(_) => None,
        }
    }
}

/// Where a receiving half gives consumed bytes back, and how a half tells its driver it
/// is gone. Implemented over each driver's own channel.
pub(crate) trait StreamControl: Send + Sync + 'static {
    fn release(&self, id: CallId, bytes: usize);
}

/// Counts taken bytes and hands them back in batches.
#[derive(Debug, Default)]
pub(crate) struct ReleaseBatch {
    taken: usize,
}

impl ReleaseBatch {
    /// A message of `len` bytes was taken; gives back now if the batch is full.
    pub(crate) fn taken(&mut self, len: usize, id: Option<CallId>, control: &dyn StreamControl) {
        self.taken += len;
        if self.taken >= RELEASE_BATCH {
            self.flush(id, control);
        }
    }

    /// Gives back everything taken so far: the reader is about to wait, and the peer may be
    /// waiting for exactly this credit.
    pub(crate) fn flush(&mut self, id: Option<CallId>, control: &dyn StreamControl) {
        if let (Some(id), true) = (id, self.taken > 0) {
            control.release(id, std::mem::take(&mut self.taken));
        }
    }
}

/// The messages of a client stream, as a handler reads them: raw bodies, in order; the
/// stream ends when the client half-closes. Dropping it discards the rest.
pub struct RawRequestStream {
    pub(crate) id: CallId,
    pub(crate) messages: Pin<Box<async_channel::Receiver<Bytes>>>,
    pub(crate) control: Arc<dyn StreamControl>,
    pub(crate) batch: ReleaseBatch,
}

impl std::fmt::Debug for RawRequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRequestStream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Stream for RawRequestStream {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = self.get_mut();
        let id = Some(this.id);
        // Take without waiting first, so the batch is flushed only when the reader waits.
        match this.messages.try_recv() {
            Ok(body) => {
                this.batch.taken(body.len(), id, &*this.control);
                return Poll::Ready(Some(body));
            }
            Err(async_channel::TryRecvError::Closed) => return Poll::Ready(None),
            Err(async_channel::TryRecvError::Empty) => {}
        }
        this.batch.flush(id, &*this.control);
        match this.messages.as_mut().poll_next(cx) {
            Poll::Ready(Some(body)) => {
                this.batch.taken(body.len(), id, &*this.control);
                Poll::Ready(Some(body))
            }
            other => other,
        }
    }
}

/// A client stream's messages decoded with the method's codec. A message that does not
/// decode ends the stream with that error.
pub struct RequestStream<T> {
    raw: RawRequestStream,
    codec: Arc<dyn Codec<T>>,
    failed: bool,
}

impl<T> std::fmt::Debug for RequestStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<T> RequestStream<T> {
    pub(crate) fn new(raw: RawRequestStream, codec: Arc<dyn Codec<T>>) -> Self {
        RequestStream {
            raw,
            codec,
            failed: false,
        }
    }

    /// The undecoded stream.
    pub fn into_raw(self) -> RawRequestStream {
        self.raw
    }
}

impl<T: 'static> Stream for RequestStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.raw).poll_next(cx) {
            Poll::Ready(Some(body)) => {
                let item = this.codec.decode(body);
                this.failed = item.is_err();
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Where a sending half's messages go: the driver of its connection.
pub(crate) trait MessageOut: Send + Sync + 'static {
    /// Hands one message to the driver; `false` if the driver is gone.
    fn message(&self, id: CallId, body: Bytes) -> bool;
}

/// The response stream of a call, as a handler writes it: raw bodies in the call's codec.
/// [`send`](Self::send) waits for flow-control credit.
pub struct RawResponseSink {
    pub(crate) gate: Arc<SendGate>,
    pub(crate) out: Arc<dyn MessageOut>,
}

impl std::fmt::Debug for RawResponseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponseSink")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

fn call_ended() -> Status {
    Status::new(
        Code::Cancelled,
        "the call ended; its stream takes no more messages",
    )
}

impl RawResponseSink {
    /// Sends one message once the client has credit for it. Fails with `Cancelled` once the
    /// call ended (the client cancelled, the deadline passed, the connection closed).
    pub async fn send(&mut self, body: Bytes) -> Result<(), Status> {
        if !std::future::poll_fn(|cx| self.gate.poll_pass(cx)).await {
            return Err(call_ended());
        }
        let id = self
            .gate
            .id()
            .expect("a server call has its id from the start");
        if self.out.message(id, body) {
            Ok(())
        } else {
            Err(call_ended())
        }
    }
}

/// The response stream of a call, typed: messages encoded with the method's codec.
pub struct ResponseSink<T> {
    raw: RawResponseSink,
    codec: Arc<dyn Codec<T>>,
    /// Reused across messages: each message is split off, so its allocation is shared with
    /// the next ones until the frames holding them are written.
    buf: BytesMut,
}

impl<T> std::fmt::Debug for ResponseSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseSink")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> ResponseSink<T> {
    pub(crate) fn new(raw: RawResponseSink, codec: Arc<dyn Codec<T>>) -> Self {
        ResponseSink {
            raw,
            codec,
            buf: BytesMut::new(),
        }
    }

    /// Encodes and sends one message; see [`RawResponseSink::send`].
    pub async fn send(&mut self, message: &T) -> Result<(), Status> {
        self.buf.reserve(256);
        self.codec.encode(message, &mut self.buf)?;
        let body = self.buf.split().freeze();
        self.raw.send(body).await
    }

    /// The undecoded sink.
    pub fn into_raw(self) -> RawResponseSink {
        self.raw
    }
}
