//! Call outcome codes. The numbering is gRPC's, so statuses map one to one across gateways.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    /// Not an error: the call succeeded.
    Ok = 0,
    /// The call was cancelled, typically by the caller.
    Cancelled = 1,
    /// An error with no better code, or a code this version does not know.
    Unknown = 2,
    /// The request is wrong whatever the server's state (a malformed argument).
    InvalidArgument = 3,
    /// The deadline passed before the call ended; it may have taken effect all the same.
    DeadlineExceeded = 4,
    /// Something the request names does not exist.
    NotFound = 5,
    /// What the request would create exists already.
    AlreadyExists = 6,
    /// The caller is known but may not do this.
    PermissionDenied = 7,
    /// A limit or quota ran out (a per-user quota, the server's capacity, a size limit).
    ResourceExhausted = 8,
    /// The system is not in the state the call needs; retrying as is will not help.
    FailedPrecondition = 9,
    /// The call lost a race (a conflict, a transaction abort); retry at a higher level.
    Aborted = 10,
    /// A value lies past the valid range (reading past the end, say).
    OutOfRange = 11,
    /// The method is not implemented, not served, or not supported.
    Unimplemented = 12,
    /// An invariant broke in the server or the protocol.
    Internal = 13,
    /// The service cannot be reached now; trying again, with backoff, may succeed.
    Unavailable = 14,
    /// Unrecoverable data loss or corruption.
    DataLoss = 15,
    /// The call carries no valid credentials.
    Unauthenticated = 16,
}

impl Code {
    /// Maps a wire value; values this version does not know become [`Code::Unknown`].
    pub fn from_u32(v: u32) -> Code {
        use Code::*;
        match v {
            0 => Ok,
            1 => Cancelled,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => Unknown,
        }
    }

