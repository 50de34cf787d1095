//! What a call is, as callers, interceptors and channels see it: its options, the call
//! handed to a connection, its answer, and the trait of ways to send it.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use gorpc_proto::{Code, Status, StreamKind};

use super::StreamHalves;
use crate::metadata::Metadata;

/// Options of one call.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Overrides the client's default timeout.
    pub timeout: Option<Duration>,
    pub metadata: Metadata,
    /// Affinity key for hash-based balancing (a user id, a shard key; see
    /// [`gorpc_proto::balance::hash_bytes`]). Ignored by clients of one endpoint.
    pub key: Option<u64>,
}

/// A successful raw response: body still encoded.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub codec: u8,
    pub metadata: Metadata,
    pub body: Bytes,
}

/// A call as handed to a connection: method, options and the encoded body.
#[derive(Clone, Debug)]
pub struct OutgoingCall {
    pub method: Cow<'static, str>,
    pub codec: u8,
    pub metadata: Metadata,
    pub deadline: Option<Instant>,
    /// Affinity key for hash-based balancing, from [`CallOptions::key`].
    pub key: Option<u64>,
    pub body: Bytes,
}

/// A way to send calls other than over pooled binary-protocol connections (HTTP, UDP, a
/// test double). [`Client::from_channel`] puts any of them behind the usual call API.
pub trait Channel: Send + Sync + 'static {
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>>;

    /// Starts a stream call of `kind` (see [`Client::stream_raw`]). By default a channel
    /// carries unary calls only and refuses with `Unimplemented`.
    fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> BoxFuture<'static, Result<StreamHalves, Status>> {
        let _ = (call, kind);
        Box::pin(std::future::ready(Err(Status::new(
            Code::Unimplemented,
            "stream calls need the binary protocol or gRPC; this channel carries unary calls",
        ))))
    }
}
