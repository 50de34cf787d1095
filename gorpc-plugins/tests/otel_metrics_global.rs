//! `otel_metrics::install`: sets the process's global recorder, hence a test binary of its
//! own with a single test.

use gorpc_plugins::otel_metrics;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

#[test]
fn install_sets_the_global_recorder_once() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    otel_metrics::install(provider.meter("gorpc")).expect("the first install succeeds");
    assert!(
        otel_metrics::install(provider.meter("gorpc")).is_err(),
        "a second install is refused"
    );

    // Recorded from another thread: the global recorder, not a thread's local one.
    std::thread::spawn(|| {
        let in_flight = metrics::gauge!("gorpc_server_calls_in_flight", "method" => "/a.B/C");
        in_flight.increment(3);
        in_flight.decrement(1);
    })
    .join()
    .unwrap();

    provider.force_flush().unwrap();
    let exported = exporter.get_finished_metrics().unwrap();
    let metric = exported
        .iter()
        .flat_map(|resource| resource.scope_metrics())
        .flat_map(|scope| scope.metrics())
        .find(|metric| metric.name() == "gorpc_server_calls_in_flight")
        .expect("exported");
    let AggregatedMetrics::F64(MetricData::Gauge(gauge)) = metric.data() else {
        panic!("not an f64 gauge: {:?}", metric.data());
    };
    let values: Vec<f64> = gauge.data_points().map(|p| p.value()).collect();
    assert_eq!(values, [2.0]);
}
