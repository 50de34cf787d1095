//! The hand-off between a stream call's halves and its driver: an outbox the sending half
//! fills and the driver drains into the core, an inbox the driver fills and the receiving
//! half drains, both under one short lock per batch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use gorpc_proto::{batch, CallId, Code, SendError, Status};

use crate::metadata::Metadata;
use crate::recycle::Recycler;

/// Taken bytes a receiving half lets accumulate before giving them back to the driver.
/// A quarter of the initial window: the core grants credit in half-window batches, so
/// the peer is never stalled waiting for this side's bookkeeping.
pub(crate) const RELEASE_BATCH: usize = 16 * 1024;

/// Bytes a stream's sending half (a [`ResponseSink`](super::ResponseSink), a client's
/// [`StreamSender`](crate::client::StreamSender)) queues before `send` waits, each message
/// counting its length and 4 bytes more: the initial window. A producer whose reader stalls
/// holds at most this, one message past it and one large message its driver split off,
/// beside the window. A producer that outruns its driver hands over up to this much per
/// wake-up, and one write carries it: writes of 16 KiB instead (each a pass through the TCP
/// stack and a wake-up of the reader) made a server stream of 1 KiB messages half as fast.
pub const OUTBOX_LIMIT: usize = 64 * 1024;

/// Outgoing bytes a driver lets gather before it writes, while producers it just made room
/// for refill their outboxes (see [`hold_write`]).
const WRITE_BATCH: usize = 512 * 1024;

/// Whether a driver should skip this pass's write and poll itself again after the tasks
/// already woken: it made room for a producer that had filled its outbox (`made_room`),
/// which will queue more as soon as it runs, and less than [`WRITE_BATCH`] waits
/// (`waiting`). Fewer, larger writes mean fewer passes through the TCP stack and fewer
/// wake-ups of the reader: a single server stream of 1 KiB messages went from 2.5-2.6M
/// to 2.9-3.1M messages/s on the development VM with 256 KiB (A/B, same build
/// otherwise), and, once large batches went to the socket by reference instead of
/// copied, from 3.37M to 3.59M with 512 KiB (medians of eight alternating runs); 1 MiB
/// was slower again. Bounded: each skipped write follows a full outbox taken into the
/// core, and a pass that makes no room writes.
pub(crate) fn hold_write(made_room: bool, waiting: usize) -> bool {
    made_room && waiting < WRITE_BATCH
}

/// How a stream half reaches its connection's driver: each driver's own channel.
pub(crate) trait StreamControl: Send + Sync + 'static {
    /// Call `id` has something new in its outbox. False if the driver is gone.
    fn ready(&self, id: CallId) -> bool;
    /// The application took `bytes` of call `id`'s received messages.
    fn release(&self, id: CallId, bytes: usize);
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A codec that panicked while encoding under the lock leaves the state whole.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stores `cx`'s waker in `slot` unless the same task is already there.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// What a stream call's halves share with its driver: the call's id once it started,
/// whether it ended, and the sending half's queued messages.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
}

#[derive(Debug, Default)]
struct OutboxState {
    id: Option<CallId>,
    /// How each message is framed in `messages`.
    framing: Framing,
    ended: bool,
    /// The sending half asked to half-close after its queued messages.
    close_send: bool,
    /// The messages, batched as the core sends them ([`gorpc_proto::batch`]): the driver
    /// hands the core this buffer, and the core takes what credit allows from the front.
    messages: BytesMut,
    /// The driver was told since it last took.
    notified: bool,
    /// The sending half, waiting for room or for the call to start.
    sender: Option<Waker>,
    /// Metadata a handler asked to end its call with ([`RawResponseSink::set_trailers`]).
    trailers: Metadata,
}

/// How an outbox frames the messages it queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Behind a 4-byte length: the binary protocol's batch layout.
    #[default]
    Batch,
    /// gRPC's Length-Prefixed-Message: a compressed flag (0), then the 4-byte length, so
    /// the queue is a call's DATA as it goes on the wire.
    #[cfg(feature = "grpc")]
    Grpc,
}

/// What [`Outbox::take`] took.
#[cfg(feature = "grpc")]
#[derive(Debug)]
pub(crate) struct Taken {
    /// The queued messages, framed.
    pub(crate) messages: Bytes,
    /// The sending half asked to half-close after them.
    pub(crate) close_send: bool,
}

