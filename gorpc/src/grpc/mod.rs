//! gRPC: every service a server routes is also served as gRPC over HTTP/2, on the same port
//! as the binary protocol and HTTP/1.1, and a client can call any gRPC server
//! (docs/PROTOCOL.md, "gRPC mapping", is the reference).
//!
//! - Server: [`Server::http`](crate::Server::http) (gRPC needs this crate's `grpc` feature)
//!   tells HTTP/2 connections apart by their preface (or by ALPN `h2` under TLS). A request
//!   whose content type is `application/grpc` (`+proto`), `application/grpc+msgpack` or
//!   `application/grpc+json` is a call of that codec; other HTTP/2 requests are served as
//!   HTTP/1.1 ones are. Calls go through the same interceptors to the same
//!   [`Service`](crate::Service), stream calls included.
//! - The deadline is `grpc-timeout`; metadata are the other headers (`-bin` ones in
//!   base64); the status is `grpc-status` and `grpc-message`, in the trailers, or in the
//!   headers alone when the call fails before any message. gzip (`grpc-encoding`) is
//!   accepted, and offered in `grpc-accept-encoding`.
//! - Standard services, written as ordinary gorpc services (so they answer on every
//!   protocol): [`health`] (`grpc.health.v1.Health`) and [`reflection`]
//!   (`grpc.reflection.v1` and `v1alpha`).

mod client;
pub(crate) mod headers;
pub mod health;
mod message;
pub mod reflection;
pub(crate) mod server;

pub use client::GrpcChannel;
