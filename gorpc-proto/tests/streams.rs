//! Stream calls through both state machines back to back (the `Pair` harness): the four
//! call kinds, flow control, cancel and deadline mid-stream, and malformed stream frames.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use gorpc_proto::flow::{INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW};
use gorpc_proto::frame::{flags, FrameHeader, FrameType};
use gorpc_proto::sim::read;
use gorpc_proto::sim::{Pair, Side};
use gorpc_proto::Conn as _;
use gorpc_proto::{
    codec, CallHead, CallId, CancelReason, ClientEvent, Code, ConnConfig, ProtoError, Request,
    SendError, ServerEvent, Status, StreamKind,
};

/// The protocol's initial windows: small, so that streams stall for credit, and nothing
/// queued before the test's own frames.
fn initial() -> ConnConfig {
    ConnConfig {
        stream_window: gorpc_proto::flow::INITIAL_STREAM_WINDOW,
        connection_window: gorpc_proto::flow::INITIAL_CONNECTION_WINDOW,
        ..ConnConfig::default()
    }
}

fn pair() -> Pair<u64> {
    Pair::new(Instant::now(), initial(), initial())
}

fn open(p: &mut Pair<u64>, kind: StreamKind, request: &[u8], tag: u64) -> CallId {
    let head = CallHead::new("/test.Stream/Call", codec::RAW);
    p.client
        .start_stream(p.now, head, kind, request, tag)
        .unwrap()
}