impl Outbox {
    pub(crate) fn new(id: Option<CallId>) -> Self {
        Outbox::framed(id, Framing::default())
    }

    pub(crate) fn framed(id: Option<CallId>, framing: Framing) -> Self {
        Outbox {
            state: Mutex::new(OutboxState {
                id,
                framing,
                ..OutboxState::default()
            }),
        }
    }

    /// Whether no message is queued.
    #[cfg(feature = "grpc")]
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.state).messages.is_empty()
    }

    /// Takes every queued message at once (a driver with no core to feed: gRPC's), and
    /// wakes a sender waiting for room.
    #[cfg(feature = "grpc")]
    pub(crate) fn take(&self) -> Taken {
        let (taken, waker) = {
            let mut state = lock(&self.state);
            state.notified = false;
            let taken = Taken {
                messages: state.messages.split().freeze(),
                close_send: state.close_send,
            };
            (taken, state.sender.take())
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        taken
    }

    pub(crate) fn id(&self) -> Option<CallId> {
        lock(&self.state).id
    }

    /// The call started as `id`: a waiting sender may go on. True if the call had already
    /// been given up (its halves dropped before they could learn the id).
    pub(crate) fn start(&self, id: CallId) -> bool {
        let (ended, waker) = {
            let mut state = lock(&self.state);
            state.id = Some(id);
            (state.ended, state.sender.take())
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        ended
    }

    /// The call ended: no more messages are accepted. Returns the call's id if it had one
    /// and had not ended before, so whoever gives up a call can cancel it exactly once.
    pub(crate) fn end(&self) -> Option<CallId> {
        let (id, waker) = {
            let mut state = lock(&self.state);
            let id = if state.ended { None } else { state.id };
            state.ended = true;
            (id, state.sender.take())
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        id
    }

    /// Sets the metadata the call ends with; the last set wins.
    pub(crate) fn set_trailers(&self, trailers: Metadata) {
        lock(&self.state).trailers = trailers;
    }

    pub(crate) fn take_trailers(&self) -> Metadata {
        std::mem::take(&mut lock(&self.state).trailers)
    }

    pub(crate) fn is_ended(&self) -> bool {
        lock(&self.state).ended
    }
}

/// A sending half's end of its call's outbox.
pub(crate) struct OutboxSender {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) control: Arc<dyn StreamControl>,
}

impl std::fmt::Debug for OutboxSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxSender")
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

impl OutboxSender {
    /// Waits until the call started and its outbox has room, then writes one message with
    /// `encode`. Fails with `ended()` once the call ended, or with `encode`'s error.
    pub(crate) async fn send(
        &self,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), Status>,
        ended: fn() -> Status,
    ) -> Result<(), Status> {
        let mut encode = Some(encode);
        let notify = std::future::poll_fn(|cx| {
            let mut state = lock(&self.outbox.state);
            if state.ended {
                return Poll::Ready(Err(ended()));
            }
            let Some(id) = state.id else {
                register(&mut state.sender, cx);
                return Poll::Pending;
            };
            if state.messages.len() >= OUTBOX_LIMIT {
                register(&mut state.sender, cx);
                return Poll::Pending;
            }
            let encode = encode.take().expect("not polled after it was ready");
            let pushed = match state.framing {
                Framing::Batch => batch::push_message(&mut state.messages, encode),
                #[cfg(feature = "grpc")]
                Framing::Grpc => push_grpc_message(&mut state.messages, encode),
            };
            match pushed {
                Ok(()) => {
                    let first = !std::mem::replace(&mut state.notified, true);
                    Poll::Ready(Ok(first.then_some(id)))
                }
                Err(batch::PushError::Encode(status)) => Poll::Ready(Err(status)),
                Err(batch::PushError::TooLong) => Poll::Ready(Err(Status::new(
                    Code::ResourceExhausted,
                    "a stream message exceeds 4 GiB",
                ))),
            }
        })
        .await?;
        match notify {
            Some(id) if !self.control.ready(id) => Err(ended()),
            _ => Ok(()),
        }
    }

    /// Sends `body` as it is; see [`send`](Self::send).
    pub(crate) async fn send_bytes(
        &self,
        body: &[u8],
        ended: fn() -> Status,
    ) -> Result<(), Status> {
        let copy = |buf: &mut BytesMut| {
            buf.extend_from_slice(body);
            Ok(())
        };
        self.send(copy, ended).await
    }

    /// Asks the driver to half-close after the queued messages. Fails with `ended()` once
    /// the call ended.
    pub(crate) fn close_send(&self, ended: fn() -> Status) -> Result<(), Status> {
        let notify = {
            let mut state = lock(&self.outbox.state);
            if state.ended {
                return Err(ended());
            }
            state.close_send = true;
            let first = !std::mem::replace(&mut state.notified, true);
            // Not started yet: the driver looks at the outbox when it starts the call.
            state.id.filter(|_| first)
        };
        match notify {
            Some(id) if !self.control.ready(id) => Err(ended()),
            _ => Ok(()),
        }
    }
}

