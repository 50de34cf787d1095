//! Message codecs. A codec turns messages of a type into body bytes and back; its id travels
//! in every frame so the receiver knows how to read the body.

use bytes::{BufMut, Bytes, BytesMut};
use gorpc_proto::{codec as ids, Code, Status};

/// Encodes and decodes messages of type `T`. Implement it for your own codec, with an id of
/// [`gorpc_proto::codec::FIRST_USER`] or above.
pub trait Codec<T>: Send + Sync + 'static {
    /// The id carried in each frame.
    fn id(&self) -> u8;

    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status>;

    fn decode(&self, body: Bytes) -> Result<T, Status>;

    /// A name for error messages.
    fn name(&self) -> &'static str;

    /// Encodes `message` into a new buffer.
    fn encode_to_bytes(&self, message: &T) -> Result<Bytes, Status> {
        let mut buf = BytesMut::new();
        self.encode(message, &mut buf)?;
        Ok(buf.freeze())
    }
}

/// Protocol Buffers, via prost.
#[derive(Clone, Copy, Debug, Default)]
pub struct Protobuf;

impl<T: prost::Message + Default> Codec<T> for Protobuf {
    fn id(&self) -> u8 {
        ids::PROTOBUF
    }

    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status> {
        buf.reserve(message.encoded_len());
        message
            .encode(buf)
            .map_err(|e| Status::new(Code::Internal, format!("protobuf encode: {e}")))
    }

    fn decode(&self, body: Bytes) -> Result<T, Status> {
        T::decode(body)
            .map_err(|e| Status::new(Code::InvalidArgument, format!("protobuf decode: {e}")))
    }

    fn name(&self) -> &'static str {
        "protobuf"
    }
}

/// MessagePack via rmp-serde, with struct fields by name so that both sides may add fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct MsgPack;

impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for MsgPack {
    fn id(&self) -> u8 {
        ids::MSGPACK
    }

    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status> {
        let mut ser = rmp_serde::Serializer::new(buf.writer()).with_struct_map();
        message
            .serialize(&mut ser)
            .map_err(|e| Status::new(Code::Internal, format!("msgpack encode: {e}")))
    }

    fn decode(&self, body: Bytes) -> Result<T, Status> {
        rmp_serde::from_slice(&body)
            .map_err(|e| Status::new(Code::InvalidArgument, format!("msgpack decode: {e}")))
    }

    fn name(&self) -> &'static str {
        "msgpack"
    }
}

/// The body as it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn id(&self) -> u8 {
        ids::RAW
    }

    fn encode(&self, message: &Bytes, buf: &mut BytesMut) -> Result<(), Status> {
        buf.extend_from_slice(message);
        Ok(())
    }

    fn decode(&self, body: Bytes) -> Result<Bytes, Status> {
        Ok(body)
    }

    fn name(&self) -> &'static str {
        "raw"
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
