//! `OtelRecorder` against the SDK's in-memory exporter: each test has a meter provider and a
//! recorder of its own, used as the thread's local recorder, so the tests share no global.

use std::collections::BTreeMap;

use gorpc_plugins::otel_metrics::{OtelRecorder, SECONDS_BOUNDARIES};
use metrics::{Key, Label, Metadata, Recorder as _, Unit};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

struct Harness {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
    recorder: OtelRecorder,
}

impl Harness {
    fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let recorder = OtelRecorder::new(provider.meter("gorpc-test"));
        Harness {
            provider,
            exporter,
            recorder,
        }
    }

    /// Runs `f` with this harness's recorder as the thread's recorder.
    fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// Collects and hands `f` the exported metric `name`.
    fn metric<T>(&self, name: &str, f: impl FnOnce(&Metric) -> T) -> T {
        self.exporter.reset();
        self.provider.force_flush().unwrap();
        let exported = self.exporter.get_finished_metrics().unwrap();
        let metric = exported
            .iter()
            .flat_map(|resource| resource.scope_metrics())
            .flat_map(|scope| scope.metrics())
            .find(|metric| metric.name() == name)
            .unwrap_or_else(|| panic!("{name} was not exported"));
        f(metric)
    }
}

type Attributes = BTreeMap<String, String>;

fn attributes<'a>(kvs: impl Iterator<Item = &'a KeyValue>) -> Attributes {
    kvs.map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The points of a `u64` sum, by attributes.
fn sum_points(metric: &Metric) -> BTreeMap<Attributes, u64> {
    let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() else {
        panic!("{} is not a u64 sum: {:?}", metric.name(), metric.data());
    };
    assert!(sum.is_monotonic());
    sum.data_points()
        .map(|p| (attributes(p.attributes()), p.value()))
        .collect()
}

/// The points of an `f64` gauge, by attributes.
fn gauge_points(metric: &Metric) -> BTreeMap<Attributes, f64> {
    let AggregatedMetrics::F64(MetricData::Gauge(gauge)) = metric.data() else {
        panic!("{} is not an f64 gauge: {:?}", metric.name(), metric.data());
    };
    gauge
        .data_points()
        .map(|p| (attributes(p.attributes()), p.value()))
        .collect()
}

#[test]
fn counters_add_up_per_label_set() {
    let h = Harness::new();
    h.record(|| {
        let ok = [("method", "/pkg.Svc/Get"), ("code", "OK")];
        metrics::counter!("gorpc_server_calls_total", &ok).increment(2);
        metrics::counter!("gorpc_server_calls_total", &ok).increment(3);
        metrics::counter!("gorpc_server_calls_total", "method" => "/pkg.Svc/Get", "code" => "NotFound")
            .increment(1);
    });
    let points = h.metric("gorpc_server_calls_total", sum_points);
    assert_eq!(
        points,
        BTreeMap::from([
            (labels(&[("method", "/pkg.Svc/Get"), ("code", "OK")]), 5),
            (
                labels(&[("method", "/pkg.Svc/Get"), ("code", "NotFound")]),
                1
            ),
        ])
    );
}

#[test]
fn absolute_adds_only_what_a_counter_gained() {
    let h = Harness::new();
    let counter = h.record(|| metrics::counter!("gorpc_client_bytes_total"));
    counter.absolute(10);
    counter.absolute(7); // lower: nothing
    counter.increment(1); // 11
    counter.absolute(15); // adds 4
    let points = h.metric("gorpc_client_bytes_total", sum_points);
    assert_eq!(points, BTreeMap::from([(Attributes::new(), 15)]));
}

#[test]
fn gauges_keep_what_increments_and_decrements_add_up_to() {
    let h = Harness::new();
    let (in_flight, other) = h.record(|| {
        (
            metrics::gauge!("gorpc_server_calls_in_flight", "method" => "/pkg.Svc/Get"),
            metrics::gauge!("gorpc_server_calls_in_flight", "method" => "/pkg.Svc/Put"),
        )
    });
    for _ in 0..3 {
        in_flight.increment(1.0);
    }
    in_flight.decrement(1.0);
    other.set(7.5);
    other.increment(0.5);
    let points = h.metric("gorpc_server_calls_in_flight", gauge_points);
    assert_eq!(
        points,
        BTreeMap::from([
            (labels(&[("method", "/pkg.Svc/Get")]), 2.0),
            (labels(&[("method", "/pkg.Svc/Put")]), 8.0),
        ])
    );

    // Observed again at the next collection, with its value then.
    in_flight.decrement(2.0);
    let points = h.metric("gorpc_server_calls_in_flight", gauge_points);
    assert_eq!(points[&labels(&[("method", "/pkg.Svc/Get")])], 0.0);
}

#[test]
fn histograms_record_count_sum_and_attributes() {
    let h = Harness::new();
    h.record(|| {
        let histogram = metrics::histogram!(
            "gorpc_server_call_duration_seconds",
            "method" => "/pkg.Svc/Get",
            "code" => "OK"
        );
        for v in [0.1, 0.2, 0.3] {
            histogram.record(v);
        }
    });
    h.metric("gorpc_server_call_duration_seconds", |metric| {
        let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
            panic!("not an f64 histogram: {:?}", metric.data());
        };
        let points: Vec<_> = histogram.data_points().collect();
        assert_eq!(points.len(), 1);
        let point = points[0];
        assert_eq!(
            attributes(point.attributes()),
            labels(&[("method", "/pkg.Svc/Get"), ("code", "OK")])
        );
        assert_eq!(point.count(), 3);
        assert!((point.sum() - 0.6).abs() < 1e-9, "sum {}", point.sum());
        assert_eq!(point.min(), Some(0.1));
        assert_eq!(point.max(), Some(0.3));
        // A name in seconds gets buckets in seconds, not the SDK's millisecond ones.
        assert_eq!(point.bounds().collect::<Vec<_>>(), SECONDS_BOUNDARIES);
    });
}

