//! A [`metrics`] facade recorder that reports to OpenTelemetry: [`OtelRecorder`] turns the
//! counters, gauges and histograms that gorpc (or the application) records through the
//! `metrics` crate into instruments of an OpenTelemetry [`Meter`], so they leave the process
//! through whatever reader and exporter the application gave its meter provider (OTLP,
//! Prometheus, ...).
//!
//! Unlike `metrics-exporter-opentelemetry` 0.2, gauges keep their value here: a gauge moved
//! only by `increment`/`decrement` (calls in flight, open connections) reports what it
//! adds up to.
//!
//! | `metrics` | OpenTelemetry |
//! | --- | --- |
//! | counter | `Counter<u64>`, one per metric name |
//! | gauge | `ObservableGauge<f64>`, one per name, observing every label set's current value |
//! | histogram | `Histogram<f64>`, one per name |
//!
//! A key's labels become the attributes of its data points; the key's `KeyValue`s are built
//! once, when it is registered, so recording allocates nothing of its own.
//!
//! - **Descriptions and units** given by `describe_*` are used when the instrument of that
//!   name is created, which is on the first registration of the name: describe a metric
//!   before it is first used. Only a name's first description counts, and one arriving
//!   after the instrument exists is ignored. Units are written in
//!   UCUM as OpenTelemetry expects (`Seconds` is `s`, `Bytes` is `By`, `Count` is
//!   `{count}`, an annotation, which Prometheus exporters drop rather than turn into a
//!   suffix, as they would `1`).
//! - **Histogram buckets**: the SDK's default boundaries suit milliseconds. A histogram
//!   described in `Seconds`, or whose name ends in `_seconds`, is created with
//!   [`SECONDS_BOUNDARIES`] (OpenTelemetry's advice for RPC durations) instead; views of the
//!   meter provider still override either.
//! - **`Counter::absolute`** adds the difference from the largest value the counter has
//!   reached (through `absolute` or `increment`); a lower value adds nothing, since an
//!   OpenTelemetry counter cannot go down.
//! - The metadata of a registration (target, level) is ignored, and registered keys are
//!   kept for the life of the recorder.
//!
//! ```
//! use opentelemetry::metrics::MeterProvider as _;
//! use opentelemetry_sdk::metrics::SdkMeterProvider;
//!
//! // In an application: a provider with an OTLP (or Prometheus) reader.
//! let provider = SdkMeterProvider::builder().build();
//! gorpc_plugins::otel_metrics::install(provider.meter("gorpc")).expect("no recorder yet");
//!
//! metrics::gauge!("gorpc_server_calls_in_flight", "method" => "/pkg.Svc/Method").increment(1);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SetRecorderError, SharedString, Unit,
};
use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;

/// The bucket boundaries of histograms in seconds: OpenTelemetry's advice for
/// `rpc.server.duration` and `rpc.client.duration`.
pub const SECONDS_BOUNDARIES: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Sets an [`OtelRecorder`] on `meter` as the global `metrics` recorder. Fails, handing the
/// recorder back, when a global recorder is already set.
pub fn install(meter: Meter) -> Result<(), SetRecorderError<OtelRecorder>> {
    metrics::set_global_recorder(OtelRecorder::new(meter))
}

/// A `metrics` recorder that records into the instruments of an OpenTelemetry [`Meter`]; see
/// the [module documentation](self) for the mapping.
pub struct OtelRecorder {
    meter: Meter,
    /// Boxed so that the recorder, moved into the global and back out in
    /// `SetRecorderError`, stays small.
    state: Box<RwLock<State>>,
}

#[derive(Default)]
struct State {
    descriptions: HashMap<String, (Option<Unit>, SharedString)>,
    counters: HashMap<Key, Arc<OtelCounter>>,
    gauges: HashMap<Key, Arc<OtelGauge>>,
    histograms: HashMap<Key, Arc<OtelHistogram>>,
    counter_instruments: HashMap<String, opentelemetry::metrics::Counter<u64>>,
    /// The label sets each name's observable gauge reports, shared with its callback.
    gauge_sets: HashMap<String, Arc<RwLock<Vec<Arc<OtelGauge>>>>>,
    histogram_instruments: HashMap<String, opentelemetry::metrics::Histogram<f64>>,
}

