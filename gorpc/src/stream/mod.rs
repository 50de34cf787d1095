//! Stream calls as the application sees them: the halves a handler holds ([`RequestStream`],
//! [`ResponseSink`]) and those a caller holds ([`ResponseStream`], [`StreamSender`],
//! [`ClientStreaming`], [`Bidi`]), over the hand-off each shares with whatever drives its call
//! (`handoff`: the binary connection's driver, or a gRPC call's).
//!
//! Flow control stays in the core (or in HTTP/2); the hand-offs only batch. A sending half
//! encodes its messages into the call's outbox (each behind its length, back to back: the
//! core's batch layout, or gRPC's framing) and tells the driver once per batch; the driver
//! hands the outbox to the core, which frames as many messages per frame as credit allows,
//! then writes everything in one go. So a message costs no wake-up, no allocation and no
//! frame of its own, and a producer holds at most [`OUTBOX_LIMIT`] beside its window. A
//! receiving half's inbox gets the driver's messages; those bytes count against the window
//! until the application takes them, and the credit goes back in batches (or whenever the
//! reader runs dry), so a slow reader stops the producer on the other side.

mod client;
pub(crate) mod handoff;
mod server;

pub(crate) use client::StreamDriver;
pub use client::{
    Bidi, ClientStreaming, RawStreamReceiver, RawStreamSender, ResponseStream, StreamSender,
};
pub use handoff::OUTBOX_LIMIT;
pub use server::{RawRequestStream, RawResponseSink, RequestStream, ResponseSink};
