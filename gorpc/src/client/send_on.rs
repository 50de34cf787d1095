//! A unary call sent on a connection of a pool: the hot path of every binary-protocol
//! call, written as a plain state machine rather than an async fn so that its future stays
//! small (an async fn's keeps a slot for each of its locals, and the whole future is
//! copied at every layer it is handed through).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use futures::FutureExt as _;
use gorpc_proto::{Code, Status};

use super::conn::{CallOutcome, Connection, PendingCall};
use super::pool::{Checkout, Pool};
use super::{OutgoingCall, RawResponse, NOT_SENT_RETRIES};
use crate::metadata::Metadata;

/// Sends `call` on a connection of `pool`, again on another one if it never left (the
/// connection closed before taking it). A call no connection took comes back with the
/// reason, so that it can go to another endpoint.
pub(crate) fn send_on(pool: &dyn Pool, call: OutgoingCall) -> SendOn<'_> {
    SendOn {
        pool,
        tries: 0,
        connecting: None,
        stage: Stage::Checkout(call),
    }
}

/// The future of [`send_on`].
pub(crate) struct SendOn<'a> {
    pool: &'a dyn Pool,
    /// Connections tried so far.
    tries: usize,
    /// The pool's connection being made, while `stage` is `Connecting`. Kept out of
    /// `stage` so that the stage, moved on every call, stays small.
    connecting: Option<BoxFuture<'a, Result<Connection, Status>>>,
    stage: Stage,
}

enum Stage {
    /// To be given a connection.
    Checkout(OutgoingCall),
    /// Waiting for the pool's connection (it is connecting).
    Connecting(OutgoingCall),
    /// On a connection, waiting for the answer.
    Sent(PendingCall),
    Done,
}

/// What [`SendOn`] resolves to: the call's result, or the call back if it never left
/// (boxed: a rare case, and the common one's result stays small).
pub(crate) type Sent = Result<Result<RawResponse, Status>, Box<(Status, OutgoingCall)>>;

impl SendOn<'_> {
    /// Hands `call` to `conn`; one the connection did not take goes back to checkout,
    /// unless the server turned the connection away: then the call ends with its status.
    fn start(&mut self, conn: Connection, call: OutgoingCall) -> Option<Sent> {
        crate::observe::record_peer(conn.peer());
        self.stage = match conn.start(call) {
            Ok(pending) => Stage::Sent(pending),
            Err(unsent) => match conn.refusal() {
                Some(refusal) => return Some(Ok(Err(refusal.clone()))),
                None => Stage::Checkout(unsent),
            },
        };
        None
    }
}

impl Future for SendOn<'_> {
    type Output = Sent;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent> {
        let this = &mut *self;
        loop {
            // The common case, polled in place: the call is out, its answer awaited.
            if let Stage::Sent(pending) = &mut this.stage {
                match ready!(pending.poll_unpin(cx)) {
                    CallOutcome::NotSent(call) => this.stage = Stage::Checkout(call),
                    outcome => {
                        this.stage = Stage::Done;
                        return Poll::Ready(Ok(answer(outcome)));
                    }
                }
            }
            match std::mem::replace(&mut this.stage, Stage::Done) {
                Stage::Checkout(call) => {
                    if this.tries > NOT_SENT_RETRIES {
                        let status = Status::new(
                            Code::Unavailable,
                            "no connection stayed open long enough to send the call",
                        );
                        return Poll::Ready(Err(Box::new((status, call))));
                    }
                    this.tries += 1;
                    match this.pool.checkout(call.deadline) {
                        Checkout::Ready(conn) => {
                            if let Some(sent) = this.start(conn, call) {
                                return Poll::Ready(sent);
                            }
                        }
                        Checkout::Wait(wait) => {
                            this.connecting = Some(wait);
                            this.stage = Stage::Connecting(call);
                        }
                        Checkout::Failed(status) => {
                            return Poll::Ready(Err(Box::new((status, call))))
                        }
                    }
                }
                Stage::Connecting(call) => {
                    let wait = this.connecting.as_mut().expect("connecting");
                    let Poll::Ready(connected) = wait.poll_unpin(cx) else {
                        this.stage = Stage::Connecting(call);
                        return Poll::Pending;
                    };
                    this.connecting = None;
                    let conn = match connected {
                        Ok(conn) => conn,
                        Err(status) => return Poll::Ready(Err(Box::new((status, call)))),
                    };
                    if let Some(sent) = this.start(conn, call) {
                        return Poll::Ready(sent);
                    }
                }
                // Polled above, and set again only by `start`, which the loop follows.
                sent @ Stage::Sent(_) => this.stage = sent,
                Stage::Done => panic!("SendOn polled after it completed"),
            }
        }
    }
}

/// The result of a call that a connection took and ended.
fn answer(outcome: CallOutcome) -> Result<RawResponse, Status> {
    match outcome {
        CallOutcome::Answered(rsp) if rsp.status.is_ok() => {
            let metadata = Metadata::from_wire(rsp.head.metadata(), rsp.head.as_bytes());
            Ok(RawResponse {
                codec: rsp.codec,
                metadata,
                body: rsp.body,
            })
        }
        CallOutcome::Answered(rsp) => {
            let metadata = Metadata::from_wire(rsp.head.metadata(), rsp.head.as_bytes());
            Err(crate::metadata::with_retry_hint(rsp.status, &metadata))
        }
        CallOutcome::Failed(status) => Err(status),
        CallOutcome::NotSent(_) => unreachable!("a call not sent is sent again"),
    }
}
