//! Byte and timer plumbing shared by the client and server drivers: a [`Transport`] moves
//! bytes and time between a socket and either side's protocol state machine.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use gorpc_proto::{frame, Conn, Status};

use crate::recycle::Recycler;
use crate::runtime::{Io, Runtime, Sleep};

/// Spare room the read buffer is given before each read.
const READ_CHUNK: usize = 16 * 1024;
/// The read buffers a connection recycles: room for a few reads of small frames...
const READ_BUFFER: usize = 2 * READ_CHUNK;
/// ...or, while reading a large frame, for a full outbox's batch of stream messages
/// ([`OUTBOX_LIMIT`](crate::stream::OUTBOX_LIMIT)) and the start of the next.
const LARGE_READ_BUFFER: usize = 128 * 1024;
/// Read buffers kept for reuse: as many as the messages a connection's streams may hold
/// untaken (its default window) pin, and two.
const READ_SPARES: usize = gorpc_proto::DEFAULT_CONNECTION_WINDOW as usize / LARGE_READ_BUFFER + 2;
/// The most reserved ahead for the rest of a frame: a header alone cannot make a
/// connection hold more than this before the bytes arrive.
const MAX_FRAME_RESERVE: usize = 256 * 1024;
/// How long a connection must be quiet before its buffers are released: at first...
const FIRST_RELEASE: Duration = Duration::from_millis(50);
/// ...and, doubling each time a look finds it busy, at most this. A connection that
/// calls once and goes quiet (a probe, one of a flood) gives its tables back before the
/// next few hundred connections have been set up around them, so that the holes are
/// filled again rather than left between every idle connection's state (RSS of 10,000
/// idle connections: 3.6 KiB each with a 50 ms release, 5.5 KiB with 1 s), while a busy
/// connection is soon looked at only once a second.
const LAST_RELEASE: Duration = Duration::from_secs(1);
/// Chunks handed to one `writev`.
const MAX_IOV: usize = 64;
/// Read buffers each thread keeps lent: a few, so that the client and server connections
/// that share a thread (a service calling another) take turns without freeing and
/// allocating one each call.
const THREAD_SPARES: usize = 4;

/// Quiet moments that lend the read buffer, after a connection opens or releases its
/// buffers. Connections that make a call or two and then stay quiet (probes, one-shot
/// clients, a flood) are the ones whose buffers pile up, and they stop within the first few
/// (a gorpc client's connection has one after its preface, one after its first call); one
/// that goes on calling then keeps its buffer without a lend and a borrow per call (2% of a
/// c=1 call's instructions), until the release timer finds it quiet.
const QUIET_LENDS: u8 = 4;

thread_local! {
    /// Read buffers given back by connections on this thread that went quiet with nothing
    /// buffered and no call in flight, some possibly still shared with messages the
    /// application holds.
    static THREAD_READ_SPARES: std::cell::RefCell<Recycler> =
        const { std::cell::RefCell::new(Recycler::new(THREAD_SPARES)) };
}

/// Lends `buf`, empty, to the next connection on this thread that reads. A connection
/// that made its call and went quiet then holds no read buffer: in a flood of such
/// connections a few buffers serve them all, instead of one each until its quiet spell is
/// up, and the heap is not left with a buffer-sized hole beside every idle connection's
/// state.
fn lend_to_thread(buf: BytesMut) {
    let _ = THREAD_READ_SPARES.try_with(|spares| spares.borrow_mut().keep(buf));
}

/// A buffer lent to this thread with room for `additional` bytes and no piece still out.
fn borrow_from_thread(additional: usize) -> Option<BytesMut> {
    THREAD_READ_SPARES
        .try_with(|spares| spares.borrow_mut().take(additional))
        .ok()
        .flatten()
}

