//! gorpc-rs: services, codecs, clients and the connection drivers, over any async runtime.
//!
//! Users depend on a runtime adapter (gorpc-tokio or gorpc-smol), which re-exports this
//! crate and supplies a [`Runtime`]. The adapters only move bytes and time; every loop that
//! runs a connection lives here, written once over [`runtime`]'s traits, and the protocol
//! itself lives in the sans-IO core, [`gorpc_proto`].

// One audited call into the C library (server/trim.rs); nothing else may be unsafe.
#![deny(unsafe_code)]

pub mod client;
pub mod codec;
pub mod discovery;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
pub mod interceptor;
mod io;
mod mailbox;
pub mod metadata;
pub mod observe;
mod recycle;
pub mod runtime;
pub mod server;
pub mod service;
pub mod stream;
#[cfg(test)]
mod test_waker;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tower")]
pub mod tower;
pub mod udp;

pub use client::{CallOptions, Channel, Client, ClientConfig, RawResponse};
pub use codec::{Codec, Decoder, Encoder, MsgPack, Protobuf, Raw};
pub use gorpc_proto::{self as proto, Code, ConnConfig, KeepaliveConfig, Limits, Status};
pub use interceptor::{ClientInterceptor, ClientNext, Logging, Next, ServerInterceptor};
pub use metadata::Metadata;
pub use runtime::{PeerCertificates, Runtime};
pub use server::{Server, ServerConfig, ServerHandle, Shutdown};
pub use service::{
    IntoRequest, MethodSchema, NamedService, Request, Response, Router, ServerReply, ServerRequest,
    Service,
};

/// Turns a trait of `async fn`s over serde types into a msgpack service: the trait, a
/// `{Trait}Server` and a `{Trait}Client`, no build step (see the macro's own docs for the
/// method paths and the wire format).
pub use gorpc_macros::service;

/// The drivers' maps of calls, looked up for every stream message: foldhash rather than
/// SipHash, seeded per map since a server's peer picks the ids.
pub(crate) type CallMap<V> =
    std::collections::HashMap<gorpc_proto::CallId, V, foldhash::fast::RandomState>;

/// A future boxed for dynamic dispatch.
pub use futures::future::BoxFuture;