fn request(p: &mut Pair<u64>) -> Request {
    p.pump().unwrap();
    match p.server_events().pop() {
        Some(ServerEvent::Request(r)) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

/// Client messages, and whether the server saw the half-close.
fn server_messages(p: &mut Pair<u64>) -> (Vec<Bytes>, bool) {
    let mut messages = Vec::new();
    let mut half_closed = false;
    for e in p.server_events() {
        match e {
            ServerEvent::Message { body, .. } => {
                assert!(!half_closed, "message after half-close");
                messages.push(body);
            }
            ServerEvent::HalfClosed { .. } => half_closed = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    (messages, half_closed)
}

/// Server messages, and the final result if the call finished.
#[allow(clippy::type_complexity)]
fn client_messages(
    p: &mut Pair<u64>,
) -> (Vec<Bytes>, Option<Result<gorpc_proto::Response, Status>>) {
    let mut messages = Vec::new();
    let mut finished = None;
    for e in p.client_events() {
        match e {
            ClientEvent::Message { body, .. } => {
                assert!(finished.is_none(), "message after finish");
                messages.push(body);
            }
            ClientEvent::Finished { result, .. } => {
                assert!(finished.is_none(), "finished twice");
                finished = Some(result);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (messages, finished)
}

#[test]
fn server_streaming_end_to_end() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ServerStreaming, b"tail", 1);
    let req = request(&mut p);
    assert_eq!(
        (req.id, &req.body[..], req.client_streams),
        (id, &b"tail"[..], false)
    );
    for m in [&b"one"[..], b"two", b"three"] {
        p.server.send_message(id, m).unwrap();
    }
    assert!(p
        .server
        .respond(p.now, id, &Status::ok(), [("n", &b"3"[..])], &[][..]));
    p.pump().unwrap();
    let (messages, finished) = client_messages(&mut p);
    assert_eq!(messages, [&b"one"[..], b"two", b"three"]);
    let rsp = finished.unwrap().unwrap();
    assert!(rsp.status.is_ok() && rsp.body.is_empty());
    assert_eq!(rsp.head.metadata().collect::<Vec<_>>(), [("n", &b"3"[..])]);
    assert_eq!(
        p.client.send_message(id, &b"x"[..], false),
        Err(SendError::CallGone)
    );
}

#[test]
fn client_streaming_end_to_end() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ClientStreaming, b"", 1);
    let req = request(&mut p);
    assert!(req.client_streams && req.body.is_empty());
    p.client.send_message(id, &b"a"[..], false).unwrap();
    p.client.send_message(id, &b"b"[..], true).unwrap();
    assert_eq!(
        p.client.send_message(id, &b"c"[..], false),
        Err(SendError::SendClosed)
    );
    assert_eq!(p.client.close_send(id), Err(SendError::SendClosed));
    p.pump().unwrap();
    let (messages, half_closed) = server_messages(&mut p);
    assert_eq!(messages, [&b"a"[..], b"b"]);
    assert!(half_closed);
    assert!(p.server.respond(p.now, id, &Status::ok(), [], &b"ab"[..]));
    p.pump().unwrap();
    let (messages, finished) = client_messages(&mut p);
    assert!(messages.is_empty());
    assert_eq!(&finished.unwrap().unwrap().body[..], b"ab");
}

#[test]
fn bidirectional_end_to_end_with_half_close_and_no_final_message() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    request(&mut p);
    for i in 0..10u8 {
        p.client.send_message(id, &[i][..], false).unwrap();
        p.pump().unwrap();
        let (got, half_closed) = server_messages(&mut p);
        assert_eq!((got, half_closed), (vec![Bytes::from(vec![i])], false));
        p.server.send_message(id, vec![i, i]).unwrap();
        p.pump().unwrap();
        let (got, finished) = client_messages(&mut p);
        assert_eq!(got, [Bytes::from(vec![i, i])]);
        assert!(finished.is_none());
    }
    // Half-close without a final message: the server sees the end and nothing else, and
    // can still stream back.
    p.client.close_send(id).unwrap();
    p.pump().unwrap();
    assert_eq!(server_messages(&mut p), (vec![], true));
    p.server.send_message(id, &b"after"[..]).unwrap();
    assert!(p.server.respond(p.now, id, &Status::ok(), [], &[][..]));
    p.pump().unwrap();
    let (got, finished) = client_messages(&mut p);
    assert_eq!(got, [&b"after"[..]]);
    assert!(finished.unwrap().unwrap().status.is_ok());
    assert_eq!(p.client.calls_in_flight() + p.server.calls_in_flight(), 0);
}

#[test]
fn unary_calls_keep_working_and_refuse_stream_operations() {
    let mut p = pair();
    let id = p
        .client
        .start_call(p.now, CallHead::new("/u", codec::RAW), &b"q"[..], 1)
        .unwrap();
    assert_eq!(
        p.client.send_message(id, &b"x"[..], false),
        Err(SendError::SendClosed)
    );
    assert_eq!(p.client.close_send(id), Err(SendError::SendClosed));
    let rejected = p
        .client
        .start_stream(
            p.now,
            CallHead::new("/s", codec::RAW),
            StreamKind::ClientStreaming,
            &b"x"[..],
            2,
        )
        .unwrap_err();
    assert_eq!(
        (rejected.status.code(), rejected.user),
        (Code::InvalidArgument, 2)
    );
    let req = request(&mut p);
    assert!(!req.client_streams);
    assert!(p.server.respond(p.now, id, &Status::ok(), [], req.body));
    p.pump().unwrap();
    assert_eq!(&client_messages(&mut p).1.unwrap().unwrap().body[..], b"q");
}

#[test]
fn a_hundred_thousand_messages_arrive_in_order() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ServerStreaming, b"", 1);
    request(&mut p);
    let total = 100_000u32;
    let (mut sent, mut received) = (0u32, 0u32);
    while received < total {
        while sent < total {
            match p.server.send_message(id, &sent.to_be_bytes()[..]) {
                Ok(()) => sent += 1,
                Err(SendError::NoCredit) => break,
                Err(e) => panic!("{e}"),
            }
        }
        p.pump().unwrap();
        for e in p.client_events() {
            let ClientEvent::Message { body, .. } = e else {
                panic!("unexpected {e:?}")
            };
            assert_eq!(u32::from_be_bytes(body[..].try_into().unwrap()), received);
            received += 1;
            p.client.release(id, body.len());
        }
        p.pump().unwrap();
        for e in p.server_events() {
            assert!(
                matches!(e, ServerEvent::Writable { id: w } if w == id),
                "{e:?}"
            );
        }
    }
    assert!(p.server.respond(p.now, id, &Status::ok(), [], &[][..]));
    p.pump().unwrap();
    assert!(client_messages(&mut p).1.unwrap().is_ok());
}