impl OtelRecorder {
    /// Records into instruments of `meter`, e.g. `provider.meter("gorpc")`.
    pub fn new(meter: Meter) -> Self {
        OtelRecorder {
            meter,
            state: Box::default(),
        }
    }

    /// The handle registered for `key`, or a new one. Registration is on the path of every
    /// `counter!`-style macro call, so a key already known takes only the read lock.
    fn handle<H: Handle>(&self, key: &Key) -> Arc<H> {
        if let Some(handle) = H::registered(&read(&self.state)).get(key) {
            return Arc::clone(handle);
        }
        let mut state = write(&self.state);
        if let Some(handle) = H::registered(&state).get(key) {
            return Arc::clone(handle);
        }
        let attributes = key
            .labels()
            .map(|label| KeyValue::new(label.key().to_owned(), label.value().to_owned()))
            .collect();
        let handle = H::create(&mut state, &self.meter, key.name(), attributes);
        H::registered_mut(&mut state).insert(key.clone(), Arc::clone(&handle));
        handle
    }

    fn describe(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        write(&self.state)
            .descriptions
            .entry(key.as_str().to_owned())
            .or_insert((unit, description));
    }
}

impl fmt::Debug for OtelRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = read(&self.state);
        f.debug_struct("OtelRecorder")
            .field("counters", &state.counters.len())
            .field("gauges", &state.gauges.len())
            .field("histograms", &state.histograms.len())
            .finish_non_exhaustive()
    }
}

impl Recorder for OtelRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description)
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description)
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(key, unit, description)
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle::<OtelCounter>(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle::<OtelGauge>(key))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle::<OtelHistogram>(key))
    }
}

/// What the three kinds of handle have in common for [`OtelRecorder::handle`].
trait Handle: Sized {
    fn registered(state: &State) -> &HashMap<Key, Arc<Self>>;
    fn registered_mut(state: &mut State) -> &mut HashMap<Key, Arc<Self>>;
    /// A handle for a new key of metric `name`, creating the name's instrument on its first
    /// key.
    fn create(state: &mut State, meter: &Meter, name: &str, attributes: Vec<KeyValue>)
        -> Arc<Self>;
}

/// Applies the description and unit `describe_*` gave `name`, if any, to an instrument
/// builder (the three builders share no trait).
macro_rules! described {
    ($builder:expr, $descriptions:expr, $name:expr) => {{
        let mut builder = $builder;
        if let Some((unit, description)) = $descriptions.get($name) {
            if !description.is_empty() {
                builder = builder.with_description(description.to_string());
            }
            if let Some(unit) = unit {
                builder = builder.with_unit(ucum(*unit));
            }
        }
        builder
    }};
}

struct OtelCounter {
    instrument: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    /// The largest total this counter has reached, for `absolute`.
    reached: AtomicU64,
}

impl Handle for OtelCounter {
    fn registered(state: &State) -> &HashMap<Key, Arc<Self>> {
        &state.counters
    }

    fn registered_mut(state: &mut State) -> &mut HashMap<Key, Arc<Self>> {
        &mut state.counters
    }

    fn create(
        state: &mut State,
        meter: &Meter,
        name: &str,
        attributes: Vec<KeyValue>,
    ) -> Arc<Self> {
        let State {
            descriptions,
            counter_instruments,
            ..
        } = state;
        let instrument = counter_instruments
            .entry(name.to_owned())
            .or_insert_with(|| {
                described!(meter.u64_counter(name.to_owned()), descriptions, name).build()
            });
        Arc::new(OtelCounter {
            instrument: instrument.clone(),
            attributes,
            reached: AtomicU64::new(0),
        })
    }
}

impl CounterFn for OtelCounter {
    fn increment(&self, value: u64) {
        self.reached.fetch_add(value, Ordering::Relaxed);
        self.instrument.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.reached.fetch_max(value, Ordering::Relaxed);
        if value > before {
            self.instrument.add(value - before, &self.attributes);
        }
    }
}

