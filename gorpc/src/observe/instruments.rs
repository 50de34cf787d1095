//! The `gorpc_*` metrics of one server or client. Handles are registered with the recorder
//! once per method (and per method and code), then kept: a call costs neither an allocation
//! nor a lock, only a lookup in a table that is read without locking.
//!
//! The recorder must be installed before the server binds or the client is built: handles
//! registered earlier belong to the no-op recorder for good, and once a call's end shows
//! that durations go nowhere, a client stops reading the clock for them.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use gorpc_proto::Code;
use metrics::{Counter, Gauge, Histogram, IntoF64, Unit};

/// Which end of calls the numbers are about; it prefixes every name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Server,
    Client,
}

/// The metric names of one side, in Prometheus conventions.
struct Names {
    calls: &'static str,
    duration: &'static str,
    in_flight: &'static str,
    request_bytes: &'static str,
    response_bytes: &'static str,
    connections: &'static str,
}

const SERVER: Names = Names {
    calls: "gorpc_server_calls_total",
    duration: "gorpc_server_call_duration_seconds",
    in_flight: "gorpc_server_calls_in_flight",
    request_bytes: "gorpc_server_request_bytes_total",
    response_bytes: "gorpc_server_response_bytes_total",
    connections: "gorpc_server_connections",
};

const CLIENT: Names = Names {
    calls: "gorpc_client_calls_total",
    duration: "gorpc_client_call_duration_seconds",
    in_flight: "gorpc_client_calls_in_flight",
    request_bytes: "gorpc_client_request_bytes_total",
    response_bytes: "gorpc_client_response_bytes_total",
    connections: "gorpc_client_connections",
};

/// Distinct method labels per server or client. A server sees whatever method paths its
/// clients send: methods it does not route count under [`UNKNOWN`], and routed ones past
/// this many under [`OTHER`].
const MAX_METHODS: usize = 256;
const UNKNOWN: &str = "unknown";
const OTHER: &str = "other";
const UNKNOWN_SLOT: Slot = Slot(0);
const OTHER_SLOT: Slot = Slot(1);

/// A method's place in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot(u32);

/// The slots of the methods one connection's calls named, so that its calls find theirs
/// by a short compare instead of the shared table's hashed lookup. A connection calls a
/// few methods; past [`MethodSlots::MAX`] they are looked up in the table.
#[derive(Debug, Default)]
pub(crate) struct MethodSlots {
    known: Vec<(Box<str>, Slot)>,
}

impl MethodSlots {
    const MAX: usize = 8;

    pub(crate) fn get_or_insert(&mut self, method: &str, find: impl FnOnce() -> Slot) -> Slot {
        if let Some((_, slot)) = self.known.iter().find(|(known, _)| **known == *method) {
            return *slot;
        }
        let slot = find();
        // Unknown methods are not kept: made-up names would crowd out the real ones.
        if slot != UNKNOWN_SLOT && self.known.len() < Self::MAX {
            self.known.push((method.into(), slot));
        }
        slot
    }
}

/// One side's instruments. Cheap to clone: clones share them.
#[derive(Clone)]
pub(crate) struct Instruments {
    table: Arc<Table>,
}

struct Table {
    names: &'static Names,
    /// Method path to slot; replaced whole when a method is added.
    index: ArcSwap<HashMap<Box<str>, Slot, foldhash::fast::RandomState>>,
    slots: Box<[OnceLock<Box<MethodInstruments>>]>,
    /// Held while a method is added.
    adding: Mutex<()>,
    /// The slots of method paths given as `&'static str`, by address.
    literals: LiteralSlots,
    /// Whether the recorder keeps call durations: [`UNKNOWN`] until a call's end shows it.
    timed: AtomicU8,
}

/// Values of [`Table::timed`].
const UNKNOWN_TIMED: u8 = 0;
const TIMED: u8 = 1;
const UNTIMED: u8 = 2;

/// A call's duration, measured only if asked for: the histogram of a no-op recorder never
/// asks, so a call nobody times costs no clock read at its end.
pub(crate) struct Elapsed {
    started: Instant,
    measured: Cell<Option<Duration>>,
}

