//! Call outcome codes. The numbering is gRPC's, so statuses map one to one across gateways.

use std::borrow::Cow;
use std::fmt;

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
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

/// A code and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    code: Code,
    message: Cow<'static, str>,
}

impl Status {
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    /// Success with no message; does not allocate.
    pub const fn ok() -> Status {
        Status {
            code: Code::Ok,
            message: Cow::Borrowed(""),
        }
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl std::error::Error for Status {}

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
    fn display() {
        assert_eq!(
            Status::new(Code::NotFound, "no such method").to_string(),
            "not found: no such method"
        );
        assert_eq!(Status::ok().to_string(), "ok");
    }
}
