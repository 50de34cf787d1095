//! Buffers lent out by reference and reused once every piece is back.
//!
//! Received messages are split off a connection's read buffer, and a stream's batched
//! messages off its outbox, without a copy: the buffer stays shared until the application
//! (or the socket) is done with those bytes. `BytesMut::reserve` on a shared buffer
//! allocates a new one each time, and at these sizes the allocator may give the old pages
//! back to the kernel and fault fresh, zeroed ones in for the next (a client reading one
//! server stream of 1 KiB messages took up to 125,000 page faults a second that way). A
//! [`Recycler`] keeps the last few buffers and refills the latest whose pieces are all
//! back.

use std::collections::VecDeque;

use bytes::BytesMut;

#[derive(Debug)]
pub(crate) struct Recycler {
    /// Earlier buffers, oldest first, each possibly still shared with pieces lent out.
    spares: VecDeque<BytesMut>,
    /// The most spares kept: enough for the buffers whose pieces are usually out at once.
    max_spares: usize,
}

impl Recycler {
    pub(crate) const fn new(max_spares: usize) -> Self {
        Recycler {
            spares: VecDeque::new(),
            max_spares,
        }
    }

    /// Makes room for `additional` more bytes in `buf`. If `buf`'s allocation is still
    /// shared, its bytes move to a spare of `size` bytes whose pieces are all back (or a
    /// new one), and `buf` joins the spares. Needs larger than `size` are left to
    /// `reserve`.
    pub(crate) fn reserve(&mut self, buf: &mut BytesMut, additional: usize, size: usize) {
        // Room already, or its own allocation free again (`try_reclaim` checks both).
        if buf.try_reclaim(additional) {
            return;
        }
        if buf.len() + additional > size {
            buf.reserve(additional);
            return;
        }
        let mut fresh = self
            .take(size)
            .unwrap_or_else(|| BytesMut::with_capacity(size));
        fresh.extend_from_slice(buf);
        let mut lent = std::mem::replace(buf, fresh);
        lent.clear();
        self.keep(lent);
    }

    /// The latest spare with room for `room` bytes and no piece still out: its bytes are
    /// the likeliest still in cache, and a busy user keeps reusing the same few buffers
    /// rather than cycling through all.
    pub(crate) fn take(&mut self, room: usize) -> Option<BytesMut> {
        let i = self
            .spares
            .iter_mut()
            .rposition(|spare| spare.try_reclaim(room))?;
        self.spares.remove(i)
    }

    /// Keeps `buf` (empty) as the newest spare, dropping the oldest if there are as many
    /// as kept; a spare dropped is freed once its pieces are.
    pub(crate) fn keep(&mut self, buf: BytesMut) {
        if self.spares.len() >= self.max_spares {
            self.spares.pop_front();
        }
        self.spares.push_back(buf);
    }

    /// Drops the spares (a connection or stream gone quiet).
    pub(crate) fn clear(&mut self) {
        self.spares = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_whose_pieces_are_back_is_reused() {
        let mut recycler = Recycler::new(4);
        let mut buf = BytesMut::with_capacity(64);
        let first = buf.as_ptr();
        buf.extend_from_slice(&[1; 64]);
        let piece = buf.split().freeze();
        recycler.reserve(&mut buf, 64, 64);
        let second = buf.as_ptr();
        // The first buffer is still lent out: a new one.
        assert_ne!(second, first);
        buf.extend_from_slice(&[2; 64]);
        let other = buf.split().freeze();
        drop(piece);
        recycler.reserve(&mut buf, 64, 64);
        // The first buffer's piece came back: it is refilled, not a third allocation (the
        // first buffer is held among the spares, so no new one could land there).
        assert_eq!(buf.as_ptr(), first);
        assert_eq!(buf.capacity(), 64);
        buf.extend_from_slice(&[3; 64]);
        assert_eq!(&other[..], &[2; 64]);
        assert!(buf.iter().all(|&b| b == 3));
    }

    #[test]
    fn unsent_bytes_move_with_the_buffer() {
        let mut recycler = Recycler::new(4);
        let mut buf = BytesMut::with_capacity(32);
        buf.extend_from_slice(b"lent out....and kept");
        let lent = buf.split_to(12).freeze();
        recycler.reserve(&mut buf, 30, 64);
        assert_eq!(&buf[..], b"and kept");
        assert!(buf.capacity() >= 38);
        assert_eq!(&lent[..], b"lent out....");
    }

    #[test]
    fn a_unique_buffer_is_kept_and_large_needs_fall_through() {
        let mut recycler = Recycler::new(4);
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&[0; 48]);
        let ptr = buf.as_ptr();
        buf.clear();
        recycler.reserve(&mut buf, 64, 64);
        assert_eq!(buf.as_ptr(), ptr);
        assert!(recycler.spares.is_empty());
        recycler.reserve(&mut buf, 1000, 64);
        assert!(buf.capacity() >= 1000);
        assert!(recycler.spares.is_empty());
    }

    #[test]
    fn spares_are_bounded() {
        let mut recycler = Recycler::new(4);
        let mut buf = BytesMut::with_capacity(16);
        let mut lent = Vec::new();
        for _ in 0..10 {
            buf.extend_from_slice(&[7; 16]);
            lent.push(buf.split().freeze());
            recycler.reserve(&mut buf, 16, 16);
        }
        assert_eq!(recycler.spares.len(), 4);
    }
}
