//! Per-method call counts by status and latency histograms, on the client or the server.
//!
//! ```
//! # use gorpc_plugins::metrics::Metrics;
//! # fn install<R: gorpc::Runtime>(runtime: R, router: gorpc::Router) {
//! let metrics = Metrics::new();
//! let server = gorpc::Server::new(runtime, router).interceptor(metrics.clone());
//! // Later, from a stats endpoint or a timer:
//! for (method, stats) in metrics.snapshot() {
//!     println!("{method}: {} calls, p99 {} µs", stats.total, stats.p99_us);
//! }
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use gorpc::client::OutgoingCall;
use gorpc::{
    ClientInterceptor, ClientNext, Code, Next, RawResponse, ServerInterceptor, ServerReply,
    ServerRequest, Status,
};
use hdrhistogram::Histogram;

/// The key under which calls to methods beyond the method limit are counted together.
pub const OTHER_METHODS: &str = "<other>";

/// Distinct methods tracked by [`Metrics::new`]. A server sees whatever method paths its
/// clients send, so without a bound a client could make it allocate a histogram per made-up
/// name.
pub const DEFAULT_METHOD_LIMIT: usize = 256;

/// Counts every call by method and status code and records its latency, as a
/// [`ServerInterceptor`] (from request to reply) or a [`ClientInterceptor`] (from send to
/// outcome). Cheap to clone: clones share their numbers. Give the client and the server
/// their own instance unless you want both sides of a method counted together.
///
/// Cost per call: two clock reads, a shared read of the method table (written only the
/// first time a method is seen), and one short lock of that method's record at the end to
/// count the call and record its latency. Calls to one method from many threads contend
/// on that lock; calls to different methods do not.
///
/// Memory: one histogram per method (microseconds, 3 significant digits), which grows with
/// the largest latency seen: 16 KiB at first, about 90 KiB once a call took a second, 140 KiB
/// for a minute. At most the method limit of them; later methods share [`OTHER_METHODS`].
///
/// A call abandoned before it finished (the client dropped its future, or the server
/// dropped the handler after a cancel or past the deadline) counts as `Cancelled`; a handler
/// that panicked counts as `Internal`, as the client will see it.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

struct Shared {
    methods: RwLock<HashMap<Box<str>, Arc<Mutex<Record>>>>,
    method_limit: usize,
}

impl Metrics {
    /// Tracks at most [`DEFAULT_METHOD_LIMIT`] distinct methods.
    pub fn new() -> Self {
        Metrics::with_method_limit(DEFAULT_METHOD_LIMIT)
    }

    /// Tracks at most `limit` distinct methods; calls to any further method are counted
    /// under [`OTHER_METHODS`].
    pub fn with_method_limit(limit: usize) -> Self {
        Metrics {
            shared: Arc::new(Shared {
                methods: RwLock::new(HashMap::new()),
                method_limit: limit,
            }),
        }
    }

    /// The numbers so far, by method path.
    pub fn snapshot(&self) -> BTreeMap<String, MethodStats> {
        let methods = self
            .shared
            .methods
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        methods
            .iter()
            .map(|(method, record)| (method.to_string(), lock(record).stats()))
            .collect()
    }

    /// Starts timing one call.
    fn start(&self, method: &str) -> InFlight {
        InFlight {
            record: Some(self.record_of(method)),
            started: Instant::now(),
        }
    }

    fn record_of(&self, method: &str) -> Arc<Mutex<Record>> {
        let methods = &self.shared.methods;
        if let Some(record) = methods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(method)
        {
            return record.clone();
        }
        let mut methods = methods.write().unwrap_or_else(PoisonError::into_inner);
        let named = methods.len() - usize::from(methods.contains_key(OTHER_METHODS));
        // Checked again under the write lock: another call may have added it meanwhile.
        let key = if named < self.shared.method_limit || methods.contains_key(method) {
            method
        } else {
            OTHER_METHODS
        };
        methods.entry(key.into()).or_default().clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("method_limit", &self.shared.method_limit)
            .finish_non_exhaustive()
    }
}

impl ServerInterceptor for Metrics {
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        let mut call = self.start(request.method());
        next.run(request)
            .map(move |reply| {
                call.finish(reply.status.code());
                reply
            })
            .boxed()
    }
}

impl ClientInterceptor for Metrics {
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let mut timing = self.start(&call.method);
        next.run(call)
            .map(move |result| {
                timing.finish(result.as_ref().err().map_or(Code::Ok, Status::code));
                result
            })
            .boxed()
    }
}

/// One method's numbers at the time of [`Metrics::snapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MethodStats {
    /// Finished calls, `ok` plus every error.
    pub total: u64,
    /// Calls that finished with OK.
    pub ok: u64,
    /// Failed calls by status code, in code order; codes never seen are left out.
    pub errors: Vec<(Code, u64)>,
    /// Median latency in microseconds. This and the three below are over all finished
    /// calls, 0 before the first call finishes.
    pub p50_us: u64,
    /// 90th percentile latency, microseconds.
    pub p90_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// The slowest call, microseconds.
    pub max_us: u64,
}

