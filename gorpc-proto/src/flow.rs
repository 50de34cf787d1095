//! Credit-based flow control of stream messages (docs/PROTOCOL.md, "Flow control").
//!
//! Only MESSAGE bodies count. Each direction of each stream call has a window, and each
//! direction of the connection has one shared by all its calls. A sender may send a message
//! while both its windows are positive; they then drop by the body length and may go
//! negative by that one message, so a message larger than a window still gets through. A
//! receiver returns credit as its application releases what it consumed, in batches of at
//! least half its window, so what it holds unreleased stays within one window plus one
//! message.

use crate::error::ProtoError;

/// Every stream's window in each direction when it opens, in bytes.
pub const INITIAL_STREAM_WINDOW: u32 = 64 * 1024;
/// The connection's window in each direction when it starts, in bytes.
pub const INITIAL_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The largest increment of one window update, and the largest a window may grow to.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// The largest window a receiver may configure.
const MAX_CONFIGURED: u32 = 1 << 30;

/// The window a receiver works with: its configured size, no smaller than the protocol's
/// initial window and no larger than 2^30.
pub(crate) fn effective_window(configured: u32, initial: u32) -> u32 {
    configured.clamp(initial, MAX_CONFIGURED)
}

/// Reads a window update's body; `Err` unless it is an increment in 1..=2^31-1.
pub(crate) fn decode_increment(body: &[u8]) -> Result<u32, ProtoError> {
    let bytes: [u8; 4] = body
        .try_into()
        .map_err(|_| ProtoError::MalformedWindowUpdate("body must be exactly 4 bytes"))?;
    match u32::from_be_bytes(bytes) {
        0 => Err(ProtoError::MalformedWindowUpdate("increment of 0")),
        n if n > MAX_WINDOW => Err(ProtoError::MalformedWindowUpdate("increment over 2^31-1")),
        n => Ok(n),
    }
}

/// Credit for sending: granted by the peer, minus what was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SendWindow(i64);

impl SendWindow {
    pub(crate) fn new(initial: u32) -> Self {
        SendWindow(initial as i64)
    }

    /// Whether a message may be sent now.
    pub(crate) fn is_open(self) -> bool {
        self.0 > 0
    }

    /// Credit left (negative after an overdraft).
    pub(crate) fn available(self) -> i64 {
        self.0
    }

    pub(crate) fn spend(&mut self, len: usize) {
        self.0 -= len as i64;
    }

    /// Adds the peer's increment; `Err` if the window would pass 2^31-1.
    pub(crate) fn grant(&mut self, increment: u32) -> Result<(), ProtoError> {
        let next = self.0 + increment as i64;
        if next > MAX_WINDOW as i64 {
            return Err(ProtoError::MalformedWindowUpdate(
                "window would exceed 2^31-1",
            ));
        }
        self.0 = next;
        Ok(())
    }
}

/// Credit on the receiving side: what the peer may still send, what was delivered and not
/// yet released, and what was released but not yet granted back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecvWindow {
    credit: i64,
    unreleased: u64,
    released: u64,
}

impl RecvWindow {
    pub(crate) fn new(initial: u32) -> Self {
        RecvWindow {
            credit: initial as i64,
            unreleased: 0,
            released: 0,
        }
    }

    /// Counts a received message of `len` bytes; `false` when the peer had no credit for it.
    pub(crate) fn receive(&mut self, len: usize) -> bool {
        if self.credit <= 0 {
            return false;
        }
        self.credit -= len as i64;
        self.unreleased += len as u64;
        true
    }

    /// Bytes delivered and not yet released.
    pub(crate) fn unreleased(&self) -> u64 {
        self.unreleased
    }

    /// Releases up to `len` delivered bytes (never more than are held). Returns the
    /// increment to send once released bytes reach `window / 2`.
    pub(crate) fn release(&mut self, len: u64, window: u32) -> Option<u32> {
        let len = len.min(self.unreleased);
        self.unreleased -= len;
        self.released += len;
        self.grant_due(window)
    }

    /// Raises the window from the protocol's initial size to `window`: the increment to
    /// send, if any.
    pub(crate) fn widen(&mut self, initial: u32, window: u32) -> Option<u32> {
        let increment = window.saturating_sub(initial);
        (increment > 0).then(|| {
            self.credit += increment as i64;
            increment
        })
    }

    fn grant_due(&mut self, window: u32) -> Option<u32> {
        if self.released == 0 || self.released < (window / 2).max(1) as u64 {
            return None;
        }
        let increment = self.released.min(MAX_WINDOW as u64) as u32;
        self.released -= increment as u64;
        self.credit += increment as i64;
        Some(increment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increments_are_checked() {
        assert_eq!(decode_increment(&[0, 0, 0, 1]), Ok(1));
        assert_eq!(decode_increment(&[0x7f, 0xff, 0xff, 0xff]), Ok(MAX_WINDOW));
        assert!(decode_increment(&[0, 0, 0, 0]).is_err());
        assert!(decode_increment(&[0x80, 0, 0, 0]).is_err());
        assert!(decode_increment(&[0, 0, 1]).is_err());
        let mut w = SendWindow::new(MAX_WINDOW);
        assert!(w.grant(1).is_err());
        w.spend(10);
        assert!(w.grant(10).is_ok());
    }

    #[test]
    fn a_sender_may_overdraw_by_one_message() {
        let mut w = SendWindow::new(10);
        assert!(w.is_open());
        w.spend(100);
        assert!(!w.is_open());
        let mut r = RecvWindow::new(10);
        assert!(r.receive(100));
        assert!(!r.receive(1), "no credit left");
    }

    #[test]
    fn credit_comes_back_in_half_window_batches() {
        let mut r = RecvWindow::new(100);
        assert!(r.receive(60));
        assert_eq!(r.release(40, 100), None);
        assert_eq!(r.release(40, 100), Some(60), "clamped to what was held");
        assert_eq!(r.unreleased(), 0);
        assert!(r.receive(100));
    }
}
