//! Limits and timers of a connection. Every limit is enforced on the peer's bytes before
//! anything is buffered or allocated for them.

use std::time::Duration;

/// Bounds on what a peer may send, checked from frame headers before buffering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame (header + head + body) accepted, in bytes.
    pub max_frame_len: u32,
    /// Largest head (method, metadata, status message) accepted, in bytes.
    pub max_head_len: u32,
    /// Calls in flight on one connection. On a client, starting one more fails with
    /// `ResourceExhausted`; on a server, requests past it wait unread (backpressure).
    pub max_concurrent_calls: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: 16 * 1024 * 1024,
            max_head_len: 16 * 1024,
            max_concurrent_calls: 10_000,
        }
    }
}

/// Liveness probing of an otherwise quiet connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveConfig {
    /// Send a ping after this long without receiving a frame. `None` disables pings (pings
    /// from the peer are still answered).
    pub interval: Option<Duration>,
    /// Declare the peer dead if nothing arrives this long after a ping was sent.
    pub timeout: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval: Some(Duration::from_secs(30)),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The receive window per stream call that clients and servers grant unless configured
/// otherwise ([`ConnConfig::stream_window`]; the protocol starts every stream at 64 KiB and
/// widens it by window update). A stream moves at most one window per round trip: at
/// 64 KiB a loopback server stream of 1 KiB messages ran at a third of what it does at
/// 1 MiB.
pub const DEFAULT_STREAM_WINDOW: u32 = 1 << 20;

/// The receive window of a connection's streams together, unless configured otherwise
/// ([`ConnConfig::connection_window`]): what one connection's streams can hold for readers
/// that fall behind.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 4 << 20;

/// Configuration of a [`ClientConn`](crate::ClientConn) or [`ServerConn`](crate::ServerConn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnConfig {
    /// Bounds on what the peer may send.
    pub limits: Limits,
    /// Liveness probing.
    pub keepalive: KeepaliveConfig,
    /// Stream message bytes this side lets the peer send on one call before the application
    /// releases them (see `release`). Values below the protocol's initial window
    /// ([`INITIAL_STREAM_WINDOW`](crate::flow::INITIAL_STREAM_WINDOW)) count as that window;
    /// larger ones are granted with a window update when the stream opens. At most 2^30.
    pub stream_window: u32,
    /// The same for all calls of the connection together
    /// ([`INITIAL_CONNECTION_WINDOW`](crate::flow::INITIAL_CONNECTION_WINDOW) at least,
    /// granted when the connection starts). At most 2^30.
    pub connection_window: u32,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            limits: Limits::default(),
            keepalive: KeepaliveConfig::default(),
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
        }
    }
}
