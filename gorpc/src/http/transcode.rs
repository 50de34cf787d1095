//! JSON at the HTTP edge: a JSON request body becomes the method's own codec before the
//! handler sees it, and the handler's answer becomes JSON again.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use gorpc_proto::{Code, Status};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};

use crate::service::MethodSchema;

/// The msgpack encoding of `nil`: what an empty JSON body means to a msgpack method (the
/// body of a method without arguments).
const MSGPACK_NIL: u8 = 0xc0;

/// Descriptor pools decoded from [`MethodSchema::Protobuf`] descriptor sets, once each,
/// shared by one server's connections.
#[derive(Debug, Default)]
pub(crate) struct Descriptors {
    /// By the address and length of the `'static` encoded set.
    pools: Mutex<HashMap<(usize, usize), DescriptorPool>>,
}

impl Descriptors {
    fn message(&self, descriptors: &'static [u8], name: &str) -> Result<MessageDescriptor, Status> {
        let key = (descriptors.as_ptr() as usize, descriptors.len());
        let pool = {
            // A panic elsewhere cannot leave the map half-written: insert is the only change.
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            match pools.get(&key) {
                Some(pool) => pool.clone(),
                None => {
                    let pool = DescriptorPool::decode(descriptors).map_err(|e| {
                        Status::new(
                            Code::Internal,
                            format!("the method's protobuf descriptors do not decode: {e}"),
                        )
                    })?;
                    pools.insert(key, pool.clone());
                    pool
                }
            }
        };
        pool.get_message_by_name(name).ok_or_else(|| {
            Status::new(
                Code::Internal,
                format!("message {name} is missing from the method's protobuf descriptors"),
            )
        })
    }
}

/// A JSON request body in the method's own codec. Errors are the client's
/// (`InvalidArgument`), except for broken descriptors.
pub(crate) fn json_to_native(
    descriptors: &Descriptors,
    schema: &MethodSchema,
    json: &[u8],
) -> Result<Bytes, Status> {
    let invalid = |e: &dyn std::fmt::Display| {
        Status::new(
            Code::InvalidArgument,
            format!("request body is not valid JSON for this method: {e}"),
        )
    };
    let blank = json.trim_ascii().is_empty();
    match *schema {
        MethodSchema::MsgPack => {
            if blank {
                return Ok(Bytes::from_static(&[MSGPACK_NIL]));
            }
            let mut out = BytesMut::with_capacity(json.len()).writer();
            let mut from = serde_json::Deserializer::from_slice(json);
            let mut to = rmp_serde::Serializer::new(&mut out).with_struct_map();
            serde_transcode::transcode(&mut from, &mut to).map_err(|e| invalid(&e))?;
            from.end().map_err(|e| invalid(&e))?;
            Ok(out.into_inner().freeze())
        }
        MethodSchema::Protobuf {
            descriptors: set,
            input,
            ..
        } => {
            let desc = descriptors.message(set, input)?;
            if blank {
                return Ok(Bytes::new());
            }
            let mut from = serde_json::Deserializer::from_slice(json);
            let message = DynamicMessage::deserialize_with_options(
                desc,
                &mut from,
                &DeserializeOptions::new(),
            )
            .map_err(|e| {
                Status::new(
                    Code::InvalidArgument,
                    format!("request body is not a valid {input} in JSON: {e}"),
                )
            })?;
            from.end().map_err(|e| invalid(&e))?;
            let mut out = BytesMut::with_capacity(message.encoded_len());
            message
                .encode(&mut out)
                .map_err(|e| Status::new(Code::Internal, format!("protobuf encode: {e}")))?;
            Ok(out.freeze())
        }
    }
}

/// A handler's answer, in the method's own codec, as JSON. Errors are the server's
/// (`Internal`): its handler answered something its schema does not describe.
pub(crate) fn native_to_json(
    descriptors: &Descriptors,
    schema: &MethodSchema,
    body: &[u8],
) -> Result<Bytes, Status> {
    let failed = |e: &dyn std::fmt::Display| {
        Status::new(
            Code::Internal,
            format!("the answer does not translate to JSON: {e}"),
        )
    };
    let mut out = BytesMut::with_capacity(body.len() * 2 + 16).writer();
    match *schema {
        MethodSchema::MsgPack => {
            let mut from = rmp_serde::Deserializer::from_read_ref(body);
            let mut to = serde_json::Serializer::new(&mut out);
            serde_transcode::transcode(&mut from, &mut to).map_err(|e| failed(&e))?;
        }
        MethodSchema::Protobuf {
            descriptors: set,
            output,
            ..
        } => {
            let desc = descriptors.message(set, output)?;
            let message = DynamicMessage::decode(desc, body).map_err(|e| failed(&e))?;
            let mut to = serde_json::Serializer::new(&mut out);
            message
                .serialize_with_options(&mut to, &SerializeOptions::new())
                .map_err(|e| failed(&e))?;
        }
    }
    Ok(out.into_inner().freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_msgpack_translate_both_ways() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Greeting {
            name: String,
            times: u32,
        }
        let descriptors = Descriptors::default();
        let json = br#"{"name":"gorpc","times":3}"#;
        let native = json_to_native(&descriptors, &MethodSchema::MsgPack, json).unwrap();
        let greeting: Greeting = rmp_serde::from_slice(&native).unwrap();
        assert_eq!(
            greeting,
            Greeting {
                name: "gorpc".into(),
                times: 3
            }
        );
        let back = native_to_json(&descriptors, &MethodSchema::MsgPack, &native).unwrap();
        assert_eq!(&back[..], &json[..]);

        let empty = json_to_native(&descriptors, &MethodSchema::MsgPack, b" ").unwrap();
        let () = rmp_serde::from_slice(&empty).unwrap();
        let err = json_to_native(&descriptors, &MethodSchema::MsgPack, b"{\"a\":").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = json_to_native(&descriptors, &MethodSchema::MsgPack, b"1 2").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "trailing values refused");
    }
}
