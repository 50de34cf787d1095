//! Client and server state machines back to back under a simulated clock.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use gorpc_proto::frame::{flags, FrameHeader, FrameType};
use gorpc_proto::head::encode_request_head;
use gorpc_proto::sim::read;
use gorpc_proto::sim::{Pair, Side};
use gorpc_proto::Conn as _;
use gorpc_proto::{
    codec, CallHead, CallId, CancelReason, ClientEvent, CloseReason, Code, ConnConfig,
    KeepaliveConfig, Limits, ProtoError, Request, ServerConn, ServerEvent, Status,
};

/// A config with the protocol's initial windows: nothing but the test's own frames is
/// queued (larger windows start with a window update).
fn quiet() -> ConnConfig {
    ConnConfig {
        stream_window: gorpc_proto::flow::INITIAL_STREAM_WINDOW,
        connection_window: gorpc_proto::flow::INITIAL_CONNECTION_WINDOW,
        ..ConnConfig::default()
    }
}

fn pair() -> Pair<u64> {
    Pair::new(Instant::now(), quiet(), quiet())
}

fn start(p: &mut Pair<u64>, tag: u64, timeout: Option<Duration>) -> CallId {
    let head = CallHead {
        deadline: timeout.map(|t| p.now + t),
        ..CallHead::new("/test.Echo/Call", codec::RAW)
    };
    p.client
        .start_call(p.now, head, tag.to_be_bytes().to_vec(), tag)
        .unwrap()
}

fn requests(p: &mut Pair<u64>) -> Vec<Request> {
    p.server_events()
        .into_iter()
        .map(|e| match e {
            ServerEvent::Request(r) => r,
            other => panic!("expected a request, got {other:?}"),
        })
        .collect()
}

fn echo(p: &mut Pair<u64>, req: &Request) {
    assert!(p
        .server
        .respond(p.now, req.id, &Status::ok(), [], req.body.clone()));
}

/// (user tag, result) of every finished call, in arrival order.
fn finished(p: &mut Pair<u64>) -> Vec<(u64, Result<Bytes, Status>)> {
    p.client_events()
        .into_iter()
        .filter_map(|e| match e {
            ClientEvent::Finished { user, result, .. } => Some((user, result.map(|r| r.body))),
            _ => None,
        })
        .collect()
}

#[test]
fn responses_in_any_order_reach_their_callers() {
    let mut p = pair();
    for tag in 0..5 {
        start(&mut p, tag, None);
    }
    p.pump().unwrap();
    let reqs = requests(&mut p);
    assert_eq!(reqs.len(), 5);
    for i in [3, 0, 4, 2, 1] {
        echo(&mut p, &reqs[i]);
        p.pump().unwrap();
        let got = finished(&mut p);
        let tag = u64::from_be_bytes(reqs[i].body[..].try_into().unwrap());
        assert_eq!(
            got,
            vec![(tag, Ok(Bytes::copy_from_slice(&tag.to_be_bytes())))]
        );
    }
    assert_eq!(p.client.calls_in_flight(), 0);
    assert_eq!(p.server.calls_in_flight(), 0);
}

#[test]
fn ten_thousand_calls_in_flight_on_one_connection() {
    let mut p = pair();
    for tag in 0..10_000 {
        start(&mut p, tag, Some(Duration::from_secs(60)));
    }
    assert_eq!(p.client.calls_in_flight(), 10_000);
    p.pump().unwrap();
    let mut reqs = requests(&mut p);
    assert_eq!(reqs.len(), 10_000);
    reqs.reverse();
    for req in &reqs {
        echo(&mut p, req);
    }
    p.pump().unwrap();
    let mut got = finished(&mut p);
    assert_eq!(got.len(), 10_000);
    got.sort_by_key(|(tag, _)| *tag);
    for (i, (tag, body)) in got.into_iter().enumerate() {
        assert_eq!(tag, i as u64);
        assert_eq!(body.unwrap(), Bytes::copy_from_slice(&tag.to_be_bytes()));
    }
}

