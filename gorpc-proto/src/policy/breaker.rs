//! A circuit breaker per endpoint: stop sending to an endpoint that keeps failing.

use std::time::{Duration, Instant};

/// The three states of a [`CircuitBreaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are rejected until the cool-down ends.
    Open,
    /// The cool-down has ended: a limited number of trial calls go through.
    HalfOpen,
}

/// What [`CircuitBreaker::allow`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send the call.
    Allowed,
    /// Half-open: send the call as one of the trials; report its outcome.
    Trial,
    /// Open: do not send before this instant.
    Open {
        /// When the cool-down ends.
        until: Instant,
    },
    /// Half-open, but all trial slots are taken: do not send.
    TrialsBusy,
}

impl Admission {
    /// Whether the call may be sent.
    pub fn is_allowed(self) -> bool {
        matches!(self, Admission::Allowed | Admission::Trial)
    }
}

/// A circuit breaker for one endpoint, counting consecutive failures.
///
/// Closed, it lets every call through and opens after `failure_threshold` consecutive
/// failures (a success resets the count). Open, it rejects calls for `cool_down`; the first
/// [`allow`](Self::allow) after that moves it to half-open, where it lets at most
/// `trial_calls` calls through. The first trial to succeed closes it; a trial that fails
/// opens it again for another `cool_down`.
///
/// The driver calls [`allow`](Self::allow) before sending to the endpoint and reports every
/// allowed call exactly once: [`on_success`](Self::on_success),
/// [`on_failure`](Self::on_failure), or [`on_abandoned`](Self::on_abandoned) when it never
/// learned the outcome (the caller cancelled), which gives a trial slot back. Outcomes that
/// arrive while open (calls sent before it opened) are ignored.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cool_down: Duration,
    trial_calls: u32,
    state: BreakerState,
    consecutive_failures: u32,
    open_until: Instant,
    trials_in_flight: u32,
}

impl CircuitBreaker {
    /// `failure_threshold` and `trial_calls` are at least 1. Starts closed.
    pub fn new(
        failure_threshold: u32,
        cool_down: Duration,
        trial_calls: u32,
        now: Instant,
    ) -> Self {
        CircuitBreaker {
            failure_threshold: failure_threshold.max(1),
            cool_down,
            trial_calls: trial_calls.max(1),
            state: BreakerState::Closed,
            consecutive_failures: 0,
            open_until: now,
            trials_in_flight: 0,
        }
    }

    /// The state as of the last call; an open breaker whose cool-down has passed still
    /// reads `Open` until the next [`allow`](Self::allow).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// When an open breaker's cool-down ends; `None` unless open.
    pub fn open_until(&self) -> Option<Instant> {
        (self.state == BreakerState::Open).then_some(self.open_until)
    }

    /// Consecutive failures counted while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Trial calls allowed and not yet reported, while half-open.
    pub fn trials_in_flight(&self) -> u32 {
        self.trials_in_flight
    }

    /// Whether a call may be sent to the endpoint now; a [`Admission::Trial`] takes a
    /// trial slot.
    pub fn allow(&mut self, now: Instant) -> Admission {
        if self.state == BreakerState::Open {
            if now < self.open_until {
                return Admission::Open {
                    until: self.open_until,
                };
            }
            self.state = BreakerState::HalfOpen;
            self.trials_in_flight = 0;
        }
        match self.state {
            BreakerState::Closed => Admission::Allowed,
            _ if self.trials_in_flight < self.trial_calls => {
                self.trials_in_flight += 1;
                Admission::Trial
            }
            _ => Admission::TrialsBusy,
        }
    }

    /// An allowed call succeeded.
    pub fn on_success(&mut self, _now: Instant) {
        match self.state {
            BreakerState::Closed => self.consecutive_failures = 0,
            BreakerState::HalfOpen => self.close(),
            BreakerState::Open => {}
        }
    }

    /// An allowed call failed.
    pub fn on_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.failure_threshold {
                    self.open(now);
                }
            }
            BreakerState::HalfOpen => self.open(now),
            BreakerState::Open => {}
        }
    }

    /// Whether one more failure now would open the breaker (closed at the threshold's edge,
    /// or half-open). Lets a driver that caps how many endpoints may be open at once decide
    /// before reporting.
    pub fn would_open_on_failure(&self) -> bool {
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures.saturating_add(1) >= self.failure_threshold
            }
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        }
    }

    /// Opens now, whatever the count: for failures that say the endpoint cannot be
    /// reached at all (connection refused), where waiting for a threshold only fails more
    /// calls. Ignored while already open.
    pub fn trip(&mut self, now: Instant) {
        if self.state != BreakerState::Open {
            self.open(now);
        }
    }

    /// An allowed call ended without an outcome (cancelled before any answer): frees its
    /// trial slot if half-open, otherwise changes nothing.
    pub fn on_abandoned(&mut self, _now: Instant) {
        if self.state == BreakerState::HalfOpen {
            self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        // A cool-down too long to represent ends at once rather than panicking.
        self.open_until = now.checked_add(self.cool_down).unwrap_or(now);
        self.consecutive_failures = 0;
        self.trials_in_flight = 0;
    }

    fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.consecutive_failures = 0;
        self.trials_in_flight = 0;
    }
}
