//! Prometheus metrics: a recorder for the `gorpc_*` metrics gorpc records (and any the
//! application records through the [`metrics`](https://docs.rs/metrics) facade), scraped at
//! `GET /metrics` on a server's own port, or on a port of its own.
//!
//! ```no_run
//! # async fn demo(runtime: gorpc_tokio::Tokio, router: gorpc::Router) -> std::io::Result<()> {
//! use gorpc_plugins::prometheus::Prometheus;
//!
//! // Before any server binds or client is built: they register their metrics then.
//! let prometheus = Prometheus::install(&runtime).expect("no other recorder installed");
//! let server = prometheus
//!     .serve_on(gorpc::Server::new(runtime, router))
//!     .bind("127.0.0.1:8080".parse().unwrap())
//!     .await?;
//! // curl http://127.0.0.1:8080/metrics
//! # Ok(()) }
//! ```
//!
//! What gorpc records, on the server (`gorpc_client_*` alike on clients):
//!
//! | metric | type | labels |
//! | ------ | ---- | ------ |
//! | `gorpc_server_calls_total` | counter | `method`, `code` |
//! | `gorpc_server_call_duration_seconds` | histogram | `method`, `code` |
//! | `gorpc_server_calls_in_flight` | gauge | `method` |
//! | `gorpc_server_request_bytes_total`, `gorpc_server_response_bytes_total` | counter | `method` |
//! | `gorpc_server_connections` | gauge | |
//!
//! `code` is the gRPC name of the status code (`OK`, `DEADLINE_EXCEEDED`, ...). Methods a
//! server does not route count as `method="unknown"`; past 256 methods, as `"other"`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gorpc::http::{Request, Response, StatusCode};
use gorpc::{Router, Runtime, Server, ServerHandle};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// The path the exposition is served at.
pub const METRICS_PATH: &str = "/metrics";

/// Histogram buckets of every `*_seconds` metric: 100 µs to a minute.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// How often samples recorded since the last scrape are folded into the histograms, so that
/// memory stays bounded between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// The Prometheus exposition of this process's metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Prometheus {
    handle: PrometheusHandle,
}

impl Prometheus {
    /// Installs a Prometheus recorder as the process's `metrics` recorder, with
    /// [`DURATION_BUCKETS`] for durations, and folds recorded samples on `runtime` every
    /// few seconds. Install it before servers bind and clients are built. Fails if a
    /// recorder is installed already.
    pub fn install<R: Runtime>(runtime: &R) -> Result<Prometheus, BuildError> {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)?;
        Prometheus::install_with(runtime, builder)
    }

    /// [`install`](Self::install) with the builder's settings (buckets, global labels).
    pub fn install_with<R: Runtime>(
        runtime: &R,
        builder: PrometheusBuilder,
    ) -> Result<Prometheus, BuildError> {
        let handle = builder.install_recorder()?;
        let upkeep = handle.clone();
        let timer = runtime.clone();
        runtime.spawn(async move {
            loop {
                timer.sleep_until(Instant::now() + UPKEEP).await;
                upkeep.run_upkeep();
            }
        });
        Ok(Prometheus { handle })
    }

    /// The metrics in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Answers `GET /metrics` on `server`'s port (and turns its HTTP mapping on), beside
    /// its calls and `/healthz`.
    pub fn serve_on<R: Runtime>(&self, server: Server<R>) -> Server<R> {
        let handle = self.handle.clone();
        server.get(METRICS_PATH, move |_: Request<()>| {
            let body = handle.render();
            async move { exposition(body) }
        })
    }

    /// Serves `GET /metrics` (and `/healthz`) alone on `addr`: for a process that serves no
    /// calls, a client say.
    pub async fn serve<R: Runtime>(
        &self,
        runtime: R,
        addr: SocketAddr,
    ) -> std::io::Result<ServerHandle<R>> {
        self.serve_on(Server::new(runtime, Router::new()))
            .bind(addr)
            .await
    }
}

fn exposition(body: String) -> Response<bytes::Bytes> {
    let mut response = Response::new(bytes::Bytes::from(body));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8"
            .parse()
            .expect("a valid header"),
    );
    response
}