#[test]
fn a_slow_consumer_bounds_the_producer() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ServerStreaming, b"", 1);
    request(&mut p);
    let message = vec![7u8; 1000];
    let mut sent = 0;
    let refused = loop {
        match p.server.send_message(id, message.clone()) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        p.pump().unwrap();
    };
    assert_eq!(refused, SendError::NoCredit);
    // 64 KiB of credit takes 66 messages of 1000 bytes, the last one overdrawing.
    assert_eq!(sent, 66);
    let window = INITIAL_STREAM_WINDOW as usize;
    let held = p.client.buffered(id).unwrap();
    assert_eq!(held, 66_000);
    assert!(held <= window + message.len());
    assert_eq!(p.client.buffered_bytes(), held);
    // Still refused however long the consumer sleeps.
    p.advance(Duration::from_secs(1));
    p.pump().unwrap();
    assert_eq!(
        p.server.send_message(id, &b"x"[..]),
        Err(SendError::NoCredit)
    );
    assert!(p.server_events().is_empty());
    // Releasing less than half a window returns nothing yet...
    p.client.release(id, 30_000);
    p.pump().unwrap();
    assert!(p.server_events().is_empty());
    // ...half a window or more does, and the producer is told.
    p.client.release(id, 10_000);
    p.pump().unwrap();
    assert!(matches!(p.server_events()[..], [ServerEvent::Writable { id: w }] if w == id));
    assert_eq!(p.client.buffered(id), Some(26_000));
    p.server.send_message(id, message.clone()).unwrap();
    p.pump().unwrap();
    assert_eq!(client_messages(&mut p).0.len(), 66 + 1);
}

#[test]
fn the_connection_window_bounds_all_streams_together() {
    let mut p = pair();
    let ids: Vec<CallId> = (0..20)
        .map(|tag| open(&mut p, StreamKind::ServerStreaming, b"", tag))
        .collect();
    p.pump().unwrap();
    assert_eq!(p.server_events().len(), 20);
    let message = vec![1u8; 16 * 1024];
    let mut sent = 0;
    for &id in &ids {
        while p.server.send_message(id, message.clone()).is_ok() {
            sent += 1;
        }
    }
    // 20 streams could take 20 x 64 KiB; the connection stops them at 1 MiB.
    assert_eq!(sent * message.len(), INITIAL_CONNECTION_WINDOW as usize);
    p.pump().unwrap();
    assert_eq!(
        p.client.buffered_bytes(),
        INITIAL_CONNECTION_WINDOW as usize
    );
    let events = p.client_events();
    for id in &ids {
        p.client.release(*id, usize::MAX);
    }
    drop(events);
    p.pump().unwrap();
    let writable = p.server_events().len();
    assert!(writable > 0, "blocked streams were told credit came back");
    assert_eq!(p.client.buffered_bytes(), 0);
}

#[test]
fn a_larger_configured_window_is_granted_up_front() {
    let config = ConnConfig {
        stream_window: 1 << 20,
        connection_window: 4 << 20,
        ..initial()
    };
    let mut p: Pair<u64> = Pair::new(Instant::now(), config, initial());
    let id = open(&mut p, StreamKind::ServerStreaming, b"", 1);
    request(&mut p);
    let message = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while p.server.send_message(id, message.clone()).is_ok() {
        sent += 1;
    }
    assert_eq!(sent, 16, "1 MiB of stream credit");
}

#[test]
fn a_message_larger_than_the_window_still_gets_through() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ClientStreaming, b"", 1);
    request(&mut p);
    let big = vec![3u8; 200 * 1024];
    p.client.send_message(id, big.clone(), false).unwrap();
    assert_eq!(
        p.client.send_message(id, &b"x"[..], false),
        Err(SendError::NoCredit)
    );
    p.pump().unwrap();
    let (got, _) = server_messages(&mut p);
    assert_eq!(got[0].len(), big.len());
    p.server.release(id, big.len());
    p.pump().unwrap();
    assert!(matches!(p.client_events()[..], [ClientEvent::Writable { id: w }] if w == id));
    p.client.send_message(id, &b"x"[..], true).unwrap();
}

