//! Load balancing: which endpoint gets the next call.
//!
//! Every balancer is a plain state machine behind the [`Balancer`] trait. It is told the
//! endpoint set ([`Balancer::update`]), asked for an endpoint ([`Balancer::pick`]) and, if it
//! cares about load, told when calls start and finish. Like the rest of this crate it does no
//! I/O and reads no clock: latencies come in as arguments.
//!
//! | Balancer | For |
//! |---|---|
//! | [`Random`] | Stateless spreading by weight; many clients, no coordination. |
//! | [`RoundRobin`] | Equal endpoints, an even spread over short windows. Ignores weights. |
//! | [`WeightedRoundRobin`] | Endpoints of different capacity, spread exactly by weight and interleaved (nginx's smooth weighted round robin). |
//! | [`ConsistentHash`] | Affinity: the same call key goes to the same endpoint (caches, sharded state), and changing the set moves few keys (ketama ring). |
//! | [`PowerOfTwoChoices`] | Endpoints whose speed differs or changes: of two random endpoints, take the less loaded (in-flight calls × latency EWMA). |
//!
//! # Endpoints
//!
//! An [`Endpoint`] is an id, a weight and a health. An endpoint is *pickable* when it is up
//! and its weight is not 0; no balancer ever returns any other endpoint, and `pick` returns
//! `None` exactly when no endpoint is pickable.
//!
//! [`Balancer::update`] replaces the whole set. State kept per endpoint (a round-robin
//! position, a smooth weight, in-flight counts, latency averages) survives for every id that
//! is still in the new set, even while it is down, and is dropped for ids that left. If an id
//! appears more than once in one update, the **first occurrence wins** and the later ones are
//! ignored.
//!
//! # Determinism
//!
//! Balancers never draw randomness from the environment. Those that need it take a `seed` at
//! construction and use their own [`SplitMix64`]. The same seed and the same sequence of calls
//! (same arguments, same order) give the same picks, on every platform. Give each client
//! process its own seed (from whatever randomness the application has) so that clients do not
//! move in lockstep. [`ConsistentHash`] maps keys without the seed: every client with the same
//! endpoint set maps a key to the same endpoint.
//!
//! ```
//! use std::time::Duration;
//! use gorpc_proto::balance::{Balancer, Endpoint, EndpointId, PowerOfTwoChoices};
//!
//! let a = EndpointId::from_name("10.0.0.1:7070");
//! let b = EndpointId::from_name("10.0.0.2:7070");
//! let mut lb = PowerOfTwoChoices::new(42);
//! lb.update(&[Endpoint::new(a), Endpoint::new(b).with_weight(2)]);
//!
//! let id = lb.pick(None).unwrap();
//! lb.on_start(id);
//! // ... the call runs ...
//! lb.on_finish(id, Duration::from_millis(3), true);
//! ```

mod consistent;
mod p2c;
mod random;
mod rng;
mod round_robin;

use std::time::Duration;

use hashbrown::HashMap;

pub use consistent::ConsistentHash;
pub use p2c::{P2cConfig, PowerOfTwoChoices};
pub use random::Random;
pub use rng::SplitMix64;
pub use round_robin::{RoundRobin, WeightedRoundRobin};

/// Names an endpoint across updates. Choose ids that are stable for an endpoint's lifetime;
/// for [`ConsistentHash`] they place the endpoint on the ring, so clients that should agree on
/// key placement must use the same ids ([`EndpointId::from_name`] of the address does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u64);

impl EndpointId {
    /// The id of a named endpoint (an address such as `"10.0.0.1:7070"`, a host name),
    /// by [`hash_bytes`]: the same name gives the same id everywhere.
    pub fn from_name(name: &str) -> Self {
        Self(hash_bytes(name.as_bytes()))
    }

    /// The id as a number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for EndpointId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

/// Whether an endpoint may be picked. Down endpoints stay in the set (and keep their state)
/// but are skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Health {
    /// May be picked (the default).
    #[default]
    Up,
    /// Skipped until it is up again.
    Down,
}

/// One endpoint as the balancers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Names the endpoint across updates.
    pub id: EndpointId,
    /// Relative share of calls; 0 means never picked. Ignored by [`RoundRobin`] apart from 0.
    pub weight: u32,
    /// Down endpoints are skipped.
    pub health: Health,
}

impl Endpoint {
    /// An endpoint that is up, with weight 1.
    pub fn new(id: impl Into<EndpointId>) -> Self {
        Self {
            id: id.into(),
            weight: 1,
            health: Health::Up,
        }
    }

    /// This endpoint with another weight (default 1).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// This endpoint up or down (default up).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Up and with a weight above 0.
    pub fn is_pickable(&self) -> bool {
        self.health == Health::Up && self.weight > 0
    }
}

/// A load-balancing algorithm over a set of endpoints.
///
/// Implement it for your own balancer; only `update` and `pick` are required. The rules the
/// built-in balancers keep, and that callers may rely on: `pick` returns only pickable
/// endpoints of the last update (up, weight above 0) and `None` exactly when there is none;
/// nothing panics, whatever the order of calls and whatever ids the hooks are given.
pub trait Balancer {
    /// Replaces the endpoint set. State of endpoints that stay is kept; duplicates: the first
    /// occurrence of an id wins.
    fn update(&mut self, endpoints: &[Endpoint]);

    /// Chooses an endpoint for the next call, or `None` when no endpoint is pickable. `key`
    /// is the call's affinity key (a user id, a shard key, [`hash_bytes`] of a string); only
    /// hash-based balancers use it.
    fn pick(&mut self, key: Option<u64>) -> Option<EndpointId>;