impl Elapsed {
    pub(crate) fn since(started: Instant) -> Self {
        Elapsed {
            started,
            measured: Cell::new(None),
        }
    }

    pub(crate) fn get(&self) -> Duration {
        if let Some(measured) = self.measured.get() {
            return measured;
        }
        let measured = self.started.elapsed();
        self.measured.set(Some(measured));
        measured
    }

    fn was_measured(&self) -> bool {
        self.measured.get().is_some()
    }
}

impl IntoF64 for &Elapsed {
    fn into_f64(self) -> f64 {
        self.get().as_secs_f64()
    }
}

/// The slots of method paths given as string literals (as generated and macro clients
/// give them), found by the literal's address and length: no hashing, no string compare,
/// no reference count. Entries are filled once and never change, so a reader that sees
/// one filled reads it whole; a full or colliding entry leaves its method to the index.
struct LiteralSlots {
    entries: [LiteralSlot; LITERAL_SLOTS],
}

const LITERAL_SLOTS: usize = 32;
const EMPTY: u8 = 0;
const FILLING: u8 = 1;
const FILLED: u8 = 2;

#[derive(Default)]
struct LiteralSlot {
    state: AtomicU8,
    addr: AtomicUsize,
    len: AtomicUsize,
    slot: AtomicU32,
}

impl LiteralSlots {
    fn new() -> Self {
        LiteralSlots {
            entries: std::array::from_fn(|_| LiteralSlot::default()),
        }
    }

    fn entry(&self, method: &'static str) -> &LiteralSlot {
        let addr = method.as_ptr() as usize;
        // Fibonacci hashing of the address; literals are byte-aligned, so use every bit.
        let hash = (addr ^ method.len()).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize);
        &self.entries[hash >> (usize::BITS - LITERAL_SLOTS.trailing_zeros())]
    }

    fn get(&self, method: &'static str) -> Option<Slot> {
        let entry = self.entry(method);
        let found = entry.state.load(Ordering::Acquire) == FILLED
            && entry.addr.load(Ordering::Relaxed) == method.as_ptr() as usize
            && entry.len.load(Ordering::Relaxed) == method.len();
        found.then(|| Slot(entry.slot.load(Ordering::Relaxed)))
    }

    fn put(&self, method: &'static str, slot: Slot) {
        let entry = self.entry(method);
        if entry
            .state
            .compare_exchange(EMPTY, FILLING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            entry
                .addr
                .store(method.as_ptr() as usize, Ordering::Relaxed);
            entry.len.store(method.len(), Ordering::Relaxed);
            entry.slot.store(slot.0, Ordering::Relaxed);
            entry.state.store(FILLED, Ordering::Release);
        }
    }
}

/// One method's instruments; those of each status code are registered when first used.
struct MethodInstruments {
    label: String,
    in_flight: Gauge,
    request_bytes: Counter,
    response_bytes: Counter,
    ends: [OnceLock<(Counter, Histogram)>; 17],
}

impl MethodInstruments {
    fn register(names: &Names, method: &str) -> Box<Self> {
        let label = method.to_owned();
        Box::new(MethodInstruments {
            in_flight: metrics::gauge!(names.in_flight, "method" => label.clone()),
            request_bytes: metrics::counter!(names.request_bytes, "method" => label.clone()),
            response_bytes: metrics::counter!(names.response_bytes, "method" => label.clone()),
            ends: Default::default(),
            label,
        })
    }

    fn ended(&self, names: &Names, code: Code) -> &(Counter, Histogram) {
        self.ends[code as usize].get_or_init(|| {
            let (method, code) = (self.label.clone(), code_label(code));
            (
                metrics::counter!(names.calls, "method" => method.clone(), "code" => code),
                metrics::histogram!(names.duration, "method" => method, "code" => code),
            )
        })
    }
}

