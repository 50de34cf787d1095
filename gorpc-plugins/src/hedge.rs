//! Hedged requests: [`Hedge`] sends another attempt of a slow call to an idempotent method,
//! as its method's [`Hedging`] and the client's [`RetryBudget`] allow, and keeps the first
//! answer.
//!
//! It is the driver that [`gorpc::proto::policy`] describes: one budget per interceptor
//! (install one `Hedge` per client), [`RetryBudget::on_call`] once per hedged call, the
//! original attempt at once, then [`Hedging::poll_hedge`] whenever its timer fires, which
//! says when the next attempt is due, takes its budget token, and refuses any attempt that
//! would start at or after the call's deadline. Every attempt carries the call's own
//! deadline, so none outlives it.
//!
//! Only methods registered with [`Hedge::method`] are hedged: running a call twice is safe
//! only for idempotent methods, so hedging is opt-in per method and every other call passes
//! straight through. The first successful answer wins; the attempts still running are
//! dropped, which cancels them on the server. An attempt that fails with `Unavailable` (its
//! connection failed, say) leaves the others running and the schedule going; any other
//! error is the server's answer and returns at once, cancelling the rest. When every attempt
//! has failed and no more are due, the last error returns.
//!
//! Every attempt runs the rest of the chain again (later interceptors, then the network),
//! with the original call's metadata, body and deadline. Add `Hedge` after interceptors that
//! should run once per call and before those that should see every attempt. Its budget is
//! its own: a [`Retry`](crate::retry::Retry) on the same client draws on another one.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use gorpc::client::OutgoingCall;
use gorpc::proto::policy::{HedgeDecision, Hedging, RetryBudget};
use gorpc::runtime::Sleep;
use gorpc::{ClientInterceptor, ClientNext, Code, RawResponse, Runtime, Status};

/// A client interceptor that hedges calls to idempotent methods.
///
/// `Hedging` is a plain schedule (it keeps no state between calls), so each method's policy
/// is copied into the call; only the budget is shared, behind a `Mutex` held for one
/// `on_call` or `poll_hedge`, never across an await.
pub struct Hedge<R: Runtime> {
    runtime: R,
    methods: HashMap<Box<str>, Hedging>,
    budget: Arc<Mutex<RetryBudget>>,
}

impl<R: Runtime> Hedge<R> {
    /// Hedges nothing until methods are added with [`method`](Self::method); hedges draw on
    /// [`RetryBudget::standard`]; hedge timers run on `runtime`.
    pub fn new(runtime: R) -> Self {
        Hedge {
            runtime,
            methods: HashMap::new(),
            budget: Arc::new(Mutex::new(RetryBudget::standard(Instant::now()))),
        }
    }

    /// Replaces the budget, shared by all the calls through this interceptor.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Arc::new(Mutex::new(budget));
        self
    }

    /// Hedges calls to `method` (a full path, "/package.Service/Method"), which must be
    /// idempotent, per `hedging`.
    pub fn method(mut self, method: impl Into<Box<str>>, hedging: Hedging) -> Self {
        self.methods.insert(method.into(), hedging);
        self
    }
}

impl<R: Runtime> fmt::Debug for Hedge<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("methods", &self.methods)
            .field("budget", &*lock(&self.budget))
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> ClientInterceptor for Hedge<R> {
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let Some(&hedging) = self.methods.get(&*call.method) else {
            return next.run(call);
        };
        let budget = self.budget.clone();
        let runtime = self.runtime.clone();
        let started = Instant::now();
        lock(&budget).on_call(started);
        async move {
            let mut attempts = FuturesUnordered::new();
            attempts.push(next.clone().run(call.clone()));
            let mut sent = 1;
            let mut last_error = None;
            // The hedge timer, armed while the schedule says "wait"; `None` once it says stop.
            let mut timer: Option<R::Sleep> = None;
            let mut hedging_done = false;
            loop {
                if !hedging_done {
                    let decision = hedging.poll_hedge(
                        started,
                        sent,
                        Instant::now(),
                        call.deadline,
                        &mut lock(&budget),
                    );
                    match decision {
                        HedgeDecision::SendNow => {
                            attempts.push(next.clone().run(call.clone()));
                            sent += 1;
                            continue;
                        }
                        HedgeDecision::WaitUntil(at) => match &mut timer {
                            Some(timer) => timer.reset(at),
                            None => timer = Some(runtime.sleep_until(at)),
                        },
                        HedgeDecision::Stop => {
                            hedging_done = true;
                            timer = None;
                        }
                    }
                }
                // Attempts all failed with `Unavailable` while more are due: wait for the next.
                if attempts.is_empty() && hedging_done {
                    return Err(last_error.unwrap_or_else(|| {
                        Status::new(Code::Unavailable, "no hedged attempt could be sent")
                    }));
                }
                let woke = std::future::poll_fn(|cx| {
                    if let Poll::Ready(Some(result)) = attempts.poll_next_unpin(cx) {
                        return Poll::Ready(Some(result));
                    }
                    match timer.as_mut().map(|timer| timer.poll_unpin(cx)) {
                        Some(Poll::Ready(())) => Poll::Ready(None),
                        _ => Poll::Pending,
                    }
                })
                .await;
                match woke {
                    // The timer fired: ask the schedule again.
                    None => {}
                    Some(Ok(response)) => return Ok(response),
                    Some(Err(status)) if status.code() == Code::Unavailable => {
                        last_error = Some(status);
                    }
                    Some(Err(status)) => return Err(status),
                }
            }
        }
        .boxed()
    }
}

/// The budget is valid after any panic (each method leaves it consistent), so a poisoned
/// lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
