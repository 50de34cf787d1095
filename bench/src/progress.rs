//! A live progress line on stderr while the benchmark runs: which system, workload and
//! concurrency is being measured and about how many seconds are left, for it and in all.
//! Drawn only when stderr is a terminal; pipes, files and CI logs get nothing from it.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(250);

/// Erases the current terminal line and returns to its start.
const CLEAR: &str = "\r\x1b[2K";

/// The progress line, or nothing when stderr is not a terminal.
pub struct Progress {
    state: Option<Arc<Mutex<State>>>,
}

struct State {
    /// What is being measured, and when it should end; `None` between measurements.
    current: Option<(String, Instant)>,
    /// Measurements not started yet.
    pending: usize,
    /// How long one measurement takes (warm-up and measured window).
    each: Duration,
}

impl State {
    fn draw(&self) {
        let Some((label, ends)) = &self.current else {
            return;
        };
        let left = ends.saturating_duration_since(Instant::now());
        let in_all = left + self.each * u32::try_from(self.pending).unwrap_or(u32::MAX);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "{CLEAR}{label}: {} s left, {} s in all",
            whole_secs(left),
            whole_secs(in_all)
        );
        let _ = err.flush();
    }
}

/// `d` in whole seconds, rounded up (0 only when nothing is left).
fn whole_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

impl Progress {
    /// A progress line for `measurements` measurements of about `each` each; inert unless
    /// stderr is a terminal.
    pub fn new(measurements: usize, each: Duration) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress { state: None };
        }
        let state = Arc::new(Mutex::new(State {
            current: None,
            pending: measurements,
            each,
        }));
        // The ticker holds the state weakly: it ends once the progress line is dropped.
        let ticking = Arc::downgrade(&state);
        let _ = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                while let Some(state) = ticking.upgrade() {
                    lock(&state).draw();
                    drop(state);
                    std::thread::sleep(TICK);
                }
            });
        Progress { state: Some(state) }
    }

    /// A measurement described by `label` starts now.
    pub fn start(&self, label: String) {
        if let Some(state) = &self.state {
            let mut state = lock(state);
            state.pending = state.pending.saturating_sub(1);
            state.current = Some((label, Instant::now() + state.each));
            state.draw();
        }
    }

    /// The measurement is over: the line is erased, so other output starts on a clean line.
    pub fn done(&self) {
        if let Some(state) = &self.state {
            let mut state = lock(state);
            if state.current.take().is_some() {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "{CLEAR}");
                let _ = err.flush();
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_up() {
        assert_eq!(whole_secs(Duration::ZERO), 0);
        assert_eq!(whole_secs(Duration::from_millis(1)), 1);
        assert_eq!(whole_secs(Duration::from_millis(4000)), 4);
        assert_eq!(whole_secs(Duration::from_millis(4001)), 5);
    }
}