impl Instruments {
    pub(crate) fn new(side: Side) -> Self {
        let names = names(side);
        describe(names, side);
        let slots = (0..MAX_METHODS + 2).map(|_| OnceLock::new()).collect();
        Instruments {
            table: Arc::new(Table {
                names,
                index: ArcSwap::from_pointee(HashMap::default()),
                slots,
                adding: Mutex::new(()),
                literals: LiteralSlots::new(),
                timed: AtomicU8::new(UNKNOWN_TIMED),
            }),
        }
    }

    /// The slot of `method`, adding it if `known` says the service routes it.
    pub(crate) fn slot(&self, method: &str, known: impl FnOnce() -> bool) -> Slot {
        let table = &*self.table;
        if let Some(&slot) = table.index.load().get(method) {
            return slot;
        }
        if !known() {
            return UNKNOWN_SLOT;
        }
        let _adding = table.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let index = table.index.load_full();
        if let Some(&slot) = index.get(method) {
            return slot;
        }
        let next = index.len() + 2;
        if next >= table.slots.len() {
            return OTHER_SLOT;
        }
        let slot = Slot(next as u32);
        let _ = table.slots[next].set(MethodInstruments::register(table.names, method));
        let mut grown = (*index).clone();
        grown.insert(method.into(), slot);
        table.index.store(Arc::new(grown));
        slot
    }

    /// [`slot`](Self::slot) for a method path given as a literal (a client's call).
    pub(crate) fn literal_slot(&self, method: &'static str, known: impl FnOnce() -> bool) -> Slot {
        let literals = &self.table.literals;
        if let Some(slot) = literals.get(method) {
            return slot;
        }
        let slot = self.slot(method, known);
        literals.put(method, slot);
        slot
    }

    fn method(&self, slot: Slot) -> &MethodInstruments {
        let table = &*self.table;
        table.slots[slot.0 as usize].get_or_init(|| {
            let label = if slot == UNKNOWN_SLOT { UNKNOWN } else { OTHER };
            MethodInstruments::register(table.names, label)
        })
    }

    pub(crate) fn started(&self, slot: Slot) {
        self.method(slot).in_flight.increment(1.0);
    }

    pub(crate) fn request_bytes(&self, slot: Slot, bytes: usize) {
        self.method(slot).request_bytes.increment(bytes as u64);
    }

    pub(crate) fn response_bytes(&self, slot: Slot, bytes: usize) {
        self.method(slot).response_bytes.increment(bytes as u64);
    }

    /// Counts a call's end. `elapsed` is `None` for a call started untimed (see
    /// [`is_untimed`](Self::is_untimed)).
    pub(crate) fn ended(&self, slot: Slot, code: Code, elapsed: Option<&Elapsed>) {
        let method = self.method(slot);
        method.in_flight.decrement(1.0);
        let (calls, durations) = method.ended(self.table.names, code);
        calls.increment(1);
        if let Some(elapsed) = elapsed {
            durations.record(elapsed);
            if self.table.timed.load(Ordering::Relaxed) == UNKNOWN_TIMED {
                let timed = if elapsed.was_measured() {
                    TIMED
                } else {
                    UNTIMED
                };
                self.table.timed.store(timed, Ordering::Relaxed);
            }
        }
    }

    /// Whether a call's end showed that the recorder keeps no durations: the no-op
    /// recorder's, as when none was installed before these instruments were made (handles
    /// registered then stay no-ops).
    pub(crate) fn is_untimed(&self) -> bool {
        self.table.timed.load(Ordering::Relaxed) == UNTIMED
    }
}

fn names(side: Side) -> &'static Names {
    match side {
        Side::Server => &SERVER,
        Side::Client => &CLIENT,
    }
}

/// The name of the gauge of open connections of `side`.
pub(crate) fn connections_name(side: Side) -> &'static str {
    names(side).connections
}

