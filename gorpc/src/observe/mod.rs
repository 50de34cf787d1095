//! How every call ends, and who hears of it: the interceptors' `on_end`, a tracing span per
//! call with its closing log line, and the `gorpc_*` metrics (through the [`metrics`]
//! facade, to whatever recorder the application installed: Prometheus, OpenTelemetry, ...).
//!
//! The drivers open a `CallWatch` when a call starts and end it exactly once, with the
//! [`CallEnd`] they saw: an answer, a refusal, the deadline, a cancel, or the connection
//! going away. Calls that end unanswered are the ones worth seeing, so they are reported
//! like the others.

mod instruments;

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use gorpc_proto::{Code, RequestHead, Status};
use tracing::field::Empty;
use tracing::Span;

use instruments::{Elapsed, Instruments};
pub(crate) use instruments::{MethodSlots, Side, Slot};

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallEnd {
    /// Answered with this status: `Ok`, or the error a handler, an interceptor or the
    /// framework (a codec, a limit) chose. On a client, the status it got back, or the
    /// error that stopped it before it was sent.
    Answered(Code),
    /// Turned away before any handler ran: by admission control, or because it was framed
    /// for another kind of method.
    Refused(Code),
    /// Its deadline passed before it was answered.
    DeadlineExceeded,
    /// On a server, the client cancelled it; on a client, the caller stopped waiting (its
    /// future was dropped).
    Cancelled,
    /// The connection it was on closed before it was answered.
    ConnectionLost,
}

impl CallEnd {
    /// The status code the call counts under, in metrics and logs: the answer's, or the
    /// one a client sees for an unanswered call.
    pub fn code(self) -> Code {
        match self {
            CallEnd::Answered(code) | CallEnd::Refused(code) => code,
            CallEnd::DeadlineExceeded => Code::DeadlineExceeded,
            CallEnd::Cancelled => Code::Cancelled,
            CallEnd::ConnectionLost => Code::Unavailable,
        }
    }

    /// Whether the call was answered with OK.
    pub fn is_ok(self) -> bool {
        self == CallEnd::Answered(Code::Ok)
    }

    /// How a client call that failed with `status` ended, from the status alone.
    pub(crate) fn of_client_error(status: &Status) -> CallEnd {
        match status.code() {
            Code::DeadlineExceeded => CallEnd::DeadlineExceeded,
            code => CallEnd::Answered(code),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            CallEnd::Answered(Code::Ok) => "answered",
            CallEnd::Answered(_) => "answered with an error",
            CallEnd::Refused(_) => "refused",
            CallEnd::DeadlineExceeded => "deadline exceeded",
            CallEnd::Cancelled => "cancelled",
            CallEnd::ConnectionLost => "connection lost",
        }
    }
}

/// A call that just ended, as an interceptor's `on_end` sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct EndedCall<'a> {
    /// "/package.Service/Method".
    pub method: &'a str,
    /// The other side: the client, on a server. `None` where it is not known (a client's
    /// call through a balancer or a channel).
    pub peer: Option<SocketAddr>,
    /// The call's number on its connection, where the protocol numbers calls (the binary
    /// protocol, UDP).
    pub id: Option<u64>,
    /// From the call's arrival (server) or start (client) to its end.
    pub duration: Duration,
    /// How it ended.
    pub end: CallEnd,
    /// The status of an answered call (with its message), or of a client call that
    /// failed; `None` for the other endings.
    pub status: Option<&'a Status>,
}