#[test]
fn deadline_expires_on_both_sides_and_the_late_response_is_dropped() {
    let mut p = pair();
    let id = start(&mut p, 1, Some(Duration::from_millis(100)));
    p.pump().unwrap();
    let req = requests(&mut p).pop().unwrap();
    // The server sees the remaining time as its own deadline.
    assert_eq!(req.deadline, Some(p.now + Duration::from_millis(100)));
    assert_eq!(
        p.client.poll_timeout(),
        Some(p.now + Duration::from_millis(100))
    );

    p.advance(Duration::from_millis(99));
    assert!(finished(&mut p).is_empty());
    p.advance(Duration::from_millis(1));
    let got = finished(&mut p);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].1.as_ref().unwrap_err().code(),
        Code::DeadlineExceeded
    );
    let events = p.server_events();
    assert!(
        matches!(events[..], [ServerEvent::Cancelled { id: c, reason: CancelReason::DeadlineExceeded }] if c == id),
        "{events:?}"
    );
    // The handler finishing late changes nothing.
    assert!(!p
        .server
        .respond(p.now, req.id, &Status::ok(), [], &b"late"[..]));
    p.pump().unwrap();
    assert!(finished(&mut p).is_empty());
    assert!(
        p.server_events().is_empty(),
        "the client sends no CANCEL at its deadline: the server's own copy ended the call"
    );
}

#[test]
fn server_enforces_the_deadline_even_if_the_client_never_cancels() {
    let mut p = pair();
    let id = start(&mut p, 1, Some(Duration::from_millis(50)));
    p.pump().unwrap();
    requests(&mut p);
    p.now += Duration::from_millis(50);
    p.server.handle_timeout(p.now);
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Cancelled { id: c, reason: CancelReason::DeadlineExceeded }] if c == id
    ));
    assert_eq!(p.server.calls_in_flight(), 0);
}

#[test]
fn already_expired_deadline_is_rejected_locally() {
    let mut p = pair();
    let head = CallHead {
        deadline: Some(p.now),
        ..CallHead::new("/m", codec::RAW)
    };
    let rejected = p.client.start_call(p.now, head, &b""[..], 9).unwrap_err();
    assert_eq!(
        (rejected.status.code(), rejected.user),
        (Code::DeadlineExceeded, 9)
    );
    assert!(p.client.poll_transmit().is_none());
}

#[test]
fn cancel_frees_the_call_on_both_ends() {
    let mut p = pair();
    let id = start(&mut p, 7, None);
    p.pump().unwrap();
    let req = requests(&mut p).pop().unwrap();
    assert_eq!(p.client.cancel(id), Some(7));
    assert_eq!(p.client.cancel(id), None, "cancel is idempotent");
    p.pump().unwrap();
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Cancelled {
            reason: CancelReason::Peer,
            ..
        }]
    ));
    assert!(!p
        .server
        .respond(p.now, req.id, &Status::ok(), [], &b"x"[..]));
    assert_eq!(p.server.calls_in_flight(), 0);
    assert!(
        p.client_events().is_empty(),
        "a cancelled call reports nothing"
    );
}

#[test]
fn response_racing_a_cancel_is_dropped() {
    let mut p = pair();
    let id = start(&mut p, 1, None);
    p.pump().unwrap();
    let req = requests(&mut p).pop().unwrap();
    // The server answers while the client cancels: both frames cross on the wire.
    echo(&mut p, &req);
    assert_eq!(p.client.cancel(id), Some(1));
    p.pump().unwrap();
    assert!(p.client_events().is_empty());
    assert!(
        p.server_events().is_empty(),
        "cancel of an answered call is ignored"
    );
    // The connection is still fine for the next call.
    start(&mut p, 2, None);
    p.pump().unwrap();
    let req = requests(&mut p).pop().unwrap();
    echo(&mut p, &req);
    p.pump().unwrap();
    assert_eq!(
        finished(&mut p),
        vec![(2, Ok(Bytes::copy_from_slice(&2u64.to_be_bytes())))]
    );
}

#[test]
fn keepalive_pings_a_quiet_peer_and_a_silent_one_is_declared_dead() {
    let keepalive = KeepaliveConfig {
        interval: Some(Duration::from_secs(10)),
        timeout: Duration::from_secs(5),
    };
    let quiet_server = KeepaliveConfig {
        interval: None,
        ..keepalive
    };
    let mut p: Pair<u64> = Pair::new(
        Instant::now(),
        ConnConfig {
            keepalive,
            ..quiet()
        },
        ConnConfig {
            keepalive: quiet_server,
            ..quiet()
        },
    );
    start(&mut p, 1, None);
    p.pump().unwrap();
    // A live peer answers pings: nothing fails however long the call runs.
    for _ in 0..10 {
        p.advance(Duration::from_secs(10));
        p.pump().unwrap();
    }
    assert!(finished(&mut p).is_empty());
    assert!(!p.client.is_closed());

    // Now the server stops answering (bytes toward it are lost).
    p.advance(Duration::from_secs(10));
    p.to_server.clear();
    p.advance(Duration::from_secs(5));
    let events = p.client_events();
    assert!(
        matches!(&events[0], ClientEvent::Finished { user: 1, result: Err(s), .. } if s.code() == Code::Unavailable)
    );
    assert!(matches!(
        &events[1],
        ClientEvent::Closed(CloseReason::Error(ProtoError::KeepaliveTimeout))
    ));
    assert!(p.client.is_closed());
    assert_eq!(p.client.poll_timeout(), None);
}