/// A socket with its read buffer, write queue and the connection's one timer. `I` is the
/// runtime's own socket for plain TCP (so that path stays monomorphized and unchanged), or
/// a wrapper such as a TLS session over it.
pub(crate) struct Transport<R: Runtime, I: Io = <R as Runtime>::Io> {
    io: I,
    read_buf: BytesMut,
    /// Earlier read buffers, some of whose messages the application may still hold.
    recycler: Recycler,
    /// Large frames arrived since the connection was last idle: read buffers are large.
    large_frames: bool,
    /// How many more quiet moments (nothing to read, nothing buffered, no call in flight)
    /// lend the read buffer to the thread: the first [`QUIET_LENDS`] since the connection
    /// opened or last released its buffers.
    lends_left: u8,
    write_queue: WriteQueue,
    timer: Timer<R>,
    read_closed: bool,
    /// When bytes last arrived.
    last_read: Instant,
    /// Set when bytes arrive while no release is pending (buffers may be held): when to
    /// look again whether the connection has been quiet for `release_after` (and can
    /// release them). Moved at most once per `release_after`, so that a busy connection
    /// does not re-arm its timer for it with every call.
    release_at: Option<Instant>,
    /// [`FIRST_RELEASE`], doubled up to [`LAST_RELEASE`] each time a look finds the
    /// connection busy.
    release_after: Duration,
}

impl<R: Runtime, I: Io> Transport<R, I> {
    pub(crate) fn new(runtime: &R, io: I) -> Self {
        Transport {
            timer: Timer::new(runtime),
            io,
            read_buf: BytesMut::new(),
            recycler: Recycler::new(READ_SPARES),
            large_frames: false,
            lends_left: QUIET_LENDS,
            write_queue: WriteQueue::default(),
            read_closed: false,
            last_read: Instant::now(),
            release_at: None,
            release_after: FIRST_RELEASE,
        }
    }

    /// Feeds `conn` bytes read from the socket before this transport took it over (while
    /// telling protocols apart), as if this transport had read them.
    #[cfg(feature = "http")]
    pub(crate) fn feed_read(&mut self, conn: &mut impl Conn, now: Instant, bytes: BytesMut) {
        self.read_buf = bytes;
        self.last_read = now;
        self.release_at.get_or_insert(now + self.release_after);
        conn.handle_read(now, &mut self.read_buf);
    }

