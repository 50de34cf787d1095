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
    /// Sent with the call.
    pub metadata: Metadata,
    /// Affinity key for hash-based balancing (a user id, a shard key; see
    /// [`gorpc_proto::balance::hash_bytes`]). Ignored by clients of one endpoint.
    pub key: Option<u64>,
}

impl CallOptions {
    /// These options, with `defaults` filling what they leave unset: the timeout and the
    /// key if these have none, and each metadata key these do not carry. What a typed
    /// client does with its own options (`with_options`, `with_timeout`) and a call's.
    pub fn with_defaults(mut self, defaults: &CallOptions) -> CallOptions {
        self.timeout = self.timeout.or(defaults.timeout);
        self.key = self.key.or(defaults.key);
        if self.metadata.is_empty() {
            self.metadata = defaults.metadata.clone();
            return self;
        }
        let missing: Vec<_> = defaults
            .metadata
            .iter()
            .filter(|(key, _)| self.metadata.get(key).is_none())
            .collect();
        for (key, value) in missing {
            self.metadata
                .append(key.to_owned(), Bytes::copy_from_slice(value));
        }
        self
    }
}

/// A successful raw response: body still encoded.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// Codec id of the body (see [`gorpc_proto::codec`]).
    pub codec: u8,
    /// The metadata the server sent back.
    pub metadata: Metadata,
    /// The encoded response message.
    pub body: Bytes,
}

/// A call as handed to a connection: method, options and the encoded body.
#[derive(Clone, Debug)]
pub struct OutgoingCall {
    /// The method path, "/package.Service/Method".
    pub method: Cow<'static, str>,
    /// Codec id of the body (see [`gorpc_proto::codec`]).
    pub codec: u8,
    /// Sent with the call.
    pub metadata: Metadata,
    /// When the caller stops waiting; `None`: no deadline.
    pub deadline: Option<Instant>,
    /// Affinity key for hash-based balancing, from [`CallOptions::key`].
    pub key: Option<u64>,
    /// The encoded request message.
    pub body: Bytes,
}

/// A way to send calls other than over pooled binary-protocol connections (HTTP, UDP, a
/// test double). [`Client::from_channel`](crate::Client::from_channel) puts any of them
/// behind the usual call API.
pub trait Channel: Send + Sync + 'static {
    /// Sends one unary call: `Ok` only for an OK status, any error status as `Err`.
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>>;

    /// Starts a stream call of `kind` (see [`Client::stream_raw`](crate::Client::stream_raw)).
    /// By default a channel carries unary calls only and refuses with `Unimplemented`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calls_own_options_win_and_defaults_fill_the_rest() {
        let mut defaults = CallOptions {
            timeout: Some(Duration::from_secs(1)),
            key: Some(7),
            ..CallOptions::default()
        };
        defaults.metadata.append("x-tenant", "acme");
        defaults.metadata.append("x-tag", "a");
        defaults.metadata.append("x-tag", "b");

        let filled = CallOptions::default().with_defaults(&defaults);
        assert_eq!(filled.timeout, Some(Duration::from_secs(1)));
        assert_eq!(filled.key, Some(7));
        assert_eq!(filled.metadata.len(), 3);

        let mut own = CallOptions {
            timeout: Some(Duration::from_millis(5)),
            key: Some(1),
            ..CallOptions::default()
        };
        own.metadata.append("x-tenant", "other");
        let merged = own.with_defaults(&defaults);
        assert_eq!(merged.timeout, Some(Duration::from_millis(5)));
        assert_eq!(merged.key, Some(1));
        assert_eq!(merged.metadata.get_str("x-tenant"), Some("other"));
        let tags: Vec<_> = merged
            .metadata
            .iter()
            .filter(|(k, _)| *k == "x-tag")
            .collect();
        assert_eq!(tags, [("x-tag", &b"a"[..]), ("x-tag", &b"b"[..])]);
        assert_eq!(
            merged.metadata.len(),
            3,
            "the own x-tenant replaces the default"
        );
    }
}
