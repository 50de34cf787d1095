//! Property tests, run by plain `cargo test` on stable. The fuzz targets (fuzz/) explore the
//! same functions with coverage guidance; these sample them on every test run.

use gorpc_proto::head::{
    encode_request_head, encode_response_head, RequestHeadRef, ResponseHeadRef,
};
use gorpc_proto::sim::{ops_from_bytes, run_ops, targets};
use gorpc_proto::{ConnConfig, Limits};
use proptest::prelude::*;

/// The head schema of docs/PROTOCOL.md, as prost derives it: the reference encoding.
mod schema {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Entry {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct RequestHead {
        #[prost(string, tag = "1")]
        pub method: String,
        #[prost(uint64, tag = "2")]
        pub timeout_micros: u64,
        #[prost(message, repeated, tag = "3")]
        pub metadata: Vec<Entry>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct ResponseHead {
        #[prost(uint32, tag = "1")]
        pub code: u32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub metadata: Vec<Entry>,
    }

    /// A later version of the request head with a field this version does not know.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct RequestHeadV2 {
        #[prost(string, tag = "1")]
        pub method: String,
        #[prost(uint64, tag = "2")]
        pub timeout_micros: u64,
        #[prost(message, repeated, tag = "3")]
        pub metadata: Vec<Entry>,
        #[prost(string, tag = "9")]
        pub future: String,
        #[prost(fixed64, tag = "10")]
        pub future_fixed: u64,
    }
}

use prost::Message;

fn metadata() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec((".{0,12}", prop::collection::vec(any::<u8>(), 0..24)), 0..6)
}