#[test]
fn registering_a_key_twice_shares_its_value() {
    let h = Harness::new();
    let key = Key::from_parts(
        "gorpc_server_connections",
        vec![Label::new("side", "server")],
    );
    let metadata = Metadata::new(module_path!(), metrics::Level::INFO, None);

    let (g1, g2) = (
        h.recorder.register_gauge(&key, &metadata),
        h.recorder.register_gauge(&key, &metadata),
    );
    g1.increment(1.0);
    g2.increment(1.0);
    g1.decrement(0.5);

    let counter_key = Key::from_name("gorpc_server_request_bytes_total");
    let (c1, c2) = (
        h.recorder.register_counter(&counter_key, &metadata),
        h.recorder.register_counter(&counter_key, &metadata),
    );
    c1.absolute(10);
    c2.absolute(10); // the same counter: already there

    let histogram_key = Key::from_name("payload_size");
    h.recorder
        .register_histogram(&histogram_key, &metadata)
        .record(1.0);
    h.recorder
        .register_histogram(&histogram_key, &metadata)
        .record(2.0);

    // One point each, holding both handles' work.
    let gauges = h.metric("gorpc_server_connections", gauge_points);
    assert_eq!(
        gauges,
        BTreeMap::from([(labels(&[("side", "server")]), 1.5)])
    );
    let counters = h.metric("gorpc_server_request_bytes_total", sum_points);
    assert_eq!(counters, BTreeMap::from([(Attributes::new(), 10)]));
    h.metric("payload_size", |metric| {
        let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
            panic!("not an f64 histogram");
        };
        let points: Vec<_> = histogram.data_points().collect();
        assert_eq!(points.len(), 1);
        assert_eq!((points[0].count(), points[0].sum()), (2, 3.0));
    });
}

#[test]
fn descriptions_and_units_reach_the_instruments() {
    let h = Harness::new();
    h.record(|| {
        metrics::describe_counter!(
            "gorpc_client_request_bytes_total",
            Unit::Bytes,
            "Bytes of request messages sent"
        );
        metrics::describe_gauge!(
            "gorpc_client_calls_in_flight",
            Unit::Count,
            "Calls sent and not yet answered"
        );
        metrics::describe_histogram!(
            "gorpc_client_call_latency",
            Unit::Seconds,
            "Time from sending a call to its answer"
        );
        metrics::describe_histogram!("gorpc_client_queue_time", Unit::Microseconds, "");
        metrics::counter!("gorpc_client_request_bytes_total").increment(100);
        metrics::gauge!("gorpc_client_calls_in_flight").increment(1);
        metrics::histogram!("gorpc_client_call_latency").record(0.01);
        metrics::histogram!("gorpc_client_queue_time").record(3.0);
        // Too late: the instrument exists.
        metrics::describe_counter!("gorpc_client_request_bytes_total", Unit::Count, "other");
    });

    let described =
        |name: &str| h.metric(name, |m| (m.description().to_owned(), m.unit().to_owned()));
    assert_eq!(
        described("gorpc_client_request_bytes_total"),
        ("Bytes of request messages sent".into(), "By".into())
    );
    assert_eq!(
        described("gorpc_client_calls_in_flight"),
        ("Calls sent and not yet answered".into(), "{count}".into())
    );
    assert_eq!(
        described("gorpc_client_call_latency"),
        ("Time from sending a call to its answer".into(), "s".into())
    );
    assert_eq!(
        described("gorpc_client_queue_time"),
        (String::new(), "us".into())
    );

    // Described in seconds, so seconds buckets though the name does not say so; other
    // histograms keep the SDK's.
    let bounds = |name: &str| {
        h.metric(name, |metric| {
            let AggregatedMetrics::F64(MetricData::Histogram(histogram)) = metric.data() else {
                panic!("not an f64 histogram");
            };
            histogram
                .data_points()
                .next()
                .unwrap()
                .bounds()
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(bounds("gorpc_client_call_latency"), SECONDS_BOUNDARIES);
    assert_ne!(bounds("gorpc_client_queue_time"), SECONDS_BOUNDARIES);
}
