//! Reliability decisions as pure policies: retries, a retry budget, hedging and circuit
//! breaking.
//!
//! Like the rest of the core these are plain state machines: they read no clock (every
//! method that needs the time takes `now: Instant`), draw randomness only from a
//! caller-seeded [`SplitMix64`](crate::balance::SplitMix64), and do no IO. They decide; the
//! driver (the client in `gorpc`, or your own event loop) acts: it arms timers, sends
//! attempts and cancels them. They are not wired into the client yet.
//!
//! Who calls what, for one client:
//!
//! - One [`RetryBudget`] per client, shared by all its calls (and by hedging). The driver
//!   calls [`RetryBudget::on_call`] once per original call (never for a retry or a hedge).
//! - One [`RetryPolicy`] per method. When an attempt fails, the driver calls
//!   [`RetryPolicy::decide`], which checks the status code, the attempt cap, the deadline
//!   and, last, withdraws one token from the budget it is handed. On
//!   [`RetryDecision::RetryAt`] the driver sleeps until that instant and sends the next
//!   attempt; on [`RetryDecision::GiveUp`] it finishes the call with the last status.
//! - One [`Hedging`] per idempotent method, instead of a retry policy. The driver sends the
//!   first attempt, then asks [`Hedging::poll_hedge`] (or just reads the schedule from
//!   [`Hedging::next_hedge_at`]) when to send the next one; each hedge costs a budget token.
//!   The first attempt that answers OK wins: the driver cancels the others.
//! - One [`CircuitBreaker`] per endpoint. The driver asks [`CircuitBreaker::allow`] before
//!   sending an attempt to that endpoint and reports the attempt's outcome with
//!   [`CircuitBreaker::on_success`] or [`CircuitBreaker::on_failure`] (or
//!   [`CircuitBreaker::on_abandoned`] if it never got one). Which statuses count as a
//!   failure is the driver's choice; transport errors, `Unavailable` and
//!   `DeadlineExceeded` are the usual ones, application errors are not.
//!
//! The policies are independent: a call can be both retried and guarded by a breaker, and a
//! rejection by an open breaker is just another failed attempt for the retry policy
//! (status `Unavailable`).

mod breaker;
mod budget;
mod hedge;
mod retry;

pub use breaker::{Admission, BreakerState, CircuitBreaker};
pub use budget::RetryBudget;
pub use hedge::{HedgeDecision, Hedging};
pub use retry::{Backoff, GiveUpReason, RetryDecision, RetryPolicy};