#[test]
fn oversized_messages_are_refused_locally() {
    let config = ConnConfig {
        limits: gorpc_proto::Limits {
            max_frame_len: 1024,
            ..Default::default()
        },
        ..initial()
    };
    let mut p: Pair<u64> = Pair::new(Instant::now(), config, config);
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    request(&mut p);
    assert_eq!(
        p.client.send_message(id, vec![0; 1005], false),
        Err(SendError::TooLarge)
    );
    assert_eq!(
        p.server.send_message(id, vec![0; 1005]),
        Err(SendError::TooLarge)
    );
    p.client.send_message(id, vec![0; 1004], false).unwrap();
    p.pump().unwrap();
}

#[test]
fn cancel_mid_stream_ends_both_sides() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    request(&mut p);
    p.server.send_message(id, &b"1"[..]).unwrap();
    p.client.send_message(id, &b"1"[..], false).unwrap();
    p.pump().unwrap();
    p.client_events();
    p.server_events();
    // The server sends more while the cancel travels: those are dropped as late frames.
    p.server.send_message(id, &b"2"[..]).unwrap();
    assert_eq!(p.client.cancel(id), Some(1));
    assert_eq!(
        p.client.send_message(id, &b"2"[..], false),
        Err(SendError::CallGone)
    );
    assert_eq!(
        p.client.buffered_bytes(),
        0,
        "the cancelled call's bytes went back"
    );
    p.pump().unwrap();
    assert!(p.client_events().is_empty(), "nothing after cancel");
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Cancelled { id: c, reason: CancelReason::Peer }] if c == id
    ));
    assert_eq!(
        p.server.send_message(id, &b"3"[..]),
        Err(SendError::CallGone)
    );
    assert!(!p.server.respond(p.now, id, &Status::ok(), [], &[][..]));
    assert!(
        p.server.poll_transmit().is_none(),
        "no frame for the id goes out"
    );
}

#[test]
fn deadline_mid_stream_ends_both_sides() {
    let mut p = pair();
    let head = CallHead::new("/s", codec::RAW).with_deadline(p.now + Duration::from_millis(100));
    let id = p
        .client
        .start_stream(p.now, head, StreamKind::Bidirectional, &[][..], 1)
        .unwrap();
    let req = request(&mut p);
    assert_eq!(req.deadline, Some(p.now + Duration::from_millis(100)));
    p.server.send_message(id, &b"m"[..]).unwrap();
    p.pump().unwrap();
    assert_eq!(client_messages(&mut p).0.len(), 1);
    p.advance(Duration::from_millis(100));
    let (_, finished) = client_messages(&mut p);
    assert_eq!(
        finished.unwrap().unwrap_err().code(),
        Code::DeadlineExceeded
    );
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Cancelled { id: c, reason: CancelReason::DeadlineExceeded }] if c == id
    ));
    assert_eq!(
        p.server.send_message(id, &b"m"[..]),
        Err(SendError::CallGone)
    );
    p.pump().unwrap();
    assert!(p.server_events().is_empty() && p.client_events().is_empty());
    assert!(p.to_client.is_empty());
}

fn raw_frame(wire: &mut BytesMut, frame_type: FrameType, flags: u8, id: u32, body: &[u8]) {
    FrameHeader {
        frame_type,
        flags,
        codec: codec::RAW,
        call_id: id,
        head_len: 0,
        body_len: body.len() as u32,
    }
    .encode(wire);
    wire.put_slice(body);
}

#[test]
fn a_message_without_credit_is_a_connection_error() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ClientStreaming, b"", 1);
    request(&mut p);
    // A misbehaving client: 64 KiB, then one more message while it has no credit.
    let mut wire = BytesMut::new();
    raw_frame(
        &mut wire,
        FrameType::Message,
        0,
        id.as_u32(),
        &vec![0; 65_536],
    );
    raw_frame(&mut wire, FrameType::Message, 0, id.as_u32(), b"x");
    let err = read(&mut p.server, p.now, &mut wire).unwrap_err();
    assert_eq!(
        err,
        ProtoError::FlowControl {
            call_id: id.as_u32()
        }
    );
    assert!(p.server.is_closed());
}

