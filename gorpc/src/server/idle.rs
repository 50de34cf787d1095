//! Which connections are idle, and for how long: what lets a server at its connection limit
//! close the longest-idle connection to admit a new one (as Envoy and nginx do) rather
//! than refuse everyone, and what caps connections per peer IP.
//!
//! Each binary-protocol connection publishes when it went idle (no call in flight) in an
//! atomic of its own, written only when that changes, so a call costs nothing here. Only
//! the accept loop, at the limit, looks across connections.

use std::collections::HashMap;
use std::net::IpAddr;
#[cfg(feature = "http")]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Context;
use std::time::Instant;

use futures::task::AtomicWaker;

use super::trim::{return_free_memory, FloodWatch};

/// `idle_since` of a connection with calls in flight (or one that is not tracked).
const BUSY: u64 = u64::MAX;

/// One connection as the table sees it.
#[derive(Debug)]
pub(crate) struct IdleSlot {
    /// Microseconds since the table's epoch at which the connection went idle, or `BUSY`.
    idle_since: AtomicU64,
    evicted: AtomicBool,
    waker: AtomicWaker,
    epoch: Instant,
}

impl IdleSlot {
    /// A slot for a connection that is not in any table (it is never evicted).
    pub(crate) fn untracked() -> Arc<IdleSlot> {
        Arc::new(IdleSlot::new(Instant::now()))
    }

    fn new(epoch: Instant) -> IdleSlot {
        IdleSlot {
            // Idle from the start (`track` says since when): a connection that never makes
            // a call is what a flood of them looks like.
            idle_since: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            epoch,
        }
    }

    /// The connection went idle at `since`. Written only when that changes, so the order
    /// can be sequentially consistent for free (see [`InFlight`]).
    pub(crate) fn set_idle(&self, since: Instant) {
        let micros = since.saturating_duration_since(self.epoch).as_micros();
        let micros = u64::try_from(micros).unwrap_or(BUSY - 1);
        self.idle_since.store(micros, Ordering::SeqCst);
    }

    /// The connection has calls in flight again.
    pub(crate) fn set_busy(&self) {
        self.idle_since.store(BUSY, Ordering::SeqCst);
    }

    /// When the connection went idle; `None` while it has calls in flight.
    #[cfg(feature = "http")]
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        let micros = self.idle_since.load(Ordering::SeqCst);
        (micros != BUSY).then(|| self.epoch + std::time::Duration::from_micros(micros))
    }

    /// Whether the server asked this connection to go, to make room for a new one;
    /// registers for a wake-up otherwise.
    pub(crate) fn poll_evicted(&self, cx: &mut Context<'_>) -> bool {
        if self.evicted.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.evicted.load(Ordering::Acquire)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The calls in flight on a connection whose calls run where its driver does not see them
/// end (hyper's HTTP connections): each call holds an [`InFlight`], and the connection's
/// slot hears when the count leaves zero and when it comes back.
#[cfg(feature = "http")]
#[derive(Debug)]
pub(crate) struct CallCount {
    in_flight: AtomicUsize,
    slot: Arc<IdleSlot>,
}

#[cfg(feature = "http")]
impl CallCount {
    pub(crate) fn new(slot: Arc<IdleSlot>) -> Arc<CallCount> {
        Arc::new(CallCount {
            in_flight: AtomicUsize::new(0),
            slot,
        })
    }

    /// A call started; it counts until the returned guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.slot.set_busy();
        }
        InFlight(self.clone())
    }
}

/// One call counted in a [`CallCount`].
#[cfg(feature = "http")]
#[derive(Debug)]
pub(crate) struct InFlight(Arc<CallCount>);

#[cfg(feature = "http")]
impl Drop for InFlight {
    fn drop(&mut self) {
        let count = &self.0;
        if count.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            count.slot.set_idle(Instant::now());
            // A call that began meanwhile may have marked the slot busy before this marked
            // it idle. Every step is sequentially consistent, so looking again settles it.
            if count.in_flight.load(Ordering::SeqCst) > 0 {
                count.slot.set_busy();
            }
        }
    }
}

/// The server's connections, for eviction and the per-IP cap.
#[derive(Debug)]
pub(crate) struct IdleTable {
    epoch: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every tracked connection, by a key of its own.
    slots: HashMap<u64, Weak<IdleSlot>>,
    next_key: u64,
    /// Connections open per peer IP (entries at zero are removed).
    per_ip: HashMap<IpAddr, usize>,
    flood: FloodWatch,
}

/// A connection's place in the table; leaving it (on drop) frees its per-IP count.
#[derive(Debug)]
pub(crate) struct Tracked {
    table: Arc<IdleTable>,
    key: u64,
    ip: IpAddr,
    pub(crate) slot: Arc<IdleSlot>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        inner.slots.remove(&self.key);
        if let Some(n) = inner.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                inner.per_ip.remove(&self.ip);
            }
        }
        // After a flood has gone, the tables give its room back (halving at most once per
        // halving of the count, so the cost stays constant per connection).
        if inner.slots.capacity() > 4 * inner.slots.len() + 64 {
            inner.slots.shrink_to_fit();
            inner.per_ip.shrink_to_fit();
        }
        let open = inner.slots.len();
        let receded = inner.flood.closed(open);
        drop(inner);
        if receded {
            return_free_memory();
        }
    }
}

