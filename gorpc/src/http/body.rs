//! Bodies at the HTTP edge: reading a request's body within the server's limits, and the one
//! response body type hyper writes.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gorpc_proto::Status;
use http_body::{Body, Frame, SizeHint};

use crate::runtime::{Runtime, Sleep};

/// Request-body bytes the server's HTTP connections hold at once, all together: the bodies
/// being read and those whose calls are running. A body that would go over it is refused
/// (503), so a crowd of slow uploads cannot take the server's memory.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    held: AtomicUsize,
    max: usize,
}

impl BodyBudget {
    pub(crate) fn new(max: usize) -> Self {
        BodyBudget {
            held: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes `n` bytes of the budget into `hold`; false (taking nothing) if that would go
    /// over it.
    fn take(self: &Arc<Self>, hold: &mut BodyHold, n: usize) -> bool {
        let taken = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&total| total <= self.max)
            })
            .is_ok();
        if taken {
            hold.bytes += n;
        }
        taken
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Bytes of the [`BodyBudget`] one request holds, given back when dropped.
#[derive(Debug)]
pub(crate) struct BodyHold {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyHold {
    pub(crate) fn new(budget: &Arc<BodyBudget>) -> Self {
        BodyHold {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    fn take(&mut self, n: usize) -> bool {
        let budget = self.budget.clone();
        budget.take(self, n)
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Why a request body was not read whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Over the per-request limit (its declared length or what arrived).
    TooLarge,
    /// The server holds too many request bytes already.
    OverBudget,
    /// Trailer fields after a chunked body: refused, because hyper's HTTP/1.1 trailer
    /// parser takes a bare LF inside a trailer line as part of it, so a request's trailers
    /// could swallow the next pipelined request's head.
    Trailers,
    /// Nothing arrived for the idle timeout.
    Stalled,
    /// The framing was malformed (a bad chunk), or the connection failed.
    Broken(hyper::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => f.write_str("the body is over the size limit"),
            BodyError::OverBudget => f.write_str("too many body bytes are held already"),
            BodyError::Trailers => f.write_str("trailer fields after a chunked body"),
            BodyError::Stalled => f.write_str("the body stopped arriving"),
            BodyError::Broken(error) => f.write_str(&super::server::error_chain(error)),
        }
    }
}

/// Reads `body` whole: at most `max` bytes, each counted against a budget in `hold` (if
/// given) before it is kept, with at most `idle` between two pieces.
pub(crate) async fn read_body<R: Runtime>(
    runtime: &R,
    mut body: hyper::body::Incoming,
    max: usize,
    mut hold: Option<&mut BodyHold>,
    idle: Duration,
) -> Result<Bytes, BodyError> {
    let declared = body.size_hint().exact();
    if let Some(len) = declared {
        // Known up front: refuse at once, and hold it all while it arrives.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > max {
            return Err(BodyError::TooLarge);
        }
        if hold.as_mut().is_some_and(|hold| !hold.take(len)) {
            return Err(BodyError::OverBudget);
        }
    }
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    // Armed only when the body makes the call wait: a small body is usually all in hyper's
    // buffer already, and costs no timer.
    let mut stall: Option<R::Sleep> = None;
    loop {
        let mut waited = false;
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                return Poll::Ready(Some(frame));
            }
            let sleep = stall.get_or_insert_with(|| runtime.sleep_until(Instant::now() + idle));
            if !std::mem::replace(&mut waited, true) {
                sleep.reset(Instant::now() + idle);
            }
            match Pin::new(sleep).poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        });
        let frame = match next.await {
            None => return Err(BodyError::Stalled),
            Some(None) => break,
            Some(Some(Err(e))) => return Err(BodyError::Broken(e)),
            Some(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(_trailers) => return Err(BodyError::Trailers),
        };
        let total = first.as_ref().map_or(0, Bytes::len) + rest.len() + data.len();
        if total > max {
            return Err(BodyError::TooLarge);
        }
        if declared.is_none() && hold.as_mut().is_some_and(|hold| !hold.take(data.len())) {
            return Err(BodyError::OverBudget);
        }
        // One piece (the usual case) is kept as it came, without a copy.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(first) = first.take() {
                    rest.extend_from_slice(&first);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// The response body of every answer at the edge: frames known up front (an HTTP answer,
/// a unary gRPC answer), or a stream call's body that produces them as the call goes on.
pub(crate) enum EdgeBody {
    /// One piece of data (or none), then the end: an HTTP/1.1 answer, allocation-free.
    Full(Option<Bytes>),
    Frames(VecDeque<Frame<Bytes>>),
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    Stream(Pin<Box<dyn Body<Data = Bytes, Error = Status> + Send>>),
}

impl std::fmt::Debug for EdgeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EdgeBody::Full(data) => f
                .debug_tuple("Full")
                .field(&data.as_ref().map_or(0, Bytes::len))
                .finish(),
            EdgeBody::Frames(frames) => f.debug_tuple("Frames").field(&frames.len()).finish(),
            EdgeBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl EdgeBody {
    /// `bytes`, then the end.
    pub(crate) fn full(bytes: Bytes) -> Self {
        EdgeBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// Nothing: the headers end the answer.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn empty() -> Self {
        EdgeBody::Frames(VecDeque::new())
    }
}

/// A stream body that fails (a client's request stream it gave up on) resets its HTTP/2
/// stream; the others never fail.
impl Body for EdgeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            EdgeBody::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            EdgeBody::Frames(frames) => Poll::Ready(frames.pop_front().map(Ok)),
            EdgeBody::Stream(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EdgeBody::Full(data) => data.is_none(),
            EdgeBody::Frames(frames) => frames.is_empty(),
            EdgeBody::Stream(body) => body.is_end_stream(),
        }
    }

    /// Exact for one piece of data, so HTTP/1.1 answers carry a Content-Length.
    fn size_hint(&self) -> SizeHint {
        match self {
            EdgeBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            EdgeBody::Frames(frames) => match frames.front().and_then(Frame::data_ref) {
                None if frames.is_empty() => SizeHint::with_exact(0),
                Some(data) if frames.len() == 1 => SizeHint::with_exact(data.len() as u64),
                _ => SizeHint::default(),
            },
            EdgeBody::Stream(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = Arc::new(BodyBudget::new(100));
        let mut a = BodyHold::new(&budget);
        let mut b = BodyHold::new(&budget);
        assert!(a.take(60));
        assert!(!b.take(41), "over the budget together");
        assert!(b.take(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(b.take(60));
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
