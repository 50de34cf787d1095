//! gRPC's headers: the deadline (`grpc-timeout`), the status (`grpc-status`,
//! `grpc-message`), the codec in `content-type`, and metadata, with `-bin` keys in base64.

use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use gorpc_proto::{codec, Code, Status};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::metadata::Metadata;

pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";
pub(crate) const GRPC_STATUS: &str = "grpc-status";
pub(crate) const GRPC_MESSAGE: &str = "grpc-message";
pub(crate) const GRPC_ENCODING: &str = "grpc-encoding";
pub(crate) const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";

/// Headers that are gRPC's or HTTP's own, never metadata.
fn is_reserved(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "te"
            | "host"
            | "connection"
            | "content-length"
            | "user-agent"
            | "accept-encoding"
            | GRPC_TIMEOUT
            | GRPC_STATUS
            | GRPC_MESSAGE
            | GRPC_ENCODING
            | GRPC_ACCEPT_ENCODING
    )
}

/// The codec a `content-type` of `application/grpc[+subtype]` names: `Ok(None)` if it is
/// not gRPC at all, `Err` for a subtype gorpc has no codec for.
pub(crate) fn content_codec(value: &[u8]) -> Result<Option<u8>, String> {
    let essence = value
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let Some(rest) = strip_prefix_ignore_case(essence, b"application/grpc") else {
        return Ok(None);
    };
    match rest {
        b"" | b"+proto" => Ok(Some(codec::PROTOBUF)),
        b"+msgpack" => Ok(Some(codec::MSGPACK)),
        b"+json" => Ok(Some(codec::JSON)),
        b"+raw" => Ok(Some(codec::RAW)),
        [b'+', ..] => Err(format!(
            "content-type {:?} names a codec this server does not speak (proto, msgpack, json, raw)",
            String::from_utf8_lossy(value)
        )),
        // "application/grpc-web" and the like are other protocols.
        _ => Ok(None),
    }
}

