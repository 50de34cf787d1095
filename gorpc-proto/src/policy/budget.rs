//! A token bucket that keeps retries (and hedges) to a fraction of a client's traffic.

use std::time::{Duration, Instant};

/// Milli-tokens per token: the bucket counts in fixed point so deposits like 0.1 are exact.
const MILLI: u64 = 1000;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Limits retries to a fraction of the traffic of one client, as gRPC's retry throttling and
/// Finagle's `RetryBudget` do, so that retries cannot multiply the load on a struggling
/// service.
///
/// Each original call deposits `ratio` tokens ([`on_call`](Self::on_call)), up to
/// `max_tokens`; each retry or hedge withdraws one whole token
/// ([`try_withdraw`](Self::try_withdraw)). With `ratio` 0.1, 1,000 calls pay for 100 retries.
/// So that a client with little traffic can still retry, a separate reserve refills at
/// `min_retries_per_sec` tokens per second (holding at most one second's worth, and full at
/// creation); it is drawn on only when the deposits are spent.
///
/// Shared by all the calls of one client. [`RetryPolicy::decide`](super::RetryPolicy::decide)
/// and [`Hedging::poll_hedge`](super::Hedging::poll_hedge) withdraw from it themselves; the
/// driver only calls [`on_call`](Self::on_call) for each original call.
#[derive(Clone, Debug)]
pub struct RetryBudget {
    /// Milli-tokens deposited per original call.
    deposit: u64,
    /// Cap on `balance`, in milli-tokens.
    cap: u64,
    balance: u64,
    /// Reserve refill rate, tokens per second; also the reserve's cap in tokens.
    min_per_sec: u64,
    reserve: u64,
    /// The instant up to which the reserve has been refilled.
    refilled_to: Instant,
}

impl RetryBudget {
    /// `ratio` is clamped to `0.0..=1000.0` (NaN counts as 0) and kept to three decimals.
    pub fn new(ratio: f64, max_tokens: u32, min_retries_per_sec: u32, now: Instant) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1000.0)
        };
        let min_per_sec = u64::from(min_retries_per_sec);
        RetryBudget {
            deposit: (ratio * MILLI as f64).round() as u64,
            cap: u64::from(max_tokens) * MILLI,
            balance: 0,
            min_per_sec,
            reserve: min_per_sec * MILLI,
            refilled_to: now,
        }
    }

    /// Finagle's defaults: 20% of calls, at most 100 banked tokens, 10 retries a second.
    pub fn standard(now: Instant) -> Self {
        Self::new(0.2, 100, 10, now)
    }

    /// An original call is starting: deposit `ratio` tokens.
    pub fn on_call(&mut self, now: Instant) {
        self.refill(now);
        self.balance = (self.balance + self.deposit).min(self.cap);
    }

    /// Takes one token for a retry or a hedge, from the deposits first, then the reserve.
    /// `false` (and nothing taken) if neither holds a whole token.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.balance >= MILLI {
            self.balance -= MILLI;
            true
        } else if self.reserve >= MILLI {
            self.reserve -= MILLI;
            true
        } else {
            false
        }
    }

    /// Whole tokens available now (deposits and reserve together).
    pub fn available(&mut self, now: Instant) -> u32 {
        self.refill(now);
        let whole = self.balance / MILLI + self.reserve / MILLI;
        u32::try_from(whole).unwrap_or(u32::MAX)
    }

    fn refill(&mut self, now: Instant) {
        let reserve_cap = self.min_per_sec * MILLI;
        if self.reserve >= reserve_cap {
            self.refilled_to = self.refilled_to.max(now);
            return;
        }
        let elapsed = now.saturating_duration_since(self.refilled_to).as_nanos();
        let rate = u128::from(self.min_per_sec * MILLI); // milli-tokens per second
        let add = elapsed * rate / NANOS_PER_SEC;
        if add == 0 {
            return; // keep the fraction for later
        }
        let room = u128::from(reserve_cap - self.reserve);
        if add >= room {
            self.reserve = reserve_cap;
            self.refilled_to = now;
        } else {
            self.reserve += add as u64;
            // Advance only by the time those milli-tokens took, so no fraction is lost.
            let used = add * NANOS_PER_SEC / rate;
            self.refilled_to += Duration::from_nanos(used as u64);
        }
    }
}