impl MethodStats {
    /// Calls that failed with `code`.
    pub fn errors_with(&self, code: Code) -> u64 {
        self.errors
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }
}

/// Every [`Code`] has a slot: they are numbered 0 to 16.
const CODES: usize = Code::Unauthenticated as usize + 1;

struct Record {
    calls: [u64; CODES],
    latency_us: Histogram<u64>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            calls: [0; CODES],
            latency_us: Histogram::new(3).expect("3 significant digits is a valid precision"),
        }
    }
}

impl Record {
    fn add(&mut self, code: Code, elapsed: Duration) {
        self.calls[code as usize] += 1;
        // Rounded up, so a finished call never reads as having taken no time.
        let micros = u64::try_from(elapsed.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX);
        let micros = micros.max(1);
        // `record` grows the histogram to fit (`saturating_record` would not: it clamps to
        // the current size). Growing fails only where usize cannot index the counts; the
        // call is then still counted, at the largest latency the histogram holds.
        if self.latency_us.record(micros).is_err() {
            self.latency_us.saturating_record(micros);
        }
    }

    fn stats(&self) -> MethodStats {
        let errors = (1..CODES as u32)
            .map(Code::from_u32)
            .map(|code| (code, self.calls[code as usize]))
            .filter(|&(_, n)| n > 0)
            .collect();
        let latency = &self.latency_us;
        MethodStats {
            total: self.calls.iter().sum(),
            ok: self.calls[Code::Ok as usize],
            errors,
            p50_us: latency.value_at_quantile(0.5),
            p90_us: latency.value_at_quantile(0.9),
            p99_us: latency.value_at_quantile(0.99),
            max_us: latency.max(),
        }
    }
}

/// One call being timed; counted when finished, or when dropped unfinished.
struct InFlight {
    /// Taken by the first `finish`, so a call counts once.
    record: Option<Arc<Mutex<Record>>>,
    started: Instant,
}

impl InFlight {
    fn finish(&mut self, code: Code) {
        if let Some(record) = self.record.take() {
            lock(&record).add(code, self.started.elapsed());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Unwinding means the handler panicked, which the server answers with `Internal`.
        let code = if std::thread::panicking() {
            Code::Internal
        } else {
            Code::Cancelled
        };
        self.finish(code);
    }
}

/// A record is only counters: one left half-updated by a panic is still worth reading.
fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_code_and_orders_percentiles() {
        let mut record = Record::default();
        for i in 1..=100 {
            record.add(Code::Ok, Duration::from_micros(i));
        }
        record.add(Code::NotFound, Duration::from_micros(5_000));
        record.add(Code::Unavailable, Duration::from_micros(10));
        record.add(Code::NotFound, Duration::from_nanos(1));
        let stats = record.stats();
        assert_eq!((stats.total, stats.ok), (103, 100));
        assert_eq!(
            stats.errors,
            [(Code::NotFound, 2), (Code::Unavailable, 1)],
            "errors come in code order"
        );
        assert_eq!(stats.errors_with(Code::NotFound), 2);
        assert_eq!(stats.errors_with(Code::Internal), 0);
        // Sorted: 1 (the 1 ns call), 1, 2, ..., 10, 10, 11, ..., 100, 5000.
        let percentiles = (stats.p50_us, stats.p90_us, stats.p99_us);
        assert_eq!(percentiles, (50, 91, 100), "{stats:?}");
        // Three significant digits: 5000 shares a bucket with its neighbours up to 5003.
        assert!((5_000..=5_003).contains(&stats.max_us), "{stats:?}");
    }

    #[test]
    fn sub_microsecond_calls_count_as_one_microsecond() {
        let mut record = Record::default();
        record.add(Code::Ok, Duration::ZERO);
        assert_eq!(record.stats().max_us, 1);
    }

    #[test]
    fn unfinished_calls_count_as_cancelled() {
        let metrics = Metrics::new();
        drop(metrics.start("/a.B/C"));
        let mut finished = metrics.start("/a.B/C");
        finished.finish(Code::Ok);
        drop(finished);
        let stats = &metrics.snapshot()["/a.B/C"];
        assert_eq!((stats.total, stats.ok), (2, 1), "{stats:?}");
        assert_eq!(stats.errors, [(Code::Cancelled, 1)]);
    }

    #[test]
    fn methods_beyond_the_limit_share_one_entry() {
        let metrics = Metrics::with_method_limit(2);
        for method in ["/s/A", "/s/B", "/s/C", "/s/D", "/s/A"] {
            metrics.start(method).finish(Code::Ok);
        }
        let totals: Vec<_> = metrics
            .snapshot()
            .into_iter()
            .map(|(method, stats)| (method, stats.total))
            .collect();
        assert_eq!(
            totals,
            [
                ("/s/A".to_owned(), 2),
                ("/s/B".to_owned(), 1),
                (OTHER_METHODS.to_owned(), 2)
            ]
        );
    }
}
