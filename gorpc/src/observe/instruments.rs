//! The `gorpc_*` metrics of one server or client. Handles are registered with the recorder
//! once per method (and per method and code), then kept: a call costs neither an allocation
//! nor a lock, only a lookup in a table that is read without locking.
//!
//! The recorder must be installed before the server binds or the client is built: handles
//! registered earlier belong to the no-op recorder for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use gorpc_proto::Code;
use metrics::{Counter, Gauge, Histogram, Unit};

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

    pub(crate) fn ended(&self, slot: Slot, code: Code, duration: Duration) {
        let method = self.method(slot);
        method.in_flight.decrement(1.0);
        let (calls, durations) = method.ended(self.table.names, code);
        calls.increment(1);
        durations.record(duration.as_secs_f64());
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