fn entries(m: &[(String, Vec<u8>)]) -> Vec<schema::Entry> {
    m.iter()
        .map(|(k, v)| schema::Entry {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

fn pairs(m: &[(String, Vec<u8>)]) -> impl Iterator<Item = (&str, &[u8])> {
    m.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn request_head_is_byte_identical_to_prost(method in ".{1,40}", timeout in any::<u64>(), meta in metadata()) {
        let mut ours = Vec::new();
        encode_request_head(&method, timeout, pairs(&meta), &mut ours);
        let reference = schema::RequestHead { method: method.clone(), timeout_micros: timeout, metadata: entries(&meta) };
        prop_assert_eq!(&ours, &reference.encode_to_vec());
        let decoded = RequestHeadRef::decode(&ours).unwrap();
        prop_assert_eq!(decoded.method, method.as_str());
        prop_assert_eq!(decoded.timeout_micros, timeout);
        prop_assert!(decoded.metadata().eq(pairs(&meta)));
    }

    #[test]
    fn response_head_is_byte_identical_to_prost(code in any::<u32>(), message in ".{0,40}", meta in metadata()) {
        let mut ours = Vec::new();
        encode_response_head(code, &message, pairs(&meta), &mut ours);
        let reference = schema::ResponseHead { code, message: message.clone(), metadata: entries(&meta) };
        prop_assert_eq!(&ours, &reference.encode_to_vec());
        let decoded = ResponseHeadRef::decode(&ours).unwrap();
        prop_assert_eq!((decoded.code, decoded.message), (code, message.as_str()));
        prop_assert!(decoded.metadata().eq(pairs(&meta)));
    }

    #[test]
    fn unknown_head_fields_are_skipped(method in ".{1,40}", meta in metadata(), future in ".{0,20}", fixed in any::<u64>()) {
        let later = schema::RequestHeadV2 { method: method.clone(), timeout_micros: 5, metadata: entries(&meta), future, future_fixed: fixed };
        let bytes = later.encode_to_vec();
        let decoded = RequestHeadRef::decode(&bytes).unwrap();
        prop_assert_eq!(decoded.method, method.as_str());
        prop_assert!(decoded.metadata().eq(pairs(&meta)));
    }

    #[test]
    fn head_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = RequestHeadRef::decode(&bytes).map(|h| h.metadata().count());
        let _ = ResponseHeadRef::decode(&bytes).map(|h| h.metadata().count());
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        targets::frame_decode(&bytes);
        targets::client_read(&bytes);
        targets::server_read(&bytes);
    }

    #[test]
    fn pair_invariants_hold_for_any_operation_sequence(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        targets::pair_ops(&bytes);
    }

    #[test]
    fn pair_invariants_hold_with_default_limits(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let outcome = run_ops(&ops_from_bytes(&bytes), ConnConfig::default());
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

/// A hand-picked sequence touching every operation, so the model itself is known to see
/// successes, failures, cancels and drains (a model that saw nothing would pass anything).
#[test]
fn the_model_sees_every_kind_of_outcome() {
    use gorpc_proto::sim::Op::*;
    let ops = [
        Start {
            body_len: 10,
            timeout_ms: None,
            metadata: true,
        },
        Start {
            body_len: 3000,
            timeout_ms: Some(50),
            metadata: false,
        },
        Start {
            body_len: 0,
            timeout_ms: Some(10),
            metadata: false,
        },
        Start {
            body_len: 5,
            timeout_ms: None,
            metadata: false,
        },
        Pump,
        Respond {
            pick: 1,
            fail: false,
        },
        Respond {
            pick: 0,
            fail: true,
        },
        Cancel { pick: 1 },
        Advance { ms: 20 },
        Deliver { bytes: 7 },
        Pump,
        // A call started before the go-away arrives is still served...
        Start {
            body_len: 2,
            timeout_ms: None,
            metadata: false,
        },
        ServerGoAway,
        Start {
            body_len: 3,
            timeout_ms: None,
            metadata: false,
        },
        Pump,
        // ...one started after it is refused.
        Start {
            body_len: 1,
            timeout_ms: None,
            metadata: false,
        },
        Pump,
    ];
    let limits = Limits {
        max_concurrent_calls: 8,
        ..Limits::default()
    };
    let outcome = run_ops(
        &ops,
        ConnConfig {
            limits,
            ..ConnConfig::default()
        },
    )
    .unwrap();
    assert_eq!(outcome.started, 6);
    assert_eq!(outcome.rejected, 1, "no new call after go-away");
    assert!(
        outcome.ok >= 1 && outcome.failed >= 2 && outcome.cancelled == 1,
        "{outcome:?}"
    );
}

/// The protocol's initial windows, small enough that streams stall for credit.
fn small_windows() -> ConnConfig {
    ConnConfig {
        stream_window: gorpc_proto::flow::INITIAL_STREAM_WINDOW,
        connection_window: gorpc_proto::flow::INITIAL_CONNECTION_WINDOW,
        ..ConnConfig::default()
    }
}

/// The same for streams: messages both ways, refusals for lack of credit and the
/// `Writable` that follows, half-closes, a cancel and a deadline mid-stream.
#[test]
fn the_model_sees_streams_flow_and_stall() {
    let outcome = run_ops(&stream_ops(1), small_windows()).unwrap();
    assert_eq!((outcome.started, outcome.streams), (5, 4));
    assert!(
        outcome.messages > 30
            && outcome.no_credit > 0
            && outcome.writable > 0
            && outcome.half_closed >= 1
            && outcome.cancelled == 1
            && outcome.protocol_errors == 0,
        "{outcome:?}"
    );
}

/// The same with messages sent in batches of three: partly sent for lack of credit, the
/// rest after the `Writable`, every message once and in order (the model checks each).
#[test]
fn the_model_sees_batched_streams_flow_and_stall() {
    let outcome = run_ops(&stream_ops(3), small_windows()).unwrap();
    assert_eq!((outcome.started, outcome.streams), (5, 4));
    assert!(
        outcome.messages > 30
            && outcome.no_credit > 0
            && outcome.writable > 0
            && outcome.cancelled == 1
            && outcome.protocol_errors == 0,
        "{outcome:?}"
    );
}

/// Streams of every kind, more than a window of messages each way (`batch` at a time)
/// with nobody releasing, then releases, a half-close, a cancel and a deadline.
fn stream_ops(batch: u8) -> Vec<gorpc_proto::sim::Op> {
    use gorpc_proto::sim::Op::*;
    use gorpc_proto::StreamKind::*;
    let mut ops = vec![
        StartStream {
            kind: ServerStreaming,
            timeout_ms: None,
        },
        StartStream {
            kind: ClientStreaming,
            timeout_ms: None,
        },
        StartStream {
            kind: Bidirectional,
            timeout_ms: Some(400),
        },
        StartStream {
            kind: Bidirectional,
            timeout_ms: None,
        },
        Start {
            body_len: 10,
            timeout_ms: None,
            metadata: false,
        },
        Pump,
    ];
    // More than a window each way, nobody releasing.
    for i in 0..40 {
        ops.push(ServerSend {
            pick: 0,
            len: 4000,
            batch,
        });
        ops.push(ClientSend {
            pick: i % 2,
            len: 4000,
            end: false,
            batch,
        });
        ops.push(Deliver { bytes: 9000 });
    }
    ops.extend([
        Pump,
        Release {
            client: true,
            pick: 0,
            bytes: 60_000,
        },
        Release {
            client: false,
            pick: 1,
            bytes: 60_000,
        },
        Pump,
        CloseSend { pick: 0 },
        Cancel { pick: 3 },
        Pump,
        Advance { ms: 500 },
        Pump,
    ]);
    ops
}
