//! Several stream messages of one call in one MESSAGE frame (flag BATCH): each message is a
//! 4-byte big-endian length and that many bytes, back to back, filling the body exactly.
//!
//! A sender producing many small messages frames them once per batch instead of once per
//! message, and sends the bytes it already holds without copying them; a receiver splits a
//! batch without looking anything up per message. Flow control counts the whole body, and
//! a batch follows the per-message rule: each message in it starts while both windows are
//! above zero.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::ProtoError;

/// Bytes in front of each message of a batch.
pub const LENGTH_PREFIX: usize = 4;

/// Why [`push_message`] appended nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<E> {
    /// The encoder failed.
    Encode(E),
    /// The message is over 4 GiB: no length can say so, and no frame could carry it.
    TooLong,
}

/// Appends one message to `messages`, a buffer of batched messages: the length, then the
/// body that `encode` appends. Nothing stays if it fails.
pub fn push_message<E>(
    messages: &mut BytesMut,
    encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
) -> Result<(), PushError<E>> {
    let start = messages.len();
    messages.extend_from_slice(&[0; LENGTH_PREFIX]);
    let encoded = encode(messages).map_err(PushError::Encode).and_then(|()| {
        u32::try_from(messages.len() - start - LENGTH_PREFIX).map_err(|_| PushError::TooLong)
    });
    match encoded {
        Ok(len) => {
            messages[start..start + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            messages.truncate(start);
            Err(e)
        }
    }
}

/// The length of the message at the front of `messages`, if its prefix is there.
pub(crate) fn length_at(messages: &[u8]) -> Option<usize> {
    let prefix: [u8; LENGTH_PREFIX] = messages.get(..LENGTH_PREFIX)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

/// How many messages a received batch holds; `Err` unless the lengths fill it exactly with
/// at least one message.
pub(crate) fn count(mut body: &[u8]) -> Result<usize, ProtoError> {
    let mut n = 0;
    while !body.is_empty() {
        let len = length_at(body).ok_or(ProtoError::MalformedMessage(
            "a batch ends inside a message length",
        ))?;
        body = body
            .get(LENGTH_PREFIX + len..)
            .ok_or(ProtoError::MalformedMessage(
                "a batched message runs past the end of its frame",
            ))?;
        n += 1;
    }
    if n == 0 {
        return Err(ProtoError::MalformedMessage("an empty batch"));
    }
    Ok(n)
}

/// Takes the first message off a batch already checked by [`count`]; `None` once it is
/// empty.
pub(crate) fn split_first(body: &mut Bytes) -> Option<Bytes> {
    let len = length_at(body)?;
    body.advance(LENGTH_PREFIX);
    Some(body.split_to(len))
}

/// The messages of a batch already checked by [`count`], in order.
pub(crate) fn split(mut body: Bytes) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || split_first(&mut body))
}

/// The messages a MESSAGE frame's `body` carries: those of a checked batch, the body
/// itself, or none (a bare half-close).
pub(crate) fn messages(body: Bytes, batched: bool, message: bool) -> impl Iterator<Item = Bytes> {
    let (single, batch) = match (batched, message) {
        (true, _) => (None, Some(body)),
        (false, true) => (Some(body), None),
        (false, false) => (None, None),
    };
    single.into_iter().chain(batch.into_iter().flat_map(split))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_messages_count_and_split_back() {
        let mut messages = BytesMut::new();
        for body in [&b"one"[..], b"", &[7; 300]] {
            push_message(&mut messages, |buf| {
                buf.extend_from_slice(body);
                Ok::<_, ()>(())
            })
            .unwrap();
        }
        assert_eq!(
            push_message(&mut messages, |buf| {
                buf.extend_from_slice(b"partial");
                Err("codec failed")
            }),
            Err(PushError::Encode("codec failed"))
        );
        let body = messages.freeze();
        assert_eq!(count(&body), Ok(3));
        let split: Vec<Bytes> = split(body).collect();
        assert_eq!(split, vec![&b"one"[..], b"", &[7; 300][..]]);
    }

    #[test]
    fn lengths_must_fill_the_body_exactly() {
        assert!(count(b"").is_err(), "empty");
        assert!(count(&[0, 0, 0]).is_err(), "a cut length");
        assert!(count(&[0, 0, 0, 2, 1]).is_err(), "a cut message");
        assert!(count(&[0, 0, 0, 1, 9, 0]).is_err(), "a trailing byte");
        assert_eq!(count(&[0, 0, 0, 0, 0, 0, 0, 1, 5]), Ok(2));
    }
}
