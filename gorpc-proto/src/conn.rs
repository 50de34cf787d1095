//! [`Conn`]: what a driver does with either side's connection state machine, so that one
//! I/O loop serves [`ClientConn`](crate::ClientConn) and [`ServerConn`](crate::ServerConn)
//! alike.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::calls::{read_frames, Side};
use crate::link::CloseReason;
use crate::status::Status;
use crate::CallId;

/// The byte-and-time side of a connection: bytes read go in, bytes to write and the next
/// timer come out. Implemented by [`ClientConn`](crate::ClientConn) and
/// [`ServerConn`](crate::ServerConn) (sealed: the core's own state machines only).
///
/// # Poll order
///
/// After any input (`handle_read`, `handle_timeout`, `handle_eof`, `abort`, or the side's
/// own calls such as starting or answering one):
/// 1. drain the side's `poll_event`;
/// 2. write out everything [`poll_transmit`](Conn::poll_transmit) returns, in order;
/// 3. re-arm the timer to [`poll_timeout`](Conn::poll_timeout) and call
///    [`handle_timeout`](Conn::handle_timeout) when it fires.
///
/// A protocol violation by the peer is reported one way: the connection closes, its
/// `Closed` event (and [`close_reason`](Conn::close_reason)) says why.
#[allow(private_bounds)] // `Side` seals the trait to this crate's connections.
pub trait Conn: Side {
    /// Consumes every whole frame at the front of `buf`, leaving a partial one for next
    /// time. A malformed frame closes the connection; a malformed call that is well framed
    /// fails that call only.
    fn handle_read(&mut self, now: Instant, buf: &mut BytesMut) {
        read_frames(self, now, buf);
    }

    /// Handles every deadline due at `now`, and keepalive.
    fn handle_timeout(&mut self, now: Instant);

    /// The peer closed its side of the byte stream.
    fn handle_eof(&mut self) {
        if !self.core_ref().link.is_closed() {
            self.close(CloseReason::PeerClosed);
        }
    }

    /// The driver gave up on the transport; calls in flight end with `status`.
    fn abort(&mut self, status: Status) {
        if !self.core_ref().link.is_closed() {
            self.close(CloseReason::Aborted(status));
        }
    }

    /// The earliest instant at which [`handle_timeout`](Conn::handle_timeout) has work;
    /// never a finished call's deadline. `None` once closed.
    #[must_use]
    fn poll_timeout(&self) -> Option<Instant>;

    /// The next bytes to write, in order. Everything queued since the last call comes out
    /// as one chunk, except large bodies, which come out as their own chunk uncopied.
    #[must_use]
    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.core().link.out.pop()
    }

    /// Bytes queued for the transport.
    fn transmit_len(&self) -> usize {
        self.core_ref().link.out.len()
    }

    /// Gives back `bytes` of a call's received stream messages (at most what it holds): the
    /// application has consumed them. Credit returns to the peer in batches of half a
    /// window. A finished call's bytes were given back when it finished, so releasing them
    /// does nothing.
    fn release(&mut self, id: CallId, bytes: usize) {
        let core = self.core();
        core.calls.release(&mut core.link, id.as_u32(), bytes);
    }

    /// Message bytes received on a call in flight and not yet released; `None` once it
    /// finished (or, on a server, while it waits for a slot).
    fn buffered(&self, id: CallId) -> Option<usize> {
        self.core_ref().calls.buffered(id.as_u32())
    }

    /// Message bytes received on the connection and not yet released.
    fn buffered_bytes(&self) -> usize {
        self.core_ref().link.recv_window.unreleased() as usize
    }

    /// Calls in flight (on a server: running).
    fn calls_in_flight(&self) -> usize;

    /// No call in flight or waiting.
    fn is_idle(&self) -> bool;

    /// Gives back the spare capacity a busy spell left in the connection's tables and
    /// queues, so that a connection gone quiet stays small. Cheap to call when there is
    /// none; a connection that gets busy again grows them back.
    fn shrink_to_fit(&mut self);

    /// Whether the connection has closed; see [`close_reason`](Self::close_reason).
    fn is_closed(&self) -> bool {
        self.core_ref().link.is_closed()
    }

    /// Why the connection closed, once it has.
    fn close_reason(&self) -> Option<&CloseReason> {
        self.core_ref().link.close_reason()
    }
}