fn strip_prefix_ignore_case<'a>(value: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// The `content-type` of a call in `codec`.
pub(crate) fn content_type(codec: u8) -> &'static str {
    match codec {
        codec::MSGPACK => "application/grpc+msgpack",
        codec::JSON => "application/grpc+json",
        codec::RAW => "application/grpc+raw",
        _ => "application/grpc",
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout` as a `grpc-timeout` value in the finest unit that fits 8 digits, rounded up
/// so the server never gives up before the client.
pub(crate) fn format_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The metadata a call's headers carry: every header that is not gRPC's or HTTP's own,
/// `-bin` values decoded from base64. A `-bin` value that is not base64 is an error.
pub(crate) fn metadata_of(headers: &HeaderMap) -> Result<Vec<(&str, Bytes)>, Status> {
    let mut entries = Vec::new();
    for (name, value) in headers {
        let key = name.as_str();
        if is_reserved(key) {
            continue;
        }
        let value = if key.ends_with("-bin") {
            Bytes::from(decode_bin(value.as_bytes()).ok_or_else(|| {
                Status::new(
                    Code::InvalidArgument,
                    format!("metadata {key} is not base64"),
                )
            })?)
        } else {
            Bytes::copy_from_slice(value.as_bytes())
        };
        entries.push((key, value));
    }
    Ok(entries)
}

/// Base64 as gRPC allows it: padded or not.
fn decode_bin(value: &[u8]) -> Option<Vec<u8>> {
    let value = value.trim_ascii();
    let trimmed = value
        .strip_suffix(b"==")
        .or_else(|| value.strip_suffix(b"="))
        .unwrap_or(value);
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .ok()
}

/// Adds `metadata` to `headers`: `-bin` values in base64 (unpadded, as gRPC recommends),
/// others as they are. Entries a header cannot carry are refused (`Err`) or, with
/// `lenient`, left out and logged.
pub(crate) fn put_metadata(
    headers: &mut HeaderMap,
    metadata: impl IntoIterator<Item = (impl AsRef<str>, impl AsRef<[u8]>)>,
    lenient: bool,
) -> Result<(), Status> {
    for (key, value) in metadata {
        let (key, value) = (key.as_ref(), value.as_ref());
        let header = HeaderName::from_bytes(key.as_bytes())
            .ok()
            .filter(|name| name.as_str() == key && !is_reserved(key))
            .and_then(|name| {
                let value = if key.ends_with("-bin") {
                    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(value);
                    HeaderValue::from_str(&encoded).ok()
                } else {
                    HeaderValue::from_bytes(value)
                        .ok()
                        .filter(|_| value.iter().all(|b| (b' '..=b'~').contains(b)))
                }?;
                Some((name, value))
            });
        match header {
            Some((name, value)) => {
                headers.append(name, value);
            }
            None if lenient => {
                tracing::warn!(key, "metadata cannot travel as a gRPC header; left out");
            }
            None => {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "metadata {key:?} cannot travel as a gRPC header (keys lowercase tokens, \
                         other than gRPC's own; values printable ASCII, or any bytes under a key \
                         ending in -bin)"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// `grpc-status` and, unless empty, `grpc-message` (percent-encoded).
pub(crate) fn put_status(headers: &mut HeaderMap, status: &Status) {
    headers.insert(GRPC_STATUS, HeaderValue::from(status.code() as u32));
    if !status.message().is_empty() {
        let mut message = BytesMut::new();
        crate::http::put_percent_encoded(&mut message, status.message());
        if let Ok(value) = HeaderValue::from_maybe_shared(message.freeze()) {
            headers.insert(GRPC_MESSAGE, value);
        }
    }
}

/// The status in `headers` (trailers, or the headers of a trailers-only answer), if any.
pub(crate) fn status_of(headers: &HeaderMap) -> Option<Status> {
    let code = headers.get(GRPC_STATUS)?;
    let code = code
        .to_str()
        .ok()
        .and_then(|c| c.trim().parse::<u32>().ok())
        .map(Code::from_u32)
        .unwrap_or(Code::Unknown);
    let message = headers
        .get(GRPC_MESSAGE)
        .map(|m| crate::http::percent_decode(m.as_bytes()))
        .unwrap_or_default();
    let status = Status::new(code, message);
    let pushback = headers
        .get(crate::metadata::RETRY_PUSHBACK)
        .and_then(|ms| ms.to_str().ok()?.trim().parse::<u64>().ok());
    Some(match pushback {
        Some(ms) => status.with_retry_after(std::time::Duration::from_millis(ms)),
        None => status,
    })
}

/// The metadata of answer headers or trailers, into `metadata`.
pub(crate) fn collect_metadata(headers: &HeaderMap, metadata: &mut Metadata) -> Result<(), Status> {
    for (key, value) in metadata_of(headers)? {
        metadata.append(key.to_owned(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_trip_in_the_finest_unit_that_fits() {
        for (d, text) in [
            (Duration::from_millis(250), "250000u"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_secs(2), "2000000u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(86_400 * 365), "31536000S"),
            (Duration::from_secs(86_400 * 365 * 10), "5256000M"),
        ] {
            let value = format_timeout(d);
            assert_eq!(value.to_str().unwrap(), text);
            assert_eq!(parse_timeout(value.as_bytes()), Some(d));
        }
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        for bad in [&b""[..], b"S", b"10", b"123456789S", b"1x", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn content_types_name_codecs() {
        assert_eq!(
            content_codec(b"application/grpc"),
            Ok(Some(codec::PROTOBUF))
        );
        assert_eq!(
            content_codec(b"application/grpc+proto"),
            Ok(Some(codec::PROTOBUF))
        );
        assert_eq!(
            content_codec(b"application/grpc+msgpack"),
            Ok(Some(codec::MSGPACK))
        );
        assert_eq!(
            content_codec(b"Application/GRPC+json; charset=utf-8"),
            Ok(Some(codec::JSON))
        );
        assert_eq!(content_codec(b"application/json"), Ok(None));
        assert_eq!(content_codec(b"application/grpc-web"), Ok(None));
        assert!(content_codec(b"application/grpc+thrift").is_err());
    }

    #[test]
    fn metadata_round_trips_with_binary_values_in_base64() {
        let mut headers = HeaderMap::new();
        let entries: Vec<(&str, &[u8])> = vec![
            ("trace-id", b"abc"),
            ("blob-bin", &[0, 159, 146, 150, 255]),
            ("authorization", b"Bearer t"),
        ];
        put_metadata(&mut headers, entries.clone(), false).unwrap();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-timeout", HeaderValue::from_static("1S"));
        assert_eq!(headers.get("blob-bin").unwrap(), "AJ+Slv8");
        let back: Vec<(&str, Bytes)> = metadata_of(&headers).unwrap();
        let back: Vec<(&str, &[u8])> = back.iter().map(|(k, v)| (*k, &v[..])).collect();
        assert_eq!(back, entries);

        // Padded base64 is accepted too; garbage is refused.
        let mut padded = HeaderMap::new();
        padded.insert("x-bin", HeaderValue::from_static("AQI="));
        assert_eq!(
            metadata_of(&padded).unwrap()[0].1,
            Bytes::from_static(&[1, 2])
        );
        padded.insert("x-bin", HeaderValue::from_static("!!"));
        assert!(metadata_of(&padded).is_err());

        let mut out = HeaderMap::new();
        let refused = put_metadata(&mut out, [("Upper", "x")], false).unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(put_metadata(&mut out, [("grpc-status", "0")], false).is_err());
        assert!(put_metadata(&mut out, [("text", "é")], false).is_err());
        put_metadata(&mut out, [("text", "é")], true).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn statuses_travel_percent_encoded() {
        let mut headers = HeaderMap::new();
        let status = Status::new(Code::NotFound, "no such thing: ünïcode 100%");
        put_status(&mut headers, &status);
        assert_eq!(headers.get("grpc-status").unwrap(), "5");
        let back = status_of(&headers).unwrap();
        assert_eq!(back.code(), Code::NotFound);
        assert_eq!(back.message(), status.message());
    }
}
