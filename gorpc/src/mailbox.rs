//! A many-to-one queue from the tasks that start calls (or feed streams) to the driver
//! that owns a connection. A sender pushes under one short, uncontended lock and wakes
//! the driver only if it is waiting; the driver takes everything queued in one swap. So a
//! burst of calls costs one wake-up and one lock per batch on the driver's side, and no
//! allocation once the two buffers have grown.
//!
//! Like a channel, it ends for the driver once it is closed (by a sender, or by the
//! driver) or every sender is dropped, and everything queued before that is taken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

struct Mailbox<T> {
    inner: Mutex<Inner<T>>,
    /// Set under the lock, so a sender holding the lock sees it in order with the queue;
    /// read without it by `is_closed`.
    closed: AtomicBool,
}

struct Inner<T> {
    queue: Vec<T>,
    /// The driver, while it waits for something to be queued.
    driver: Option<Waker>,
}

impl<T> Mailbox<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Nothing panics while holding the lock but a failed push's allocation; what was
        // queued is still whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the mailbox closed; the caller holds the lock.
    fn close_locked(&self, inner: &mut Inner<T>) -> Option<Waker> {
        self.closed.store(true, Ordering::Release);
        inner.driver.take()
    }

    fn close(&self) {
        let driver = self.close_locked(&mut self.lock());
        if let Some(driver) = driver {
            driver.wake();
        }
    }
}

/// The senders' shared half: the mailbox closes when the last one is dropped.
struct Senders<T> {
    mailbox: Arc<Mailbox<T>>,
}

impl<T> Drop for Senders<T> {
    fn drop(&mut self) {
        self.mailbox.close();
    }
}

/// Queues items for the driver. Cloning is one reference count.
pub(crate) struct Sender<T> {
    senders: Arc<Senders<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            senders: self.senders.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

/// The driver's half.
pub(crate) struct Receiver<T> {
    mailbox: Arc<Mailbox<T>>,
}

/// A new, open mailbox.
pub(crate) fn mailbox<T>() -> (Sender<T>, Receiver<T>) {
    let mailbox = Arc::new(Mailbox {
        inner: Mutex::new(Inner {
            queue: Vec::new(),
            driver: None,
        }),
        closed: AtomicBool::new(false),
    });
    let senders = Arc::new(Senders {
        mailbox: mailbox.clone(),
    });
    (Sender { senders }, Receiver { mailbox })
}

impl<T> Sender<T> {
    /// Queues `item`, waking the driver if it waits; gives it back if the mailbox is
    /// closed.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let driver = {
            let mailbox = &*self.senders.mailbox;
            let mut inner = mailbox.lock();
            if mailbox.is_closed() {
                return Err(item);
            }
            inner.queue.push(item);
            inner.driver.take()
        };
        // Woken outside the lock: the driver may run at once on another thread.
        if let Some(driver) = driver {
            driver.wake();
        }
        Ok(())
    }

    /// Closes the mailbox: later sends fail, and the driver takes what is queued and then
    /// sees the end.
    pub(crate) fn close(&self) {
        self.senders.mailbox.close();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.senders.mailbox.is_closed()
    }
}

impl<T> Receiver<T> {
    /// Moves everything queued into `batch` (which must be empty: the two buffers trade
    /// places, so neither allocates once grown). `Ready(true)` with items; `Ready(false)`
    /// once the mailbox is closed and empty; `Pending` (the driver is woken by the next
    /// send or the close) otherwise.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>, batch: &mut Vec<T>) -> Poll<bool> {
        debug_assert!(batch.is_empty());
        let mut inner = self.mailbox.lock();
        if !inner.queue.is_empty() {
            std::mem::swap(&mut inner.queue, batch);
            return Poll::Ready(true);
        }
        if self.mailbox.is_closed() {
            return Poll::Ready(false);
        }
        match &inner.driver {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => inner.driver = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Gives back the room a past burst left in the queue (an idle connection's).
    pub(crate) fn shrink_to_fit(&self) {
        self.mailbox.lock().queue.shrink_to_fit();
    }

    /// Closes the mailbox and moves what was queued into `batch`.
    pub(crate) fn close_and_take(&self, batch: &mut Vec<T>) {
        let mut inner = self.mailbox.lock();
        // The driver itself closes: nobody to wake.
        let _ = self.mailbox.close_locked(&mut inner);
        batch.append(&mut inner.queue);
    }
}

impl<T> Drop for Receiver<T> {
    /// The driver is gone: later sends fail rather than wait for nobody.
    fn drop(&mut self) {
        self.mailbox.close();
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_waker::counting_waker as waker;

    #[test]
    fn a_burst_is_taken_in_order_with_one_wake_up() {
        let (tx, rx) = mailbox();
        let (wakes, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut batch = Vec::new();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Pending);
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        assert_eq!(wakes.count(), 1, "woken once for the burst");
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(true));
        assert_eq!(batch, [0, 1, 2, 3, 4]);
        batch.clear();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Pending);
        tx.send(5).unwrap();
        assert_eq!(wakes.count(), 2);
    }

    #[test]
    fn it_ends_after_what_was_queued_once_every_sender_is_gone() {
        let (tx, rx) = mailbox();
        let (wakes, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut batch = Vec::new();
        let other = tx.clone();
        tx.send(1).unwrap();
        drop(tx);
        assert!(!other.is_closed(), "one sender is left");
        other.send(2).unwrap();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(true));
        batch.clear();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Pending);
        drop(other);
        assert_eq!(wakes.count(), 1, "the last drop wakes the driver");
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(false));
    }

    #[test]
    fn a_closed_mailbox_gives_sends_back_and_hands_over_what_it_held() {
        let (tx, rx) = mailbox();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let mut batch = Vec::new();
        rx.close_and_take(&mut batch);
        assert_eq!(batch, [1, 2]);
        assert!(tx.is_closed());
        assert_eq!(tx.send(3), Err(3));

        let (tx, rx) = mailbox();
        tx.send(1).unwrap();
        tx.close();
        assert_eq!(tx.send(2), Err(2));
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut batch = Vec::new();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(true));
        assert_eq!(batch, [1]);
        batch.clear();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(false));
    }
}
