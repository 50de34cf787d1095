//! HTTP/1.1: the same services as plain HTTP requests, so that `curl` or any HTTP client can
//! call them (docs/PROTOCOL.md, "HTTP/1.1 mapping", is the reference).
//!
//! - A call is `POST /package.Service/Method`, the request body in the codec its
//!   `Content-Type` names. The answer carries the call's status in [`STATUS_HEADER`] and
//!   [`MESSAGE_HEADER`] on every response, with an HTTP status mapped from it
//!   ([`http_status`]). Metadata travels as headers prefixed [`METADATA_PREFIX`], the
//!   deadline as [`TIMEOUT_HEADER`]. Connections are kept alive and answer requests in order.
//! - Server: [`Server::http`](crate::Server::http) answers HTTP beside the binary protocol
//!   on one port; the first bytes of each connection tell them apart (every binary frame
//!   opens with `GR`, an HTTP request with a method name). Requests go through the same
//!   interceptors to the same [`Service`](crate::Service).
//! - Client: [`Client::http`](crate::Client::http), or an [`HttpChannel`] behind
//!   [`Client::from_channel`](crate::Client::from_channel).
//! - JSON: a JSON body is translated at the edge into the method's own codec and the
//!   answer back, as [`Service::schema`](crate::Service::schema) describes the method
//!   (msgpack methods take any JSON value; protobuf methods use protobuf's JSON mapping
//!   through their descriptors). Handlers never see JSON. Methods without a schema get the
//!   JSON bytes as they are, with codec id [`JSON`](gorpc_proto::codec::JSON).

pub(crate) mod body;
mod client;
pub(crate) mod rt;
pub(crate) mod server;
pub(crate) mod transcode;

pub use client::{HttpChannel, HttpTarget};
pub(crate) use server::{serve_sniffed, Accepted, HttpShared};
pub use server::{GetHandler, HttpConfig};

/// The request and response types of GET endpoints ([`crate::Server::get`]), from the
/// `http` crate that hyper, tower and the rest of the ecosystem share.
pub use ::http::{Request, Response, StatusCode};

use bytes::{BufMut, BytesMut};
use gorpc_proto::{codec, Code};

/// Response header: the call's status code in gRPC numbering (0 is OK), on every response.
pub const STATUS_HEADER: &str = "x-gorpc-status";
/// Response header: the status message, percent-encoded outside printable ASCII; on every
/// response, empty on success.
pub const MESSAGE_HEADER: &str = "x-gorpc-message";
/// Request header: how long the client waits, in whole milliseconds.
pub const TIMEOUT_HEADER: &str = "x-gorpc-timeout-ms";
/// Each metadata entry travels as a header named this prefix and its key, both ways.
/// Header names ignore case, so keys arrive lowercased.
pub const METADATA_PREFIX: &str = "x-gorpc-md-";

/// Request header with the standard credentials; it reaches handlers as the metadata
/// entry `authorization`, as gRPC carries it.
pub const AUTHORIZATION_METADATA: &str = "authorization";

/// The body formats HTTP bodies may come in, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContentType {
    Protobuf,
    MsgPack,
    Json,
    /// Raw bytes, for the [`Raw`](crate::Raw) codec.
    OctetStream,
}

/// What a server accepts, for the message of a 415.
const ACCEPTED_CONTENT_TYPES: &str = "application/protobuf (or application/x-protobuf), \
     application/msgpack (or application/x-msgpack), application/json, application/octet-stream";

impl ContentType {
    /// Reads a `Content-Type` value, ignoring parameters (`; charset=utf-8`) and case.
    fn parse(value: &[u8]) -> Option<ContentType> {
        const NAMES: [(&str, ContentType); 6] = [
            ("application/protobuf", ContentType::Protobuf),
            ("application/x-protobuf", ContentType::Protobuf),
            ("application/msgpack", ContentType::MsgPack),
            ("application/x-msgpack", ContentType::MsgPack),
            ("application/json", ContentType::Json),
            ("application/octet-stream", ContentType::OctetStream),
        ];
        let essence = value.split(|&b| b == b';').next()?.trim_ascii();
        NAMES
            .iter()
            .find(|(name, _)| essence.eq_ignore_ascii_case(name.as_bytes()))
            .map(|&(_, content_type)| content_type)
    }