#[test]
fn malformed_window_updates_are_connection_errors() {
    let cases: [(&[u8], &str); 4] = [
        (&0u32.to_be_bytes(), "increment of 0"),
        (&0x8000_0000u32.to_be_bytes(), "increment over 2^31-1"),
        (&[0, 0, 1], "body must be exactly 4 bytes"),
        (&[0, 0, 0, 1, 0], "body must be exactly 4 bytes"),
    ];
    for (body, why) in cases {
        let mut p = pair();
        let mut wire = BytesMut::new();
        raw_frame(&mut wire, FrameType::WindowUpdate, 0, 0, body);
        let err = read(&mut p.server, p.now, &mut wire).unwrap_err();
        assert_eq!(err, ProtoError::MalformedWindowUpdate(why));
    }
    // Growing a window past 2^31-1.
    let mut p = pair();
    let mut wire = BytesMut::new();
    raw_frame(
        &mut wire,
        FrameType::WindowUpdate,
        0,
        0,
        &0x7fff_ffffu32.to_be_bytes(),
    );
    let err = read(&mut p.client, p.now, &mut wire).unwrap_err();
    assert_eq!(
        err,
        ProtoError::MalformedWindowUpdate("window would exceed 2^31-1")
    );
    assert!(matches!(
        p.client_events().last(),
        Some(ClientEvent::Closed(_))
    ));
}

#[test]
fn late_stream_frames_are_ignored_and_their_credit_returned() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    request(&mut p);
    assert!(p.server.respond(p.now, id, &Status::ok(), [], &[][..]));
    // The client sends before it learns the call ended.
    p.client.send_message(id, vec![0; 40_000], false).unwrap();
    p.client.close_send(id).unwrap();
    p.pump().unwrap();
    assert!(p.server_events().is_empty());
    assert_eq!(p.server.buffered_bytes(), 0);
    // Unknown ids too, in both directions, and credit for them.
    let mut wire = BytesMut::new();
    raw_frame(&mut wire, FrameType::Message, 0, 99, b"late");
    raw_frame(
        &mut wire,
        FrameType::WindowUpdate,
        0,
        99,
        &5u32.to_be_bytes(),
    );
    let mut to_client = wire.clone();
    read(&mut p.server, p.now, &mut wire).unwrap();
    read(&mut p.client, p.now, &mut to_client).unwrap();
    assert!(p.server_events().is_empty());
    assert!(matches!(client_messages(&mut p), (m, Some(Ok(_))) if m.is_empty()));
}

#[test]
fn stream_frames_breaking_the_rules_fail_as_documented() {
    // A client message after its request stream ended: connection error.
    let mut p = pair();
    let id = p
        .client
        .start_call(p.now, CallHead::new("/u", codec::RAW), &b""[..], 1)
        .unwrap();
    request(&mut p);
    let mut wire = BytesMut::new();
    raw_frame(&mut wire, FrameType::Message, 0, id.as_u32(), b"x");
    assert_eq!(
        read(&mut p.server, p.now, &mut wire),
        Err(ProtoError::MessageAfterEndStream(id.as_u32()))
    );

    // NO_MESSAGE with a body, or without END_STREAM: connection error.
    for (flags, body) in [
        (flags::END_STREAM | flags::NO_MESSAGE, &b"x"[..]),
        (flags::NO_MESSAGE, b""),
    ] {
        let mut p = pair();
        let mut wire = BytesMut::new();
        raw_frame(&mut wire, FrameType::Message, flags, 1, body);
        assert!(matches!(
            read(&mut p.server, p.now, &mut wire),
            Err(ProtoError::MalformedMessage(_))
        ));
    }

    // The server streaming to a call the client made unary fails that call only.
    let mut p = pair();
    let unary = p
        .client
        .start_call(p.now, CallHead::new("/u", codec::RAW), &b""[..], 1)
        .unwrap();
    let other = open(&mut p, StreamKind::ServerStreaming, b"", 2);
    p.pump().unwrap();
    p.server_events();
    p.server.send_message(unary, &b"surprise"[..]).unwrap();
    p.server.send_message(other, &b"fine"[..]).unwrap();
    p.pump().unwrap();
    let events = p.client_events();
    assert!(
        matches!(
            &events[..],
            [ClientEvent::Finished { id, result: Err(s), .. }, ClientEvent::Message { id: o, .. }]
                if *id == unary && s.code() == Code::Internal && *o == other
        ),
        "{events:?}"
    );
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Cancelled { id, reason: CancelReason::Peer }] if id == unary
    ));
    assert!(!p.client.is_closed());

    // END_STREAM on a server message: connection error.
    let mut wire = BytesMut::new();
    raw_frame(
        &mut wire,
        FrameType::Message,
        flags::END_STREAM,
        other.as_u32(),
        b"",
    );
    assert!(matches!(
        read(&mut p.client, p.now, &mut wire),
        Err(ProtoError::MalformedMessage(_))
    ));
}

