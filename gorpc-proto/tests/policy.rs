//! The reliability policies under simulated time: one `Instant::now()` plus durations.

use std::time::{Duration, Instant};

use gorpc_proto::policy::{
    Admission, Backoff, BreakerState, CircuitBreaker, GiveUpReason, HedgeDecision, Hedging,
    RetryBudget, RetryDecision, RetryPolicy,
};
use gorpc_proto::{Code, Status};
use proptest::prelude::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn unavailable() -> Status {
    Status::new(Code::Unavailable, "down")
}

/// A budget that never runs out in these tests.
fn plenty(now: Instant) -> RetryBudget {
    RetryBudget::new(0.0, 0, 1_000_000, now)
}

#[test]
fn backoff_stays_within_full_jitter_bounds() {
    let t0 = Instant::now();
    let backoff = Backoff {
        base: ms(10),
        max: ms(500),
        multiplier: 2.0,
    };
    let mut policy = RetryPolicy::new(7)
        .with_max_attempts(20)
        .with_backoff(backoff);
    let mut budget = plenty(t0);
    for attempt in 1..20u32 {
        let ceiling = ms(500).min(ms(10) * 2u32.pow(attempt - 1).min(1 << 20));
        assert_eq!(backoff.ceiling(attempt - 1), ceiling);
        let mut max_seen = Duration::ZERO;
        for _ in 0..200 {
            let RetryDecision::RetryAt(at) =
                policy.decide(attempt, &unavailable(), t0, None, &mut budget)
            else {
                panic!("expected a retry at attempt {attempt}");
            };
            let wait = at - t0;
            assert!(wait <= ceiling, "attempt {attempt}: {wait:?} > {ceiling:?}");
            max_seen = max_seen.max(wait);
        }
        // Full jitter spreads over the whole range, not just the bottom of it.
        assert!(
            max_seen > ceiling / 2,
            "attempt {attempt}: max {max_seen:?}"
        );
    }
}

#[test]
fn retry_never_ends_past_the_deadline() {
    let t0 = Instant::now();
    let mut policy = RetryPolicy::new(1)
        .with_max_attempts(1000)
        .with_backoff(Backoff {
            base: ms(100),
            max: ms(100),
            multiplier: 2.0,
        });
    let mut budget = plenty(t0);
    let deadline = t0 + ms(50);
    let (mut retried, mut too_close) = (0, 0);
    for attempt in 1..1000 {
        match policy.decide(attempt, &unavailable(), t0, Some(deadline), &mut budget) {
            RetryDecision::RetryAt(at) => {
                assert!(at < deadline);
                retried += 1;
            }
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose) => too_close += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(retried > 300 && too_close > 300, "{retried} / {too_close}");
    // Past the deadline nothing is ever retried.
    let late = policy.decide(1, &unavailable(), deadline, Some(deadline), &mut budget);
    assert_eq!(late, RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose));
}

#[test]
fn non_retryable_codes_give_up() {
    let t0 = Instant::now();
    let mut budget = plenty(t0);
    let mut policy = RetryPolicy::new(1);
    for code in [
        Code::Ok,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::Internal,
        Code::ResourceExhausted,
    ] {
        assert_eq!(
            policy.decide(1, &Status::new(code, ""), t0, None, &mut budget),
            RetryDecision::GiveUp(GiveUpReason::NotRetryable(code))
        );
    }
    let mut policy = RetryPolicy::new(1).with_retryable(Code::ResourceExhausted);
    let exhausted = Status::new(Code::ResourceExhausted, "slow down");
    assert!(matches!(
        policy.decide(1, &exhausted, t0, None, &mut budget),
        RetryDecision::RetryAt(_)
    ));
    let mut policy = RetryPolicy::new(1).with_retryable_codes(&[Code::Aborted, Code::Ok]);
    assert!(!policy.is_retryable(Code::Unavailable) && !policy.is_retryable(Code::Ok));
    assert!(matches!(
        policy.decide(1, &Status::new(Code::Aborted, ""), t0, None, &mut budget),
        RetryDecision::RetryAt(_)
    ));
}