    /// The code's name in lower case with spaces (`"deadline exceeded"`), as `Display` writes it.
    pub fn as_str(self) -> &'static str {
        use Code::*;
        match self {
            Ok => "ok",
            Cancelled => "cancelled",
            Unknown => "unknown",
            InvalidArgument => "invalid argument",
            DeadlineExceeded => "deadline exceeded",
            NotFound => "not found",
            AlreadyExists => "already exists",
            PermissionDenied => "permission denied",
            ResourceExhausted => "resource exhausted",
            FailedPrecondition => "failed precondition",
            Aborted => "aborted",
            OutOfRange => "out of range",
            Unimplemented => "unimplemented",
            Internal => "internal",
            Unavailable => "unavailable",
            DataLoss => "data loss",
            Unauthenticated => "unauthenticated",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code and a human-readable message, and optionally the error that caused it.
///
/// The cause ([`with_source`](Self::with_source)) stays on this side: it is what
/// [`std::error::Error::source`] returns (an `io::Error` for a failed connect, a rustls
/// error for a refused certificate), never sent to the peer, and not part of equality.
#[derive(Clone)]
pub struct Status {
    code: Code,
    message: Cow<'static, str>,
    /// What few statuses carry, kept apart so that a status stays small: one is moved
    /// with every answer.
    extra: Option<Arc<Extra>>,
}

#[derive(Clone, Default)]
struct Extra {
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
    /// How long the server asked the client to wait before trying again (an overloaded
    /// server's pushback); carried in metadata, not in the status frame.
    retry_after: Option<Duration>,
}

/// One constructor per code, each `Status::new(Code::X, message)`.
macro_rules! constructors {
    ($($(#[$doc:meta])* $name:ident => $code:ident,)*) => {
        $(
            $(#[$doc])*
            pub fn $name(message: impl Into<Cow<'static, str>>) -> Status {
                Status::new(Code::$code, message)
            }
        )*
    };
}

impl Status {
    /// A status of `code` with `message`, no source and no retry hint.
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Status {
        Status {
            code,
            message: message.into(),
            extra: None,
        }
    }

    /// Success with no message; does not allocate.
    pub const fn ok() -> Status {
        Status {
            code: Code::Ok,
            message: Cow::Borrowed(""),
            extra: None,
        }
    }

    constructors! {
        /// The caller gave up on the call.
        cancelled => Cancelled,
        /// An error with no better code.
        unknown => Unknown,
        /// The request is wrong whatever the server's state.
        invalid_argument => InvalidArgument,
        /// The call did not end before its deadline.
        deadline_exceeded => DeadlineExceeded,
        /// Something the request names does not exist.
        not_found => NotFound,
        /// What the request would create exists already.
        already_exists => AlreadyExists,
        /// The caller may not do this.
        permission_denied => PermissionDenied,
        /// A limit or quota ran out.
        resource_exhausted => ResourceExhausted,
        /// The system is not in the state the call needs.
        failed_precondition => FailedPrecondition,
        /// The call lost a race (a conflict, a transaction abort).
        aborted => Aborted,
        /// A value lies past a valid range.
        out_of_range => OutOfRange,
        /// The method is not implemented or not served.
        unimplemented => Unimplemented,
        /// An invariant broke.
        internal => Internal,
        /// The service cannot be reached now; trying again may succeed.
        unavailable => Unavailable,
        /// Data was lost or corrupted.
        data_loss => DataLoss,
        /// The call carries no valid credentials.
        unauthenticated => Unauthenticated,
    }

    /// This status with `source` as its cause, returned by
    /// [`std::error::Error::source`]. The cause is for this process (logs, a downcast to
    /// `io::Error`); it does not travel to the peer.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Status {
        self.extra_mut().source = Some(Arc::new(source));
        self
    }

    /// This status with a hint of how long to wait before trying again: a server that
    /// refuses calls under overload says so (sent as `grpc-retry-pushback-ms`, gRPC's
    /// name for it), and retry policies wait at least that long.
    pub fn with_retry_after(mut self, wait: Duration) -> Status {
        self.extra_mut().retry_after = Some(wait);
        self
    }

    /// The server's hint of how long to wait before trying again, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.extra.as_ref().and_then(|extra| extra.retry_after)
    }

    fn extra_mut(&mut self) -> &mut Extra {
        Arc::make_mut(self.extra.get_or_insert_with(Default::default))
    }

    fn source_error(&self) -> Option<&Arc<dyn std::error::Error + Send + Sync + 'static>> {
        self.extra.as_ref().and_then(|extra| extra.source.as_ref())
    }

    /// This status with another message (more context, say); the code and the source
    /// stay.
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Status {
        self.message = message.into();
        self
    }

    /// Why the call ended.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The human-readable message; empty for a plain [`Status::ok`].
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the code is [`Code::Ok`].
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Status");
        debug
            .field("code", &self.code)
            .field("message", &self.message);
        if let Some(source) = self.source_error() {
            debug.field("source", source);
        }
        if let Some(wait) = self.retry_after() {
            debug.field("retry_after", &wait);
        }
        debug.finish()
    }
}

/// Code and message: the cause is not compared, so a status equals the one it becomes
/// on the other side of the wire.
impl PartialEq for Status {
    fn eq(&self, other: &Status) -> bool {
        self.code == other.code && self.message == other.message
    }
}

impl Eq for Status {}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source_error()
            .map(|e| &**e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_unknown_values_map_to_unknown() {
        for v in 0..=16 {
            assert_eq!(Code::from_u32(v) as u32, v);
        }
        assert_eq!(Code::from_u32(17), Code::Unknown);
        assert_eq!(Code::from_u32(u32::MAX), Code::Unknown);
    }

    #[test]
    fn a_status_is_small_and_keeps_its_rare_parts_together() {
        // Moved with every answer: a code, a message and one pointer.
        assert!(std::mem::size_of::<Status>() <= 40);
        let wait = Duration::from_millis(250);
        let status = Status::unavailable("busy")
            .with_retry_after(wait)
            .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let copy = status.clone().with_message("still busy");
        for status in [&status, &copy] {
            assert_eq!(status.retry_after(), Some(wait));
            assert!(std::error::Error::source(status).is_some());
        }
        assert_eq!(status.message(), "busy");
        assert_eq!(Status::ok().retry_after(), None);
    }

    #[test]
    fn display() {
        assert_eq!(
            Status::new(Code::NotFound, "no such method").to_string(),
            "not found: no such method"
        );
        assert_eq!(Status::ok().to_string(), "ok");
    }

    #[test]
    fn each_constructor_has_its_code() {
        type Make = fn(&'static str) -> Status;
        let cases: [(Make, Code); 16] = [
            (Status::cancelled, Code::Cancelled),
            (Status::unknown, Code::Unknown),
            (Status::invalid_argument, Code::InvalidArgument),
            (Status::deadline_exceeded, Code::DeadlineExceeded),
            (Status::not_found, Code::NotFound),
            (Status::already_exists, Code::AlreadyExists),
            (Status::permission_denied, Code::PermissionDenied),
            (Status::resource_exhausted, Code::ResourceExhausted),
            (Status::failed_precondition, Code::FailedPrecondition),
            (Status::aborted, Code::Aborted),
            (Status::out_of_range, Code::OutOfRange),
            (Status::unimplemented, Code::Unimplemented),
            (Status::internal, Code::Internal),
            (Status::unavailable, Code::Unavailable),
            (Status::data_loss, Code::DataLoss),
            (Status::unauthenticated, Code::Unauthenticated),
        ];
        for (make, code) in cases {
            assert_eq!(make("why"), Status::new(code, "why"));
        }
        assert_eq!(Status::not_found(format!("no {}", 7)).message(), "no 7");
    }

    #[test]
    fn the_source_is_the_cause_kept_by_clones_and_ignored_by_equality() {
        use std::error::Error as _;
        let plain = Status::unavailable("connect failed");
        assert!(plain.source().is_none());
        let caused = Status::unavailable("connect failed")
            .with_source(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let cloned = caused.clone();
        for status in [&caused, &cloned] {
            let io = status
                .source()
                .and_then(|e| e.downcast_ref::<std::io::Error>())
                .expect("the io::Error is the source");
            assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        assert_eq!(caused, plain);
        assert_ne!(caused, Status::unavailable("other"));
        assert!(format!("{caused:?}").contains("ConnectionRefused"));
        assert_eq!(caused.to_string(), "unavailable: connect failed");
    }
}