#[test]
fn many_streams_and_unary_calls_interleave_on_one_connection() {
    let mut p = pair();
    let mut streams = Vec::new();
    for tag in 0..50u64 {
        let kind = [
            StreamKind::ServerStreaming,
            StreamKind::ClientStreaming,
            StreamKind::Bidirectional,
        ][tag as usize % 3];
        streams.push((open(&mut p, kind, b"", tag), kind));
        p.client
            .start_call(
                p.now,
                CallHead::new("/u", codec::RAW),
                &tag.to_be_bytes()[..],
                1000 + tag,
            )
            .unwrap();
    }
    p.pump().unwrap();
    let mut unary = Vec::new();
    for e in p.server_events() {
        let ServerEvent::Request(r) = e else { panic!() };
        if r.head.method() == "/u" {
            unary.push(r);
        }
    }
    for round in 0..20u32 {
        for (id, kind) in &streams {
            let body = [&id.as_u32().to_be_bytes()[..], &round.to_be_bytes()[..]].concat();
            if kind.client_streams() {
                p.client
                    .send_message(*id, body.clone(), round == 19)
                    .unwrap();
            }
            if kind.server_streams() {
                p.server.send_message(*id, body).unwrap();
            }
        }
        if let Some(r) = unary.pop() {
            assert!(p.server.respond(p.now, r.id, &Status::ok(), [], r.body));
        }
        p.deliver(997).unwrap();
    }
    p.pump().unwrap();
    let mut next = std::collections::HashMap::new();
    for e in p.server_events() {
        if let ServerEvent::Message { id, body } = e {
            let n = next.entry(id).or_insert(0u32);
            assert_eq!(&body[..4], &id.as_u32().to_be_bytes());
            assert_eq!(&body[4..], &n.to_be_bytes());
            *n += 1;
            p.server.release(id, body.len());
        }
    }
    let mut unary_done = 0;
    for e in p.client_events() {
        match e {
            ClientEvent::Message { id, body } => {
                let n = next.entry(id).or_insert(0u32);
                assert_eq!(
                    &body[4..],
                    &(*n - if streams.iter().any(|(s, k)| *s == id && k.client_streams()) {
                        20
                    } else {
                        0
                    })
                    .to_be_bytes()
                );
                *n += 1;
            }
            ClientEvent::Finished { result, .. } => {
                result.unwrap();
                unary_done += 1;
            }
            _ => {}
        }
    }
    assert_eq!(unary_done, 20);
    assert!(next.values().all(|&n| n == 20 || n == 40));
}

