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

    /// Encodes `message` into a new buffer.
    fn encode_to_bytes(&self, message: &T) -> Result<Bytes, Status> {
        let mut buf = BytesMut::new();
        self.encode(message, &mut buf)?;
        Ok(buf.freeze())
    }
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
