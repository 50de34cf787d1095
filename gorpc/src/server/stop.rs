//! How a running server (TCP or UDP) is stopped: signals its tasks watch, and the wait for
//! them to finish, within a grace period.

use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use futures::Stream;

use super::conn::Signals;
use super::{Serving, Shutdown};
use crate::runtime::{timeout, Runtime};

/// The handle's side of a server's signals. Each signal is a channel closed, never sent on:
/// closing wakes every receiver at once.
#[derive(Debug)]
pub(crate) struct Stopper {
    drain_tx: async_channel::Sender<()>,
    abort_tx: async_channel::Sender<()>,
    /// Closed once every task holding the matching sender ([`Alive`]) is done.
    alive_rx: async_channel::Receiver<()>,
}

/// Held by each of a server's tasks while it runs; a shutdown waits until every one is
/// dropped.
pub(crate) type Alive = async_channel::Sender<()>;

/// The stopper, and what the server's tasks need: the signals, one `Alive`, and senders to
/// keep the signal channels open until they are closed on purpose (so that dropping the
/// handle leaves the server running).
pub(crate) fn stopper(
    serving: std::sync::Arc<Serving>,
) -> (
    Stopper,
    Signals,
    Alive,
    (async_channel::Sender<()>, async_channel::Sender<()>),
) {
    let (drain_tx, drain) = async_channel::bounded(1);
    let (abort_tx, abort) = async_channel::bounded(1);
    let (alive, alive_rx) = async_channel::bounded::<()>(1);
    let keep_open = (drain_tx.clone(), abort_tx.clone());
    let signals = Signals {
        drain,
        abort,
        serving,
        idle: super::idle::IdleSlot::untracked(),
        idle_timeout: None,
    };
    let stopper = Stopper {
        drain_tx,
        abort_tx,
        alive_rx,
    };
    (stopper, signals, alive, keep_open)
}

/// One task's watch on a server signal. Once registered for the wake-up, a check is one
/// atomic load: drivers check their signals on every pass, and polling the channel's
/// listener each time cost a lock per pass.
pub(crate) struct SignalRx {
    rx: Pin<Box<async_channel::Receiver<()>>>,
    /// The waker the channel wakes when the signal is given.
    registered: Option<Waker>,
}

impl SignalRx {
    pub(crate) fn new(signal: &async_channel::Receiver<()>) -> Self {
        SignalRx {
            rx: Box::pin(signal.clone()),
            registered: None,
        }
    }

    /// Whether the signal has been given; registers `cx` for its wake-up otherwise.
    pub(crate) fn poll_given(&mut self, cx: &mut Context<'_>) -> bool {
        if self.rx.is_closed() {
            return true;
        }
        // Nothing is ever sent, so a registration holds until the close wakes it.
        if self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return false;
        }
        if self.rx.as_mut().poll_next(cx).is_ready() {
            return true;
        }
        self.registered = Some(cx.waker().clone());
        false
    }
}

/// `now + grace`, or a day from now for a grace too long to add.
pub(crate) fn grace_deadline(grace: Duration) -> Instant {
    Instant::now()
        .checked_add(grace)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
}

impl Stopper {
    /// Tells the tasks to drain and waits for them until `deadline`; then aborts them.
    pub(crate) async fn drain<R: Runtime>(&self, runtime: &R, deadline: Instant) -> Shutdown {
        self.drain_tx.close();
        if timeout(runtime, deadline, self.alive_rx.recv())
            .await
            .is_some()
        {
            return Shutdown::Graceful;
        }
        self.abort().await;
        Shutdown::Forced
    }

    /// Stops every task at once and waits until they are gone.
    pub(crate) async fn abort(&self) {
        self.drain_tx.close();
        self.abort_tx.close();
        let _ = self.alive_rx.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use std::task::Context;

    use super::SignalRx;
    use crate::test_waker::counting_waker;

    #[test]
    fn a_signal_wakes_the_task_that_checked_it_once_or_many_times() {
        let (tx, rx) = async_channel::bounded::<()>(1);
        let mut signal = SignalRx::new(&rx);
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..3 {
            assert!(!signal.poll_given(&mut cx));
        }
        tx.close();
        assert_eq!(count.count(), 1, "the close woke the task");
        assert!(signal.poll_given(&mut cx));

        // A task polled with another waker is registered again, and that one is woken.
        let (tx, rx) = async_channel::bounded::<()>(1);
        let mut signal = SignalRx::new(&rx);
        let (_, first) = counting_waker();
        let (second_count, second) = counting_waker();
        assert!(!signal.poll_given(&mut Context::from_waker(&first)));
        assert!(!signal.poll_given(&mut Context::from_waker(&second)));
        tx.close();
        assert_eq!(second_count.count(), 1);
        assert!(signal.poll_given(&mut Context::from_waker(&second)));
    }
}
