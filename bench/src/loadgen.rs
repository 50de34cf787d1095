//! The load generator every system shares: a closed loop of callers, a warm-up whose samples
//! are dropped, a measured window, latency histograms shared by the callers (16 at most),
//! merged at the end. The stream workload has its own loop ([`stream_loop`]): stream tasks
//! that each take one server stream's messages as fast as they come, counted between two
//! samples.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{self, BoxFuture, Either};
use futures::FutureExt;
use hdrhistogram::Histogram;

/// How long callers still in a call when the window closes are waited for before they are
/// abandoned (and counted as errors).
pub const GRACE: Duration = Duration::from_secs(2);

/// The warm-up and measured window of one run, fixed when the load starts.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Calls completing from here on are measured...
    pub measure_from: Instant,
    /// ...until here; no call starts after it.
    pub end: Instant,
}

impl Window {
    pub fn starting_now(warmup: Duration, secs: Duration) -> Self {
        let measure_from = Instant::now() + warmup;
        Window {
            measure_from,
            end: measure_from + secs,
        }
    }

    /// Length of the measured window in seconds.
    pub fn secs(&self) -> f64 {
        (self.end - self.measure_from).as_secs_f64()
    }
}

/// A latency histogram in nanoseconds, 3 significant digits, growing as needed.
fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is a valid histogram")
}

/// What one caller (or one pipelined connection) saw.
#[derive(Debug)]
pub struct Recorder {
    window: Window,
    hist: Histogram<u64>,
    completed: u64,
    errors: u64,
}

impl Recorder {
    pub fn new(window: Window) -> Self {
        Recorder {
            window,
            hist: new_histogram(),
            completed: 0,
            errors: 0,
        }
    }

    /// A call sent at `sent` and answered at `done`; `ok` says whether the call succeeded
    /// and its reply was the one expected. Successes count when they complete inside the
    /// measured window; errors count whenever they happen (warm-up included).
    pub fn record(&mut self, sent: Instant, done: Instant, ok: bool) {
        if !ok {
            self.errors += 1;
        } else if done >= self.window.measure_from && done < self.window.end {
            self.completed += 1;
            let nanos = u64::try_from((done - sent).as_nanos()).unwrap_or(u64::MAX);
            // Auto-resizing: `record` grows the histogram, so this never fails in practice.
            if self.hist.record(nanos.max(1)).is_err() {
                self.hist.saturating_record(nanos.max(1));
            }
        }
    }

    pub fn error(&mut self, n: u64) {
        self.errors += n;
    }
}

/// The merged result of one run.
#[derive(Debug)]
pub struct Measurement {
    pub hist: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
    pub secs: f64,
}

impl Measurement {
    pub fn merge(window: &Window, recorders: impl IntoIterator<Item = Recorder>) -> Self {
        let mut m = Measurement {
            hist: new_histogram(),
            completed: 0,
            errors: 0,
            secs: window.secs(),
        };
        for r in recorders {
            m.hist
                .add(&r.hist)
                .expect("auto-resizing histograms always merge");
            m.completed += r.completed;
            m.errors += r.errors;
        }
        m
    }

    /// A run that could not start at all.
    pub fn failed() -> Self {
        Measurement {
            hist: new_histogram(),
            completed: 0,
            errors: 1,
            secs: 0.0,
        }
    }