/// What hears of a call's end, besides metrics and logs: the interceptors' `on_end`.
pub(crate) type EndListener = Arc<dyn Fn(&EndedCall<'_>) + Send + Sync>;

/// What one server's (or client's) calls report to.
pub(crate) struct Observer {
    side: Side,
    instruments: Instruments,
    listeners: Box<[EndListener]>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("side", &self.side)
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

/// A watched call's method path, held as the call carried it: no copy.
#[derive(Debug)]
pub(crate) enum MethodName {
    /// A server's call: the request head, whose bytes hold the path.
    Head(RequestHead),
    /// A client's call.
    Path(Cow<'static, str>),
}

impl MethodName {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            MethodName::Head(head) => head.method(),
            MethodName::Path(path) => path,
        }
    }
}

/// One call being watched, from its start to its end.
#[derive(Debug)]
pub(crate) struct CallWatch {
    /// Kept for the listeners only: `None` when there are none.
    method: Option<MethodName>,
    slot: Slot,
    /// `None`: started untimed, as nothing would keep its duration.
    started: Option<Instant>,
    pub(crate) span: Span,
    peer: Option<SocketAddr>,
    id: Option<u64>,
}

impl Observer {
    /// `listeners` hear of every call's end, in order.
    pub(crate) fn new(side: Side, listeners: Vec<EndListener>) -> Self {
        Observer {
            side,
            instruments: Instruments::new(side),
            listeners: listeners.into(),
        }
    }

    /// A new observer for the same side and numbers with other listeners (a client that
    /// gained an interceptor).
    pub(crate) fn with_listeners(&self, listeners: Vec<EndListener>) -> Self {
        Observer {
            side: self.side,
            instruments: self.instruments.clone(),
            listeners: listeners.into(),
        }
    }

    /// Whether anything would keep the duration of a call started now: a listener, a
    /// subscriber (for the span's `duration`), or a recorder that keeps durations (or one
    /// not yet seen not to). When nothing would, a client call is started untimed and
    /// costs no clock reads.
    pub(crate) fn times_calls(&self) -> bool {
        !self.listeners.is_empty()
            || !self.instruments.is_untimed()
            || tracing::dispatcher::has_been_set()
    }

    /// The metrics slot of a server's call to `method`, found first in `cached` (the
    /// connection's) if there is one. `known` says whether the service routes `method`:
    /// unknown methods are counted together, so that made-up names cannot grow the metrics
    /// without bound.
    pub(crate) fn slot(
        &self,
        method: &str,
        known: impl FnOnce() -> bool,
        cached: Option<&mut MethodSlots>,
    ) -> Slot {
        match cached {
            Some(cached) => cached.get_or_insert(method, || self.instruments.slot(method, known)),
            None => self.instruments.slot(method, known),
        }
    }

    /// Starts watching a client's call to `method`, made at `now` (`None`: untimed, see
    /// [`times_calls`](Self::times_calls)).
    // A `Cow`, not a `&str`: whether it borrows says the path is a literal.
    #[allow(clippy::ptr_arg)]
    pub(crate) fn start_client(
        &self,
        method: &Cow<'static, str>,
        now: Option<Instant>,
    ) -> CallWatch {
        let slot = match method {
            Cow::Borrowed(literal) => self.instruments.literal_slot(literal, || true),
            Cow::Owned(path) => self.instruments.slot(path, || true),
        };
        let name = || MethodName::Path(method.clone());
        self.start(method, slot, name, None, None, now)
    }

    /// Starts watching a call to `method`, counted in `slot`, that arrived (or was made)
    /// at `now` (`None`: untimed). `name` keeps the method for the listeners.
    pub(crate) fn start(
        &self,
        method: &str,
        slot: Slot,
        name: impl FnOnce() -> MethodName,
        peer: Option<SocketAddr>,
        id: Option<u64>,
        now: Option<Instant>,
    ) -> CallWatch {
        self.instruments.started(slot);
        // Before any subscriber exists, every span is disabled: skip building one (and, with
        // tracing's `log` feature on, its fallback to the `log` crate).
        let span = match self.side {
            _ if !tracing::dispatcher::has_been_set() => Span::none(),
            Side::Server => tracing::info_span!(
                target: "gorpc::server",
                "call",
                %method,
                peer = peer.map(tracing::field::display),
                id,
                code = Empty,
                duration = Empty,
            ),
            Side::Client => tracing::info_span!(
                target: "gorpc::client",
                "call",
                %method,
                peer = peer.map(tracing::field::display),
                id,
                code = Empty,
                duration = Empty,
            ),
        };
        CallWatch {
            method: (!self.listeners.is_empty()).then(name),
            slot,
            started: now,
            span,
            peer,
            id,
        }
    }

    /// Request message bytes of a watched call.
    pub(crate) fn request_bytes(&self, watch: &CallWatch, bytes: usize) {
        self.instruments.request_bytes(watch.slot, bytes);
    }

    /// Response message bytes of a watched call.
    pub(crate) fn response_bytes(&self, watch: &CallWatch, bytes: usize) {
        self.instruments.response_bytes(watch.slot, bytes);
    }

    /// Ends a watched call: counts it, records its duration, closes its span with one log
    /// line, and tells the listeners.
    pub(crate) fn end(&self, watch: &CallWatch, end: CallEnd, status: Option<&Status>) {
        // Measured when first asked for: a no-op recorder never asks.
        let elapsed = watch.started.map(Elapsed::since);
        let code = end.code();
        self.instruments.ended(watch.slot, code, elapsed.as_ref());
        let span = &watch.span;
        // A span no subscriber wants has nothing to record or enter: skip the work.
        let _entered = (!span.is_disabled()).then(|| {
            span.record(
                "code",
                tracing::field::display(instruments::code_label(code)),
            );
            if let Some(elapsed) = &elapsed {
                span.record("duration", tracing::field::debug(elapsed.get()));
            }
            span.enter()
        });
        let what = end.describe();
        let message = status.map(Status::message).filter(|m| !m.is_empty());
        let (colon, message) = match message {
            Some(message) => (": ", message),
            None => ("", ""),
        };
        match code {
            Code::Ok => tracing::debug!(target: "gorpc::call", "{what}"),
            Code::Internal | Code::Unknown | Code::DataLoss => {
                tracing::error!(target: "gorpc::call", "{what}{colon}{message}")
            }
            _ => tracing::warn!(target: "gorpc::call", "{what}{colon}{message}"),
        }
        let Some(method) = &watch.method else {
            return;
        };
        let ended = EndedCall {
            method: method.as_str(),
            peer: watch.peer,
            id: watch.id,
            // Listeners make every call timed.
            duration: elapsed.map_or(Duration::ZERO, |elapsed| elapsed.get()),
            end,
            status,
        };
        for listener in self.listeners.iter() {
            listener(&ended);
        }
    }
}

/// A watched call that reports itself if dropped before it is ended (its future was
/// dropped: the peer went away or cancelled), for drivers whose calls live in futures
/// they do not own (hyper's).
pub(crate) struct WatchGuard {
    observer: Arc<Observer>,
    watch: Option<CallWatch>,
    /// How the call ended if it is dropped unended.
    if_dropped: CallEnd,
}

impl WatchGuard {
    pub(crate) fn new(observer: Arc<Observer>, watch: CallWatch, if_dropped: CallEnd) -> Self {
        WatchGuard {
            observer,
            watch: Some(watch),
            if_dropped,
        }
    }

    /// The call's span, for its handler to run in.
    #[cfg(feature = "http")]
    pub(crate) fn span(&self) -> Span {
        self.watch
            .as_ref()
            .map_or_else(Span::none, |watch| watch.span.clone())
    }

    #[cfg(feature = "http")]
    pub(crate) fn request_bytes(&self, bytes: usize) {
        if let Some(watch) = &self.watch {
            self.observer.request_bytes(watch, bytes);
        }
    }

    pub(crate) fn response_bytes(&self, bytes: usize) {
        if let Some(watch) = &self.watch {
            self.observer.response_bytes(watch, bytes);
        }
    }

    /// Ends the call, once; later calls do nothing.
    pub(crate) fn end(&mut self, end: CallEnd, status: Option<&Status>) {
        if let Some(watch) = self.watch.take() {
            self.observer.end(&watch, end, status);
        }
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let end = self.if_dropped;
        self.end(end, None);
    }
}

pin_project_lite::pin_project! {
    /// A client's unary call, watched: it runs in the call's span (when a subscriber
    /// wants it), its end is reported when it resolves, and if it is dropped first it
    /// ends `Cancelled` (the caller stopped waiting). A plain struct around the call's
    /// future rather than one more async fn, so that the future is not copied once more.
    pub(crate) struct ObservedCall<'a, F> {
        #[pin]
        call: F,
        observer: &'a Observer,
        watch: CallWatch,
        ended: bool,
    }

    impl<F> PinnedDrop for ObservedCall<'_, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.ended {
                this.observer.end(this.watch, CallEnd::Cancelled, None);
            }
        }
    }
}

