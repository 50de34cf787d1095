use super::{Balancer, Endpoint, EndpointId, Slots, SplitMix64, WeightTable};

/// Weighted random: each pick is an independent draw, endpoint `i` with probability
/// `weight_i / total`.
///
/// Needs no coordination and no feedback, so many clients spread load by weight without
/// knowing of each other; over short windows it is lumpier than round robin. Picks cost
/// O(log n). The key is ignored. Deterministic for a given seed.
#[derive(Debug)]
pub struct Random {
    slots: Slots<()>,
    table: WeightTable,
    rng: SplitMix64,
}

impl Random {
    /// Draws from a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            slots: Slots::new(),
            table: WeightTable::default(),
            rng: SplitMix64::new(seed),
        }
    }
}

impl Balancer for Random {
    fn update(&mut self, endpoints: &[Endpoint]) {
        self.slots.update(endpoints, |_| ());
        self.table.rebuild(&self.slots);
    }

    fn pick(&mut self, _key: Option<u64>) -> Option<EndpointId> {
        let entry = self.table.sample(&mut self.rng)?;
        Some(self.slots.list[self.table.slot[entry]].ep.id)
    }
}
