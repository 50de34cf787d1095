//! hyper's runtime traits over gorpc's [`Runtime`]: one adapter for every runtime, so hyper's
//! HTTP/1.1 and HTTP/2 state machines run wherever the binary protocol's drivers do, with no
//! tokio runtime under smol.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use crate::runtime::{Io, Runtime, Sleep};

/// Room a read is given: hyper asks for what its own buffer has room for, and reads this
/// size fill it in one or two copies.
const READ_CHUNK: usize = 16 * 1024;

/// A connection as hyper reads and writes it. Reads land in a buffer of its own and are
/// copied into hyper's (safe code cannot hand hyper's uninitialised buffer to the socket);
/// bytes read before hyper took the connection (to tell protocols apart) come first.
pub(crate) struct HyperIo<I: Io> {
    io: I,
    read_buf: BytesMut,
}

impl<I: Io> HyperIo<I> {
    /// `io`, whose first bytes `read` were already read from it.
    pub(crate) fn new(io: I, read: BytesMut) -> Self {
        HyperIo { io, read_buf: read }
    }

    /// The connection back, once hyper is done with it.
    pub(crate) fn into_inner(self) -> I {
        self.io
    }
}

impl<I: Io> hyper::rt::Read for HyperIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_buf.is_empty() {
            let want = buf.remaining().clamp(1, READ_CHUNK);
            if this.read_buf.capacity() < want {
                this.read_buf.reserve(want);
            }
            if ready!(this.io.poll_read_buf(cx, &mut this.read_buf, want))? == 0 {
                return Poll::Ready(Ok(())); // end of stream: nothing put
            }
        }
        let n = this.read_buf.len().min(buf.remaining());
        buf.put_slice(&this.read_buf[..n]);
        this.read_buf.advance(n);
        if this.read_buf.is_empty() && this.read_buf.capacity() > 4 * READ_CHUNK {
            // A large first read (sniffed bytes) is not kept for the connection's life.
            this.read_buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: Io> hyper::rt::Write for HyperIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .io
            .poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = &mut self.get_mut().io;
        ready!(io.poll_flush(cx))?;
        io.poll_shutdown(cx)
    }
}

/// hyper's timers, from the runtime's resettable ones.
#[derive(Clone, Debug)]
pub(crate) struct HyperTimer<R>(pub(crate) R);

/// A runtime timer as hyper's `Sleep`.
struct HyperSleep<S>(S);

impl<S: Sleep> Future for HyperSleep<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.get_mut().0).poll(cx)
    }
}

impl<S: Sleep> hyper::rt::Sleep for HyperSleep<S> {}

impl<R: Runtime> hyper::rt::Timer for HyperTimer<R> {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = Instant::now()
            .checked_add(duration)
            .unwrap_or_else(far_future);
        self.sleep_until(deadline)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep(self.0.sleep_until(deadline)))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        // Re-armed in place when it is ours, as it always is: no allocation per reset.
        match sleep.as_mut().downcast_mut_pin::<HyperSleep<R::Sleep>>() {
            Some(ours) => ours.get_mut().0.reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// An instant no timer reaches, for durations too long to add.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// hyper's background tasks (HTTP/2 streams, client connections) on the runtime.
#[cfg(feature = "grpc")]
#[derive(Clone, Debug)]
pub(crate) struct HyperExecutor<R>(pub(crate) R);

#[cfg(feature = "grpc")]
impl<R, F> hyper::rt::Executor<F> for HyperExecutor<R>
where
    R: Runtime,
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}