#[test]
fn server_go_away_serves_every_call_sent_before_the_client_saw_it() {
    let mut p = pair();
    start(&mut p, 1, None);
    p.pump().unwrap();
    let first = requests(&mut p).pop().unwrap();
    // A second request is on the wire when the server starts draining.
    start(&mut p, 2, None);
    p.flush();
    p.server.go_away();
    p.pump().unwrap();
    let events = p.server_events();
    let [ServerEvent::Request(second), ServerEvent::GoAway(ack)] = &events[..] else {
        panic!("{events:?}")
    };
    assert!(ack.is_ok(), "the client acknowledges the go-away");
    let second = second.clone();
    let events = p.client_events();
    assert!(matches!(&events[..], [ClientEvent::GoAway(s)] if s.code() == Code::Unavailable));
    let rejected = p
        .client
        .start_call(p.now, CallHead::new("/m", 0), &b""[..], 3)
        .unwrap_err();
    assert_eq!(rejected.status.code(), Code::Unavailable);

    echo(&mut p, &second);
    echo(&mut p, &first);
    p.pump().unwrap();
    let events = p.client_events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(matches!(
        events[2],
        ClientEvent::Closed(CloseReason::Drained)
    ));
    assert!(matches!(
        p.server_events()[..],
        [ServerEvent::Closed(CloseReason::Drained)]
    ));
    assert!(p.client.is_closed() && p.server.is_closed());
}

#[test]
fn client_go_away_drains_after_the_last_response() {
    let mut p = pair();
    start(&mut p, 1, None);
    p.client.go_away();
    p.pump().unwrap();
    let events = p.server_events();
    let ServerEvent::Request(req) = &events[0] else {
        panic!("{events:?}")
    };
    assert!(matches!(events[1], ServerEvent::GoAway(_)));
    assert!(!p.client.is_closed() && !p.server.is_closed());
    echo(&mut p, req);
    p.pump().unwrap();
    assert!(p.client.is_closed() && p.server.is_closed());
    assert_eq!(finished(&mut p).len(), 1);
}

#[test]
fn request_after_client_go_away_is_a_protocol_error() {
    let now = Instant::now();
    let mut server = ServerConn::new(quiet(), now, 1);
    let mut wire = BytesMut::new();
    let goaway = FrameHeader {
        frame_type: FrameType::GoAway,
        flags: 0,
        codec: 0,
        call_id: 0,
        head_len: 0,
        body_len: 0,
    };
    // A call in flight keeps the connection draining rather than closed.
    raw_request(&mut wire, 3, "/m", b"");
    goaway.encode(&mut wire);
    raw_request(&mut wire, 5, "/m", b"");
    assert_eq!(
        read(&mut server, now, &mut wire),
        Err(ProtoError::RequestAfterGoAway(5))
    );
}

#[test]
fn client_refuses_calls_past_its_concurrency_limit() {
    let limits = Limits {
        max_concurrent_calls: 3,
        ..Limits::default()
    };
    let mut p: Pair<u64> = Pair::new(Instant::now(), ConnConfig { limits, ..quiet() }, quiet());
    for tag in 0..3 {
        start(&mut p, tag, None);
    }
    let rejected = p
        .client
        .start_call(p.now, CallHead::new("/m", 0), &b""[..], 3)
        .unwrap_err();
    assert_eq!(rejected.status.code(), Code::ResourceExhausted);
    assert_eq!(rejected.user, 3);
}