/// Appends one message in gRPC's framing; nothing stays if `encode` fails.
#[cfg(feature = "grpc")]
fn push_grpc_message(
    messages: &mut BytesMut,
    encode: impl FnOnce(&mut BytesMut) -> Result<(), Status>,
) -> Result<(), batch::PushError<Status>> {
    let start = messages.len();
    messages.extend_from_slice(&[0; 5]);
    let encoded = encode(messages)
        .map_err(batch::PushError::Encode)
        .and_then(|()| {
            u32::try_from(messages.len() - start - 5).map_err(|_| batch::PushError::TooLong)
        });
    match encoded {
        Ok(len) => {
            messages[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            messages.truncate(start);
            Err(e)
        }
    }
}

/// Why a stream's queued messages cannot go out: one is over the frame limit, or a codec
/// wrote outside its message and broke the queue. `stream` names the direction.
pub(crate) fn unsendable(stream: &str, e: SendError) -> Status {
    match e {
        SendError::TooLarge => Status::new(
            Code::ResourceExhausted,
            format!("a {stream} stream message exceeds max_frame_len"),
        ),
        _ => Status::new(
            Code::Internal,
            format!("the {stream} stream's queued messages were broken by their codec"),
        ),
    }
}

/// How far [`OutboxDrain::feed`] got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fed {
    /// The outbox is empty: everything is in the core.
    Idle,
    /// The core refused for lack of credit; the rest waits for the call's `Writable`.
    Blocked,
    /// Everything is in the core and the sender half-closed: close the sending side.
    CloseSend,
}

/// The largest outbox buffer recycled: an outbox at its limit with one message past it fits
/// in twice the limit.
const MAX_RECYCLED: usize = 2 * OUTBOX_LIMIT;

/// The smallest outbox buffer recycled.
const MIN_RECYCLED: usize = 16 * 1024;

/// Outbox buffers kept for reuse: the feeds of one held write ([`WRITE_BATCH`]) and one.
const OUTBOX_SPARES: usize = WRITE_BATCH / OUTBOX_LIMIT + 1;

/// The driver's side of an outbox.
#[derive(Debug)]
pub(crate) struct OutboxDrain {
    /// The half-close was reported.
    closed: bool,
    /// A feed since the driver last asked woke a sender that was waiting for room.
    made_room: bool,
    /// The outbox's earlier buffers, lent to the core by reference: a sender refilling
    /// its buffer behind every feed gets one of them back instead of a new allocation.
    recycler: Recycler,
}

impl Default for OutboxDrain {
    fn default() -> Self {
        OutboxDrain {
            closed: false,
            made_room: false,
            recycler: Recycler::new(OUTBOX_SPARES),
        }
    }
}

impl OutboxDrain {
    /// Hands the outbox's messages to `send` (the core's `send_batch`), which takes as
    /// many as credit allows. Runs under the outbox's lock (the sender waits meanwhile),
    /// and the sender gets room as messages go.
    pub(crate) fn feed(
        &mut self,
        outbox: &Outbox,
        send: impl FnOnce(&mut BytesMut) -> Result<(), SendError>,
    ) -> Result<Fed, SendError> {
        let mut state = lock(&outbox.state);
        state.notified = false;
        let fed = if state.messages.is_empty() {
            Ok(Fed::Idle)
        } else {
            let room = state.messages.capacity();
            let sent = send(&mut state.messages);
            if state.messages.is_empty() {
                if state.messages.try_reclaim(room) {
                    // Copied into the core: nothing of it is in flight, and a stream this
                    // quiet keeps no spares.
                    self.recycler.clear();
                } else if room <= MAX_RECYCLED {
                    // Sized alike, so that spares fit the next refill.
                    let size = room.next_power_of_two().max(MIN_RECYCLED);
                    self.recycler.reserve(&mut state.messages, room, size);
                }
            }
            match sent {
                Ok(()) => Ok(Fed::Idle),
                Err(SendError::NoCredit) => Ok(Fed::Blocked),
                Err(e) => Err(e),
            }
        };
        let fed = match fed {
            Ok(Fed::Idle) if state.close_send && !self.closed => {
                self.closed = true;
                Ok(Fed::CloseSend)
            }
            other => other,
        };
        let waker = if state.messages.len() < OUTBOX_LIMIT {
            state.sender.take()
        } else {
            None
        };
        drop(state);
        if let Some(waker) = waker {
            self.made_room = true;
            waker.wake();
        }
        fed
    }

