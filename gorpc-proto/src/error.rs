//! Errors: the peer's protocol violations, which end a connection, and why a message was
//! not sent, which ends nothing.

use std::fmt;

use crate::frame::FrameType;

/// A violation of the wire protocol by the peer, or a dead peer. Each one ends the
/// connection it happened on and no other; calls on it fail with `Unavailable`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// The bytes do not start with the frame magic: not a gorpc peer, or a corrupted stream.
    BadMagic,
    /// The peer speaks a protocol version this one does not.
    UnsupportedVersion(u8),
    /// A frame type byte outside the defined set.
    UnknownFrameType(u8),
    /// Flag bits this version does not understand (e.g. compression, which nothing negotiated).
    UnsupportedFlags {
        /// The frame that carried them.
        frame_type: FrameType,
        /// All of its flag bits.
        flags: u8,
    },
    /// A head longer than [`Limits::max_head_len`](crate::Limits::max_head_len).
    HeadTooLarge {
        /// The head's length, bytes.
        len: u32,
        /// The limit, bytes.
        max: u32,
    },
    /// A frame longer than [`Limits::max_frame_len`](crate::Limits::max_frame_len).
    FrameTooLarge {
        /// The frame's length with its header, bytes.
        len: u64,
        /// The limit, bytes.
        max: u32,
    },
    /// A control frame with a head or body it must not have.
    UnexpectedPayload(FrameType),
    /// A frame this side never accepts (a server sent a request, a client sent a response).
    UnexpectedFrame(FrameType),
    /// A request used call id 0, which is reserved for the connection itself.
    ReservedCallId,
    /// A request reused the id of a call still in flight.
    DuplicateCallId(u32),
    /// A request arrived after the client said it would start no more.
    RequestAfterGoAway(u32),
    /// A go-away head that does not decode.
    MalformedGoAway(&'static str),
    /// Nothing arrived within the keepalive timeout after a ping.
    KeepaliveTimeout,
    /// A window update that is not a 4-byte increment in 1..=2^31-1, or that would take a
    /// window past 2^31-1.
    MalformedWindowUpdate(&'static str),
    /// A stream message sent without credit: `call_id` 0 when the connection window was
    /// used up, otherwise the call whose window was.
    FlowControl {
        /// The call whose window was exceeded; 0: the connection's.
        call_id: u32,
    },
    /// A message frame breaking the stream rules (flags it may not carry in its direction).
    MalformedMessage(&'static str),
    /// The client sent a message on a call whose request stream it had already ended.
    MessageAfterEndStream(u32),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProtoError::*;
        match self {
            BadMagic => f.write_str(
                "bad frame magic: peer is not speaking gorpc, or the stream is corrupted",
            ),
            UnsupportedVersion(v) => write!(
                f,
                "unsupported protocol version {v} (this peer speaks {})",
                crate::frame::VERSION
            ),
            UnknownFrameType(t) => write!(f, "unknown frame type {t}"),
            UnsupportedFlags { frame_type, flags } => {
                write!(f, "unsupported flags {flags:#04x} on {frame_type:?} frame")
            }
            HeadTooLarge { len, max } => {
                write!(f, "frame head of {len} bytes exceeds the limit of {max}")
            }
            FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max}")
            }
            UnexpectedPayload(t) => write!(f, "{t:?} frame must not carry a head or body"),
            UnexpectedFrame(t) => write!(f, "{t:?} frame is not valid in this direction"),
            ReservedCallId => f.write_str("request uses call id 0, which is reserved"),
            DuplicateCallId(id) => {
                write!(f, "request reuses call id {id}, which is still in flight")
            }
            RequestAfterGoAway(id) => write!(f, "request {id} arrived after the peer's go-away"),
            MalformedGoAway(why) => write!(f, "malformed go-away: {why}"),
            KeepaliveTimeout => f.write_str("peer did not answer keepalive ping in time"),
            MalformedWindowUpdate(why) => write!(f, "malformed window update: {why}"),
            FlowControl { call_id: 0 } => {
                f.write_str("message sent beyond the connection's flow-control window")
            }
            FlowControl { call_id } => {
                write!(
                    f,
                    "message sent beyond call {call_id}'s flow-control window"
                )
            }
            MalformedMessage(why) => write!(f, "malformed message frame: {why}"),
            MessageAfterEndStream(id) => {
                write!(f, "message on call {id} after its request stream ended")
            }
        }
    }
}

impl std::error::Error for ProtoError {}

/// Why a stream message was not sent. Nothing was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// A flow-control window (the call's or the connection's) is used up. Wait for the
    /// call's `Writable` event, then send again.
    NoCredit,
    /// The call is not in flight any more (finished, cancelled, past its deadline, or the
    /// connection closed).
    CallGone,
    /// The message would make a frame over `max_frame_len`.
    TooLarge,
    /// A buffer of batched messages that does not hold whole length-prefixed messages
    /// (see [`crate::batch`]); nothing from the first broken one on was sent.
    MalformedBatch,
    /// This side's message stream on the call has ended (half-closed), or never carried
    /// messages (the request of a unary or server-streaming call).
    SendClosed,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::NoCredit => "no flow-control credit to send now",
            SendError::CallGone => "the call is no longer in flight",
            SendError::TooLarge => "message exceeds max_frame_len",
            SendError::MalformedBatch => "batched messages are not whole length-prefixed messages",
            SendError::SendClosed => "this side's message stream has ended",
        })
    }
}

impl std::error::Error for SendError {}