#[test]
fn server_stops_reading_at_its_concurrency_limit_and_resumes() {
    let limits = Limits {
        max_concurrent_calls: 2,
        ..Limits::default()
    };
    let mut p: Pair<u64> = Pair::new(Instant::now(), quiet(), ConnConfig { limits, ..quiet() });
    let ids: Vec<CallId> = (0..5)
        .map(|tag| start(&mut p, tag, Some(Duration::from_secs(1))))
        .collect();
    p.pump().unwrap();
    let reqs = requests(&mut p);
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        p.server.calls_waiting(),
        3,
        "requests already read wait for a slot"
    );
    assert!(!p.server.wants_read());

    // While saturated, the server reads nothing more: the cancel stays on the wire.
    p.client.cancel(ids[4]);
    p.pump().unwrap();
    assert!(!p.to_server.is_empty());

    echo(&mut p, &reqs[0]);
    let next = requests(&mut p);
    assert_eq!(next.len(), 1, "one slot freed, one waiting request starts");
    assert_eq!(next[0].id, ids[2]);
    assert_eq!(p.server.calls_waiting(), 2);

    // Waiting requests whose deadline passed are never started.
    p.advance(Duration::from_secs(1));
    let events = p.server_events();
    assert!(
        events.iter().all(|e| !matches!(e, ServerEvent::Request(_))),
        "{events:?}"
    );
    assert_eq!(p.server.calls_waiting(), 0);
    assert!(p.server.wants_read());
    p.pump().unwrap();
    assert!(p.to_server.is_empty(), "reading resumed");
}

fn raw_request(wire: &mut BytesMut, id: u32, method: &str, body: &[u8]) {
    let mut head = BytesMut::new();
    encode_request_head(method, 0, [], &mut head);
    FrameHeader {
        frame_type: FrameType::Request,
        flags: flags::END_STREAM,
        codec: codec::RAW,
        call_id: id,
        head_len: head.len() as u32,
        body_len: body.len() as u32,
    }
    .encode(wire);
    wire.put_slice(&head);
    wire.put_slice(body);
}

#[test]
fn oversized_frames_and_heads_close_the_connection_with_a_typed_error() {
    let limits = Limits {
        max_frame_len: 1024,
        max_head_len: 64,
        ..Limits::default()
    };
    let config = ConnConfig { limits, ..quiet() };
    let now = Instant::now();

    let mut server = ServerConn::new(config, now, 1);
    let mut wire = BytesMut::new();
    raw_request(&mut wire, 1, "/m", &[0; 1100]);
    assert!(matches!(
        read(&mut server, now, &mut wire),
        Err(ProtoError::FrameTooLarge {
            len: 1124,
            max: 1024
        })
    ));
    assert!(server.is_closed());
    assert!(matches!(
        server.poll_event(),
        Some(ServerEvent::Closed(CloseReason::Error(
            ProtoError::FrameTooLarge { .. }
        )))
    ));
    // The peer is told why in a final go-away.
    let goaway = server.poll_transmit().unwrap();
    assert_eq!(goaway[3], FrameType::GoAway as u8);

    let mut server = ServerConn::new(config, now, 1);
    let mut wire = BytesMut::new();
    raw_request(&mut wire, 1, &"/m".repeat(40), b"");
    assert_eq!(
        read(&mut server, now, &mut wire),
        Err(ProtoError::HeadTooLarge { len: 82, max: 64 })
    );
}

