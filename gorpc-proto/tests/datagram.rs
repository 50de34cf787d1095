//! Calls over datagrams through a simulated network (a queue of datagrams that may drop or
//! duplicate some).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc_proto::datagram::{
    DatagramClient, DatagramConfig, DatagramRequest, DatagramServer, Finished, ServerInput,
    DEFAULT_MAX_DATAGRAM,
};
use gorpc_proto::{codec, CallHead, CallId, Code, Status};
use proptest::prelude::*;

type Addr = u16;
const CLIENT: Addr = 1;

fn pair() -> (DatagramClient<u32>, DatagramServer<Addr>) {
    (
        DatagramClient::new(DatagramConfig::default(), 1),
        DatagramServer::new(DatagramConfig::default(), 42),
    )
}

fn head(method: &str) -> CallHead<'_, [(&str, &[u8]); 0]> {
    CallHead::new(method, codec::RAW)
}

/// The request the server hands out for `datagram`; panics on anything else.
fn request(server: &mut DatagramServer<Addr>, now: Instant, d: &[u8]) -> DatagramRequest<Addr> {
    match server.handle_datagram(now, CLIENT, d) {
        Some(ServerInput::Request(r)) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

/// Echoes the body back.
fn echo(server: &mut DatagramServer<Addr>, now: Instant, req: DatagramRequest<Addr>) -> Bytes {
    let body = req.body.clone();
    server
        .respond(now, req.token, &Status::ok(), [], body)
        .unwrap()
}

/// Runs the request in `d` as an echo and returns the response datagram.
fn serve(server: &mut DatagramServer<Addr>, now: Instant, d: &[u8]) -> Bytes {
    let req = request(server, now, d);
    echo(server, now, req)
}

fn events(client: &mut DatagramClient<u32>) -> Vec<Finished<u32>> {
    std::iter::from_fn(|| client.poll_event()).collect()
}

#[test]
fn calls_match_by_id_out_of_order() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let mut wire = Vec::new();
    let mut ids = HashMap::new();
    for user in 0..5u32 {
        let body = format!("call {user}");
        let (id, d) = client
            .start_call(now, head("/t.S/Echo"), body.as_bytes(), user)
            .unwrap();
        ids.insert(id, user);
        wire.push(d);
    }
    wire.reverse();
    let mut reqs: Vec<_> = wire.iter().map(|d| request(&mut server, now, d)).collect();
    reqs.swap(0, 3);
    let responses: Vec<_> = reqs
        .into_iter()
        .map(|r| echo(&mut server, now, r))
        .collect();
    for d in &responses {
        client.handle_datagram(now, d);
    }
    let done = events(&mut client);
    assert_eq!(done.len(), 5);
    for ev in done {
        assert_eq!(ids[&ev.id], ev.user);
        let resp = ev.result.unwrap();
        assert!(resp.status.is_ok());
        assert_eq!(&resp.body[..], format!("call {}", ev.user).as_bytes());
    }
    assert_eq!(client.calls_in_flight(), 0);
    assert_eq!(server.running(), 0);
}

#[test]
fn oversize_request_is_refused_locally() {
    let now = Instant::now();
    let (mut client, _) = pair();
    let body = vec![7u8; DEFAULT_MAX_DATAGRAM];
    let err = client
        .start_call(now, head("/t.S/Big"), &body[..], 9)
        .unwrap_err();
    assert_eq!(err.user, 9);
    assert_eq!(err.status.code(), Code::ResourceExhausted);
    let msg = err.status.message();
    assert!(msg.contains("1200") && msg.contains("1230"), "{msg}");
    assert_eq!(client.calls_in_flight(), 0);
    assert_eq!(client.poll_timeout(), None);
    // Exactly the limit fits: 20 header + 10 head + body.
    let fits = vec![7u8; DEFAULT_MAX_DATAGRAM - 20 - 10];
    let (_, d) = client
        .start_call(now, head("/t.S/Big"), &fits[..], 1)
        .unwrap();
    assert_eq!(d.len(), DEFAULT_MAX_DATAGRAM);
}

#[test]
fn oversize_response_becomes_resource_exhausted() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let (_, d) = client.start_call(now, head("/t.S/Big"), b"x", 1).unwrap();
    let req = request(&mut server, now, &d);
    let big = vec![0u8; 5000];
    let resp = server
        .respond(now, req.token, &Status::ok(), [], &big[..])
        .unwrap();
    assert!(resp.len() <= DEFAULT_MAX_DATAGRAM);
    client.handle_datagram(now, &resp);
    let ev = events(&mut client).pop().unwrap();
    let status = ev.result.unwrap().status;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_datagram of 1200"),
        "{status}"
    );
}

