//! The calls in flight on one connection, kept the same way on both sides: one table of
//! calls by id with their deadlines and the senders parked for credit, and the read loop
//! that hands each frame to the side it belongs to.

use std::time::Instant;

use bytes::BytesMut;
use hashbrown::HashMap;

use crate::error::{ProtoError, SendError};
use crate::flow::{RecvWindow, SendWindow};
use crate::link::{CallFrame, CloseReason, Inbound, Link};
use crate::status::Status;
use crate::timers::Deadlines;
use crate::IdHasher;

/// What every call in flight has, on either side.
#[derive(Debug)]
pub(crate) struct CallCore {
    pub(crate) deadline: Option<Instant>,
    /// Codec id of every frame of the call.
    pub(crate) codec: u8,
    /// Refused for lack of credit; a `Writable` event is owed once credit is back.
    pub(crate) wants_writable: bool,
    /// Message bytes this side may still send on the call.
    pub(crate) send_window: SendWindow,
    /// Message bytes the peer may still send on the call, and those not yet released.
    pub(crate) recv_window: RecvWindow,
}

/// A side's call, as the table sees it.
pub(crate) trait HasCore {
    fn core(&self) -> &CallCore;
    fn core_mut(&mut self) -> &mut CallCore;
}

/// The calls in flight by id, their deadlines, and the calls refused for lack of credit
/// that wait for one `Writable` each.
#[derive(Debug)]
pub(crate) struct CallTable<C> {
    calls: HashMap<u32, C, IdHasher>,
    deadlines: Deadlines,
    /// May hold ids of calls that ended since; those are dropped when the list outgrows the
    /// live calls, and when the connection window opens.
    blocked: Vec<u32>,
}

