//! A client and a server state machine talking through an in-memory pipe under a simulated
//! clock: multiplexed calls answered out of order, a deadline, a cancel and a graceful drain.
//!
//! cargo run -p gorpc-proto --example simulated_calls

use std::time::{Duration, Instant};

use gorpc_proto::sim::Pair;
use gorpc_proto::Conn as _;
use gorpc_proto::{codec, CallHead, ClientEvent, ConnConfig, ServerEvent, Status};

fn main() {
    let mut p: Pair<&'static str> =
        Pair::new(Instant::now(), ConnConfig::default(), ConnConfig::default());
    let names = ["alice", "bob", "carol", "dave"];
    for name in names {
        let timeout = if name == "carol" {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(5)
        };
        let head = CallHead::new("/greeter.Greeter/SayHello", codec::RAW)
            .with_deadline(p.now + timeout)
            .with_metadata([("x-caller", name.as_bytes())]);
        let id = p
            .client
            .start_call(p.now, head, name.as_bytes(), name)
            .expect("connection accepts calls");
        println!("client: started call {} for {name}", id.as_u32());
    }
    p.pump().expect("clean traffic");

    let mut requests = Vec::new();
    while let Some(ServerEvent::Request(req)) = p.server.poll_event() {
        println!(
            "server: {} from {} (deadline in {:?})",
            req.head.method(),
            String::from_utf8_lossy(req.head.metadata_value("x-caller").unwrap_or_default()),
            req.deadline.map(|d| d - p.now)
        );
        requests.push(req);
    }

    // dave gives up; carol's deadline passes before anyone answers her.
    let dave = requests.pop().unwrap();
    let cancelled = p.client.cancel(dave.id);
    println!("client: cancelled {}", cancelled.unwrap());
    p.advance(Duration::from_millis(60));
    p.pump().unwrap();
    while let Some(event) = p.server.poll_event() {
        println!("server: {event:?}");
    }

    // Answer in reverse order; carol's late answer is dropped.
    for req in requests.iter().rev() {
        let greeting = format!("hello, {}", String::from_utf8_lossy(&req.body));
        let sent = p
            .server
            .respond(p.now, req.id, &Status::ok(), [], greeting.into_bytes());
        println!("server: answered call {} (sent: {sent})", req.id.as_u32());
    }
    p.server.go_away();
    p.pump().unwrap();

    while let Some(event) = p.client.poll_event() {
        match event {
            ClientEvent::Finished {
                user,
                result: Ok(rsp),
                ..
            } => {
                println!("client: {user} <- {:?}", String::from_utf8_lossy(&rsp.body))
            }
            ClientEvent::Finished {
                user,
                result: Err(status),
                ..
            } => println!("client: {user} <- error: {status}"),
            other => println!("client: {other:?}"),
        }
    }
    println!(
        "closed: client {}, server {}",
        p.client.is_closed(),
        p.server.is_closed()
    );
}
