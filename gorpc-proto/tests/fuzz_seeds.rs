//! Replays the committed fuzz corpus (fuzz/seeds/<target>/*) through the fuzz target
//! bodies, so every crash a fuzz run ever found stays fixed on stable `cargo test`.
//!
//! `GORPC_WRITE_SEEDS=1 cargo test -p gorpc-proto --test fuzz_seeds` regenerates the
//! generated seeds (valid traffic captured from the pair harness) before replaying.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gorpc_proto::sim::read;
use gorpc_proto::sim::{targets, Pair};
use gorpc_proto::{codec, CallHead, ConnConfig, ServerEvent, Status};

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
}

/// Valid traffic in both directions: calls with and without metadata and deadlines, a
/// cancel, answers with ok and error statuses, pings and go-aways.
fn captured_traffic() -> (Vec<u8>, Vec<u8>) {
    let mut p: Pair<u32> = Pair::new(Instant::now(), ConnConfig::default(), ConnConfig::default());
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    let mut capture = |p: &mut Pair<u32>| {
        p.flush();
        to_server.extend_from_slice(&p.to_server);
        to_client.extend_from_slice(&p.to_client);
        p.pump().unwrap();
    };
    let meta = [
        ("authorization", &b"Bearer x"[..]),
        ("traceparent", &b"00-01-02-01"[..]),
    ];
    for tag in 0..4u32 {
        let head = CallHead::new("/helloworld.Greeter/SayHello", codec::PROTOBUF)
            .with_deadline(p.now + Duration::from_millis(100 * (tag as u64 + 1)))
            .with_metadata(meta);
        p.client
            .start_call(p.now, head, &b"\x0a\x05world"[..], tag)
            .unwrap();
    }
    let id = p
        .client
        .start_call(p.now, CallHead::new("/x/y", codec::RAW), &b""[..], 9)
        .unwrap();
    p.client.cancel(id);
    capture(&mut p);
    let requests: Vec<_> = p
        .server_events()
        .into_iter()
        .filter_map(|e| match e {
            ServerEvent::Request(r) => Some(r),
            _ => None,
        })
        .collect();
    for (i, req) in requests.iter().enumerate() {
        let status = if i % 2 == 0 {
            Status::ok()
        } else {
            Status::new(gorpc_proto::Code::NotFound, "no")
        };
        p.server
            .respond(p.now, req.id, &status, [("k", &b"v"[..])], req.body.clone());
    }
    capture(&mut p);
    p.advance(Duration::from_secs(31)); // keepalive pings both ways
    capture(&mut p);
    p.server.go_away();
    capture(&mut p);
    (to_server, to_client)
}

fn write_seeds() {
    let (to_server, to_client) = captured_traffic();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = seeds_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write("frame_decode", "seed-requests", &to_server);
    write("frame_decode", "seed-responses", &to_client);
    write(
        "frame_decode",
        "seed-truncated",
        &to_server[..to_server.len() / 2],
    );
    for chunk in [0u8, 7, 63] {
        write(
            "server_read",
            &format!("seed-requests-{chunk}"),
            &[&[chunk][..], &to_server].concat(),
        );
        write(
            "client_read",
            &format!("seed-responses-{chunk}"),
            &[&[chunk][..], &to_client].concat(),
        );
    }
    // pair_ops: tag bytes per sim::ops_from_bytes.
    let start =
        |len: u8, timeout: Option<u8>| [0, len, 0, timeout.map_or(0, |_| 1), timeout.unwrap_or(0)];
    let mut ops = Vec::new();
    for i in 0..6 {
        ops.extend_from_slice(&start(i * 40, (i % 2 == 0).then_some(i * 3)));
    }
    ops.extend_from_slice(&[11, 4, 1, 1, 4, 2, 0, 7, 3, 8, 50, 0, 9, 13, 0, 11, 14, 11]);
    write("pair_ops", "seed-mixed", &ops);
    write(
        "pair_ops",
        "seed-corrupt",
        &[&start(9, None)[..], &[15, 3, 0, 0xff, 11]].concat(),
    );
    write(
        "pair_ops",
        "seed-goaway",
        &[
            &start(1, None)[..],
            &[13],
            &start(2, None)[..],
            &[11, 4, 0, 1, 11],
        ]
        .concat(),
    );
    // Streams of each kind (tag 16), messages both ways past a window (18 client, 21
    // server), releases (23), a half-close (20), a cancel.
    let mut streams = vec![16, 0, 0, 16, 1, 0, 16, 0x82, 50, 11];
    for _ in 0..20 {
        streams.extend_from_slice(&[21, 0, 0xa0, 0x0f, 18, 0, 0xa0, 0x0f, 9, 0x28, 0x23]);
    }
    streams.extend_from_slice(&[
        11, 23, 0, 0xff, 0xff, 23, 1, 0xff, 0xff, 11, 20, 0, 7, 1, 11,
    ]);
    write("pair_ops", "seed-streams", &streams);
}

#[test]
fn committed_fuzz_corpus_replays_cleanly() {
    if std::env::var_os("GORPC_WRITE_SEEDS").is_some() {
        write_seeds();
    }
    type Target = fn(&[u8]);
    let targets: [(&str, Target); 4] = [
        ("frame_decode", targets::frame_decode),
        ("client_read", targets::client_read),
        ("server_read", targets::server_read),
        ("pair_ops", targets::pair_ops),
    ];
    for (name, run) in targets {
        let dir = seeds_dir().join(name);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| run(&bytes));
            assert!(result.is_ok(), "{name} fails on {}", path.display());
            count += 1;
        }
        assert!(count >= 3, "{name} has only {count} seeds");
    }
}

#[test]
fn captured_traffic_is_what_the_seeds_claim() {
    // The generated seeds are only useful if they are real, complete traffic.
    let (to_server, to_client) = captured_traffic();
    let mut server = gorpc_proto::ServerConn::new(ConnConfig::default(), Instant::now(), 3);
    read(
        &mut server,
        Instant::now(),
        &mut BytesMut::from(&to_server[..]),
    )
    .unwrap();
    let requests = std::iter::from_fn(|| server.poll_event())
        .filter(|e| matches!(e, ServerEvent::Request(_)))
        .count();
    assert_eq!(requests, 5);
    assert!(!to_client.is_empty());
}
