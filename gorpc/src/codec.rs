//! Message codecs. A codec turns messages of a type into body bytes and back; its id travels
//! in every frame so the receiver knows how to read the body.

use bytes::{BufMut, Bytes, BytesMut};
use gorpc_proto::{codec as ids, Status};

/// Turns messages of type `T` into body bytes. A caller needs it for its requests, a
/// server for its responses.
pub trait Encoder<T>: Send + Sync + 'static {
    /// The id carried in each frame.
    fn id(&self) -> u8;

    /// A name for error messages.
    fn name(&self) -> &'static str;

    /// Appends `message`, encoded, to `buf`; the built-in codecs fail with `Internal`.
    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status>;

    /// Encodes `message` into bytes of its own: a slice of a block the thread encodes
    /// into, so that a small message costs no allocation (a buffer of its own would cost
    /// one, its growth more, and its conversion to `Bytes` one more).
    fn encode_to_bytes(&self, message: &T) -> Result<Bytes, Status> {
        ENCODE_BLOCK.with(|block| {
            // Taken, not borrowed: an encoder that encodes again inside gets a fresh block.
            let mut buf = block.take();
            if buf.capacity() - buf.len() < ENCODE_BLOCK_MIN_ROOM {
                // Reuses the block in place once every message cut from it was dropped.
                buf.reserve(ENCODE_BLOCK_LEN);
            }
            let encoded = self
                .encode(message, &mut buf)
                .map(|()| buf.split().freeze());
            buf.clear();
            block.set(buf);
            encoded
        })
    }
}

/// The size of the blocks messages are encoded into, and the room below which a block is
/// replaced before encoding (a message that needs more grows it).
const ENCODE_BLOCK_LEN: usize = 8 * 1024;
const ENCODE_BLOCK_MIN_ROOM: usize = 512;

thread_local! {
    static ENCODE_BLOCK: std::cell::Cell<BytesMut> = std::cell::Cell::new(BytesMut::new());
}

/// Turns body bytes back into messages of type `T`. A caller needs it for its responses,
/// a server for its requests.
pub trait Decoder<T>: Send + Sync + 'static {
    /// The id carried in each frame; the same as the encoder's of a codec that has both.
    fn id(&self) -> u8;

    /// A name for error messages.
    fn name(&self) -> &'static str;

    /// Decodes one whole message; the built-in codecs fail with `InvalidArgument`.
    fn decode(&self, body: Bytes) -> Result<T, Status>;
}

/// Both halves for one type: what a method whose requests and responses share a type
/// needs. Implemented for every type that is an [`Encoder<T>`] and a [`Decoder<T>`]; to
/// write your own codec, implement those two, with an id of
/// [`gorpc_proto::codec::FIRST_USER`] or above.
///
/// Calls and routes ask only for the half each side uses: `Encoder<Req> + Decoder<Rsp>` on
/// a client, `Decoder<Req> + Encoder<Rsp>` on a server.
pub trait Codec<T>: Encoder<T> + Decoder<T> {}

impl<T, C: Encoder<T> + Decoder<T>> Codec<T> for C {}

/// Protocol Buffers, via prost.
#[derive(Clone, Copy, Debug, Default)]
pub struct Protobuf;

impl<T: prost::Message> Encoder<T> for Protobuf {
    fn id(&self) -> u8 {
        ids::PROTOBUF
    }

    fn name(&self) -> &'static str {
        "protobuf"
    }

    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status> {
        buf.reserve(message.encoded_len());
        message
            .encode(buf)
            .map_err(|e| Status::internal(format!("protobuf encode: {e}")).with_source(e))
    }
}

impl<T: prost::Message + Default> Decoder<T> for Protobuf {
    fn id(&self) -> u8 {
        ids::PROTOBUF
    }

    fn name(&self) -> &'static str {
        "protobuf"
    }

    fn decode(&self, body: Bytes) -> Result<T, Status> {
        T::decode(body)
            .map_err(|e| Status::invalid_argument(format!("protobuf decode: {e}")).with_source(e))
    }
}