impl IdleTable {
    pub(crate) fn new() -> Arc<IdleTable> {
        Arc::new(IdleTable {
            epoch: Instant::now(),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` has fewer than `per_ip_cap` connections.
    pub(crate) fn has_room(&self, ip: IpAddr, per_ip_cap: Option<usize>) -> bool {
        per_ip_cap.is_none_or(|cap| self.lock().per_ip.get(&ip).copied().unwrap_or(0) < cap)
    }

    /// Adds a connection from `ip`, unless `ip` already has `per_ip_cap` of them.
    pub(crate) fn track(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip_cap: Option<usize>,
    ) -> Option<Tracked> {
        let mut inner = self.lock();
        let count = inner.per_ip.entry(ip).or_default();
        if per_ip_cap.is_some_and(|cap| *count >= cap) {
            if *count == 0 {
                inner.per_ip.remove(&ip);
            }
            return None;
        }
        *count += 1;
        let key = inner.next_key;
        inner.next_key += 1;
        let slot = Arc::new(IdleSlot::new(self.epoch));
        slot.set_idle(Instant::now());
        inner.slots.insert(key, Arc::downgrade(&slot));
        let open = inner.slots.len();
        inner.flood.opened(open);
        Some(Tracked {
            table: self.clone(),
            key,
            ip,
            slot,
        })
    }

    /// Asks the connection idle the longest to go; whether there was one. A connection
    /// asked once is not counted again.
    pub(crate) fn evict_longest_idle(&self) -> bool {
        let inner = self.lock();
        let longest = inner
            .slots
            .values()
            .filter_map(Weak::upgrade)
            .filter(|slot| !slot.evicted.load(Ordering::Acquire))
            .map(|slot| (slot.idle_since.load(Ordering::Relaxed), slot))
            .filter(|(since, _)| *since != BUSY)
            .min_by_key(|(since, _)| *since);
        drop(inner);
        match longest {
            Some((_, slot)) => {
                slot.evict();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    fn evicted(slot: &IdleSlot) -> bool {
        slot.evicted.load(Ordering::Acquire)
    }

    #[test]
    fn the_longest_idle_goes_first_and_busy_ones_never() {
        let table = IdleTable::new();
        let t0 = Instant::now();
        let busy = table.track(A, None).unwrap();
        busy.slot.set_busy();
        let recent = table.track(A, None).unwrap();
        let oldest = table.track(B, None).unwrap();
        recent.slot.set_idle(t0 + Duration::from_secs(5));
        oldest.slot.set_idle(t0 + Duration::from_secs(1));
        assert!(table.evict_longest_idle());
        assert!(evicted(&oldest.slot) && !evicted(&recent.slot));
        assert!(table.evict_longest_idle());
        assert!(evicted(&recent.slot));
        // Only a busy connection is left.
        assert!(!table.evict_longest_idle());
        assert!(!evicted(&busy.slot));
        // Busy again before the server looked: not a candidate.
        let again = table.track(B, None).unwrap();
        again.slot.set_idle(t0);
        again.slot.set_busy();
        assert!(!table.evict_longest_idle());
    }

    #[test]
    fn per_ip_cap_counts_open_connections() {
        let table = IdleTable::new();
        let first = table.track(A, Some(2)).unwrap();
        let _second = table.track(A, Some(2)).unwrap();
        assert!(table.track(A, Some(2)).is_none());
        assert!(
            table.track(B, Some(2)).is_some(),
            "another IP has its own count"
        );
        drop(first);
        assert!(
            table.track(A, Some(2)).is_some(),
            "a closed connection frees its place"
        );
        assert!(table.lock().slots.len() <= 3);
    }

    #[cfg(feature = "http")]
    #[test]
    fn a_counted_connection_is_idle_only_with_no_call_in_flight() {
        let table = IdleTable::new();
        let tracked = table.track(A, None).unwrap();
        let count = CallCount::new(tracked.slot.clone());
        assert!(tracked.slot.idle_since().is_some(), "idle until a call");
        let first = count.begin();
        let second = count.begin();
        assert_eq!(tracked.slot.idle_since(), None);
        drop(first);
        assert_eq!(
            tracked.slot.idle_since(),
            None,
            "one call is still in flight"
        );
        assert!(!table.evict_longest_idle());
        let before = Instant::now();
        drop(second);
        let since = tracked
            .slot
            .idle_since()
            .expect("idle once the last call ends");
        assert!(since + Duration::from_millis(1) >= before);
        assert!(table.evict_longest_idle());
    }

    #[test]
    fn dropped_connections_leave_the_table() {
        let table = IdleTable::new();
        let tracked = table.track(A, Some(1)).unwrap();
        drop(tracked);
        assert!(table.lock().slots.is_empty());
        assert!(table.lock().per_ip.is_empty());
        assert!(!table.evict_longest_idle());
    }
}