struct OtelGauge {
    /// The current value, as `f64::to_bits`.
    bits: AtomicU64,
    attributes: Vec<KeyValue>,
}

impl OtelGauge {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(f(f64::from_bits(bits)).to_bits())
            });
    }
}

impl Handle for OtelGauge {
    fn registered(state: &State) -> &HashMap<Key, Arc<Self>> {
        &state.gauges
    }

    fn registered_mut(state: &mut State) -> &mut HashMap<Key, Arc<Self>> {
        &mut state.gauges
    }

    fn create(
        state: &mut State,
        meter: &Meter,
        name: &str,
        attributes: Vec<KeyValue>,
    ) -> Arc<Self> {
        let State {
            descriptions,
            gauge_sets,
            ..
        } = state;
        let set = gauge_sets.entry(name.to_owned()).or_insert_with(|| {
            let set = Arc::<RwLock<Vec<Arc<OtelGauge>>>>::default();
            let observed = Arc::clone(&set);
            let builder =
                meter
                    .f64_observable_gauge(name.to_owned())
                    .with_callback(move |observer| {
                        for gauge in read(&observed).iter() {
                            let value = f64::from_bits(gauge.bits.load(Ordering::Relaxed));
                            observer.observe(value, &gauge.attributes);
                        }
                    });
            // The SDK keeps the callback; the instrument handle itself carries nothing.
            described!(builder, descriptions, name).build();
            set
        });
        let gauge = Arc::new(OtelGauge {
            bits: AtomicU64::new(0f64.to_bits()),
            attributes,
        });
        write(set).push(Arc::clone(&gauge));
        gauge
    }
}

impl GaugeFn for OtelGauge {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }
}

struct OtelHistogram {
    instrument: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl Handle for OtelHistogram {
    fn registered(state: &State) -> &HashMap<Key, Arc<Self>> {
        &state.histograms
    }

    fn registered_mut(state: &mut State) -> &mut HashMap<Key, Arc<Self>> {
        &mut state.histograms
    }

    fn create(
        state: &mut State,
        meter: &Meter,
        name: &str,
        attributes: Vec<KeyValue>,
    ) -> Arc<Self> {
        let State {
            descriptions,
            histogram_instruments,
            ..
        } = state;
        let instrument = histogram_instruments
            .entry(name.to_owned())
            .or_insert_with(|| {
                let mut builder = meter.f64_histogram(name.to_owned());
                let unit = descriptions.get(name).and_then(|(unit, _)| *unit);
                if unit == Some(Unit::Seconds) || name.ends_with("_seconds") {
                    builder = builder.with_boundaries(SECONDS_BOUNDARIES.to_vec());
                }
                described!(builder, descriptions, name).build()
            });
        Arc::new(OtelHistogram {
            instrument: instrument.clone(),
            attributes,
        })
    }
}

impl HistogramFn for OtelHistogram {
    fn record(&self, value: f64) {
        self.instrument.record(value, &self.attributes);
    }
}

/// A `metrics` unit in UCUM, as OpenTelemetry writes units. ASCII only: the SDK refuses
/// others (`μs`).
fn ucum(unit: Unit) -> &'static str {
    match unit {
        // An annotation: exporters to Prometheus drop it, where `1` would become `_ratio`.
        Unit::Count => "{count}",
        Unit::Percent => "%",
        Unit::Seconds => "s",
        Unit::Milliseconds => "ms",
        Unit::Microseconds => "us",
        Unit::Nanoseconds => "ns",
        Unit::Tebibytes => "TiBy",
        Unit::Gibibytes => "GiBy",
        Unit::Mebibytes => "MiBy",
        Unit::Kibibytes => "KiBy",
        Unit::Bytes => "By",
        Unit::TerabitsPerSecond => "Tbit/s",
        Unit::GigabitsPerSecond => "Gbit/s",
        Unit::MegabitsPerSecond => "Mbit/s",
        Unit::KilobitsPerSecond => "kbit/s",
        Unit::BitsPerSecond => "bit/s",
        Unit::CountPerSecond => "{count}/s",
    }
}

/// A panic while a lock was held left no map half-updated (insertions are single calls), so
/// a poisoned lock is used as it is.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