#[test]
fn attempts_are_capped() {
    let t0 = Instant::now();
    let mut budget = plenty(t0);
    let mut policy = RetryPolicy::new(3).with_max_attempts(4);
    for attempt in 1..4 {
        assert!(matches!(
            policy.decide(attempt, &unavailable(), t0, None, &mut budget),
            RetryDecision::RetryAt(_)
        ));
    }
    for attempt in [4, 5, u32::MAX] {
        assert_eq!(
            policy.decide(attempt, &unavailable(), t0, None, &mut budget),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
    }
    let mut once = RetryPolicy::new(3).with_max_attempts(0);
    assert_eq!(once.max_attempts(), 1);
    assert_eq!(
        once.decide(1, &unavailable(), t0, None, &mut budget),
        RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
    );
}

#[test]
fn same_seed_same_backoffs() {
    let t0 = Instant::now();
    let run = |seed| {
        let mut policy = RetryPolicy::new(seed).with_max_attempts(10);
        let mut budget = plenty(t0);
        (1..10)
            .map(|a| policy.decide(a, &unavailable(), t0, None, &mut budget))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn budget_allows_a_tenth_of_traffic() {
    let t0 = Instant::now();
    // Deposits only, no reserve.
    let mut budget = RetryBudget::new(0.1, 1000, 0, t0);
    for _ in 0..1000 {
        budget.on_call(t0);
    }
    assert_eq!(budget.available(t0), 100);
    let granted = (0..1000).filter(|_| budget.try_withdraw(t0)).count();
    assert_eq!(granted, 100);
    assert!(!budget.try_withdraw(t0 + Duration::from_secs(60)));

    // Interleaved with the calls, and with a reserve of 10 a second: about 100, at most 110.
    let mut budget = RetryBudget::new(0.1, 1000, 10, t0);
    let mut policy = RetryPolicy::new(9).with_max_attempts(2);
    let mut retries = 0;
    for _ in 0..1000 {
        budget.on_call(t0);
        if let RetryDecision::RetryAt(_) = policy.decide(1, &unavailable(), t0, None, &mut budget) {
            retries += 1;
        }
    }
    assert!((100..=110).contains(&retries), "{retries}");
    assert_eq!(
        policy.decide(1, &unavailable(), t0, None, &mut budget),
        RetryDecision::GiveUp(GiveUpReason::BudgetExhausted)
    );
}

#[test]
fn budget_is_capped() {
    let t0 = Instant::now();
    let mut budget = RetryBudget::new(0.5, 5, 0, t0);
    for _ in 0..1000 {
        budget.on_call(t0);
    }
    assert_eq!(budget.available(t0), 5);
}

#[test]
fn budget_reserve_refills_over_time() {
    let t0 = Instant::now();
    let mut budget = RetryBudget::new(0.0, 100, 10, t0);
    // Starts with one second's worth.
    assert_eq!((0..100).filter(|_| budget.try_withdraw(t0)).count(), 10);
    assert!(!budget.try_withdraw(t0 + ms(99)));
    assert!(budget.try_withdraw(t0 + ms(100)));
    assert!(!budget.try_withdraw(t0 + ms(150)));
    // Small steps add up: no fraction is lost.
    let mut t = t0 + ms(150);
    for _ in 0..50 {
        t += ms(1);
    }
    assert!(budget.try_withdraw(t));
    // Never more than one second's worth, however long the wait.
    let later = t + Duration::from_secs(3600);
    assert_eq!(budget.available(later), 10);
    // Time going backwards is ignored.
    assert_eq!(budget.available(t0), 10);
}

#[test]
fn hedging_schedule_and_cap() {
    let t0 = Instant::now();
    let hedging = Hedging::new(3, ms(20));
    assert_eq!(hedging.next_hedge_at(t0, 0), Some(t0));
    assert_eq!(hedging.next_hedge_at(t0, 1), Some(t0 + ms(20)));
    assert_eq!(hedging.next_hedge_at(t0, 2), Some(t0 + ms(40)));
    assert_eq!(hedging.next_hedge_at(t0, 3), None);

    let mut budget = plenty(t0);
    assert_eq!(
        hedging.poll_hedge(t0, 0, t0, None, &mut budget),
        HedgeDecision::SendNow
    );
    assert_eq!(
        hedging.poll_hedge(t0, 1, t0 + ms(5), None, &mut budget),
        HedgeDecision::WaitUntil(t0 + ms(20))
    );
    assert_eq!(
        hedging.poll_hedge(t0, 1, t0 + ms(20), None, &mut budget),
        HedgeDecision::SendNow
    );
    assert_eq!(
        hedging.poll_hedge(t0, 2, t0 + ms(45), None, &mut budget),
        HedgeDecision::SendNow
    );
    assert_eq!(
        hedging.poll_hedge(t0, 3, t0 + ms(100), None, &mut budget),
        HedgeDecision::Stop
    );
    assert_eq!(Hedging::new(0, ms(1)).next_hedge_at(t0, 1), None);
}

#[test]
fn hedging_respects_deadline_and_budget() {
    let t0 = Instant::now();
    let hedging = Hedging::new(5, ms(20));
    let mut budget = plenty(t0);
    // The second hedge would start exactly at the deadline.
    let deadline = Some(t0 + ms(40));
    assert_eq!(
        hedging.poll_hedge(t0, 1, t0, deadline, &mut budget),
        HedgeDecision::WaitUntil(t0 + ms(20))
    );
    assert_eq!(
        hedging.poll_hedge(t0, 2, t0 + ms(20), deadline, &mut budget),
        HedgeDecision::Stop
    );

    // One token: one hedge.
    let mut budget = RetryBudget::new(1.0, 10, 0, t0);
    budget.on_call(t0);
    assert_eq!(
        hedging.poll_hedge(t0, 1, t0 + ms(20), None, &mut budget),
        HedgeDecision::SendNow
    );
    assert_eq!(
        hedging.poll_hedge(t0, 2, t0 + ms(40), None, &mut budget),
        HedgeDecision::Stop
    );
    // The original costs nothing.
    assert_eq!(
        hedging.poll_hedge(t0, 0, t0, None, &mut budget),
        HedgeDecision::SendNow
    );
}

#[test]
fn breaker_opens_after_consecutive_failures() {
    let t0 = Instant::now();
    let mut breaker = CircuitBreaker::new(3, ms(1000), 2, t0);
    assert_eq!(breaker.state(), BreakerState::Closed);
    breaker.on_failure(t0);
    breaker.on_failure(t0);
    breaker.on_success(t0); // resets the count
    breaker.on_failure(t0);
    breaker.on_failure(t0);
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.allow(t0), Admission::Allowed);
    breaker.on_failure(t0 + ms(1));
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.open_until(), Some(t0 + ms(1001)));
    assert_eq!(
        breaker.allow(t0 + ms(500)),
        Admission::Open {
            until: t0 + ms(1001)
        }
    );
    assert!(!breaker.allow(t0 + ms(1000)).is_allowed());
    // Late outcomes of calls sent before opening are ignored.
    breaker.on_success(t0 + ms(600));
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[test]
fn breaker_half_open_limits_trials_and_closes_on_success() {
    let t0 = Instant::now();
    let mut breaker = CircuitBreaker::new(1, ms(100), 2, t0);
    breaker.on_failure(t0);
    let t1 = t0 + ms(100);
    assert_eq!(breaker.allow(t1), Admission::Trial);
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    assert_eq!(breaker.allow(t1), Admission::Trial);
    assert_eq!(breaker.allow(t1), Admission::TrialsBusy);
    assert_eq!(breaker.trials_in_flight(), 2);
    // A cancelled trial gives its slot back.
    breaker.on_abandoned(t1);
    assert_eq!(breaker.allow(t1), Admission::Trial);
    assert_eq!(breaker.allow(t1), Admission::TrialsBusy);
    breaker.on_success(t1 + ms(5));
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.allow(t1 + ms(5)), Admission::Allowed);
    assert_eq!(breaker.open_until(), None);
}

#[test]
fn breaker_reopens_when_a_trial_fails() {
    let t0 = Instant::now();
    let mut breaker = CircuitBreaker::new(2, ms(100), 1, t0);
    breaker.on_failure(t0);
    breaker.on_failure(t0);
    let t1 = t0 + ms(150);
    assert_eq!(breaker.allow(t1), Admission::Trial);
    breaker.on_failure(t1 + ms(10));
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(
        breaker.allow(t1 + ms(50)),
        Admission::Open {
            until: t1 + ms(110)
        }
    );
    // A fresh cool-down, then trials again.
    assert_eq!(breaker.allow(t1 + ms(110)), Admission::Trial);
    assert_eq!(breaker.allow(t1 + ms(110)), Admission::TrialsBusy);
}

#[test]
fn breaker_trips_at_once_and_predicts_opening() {
    let t0 = Instant::now();
    let mut breaker = CircuitBreaker::new(3, ms(100), 1, t0);
    assert!(!breaker.would_open_on_failure());
    breaker.on_failure(t0);
    breaker.on_failure(t0);
    assert!(breaker.would_open_on_failure());
    breaker.on_success(t0);
    breaker.trip(t0 + ms(1));
    assert_eq!(breaker.open_until(), Some(t0 + ms(101)));
    assert!(!breaker.would_open_on_failure());
    // Tripping again while open does not extend the cool-down.
    breaker.trip(t0 + ms(50));
    assert_eq!(breaker.open_until(), Some(t0 + ms(101)));
    assert_eq!(breaker.allow(t0 + ms(101)), Admission::Trial);
    assert!(
        breaker.would_open_on_failure(),
        "a half-open trial failing reopens"
    );
}

#[derive(Clone, Debug)]
enum Op {
    Advance(u64),
    Call,
    Decide {
        attempt: u32,
        code: u32,
        deadline_ms: Option<u64>,
    },
    Hedge {
        sent: u32,
        deadline_ms: Option<u64>,
    },
    Allow,
    Success,
    Failure,
    Abandoned,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..500).prop_map(Op::Advance),
        Just(Op::Call),
        (0u32..8, 0u32..20, proptest::option::of(0u64..2000)).prop_map(
            |(attempt, code, deadline_ms)| Op::Decide {
                attempt,
                code,
                deadline_ms
            }
        ),
        (0u32..6, proptest::option::of(0u64..300))
            .prop_map(|(sent, deadline_ms)| Op::Hedge { sent, deadline_ms }),
        Just(Op::Allow),
        Just(Op::Success),
        Just(Op::Failure),
        Just(Op::Abandoned),
    ]
}