#[test]
fn stream_bytes_split_at_every_boundary_decode_the_same() {
    // Record a bidirectional exchange with a half-close, then replay the client's bytes
    // into fresh servers cut at every offset, and one byte at a time.
    let mut p = pair();
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    p.client.send_message(id, &b"first"[..], false).unwrap();
    p.client.send_message(id, vec![9; 300], false).unwrap();
    p.client.close_send(id).unwrap();
    p.flush();
    let stream = p.to_server.split().freeze();
    let reference = {
        let mut server = gorpc_proto::ServerConn::new(initial(), p.now, 1);
        read(&mut server, p.now, &mut BytesMut::from(&stream[..])).unwrap();
        std::iter::from_fn(|| server.poll_event())
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(reference.len(), 4, "{reference:?}");
    for cut in 0..=stream.len() {
        let mut server = gorpc_proto::ServerConn::new(initial(), p.now, 1);
        let mut buf = BytesMut::from(&stream[..cut]);
        read(&mut server, p.now, &mut buf).unwrap();
        buf.extend_from_slice(&stream[cut..]);
        read(&mut server, p.now, &mut buf).unwrap();
        let events: Vec<_> = std::iter::from_fn(|| server.poll_event())
            .map(|e| format!("{e:?}"))
            .collect();
        assert_eq!(events, reference, "split at {cut}");
    }
    // And through the pair, a byte at a time both ways.
    let mut p = pair();
    p.chunk = 1;
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    p.client.send_message(id, &b"ping"[..], true).unwrap();
    p.pump().unwrap();
    let events = p.server_events();
    assert_eq!(events.len(), 3, "{events:?}");
    p.server.send_message(id, &b"pong"[..]).unwrap();
    assert!(p.server.respond(p.now, id, &Status::ok(), [], &[][..]));
    p.pump().unwrap();
    let (got, finished) = client_messages(&mut p);
    assert_eq!(got, [&b"pong"[..]]);
    assert!(finished.unwrap().is_ok());
}

#[test]
fn messages_for_a_request_waiting_at_the_limit_follow_it() {
    let config = ConnConfig {
        limits: gorpc_proto::Limits {
            max_concurrent_calls: 1,
            ..Default::default()
        },
        ..initial()
    };
    let mut p: Pair<u64> = Pair::new(Instant::now(), initial(), config);
    let first = open(&mut p, StreamKind::ServerStreaming, b"", 1);
    let second = open(&mut p, StreamKind::ClientStreaming, b"", 2);
    p.client.send_message(second, &b"early"[..], true).unwrap();
    p.pump().unwrap();
    assert_eq!(p.server_events().len(), 1, "only the first runs");
    assert_eq!(p.server.calls_waiting(), 1);
    assert!(p.server.respond(p.now, first, &Status::ok(), [], &[][..]));
    let events = p.server_events();
    assert!(
        matches!(
            &events[..],
            [ServerEvent::Request(r), ServerEvent::Message { id: m, .. }, ServerEvent::HalfClosed { id: h }]
                if r.id == second && *m == second && *h == second
        ),
        "{events:?}"
    );
}

#[test]
fn a_protocol_error_names_its_side() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ClientStreaming, b"", 1);
    request(&mut p);
    let mut raw = BytesMut::new();
    raw_frame(
        &mut raw,
        FrameType::WindowUpdate,
        0,
        id.as_u32(),
        &0u32.to_be_bytes(),
    );
    p.to_server.extend_from_slice(&raw);
    assert!(matches!(
        p.pump(),
        Err((Side::Server, ProtoError::MalformedWindowUpdate(_)))
    ));
}

/// Messages batched with `batch::push_message`.
fn batched(bodies: &[&[u8]]) -> BytesMut {
    let mut messages = BytesMut::new();
    for body in bodies {
        gorpc_proto::batch::push_message(&mut messages, |buf| {
            buf.put_slice(body);
            Ok::<_, ()>(())
        })
        .unwrap();
    }
    messages
}

#[test]
fn batched_messages_arrive_one_by_one_both_ways() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::Bidirectional, b"", 1);
    request(&mut p);
    let bodies: [&[u8]; 4] = [b"one", b"", b"three", &[7; 3000]];
    let mut messages = batched(&bodies);
    p.server.send_batch(id, &mut messages).unwrap();
    assert!(messages.is_empty(), "all of it went");
    let mut messages = batched(&bodies);
    p.client.send_batch(id, &mut messages).unwrap();
    // A lone message goes as a plain MESSAGE, in order behind the batch.
    let mut lone = batched(&[b"lone"]);
    p.client.send_batch(id, &mut lone).unwrap();
    p.client.close_send(id).unwrap();
    p.pump().unwrap();
    let (got, half_closed) = server_messages(&mut p);
    assert!(half_closed);
    assert_eq!(got, [&b"one"[..], b"", b"three", &[7; 3000], b"lone"]);
    let (got, _) = client_messages(&mut p);
    assert_eq!(got, bodies);
    // The handler releasing the messages' bytes gives back all the credit: the length
    // prefixes went back by themselves.
    let total: usize = bodies.iter().map(|b| b.len()).sum();
    assert_eq!(p.server.buffered(id), Some(total + 4));
    p.server.release(id, total + 4);
    assert_eq!(p.server.buffered(id), Some(0));
    assert_eq!(p.server.buffered_bytes(), 0);
}

