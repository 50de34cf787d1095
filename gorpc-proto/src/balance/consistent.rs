use super::rng::mix64;
use super::{Balancer, Endpoint, EndpointId, Slots, SplitMix64, WeightTable};

/// Consistent hashing on a ketama-style ring: the same key goes to the same endpoint, and a
/// change to the set moves few keys.
///
/// For affinity: calls for one user, shard or cache entry should land where their state is.
/// Each endpoint of weight `w` owns `w × vnodes_per_weight` points on a ring of 64-bit hashes
/// (160 per unit of weight by default), and a key goes to the first point at or after its
/// hash, wrapping around, skipping endpoints that are down. Adding an endpoint to `n` moves
/// about `1/(n+1)` of the keys, all to the new endpoint; removing one, or marking it down,
/// moves only its own keys. An endpoint's points depend only on its id and weight, so every
/// client with the same set maps each key the same way: the seed plays no part in keyed
/// picks, and the ring does not depend on the order of the endpoints in `update`.
///
/// `pick(None)` falls back to a weighted random draw from the seeded generator.
///
/// The ring holds at most [`DEFAULT_MAX_RING_POINTS`](Self::DEFAULT_MAX_RING_POINTS) points
/// unless set otherwise; past that, every endpoint's count is scaled down in proportion (at
/// least one point each). Picks cost O(log points). An update that changes ids or weights
/// rebuilds the ring (hashing and sorting its points); one that only changes health filters
/// it, in O(points).
#[derive(Debug)]
pub struct ConsistentHash {
    slots: Slots<()>,
    vnodes_per_weight: u32,
    max_ring_points: usize,
    /// Every point of every endpoint with weight > 0: (hash, slot index), ascending.
    ring: Vec<(u64, u32)>,
    /// The points of pickable endpoints: hashes ascending, and the slot index owning each.
    live_points: Vec<u64>,
    live_owners: Vec<u32>,
    /// `(id, weight, slot index)` of every endpoint with weight > 0, in slot order: the
    /// ring's input, kept to skip rebuilding the ring when only health changed.
    ring_input: Vec<(EndpointId, u32, u32)>,
    table: WeightTable,
    rng: SplitMix64,
}

impl ConsistentHash {
    /// Ring points per unit of weight, as in ketama.
    pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 160;
    /// The most points the ring holds by default: 2^18 (about 1,600 endpoints of weight 1
    /// at 160 points each, 7 MiB at most).
    pub const DEFAULT_MAX_RING_POINTS: usize = 1 << 18;

    /// With the default ring size; `seed` drives the fallback draws (a pick without a key).
    pub fn new(seed: u64) -> Self {
        Self::with_ring(
            seed,
            Self::DEFAULT_VNODES_PER_WEIGHT,
            Self::DEFAULT_MAX_RING_POINTS,
        )
    }

    /// With `vnodes_per_weight` ring points per unit of weight (at least 1) and at most
    /// `max_ring_points` points in all (at least one per endpoint). More points spread keys
    /// more evenly at the cost of memory and update time.
    pub fn with_ring(seed: u64, vnodes_per_weight: u32, max_ring_points: usize) -> Self {
        Self {
            slots: Slots::new(),
            vnodes_per_weight: vnodes_per_weight.max(1),
            max_ring_points,
            ring: Vec::new(),
            live_points: Vec::new(),
            live_owners: Vec::new(),
            ring_input: Vec::new(),
            table: WeightTable::default(),
            rng: SplitMix64::new(seed),
        }
    }

    /// The hash a call key is placed at on the ring.
    fn key_point(key: u64) -> u64 {
        mix64(key)
    }

    fn rebuild_ring(&mut self) {
        let per_weight = u64::from(self.vnodes_per_weight);
        let wanted: u64 = self
            .ring_input
            .iter()
            .map(|&(_, w, _)| u64::from(w).saturating_mul(per_weight))
            .fold(0, u64::saturating_add);
        let cap = self.max_ring_points as u64;
        let count = |w: u32| -> u64 {
            let n = u64::from(w).saturating_mul(per_weight);
            if wanted <= cap {
                n
            } else {
                ((u128::from(n) * u128::from(cap) / u128::from(wanted)) as u64).max(1)
            }
        };
        let mut ring: Vec<(u64, EndpointId, u32)> = Vec::new();
        for &(id, w, slot) in &self.ring_input {
            // An endpoint's points: the SplitMix64 stream seeded by its id.
            let mut stream = SplitMix64::new(mix64(id.0));
            ring.extend((0..count(w)).map(|_| (stream.next_u64(), id, slot)));
        }
        // By id on equal hashes, so that the ring does not depend on the update's order.
        ring.sort_unstable_by_key(|&(point, id, _)| (point, id));
        self.ring.clear();
        self.ring
            .extend(ring.iter().map(|&(point, _, slot)| (point, slot)));
    }

    fn filter_live(&mut self) {
        self.live_points.clear();
        self.live_owners.clear();
        for &(point, slot) in &self.ring {
            if self.slots.list[slot as usize].ep.is_pickable() {
                self.live_points.push(point);
                self.live_owners.push(slot);
            }
        }
    }
}

impl Balancer for ConsistentHash {
    fn update(&mut self, endpoints: &[Endpoint]) {
        self.slots.update(endpoints, |_| ());
        self.table.rebuild(&self.slots);
        let input: Vec<(EndpointId, u32, u32)> = (self.slots.list.iter().enumerate())
            .filter(|(_, s)| s.ep.weight > 0)
            .map(|(i, s)| (s.ep.id, s.ep.weight, i as u32))
            .collect();
        if input != self.ring_input {
            self.ring_input = input;
            self.rebuild_ring();
        }
        self.filter_live();
    }

    fn pick(&mut self, key: Option<u64>) -> Option<EndpointId> {
        let Some(key) = key else {
            let entry = self.table.sample(&mut self.rng)?;
            return Some(self.slots.list[self.table.slot[entry]].ep.id);
        };
        let hash = Self::key_point(key);
        let mut i = self.live_points.partition_point(|&p| p < hash);
        if i == self.live_points.len() {
            i = 0;
        }
        let slot = *self.live_owners.get(i)?;
        Some(self.slots.list[slot as usize].ep.id)
    }
}