    pub fn qps(&self) -> f64 {
        if self.secs > 0.0 {
            self.completed as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Latency at `q` in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// One caller of the closed loop: holds its client and request, makes one call at a time.
pub trait Caller: Send + 'static {
    /// Makes one call; true when it succeeded and the reply is the one expected.
    fn call(&mut self) -> impl Future<Output = bool> + Send;
}

/// Takes a recorder out of its shared cell (the caller that filled it may have been
/// abandoned, so it is not always the last owner).
pub fn take_recorder(cell: &Mutex<Recorder>, window: &Window) -> Recorder {
    std::mem::replace(
        &mut *cell.lock().unwrap_or_else(|e| e.into_inner()),
        Recorder::new(*window),
    )
}

/// Callers share this many recorders (caller `i` records into `i % SHARED_RECORDERS`). A
/// histogram that has seen latencies of a second is a few hundred KiB: one per caller, 6,400
/// callers held 1.6 GiB of histograms, and recording into them (a cache miss, at first a
/// page fault) slowed every system's client. Merging is exact, so sharing changes nothing
/// in the result.
const SHARED_RECORDERS: usize = 16;

/// Runs `callers` in a closed loop over `window`: each caller sends one request, awaits the
/// reply, records the latency, repeats. Each caller runs as its own task via `spawn`.
/// Callers still in a call `GRACE` after the window closes (timed by `sleep_until`) are
/// abandoned and count as one error each.
pub async fn closed_loop<C, S, F>(
    callers: Vec<C>,
    window: Window,
    spawn: S,
    sleep_until: impl FnOnce(Instant) -> F,
) -> Measurement
where
    C: Caller,
    S: Fn(BoxFuture<'static, ()>),
    F: Future<Output = ()>,
{
    let cells: Vec<_> = (0..callers.len().min(SHARED_RECORDERS))
        .map(|_| Arc::new(Mutex::new(Recorder::new(window))))
        .collect();
    let mut done = Vec::with_capacity(callers.len());
    for (i, mut caller) in callers.into_iter().enumerate() {
        let cell = cells[i % cells.len()].clone();
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        done.push(rx);
        spawn(
            async move {
                loop {
                    let sent = Instant::now();
                    if sent >= window.end {
                        break;
                    }
                    let ok = caller.call().await;
                    let answered = Instant::now();
                    cell.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(sent, answered, ok);
                }
                let _ = tx.send(());
            }
            .boxed(),
        );
    }
    let grace = sleep_until(window.end + GRACE);
    let all_done = future::join_all(done.iter_mut());
    let finished = match future::select(std::pin::pin!(all_done), std::pin::pin!(grace)).await {
        // A caller whose task was dropped (it panicked) never reported back.
        Either::Left((results, _)) => Some(results.iter().filter(|r| r.is_err()).count()),
        Either::Right(_) => None,
    };
    // After the grace period, the callers still waiting for a reply have not sent theirs.
    let hung = finished.unwrap_or_else(|| {
        done.iter_mut()
            .map(|rx| matches!(rx.try_recv(), Ok(None)))
            .filter(|&waiting| waiting)
            .count()
    });
    let mut recorders: Vec<Recorder> = cells.iter().map(|c| take_recorder(c, &window)).collect();
    if let Some(r) = recorders.first_mut() {
        r.error(hung as u64);
    }
    Measurement::merge(&window, recorders)
}

/// One stream task's counts, and the run's stop flag. The task alone writes the counts; the
/// sampler reads them while it runs.
#[derive(Debug)]
pub struct StreamTally {
    messages: AtomicU64,
    errors: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl StreamTally {
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        StreamTally {
            messages: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            stop,
        }
    }

    /// Counts one message that was the one expected. False once the run is over: the caller
    /// then drops its stream (which cancels the call) and returns.
    pub fn message(&self) -> bool {
        self.messages(1)
    }

    /// The messages counted so far.
    pub fn total(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Counts `n` messages at once, as [`message`](Self::message) does one.
    pub fn messages(&self, n: u64) -> bool {
        // One writer: a load and a store, so a message costs no locked read-modify-write.
        let total = self.messages.load(Ordering::Relaxed);
        self.messages.store(total + n, Ordering::Relaxed);
        !self.stop.load(Ordering::Relaxed)
    }

    fn error(&self) {
        let n = self.errors.load(Ordering::Relaxed);
        self.errors.store(n + 1, Ordering::Relaxed);
    }

    /// Whether the run is over.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// One stream task of the stream or upload workload: opens stream calls one after another.
pub trait StreamCaller: Send + 'static {
    /// Runs one stream call: calls `tally.message()` for every message taken that is the one
    /// expected (a download) or every message handed to the call to send (an upload), and
    /// drops the call as soon as it returns false. True when the call moved every message and
    /// ended OK, or was dropped that way; false on anything else (an error status, a wrong or
    /// missing message, a wrong count).
    fn stream(&mut self, tally: &Arc<StreamTally>) -> impl Future<Output = bool> + Send;
}

/// The result of one stream run: the messages taken between the two samples.
#[derive(Debug)]
pub struct StreamMeasurement {
    pub messages: u64,
    /// Time between the two samples (the measured window as it actually ran).
    pub secs: f64,
    pub errors: u64,
}

impl StreamMeasurement {
    /// A run that could not start at all.
    pub fn failed() -> Self {
        StreamMeasurement {
            messages: 0,
            secs: 0.0,
            errors: 1,
        }
    }

    pub fn messages_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.messages as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Message payload throughput in MB/s (10^6 bytes), framing not counted.
    pub fn mb_per_sec(&self, payload: usize) -> f64 {
        self.messages_per_sec() * payload as f64 / 1e6
    }
}

/// Runs one task per caller, each opening stream after stream until the run ends. The
/// messages taken are summed at the start of the measured window and at its end, so
/// counting costs the tasks no clock reading per message. Tasks that have not returned
/// `GRACE` after the window closes count as one error each.
pub async fn stream_loop<C, S, F>(
    callers: Vec<C>,
    window: Window,
    spawn: S,
    sleep_until: impl Fn(Instant) -> F,
) -> StreamMeasurement
where
    C: StreamCaller,
    S: Fn(BoxFuture<'static, ()>),
    F: Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tallies = Vec::with_capacity(callers.len());
    let mut done = Vec::with_capacity(callers.len());
    for mut caller in callers {
        let tally = Arc::new(StreamTally::new(stop.clone()));
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        tallies.push(tally.clone());
        done.push(rx);
        spawn(
            async move {
                while !tally.stopped() {
                    if !caller.stream(&tally).await {
                        tally.error();
                    }
                }
                let _ = tx.send(());
            }
            .boxed(),
        );
    }
    let total = || -> u64 { tallies.iter().map(|t| t.total()).sum() };
    sleep_until(window.measure_from).await;
    let (first, started) = (total(), Instant::now());
    sleep_until(window.end).await;
    let (last, ended) = (total(), Instant::now());
    stop.store(true, Ordering::Relaxed);

    let grace = sleep_until(window.end + GRACE);
    let all_done = future::join_all(done.iter_mut());
    let finished = match future::select(std::pin::pin!(all_done), std::pin::pin!(grace)).await {
        // A task that was dropped (it panicked) never reported back.
        Either::Left((results, _)) => Some(results.iter().filter(|r| r.is_err()).count()),
        Either::Right(_) => None,
    };
    let hung = finished.unwrap_or_else(|| {
        done.iter_mut()
            .filter_map(|rx| rx.try_recv().ok())
            .filter(Option::is_none)
            .count()
    });
    let errors: u64 = tallies
        .iter()
        .map(|t| t.errors.load(Ordering::Relaxed))
        .sum();
    StreamMeasurement {
        messages: last - first,
        secs: (ended - started).as_secs_f64(),
        errors: errors + hung as u64,
    }
}