/// Tells the recorder what each metric is.
fn describe(names: &Names, side: Side) {
    let calls = match side {
        Side::Server => "Calls a server ended, by method and status code",
        Side::Client => "Calls a client made that ended, by method and status code",
    };
    metrics::describe_counter!(names.calls, Unit::Count, calls);
    metrics::describe_histogram!(
        names.duration,
        Unit::Seconds,
        "How long calls took, from arrival (server) or start (client) to their end"
    );
    metrics::describe_gauge!(names.in_flight, Unit::Count, "Calls started and not ended");
    metrics::describe_counter!(
        names.request_bytes,
        Unit::Bytes,
        "Request message bytes, encoded, before any compression"
    );
    metrics::describe_counter!(
        names.response_bytes,
        Unit::Bytes,
        "Response message bytes, encoded, before any compression"
    );
    metrics::describe_gauge!(names.connections, Unit::Count, "Connections open");
}

/// A status code as gRPC's specification spells it, the label value of `code`.
pub(crate) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use metrics::{HistogramFn, Key, KeyName, Metadata, Recorder, SharedString};

    use super::*;

    #[test]
    fn a_connection_keeps_the_slots_of_known_methods_only() {
        let instruments = Instruments::new(Side::Server);
        let mut cached = MethodSlots::default();
        let find = |method: &str, known: bool| instruments.slot(method, || known);
        let slot = cached.get_or_insert("/pkg.Svc/A", || find("/pkg.Svc/A", true));
        assert_eq!(cached.get_or_insert("/pkg.Svc/A", || unreachable!()), slot);
        assert_eq!(
            cached.get_or_insert("/pkg.Svc/Nope", || find("/pkg.Svc/Nope", false)),
            UNKNOWN_SLOT
        );
        assert_eq!(cached.known.len(), 1, "unknown methods are not kept");
        for i in 0..2 * MethodSlots::MAX {
            let method = format!("/pkg.Svc/M{i}");
            let slot = cached.get_or_insert(&method, || find(&method, true));
            assert_eq!(slot, instruments.slot(&method, || true));
        }
        assert_eq!(cached.known.len(), MethodSlots::MAX);
    }

    #[test]
    fn a_literal_finds_the_slot_of_its_text() {
        let instruments = Instruments::new(Side::Client);
        let literal: &'static str = "/pkg.Svc/Method";
        let prefix: &'static str = &literal[..8];
        let slot = instruments.literal_slot(literal, || true);
        assert_eq!(instruments.literal_slot(literal, || true), slot);
        assert_eq!(instruments.slot(&String::from(literal), || true), slot);
        // Same address, shorter text: another method.
        let other = instruments.literal_slot(prefix, || true);
        assert_ne!(other, slot);
        assert_eq!(instruments.slot(prefix, || true), other);
    }

    #[test]
    fn calls_go_untimed_once_an_end_shows_the_recorder_keeps_no_durations() {
        // No recorder in this test: its handles are no-ops.
        let instruments = Instruments::new(Side::Client);
        let slot = instruments.slot("/pkg.Svc/Method", || true);
        assert!(!instruments.is_untimed(), "unknown before any call ended");
        let elapsed = Elapsed::since(Instant::now());
        instruments.ended(slot, Code::Ok, Some(&elapsed));
        assert!(!elapsed.was_measured(), "a no-op histogram never asks");
        assert!(instruments.is_untimed());
    }

    /// Keeps histograms only: counts their values.
    struct Histograms(Arc<AtomicUsize>);

    struct Count(Arc<AtomicUsize>);

    impl HistogramFn for Count {
        fn record(&self, _: f64) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Recorder for Histograms {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(Arc::new(Count(self.0.clone())))
        }
    }

    #[test]
    fn calls_stay_timed_while_the_recorder_keeps_durations() {
        let recorded = Arc::new(AtomicUsize::new(0));
        let recorder = Histograms(recorded.clone());
        metrics::with_local_recorder(&recorder, || {
            let instruments = Instruments::new(Side::Server);
            let slot = instruments.slot("/pkg.Svc/Method", || true);
            for _ in 0..2 {
                let elapsed = Elapsed::since(Instant::now());
                instruments.ended(slot, Code::Ok, Some(&elapsed));
                assert!(elapsed.was_measured());
                assert!(!instruments.is_untimed());
            }
        });
        assert_eq!(recorded.load(Ordering::Relaxed), 2);
    }
}
