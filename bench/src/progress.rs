//! A live progress bar on stderr while the benchmark runs: how many measurements are done,
//! which system, workload and concurrency is being measured, and about how long is left.
//! indicatif draws it only when stderr is a terminal; pipes, files and CI logs get nothing.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// How often the bar is redrawn while a measurement runs.
const TICK: Duration = Duration::from_millis(250);

/// The progress bar: one step per measurement.
pub struct Progress {
    bar: ProgressBar,
    /// How long one measurement takes (warm-up and measured window): the time left is known
    /// up front, so it is shown from the first measurement on, not estimated from the rate.
    each: Duration,
}

impl Progress {
    /// A progress bar for `measurements` measurements of about `each` each.
    pub fn new(measurements: usize, each: Duration) -> Self {
        let bar = ProgressBar::new(measurements as u64);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:24}] {pos}/{len}  {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(TICK);
        Progress { bar, each }
    }

    /// A measurement described by `label` starts now.
    pub fn start(&self, label: String) {
        let left = self.each
            * u32::try_from(self.bar.length().unwrap_or(0) - self.bar.position())
                .unwrap_or(u32::MAX);
        self.bar
            .set_message(format!("{label}  (about {} s left)", left.as_secs()));
    }

    /// The measurement is over.
    pub fn done(&self) {
        self.bar.inc(1);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Erased, so the results that follow start on a clean line.
        self.bar.finish_and_clear();
    }
}