impl<C: HasCore> CallTable<C> {
    pub(crate) fn new(hasher: IdHasher) -> Self {
        CallTable {
            calls: HashMap::with_hasher(hasher),
            deadlines: Deadlines::default(),
            blocked: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.calls.len()
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.calls.shrink_to_fit();
        self.deadlines.shrink_to_fit();
        self.blocked.shrink_to_fit();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.calls.contains_key(&id)
    }

    pub(crate) fn get(&self, id: u32) -> Option<&C> {
        self.calls.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut C> {
        self.calls.get_mut(&id)
    }

    /// The map, for picking an id no call holds.
    pub(crate) fn ids(&self) -> &HashMap<u32, C, IdHasher> {
        &self.calls
    }

    pub(crate) fn insert(&mut self, id: u32, call: C) {
        if let Some(at) = call.core().deadline {
            self.deadlines.push(at, id);
        }
        self.calls.insert(id, call);
    }

    /// Takes a call out, giving the bytes it held unreleased back to the connection.
    /// Follow with [`prune`](Self::prune) once removals are done.
    pub(crate) fn remove(&mut self, link: &mut Link, id: u32) -> Option<C> {
        let call = self.calls.remove(&id)?;
        link.release(call.core().recv_window.unreleased());
        Some(call)
    }

    /// Keeps the deadlines honest after removals: `next_deadline` never names a call that
    /// finished, so the driver never wakes for nothing.
    pub(crate) fn prune(&mut self) {
        let calls = &self.calls;
        self.deadlines.prune(
            calls.len(),
            |at, id| matches!(calls.get(&id), Some(c) if c.core().deadline == Some(at)),
        );
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.next()
    }

    /// Takes out a call whose deadline is at or before `now`, if any (returning its bytes to
    /// the connection). Call until `None`, then [`prune`](Self::prune).
    pub(crate) fn pop_expired(&mut self, link: &mut Link, now: Instant) -> Option<(u32, C)> {
        while let Some((at, id)) = self.deadlines.pop_due(now) {
            if matches!(self.calls.get(&id), Some(c) if c.core().deadline == Some(at)) {
                let call = self.remove(link, id)?;
                return Some((id, call));
            }
        }
        None
    }

    /// Runs `send` with the window and codec of call `id`, once `check` let it (a call
    /// whose own sending side is closed is refused there); parks the call when it was refused
    /// for lack of credit.
    pub(crate) fn send_on(
        &mut self,
        link: &mut Link,
        id: u32,
        check: impl FnOnce(&mut C) -> Result<(), SendError>,
        send: impl FnOnce(&mut Link, &mut SendWindow, u8) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        if link.is_closed() {
            return Err(SendError::CallGone);
        }
        let Some(call) = self.calls.get_mut(&id) else {
            return Err(SendError::CallGone);
        };
        check(call)?;
        let core = call.core_mut();
        let sent = send(link, &mut core.send_window, core.codec);
        if sent == Err(SendError::NoCredit) && !core.wants_writable {
            core.wants_writable = true;
            self.blocked.push(id);
            if self.blocked.len() > 2 * self.calls.len() + 64 {
                let calls = &self.calls;
                self.blocked
                    .retain(|id| calls.get(id).is_some_and(|c| c.core().wants_writable));
            }
        }
        sent
    }

    /// Gives back `bytes` of call `id`'s received messages (at most what it holds).
    pub(crate) fn release(&mut self, link: &mut Link, id: u32, bytes: usize) {
        if link.is_closed() {
            return;
        }
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let window = &mut call.core_mut().recv_window;
        let bytes = (bytes as u64).min(window.unreleased());
        if let Some(increment) = window.release(bytes, link.stream_window) {
            link.push_window_update(id, increment);
        }
        link.release(bytes);
    }

    /// Message bytes received on call `id` and not yet released.
    pub(crate) fn buffered(&self, id: u32) -> Option<usize> {
        let call = self.calls.get(&id)?;
        Some(call.core().recv_window.unreleased() as usize)
    }

    /// Credit arrived: for the connection (`id` 0, already applied by the link), every
    /// parked call whose own window is open gets `writable`; for call `id`, its window grows
    /// (`other` finds a call kept outside the table, such as a server's waiting request).
    pub(crate) fn credit<'a>(
        &'a mut self,
        link: &Link,
        id: u32,
        increment: u32,
        other: impl FnOnce(u32) -> Option<&'a mut C>,
        mut writable: impl FnMut(u32),
    ) -> Result<(), ProtoError> {
        if id == 0 {
            if link.send_window.is_open() {
                let calls = &mut self.calls;
                self.blocked.retain(|&id| {
                    let Some(core) = calls.get_mut(&id).map(HasCore::core_mut) else {
                        return false;
                    };
                    if !core.wants_writable {
                        return false;
                    }
                    if !core.send_window.is_open() {
                        return true;
                    }
                    core.wants_writable = false;
                    writable(id);
                    false
                });
            }
            return Ok(());
        }
        // Credit for a call that ended here is a late frame.
        let Some(call) = self.calls.get_mut(&id).or_else(|| other(id)) else {
            return Ok(());
        };
        let core = call.core_mut();
        core.send_window.grant(increment)?;
        if core.wants_writable && core.send_window.is_open() && link.send_window.is_open() {
            core.wants_writable = false;
            writable(id);
        }
        Ok(())
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u32, C)> + '_ {
        self.deadlines.clear();
        self.blocked.clear();
        self.calls.drain()
    }
}

/// What both sides of a connection keep: the link and the calls in flight.
#[derive(Debug)]
pub(crate) struct Core<C> {
    pub(crate) link: Link,
    pub(crate) calls: CallTable<C>,
}

impl<C: HasCore> Core<C> {
    pub(crate) fn shrink_to_fit(&mut self) {
        self.link.out.shrink_to_fit();
        self.calls.shrink_to_fit();
    }
}

/// A side of a connection (client or server), as the read loop drives it.
pub(crate) trait Side {
    type Call: HasCore;
    fn core(&mut self) -> &mut Core<Self::Call>;
    fn core_ref(&self) -> &Core<Self::Call>;
    /// A request, response, cancel or message for one call.
    fn on_call_frame(&mut self, now: Instant, frame: CallFrame) -> Result<(), ProtoError>;
    /// Credit from the peer (see [`CallTable::credit`]).
    fn on_credit(&mut self, id: u32, increment: u32) -> Result<(), ProtoError>;
    /// The peer's go-away, already acknowledged.
    fn on_go_away(&mut self, status: Status);
    /// Ends the connection, failing or cancelling every call left.
    fn close(&mut self, reason: CloseReason);
}

