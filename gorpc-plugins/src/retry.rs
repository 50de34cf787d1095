//! Retries: [`Retry`] sends a failed call again when its method's
//! [`RetryPolicy`] and the client's [`RetryBudget`] allow it.
//!
//! It is the driver that [`gorpc::proto::policy`] describes: one budget per interceptor
//! (install one `Retry` per client), [`RetryBudget::on_call`] once per call,
//! [`RetryPolicy::decide`] after each failed attempt, a sleep on the client's runtime until
//! the instant it returns, and the last status when it gives up. `decide` already refuses a
//! retry whose backoff would end at or after the call's deadline, so no attempt is sent past
//! it; successful answers and codes the policy does not retry return at once.
//!
//! A call that failed with `Unavailable` after its request was written may have run on the
//! server, so retrying it means at-least-once: give methods that are not idempotent a policy
//! with one attempt (`.method(path, ...)`). Calls that never left the client are resent by
//! the client itself, without this interceptor.
//!
//! Every attempt runs the rest of the chain again (later interceptors, then the network),
//! with the original call's metadata, body and deadline. Add `Retry` after interceptors that
//! should run once per call and before those that should see every attempt.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use gorpc::client::OutgoingCall;
use gorpc::proto::policy::{RetryBudget, RetryDecision, RetryPolicy};
use gorpc::{ClientInterceptor, ClientNext, RawResponse, Runtime, Status};

/// A client interceptor that retries failed calls.
///
/// Each policy lives behind a `Mutex` shared by all the calls to its method(s), rather than
/// being cloned per call: its RNG then advances from call to call, so concurrent calls that
/// fail together draw different backoffs instead of the same jitter sequence (which would
/// send their retries in lockstep), and the whole sequence stays reproducible from the seed.
/// The locks are held only for a `decide`, never across an await.
pub struct Retry<R: Runtime> {
    runtime: R,
    default: Arc<Mutex<RetryPolicy>>,
    methods: HashMap<Box<str>, Arc<Mutex<RetryPolicy>>>,
    budget: Arc<Mutex<RetryBudget>>,
}

impl<R: Runtime> Retry<R> {
    /// Retries every method per `policy`, within [`RetryBudget::standard`]; sleeps between
    /// attempts on `runtime`.
    pub fn new(runtime: R, policy: RetryPolicy) -> Self {
        Retry {
            runtime,
            default: Arc::new(Mutex::new(policy)),
            methods: HashMap::new(),
            budget: Arc::new(Mutex::new(RetryBudget::standard(Instant::now()))),
        }
    }

    /// Replaces the budget, shared by all the calls through this interceptor.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Arc::new(Mutex::new(budget));
        self
    }

    /// Retries calls to `method` (a full path, "/package.Service/Method") per `policy`
    /// instead of the default one. They still draw on the same budget.
    pub fn method(mut self, method: impl Into<Box<str>>, policy: RetryPolicy) -> Self {
        self.methods
            .insert(method.into(), Arc::new(Mutex::new(policy)));
        self
    }
}

impl<R: Runtime> fmt::Debug for Retry<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("default", &*lock(&self.default))
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .field("budget", &*lock(&self.budget))
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> ClientInterceptor for Retry<R> {
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let policy = self
            .methods
            .get(&*call.method)
            .unwrap_or(&self.default)
            .clone();
        let budget = self.budget.clone();
        let runtime = self.runtime.clone();
        lock(&budget).on_call(Instant::now());
        async move {
            let mut attempt = 1;
            loop {
                let status = match next.clone().run(call.clone()).await {
                    Ok(response) => return Ok(response),
                    Err(status) => status,
                };
                // Policy, then budget: the order wherever both are locked (here and in `Debug`).
                let decision = lock(&policy).decide(
                    attempt,
                    &status,
                    Instant::now(),
                    call.deadline,
                    &mut lock(&budget),
                );
                match decision {
                    RetryDecision::RetryAt(at) => {
                        runtime.sleep_until(at).await;
                        attempt += 1;
                    }
                    RetryDecision::GiveUp(_) => return Err(status),
                }
            }
        }
        .boxed()
    }
}

/// The state is valid after any panic (each method leaves it consistent), so a poisoned
/// lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
