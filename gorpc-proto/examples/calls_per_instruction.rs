//! Runs unary calls through a client and a server state machine back to back (no sockets),
//! 64 in flight, each with a deadline, for instruction counting:
//!
//! cargo build --release -p gorpc-proto --example calls_per_instruction
//! valgrind --tool=callgrind target/release/examples/calls_per_instruction 100000
//!
//! Divide the total instruction count by the number of calls (the program's only output).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use gorpc_proto::sim::read;
use gorpc_proto::Conn as _;
use gorpc_proto::{
    codec, CallHead, ClientConn, ClientEvent, ConnConfig, ServerConn, ServerEvent, Status,
};

fn main() {
    let calls: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let in_flight = 64;
    let t0 = Instant::now();
    let mut client: ClientConn<u64> = ClientConn::new(ConnConfig::default(), t0);
    let mut server = ServerConn::new(ConnConfig::default(), t0, 1);
    let (mut to_server, mut to_client) = (
        BytesMut::with_capacity(1 << 20),
        BytesMut::with_capacity(1 << 20),
    );
    let body = [7u8; 1024];
    let (mut started, mut finished) = (0u64, 0u64);
    let mut now = t0;
    while finished < calls {
        // Keep the window full, as 64 callers would.
        while started < calls && started - finished < in_flight {
            let head = CallHead::new("/bench.Echo/Echo", codec::RAW)
                .with_deadline(now + Duration::from_secs(30));
            client
                .start_call(now, head, &body[..], started)
                .expect("window below the limit");
            started += 1;
        }
        while let Some(b) = client.poll_transmit() {
            to_server.extend_from_slice(&b);
        }
        read(&mut server, now, &mut to_server).expect("clean stream");
        while let Some(event) = server.poll_event() {
            if let ServerEvent::Request(req) = event {
                server.respond(now, req.id, &Status::ok(), [], req.body);
            }
        }
        while let Some(b) = server.poll_transmit() {
            to_client.extend_from_slice(&b);
        }
        read(&mut client, now, &mut to_client).expect("clean stream");
        while let Some(event) = client.poll_event() {
            if let ClientEvent::Finished { result: Ok(_), .. } = event {
                finished += 1;
            }
        }
        now += Duration::from_micros(10);
    }
    println!("{calls}");
}
