//! Call deadlines and keepalive: the timers behind `poll_timeout`/`handle_timeout`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::KeepaliveConfig;

/// Deadlines of calls in flight, earliest first.
///
/// Most calls on a connection use the same timeout, so their deadlines arrive in order: those
/// go to the back of a queue in O(1), and only out-of-order ones pay for a heap. Calls that
/// finish early leave their entry behind; two rules keep that cheap: the owner drops stale
/// entries from the fronts after every removal, so `next()` never names a finished call and
/// the driver never wakes for nothing; and both are compacted when stale entries outnumber
/// live ones, so memory follows the live count.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    /// Non-decreasing deadlines.
    ordered: VecDeque<(Instant, u32)>,
    /// Deadlines that arrived earlier than the back of `ordered`.
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
}

impl Deadlines {
    pub(crate) fn shrink_to_fit(&mut self) {
        self.ordered.shrink_to_fit();
        self.heap.shrink_to_fit();
    }

    pub(crate) fn push(&mut self, at: Instant, id: u32) {
        match self.ordered.back() {
            Some((last, _)) if *last > at => self.heap.push(Reverse((at, id))),
            _ => self.ordered.push_back((at, id)),
        }
    }

    fn front(&self) -> Option<(Instant, u32)> {
        match (self.ordered.front(), self.heap.peek()) {
            (Some(a), Some(Reverse(b))) => Some(*a.min(b)),
            (a, b) => a.copied().or(b.map(|Reverse(e)| *e)),
        }
    }

    /// Removes the earliest entry, which is `entry`.
    fn pop_front(&mut self, entry: (Instant, u32)) {
        if self.ordered.front() == Some(&entry) {
            self.ordered.pop_front();
        } else {
            self.heap.pop();
        }
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.front().map(|(at, _)| at)
    }

    /// Pops the earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, u32)> {
        let entry = self.front().filter(|(at, _)| *at <= now)?;
        self.pop_front(entry);
        Some(entry)
    }

    /// Restores the invariants after calls were removed. `is_live(at, id)` tells whether an
    /// entry still belongs to a call in flight.
    pub(crate) fn prune(&mut self, live: usize, is_live: impl Fn(Instant, u32) -> bool) {
        if self.ordered.len() + self.heap.len() > 2 * live + 64 {
            self.ordered.retain(|(at, id)| is_live(*at, *id));
            self.heap.retain(|Reverse((at, id))| is_live(*at, *id));
        }
        while let Some(entry) = self.front() {
            if is_live(entry.0, entry.1) {
                break;
            }
            self.pop_front(entry);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.ordered.clear();
        self.heap.clear();
    }
}

/// What a request carries of `deadline`: the time left in whole microseconds, at least 1;
/// 0 without a deadline. `None` if it already passed.
pub(crate) fn timeout_micros(deadline: Option<Instant>, now: Instant) -> Option<u64> {
    let Some(deadline) = deadline else {
        return Some(0);
    };
    let left = deadline
        .checked_duration_since(now)
        .filter(|d| !d.is_zero())?;
    Some(u64::try_from(left.as_micros()).unwrap_or(u64::MAX).max(1))
}

/// `now + d`, or `None` where that is past what `Instant` can represent (treated as "never").
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Option<Instant> {
    now.checked_add(d)
}

/// What the keepalive timer wants when it fires.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeepaliveAction {
    Nothing,
    SendPing(u32),
    PeerDead,
}

/// Pings a quiet peer and declares it dead when it stays quiet. Any frame received counts as
/// a sign of life, so a busy connection never pings.
#[derive(Debug)]
pub(crate) struct Keepalive {
    config: KeepaliveConfig,
    last_received: Instant,
    ping_sent: Option<Instant>,
    next_ping_id: u32,
}

impl Keepalive {
    pub(crate) fn new(config: KeepaliveConfig, now: Instant) -> Self {
        Keepalive {
            config,
            last_received: now,
            ping_sent: None,
            next_ping_id: 1,
        }
    }

    pub(crate) fn on_frame(&mut self, now: Instant) {
        self.last_received = now;
        self.ping_sent = None;
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        match self.ping_sent {
            Some(sent) => deadline_after(sent, self.config.timeout),
            None => deadline_after(self.last_received, self.config.interval?),
        }
    }

    pub(crate) fn on_timeout(&mut self, now: Instant) -> KeepaliveAction {
        match self.next() {
            Some(at) if at <= now => {}
            _ => return KeepaliveAction::Nothing,
        }
        if self.ping_sent.is_some() {
            return KeepaliveAction::PeerDead;
        }
        self.ping_sent = Some(now);
        let id = self.next_ping_id;
        self.next_ping_id = self.next_ping_id.wrapping_add(1);
        KeepaliveAction::SendPing(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_pings_when_quiet_and_declares_death_after_timeout() {
        let t0 = Instant::now();
        let cfg = KeepaliveConfig {
            interval: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(2),
        };
        let mut k = Keepalive::new(cfg, t0);
        assert_eq!(k.next(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(
            k.on_timeout(t0 + Duration::from_secs(9)),
            KeepaliveAction::Nothing
        );
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(k.on_timeout(t1), KeepaliveAction::SendPing(1));
        assert_eq!(k.next(), Some(t1 + Duration::from_secs(2)));
        k.on_frame(t1 + Duration::from_secs(1));
        assert_eq!(k.next(), Some(t1 + Duration::from_secs(11)));
        let t2 = t1 + Duration::from_secs(11);
        assert_eq!(k.on_timeout(t2), KeepaliveAction::SendPing(2));
        assert_eq!(
            k.on_timeout(t2 + Duration::from_secs(2)),
            KeepaliveAction::PeerDead
        );
    }

    #[test]
    fn disabled_keepalive_never_fires() {
        let t0 = Instant::now();
        let k = Keepalive::new(
            KeepaliveConfig {
                interval: None,
                timeout: Duration::from_secs(1),
            },
            t0,
        );
        assert_eq!(k.next(), None);
    }

    #[test]
    fn deadline_arithmetic_saturates_to_never() {
        assert_eq!(deadline_after(Instant::now(), Duration::MAX), None);
    }

    #[test]
    fn stale_deadlines_are_pruned_and_compacted() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for i in 0..1000u32 {
            d.push(t0 + Duration::from_millis(i as u64), i);
        }
        // Only id 999 remains live.
        d.prune(1, |_, id| id == 999);
        assert_eq!(d.ordered.len() + d.heap.len(), 1);
        assert_eq!(d.next(), Some(t0 + Duration::from_millis(999)));
    }

    #[test]
    fn out_of_order_deadlines_still_come_out_earliest_first() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Deadlines::default();
        for (at, id) in [(50, 1), (10, 2), (70, 3), (30, 4), (70, 5), (5, 6)] {
            d.push(ms(at), id);
        }
        let mut order = Vec::new();
        while let Some((_, id)) = d.pop_due(ms(100)) {
            order.push(id);
        }
        assert_eq!(order, [6, 2, 4, 1, 3, 5]);
        assert_eq!(d.next(), None);
    }
}