    /// Reads once and feeds the bytes to `conn`. Returns whether anything happened.
    /// Protocol errors surface as the state machine's `Closed` event.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut impl Conn,
        now: Instant,
    ) -> bool {
        if self.read_closed || conn.is_closed() {
            return false;
        }
        // What the connection left is part of one frame, already checked against the
        // frame limit: room for all of it at once, so a large frame (a batch of stream
        // messages) is not moved again with every read.
        let rest_of_frame = frame::frame_len_hint(&self.read_buf)
            .map_or(0, |len| len.saturating_sub(self.read_buf.len()))
            .min(MAX_FRAME_RESERVE);
        if self.read_buf.capacity() - self.read_buf.len() < rest_of_frame.max(READ_CHUNK / 4) {
            let wanted = rest_of_frame + READ_CHUNK;
            // One size per connection, so that any spare fits the next refill.
            self.large_frames |= rest_of_frame > READ_CHUNK;
            let size = if self.large_frames {
                LARGE_READ_BUFFER
            } else {
                READ_BUFFER
            };
            let lent = if self.read_buf.capacity() == 0 && !self.large_frames {
                borrow_from_thread(wanted)
            } else {
                None
            };
            match lent {
                Some(spare) => self.read_buf = spare,
                None => self.recycler.reserve(&mut self.read_buf, wanted, size),
            }
        }
        // Reads are sized by what is expected, buffers for reuse. Within a large frame (a
        // batch of stream messages, more following) a read takes the rest of the frame and
        // the next one's header, which tells the size of the read after: a read that ran on
        // into the next frame left its start to be copied into a fresh buffer when the
        // rest did not fit (a quarter of a one-stream client's bytes, copied twice).
        // Otherwise the rest of the frame and 16 KiB: reading all there is at once made
        // unary calls a third slower, as requests and responses stopped flowing in step.
        let max = if rest_of_frame > READ_CHUNK {
            rest_of_frame + frame::HEADER_LEN
        } else {
            rest_of_frame + READ_CHUNK
        };
        match self.io.poll_read_buf(cx, &mut self.read_buf, max) {
            Poll::Ready(Ok(0)) => {
                self.read_closed = true;
                conn.handle_eof();
            }
            Poll::Ready(Ok(_)) => {
                self.last_read = now;
                self.release_at.get_or_insert(now + self.release_after);
                conn.handle_read(now, &mut self.read_buf);
            }
            Poll::Ready(Err(e)) => {
                self.read_closed = true;
                conn.abort(Status::unavailable(format!("read failed: {e}")).with_source(e));
            }
            Poll::Pending => {
                // Nothing buffered and no call in flight: until bytes come, the buffer can
                // serve the thread's other connections.
                if self.lends_left > 0
                    && self.read_buf.is_empty()
                    && self.read_buf.capacity() != 0
                    && !self.large_frames
                    && conn.is_idle()
                {
                    lend_to_thread(std::mem::take(&mut self.read_buf));
                    self.lends_left -= 1;
                }
                return false;
            }
        }
        true
    }

    /// Releases the buffers of a connection that has had nothing buffered, nothing in
    /// flight and nothing to read for `release_after` (its read buffers, and the spare
    /// room in `conn`'s tables and queues), so that idle connections stay small while a
    /// busy one keeps reusing its buffers. Returns whether it released them now (the driver
    /// then shrinks its own tables), and the instant to look again, for the driver's timer:
    /// never one already past, so a due check cannot spin the driver.
    pub(crate) fn release_when_idle(
        &mut self,
        conn: &mut impl Conn,
        now: Instant,
    ) -> (bool, Option<Instant>) {
        let Some(at) = self.release_at else {
            return (false, None);
        };
        if at > now {
            return (false, Some(at));
        }
        if self.read_buf.is_empty() && conn.is_idle() && self.last_read + self.release_after <= now
        {
            self.read_buf = BytesMut::new();
            self.recycler.clear();
            self.large_frames = false;
            self.lends_left = QUIET_LENDS;
            self.write_queue.shrink_to_fit();
            self.io.release_buffers();
            conn.shrink_to_fit();
            self.release_at = None;
            self.release_after = FIRST_RELEASE;
            return (true, None);
        }
        self.release_after = (self.release_after * 2).min(LAST_RELEASE);
        let next = now + self.release_after;
        self.release_at = Some(next);
        (false, Some(next))
    }

    /// Arms the timer for `at` and reports whether it is due.
    pub(crate) fn poll_timer(
        &mut self,
        cx: &mut Context<'_>,
        at: Option<Instant>,
        now: Instant,
    ) -> bool {
        self.timer.poll(cx, at, now)
    }

    /// Queues what `conn` has to send and writes as much as the socket takes. Returns
    /// whether anything happened (a write failure aborts `conn`).
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>, conn: &mut impl Conn) -> bool {
        while let Some(chunk) = conn.poll_transmit() {
            self.write_queue.push(chunk);
        }
        match self.write_queue.poll_write(&mut self.io, cx) {
            Poll::Ready(Err(e)) => {
                self.write_queue = WriteQueue::default();
                if !conn.is_closed() {
                    conn.abort(Status::unavailable(format!("write failed: {e}")).with_source(e));
                    return true;
                }
                false
            }
            Poll::Ready(Ok(())) | Poll::Pending => false,
        }
    }

    /// Bytes queued for the socket and not yet written. A server stops reading requests
    /// while this is large, so a client that never reads its responses cannot make the
    /// server buffer without bound.
    pub(crate) fn write_backlog(&self) -> usize {
        self.write_queue.len
    }

    /// Once `conn` has closed: true when the transport is done too (everything flushed, or
    /// nobody left to read it), after starting an orderly shutdown of the socket.
    /// After the write side is shut: reads and drops what the peer still sends, until its
    /// EOF or `until`. A peer that wrote a request before it read our go-away then gets
    /// the go-away, rather than a reset that can destroy it unread. Returns whether done.
    pub(crate) fn poll_linger(&mut self, cx: &mut Context<'_>, until: Instant) -> bool {
        if self.read_closed || self.timer.poll(cx, Some(until), Instant::now()) {
            return true;
        }
        let mut scratch = BytesMut::new();
        loop {
            scratch.clear();
            match self.io.poll_read_buf(cx, &mut scratch, 4096) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return false,
            }
        }
    }

    pub(crate) fn poll_finish(&mut self, cx: &mut Context<'_>) -> bool {
        if self.write_queue.is_empty() || self.read_closed {
            // Best effort: the peer learns of the close from EOF either way.
            let _ = self.io.poll_shutdown(cx);
            return true;
        }
        false
    }
}

