//! Per-method retries: which codes, how many attempts, exponential backoff with full jitter.

use std::time::{Duration, Instant};

use super::RetryBudget;
use crate::balance::SplitMix64;
use crate::{Code, Status};

/// Exponential backoff with full jitter: the wait before retry `n` (0 for the first retry)
/// is uniform in `[0, min(max, base * multiplier^n)]` (AWS's "full jitter").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first retry's wait.
    pub base: Duration,
    /// The highest ceiling, however many retries came before.
    pub max: Duration,
    /// At least 1.0; smaller values and NaN are treated as 1.0.
    pub multiplier: f64,
}

impl Default for Backoff {
    /// 50 ms doubling up to 5 s.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_secs(5),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The upper end of the wait before retry `retry` (0 for the first retry):
    /// `min(max, base * multiplier^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let mult = if self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let max = u64::try_from(self.max.as_nanos()).unwrap_or(u64::MAX);
        let base = u64::try_from(self.base.as_nanos()).unwrap_or(u64::MAX);
        // In nanoseconds; exact for the first retry, rounded down after.
        let grown = base as f64 * mult.powi(retry.min(4096) as i32);
        if !grown.is_finite() || grown >= max as f64 {
            return Duration::from_nanos(max);
        }
        Duration::from_nanos((grown as u64).min(max))
    }

    /// Draws the wait before retry `retry` from `rng`.
    pub fn draw(&self, retry: u32, rng: &mut SplitMix64) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.below(ceiling.saturating_add(1)))
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Send the next attempt at this instant (never before `now`, always before the
    /// deadline). A budget token has been taken for it.
    RetryAt(Instant),
    /// Finish the call with the last attempt's status.
    GiveUp(GiveUpReason),
}

/// Why [`RetryPolicy::decide`] gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The status code is not retryable for this method (`Ok` included).
    NotRetryable(Code),
    /// The attempt that failed was the last one allowed.
    AttemptsExhausted,
    /// The backoff would end at or after the call's deadline.
    DeadlineTooClose,
    /// The client's retry budget has no token left.
    BudgetExhausted,
}

/// The retry policy of one method: the driver calls [`decide`](Self::decide) after each
/// failed attempt.
///
/// Holds its own caller-seeded RNG for the jitter: the same seed and the same sequence of
/// calls give the same backoffs.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    max_attempts: u32,
    /// Bit `c` set when `Code` `c` is retryable.
    retryable: u32,
    backoff: Backoff,
    rng: SplitMix64,
}

impl RetryPolicy {
    /// Three attempts in all, retrying `Unavailable` only, with [`Backoff::default`].
    pub fn new(seed: u64) -> Self {
        RetryPolicy {
            max_attempts: 3,
            retryable: bit(Code::Unavailable),
            backoff: Backoff::default(),
            rng: SplitMix64::new(seed),
        }
    }

    /// Attempts in all, the original included; at least 1 (1 never retries).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Makes `code` retryable too (`ResourceExhausted` is the usual addition). `Ok` is
    /// never retried.
    pub fn with_retryable(mut self, code: Code) -> Self {
        if code != Code::Ok {
            self.retryable |= bit(code);
        }
        self
    }

    /// Replaces the set of retryable codes.
    pub fn with_retryable_codes(mut self, codes: &[Code]) -> Self {
        self.retryable = 0;
        for &code in codes {
            self = self.with_retryable(code);
        }
        self
    }

    /// Replaces the backoff between attempts (default: [`Backoff::default`]).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Attempts in all, the original included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Whether a failure with `code` may be retried (the other checks of
    /// [`decide`](Self::decide) aside).
    pub fn is_retryable(&self, code: Code) -> bool {
        self.retryable & bit(code) != 0
    }

    /// Decides after attempt number `attempt` (1 for the original call) failed with
    /// `status` at `now`.
    ///
    /// Checks, in order: the code is retryable (or the server sent a retry hint,
    /// [`Status::retry_after`]: it refused the call before running it and asks for a
    /// retry later), `attempt < max_attempts`, the wait ends strictly before `deadline`
    /// (the server's hint when it gave one, as gRPC's pushback; otherwise the jittered
    /// backoff for retry `attempt - 1`), and last a token
    /// can be withdrawn from `budget`, which this method does itself. So a token is spent
    /// only on [`RetryDecision::RetryAt`], and the caller must not withdraw one again. The
    /// RNG advances only once the first two checks pass.
    pub fn decide(
        &mut self,
        attempt: u32,
        status: &Status,
        now: Instant,
        deadline: Option<Instant>,
        budget: &mut RetryBudget,
    ) -> RetryDecision {
        let code = status.code();
        let pushback = status.retry_after();
        if !self.is_retryable(code) && pushback.is_none() {
            return RetryDecision::GiveUp(GiveUpReason::NotRetryable(code));
        }
        if attempt >= self.max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        let wait = match pushback {
            Some(wait) => wait,
            None => self.backoff.draw(attempt.saturating_sub(1), &mut self.rng),
        };
        let Some(at) = now.checked_add(wait) else {
            return RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose);
        };
        if deadline.is_some_and(|d| at >= d) {
            return RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose);
        }
        if !budget.try_withdraw(now) {
            return RetryDecision::GiveUp(GiveUpReason::BudgetExhausted);
        }
        RetryDecision::RetryAt(at)
    }
}

fn bit(code: Code) -> u32 {
    1 << (code as u32)
}