    /// Whether a feed since the last ask woke a sender waiting for room: a producer that
    /// filled its outbox and is about to fill it again.
    pub(crate) fn made_room(&mut self) -> bool {
        std::mem::take(&mut self.made_room)
    }
}

/// A run of received messages for one stream call, gathered by a driver from one read and
/// handed to the call's inbox together: one lock, one lookup and at most one wake-up per
/// run instead of per message.
#[derive(Debug, Default)]
pub(crate) struct Delivering {
    id: Option<CallId>,
    messages: VecDeque<Bytes>,
    /// Their bytes.
    len: usize,
}

impl Delivering {
    /// Drops the room an earlier run of messages left, once there is none waiting.
    pub(crate) fn shrink_to_fit(&mut self) {
        if self.messages.is_empty() {
            self.messages = VecDeque::new();
        }
    }

    /// Whether a message for `id` joins the run as it stands; if not, deliver the run first.
    pub(crate) fn joins(&self, id: CallId) -> bool {
        self.id.is_none_or(|current| current == id)
    }

    /// Adds a message for `id`, which [`joins`](Self::joins) the run.
    pub(crate) fn push(&mut self, id: CallId, body: Bytes) {
        debug_assert!(self.joins(id), "a run holds one call's messages");
        self.id = Some(id);
        self.len += body.len();
        self.messages.push_back(body);
    }

    /// Hands the run to its call's inbox, found by `inbox`. Returns the call and the bytes
    /// when nobody will take them (the call or its reader is gone): their credit goes
    /// straight back, so the connection window never shrinks.
    pub(crate) fn deliver<'a, E: 'a>(
        &mut self,
        inbox: impl FnOnce(CallId) -> Option<&'a Inbox<E>>,
    ) -> Option<(CallId, usize)> {
        let id = self.id.take()?;
        let len = std::mem::take(&mut self.len);
        if inbox(id).is_some_and(|inbox| inbox.push(&mut self.messages)) {
            return None;
        }
        self.messages.clear();
        Some((id, len))
    }
}

/// Where a driver delivers a stream call's received messages, then its end `E`.
#[derive(Debug)]
pub(crate) struct Inbox<E> {
    state: Mutex<InboxState<E>>,
}

#[derive(Debug)]
struct InboxState<E> {
    messages: VecDeque<Bytes>,
    end: Option<E>,
    /// The driver let go without an end: it stopped.
    writer_gone: bool,
    reader_gone: bool,
    reader: Option<Waker>,
}

impl<E> Default for Inbox<E> {
    fn default() -> Self {
        Inbox {
            state: Mutex::new(InboxState {
                messages: VecDeque::new(),
                end: None,
                writer_gone: false,
                reader_gone: false,
                reader: None,
            }),
        }
    }
}