#[test]
fn garbage_truncated_and_multi_frame_datagrams_are_ignored() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let (a, da) = client.start_call(now, head("/t.S/A"), b"a", 1).unwrap();
    let (_, db) = client.start_call(now, head("/t.S/B"), b"b", 2).unwrap();

    let doubled = [&da[..], &da[..]].concat();
    let trailing = [&da[..], b"!"].concat();
    let bad: Vec<&[u8]> = vec![
        b"",
        b"hello",
        &da[..da.len() - 1],
        &da[..10],
        &doubled,
        &trailing,
    ];
    for d in &bad {
        assert!(server.handle_datagram(now, CLIENT, d).is_none());
    }
    assert_eq!(server.stats().ignored, bad.len() as u64);
    assert_eq!(server.tracked(), 0);

    let ra = serve(&mut server, now, &da);
    let rb = serve(&mut server, now, &db);
    let doubled = [&ra[..], &ra[..]].concat();
    for d in [
        &b"garbage"[..],
        &ra[..ra.len() - 1],
        &doubled,
        &da, // a request is not a response
    ] {
        client.handle_datagram(now, d);
    }
    assert_eq!(client.ignored(), 4);
    assert!(events(&mut client).is_empty());
    assert_eq!(client.calls_in_flight(), 2);
    client.handle_datagram(now, &rb);
    client.handle_datagram(now, &ra);
    let done = events(&mut client);
    assert_eq!(done.len(), 2);
    assert!(done.iter().any(|e| e.id == a && e.user == 1));
}

#[test]
fn malformed_head_is_answered_with_invalid_argument() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let (_, d) = client.start_call(now, head("/t.S/A"), b"", 1).unwrap();
    let mut bad = d.to_vec();
    // The head starts right after the header: make its first key a bad wire type.
    bad[20] = 0x0f;
    let Some(ServerInput::Reply { to, datagram }) = server.handle_datagram(now, CLIENT, &bad)
    else {
        panic!()
    };
    assert_eq!(to, CLIENT);
    client.handle_datagram(now, &datagram);
    let ev = events(&mut client).pop().unwrap();
    assert_eq!(ev.result.unwrap().status.code(), Code::InvalidArgument);
}

#[test]
fn deadline_expiry_fails_the_call_once() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let deadline = now + Duration::from_secs(1);
    let (id, d) = client
        .start_call(now, head("/t.S/Slow").with_deadline(deadline), b"", 5)
        .unwrap();
    let req = request(&mut server, now, &d);
    let left = req.deadline.unwrap() - now;
    assert!(left <= Duration::from_secs(1) && left > Duration::from_millis(999));
    assert_eq!(client.poll_timeout(), Some(deadline));
    client.handle_timeout(deadline - Duration::from_millis(1));
    assert!(events(&mut client).is_empty());
    client.handle_timeout(deadline);
    let ev = events(&mut client).pop().unwrap();
    assert_eq!((ev.id, ev.user), (id, 5));
    assert_eq!(ev.result.unwrap_err().code(), Code::DeadlineExceeded);
    assert_eq!(client.poll_timeout(), None);
    // The late response is ignored.
    let late = echo(&mut server, deadline, req);
    client.handle_datagram(deadline, &late);
    assert!(events(&mut client).is_empty());
    assert_eq!(client.ignored(), 1);
    // A non-idempotent call is never resent.
    assert!(client.poll_transmit().is_none());
}

