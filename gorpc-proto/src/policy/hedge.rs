//! Hedged requests for idempotent methods: send another attempt when the first is slow.

use std::time::{Duration, Instant};

use super::RetryBudget;

/// Hedging for one idempotent method: up to `max_attempts` copies of a call, the `n`-th
/// (0-based) sent `n * delay` after the call started, all in flight together.
///
/// Only for methods that are safe to run more than once. The driver sends the original
/// attempt at `started`, then asks [`poll_hedge`](Self::poll_hedge) (when its hedge timer
/// fires, or whenever it wakes) whether to send the next one. Once any attempt answers OK,
/// the driver cancels all the others and stops asking; this policy keeps no per-call state
/// and cannot do that itself. Each hedge beyond the original costs one token of the shared
/// [`RetryBudget`], and no hedge is sent at or after the call's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hedging {
    max_attempts: u32,
    delay: Duration,
}

/// What [`Hedging::poll_hedge`] advises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeDecision {
    /// Send the next attempt now; a budget token has been taken for it.
    SendNow,
    /// Not yet: ask again at this instant.
    WaitUntil(Instant),
    /// No more hedges for this call: the cap is reached, the next one would start at or
    /// after the deadline, or the budget is empty (which does not refill in time to matter,
    /// so the driver stops asking).
    Stop,
}

impl Hedging {
    /// `max_attempts` counts the original call and is at least 1 (1 never hedges).
    pub fn new(max_attempts: u32, delay: Duration) -> Self {
        Hedging {
            max_attempts: max_attempts.max(1),
            delay,
        }
    }

    /// Copies of a call in all, the original included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The time between one attempt and the next.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The schedule alone: when attempt number `sent` (0-based: `sent` attempts have gone
    /// out) is due, `started + sent * delay`; `None` once `sent` reaches the cap. Ignores
    /// the budget and the deadline; [`poll_hedge`](Self::poll_hedge) applies them.
    pub fn next_hedge_at(&self, started: Instant, sent: u32) -> Option<Instant> {
        if sent >= self.max_attempts {
            return None;
        }
        started.checked_add(self.delay.checked_mul(sent)?)
    }

    /// Whether to send another attempt of a call that started at `started` and has sent
    /// `sent` attempts so far (the original included), at `now`. Withdraws the budget
    /// token itself when it answers [`HedgeDecision::SendNow`] for a hedge (`sent >= 1`);
    /// the original (`sent == 0`) is free.
    pub fn poll_hedge(
        &self,
        started: Instant,
        sent: u32,
        now: Instant,
        deadline: Option<Instant>,
        budget: &mut RetryBudget,
    ) -> HedgeDecision {
        let Some(at) = self.next_hedge_at(started, sent) else {
            return HedgeDecision::Stop;
        };
        if sent > 0 && deadline.is_some_and(|d| at.max(now) >= d) {
            return HedgeDecision::Stop;
        }
        if now < at {
            return HedgeDecision::WaitUntil(at);
        }
        if sent > 0 && !budget.try_withdraw(now) {
            return HedgeDecision::Stop;
        }
        HedgeDecision::SendNow
    }
}
