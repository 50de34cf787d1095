//! A waker that counts its wake-ups, for unit tests of what wakes a task.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

/// Counts the wake-ups of the wakers made from it.
#[derive(Default)]
pub(crate) struct CountWakes(AtomicUsize);

impl CountWakes {
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Wake for CountWakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A waker and the count of its wake-ups.
pub(crate) fn counting_waker() -> (Arc<CountWakes>, Waker) {
    let count = Arc::new(CountWakes::default());
    (count.clone(), Waker::from(count))
}
