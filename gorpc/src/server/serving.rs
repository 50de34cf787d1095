//! Whether a server reports itself ready to serve: what `GET /healthz` and gRPC's health
//! service answer, flipped by [`ServerHandle::set_serving`](super::ServerHandle::set_serving)
//! and, for good, by the start of a shutdown.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
pub(crate) struct Serving {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    not_serving: bool,
    /// The server is shutting down: not serving, for good.
    stopping: bool,
    /// Counts changes, so a watcher knows whether it saw the latest.
    version: u64,
    /// Watchers waiting for a change, by id: one that goes away takes its waker out.
    watchers: HashMap<u64, Waker>,
    next_watcher: u64,
}

impl Serving {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn is_serving(&self) -> bool {
        !self.lock().not_serving
    }

    /// Whether the server is shutting down.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn is_stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Sets the state, unless the server is shutting down; watchers learn of a change.
    pub(crate) fn set(&self, serving: bool) {
        self.change(|state| {
            if state.stopping || state.not_serving != serving {
                return false;
            }
            state.not_serving = !serving;
            true
        });
    }

    /// The server starts shutting down: not serving, for good.
    pub(crate) fn stop(&self) {
        self.change(|state| {
            let changed = !state.stopping;
            state.not_serving = true;
            state.stopping = true;
            changed
        });
    }

    fn change(&self, apply: impl FnOnce(&mut State) -> bool) {
        let watchers = {
            let mut state = self.lock();
            if !apply(&mut state) {
                return;
            }
            state.version += 1;
            std::mem::take(&mut state.watchers)
        };
        for waker in watchers.into_values() {
            waker.wake();
        }
    }

    /// A new watcher's id, for [`poll_change`](Self::poll_change); [`unwatch`](Self::unwatch)
    /// it when done.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn watch(&self) -> u64 {
        let mut state = self.lock();
        state.next_watcher += 1;
        state.next_watcher
    }

    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn unwatch(&self, watcher: u64) {
        self.lock().watchers.remove(&watcher);
    }

    /// The state, once it differs from what `watcher` last saw (`seen`: its version, `None`
    /// at first, which is answered at once).
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn poll_change(
        &self,
        cx: &mut Context<'_>,
        watcher: u64,
        seen: &mut Option<u64>,
    ) -> Poll<bool> {
        let mut state = self.lock();
        if *seen != Some(state.version) {
            *seen = Some(state.version);
            return Poll::Ready(!state.not_serving);
        }
        match state.watchers.get(&watcher) {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => {
                state.watchers.insert(watcher, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn watchers_see_each_change_once() {
        let serving = Serving::default();
        let mut cx = Context::from_waker(noop_waker_ref());
        let watcher = serving.watch();
        let mut seen = None;
        assert_eq!(
            serving.poll_change(&mut cx, watcher, &mut seen),
            Poll::Ready(true)
        );
        assert_eq!(
            serving.poll_change(&mut cx, watcher, &mut seen),
            Poll::Pending
        );
        serving.set(true);
        assert_eq!(
            serving.poll_change(&mut cx, watcher, &mut seen),
            Poll::Pending,
            "no change"
        );
        serving.set(false);
        assert!(!serving.is_serving());
        assert_eq!(
            serving.poll_change(&mut cx, watcher, &mut seen),
            Poll::Ready(false)
        );
        serving.set(true);
        assert_eq!(
            serving.poll_change(&mut cx, watcher, &mut seen),
            Poll::Ready(true)
        );
    }

    #[test]
    fn a_stopped_server_stays_not_serving_and_forgets_its_watchers() {
        let serving = Serving::default();
        let mut cx = Context::from_waker(noop_waker_ref());
        let watcher = serving.watch();
        let mut seen = None;
        let _ = serving.poll_change(&mut cx, watcher, &mut seen);
        assert_eq!(
            serving.poll_change(&mut cx, watcher, &mut seen),
            Poll::Pending
        );
        serving.unwatch(watcher);
        assert!(serving.lock().watchers.is_empty());
        serving.stop();
        serving.set(true);
        assert!(!serving.is_serving() && serving.is_stopping());
    }
}
