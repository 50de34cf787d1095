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

/// Configuration of a [`ClientConn`](crate::ClientConn) or [`ServerConn`](crate::ServerConn).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnConfig {
    pub limits: Limits,
    pub keepalive: KeepaliveConfig,
}