proptest! {
    #[test]
    fn policies_never_panic_nor_retry_past_the_deadline(
        seed in any::<u64>(),
        ratio in 0.0f64..2.0,
        base_ms in 0u64..200,
        max_ms in 0u64..2000,
        multiplier in 0.5f64..4.0,
        threshold in 0u32..5,
        trials in 0u32..4,
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let backoff = Backoff { base: ms(base_ms), max: ms(max_ms), multiplier };
        let mut policy = RetryPolicy::new(seed)
            .with_max_attempts(4)
            .with_retryable(Code::ResourceExhausted)
            .with_backoff(backoff);
        let mut budget = RetryBudget::new(ratio, 20, 3, t0);
        let hedging = Hedging::new(3, ms(30));
        let mut breaker = CircuitBreaker::new(threshold, ms(100), trials, t0);
        for op in ops {
            match op {
                Op::Advance(d) => now += ms(d),
                Op::Call => budget.on_call(now),
                Op::Decide { attempt, code, deadline_ms } => {
                    let deadline = deadline_ms.map(|d| t0 + ms(d));
                    let status = Status::new(Code::from_u32(code), "");
                    match policy.decide(attempt, &status, now, deadline, &mut budget) {
                        RetryDecision::RetryAt(at) => {
                            prop_assert!(at >= now);
                            prop_assert!(at - now <= backoff.ceiling(attempt.saturating_sub(1)));
                            if let Some(d) = deadline {
                                prop_assert!(at < d);
                            }
                            prop_assert!(policy.is_retryable(status.code()));
                            prop_assert!(attempt < policy.max_attempts());
                        }
                        RetryDecision::GiveUp(_) => {}
                    }
                }
                Op::Hedge { sent, deadline_ms } => {
                    let deadline = deadline_ms.map(|d| t0 + ms(d));
                    let started = t0;
                    match hedging.poll_hedge(started, sent, now, deadline, &mut budget) {
                        HedgeDecision::SendNow => {
                            prop_assert!(sent < hedging.max_attempts());
                            if sent > 0 {
                                if let Some(d) = deadline {
                                    prop_assert!(now < d);
                                }
                            }
                        }
                        HedgeDecision::WaitUntil(at) => prop_assert!(at > now),
                        HedgeDecision::Stop => {}
                    }
                }
                Op::Allow => {
                    let before = breaker.state();
                    let admission = breaker.allow(now);
                    match admission {
                        Admission::Allowed => prop_assert_eq!(before, BreakerState::Closed),
                        Admission::Open { until } => prop_assert!(until > now),
                        Admission::Trial | Admission::TrialsBusy => {
                            prop_assert_eq!(breaker.state(), BreakerState::HalfOpen)
                        }
                    }
                    prop_assert!(breaker.trials_in_flight() <= trials.max(1));
                }
                Op::Success => breaker.on_success(now),
                Op::Failure => breaker.on_failure(now),
                Op::Abandoned => breaker.on_abandoned(now),
            }
            prop_assert!(breaker.consecutive_failures() < threshold.max(1));
            prop_assert!(budget.available(now) <= 20 + 3);
        }
    }
}

/// A server's retry hint (gRPC's pushback) makes a refusal retryable, sets the wait in
/// place of the backoff, and still draws on the budget and respects the deadline.
#[test]
fn server_pushback_sets_the_wait() {
    let t0 = Instant::now();
    let refused = Status::new(Code::ResourceExhausted, "overloaded").with_retry_after(ms(250));
    let mut policy = RetryPolicy::new(3);
    let mut budget = plenty(t0);
    assert_eq!(
        policy.decide(1, &refused, t0, None, &mut budget),
        RetryDecision::RetryAt(t0 + ms(250))
    );
    assert_eq!(
        policy.decide(1, &refused, t0, Some(t0 + ms(250)), &mut budget),
        RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
    );
    let mut empty = RetryBudget::new(0.0, 0, 0, t0);
    assert_eq!(
        policy.decide(1, &refused, t0, None, &mut empty),
        RetryDecision::GiveUp(GiveUpReason::BudgetExhausted)
    );
}