impl<'a, F> ObservedCall<'a, F> {
    /// Watches `call`, a call that `observer` started watching with `watch`.
    pub(crate) fn new(call: F, observer: &'a Observer, watch: CallWatch) -> Self {
        ObservedCall {
            call,
            observer,
            watch,
            ended: false,
        }
    }
}

impl<F> Future for ObservedCall<'_, F>
where
    F: Future<Output = Result<crate::client::RawResponse, Status>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = {
            let span = &this.watch.span;
            let _entered = (!span.is_disabled()).then(|| span.enter());
            ready!(this.call.poll(cx))
        };
        // Ended here, once: a future is not polled again after it is ready.
        *this.ended = true;
        let (observer, watch) = (*this.observer, &*this.watch);
        match &result {
            Ok(response) => {
                observer.response_bytes(watch, response.body.len());
                observer.end(watch, CallEnd::Answered(Code::Ok), None);
            }
            Err(status) => observer.end(watch, CallEnd::of_client_error(status), Some(status)),
        }
        Poll::Ready(result)
    }
}

/// Names the peer a client call went to in its span (the current one), once a connection
/// is picked: the client's span opens before the pool or balancer chooses.
pub(crate) fn record_peer(peer: SocketAddr) {
    if !tracing::dispatcher::has_been_set() {
        return;
    }
    let span = Span::current();
    if !span.is_disabled() {
        span.record("peer", tracing::field::display(peer));
    }
}

/// How an answer ends a call: its status's code.
pub(crate) fn answered(status: &Status) -> CallEnd {
    CallEnd::Answered(status.code())
}

/// Counts one open connection in the `connections` gauge of its side while it lives.
pub(crate) struct ConnectionGauge(metrics::Gauge);

impl ConnectionGauge {
    pub(crate) fn new(side: Side) -> Self {
        let gauge = metrics::gauge!(instruments::connections_name(side));
        gauge.increment(1.0);
        ConnectionGauge(gauge)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl std::fmt::Debug for ConnectionGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionGauge")
    }
}
