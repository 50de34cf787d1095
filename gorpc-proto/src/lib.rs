//! The sans-IO protocol core of gorpc-rs.
//!
//! Plain state machines that are fed bytes and time and asked what to do next: no sockets,
//! no async, no threads, no clock and no randomness of their own. The runtime adapters
//! (gorpc-tokio, gorpc-smol) drive them over real transports; anyone can drive them from
//! their own event loop, or fuzz them.
//!
//! ```
//! use std::time::Instant;
//! use bytes::BytesMut;
//! use gorpc_proto::{codec, CallHead, ClientConn, ClientEvent, Conn, ConnConfig, ServerConn, ServerEvent, Status};
//!
//! let now = Instant::now();
//! let mut client: ClientConn<&str> = ClientConn::new(ConnConfig::default(), now);
//! let mut server = ServerConn::new(ConnConfig::default(), now, 7);
//!
//! let id = client.start_call(now, CallHead::new("/demo.Echo/Say", codec::RAW), b"hi", "caller 1").unwrap();
//! // The bytes would go over a socket; here they go straight across.
//! let mut wire = BytesMut::new();
//! while let Some(chunk) = client.poll_transmit() { wire.extend_from_slice(&chunk); }
//! server.handle_read(now, &mut wire);
//!
//! let Some(ServerEvent::Request(req)) = server.poll_event() else { panic!() };
//! assert_eq!(req.head.method(), "/demo.Echo/Say");
//! server.respond(now, req.id, &Status::ok(), [], req.body.clone());
//!
//! while let Some(chunk) = server.poll_transmit() { wire.extend_from_slice(&chunk); }
//! client.handle_read(now, &mut wire);
//! let Some(ClientEvent::Finished { id: done, user, result }) = client.poll_event() else { panic!() };
//! assert_eq!((done, user), (id, "caller 1"));
//! assert_eq!(&result.unwrap().body[..], b"hi");
//! ```
//!
//! The wire format is specified in docs/PROTOCOL.md.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod balance;
pub mod batch;
mod calls;
mod client;
mod config;
mod conn;
pub mod datagram;
mod error;
mod events;
pub mod flow;
pub mod frame;
pub mod head;
mod link;
pub mod policy;
mod server;
#[cfg(feature = "sim")]
pub mod sim;
mod status;
mod timers;
mod transmit;

pub use client::{CallHead, ClientConn, ClientEvent, Rejected, Response, StreamKind};
pub use config::{
    ConnConfig, KeepaliveConfig, Limits, DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW,
};
pub use conn::Conn;
pub use error::{ProtoError, SendError};
pub use head::{HeadError, MetadataIter, RequestHead, ResponseHead};
pub use link::CloseReason;
pub use server::{CancelReason, Request, ServerConn, ServerEvent};
pub use status::{Code, Status};
pub use transmit::Payload;

/// Identifies a call on one connection; chosen by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(u32);

impl CallId {
    /// The id as the wire carries it.
    pub fn as_u32(self) -> u32 {
        self.0
    }
}

/// An id as the wire carries it, for code that logs or replays calls.
impl From<u32> for CallId {
    fn from(id: u32) -> Self {
        CallId(id)
    }
}

/// Hashes call ids. Seeded on the server, where the peer picks the ids.
type IdHasher = foldhash::fast::FixedState;

/// Codec ids carried in every call frame. The core only carries them; `gorpc` maps them to
/// codecs.
pub mod codec {
    /// Bytes as they are.
    pub const RAW: u8 = 0;
    /// Protocol Buffers (prost).
    pub const PROTOBUF: u8 = 1;
    /// MessagePack (rmp-serde), the codegen-free call style.
    pub const MSGPACK: u8 = 2;
    /// JSON (serde_json, or protobuf's JSON mapping), as HTTP and gRPC+JSON bodies carry it.
    pub const JSON: u8 = 3;
    /// Ids from here up are free for user-defined codecs.
    pub const FIRST_USER: u8 = 128;
}
