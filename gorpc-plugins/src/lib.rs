//! gorpc's concrete plugins, each behind a feature of its own (all on by default), built on
//! the interceptor traits of [`gorpc::interceptor`]:
//!
//! - `auth`: [`auth::BearerToken`] attaches a bearer token to every call a client sends;
//!   [`auth::BearerAuth`] checks it on the server and hands the handler the caller's subject.
//! - `metrics`: [`metrics::Metrics`] counts calls by status and records their latency per
//!   method, on either side.
//! - `otel`: [`otel::OtelClient`] and [`otel::OtelServer`] trace calls with OpenTelemetry,
//!   passing the trace context along as W3C `traceparent`/`tracestate` metadata.
//! - `retry`: [`retry::Retry`] retries failed calls on the client, as a
//!   [`RetryPolicy`](gorpc::proto::policy::RetryPolicy) and a shared
//!   [`RetryBudget`](gorpc::proto::policy::RetryBudget) decide.
//!
//! The core crates stay free of these dependencies and policies. Service discovery (consul,
//! etcd) and TLS will join this crate the same way, each behind its feature.

#![forbid(unsafe_code)]

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "retry")]
pub mod retry;