#[test]
fn the_sender_refuses_what_the_receiver_would_refuse() {
    let limits = Limits {
        max_frame_len: 1024,
        max_head_len: 64,
        ..Limits::default()
    };
    let config = ConnConfig { limits, ..quiet() };
    let mut p: Pair<u64> = Pair::new(Instant::now(), config, config);
    let big = p
        .client
        .start_call(p.now, CallHead::new("/m", 0), vec![0; 2000], 1)
        .unwrap_err();
    assert_eq!(big.status.code(), Code::ResourceExhausted);
    let meta = [("key", &[0u8; 100][..])];
    let head = CallHead::new("/m", 0).with_metadata(meta);
    let big_head = p.client.start_call(p.now, head, &b""[..], 2).unwrap_err();
    assert_eq!(big_head.status.code(), Code::ResourceExhausted);
    assert!(p.client.poll_transmit().is_none(), "nothing was queued");

    // A response too large becomes a ResourceExhausted status for that call only.
    start(&mut p, 3, None);
    start(&mut p, 4, None);
    p.pump().unwrap();
    let reqs = requests(&mut p);
    assert!(p
        .server
        .respond(p.now, reqs[0].id, &Status::ok(), [], vec![0; 2000]));
    echo(&mut p, &reqs[1]);
    p.pump().unwrap();
    let events = p.client_events();
    let codes: Vec<_> = events
        .iter()
        .map(|e| match e {
            ClientEvent::Finished {
                user,
                result: Ok(r),
                ..
            } => (*user, r.status.code()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, vec![(3, Code::ResourceExhausted), (4, Code::Ok)]);
}

#[test]
fn metadata_and_status_cross_intact() {
    let mut p = pair();
    let meta = [
        ("authorization", &b"Bearer t"[..]),
        ("trace", &[0u8, 255][..]),
        ("trace", &b"2"[..]),
    ];
    let head = CallHead::new("/pkg.Svc/Method", codec::MSGPACK).with_metadata(meta);
    p.client.start_call(p.now, head, &b"body"[..], 1).unwrap();
    p.pump().unwrap();
    let req = requests(&mut p).pop().unwrap();
    assert_eq!(req.codec, codec::MSGPACK);
    assert_eq!(req.head.method(), "/pkg.Svc/Method");
    assert_eq!(req.head.metadata().collect::<Vec<_>>(), meta);
    assert_eq!(req.head.metadata_value("trace"), Some(&[0u8, 255][..]));
    assert_eq!(req.deadline, None);
    let status = Status::new(Code::NotFound, "no such thing");
    p.server.respond(
        p.now,
        req.id,
        &status,
        [("retry-after", &b"5"[..])],
        &b""[..],
    );
    p.pump().unwrap();
    let Some(ClientEvent::Finished {
        result: Ok(rsp), ..
    }) = p.client.poll_event()
    else {
        panic!()
    };
    assert_eq!(rsp.status, status);
    assert_eq!(rsp.codec, codec::MSGPACK);
    assert_eq!(rsp.head.metadata_value("retry-after"), Some(&b"5"[..]));
}

#[test]
fn bytes_split_at_every_boundary_decode_the_same() {
    // A stream of several frames of every kind the server reads, delivered in two pieces
    // split at every offset, and also one byte at a time.
    let mut p = pair();
    for tag in 0..3 {
        start(&mut p, tag, Some(Duration::from_secs(5)));
    }
    let id = start(&mut p, 3, None);
    p.client.cancel(id);
    p.flush();
    let stream = p.to_server.split().freeze();

    let reference = {
        let mut server = ServerConn::new(quiet(), p.now, 1);
        let mut buf = BytesMut::from(&stream[..]);
        read(&mut server, p.now, &mut buf).unwrap();
        format!(
            "{:?}",
            std::iter::from_fn(|| server.poll_event()).collect::<Vec<_>>()
        )
    };
    for cut in 0..=stream.len() {
        let mut server = ServerConn::new(quiet(), p.now, 1);
        let mut buf = BytesMut::from(&stream[..cut]);
        read(&mut server, p.now, &mut buf).unwrap();
        buf.extend_from_slice(&stream[cut..]);
        read(&mut server, p.now, &mut buf).unwrap();
        assert!(buf.is_empty());
        let events = format!(
            "{:?}",
            std::iter::from_fn(|| server.poll_event()).collect::<Vec<_>>()
        );
        assert_eq!(events, reference, "split at {cut}");
    }

    // The client side, one byte at a time, through the whole exchange.
    let mut p = pair();
    p.chunk = 1;
    for tag in 0..3 {
        start(&mut p, tag, None);
    }
    p.pump().unwrap();
    for req in requests(&mut p) {
        echo(&mut p, &req);
    }
    p.pump().unwrap();
    assert_eq!(finished(&mut p).len(), 3);
}

#[test]
fn corrupted_bytes_close_only_that_connection_or_fail_only_that_call() {
    // Flip every byte of a two-call stream, one at a time, to every interesting value.
    let mut p = pair();
    start(&mut p, 1, Some(Duration::from_secs(1)));
    let meta = [("k", &b"v"[..])];
    p.client
        .start_call(
            p.now,
            CallHead::new("/a/b", 2).with_metadata(meta),
            &b"xyz"[..],
            2,
        )
        .unwrap();
    p.flush();
    let stream = p.to_server.split().freeze();
    let mut outcomes = [0usize; 3];
    for i in 0..stream.len() {
        for value in [0x00, 0x01, 0x7f, 0x80, 0xff, stream[i] ^ 0x20] {
            if value == stream[i] {
                continue;
            }
            let mut bytes = BytesMut::from(&stream[..]);
            bytes[i] = value;
            let mut server = ServerConn::new(quiet(), p.now, 1);
            match read(&mut server, p.now, &mut bytes) {
                Err(_) => {
                    outcomes[0] += 1;
                    assert!(server.is_closed());
                    assert!(
                        bytes.is_empty(),
                        "a failed connection holds no buffered bytes"
                    );
                }
                Ok(()) if server.transmit_len() > 0 => {
                    // A malformed head: answered with an error status, connection intact.
                    outcomes[1] += 1;
                    assert!(!server.is_closed());
                }
                Ok(()) => outcomes[2] += 1,
            }
        }
    }
    assert!(
        outcomes.iter().all(|&n| n > 0),
        "every kind of outcome was exercised: {outcomes:?}"
    );
}

#[test]
fn malformed_request_head_is_answered_with_invalid_argument() {
    let now = Instant::now();
    let mut server = ServerConn::new(quiet(), now, 1);
    let mut wire = BytesMut::new();
    FrameHeader {
        frame_type: FrameType::Request,
        flags: flags::END_STREAM,
        codec: 0,
        call_id: 9,
        head_len: 2,
        body_len: 0,
    }
    .encode(&mut wire);
    wire.put_slice(&[0x0a, 0x05]); // method field claiming 5 bytes that are not there
    raw_request(&mut wire, 10, "/ok", b"");
    read(&mut server, now, &mut wire).unwrap();
    let events: Vec<_> = std::iter::from_fn(|| server.poll_event()).collect();
    assert!(
        matches!(&events[..], [ServerEvent::Request(r)] if r.id.as_u32() == 10),
        "the next call is unharmed"
    );

    let mut client = gorpc_proto::ClientConn::<()>::new(quiet(), now);
    // Replay the server's answer for id 9 into a client that started call 9.
    for _ in 0..9 {
        client
            .start_call(now, CallHead::new("/m", 0), &b""[..], ())
            .unwrap();
    }
    let mut out = BytesMut::new();
    while let Some(b) = server.poll_transmit() {
        out.extend_from_slice(&b);
    }
    read(&mut client, now, &mut out).unwrap();
    let Some(ClientEvent::Finished {
        id,
        result: Ok(rsp),
        ..
    }) = client.poll_event()
    else {
        panic!()
    };
    assert_eq!(id.as_u32(), 9);
    assert_eq!(rsp.status.code(), Code::InvalidArgument);
    assert!(
        rsp.status.message().contains("malformed head"),
        "{}",
        rsp.status
    );
}

#[test]
fn call_id_zero_is_reserved() {
    let now = Instant::now();
    let mut server = ServerConn::new(quiet(), now, 1);
    let mut wire = BytesMut::new();
    raw_request(&mut wire, 0, "/m", b"");
    assert_eq!(
        read(&mut server, now, &mut wire),
        Err(ProtoError::ReservedCallId)
    );
}

#[test]
fn duplicate_call_id_is_a_protocol_error() {
    let now = Instant::now();
    let mut server = ServerConn::new(quiet(), now, 1);
    let mut wire = BytesMut::new();
    raw_request(&mut wire, 4, "/m", b"");
    raw_request(&mut wire, 4, "/m", b"");
    assert_eq!(
        read(&mut server, now, &mut wire),
        Err(ProtoError::DuplicateCallId(4))
    );
}

#[test]
fn unknown_version_and_garbage_are_refused_with_clear_errors() {
    let now = Instant::now();
    let mut server = ServerConn::new(quiet(), now, 1);
    let mut wire = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
    let err = read(&mut server, now, &mut wire).unwrap_err();
    assert_eq!(err, ProtoError::BadMagic);
    assert!(err.to_string().contains("not speaking gorpc"));

    let mut server = ServerConn::new(quiet(), now, 1);
    let mut wire = BytesMut::new();
    raw_request(&mut wire, 1, "/m", b"");
    wire[2] = 2;
    let err = read(&mut server, now, &mut wire).unwrap_err();
    assert_eq!(err, ProtoError::UnsupportedVersion(2));
    assert_eq!(
        err.to_string(),
        "unsupported protocol version 2 (this peer speaks 1)"
    );
}

#[test]
fn a_stream_opening_request_carries_no_message() {
    let mut p = pair();
    let mut wire = BytesMut::new();
    raw_request(&mut wire, 1, "/m", b"x");
    wire[4] = 0; // clear END_STREAM: the client streams its messages
    let at = wire.len();
    raw_request(&mut wire, 3, "/m", b"");
    wire[at + 4] = 0;
    read(&mut p.server, p.now, &mut wire).unwrap();
    // The one with a body fails alone, with INVALID_ARGUMENT; the other opens a stream.
    let events = p.server_events();
    assert!(
        matches!(&events[..], [ServerEvent::Request(r)] if r.id.as_u32() == 3 && r.client_streams && r.body.is_empty()),
        "{events:?}"
    );
    let out = p.server.poll_transmit().unwrap();
    assert_eq!(out[3], FrameType::Response as u8);
    assert_eq!(&out[8..12], &1u32.to_be_bytes());
}

#[test]
fn eof_fails_calls_in_flight_with_unavailable() {
    let mut p = pair();
    start(&mut p, 1, None);
    p.pump().unwrap();
    p.client.handle_eof();
    let events = p.client_events();
    assert!(
        matches!(&events[0], ClientEvent::Finished { result: Err(s), .. } if s.code() == Code::Unavailable)
    );
    assert!(matches!(
        events[1],
        ClientEvent::Closed(CloseReason::PeerClosed)
    ));
    let rejected = p
        .client
        .start_call(p.now, CallHead::new("/m", 0), &b""[..], 2)
        .unwrap_err();
    assert_eq!(rejected.status.code(), Code::Unavailable);
}

#[test]
fn a_client_error_reaches_the_pair_as_the_right_side() {
    let mut p = pair();
    p.to_client.extend_from_slice(b"garbage!");
    assert_eq!(p.pump(), Err((Side::Client, ProtoError::BadMagic)));
}

#[test]
fn large_bodies_leave_uncopied_in_their_own_chunk() {
    let mut p = pair();
    let body = Bytes::from(vec![7u8; 1 << 20]);
    p.client
        .start_call(p.now, CallHead::new("/m", 0), body.clone(), 1)
        .unwrap();
    let header = p.client.poll_transmit().unwrap();
    let chunk = p.client.poll_transmit().unwrap();
    assert_eq!(
        chunk.as_ptr(),
        body.as_ptr(),
        "the body is the caller's buffer, not a copy"
    );
    assert_eq!(header.len(), 20 + 4);
}

#[test]
fn calls_on_a_refused_connection_end_with_the_refusal() {
    let mut p = pair();
    start(&mut p, 1, None);
    // The server turns the connection away (at its connection limit, say) before it reads
    // the request: a go-away carrying why, then it closes.
    p.server.refuse(Status::new(
        Code::ResourceExhausted,
        "at the connection limit",
    ));
    p.pump().unwrap();
    p.client.handle_eof();
    let ended = finished(&mut p);
    let [(1, Err(status))] = &ended[..] else {
        panic!("{ended:?}")
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert_eq!(status.message(), "at the connection limit");
}

#[test]
fn a_call_started_after_the_refusal_arrived_ends_with_the_refusal() {
    let mut p = pair();
    p.server.refuse(Status::new(
        Code::ResourceExhausted,
        "at the connection limit",
    ));
    p.pump().unwrap();
    // The go-away is read; the close may or may not be yet. Either way a new call is
    // refused with the server's reason, not as a connection that merely went away.
    for eof in [false, true] {
        if eof {
            p.client.handle_eof();
        }
        let head = CallHead::new("/test.Echo/Call", codec::RAW);
        let rejected = p
            .client
            .start_call(p.now, head, vec![1], 7)
            .expect_err("a refused connection takes no call");
        assert_eq!(rejected.status.code(), Code::ResourceExhausted);
        assert_eq!(rejected.status.message(), "at the connection limit");
        assert_eq!(rejected.user, 7);
    }
}

#[test]
fn an_answer_read_after_the_deadline_is_deadline_exceeded() {
    let mut p = pair();
    start(&mut p, 1, Some(Duration::from_millis(10)));
    p.pump().unwrap();
    let request = requests(&mut p).pop().unwrap();
    echo(&mut p, &request);
    // The client's driver wakes late: the answer and the expiry are both there, and the
    // read comes first. The deadline still decides.
    p.now += Duration::from_millis(20);
    p.pump().unwrap();
    let ended = finished(&mut p);
    let [(1, Err(status))] = &ended[..] else {
        panic!("{ended:?}")
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
}
