use super::{Balancer, Endpoint, EndpointId, Slots, SplitMix64};

/// Plain round robin: the pickable endpoints in turn, in the order of the last update.
///
/// For interchangeable endpoints: over any window of `n` picks each of `n` endpoints gets one
/// call. Weights are ignored, except that weight 0 is never picked. Down endpoints are
/// skipped. After an update the rotation continues after the last endpoint picked, if it is
/// still in the set. The seed only chooses where the first rotation starts, so that clients
/// created together do not all start on the same endpoint. The key is ignored.
#[derive(Debug)]
pub struct RoundRobin {
    slots: Slots<()>,
    /// Slot indices of the pickable endpoints, ascending.
    order: Vec<usize>,
    next: usize,
    last: Option<EndpointId>,
    start: u64,
}

impl RoundRobin {
    /// `seed` chooses where the first rotation starts.
    pub fn new(seed: u64) -> Self {
        Self {
            slots: Slots::new(),
            order: Vec::new(),
            next: 0,
            last: None,
            start: SplitMix64::new(seed).next_u64(),
        }
    }
}

impl Balancer for RoundRobin {
    fn update(&mut self, endpoints: &[Endpoint]) {
        self.slots.update(endpoints, |_| ());
        self.order.clear();
        self.order
            .extend((0..self.slots.list.len()).filter(|&i| self.slots.list[i].ep.is_pickable()));
        let len = self.order.len();
        if len == 0 {
            return;
        }
        let after_last = self
            .last
            .and_then(|id| self.slots.position(id))
            .and_then(|slot| self.order.binary_search(&slot).ok());
        self.next = match (after_last, self.last) {
            (Some(p), _) => (p + 1) % len,
            (None, None) => (self.start % len as u64) as usize,
            (None, Some(_)) => self.next % len,
        };
    }

    fn pick(&mut self, _key: Option<u64>) -> Option<EndpointId> {
        let len = self.order.len();
        if len == 0 {
            return None;
        }
        let i = self.next % len;
        self.next = (i + 1) % len;
        let id = self.slots.list[self.order[i]].ep.id;
        self.last = Some(id);
        Some(id)
    }
}

/// Smooth weighted round robin, as in nginx: exact shares by weight, interleaved.
///
/// For endpoints of different capacity when calls should follow the weights exactly rather
/// than on average: over every cycle of `total weight` picks, each endpoint gets exactly its
/// weight, and the picks of a heavy endpoint are spread through the cycle instead of coming
/// in a burst (weights 5, 1, 1 give `a a b a c a a`). Each pick adds every endpoint's weight
/// to its current value, takes the largest (the earliest listed on a tie) and subtracts the
/// total from it; O(n) per pick. Current values survive updates for endpoints that stay
/// pickable; an endpoint that goes down or to weight 0 starts again from 0 when it returns.
/// No randomness; the key is ignored.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    slots: Slots<i64>,
    order: Vec<usize>,
    total: i64,
}

impl WeightedRoundRobin {
    /// With no endpoints yet.
    pub fn new() -> Self {
        Self {
            slots: Slots::new(),
            order: Vec::new(),
            total: 0,
        }
    }
}

impl Default for WeightedRoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer for WeightedRoundRobin {
    fn update(&mut self, endpoints: &[Endpoint]) {
        self.slots.update(endpoints, |_| 0);
        self.order.clear();
        self.total = 0;
        let mut sum: i128 = 0;
        for (i, slot) in self.slots.list.iter_mut().enumerate() {
            if slot.ep.is_pickable() {
                self.order.push(i);
                self.total = self.total.saturating_add(i64::from(slot.ep.weight));
                sum += i128::from(slot.state);
            } else {
                slot.state = 0;
            }
        }
        // Kept current values no longer sum to 0 once endpoints leave or change weight.
        // Shifting them all by the mean (the remainder spread one by one) restores the sum,
        // which keeps the values bounded by the total weight.
        let n = self.order.len() as i128;
        if n == 0 {
            return;
        }
        let (q, r) = (sum.div_euclid(n), sum.rem_euclid(n));
        for (k, &i) in self.order.iter().enumerate() {
            let shift = q + i128::from((k as i128) < r);
            let state = &mut self.slots.list[i].state;
            *state = (i128::from(*state) - shift).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        }
    }

    fn pick(&mut self, _key: Option<u64>) -> Option<EndpointId> {
        let mut best: Option<(usize, i64)> = None;
        for &i in &self.order {
            let slot = &mut self.slots.list[i];
            slot.state = slot.state.saturating_add(i64::from(slot.ep.weight));
            if best.is_none_or(|(_, current)| slot.state > current) {
                best = Some((i, slot.state));
            }
        }
        let (i, _) = best?;
        let slot = &mut self.slots.list[i];
        slot.state = slot.state.saturating_sub(self.total);
        Some(slot.ep.id)
    }
}