/// A driver's one timer, re-armed only when the instant it waits for changes.
pub(crate) struct Timer<R: Runtime> {
    sleep: R::Sleep,
    armed: Option<Instant>,
}

impl<R: Runtime> Timer<R> {
    pub(crate) fn new(runtime: &R) -> Self {
        Timer {
            sleep: runtime.sleep_until(Instant::now()),
            armed: None,
        }
    }

    /// Whether `at` has come; registers for wake-up otherwise.
    ///
    /// A timer armed for an earlier instant is left alone: it wakes the driver early once,
    /// and is armed again for `at` then. Every call's deadline moves the earliest one later
    /// as calls finish, and re-arming for each would cost a timer reset per call (on
    /// async-io, a trip through its reactor's timer table, with an allocation).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, at: Option<Instant>, now: Instant) -> bool {
        let Some(at) = at else { return false };
        if at <= now {
            return true;
        }
        loop {
            match self.armed {
                Some(armed) if armed <= at => {}
                _ => {
                    self.sleep.reset(at);
                    self.armed = Some(at);
                }
            }
            if Pin::new(&mut self.sleep).poll(cx).is_pending() {
                return false;
            }
            // Fired: `at` has come, or the earlier instant the timer was armed for has,
            // and it is armed again for `at` (which is still ahead: `at > now`).
            if self.armed.take() == Some(at) {
                return true;
            }
        }
    }
}

/// The earlier of two optional instants.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Runs `poll_once` until it reports no progress, within a budget so that other tasks on the
/// thread get their turn. A pass that still made progress may have left a source without a
/// registered waker, so a spent budget asks to be polled again.
pub(crate) fn drive(cx: &mut Context<'_>, mut poll_once: impl FnMut(&mut Context<'_>) -> bool) {
    for _ in 0..64 {
        if !poll_once(cx) {
            return;
        }
    }
    cx.waker().wake_by_ref();
}

/// Bytes waiting to be written, in order.
#[derive(Debug, Default)]
struct WriteQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    len: usize,
}

impl WriteQueue {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        if !chunk.is_empty() {
            self.chunks.push_back(chunk);
        }
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn shrink_to_fit(&mut self) {
        if self.chunks.is_empty() {
            self.chunks = VecDeque::new();
        }
    }

    /// Writes until the queue is empty and `io` has flushed what it kept back (`Ready(Ok)`),
    /// the socket is full (`Pending`), or it fails.
    fn poll_write<I: Io>(&mut self, io: &mut I, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = self.chunks.len().min(MAX_IOV);
            for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                *slot = IoSlice::new(chunk);
            }
            let written = match io.poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => written,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.len -= written;
            self.advance(written);
        }
        io.poll_flush(cx)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_read_buffer_is_borrowed_once_none_of_it_is_out() {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        let at = buf.as_ptr();
        buf.extend_from_slice(&[7; READ_BUFFER - 10]);
        let message = buf.split_to(READ_BUFFER - 10).freeze();
        lend_to_thread(buf);
        // A message the application holds still has all but 10 bytes of it.
        assert!(borrow_from_thread(READ_CHUNK).is_none());
        drop(message);
        let again = borrow_from_thread(READ_CHUNK).expect("lent and free again");
        assert_eq!(again.as_ptr(), at);
        assert!(again.is_empty() && again.capacity() >= READ_CHUNK);
        // Borrowed once.
        assert!(borrow_from_thread(READ_CHUNK).is_none());
        // Another thread has its own.
        lend_to_thread(again);
        std::thread::spawn(|| assert!(borrow_from_thread(1).is_none()))
            .join()
            .unwrap();
        assert!(borrow_from_thread(1).is_some());
    }
}
