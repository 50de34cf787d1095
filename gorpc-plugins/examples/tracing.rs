//! Distributed tracing: a client and a server in one process, both traced with
//! OpenTelemetry, exporting their spans over OTLP/HTTP.
//!
//! ```text
//! cargo run -p gorpc-plugins --example tracing --features otel
//! ```
//!
//! Spans go to `$OTEL_EXPORTER_OTLP_ENDPOINT/v1/traces` (default
//! `http://127.0.0.1:4318/v1/traces`). To look at them, start Jaeger, whose all-in-one image
//! accepts OTLP/HTTP on port 4318 and serves its UI on 16686:
//!
//! ```text
//! docker run --rm -p 127.0.0.1:4318:4318 -p 127.0.0.1:16686:16686 jaegertracing/jaeger:latest
//! ```
//!
//! (or the `jaeger-all-in-one` binary; older images need `-e COLLECTOR_OTLP_ENABLED=true`),
//! run the example, open <http://127.0.0.1:16686> and pick the service `gorpc-tracing-example`:
//! each `app.request` trace holds the client's span of every call, the server's span as its
//! child, and the handler's own `lookup` span under that.
//!
//! Without a collector listening, the export fails: the example prints the error and still
//! exits normally within a few seconds.

use std::fmt;
use std::time::Duration;

use gorpc_plugins::otel::{OtelClient, OtelServer};
use gorpc_tokio::{Client, ClientConfig, Code, Router, Server, Status, Tokio};
use opentelemetry::trace::{FutureExt as _, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

const SAY_HELLO: &str = "/demo.Greeter/SayHello";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4318".to_owned());
    let endpoint = format!("{}/v1/traces", base.trim_end_matches('/'));
    println!("exporting spans to {endpoint}");

    // Built outside the async runtime: the blocking HTTP client must not be created or
    // dropped on one of its threads.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(2))
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_resource(
            Resource::builder()
                .with_service_name("gorpc-tracing-example")
                .build(),
        )
        .with_batch_exporter(Reporting(exporter))
        .build();
    // Handlers take their tracer from the global provider.
    global::set_tracer_provider(provider.clone());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let calls = runtime.block_on(run(&provider));
    drop(runtime);

    // Flushes the spans still queued; an unreachable collector costs at most the timeout.
    if let Err(err) = provider.shutdown() {
        println!("shutting the tracer provider down: {err}");
    }
    calls
}

async fn run(provider: &SdkTracerProvider) -> Result<(), Box<dyn std::error::Error>> {
    let router = Router::new().msgpack(SAY_HELLO, |name: String| async move {
        // The server span is current here: this span becomes its child.
        let tracer = global::tracer("greeter");
        let span = tracer.start("lookup");
        let cx = Context::current_with_span(span);
        cx.span()
            .set_attribute(KeyValue::new("greeter.name_len", name.len() as i64));
        let answer = if name.is_empty() {
            Err(Status::new(Code::InvalidArgument, "name must not be empty"))
        } else {
            Ok(format!("Hello, {name}!"))
        };
        cx.span().end();
        answer
    });
    let server = Server::new(Tokio::current(), router)
        .interceptor(OtelServer::new(provider.tracer("gorpc-server")))
        .bind("127.0.0.1:0".parse()?)
        .await?;
    println!("server listening on {}", server.local_addr());

    let client = Client::connect(
        Tokio::current(),
        server.local_addr(),
        ClientConfig::default(),
    )
    .await?
    .with_interceptor(OtelClient::new(provider.tracer("gorpc-client")));

    // One application span around a few calls: they all land in its trace.
    let app = provider.tracer("app").start("app.request");
    let cx = Context::current_with_span(app);
    for name in ["gorpc", "OpenTelemetry", ""] {
        let reply: Result<String, Status> = client
            .call(SAY_HELLO, &name.to_owned())
            .with_context(cx.clone())
            .await;
        match reply {
            Ok(message) => println!("SayHello({name:?}) -> {message:?}"),
            Err(status) => println!("SayHello({name:?}) -> error {status}"),
        }
    }
    println!("trace id: {}", cx.span().span_context().trace_id());
    cx.span().end();

    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Passes spans on to the OTLP exporter and prints why an export failed: by default the
/// SDK only reports that through its internal logs.
struct Reporting<E>(E);

impl<E: fmt::Debug> fmt::Debug for Reporting<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: SpanExporter> SpanExporter for Reporting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.0.export(batch).await;
        match &result {
            Ok(()) => println!("exported {spans} spans"),
            Err(err) => println!("could not export {spans} spans: {err}"),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}
