//! gorpc's concrete plugins, each behind a cargo feature of its own, built on the
//! interceptor traits of [`gorpc::interceptor`]. The light ones are on by default (`auth`,
//! `metrics`, `retry`, `hedge`, `config`, `http`, `grpc`); the ones with heavy dependencies
//! are opt-in: `consul` (reqwest and OpenSSL), `otel` and `otel-metrics` (OpenTelemetry),
//! `prometheus` (metrics-exporter-prometheus),
//! `etcd` (etcd-client, and protoc to build it).
//!
//! - `auth`: [`auth::BearerToken`] attaches a bearer token to every call a client sends;
//!   [`auth::BearerAuth`] checks it on the server and hands the handler the caller's subject.
//! - `metrics`: [`metrics::Metrics`] counts calls by status and records their latency per
//!   method, on either side.
//! - `otel` (opt-in): [`otel::OtelClient`] and [`otel::OtelServer`] trace calls with OpenTelemetry,
//!   passing the trace context along as W3C `traceparent`/`tracestate` metadata.
//! - `prometheus` (opt-in): [`prometheus::Prometheus`] records the `gorpc_*` metrics and
//!   serves them at `GET /metrics`, on the server's own HTTP port or on one of its own.
//! - `otel-metrics` (opt-in): [`otel_metrics::OtelRecorder`], a recorder for the `metrics`
//!   facade that reports counters, gauges (in-flight ones too) and histograms to an
//!   OpenTelemetry meter.
//! - `consul` (opt-in): [`consul::Consul`], the registry gorpc has always defaulted to: servers register through the
//!   local Consul agent with a TTL check they keep passing, clients watch the passing instances
//!   with blocking queries. Works on every runtime.
//! - `retry`: [`retry::Retry`] retries failed calls on the client, as a
//!   [`RetryPolicy`](gorpc::proto::policy::RetryPolicy) and a shared
//!   [`RetryBudget`](gorpc::proto::policy::RetryBudget) decide.
//! - `config`: [`config::Config`] sets servers and clients up from a TOML file that names
//!   the transport, codec, registry, balancer and interceptors; user plugins join under
//!   names of their own.
//! - `hedge`: [`hedge::Hedge`] sends a second attempt of a slow call to an idempotent
//!   method, as its [`Hedging`](gorpc::proto::policy::Hedging) schedule decides, and keeps
//!   the first answer.
//! - `etcd` (opt-in: etcd-client's build runs `protoc`): [`etcd::Etcd`] discovers and
//!   registers services in etcd, under leases kept alive by the server.
//!
//! The core crates stay free of these dependencies and policies.

#![forbid(unsafe_code)]

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "config")]
pub mod config;
#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "hedge")]
pub mod hedge;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "otel-metrics")]
pub mod otel_metrics;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "retry")]
pub mod retry;