impl<E> Inbox<E> {
    /// Delivers a run of messages under one lock, leaving `messages` empty. False, taking
    /// none, once the reader is gone: nobody will take them, so the driver gives their
    /// credit back itself.
    pub(crate) fn push(&self, messages: &mut VecDeque<Bytes>) -> bool {
        let waker = {
            let mut state = lock(&self.state);
            if state.reader_gone {
                return false;
            }
            if state.messages.is_empty() {
                std::mem::swap(&mut state.messages, messages);
            } else {
                state.messages.append(messages);
            }
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Ends the stream with `end`, after the messages delivered so far.
    pub(crate) fn end(&self, end: E) {
        self.wake_after(|state| state.end = Some(end));
    }

    /// The driver lets go (its connection stopped): a reader still waiting learns so.
    pub(crate) fn close(&self) {
        self.wake_after(|state| state.writer_gone = true);
    }

    pub(crate) fn is_reader_gone(&self) -> bool {
        lock(&self.state).reader_gone
    }

    fn wake_after(&self, change: impl FnOnce(&mut InboxState<E>)) {
        let waker = {
            let mut state = lock(&self.state);
            change(&mut state);
            state.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// What a receiving half gets next.
#[derive(Debug)]
pub(crate) enum Delivery<E> {
    Message(Bytes),
    End(E),
    /// The driver stopped without ending the stream.
    Gone,
}

/// A receiving half's end of an inbox: takes all delivered messages in one go and gives
/// their credit back in batches.
#[derive(Debug)]
pub(crate) struct InboxReader<E> {
    inbox: Arc<Inbox<E>>,
    ready: VecDeque<Bytes>,
    /// Bytes taken and not yet given back.
    taken: usize,
    /// Credit just went back: let the driver run before taking more.
    yield_next: bool,
}

impl<E> InboxReader<E> {
    pub(crate) fn new(inbox: Arc<Inbox<E>>) -> Self {
        InboxReader {
            inbox,
            ready: VecDeque::new(),
            taken: 0,
            yield_next: false,
        }
    }

    /// The next message, or the end. `id` is the call's (if started), `control` where
    /// taken bytes go back.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        id: Option<CallId>,
        control: &dyn StreamControl,
    ) -> Poll<Delivery<E>> {
        if std::mem::take(&mut self.yield_next) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.ready.is_empty() {
            let mut state = lock(&self.inbox.state);
            std::mem::swap(&mut state.messages, &mut self.ready);
            if self.ready.is_empty() {
                if let Some(end) = state.end.take() {
                    return Poll::Ready(Delivery::End(end));
                }
                if state.writer_gone {
                    return Poll::Ready(Delivery::Gone);
                }
                register(&mut state.reader, cx);
                drop(state);
                // About to wait: give back what was taken, the peer may be waiting for it.
                self.give_back(id, control);
                return Poll::Pending;
            }
        }
        let body = self.ready.pop_front().expect("ready is not empty");
        self.taken += body.len();
        if self.taken >= RELEASE_BATCH {
            self.give_back(id, control);
            self.yield_next = true;
        }
        Poll::Ready(Delivery::Message(body))
    }

    fn give_back(&mut self, id: Option<CallId>, control: &dyn StreamControl) {
        if let (Some(id), true) = (id, self.taken > 0) {
            control.release(id, std::mem::take(&mut self.taken));
        }
    }

    /// The reader is going away: nothing more is delivered, and every byte it held, taken
    /// or not, goes back so the connection's window does not shrink.
    pub(crate) fn close(&mut self, id: Option<CallId>, control: &dyn StreamControl) {
        let unread: usize = {
            let mut state = lock(&self.inbox.state);
            state.reader_gone = true;
            state.messages.drain(..).map(|b| b.len()).sum()
        };
        self.taken += unread + self.ready.drain(..).map(|b| b.len()).sum::<usize>();
        self.give_back(id, control);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::server::call_ended;

    #[derive(Default)]
    struct Recorded {
        ready: Mutex<Vec<CallId>>,
        released: Mutex<usize>,
    }

    impl StreamControl for Recorded {
        fn ready(&self, id: CallId) -> bool {
            lock(&self.ready).push(id);
            true
        }
        fn release(&self, _: CallId, bytes: usize) {
            *lock(&self.released) += bytes;
        }
    }

    fn send_now(sender: &OutboxSender, body: &[u8]) -> Poll<Result<(), Status>> {
        let future = sender.send_bytes(body, call_ended);
        let mut future = std::pin::pin!(future);
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }

    use std::future::Future;

    fn sender_of(outbox: &Arc<Outbox>, control: Arc<Recorded>) -> OutboxSender {
        OutboxSender {
            outbox: outbox.clone(),
            control,
        }
    }

    /// What a core with credit for `n` messages does: takes the first `n` (all if fewer
    /// wait), returning their bodies.
    fn take(messages: &mut BytesMut, n: usize, got: &mut Vec<Vec<u8>>) -> Result<(), SendError> {
        for _ in 0..n {
            if messages.is_empty() {
                return Ok(());
            }
            let len = u32::from_be_bytes(messages[..4].try_into().unwrap()) as usize;
            let message = messages.split_to(4 + len);
            got.push(message[4..].to_vec());
        }
        if messages.is_empty() {
            Ok(())
        } else {
            Err(SendError::NoCredit)
        }
    }

    #[test]
    fn a_batch_of_messages_costs_one_notification_and_keeps_its_order() {
        let control = Arc::new(Recorded::default());
        let outbox = Arc::new(Outbox::new(Some(CallId::from(7))));
        let sender = sender_of(&outbox, control.clone());
        for i in 0..10u8 {
            assert!(send_now(&sender, &[i; 100]).is_ready());
        }
        assert_eq!(*lock(&control.ready), vec![CallId::from(7)]);
        let mut drain = OutboxDrain::default();
        let mut got = Vec::new();
        let fed = drain.feed(&outbox, |messages| take(messages, usize::MAX, &mut got));
        assert_eq!(fed, Ok(Fed::Idle));
        assert_eq!(got, (0..10u8).map(|i| vec![i; 100]).collect::<Vec<_>>());
        // The next message after a take notifies again.
        assert!(send_now(&sender, b"x").is_ready());
        assert_eq!(lock(&control.ready).len(), 2);
    }

    #[test]
    fn a_full_outbox_makes_the_sender_wait_until_the_core_takes_some() {
        let outbox = Arc::new(Outbox::new(Some(CallId::from(1))));
        let sender = sender_of(&outbox, Arc::default());
        let body = [0u8; 1000];
        let mut sent = 0;
        while send_now(&sender, &body).is_ready() {
            sent += 1;
        }
        // Room is checked before each message: the last one may overshoot by itself.
        assert_eq!(sent, OUTBOX_LIMIT.div_ceil(1004));
        let mut drain = OutboxDrain::default();
        // The core takes three, then has no credit: the rest stays queued, in order, and
        // the sender has room again for what left.
        let mut got = Vec::new();
        let fed = drain.feed(&outbox, |messages| take(messages, 3, &mut got));
        assert_eq!(fed, Ok(Fed::Blocked));
        assert_eq!(got.len(), 3);
        assert!(drain.made_room(), "the waiting sender was woken");
        assert!(!drain.made_room(), "asked once");
        assert!(send_now(&sender, &body).is_ready());
        let fed = drain.feed(&outbox, |messages| take(messages, usize::MAX, &mut got));
        assert_eq!(fed, Ok(Fed::Idle));
        assert_eq!(got.len(), sent + 1);
    }

    #[test]
    fn a_buffer_lent_to_the_core_comes_back_once_written() {
        let outbox = Arc::new(Outbox::new(Some(CallId::from(1))));
        let sender = sender_of(&outbox, Arc::default());
        let mut drain = OutboxDrain::default();
        let fill = |byte: u8| {
            while send_now(&sender, &[byte; 1000]).is_ready() {}
        };
        let buffer_of = |outbox: &Outbox| lock(&outbox.state).messages.as_ptr() as usize;
        // What a core does with a large batch: split it off by reference, in flight until
        // the socket took it.
        let mut in_flight = Vec::new();
        let mut lend = |messages: &mut BytesMut| {
            in_flight.push(messages.split().freeze());
            Ok(())
        };
        fill(1);
        assert_eq!(drain.feed(&outbox, &mut lend), Ok(Fed::Idle));
        let second = buffer_of(&outbox);
        fill(2);
        assert_eq!(drain.feed(&outbox, &mut lend), Ok(Fed::Idle));
        let third = buffer_of(&outbox);
        assert_ne!(second, third, "the second buffer is still lent out");
        // Both written: the sender refills one of them rather than a new allocation, and
        // what was lent is intact.
        let [first_batch, second_batch]: [Bytes; 2] = in_flight.try_into().unwrap();
        assert!(first_batch.len() >= OUTBOX_LIMIT && second_batch.len() >= OUTBOX_LIMIT);
        drop(first_batch);
        drop(second_batch);
        fill(3);
        let mut written = Vec::new();
        let fed = drain.feed(&outbox, |messages| {
            written.push(messages.split().freeze());
            Ok(())
        });
        assert_eq!(fed, Ok(Fed::Idle));
        // (Held among the spares until then, so no new allocation could land there.)
        assert_eq!(
            buffer_of(&outbox),
            second,
            "the latest buffer back is reused"
        );
        assert!(written[0]
            .chunks(1004)
            .all(|m| m[4..].iter().all(|&b| b == 3)));
    }

    #[test]
    fn the_half_close_follows_the_last_message() {
        let outbox = Arc::new(Outbox::new(Some(CallId::from(1))));
        let sender = sender_of(&outbox, Arc::default());
        assert!(send_now(&sender, b"a").is_ready());
        sender.close_send(call_ended).unwrap();
        let mut drain = OutboxDrain::default();
        let mut got = Vec::new();
        let fed = drain.feed(&outbox, |_| Err(SendError::NoCredit));
        assert_eq!(fed, Ok(Fed::Blocked), "not before the message went");
        let fed = drain.feed(&outbox, |messages| take(messages, 1, &mut got));
        assert_eq!(fed, Ok(Fed::CloseSend));
        assert_eq!(
            drain.feed(&outbox, |_| Ok(())),
            Ok(Fed::Idle),
            "reported once"
        );

        let outbox = Arc::new(Outbox::new(Some(CallId::from(2))));
        let sender = sender_of(&outbox, Arc::default());
        sender.close_send(call_ended).unwrap();
        let mut drain = OutboxDrain::default();
        assert_eq!(drain.feed(&outbox, |_| Ok(())), Ok(Fed::CloseSend));
    }

    #[test]
    fn an_ended_outbox_refuses_and_cancels_once() {
        let outbox = Arc::new(Outbox::new(None));
        let sender = sender_of(&outbox, Arc::default());
        assert!(
            send_now(&sender, b"a").is_pending(),
            "waits for the call to start"
        );
        assert!(!outbox.start(CallId::from(3)));
        assert_eq!(outbox.end(), Some(CallId::from(3)));
        assert_eq!(outbox.end(), None);
        assert!(matches!(send_now(&sender, b"a"), Poll::Ready(Err(_))));
        assert!(
            outbox.start(CallId::from(3)),
            "a start after the end reports it"
        );
    }

    #[test]
    fn a_dropped_reader_gives_back_what_it_held() {
        let control = Recorded::default();
        let inbox = Arc::new(Inbox::<()>::default());
        let mut reader = InboxReader::new(inbox.clone());
        let run = |lens: &[usize]| lens.iter().map(|&n| Bytes::from(vec![0; n])).collect();
        assert!(inbox.push(&mut run(&[10, 20])));
        let cx = &mut Context::from_waker(Waker::noop());
        assert!(matches!(
            reader.poll_next(cx, Some(CallId::from(1)), &control),
            Poll::Ready(Delivery::Message(_))
        ));
        assert!(inbox.push(&mut run(&[40])));
        reader.close(Some(CallId::from(1)), &control);
        assert_eq!(*lock(&control.released), 70);
        let mut late = run(&[1]);
        assert!(!inbox.push(&mut late));
        assert_eq!(late.len(), 1, "refused messages stay with the driver");
    }

    #[test]
    fn a_run_reaches_its_inbox_at_once_and_an_unclaimed_one_is_handed_back() {
        let inbox = Arc::new(Inbox::<()>::default());
        let mut reader = InboxReader::new(inbox.clone());
        let mut delivering = Delivering::default();
        let (one, two) = (CallId::from(1), CallId::from(2));
        delivering.push(one, Bytes::from_static(b"first"));
        assert!(delivering.joins(one));
        delivering.push(one, Bytes::from_static(b"second"));
        assert!(
            !delivering.joins(two),
            "another call's message starts a new run"
        );
        let found = |id: CallId| (id == one).then_some(&*inbox);
        assert_eq!(delivering.deliver(found), None);
        assert_eq!(lock(&inbox.state).messages.len(), 2, "both, in one push");
        // Call 2 has no inbox (refused, or its handler dropped the stream): its bytes come
        // back for the driver to release.
        assert!(delivering.joins(two));
        delivering.push(two, Bytes::from_static(b"lost"));
        delivering.push(two, Bytes::from_static(b"too"));
        assert_eq!(delivering.deliver(found), Some((two, 7)));
        assert_eq!(delivering.deliver(found), None, "nothing left to deliver");
        let cx = &mut Context::from_waker(Waker::noop());
        let control = Recorded::default();
        for expected in [&b"first"[..], b"second"] {
            match reader.poll_next(cx, Some(one), &control) {
                Poll::Ready(Delivery::Message(body)) => assert_eq!(&body[..], expected),
                _ => panic!("the run arrives in order"),
            }
        }
    }
}