    /// A call to `id` started. Ids not in the set are ignored.
    fn on_start(&mut self, id: EndpointId) {
        let _ = id;
    }

    /// A call to `id` finished after `latency`, successfully or not. Ids not in the set are
    /// ignored.
    fn on_finish(&mut self, id: EndpointId, latency: Duration, ok: bool) {
        let _ = (id, latency, ok);
    }

    /// A stream call to `id` opened (its opening was a call of its own, reported through
    /// `on_start` and `on_finish`): load-aware balancers count it as load on `id` until
    /// `on_stream_end`, without a latency sample, since a stream lasts as long as its
    /// caller wants. Ids not in the set are ignored.
    fn on_stream_open(&mut self, id: EndpointId) {
        let _ = id;
    }

    /// A stream call to `id` that `on_stream_open` reported ended. Ids not in the set are
    /// ignored.
    fn on_stream_end(&mut self, id: EndpointId) {
        let _ = id;
    }
}

impl<B: Balancer + ?Sized> Balancer for Box<B> {
    fn update(&mut self, endpoints: &[Endpoint]) {
        (**self).update(endpoints)
    }

    fn pick(&mut self, key: Option<u64>) -> Option<EndpointId> {
        (**self).pick(key)
    }

    fn on_start(&mut self, id: EndpointId) {
        (**self).on_start(id)
    }

    fn on_finish(&mut self, id: EndpointId, latency: Duration, ok: bool) {
        (**self).on_finish(id, latency, ok)
    }

    fn on_stream_open(&mut self, id: EndpointId) {
        (**self).on_stream_open(id)
    }

    fn on_stream_end(&mut self, id: EndpointId) {
        (**self).on_stream_end(id)
    }
}

/// A fixed 64-bit hash of bytes (FNV-1a, then the SplitMix64 finalizer for avalanche). It
/// never changes between versions or platforms, so it is fit for ring placement and call
/// keys shared between processes. Not resistant to chosen inputs.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    rng::mix64(h ^ bytes.len() as u64)
}

type IdMap = HashMap<EndpointId, usize, foldhash::fast::FixedState>;

/// The deduplicated endpoint set of the last update, in update order, with per-endpoint
/// state `S` carried across updates by id.
#[derive(Debug)]
struct Slots<S> {
    list: Vec<Slot<S>>,
    index: IdMap,
}

#[derive(Debug)]
struct Slot<S> {
    ep: Endpoint,
    state: S,
}

impl<S> Slots<S> {
    fn new() -> Self {
        Self {
            list: Vec::new(),
            index: IdMap::with_hasher(Default::default()),
        }
    }

    /// Replaces the set: the first occurrence of each id is kept, with its old state if it
    /// was in the set before and `fresh(endpoint)` otherwise.
    fn update(&mut self, endpoints: &[Endpoint], mut fresh: impl FnMut(&Endpoint) -> S) {
        let mut old: Vec<Option<Slot<S>>> = std::mem::take(&mut self.list)
            .into_iter()
            .map(Some)
            .collect();
        let old_index = std::mem::replace(
            &mut self.index,
            IdMap::with_capacity_and_hasher(endpoints.len(), Default::default()),
        );
        self.list.reserve(endpoints.len());
        for ep in endpoints {
            if self.index.contains_key(&ep.id) {
                continue;
            }
            let kept = old_index
                .get(&ep.id)
                .and_then(|&i| old[i].take())
                .map(|slot| slot.state);
            let state = kept.unwrap_or_else(|| fresh(ep));
            self.index.insert(ep.id, self.list.len());
            self.list.push(Slot { ep: *ep, state });
        }
    }

    fn position(&self, id: EndpointId) -> Option<usize> {
        self.index.get(&id).copied()
    }

    fn state_mut(&mut self, id: EndpointId) -> Option<&mut S> {
        let i = self.position(id)?;
        Some(&mut self.list[i].state)
    }
}

/// Cumulative weights of the pickable endpoints, for weighted random draws in O(log n).
#[derive(Debug, Default)]
struct WeightTable {
    /// `cum[i]`: the sum of the weights of entries `0..=i`.
    cum: Vec<u64>,
    /// The slot index of each entry.
    slot: Vec<usize>,
}

impl WeightTable {
    fn rebuild<S>(&mut self, slots: &Slots<S>) {
        self.cum.clear();
        self.slot.clear();
        let mut total = 0u64;
        for (i, s) in slots.list.iter().enumerate() {
            if s.ep.is_pickable() {
                total += u64::from(s.ep.weight);
                self.cum.push(total);
                self.slot.push(i);
            }
        }
    }

    fn total(&self) -> u64 {
        self.cum.last().copied().unwrap_or(0)
    }

    fn weight(&self, entry: usize) -> u64 {
        let below = if entry == 0 { 0 } else { self.cum[entry - 1] };
        self.cum[entry] - below
    }

    /// The entry whose weight range holds `r` (`r < total`).
    fn entry_at(&self, r: u64) -> usize {
        self.cum.partition_point(|&c| c <= r)
    }

    /// A weighted random entry, or `None` when the table is empty.
    fn sample(&self, rng: &mut SplitMix64) -> Option<usize> {
        if self.cum.is_empty() {
            return None;
        }
        Some(self.entry_at(rng.below(self.total())))
    }

    /// A weighted random entry other than `excluded`, or `None` if there is no other.
    fn sample_excluding(&self, rng: &mut SplitMix64, excluded: usize) -> Option<usize> {
        if self.cum.len() < 2 {
            return None;
        }
        let w = self.weight(excluded);
        let start = self.cum[excluded] - w;
        let mut r = rng.below(self.total() - w);
        if r >= start {
            r += w;
        }
        Some(self.entry_at(r))
    }
}