#[test]
fn retransmit_recovers_drops_and_the_server_runs_the_call_once() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let deadline = now + Duration::from_secs(5);
    let (id, first) = client
        .start_idempotent_call(now, head("/t.S/Get").with_deadline(deadline), b"k", 3)
        .unwrap();
    // The first request is lost.
    drop(first);
    let t1 = client.poll_timeout().unwrap();
    assert_eq!(t1, now + Duration::from_millis(250));
    client.handle_timeout(t1);
    let resend = client.poll_transmit().unwrap();
    assert!(client.poll_transmit().is_none());
    let mut runs = 0;
    let req = request(&mut server, t1, &resend);
    runs += 1;
    // The network duplicates the resend while the handler runs: dropped.
    assert!(server.handle_datagram(t1, CLIENT, &resend).is_none());
    assert_eq!(server.stats().duplicates_dropped, 1);
    let response = echo(&mut server, t1, req);
    // The response is lost too; the next retransmit, 500 ms later, is answered from cache.
    drop(response);
    let t2 = client.poll_timeout().unwrap();
    assert_eq!(t2, t1 + Duration::from_millis(500));
    client.handle_timeout(t2);
    let resend2 = client.poll_transmit().unwrap();
    assert_eq!(resend2, resend, "a retransmit is the same datagram");
    let Some(ServerInput::Reply { to, datagram }) = server.handle_datagram(t2, CLIENT, &resend2)
    else {
        panic!("the duplicate must be answered from the cache")
    };
    assert_eq!((to, runs), (CLIENT, 1));
    assert_eq!(server.stats().duplicates_answered, 1);
    client.handle_datagram(t2, &datagram);
    client.handle_datagram(t2, &datagram); // duplicated response: ignored
    let done = events(&mut client);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].id, done[0].user), (id, 3));
    assert_eq!(client.ignored(), 1);
    assert_eq!(client.poll_timeout(), None);
}

#[test]
fn idempotent_call_without_deadline_gives_up_after_max_retransmits() {
    let now = Instant::now();
    let (mut client, _) = pair();
    let (id, _) = client
        .start_idempotent_call(now, head("/t.S/Get"), b"", 0)
        .unwrap();
    let mut resends = 0;
    let mut last = now;
    while let Some(at) = client.poll_timeout() {
        assert!(at > last);
        last = at;
        client.handle_timeout(at);
        resends += std::iter::from_fn(|| client.poll_transmit()).count();
    }
    assert_eq!(resends, 4);
    // 250 + 500 + 1000 + 2000 + a final 4000 ms wait.
    assert_eq!(last - now, Duration::from_millis(7750));
    let ev = events(&mut client).pop().unwrap();
    assert_eq!(ev.id, id);
    assert_eq!(ev.result.unwrap_err().code(), Code::Unavailable);
}

#[test]
fn responses_for_unknown_finished_or_cancelled_calls_are_ignored() {
    let now = Instant::now();
    let (mut client, mut server) = pair();
    let (a, da) = client.start_call(now, head("/t.S/A"), b"", 1).unwrap();
    let (_, db) = client.start_call(now, head("/t.S/B"), b"", 2).unwrap();
    let ra = serve(&mut server, now, &da);
    let rb = serve(&mut server, now, &db);
    assert_eq!(client.cancel(a), Some(1));
    assert_eq!(client.cancel(a), None);
    client.handle_datagram(now, &ra);
    client.handle_datagram(now, &rb);
    client.handle_datagram(now, &rb);
    let done = events(&mut client);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].user, 2);
    assert_eq!(client.ignored(), 2);
    // A response to an id this client never used.
    let mut other: DatagramClient<u32> = DatagramClient::new(DatagramConfig::default(), 900);
    let (_, dx) = other.start_call(now, head("/t.S/X"), b"", 0).unwrap();
    let rx = serve(&mut server, now, &dx);
    client.handle_datagram(now, &rx);
    assert_eq!(client.ignored(), 3);
    assert!(events(&mut client).is_empty());
}

#[test]
fn server_memory_is_bounded() {
    let now = Instant::now();
    let config = DatagramConfig {
        max_tracked: 4,
        ..DatagramConfig::default()
    };
    let mut server = DatagramServer::new(config, 1);
    let mut client: DatagramClient<()> = DatagramClient::new(config, 1);
    for i in 0..20u16 {
        let (_, d) = client.start_call(now, head("/t.S/A"), b"", ()).unwrap();
        let Some(ServerInput::Request(req)) = server.handle_datagram(now, i, &d) else {
            panic!()
        };
        server
            .respond(now, req.token, &Status::ok(), [], &b""[..])
            .unwrap();
        assert!(server.tracked() <= 4);
    }
    assert_eq!(server.stats().evicted, 16);
    // Everything is forgotten once the window has passed.
    let later = now + config.duplicate_window + Duration::from_millis(1);
    assert!(server.handle_datagram(later, 0, b"junk").is_none());
    assert_eq!(server.tracked(), 0);
}

