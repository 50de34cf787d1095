//! Whether a server reports itself ready to serve: what `GET /healthz` and gRPC's health
//! service answer, flipped by [`ServerHandle::set_serving`](super::ServerHandle::set_serving)
//! and by the start of a shutdown.

use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
pub(crate) struct Serving {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    not_serving: bool,
    /// Counts changes, so a watcher knows whether it saw the latest.
    version: u64,
    watchers: Vec<Waker>,
}

impl Serving {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn is_serving(&self) -> bool {
        !self.lock().not_serving
    }

    /// Sets the state; watchers learn of a change.
    pub(crate) fn set(&self, serving: bool) {
        let watchers = {
            let mut state = self.lock();
            if state.not_serving != serving {
                return;
            }
            state.not_serving = !serving;
            state.version += 1;
            std::mem::take(&mut state.watchers)
        };
        for waker in watchers {
            waker.wake();
        }
    }

    /// The state, once it differs from what a watcher last saw (`seen`: its version, `None`
    /// at first, which is answered at once).
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn poll_change(&self, cx: &mut Context<'_>, seen: &mut Option<u64>) -> Poll<bool> {
        let mut state = self.lock();
        if *seen != Some(state.version) {
            *seen = Some(state.version);
            return Poll::Ready(!state.not_serving);
        }
        if !state.watchers.iter().any(|w| w.will_wake(cx.waker())) {
            state.watchers.push(cx.waker().clone());
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
        let mut seen = None;
        assert_eq!(serving.poll_change(&mut cx, &mut seen), Poll::Ready(true));
        assert_eq!(serving.poll_change(&mut cx, &mut seen), Poll::Pending);
        serving.set(true);
        assert_eq!(
            serving.poll_change(&mut cx, &mut seen),
            Poll::Pending,
            "no change"
        );
        serving.set(false);
        assert!(!serving.is_serving());
        assert_eq!(serving.poll_change(&mut cx, &mut seen), Poll::Ready(false));
        serving.set(true);
        assert_eq!(serving.poll_change(&mut cx, &mut seen), Poll::Ready(true));
    }
}