/// MessagePack via rmp-serde, with struct fields by name so that both sides may add fields.
/// It encodes any `Serialize` type and decodes any `DeserializeOwned` one, so a type that
/// only travels one way needs only that half of serde.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPack;

impl<T: serde::Serialize> Encoder<T> for MsgPack {
    fn id(&self) -> u8 {
        ids::MSGPACK
    }

    fn name(&self) -> &'static str {
        "msgpack"
    }

    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status> {
        let mut ser = rmp_serde::Serializer::new(buf.writer()).with_struct_map();
        message
            .serialize(&mut ser)
            .map_err(|e| Status::internal(format!("msgpack encode: {e}")).with_source(e))
    }
}

impl<T: serde::de::DeserializeOwned> Decoder<T> for MsgPack {
    fn id(&self) -> u8 {
        ids::MSGPACK
    }

    fn name(&self) -> &'static str {
        "msgpack"
    }

    fn decode(&self, body: Bytes) -> Result<T, Status> {
        rmp_serde::from_slice(&body)
            .map_err(|e| Status::invalid_argument(format!("msgpack decode: {e}")).with_source(e))
    }
}

/// The body as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Encoder<Bytes> for Raw {
    fn id(&self) -> u8 {
        ids::RAW
    }

    fn name(&self) -> &'static str {
        "raw"
    }

    fn encode(&self, message: &Bytes, buf: &mut BytesMut) -> Result<(), Status> {
        buf.extend_from_slice(message);
        Ok(())
    }
}

impl Decoder<Bytes> for Raw {
    fn id(&self) -> u8 {
        ids::RAW
    }

    fn name(&self) -> &'static str {
        "raw"
    }

    fn decode(&self, body: Bytes) -> Result<Bytes, Status> {
        Ok(body)
    }
}

/// A readable name for a codec id in error messages.
pub fn id_name(id: u8) -> &'static str {
    match id {
        ids::RAW => "raw",
        ids::PROTOBUF => "protobuf",
        ids::MSGPACK => "msgpack",
        ids::JSON => "json",
        _ if id >= ids::FIRST_USER => "user-defined",
        _ => "reserved",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails after writing part of a message.
    struct HalfThenFail;

    impl Encoder<u8> for HalfThenFail {
        fn id(&self) -> u8 {
            ids::FIRST_USER
        }

        fn name(&self) -> &'static str {
            "half"
        }

        fn encode(&self, _: &u8, buf: &mut BytesMut) -> Result<(), Status> {
            buf.put_slice(b"partial");
            Err(Status::internal("cannot encode"))
        }
    }

    #[test]
    fn messages_cut_from_one_block_stay_whole_and_apart() {
        let big = vec![7u8; 3 * ENCODE_BLOCK_LEN];
        let mut held = Vec::new();
        for i in 0..100u32 {
            let message = (i, "x".repeat(i as usize));
            let bytes = Encoder::encode_to_bytes(&MsgPack, &message).unwrap();
            held.push((message, bytes));
            if i == 50 {
                // Larger than a block: the block grows for it.
                let bytes = Encoder::encode_to_bytes(&MsgPack, &big).unwrap();
                let back: Vec<u8> = Decoder::decode(&MsgPack, bytes).unwrap();
                assert_eq!(back, big);
            }
        }
        assert!(HalfThenFail.encode_to_bytes(&0).is_err());
        // A failed message leaves nothing behind for the next one.
        let after = Encoder::encode_to_bytes(&MsgPack, &(7u32, String::new())).unwrap();
        let back: (u32, String) = Decoder::decode(&MsgPack, after).unwrap();
        assert_eq!(back, (7, String::new()));
        for (message, bytes) in held {
            let back: (u32, String) = Decoder::decode(&MsgPack, bytes).unwrap();
            assert_eq!(back, message);
        }
    }
}
