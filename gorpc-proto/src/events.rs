//! A side's queue of events for its driver, in order.
//!
//! A batch of stream messages waits in it as one entry and is split a message at a time as
//! the driver takes it. One queued event per message meant moving each message's event,
//! over 100 bytes, in and out of the queue: about 6% of a one-stream client's CPU.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::{batch, CallId};

/// An event that can carry one stream message.
pub(crate) trait MessageEvent {
    fn message(id: CallId, body: Bytes) -> Self;
}

#[derive(Debug)]
enum Entry<E> {
    Event(E),
    /// The messages of a checked batch ([`batch::count`]) not yet taken, at least one.
    Batch {
        id: CallId,
        rest: Bytes,
    },
}

#[derive(Debug)]
pub(crate) struct EventQueue<E> {
    entries: VecDeque<Entry<E>>,
}

impl<E: MessageEvent> EventQueue<E> {
    pub(crate) fn new() -> Self {
        EventQueue {
            entries: VecDeque::new(),
        }
    }

    pub(crate) fn push(&mut self, event: E) {
        self.entries.push_back(Entry::Event(event));
    }

    /// Queues the messages a MESSAGE frame's `body` carries for `id`: those of a batch
    /// already checked by [`batch::count`], the body itself, or none (a bare half-close).
    pub(crate) fn push_messages(&mut self, id: CallId, body: Bytes, batched: bool, message: bool) {
        match (batched, message) {
            (true, _) => self.entries.push_back(Entry::Batch { id, rest: body }),
            (false, true) => self.push(E::message(id, body)),
            (false, false) => {}
        }
    }

    pub(crate) fn pop(&mut self) -> Option<E> {
        match self.entries.front_mut()? {
            Entry::Batch { id, rest } => {
                let id = *id;
                let body = batch::split_first(rest)
                    .expect("a queued batch holds at least one checked message");
                if rest.is_empty() {
                    self.entries.pop_front();
                }
                Some(E::message(id, body))
            }
            Entry::Event(_) => match self.entries.pop_front() {
                Some(Entry::Event(event)) => Some(event),
                _ => unreachable!("the front entry is an event"),
            },
        }
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Ev {
        Message(CallId, Bytes),
        Other(u8),
    }

    impl MessageEvent for Ev {
        fn message(id: CallId, body: Bytes) -> Self {
            Ev::Message(id, body)
        }
    }

    fn batch_of(bodies: &[&[u8]]) -> Bytes {
        let mut buf = BytesMut::new();
        for body in bodies {
            batch::push_message(&mut buf, |b| {
                b.extend_from_slice(body);
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        let bytes = buf.freeze();
        assert_eq!(batch::count(&bytes).unwrap(), bodies.len());
        bytes
    }

    #[test]
    fn batches_come_out_a_message_at_a_time_in_order_with_the_other_events() {
        let mut q = EventQueue::new();
        let (a, b) = (CallId::from(1), CallId::from(3));
        q.push(Ev::Other(0));
        q.push_messages(a, batch_of(&[b"one", b"", b"three"]), true, true);
        q.push_messages(b, Bytes::from_static(b"single"), false, true);
        q.push_messages(b, Bytes::new(), false, false);
        q.push_messages(a, batch_of(&[b"four"]), true, true);
        q.push(Ev::Other(1));
        let got: Vec<Ev> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            got,
            vec![
                Ev::Other(0),
                Ev::Message(a, Bytes::from_static(b"one")),
                Ev::Message(a, Bytes::new()),
                Ev::Message(a, Bytes::from_static(b"three")),
                Ev::Message(b, Bytes::from_static(b"single")),
                Ev::Message(a, Bytes::from_static(b"four")),
                Ev::Other(1),
            ]
        );
        assert!(q.pop().is_none());
    }
}