#[test]
fn a_batch_stops_where_credit_runs_out_and_resumes_after_writable() {
    let mut p = pair();
    let id = open(&mut p, StreamKind::ServerStreaming, b"", 1);
    request(&mut p);
    // 100 messages of 1 KiB against the initial 64 KiB window: each message starts
    // while credit is left, so 64 go (the last one may overdraw) and 36 wait.
    let body = [3u8; 1024];
    let mut messages = batched(&[&body[..]; 100]);
    assert_eq!(
        p.server.send_batch(id, &mut messages),
        Err(SendError::NoCredit)
    );
    assert_eq!(messages.len(), 36 * 1028, "whole messages stay behind");
    p.pump().unwrap();
    let (got, _) = client_messages(&mut p);
    assert_eq!(got.len(), 64);
    p.client.release(id, got.iter().map(|m| m.len()).sum());
    p.pump().unwrap();
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Writable { id: w }] if w == id
    ));
    p.server.send_batch(id, &mut messages).unwrap();
    p.pump().unwrap();
    assert_eq!(client_messages(&mut p).0.len(), 36);
}

#[test]
fn batches_keep_to_the_frame_limit() {
    let limits = gorpc_proto::Limits {
        max_frame_len: 2_000,
        ..gorpc_proto::Limits::default()
    };
    let config = ConnConfig {
        limits,
        ..initial()
    };
    let mut p = Pair::new(Instant::now(), config, config);
    let id = open(&mut p, StreamKind::ServerStreaming, b"", 1);
    request(&mut p);
    // Ten 500-byte messages: three to a frame at most.
    let body = [1u8; 500];
    let mut messages = batched(&[&body[..]; 10]);
    p.server.send_batch(id, &mut messages).unwrap();
    p.pump().unwrap();
    assert_eq!(client_messages(&mut p).0.len(), 10);
    // A message too large for any frame is refused, and stays.
    let mut messages = batched(&[&[0u8; 1_990][..]]);
    assert_eq!(
        p.server.send_batch(id, &mut messages),
        Err(SendError::TooLarge)
    );
    assert!(!messages.is_empty());
    // Not whole length-prefixed messages: refused, nothing sent.
    let mut broken = BytesMut::from(&[0u8, 0, 0, 9, 1][..]);
    assert_eq!(
        p.server.send_batch(id, &mut broken),
        Err(SendError::MalformedBatch)
    );
}

#[test]
fn malformed_batches_are_connection_errors() {
    let bad: [&[u8]; 4] = [b"", &[0, 0, 0], &[0, 0, 0, 2, 1], &[0, 0, 0, 1, 9, 0]];
    for (body, to_server) in bad.iter().flat_map(|b| [(b, true), (b, false)]) {
        let mut p = pair();
        let kind = if to_server {
            StreamKind::ClientStreaming
        } else {
            StreamKind::ServerStreaming
        };
        let id = open(&mut p, kind, b"", 1);
        request(&mut p);
        let mut wire = BytesMut::new();
        raw_frame(
            &mut wire,
            FrameType::Message,
            flags::BATCH,
            id.as_u32(),
            body,
        );
        let read = if to_server {
            read(&mut p.server, p.now, &mut wire)
        } else {
            read(&mut p.client, p.now, &mut wire)
        };
        assert!(
            matches!(read, Err(ProtoError::MalformedMessage(_))),
            "{body:?} to the {}: {read:?}",
            if to_server { "server" } else { "client" }
        );
    }
    // BATCH belongs on MESSAGE frames only, never with NO_MESSAGE.
    for (frame_type, flags) in [
        (FrameType::Cancel, flags::BATCH),
        (
            FrameType::Message,
            flags::BATCH | flags::NO_MESSAGE | flags::END_STREAM,
        ),
    ] {
        let mut p = pair();
        let mut wire = BytesMut::new();
        raw_frame(&mut wire, frame_type, flags, 1, b"");
        assert!(read(&mut p.server, p.now, &mut wire).is_err());
    }
}