    fn from_codec(id: u8) -> Option<ContentType> {
        match id {
            codec::PROTOBUF => Some(ContentType::Protobuf),
            codec::MSGPACK => Some(ContentType::MsgPack),
            codec::JSON => Some(ContentType::Json),
            codec::RAW => Some(ContentType::OctetStream),
            _ => None,
        }
    }

    fn codec(self) -> u8 {
        match self {
            ContentType::Protobuf => codec::PROTOBUF,
            ContentType::MsgPack => codec::MSGPACK,
            ContentType::Json => codec::JSON,
            ContentType::OctetStream => codec::RAW,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ContentType::Protobuf => "application/protobuf",
            ContentType::MsgPack => "application/msgpack",
            ContentType::Json => "application/json",
            ContentType::OctetStream => "application/octet-stream",
        }
    }
}

/// The HTTP status a response with status `code` carries.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound | Code::Unimplemented => 404,
        Code::ResourceExhausted => 429,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// The status code of an answer that lacks [`STATUS_HEADER`] (a proxy's own error page,
/// say), guessed from its HTTP status as gRPC does for HTTP errors.
pub(crate) fn code_for_http_status(status: u16) -> Code {
    match status {
        200..=299 => Code::Ok,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Writes `message` as a header value: printable ASCII as is, every other byte (and `%`)
/// as `%XX`, so any message fits on one header line.
pub(crate) fn put_percent_encoded(out: &mut BytesMut, message: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in message.as_bytes() {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            out.put_u8(b);
        } else {
            out.put_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
}

/// Undoes [`put_percent_encoded`]; a `%` not followed by two hex digits stays as it is.
pub(crate) fn percent_decode(raw: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(hi), Some(lo)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `name` is an HTTP token, as header names must be.
fn is_token(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `value` survives as a header value: no control bytes, and no surrounding
/// whitespace (which HTTP strips).
fn is_header_value(value: &[u8]) -> bool {
    let clean = value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80);
    let trimmed =
        !matches!(value.first(), Some(b' ' | b'\t')) && !matches!(value.last(), Some(b' ' | b'\t'));
    clean && trimmed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_ignore_case_and_parameters() {
        let parse = ContentType::parse;
        assert_eq!(
            parse(b"application/JSON; charset=utf-8"),
            Some(ContentType::Json)
        );
        assert_eq!(
            parse(b"application/x-protobuf"),
            Some(ContentType::Protobuf)
        );
        assert_eq!(parse(b" application/msgpack "), Some(ContentType::MsgPack));
        assert_eq!(parse(b"text/plain"), None);
        assert_eq!(parse(b""), None);
    }

    #[test]
    fn messages_round_trip_through_percent_encoding() {
        for message in [
            "",
            "plain text",
            "100% sure",
            "line\r\nbreak",
            "naïve ✓",
            "%zz%4",
        ] {
            let mut out = BytesMut::new();
            put_percent_encoded(&mut out, message);
            assert!(is_header_value(&out) || out.is_empty(), "{out:?}");
            assert!(out.iter().all(|&b| (b' '..=b'~').contains(&b)));
            assert_eq!(percent_decode(&out), message);
        }
    }

    #[test]
    fn header_values_must_survive_the_trip() {
        assert!(is_header_value(b"Bearer abc"));
        assert!(is_header_value("ünï".as_bytes()));
        assert!(!is_header_value(b"a\r\nb"));
        assert!(!is_header_value(b" padded"));
        assert!(!is_header_value(b"nul\0"));
        assert!(is_token(b"x-trace-id"));
        assert!(!is_token(b"has space"));
        assert!(!is_token(b""));
    }
}