#[test]
fn same_id_with_different_bytes_is_a_new_call() {
    let now = Instant::now();
    let mut server = DatagramServer::new(DatagramConfig::default(), 1);
    let mut c1: DatagramClient<()> = DatagramClient::new(DatagramConfig::default(), 1);
    let mut c2: DatagramClient<()> = DatagramClient::new(DatagramConfig::default(), 1);
    let (_, d1) = c1.start_call(now, head("/t.S/A"), b"one", ()).unwrap();
    let (_, d2) = c2.start_call(now, head("/t.S/A"), b"two", ()).unwrap();
    let r1 = request(&mut server, now, &d1);
    server
        .respond(now, r1.token, &Status::ok(), [], &b""[..])
        .unwrap();
    let r2 = request(&mut server, now, &d2);
    assert_eq!(&r2.body[..], b"two");
}

/// A lossy network: every datagram may be dropped or duplicated (seeded, deterministic).
/// Every call finishes exactly once and idempotent handlers never run twice per call.
#[test]
fn every_call_finishes_exactly_once_on_a_lossy_network() {
    let start = Instant::now();
    let (mut client, mut server) = pair();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut roll = move |percent: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % 100 < percent
    };
    let mut to_server: Vec<Bytes> = Vec::new();
    let mut to_client: Vec<Bytes> = Vec::new();
    let mut started = HashMap::<CallId, u32>::new();
    let mut finished = HashMap::<CallId, u32>::new();
    let mut runs = HashMap::<Bytes, u32>::new();
    let mut now = start;
    for step in 0..400u32 {
        now += Duration::from_millis(50);
        if step < 200 {
            let deadline = now + Duration::from_secs(3);
            let body = step.to_be_bytes();
            let h = head("/t.S/Get").with_deadline(deadline);
            let (id, d) = if step % 2 == 0 {
                client.start_idempotent_call(now, h, &body, step).unwrap()
            } else {
                client.start_call(now, h, &body, step).unwrap()
            };
            started.insert(id, step);
            to_server.push(d);
        }
        client.handle_timeout(now);
        to_server.extend(std::iter::from_fn(|| client.poll_transmit()));
        for d in std::mem::take(&mut to_server) {
            let copies = if roll(25) {
                0
            } else if roll(20) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                match server.handle_datagram(now, CLIENT, &d) {
                    Some(ServerInput::Request(req)) => {
                        *runs.entry(req.body.clone()).or_default() += 1;
                        to_client.push(echo(&mut server, now, req));
                    }
                    Some(ServerInput::Reply { datagram, .. }) => to_client.push(datagram),
                    None => {}
                }
            }
        }
        for d in std::mem::take(&mut to_client) {
            let copies = if roll(25) {
                0
            } else if roll(20) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                client.handle_datagram(now, &d);
            }
        }
        for ev in events(&mut client) {
            assert_eq!(started[&ev.id], ev.user);
            *finished.entry(ev.id).or_default() += 1;
            if let Ok(r) = ev.result {
                assert_eq!(&r.body[..], ev.user.to_be_bytes());
            }
        }
    }
    // Let every deadline pass.
    while let Some(at) = client.poll_timeout() {
        client.handle_timeout(at);
        while client.poll_transmit().is_some() {}
        for ev in events(&mut client) {
            *finished.entry(ev.id).or_default() += 1;
        }
    }
    assert_eq!(finished.len(), started.len());
    assert!(finished.values().all(|&n| n == 1));
    assert!(runs.values().all(|&n| n == 1), "a request ran twice");
    assert_eq!(client.calls_in_flight(), 0);
    assert!(server.stats().duplicates_answered + server.stats().duplicates_dropped > 0);
}

proptest! {
    #[test]
    fn arbitrary_datagrams_never_panic(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..16),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
    ) {
        let now = Instant::now();
        let (mut client, mut server) = pair();
        let (_, d) = client.start_call(now, head("/t.S/A"), b"body", 1).unwrap();
        // Mutations of a valid request and response, plus raw bytes.
        let mut req = d.to_vec();
        let resp = serve(&mut server, now, &d).to_vec();
        let mut resp_m = resp.clone();
        for (i, v) in &flips {
            let n = req.len();
            req[i % n] ^= v;
            let n = resp_m.len();
            resp_m[i % n] ^= v;
        }
        let mut inputs = datagrams;
        inputs.push(req);
        inputs.push(resp_m);
        for (i, bytes) in inputs.iter().enumerate() {
            if let Some(ServerInput::Request(r)) = server.handle_datagram(now, i as u16, bytes) {
                let _ = server.respond(now, r.token, &Status::ok(), [], &b""[..]);
            }
            client.handle_datagram(now, bytes);
        }
        let _ = events(&mut client);
    }
}
