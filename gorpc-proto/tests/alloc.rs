//! Heap allocations on the hot path, counted by a global allocator wrapper.
//!
//! Its own test binary, since the allocator is process-wide; it counts per thread, so the
//! test harness's other threads cannot disturb a measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use gorpc_proto::frame::{flags, FrameHeader, FrameRef, FrameType, HEADER_LEN};
use gorpc_proto::head::{encode_request_head, RequestHeadRef};
use gorpc_proto::sim::read;
use gorpc_proto::Conn as _;
use gorpc_proto::{
    codec, CallHead, ClientConn, ClientEvent, ConnConfig, Limits, ServerConn, ServerEvent, Status,
    StreamKind,
};

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: safe to touch from inside the allocator.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn encoding_and_decoding_a_1kib_request_allocates_nothing() {
    let limits = Limits::default();
    let body = [0xabu8; 1024];
    let mut buf = BytesMut::with_capacity(4096);
    let n = allocations_during(|| {
        for _ in 0..100 {
            buf.clear();
            let start = buf.len();
            buf.put_bytes(0, HEADER_LEN);
            encode_request_head("/helloworld.Greeter/SayHello", 250_000, [], &mut buf);
            let head_len = (buf.len() - start - HEADER_LEN) as u32;
            let header = FrameHeader {
                frame_type: FrameType::Request,
                flags: flags::END_STREAM,
                codec: codec::PROTOBUF,
                call_id: 1,
                head_len,
                body_len: body.len() as u32,
            };
            header.encode(&mut &mut buf[start..start + HEADER_LEN]);
            buf.put_slice(&body);

            let (frame, len) = FrameRef::decode(&buf, &limits).unwrap().unwrap();
            assert_eq!(len, buf.len());
            let head = RequestHeadRef::decode(frame.head).unwrap();
            assert_eq!(head.method, "/helloworld.Greeter/SayHello");
            assert_eq!(head.metadata().count(), 0);
            assert_eq!(frame.body, &body[..]);
        }
    });
    assert_eq!(n, 0, "allocations in 100 encode+decode round trips");
}

#[test]
fn a_unary_call_through_both_state_machines_allocates_nothing_in_steady_state() {
    let now = Instant::now();
    let mut client: ClientConn<u64> = ClientConn::new(ConnConfig::default(), now);
    let mut server = ServerConn::new(ConnConfig::default(), now, 1);
    let mut to_server = BytesMut::with_capacity(64 * 1024);
    let mut to_client = BytesMut::with_capacity(64 * 1024);
    let body = [7u8; 1024];
    let deadline = now + std::time::Duration::from_secs(5);

    let mut round_trip = |tag: u64| {
        let head =
            CallHead::new("/helloworld.Greeter/SayHello", codec::PROTOBUF).with_deadline(deadline);
        client.start_call(now, head, &body[..], tag).unwrap();
        while let Some(b) = client.poll_transmit() {
            to_server.extend_from_slice(&b);
        }
        read(&mut server, now, &mut to_server).unwrap();
        let Some(ServerEvent::Request(req)) = server.poll_event() else {
            panic!()
        };
        server.respond(now, req.id, &Status::ok(), [], &body[..]);
        drop(req);
        while let Some(b) = server.poll_transmit() {
            to_client.extend_from_slice(&b);
        }
        read(&mut client, now, &mut to_client).unwrap();
        let Some(ClientEvent::Finished {
            user,
            result: Ok(rsp),
            ..
        }) = client.poll_event()
        else {
            panic!()
        };
        assert_eq!(user, tag);
        assert_eq!(rsp.body.len(), 1024);
    };
    // Warm up: tables, queues and buffers reach their working size.
    for tag in 0..1000 {
        round_trip(tag);
    }
    let calls = 10_000;
    let n = allocations_during(|| {
        for tag in 0..calls {
            round_trip(tag);
        }
    });
    assert_eq!(n, 0, "allocations in {calls} calls");
}

#[test]
fn stream_messages_through_both_state_machines_allocate_nothing_in_steady_state() {
    let now = Instant::now();
    let mut client: ClientConn<u64> = ClientConn::new(ConnConfig::default(), now);
    let mut server = ServerConn::new(ConnConfig::default(), now, 1);
    let mut to_server = BytesMut::with_capacity(64 * 1024);
    let mut to_client = BytesMut::with_capacity(64 * 1024);
    let head = CallHead::new("/logs.Tail/Follow", codec::PROTOBUF);
    let id = client
        .start_stream(now, head, StreamKind::Bidirectional, &[][..], 1)
        .unwrap();
    while let Some(b) = client.poll_transmit() {
        to_server.extend_from_slice(&b);
    }
    read(&mut server, now, &mut to_server).unwrap();
    let Some(ServerEvent::Request(_)) = server.poll_event() else {
        panic!()
    };
    let body = [7u8; 1024];

    // One message each way, consumed and released, credit flowing back.
    let mut exchange = || {
        server.send_message(id, &body[..]).unwrap();
        client.send_message(id, &body[..], false).unwrap();
        while let Some(b) = server.poll_transmit() {
            to_client.extend_from_slice(&b);
        }
        while let Some(b) = client.poll_transmit() {
            to_server.extend_from_slice(&b);
        }
        read(&mut client, now, &mut to_client).unwrap();
        read(&mut server, now, &mut to_server).unwrap();
        let Some(ClientEvent::Message { body: got, .. }) = client.poll_event() else {
            panic!()
        };
        client.release(id, got.len());
        drop(got);
        let Some(ServerEvent::Message { body: got, .. }) = server.poll_event() else {
            panic!()
        };
        server.release(id, got.len());
    };
    for _ in 0..1000 {
        exchange();
    }
    let messages = 10_000;
    let n = allocations_during(|| {
        for _ in 0..messages {
            exchange();
        }
    });
    assert_eq!(n, 0, "allocations in {messages} message exchanges");
}