/// Consumes every whole frame at the front of `buf`. A protocol violation closes the
/// connection (the side's `Closed` event says why); a closed connection discards what
/// arrives.
pub(crate) fn read_frames<S: Side + ?Sized>(side: &mut S, now: Instant, buf: &mut BytesMut) {
    loop {
        let link = &mut side.core().link;
        if link.is_closed() {
            buf.clear();
            return;
        }
        let result = match link.next_frame(now, buf) {
            Ok(Some(Inbound::Call(frame))) => side.on_call_frame(now, frame),
            Ok(Some(Inbound::WindowUpdate { id, increment })) => side.on_credit(id, increment),
            Ok(Some(Inbound::GoAway(status))) => {
                side.on_go_away(status);
                Ok(())
            }
            Ok(Some(Inbound::Handled)) => Ok(()),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            buf.clear();
            side.close(CloseReason::Error(e));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::config::ConnConfig;
    use crate::flow::INITIAL_STREAM_WINDOW;

    #[derive(Debug)]
    struct Call(CallCore);

    impl HasCore for Call {
        fn core(&self) -> &CallCore {
            &self.0
        }
        fn core_mut(&mut self) -> &mut CallCore {
            &mut self.0
        }
    }

    fn call(deadline: Option<Instant>) -> Call {
        Call(CallCore {
            deadline,
            codec: 0,
            wants_writable: false,
            send_window: SendWindow::new(INITIAL_STREAM_WINDOW),
            recv_window: RecvWindow::new(INITIAL_STREAM_WINDOW),
        })
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A call with this id (taken modulo 16, so ids are reused) and deadline in ms.
        Start(u32, Option<u16>),
        /// The n-th live call (modulo their number) finishes.
        Finish(usize),
        /// Time moves to this many ms; the calls due expire.
        Expire(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..16u32, proptest::option::of(0..200u16)).prop_map(|(id, at)| Step::Start(id, at)),
            any::<usize>().prop_map(Step::Finish),
            (0..200u16).prop_map(Step::Expire),
        ]
    }

    proptest! {
        /// Whatever order calls start, finish and expire in, the earliest deadline the table
        /// names is the earliest of the live calls', and expiry takes exactly the calls due.
        #[test]
        fn the_next_deadline_is_always_a_live_calls(steps in proptest::collection::vec(step(), 1..200)) {
            let base = Instant::now();
            let ms = |n: u16| base + Duration::from_millis(u64::from(n));
            let mut link = Link::new(ConnConfig::default(), base);
            let mut table = CallTable::<Call>::new(IdHasher::default());
            for step in steps {
                match step {
                    Step::Start(id, at) => {
                        if !table.contains(id) {
                            table.insert(id, call(at.map(ms)));
                        }
                    }
                    Step::Finish(n) => {
                        let mut ids: Vec<u32> = table.ids().keys().copied().collect();
                        ids.sort_unstable();
                        if !ids.is_empty() {
                            let id = ids[n % ids.len()];
                            prop_assert!(table.remove(&mut link, id).is_some());
                            table.prune();
                        }
                    }
                    Step::Expire(now) => {
                        let now = ms(now);
                        while let Some((_, expired)) = table.pop_expired(&mut link, now) {
                            prop_assert!(expired.0.deadline.is_some_and(|at| at <= now));
                        }
                        table.prune();
                        prop_assert!(table.ids().values().all(|c| c.0.deadline.is_none_or(|at| at > now)));
                    }
                }
                let earliest = table.ids().values().filter_map(|c| c.0.deadline).min();
                prop_assert_eq!(table.next_deadline(), earliest);
            }
        }
    }
}
