use std::time::Duration;

use super::{Balancer, Endpoint, EndpointId, Slots, SplitMix64, WeightTable};

/// Latency samples and estimates are capped at one hour, which keeps the arithmetic finite.
const MAX_LATENCY_NANOS: f64 = 3_600e9;

/// Settings of [`PowerOfTwoChoices`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct P2cConfig {
    /// Weight of each new latency sample in the moving average, in `(0, 1]`; higher reacts
    /// faster, lower smooths more. Default 0.3. Out of range values mean the default.
    pub alpha: f64,
    /// The latency assumed for endpoints without samples while no endpoint in the set has
    /// any. Once some do, endpoints without samples are assumed to be average. Default 10 ms.
    pub default_latency: Duration,
    /// A failed call counts as a sample of `max(latency, current estimate) × failure_penalty`,
    /// so an endpoint that fails fast does not attract calls. At least 1; default 4.
    pub failure_penalty: f64,
}

impl Default for P2cConfig {
    fn default() -> Self {
        Self {
            alpha: 0.3,
            default_latency: Duration::from_millis(10),
            failure_penalty: 4.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Load {
    in_flight: u32,
    /// Moving average of latency in nanoseconds; `None` before the first sample.
    ewma: Option<f64>,
}

/// Power of two choices: draw two distinct endpoints at random (by weight) and send the call
/// to the less loaded one.
///
/// For endpoints whose speed differs or changes (noisy neighbours, GC pauses, a slow zone):
/// calls drift away from slow or busy endpoints within a few picks, while randomness keeps
/// many clients from all piling onto the same "best" endpoint. Load is
/// `(latency EWMA + 1 ns) × (in-flight calls + 1) / weight`, from [`Balancer::on_start`] and
/// [`Balancer::on_finish`]; call both for every call picked, or the in-flight counts drift.
/// Open streams count as calls in flight, from [`Balancer::on_stream_open`] to
/// [`Balancer::on_stream_end`], and give no latency sample.
/// In-flight counts and latency estimates survive updates for endpoints that stay (down or
/// not) and are dropped for endpoints that leave; a call that finishes after its endpoint
/// left and came back does not count against it.
///
/// Estimates change only when calls finish, and there is no clock: an endpoint that lost on
/// latency gets calls again when the others become busy enough, or after an update that
/// removes it and adds it back. Draws come from the seeded generator; ties go to the first
/// draw. The key is ignored.
#[derive(Debug)]
pub struct PowerOfTwoChoices {
    slots: Slots<Load>,
    table: WeightTable,
    rng: SplitMix64,
    config: P2cConfig,
    /// Sum and count of the estimates of endpoints that have one, for the average.
    sampled_sum: f64,
    sampled: usize,
}

impl PowerOfTwoChoices {
    /// With [`P2cConfig::default`]; `seed` drives the draws.
    pub fn new(seed: u64) -> Self {
        Self::with_config(seed, P2cConfig::default())
    }

    /// With `config`; out of range values of it mean their defaults.
    pub fn with_config(seed: u64, mut config: P2cConfig) -> Self {
        let default = P2cConfig::default();
        if !(config.alpha > 0.0 && config.alpha <= 1.0) {
            config.alpha = default.alpha;
        }
        if !(config.failure_penalty >= 1.0 && config.failure_penalty.is_finite()) {
            config.failure_penalty = default.failure_penalty;
        }
        Self {
            slots: Slots::new(),
            table: WeightTable::default(),
            rng: SplitMix64::new(seed),
            config,
            sampled_sum: 0.0,
            sampled: 0,
        }
    }

    /// Calls to `id` started and not yet finished, or `None` if `id` is not in the set.
    pub fn in_flight(&self, id: EndpointId) -> Option<u32> {
        let i = self.slots.position(id)?;
        Some(self.slots.list[i].state.in_flight)
    }

    /// The latency moving average of `id`, or `None` if it is not in the set or has no
    /// samples yet.
    pub fn latency_estimate(&self, id: EndpointId) -> Option<Duration> {
        let i = self.slots.position(id)?;
        let nanos = self.slots.list[i].state.ewma?;
        Some(Duration::from_nanos(nanos as u64))
    }

    /// The latency assumed for endpoints without samples, in nanoseconds.
    fn baseline(&self) -> f64 {
        if self.sampled > 0 {
            (self.sampled_sum / self.sampled as f64).clamp(0.0, MAX_LATENCY_NANOS)
        } else {
            nanos(self.config.default_latency)
        }
    }

    fn score(&self, entry: usize, baseline: f64) -> f64 {
        let slot = &self.slots.list[self.table.slot[entry]];
        let latency = slot.state.ewma.unwrap_or(baseline);
        (latency + 1.0) * (f64::from(slot.state.in_flight) + 1.0) / f64::from(slot.ep.weight)
    }
}

fn nanos(d: Duration) -> f64 {
    (d.as_nanos() as f64).min(MAX_LATENCY_NANOS)
}

impl Balancer for PowerOfTwoChoices {
    fn update(&mut self, endpoints: &[Endpoint]) {
        self.slots.update(endpoints, |_| Load::default());
        self.table.rebuild(&self.slots);
        let estimates = self.slots.list.iter().filter_map(|s| s.state.ewma);
        self.sampled = estimates.clone().count();
        self.sampled_sum = estimates.sum();
    }

    fn pick(&mut self, _key: Option<u64>) -> Option<EndpointId> {
        let first = self.table.sample(&mut self.rng)?;
        let chosen = match self.table.sample_excluding(&mut self.rng, first) {
            None => first,
            Some(second) => {
                let baseline = self.baseline();
                if self.score(second, baseline) < self.score(first, baseline) {
                    second
                } else {
                    first
                }
            }
        };
        Some(self.slots.list[self.table.slot[chosen]].ep.id)
    }

    fn on_start(&mut self, id: EndpointId) {
        if let Some(load) = self.slots.state_mut(id) {
            load.in_flight = load.in_flight.saturating_add(1);
        }
    }

    fn on_stream_open(&mut self, id: EndpointId) {
        self.on_start(id);
    }

    fn on_stream_end(&mut self, id: EndpointId) {
        if let Some(load) = self.slots.state_mut(id) {
            load.in_flight = load.in_flight.saturating_sub(1);
        }
    }

    fn on_finish(&mut self, id: EndpointId, latency: Duration, ok: bool) {
        let baseline = self.baseline();
        let P2cConfig {
            alpha,
            failure_penalty,
            ..
        } = self.config;
        let Some(load) = self.slots.state_mut(id) else {
            return;
        };
        load.in_flight = load.in_flight.saturating_sub(1);
        let mut sample = nanos(latency);
        if !ok {
            let estimate = load.ewma.unwrap_or(baseline);
            sample = (sample.max(estimate) * failure_penalty).min(MAX_LATENCY_NANOS);
        }
        let old = load.ewma;
        let new = match old {
            None => sample,
            Some(e) => e + alpha * (sample - e),
        };
        load.ewma = Some(new);
        match old {
            None => {
                self.sampled += 1;
                self.sampled_sum += new;
            }
            Some(e) => self.sampled_sum += new - e,
        }
    }
}
