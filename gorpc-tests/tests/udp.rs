//! Calls over UDP on 127.0.0.1, on every runtime pairing.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{AbortHandle, Abortable, Either};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use gorpc::proto::datagram::{DatagramClient, DatagramConfig, DatagramServer, ServerInput};
use gorpc::proto::CallHead;
use gorpc::runtime::UdpSocket;
use gorpc::udp::{UdpChannel, UdpClientConfig, UdpServer, IDEMPOTENT};
use gorpc::{
    CallOptions, Client, Code, Metadata, Router, Runtime, ServerReply, ServerRequest, Shutdown,
    Status,
};
use gorpc_tests::{concurrent_echoes, loopback, on_every_runtime, sleep, within, SECOND};

const ECHO: &str = "/test.Echo/Echo";
const BIG: &str = "/test.Echo/Big";
const HANG: &str = "/test.Hang/Forever";
const SLOW: &str = "/test.Echo/Slow";

/// Retransmits soon and often, so that datagrams lost on a loaded machine (or dropped on
/// purpose by the relay) cost little time.
fn client_config() -> UdpClientConfig {
    UdpClientConfig {
        datagram: DatagramConfig {
            retransmit_interval: Duration::from_millis(25),
            max_retransmits: 9,
            ..DatagramConfig::default()
        },
        default_timeout: Duration::from_secs(20),
        ..UdpClientConfig::default()
    }
}

fn timeout(d: Duration) -> CallOptions {
    CallOptions {
        timeout: Some(d),
        ..CallOptions::default()
    }
}

/// Sends on `tx` when dropped: proves a handler future was dropped.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// `ECHO` echoes raw bodies (bodies starting with an odd byte first wait a tick, so both the
/// inline and the spawned handler paths run) and counts its runs; `BIG` answers 2,000 bytes;
/// `SLOW` answers after 200 ms; `HANG` never answers and signals on `dropped` when its
/// future is dropped.
fn router<S: Runtime>(
    server: &S,
    echo_runs: Arc<AtomicU64>,
    dropped: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
) -> Router {
    let (rt, slow_rt) = (server.clone(), server.clone());
    Router::new()
        .route(ECHO, move |req: ServerRequest| {
            let rt = rt.clone();
            echo_runs.fetch_add(1, Ordering::Relaxed);
            async move {
                if req.body.first().is_some_and(|b| b % 2 == 1) {
                    sleep(&rt, Duration::from_micros(1)).await;
                }
                ServerReply::ok(req.body)
            }
        })
        .route(BIG, |_req: ServerRequest| async move {
            ServerReply::ok(Bytes::from(vec![1u8; 2000]))
        })
        .route(SLOW, move |req: ServerRequest| {
            let rt = slow_rt.clone();
            async move {
                sleep(&rt, Duration::from_millis(200)).await;
                ServerReply::ok(req.body)
            }
        })
        .route(HANG, move |_req: ServerRequest| {
            let guard = DropSignal(dropped.lock().unwrap().pop());
            async move {
                let _guard = guard;
                futures::future::pending::<ServerReply>().await
            }
        })
}

fn plain_router<S: Runtime>(server: &S) -> Router {
    router(server, Arc::default(), Arc::default())
}

/// A server-streaming method, which UDP cannot carry.
const WATCH: &str = "/test.Udp/Watch";

async fn recv_from<U: UdpSocket>(socket: &U, buf: &mut [u8]) -> (usize, SocketAddr) {
    poll_fn(|cx| socket.poll_recv_from(cx, buf))
        .await
        .expect("UDP receive")
}

async fn send_to<U: UdpSocket>(socket: &U, datagram: &[u8], to: SocketAddr) {
    poll_fn(|cx| socket.poll_send_to(cx, datagram, to))
        .await
        .expect("UDP send");
}

/// A datagram received on `socket` within `limit`, if any.
async fn recv_within<R: Runtime, U: UdpSocket>(
    runtime: &R,
    socket: &U,
    limit: Duration,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let received = recv_from(socket, &mut buf).boxed();
    let len = match futures::future::select(received, sleep(runtime, limit).boxed()).await {
        Either::Left(((len, _), _)) => len,
        Either::Right(_) => return None,
    };
    Some(buf[..len].to_vec())
}

async fn calls_succeed<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = UdpServer::new(server_rt.clone(), plain_router(&server_rt))
        .bind(loopback())
        .await
        .unwrap();
    // A burst of 1,000 datagrams can overflow a socket's receive buffer: resends cover it.
    let config = client_config().idempotent(ECHO);
    let client = Client::udp(client_rt.clone(), server.local_addr(), config)
        .await
        .unwrap();
    let bodies = (0..1000u32).map(|i| Bytes::from(format!("{}-call-{i}", i % 10)));
    concurrent_echoes(&client_rt, &client, ECHO, bodies).await;

    // Typed calls go through the same client.
    let router = Router::new().msgpack("/test.Greeter/Hello", |name: String| async move {
        Ok::<_, Status>(format!("Hello, {name}!"))
    });
    let greeter = UdpServer::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::udp(client_rt.clone(), greeter.local_addr(), client_config())
        .await
        .unwrap();
    let reply: String = within(
        &client_rt,
        10 * SECOND,
        "typed call",
        client.call("/test.Greeter/Hello", &"udp".to_string()),
    )
    .await
    .unwrap();
    assert_eq!(reply, "Hello, udp!");

    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
    assert_eq!(greeter.shutdown(SECOND).await, Shutdown::Graceful);
}

async fn oversize_request_is_refused_and_the_server_keeps_serving<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let echo_runs = Arc::new(AtomicU64::new(0));
    let server = UdpServer::new(
        server_rt.clone(),
        router(&server_rt, echo_runs.clone(), Arc::default()),
    )
    .bind(loopback())
    .await
    .unwrap();
    let client = Client::udp(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let call = |method: &'static str, body: Bytes| {
        let client = client.clone();
        let rt = client_rt.clone();
        async move {
            within(&rt, 10 * SECOND, method, async {
                client.call_raw(method, 0, body, timeout(5 * SECOND)).await
            })
            .await
        }
    };

    // Refused locally, naming the request's size and the limit; nothing is sent.
    let err = call(ECHO, Bytes::from(vec![0u8; 2000])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    let message = err.message();
    assert!(
        message.contains("exceeds max_datagram of 1200 bytes"),
        "{message}"
    );
    let size: usize = message
        .strip_prefix("request of ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request size in {message:?}"));
    assert!(size > 2000, "{message}");
    assert_eq!(
        echo_runs.load(Ordering::Relaxed),
        0,
        "an oversize request was sent"
    );

    // An answer that does not fit comes back as a clear error from the server.
    let err = call(BIG, Bytes::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        err.message().starts_with("response of ")
            && err.message().contains("exceeds max_datagram of 1200 bytes"),
        "{err}"
    );

    // A request that fits goes through: the server kept serving.
    let rsp = call(ECHO, Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(&rsp.body[..], b"after");
    assert_eq!(echo_runs.load(Ordering::Relaxed), 1);
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

async fn unknown_method_is_unimplemented<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let router = plain_router(&server_rt).stream_route(
        WATCH,
        gorpc::proto::StreamKind::ServerStreaming,
        |_req: ServerRequest| async move { ServerReply::ok(Bytes::new()) },
    );
    let server = UdpServer::new(server_rt.clone(), router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::udp(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let err = within(&client_rt, 10 * SECOND, "unknown method", async {
        client
            .call_raw("/test.Nope/Missing", 0, Bytes::new(), timeout(5 * SECOND))
            .await
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    assert!(err.message().contains("/test.Nope/Missing"), "{err}");
    // A stream method is known but cannot be carried: refused the same way, saying why.
    let err = within(&client_rt, 10 * SECOND, "stream method", async {
        client
            .call_raw(WATCH, 0, Bytes::new(), timeout(5 * SECOND))
            .await
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    assert!(err.message().contains("stream method"), "{err}");
    let rsp = within(&client_rt, 10 * SECOND, "echo", async {
        client
            .call_raw(ECHO, 0, Bytes::from_static(b"ok"), timeout(5 * SECOND))
            .await
    })
    .await
    .unwrap();
    assert_eq!(&rsp.body[..], b"ok");
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

/// Datagrams that are not one whole request frame.
fn garbage() -> Vec<Vec<u8>> {
    let now = Instant::now();
    let mut client: DatagramClient<()> = DatagramClient::new(DatagramConfig::default(), 77);
    let (_, request) = client
        .start_call(now, CallHead::new(ECHO, 0), &b"garbage"[..], ())
        .unwrap();
    let mut server = DatagramServer::new(DatagramConfig::default(), 1);
    let Some(ServerInput::Request(req)) = server.handle_datagram(now, 1u8, &request) else {
        panic!("the core refused a valid request");
    };
    let response = server
        .respond(now, req.token, &Status::ok(), [], Bytes::new())
        .unwrap();
    let mut id_zero = request.to_vec();
    id_zero[8..12].fill(0);
    let mut with_trailer = request.to_vec();
    with_trailer.extend_from_slice(b"trailing");
    let mut twice = request.to_vec();
    twice.extend_from_slice(&request);
    vec![
        Vec::new(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
        request[..request.len() - 1].to_vec(),
        request[..10].to_vec(),
        with_trailer,
        twice,
        id_zero,
        response.to_vec(),
    ]
}

async fn garbage_datagrams_do_not_disturb_calls<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server = UdpServer::new(server_rt.clone(), plain_router(&server_rt))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::udp(
        client_rt.clone(),
        server.local_addr(),
        client_config().idempotent(ECHO),
    )
    .await
    .unwrap();
    let attacker = client_rt.bind_udp(loopback()).await.unwrap();
    let garbage = garbage();

    // Garbage and calls interleaved.
    let sent = AtomicU64::new(0);
    let flood = async {
        for _ in 0..20 {
            for datagram in &garbage {
                send_to(&attacker, datagram, server.local_addr()).await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            sleep(&client_rt, Duration::from_millis(2)).await;
        }
    };
    let bodies = (0..300u32).map(|i| Bytes::from(format!("{}-call-{i}", i % 10)));
    futures::join!(flood, concurrent_echoes(&client_rt, &client, ECHO, bodies));
    let sent = sent.load(Ordering::Relaxed);
    // The server reads its one socket in order and counts a datagram before reading the
    // next: once a call sent after the flood is answered, the flood is all counted (or
    // was dropped by the kernel, never to be counted).
    let after = client.call_raw(
        ECHO,
        0,
        Bytes::from_static(b"after"),
        CallOptions::default(),
    );
    assert_eq!(&after.await.unwrap().body[..], b"after");
    assert!(server.stats().ignored <= sent);

    // Quietly, each kind of garbage is ignored and counted, and never answered.
    let before = server.stats().ignored;
    for datagram in &garbage {
        send_to(&attacker, datagram, server.local_addr()).await;
    }
    within(&client_rt, 5 * SECOND, "garbage counted", async {
        while server.stats().ignored < before + garbage.len() as u64 {
            sleep(&client_rt, Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(server.stats().ignored, before + garbage.len() as u64);
    assert_eq!(
        recv_within(&client_rt, &attacker, Duration::from_millis(200)).await,
        None,
        "garbage was answered"
    );

    // A valid request from the same socket is answered, to that socket.
    let mut core: DatagramClient<()> = DatagramClient::new(DatagramConfig::default(), 5);
    let (_, request) = core
        .start_call(Instant::now(), CallHead::new(ECHO, 0), &b"valid"[..], ())
        .unwrap();
    send_to(&attacker, &request, server.local_addr()).await;
    let answer = recv_within(&client_rt, &attacker, 5 * SECOND)
        .await
        .expect("a valid request is answered to its sender");
    core.handle_datagram(Instant::now(), &answer);
    let finished = core.poll_event().expect("the answer matches the call");
    assert_eq!(&finished.result.unwrap().body[..], b"valid");
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

/// Calls `HANG` with `limit` (`None`: no timeout of its own, the default is 300 ms) and
/// checks that it fails with `DeadlineExceeded` when its deadline passes, not before, and
/// not much later.
async fn hang_until_deadline<C: Runtime>(client_rt: &C, client: &Client, limit: Option<Duration>) {
    let options = CallOptions {
        timeout: limit,
        ..CallOptions::default()
    };
    let started = Instant::now();
    let err = within(client_rt, 10 * SECOND, "a call past its deadline", async {
        client.call_raw(HANG, 0, Bytes::new(), options).await
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    let expected = limit.unwrap_or(Duration::from_millis(300));
    assert!(started.elapsed() >= expected, "{:?}", started.elapsed());
    assert!(
        started.elapsed() < expected + 2 * SECOND,
        "{:?}",
        started.elapsed()
    );
}

async fn expired_deadline_gives_deadline_exceeded<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let dropped = Arc::new(Mutex::new(vec![dropped_tx]));
    let server = UdpServer::new(
        server_rt.clone(),
        router(&server_rt, Arc::default(), dropped),
    )
    .bind(loopback())
    .await
    .unwrap();
    let client = Client::udp(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();

    hang_until_deadline(&client_rt, &client, Some(Duration::from_millis(100))).await;
    // The server stops the handler at the deadline it was sent.
    within(
        &client_rt,
        5 * SECOND,
        "handler dropped at its deadline",
        dropped_rx,
    )
    .await
    .unwrap();

    // A call without a timeout gets the client's default one.
    let config = UdpClientConfig {
        default_timeout: Duration::from_millis(300),
        ..client_config()
    };
    let client = Client::udp(client_rt.clone(), server.local_addr(), config.clone())
        .await
        .unwrap();
    hang_until_deadline(&client_rt, &client, None).await;

    // The channel itself applies it to a call that reaches it without a deadline.
    let channel = UdpChannel::bind(&client_rt, server.local_addr(), config)
        .await
        .unwrap();
    hang_until_deadline(&client_rt, &Client::from_channel(channel, None), None).await;
    server.abort().await;
}

async fn dropped_call_is_forgotten<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = UdpServer::new(server_rt.clone(), plain_router(&server_rt))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::udp(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    // Marked idempotent per call: it is resent while the handler hangs, and each resend
    // reaches the server as a duplicate of a running request.
    let mut metadata = Metadata::new();
    metadata.insert(IDEMPOTENT, Bytes::new());
    let options = CallOptions {
        timeout: Some(10 * SECOND),
        metadata,
        ..CallOptions::default()
    };
    let mut call = client.call_raw(HANG, 0, Bytes::new(), options).boxed();
    // The call stays alive until a resend has reached the server (an event, however late
    // a loaded machine gets there); then its future is dropped.
    let resends = within(&client_rt, 5 * SECOND, "resends reach the server", async {
        loop {
            let n = server.stats().duplicates_dropped;
            if n > 0 {
                return n;
            }
            let tick = sleep(&client_rt, Duration::from_millis(5)).boxed();
            if let Either::Left(_) = futures::future::select(call.as_mut(), tick).await {
                panic!("a hanging call was answered");
            }
        }
    })
    .await;
    drop(call);
    // The driver takes commands in order, so once a call made after the drop is answered it
    // has forgotten the dropped one, and the server has read every resend sent before (one
    // socket to one socket on loopback, read in order).
    let marker = client
        .call_raw(
            ECHO,
            0,
            Bytes::from_static(b"after the drop"),
            CallOptions::default(),
        )
        .await
        .expect("a call after the drop is answered");
    assert_eq!(&marker.body[..], b"after the drop");
    let after_drop = server.stats().duplicates_dropped;
    assert!(after_drop >= resends);
    // Unforgotten, the call would be resent about 375 and 775 ms after it started.
    sleep(&client_rt, Duration::from_millis(700)).await;
    assert_eq!(
        server.stats().duplicates_dropped,
        after_drop,
        "a dropped call was still resent"
    );
    server.abort().await;
}

async fn shutdown_answers_calls_in_flight<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = UdpServer::new(server_rt.clone(), plain_router(&server_rt))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::udp(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let slow = client.call_raw(SLOW, 0, Bytes::from_static(b"slow"), timeout(5 * SECOND));
    let shutdown = async {
        sleep(&client_rt, Duration::from_millis(50)).await;
        server.shutdown(5 * SECOND).await
    };
    let (answer, how) = within(&client_rt, 10 * SECOND, "graceful shutdown", async {
        futures::join!(slow, shutdown)
    })
    .await;
    assert_eq!(&answer.unwrap().body[..], b"slow");
    assert_eq!(how, Shutdown::Graceful);

    // A handler that never ends is cut off after the grace period.
    let server = UdpServer::new(server_rt.clone(), plain_router(&server_rt))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::udp(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let hang = client.call_raw(HANG, 0, Bytes::new(), timeout(SECOND));
    let shutdown = async {
        sleep(&client_rt, Duration::from_millis(50)).await;
        server.shutdown(Duration::from_millis(100)).await
    };
    let (answer, how) = within(&client_rt, 10 * SECOND, "forced shutdown", async {
        futures::join!(hang, shutdown)
    })
    .await;
    assert_eq!(how, Shutdown::Forced);
    assert_eq!(answer.unwrap_err().code(), Code::DeadlineExceeded);
}

/// Forwards datagrams between one client and `server`, dropping every third datagram each
/// way and sending every fifth one towards the server twice.
struct Relay {
    addr: SocketAddr,
    dropped: Arc<AtomicU64>,
    duplicated: Arc<AtomicU64>,
    stop: AbortHandle,
}

async fn start_relay<R: Runtime>(runtime: &R, server: SocketAddr) -> Relay {
    let outer = Arc::new(runtime.bind_udp(loopback()).await.unwrap());
    let inner = Arc::new(runtime.bind_udp(loopback()).await.unwrap());
    let addr = outer.local_addr().unwrap();
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let dropped = Arc::new(AtomicU64::new(0));
    let duplicated = Arc::new(AtomicU64::new(0));
    let up = {
        let (outer, inner, client) = (outer.clone(), inner.clone(), client.clone());
        let (dropped, duplicated) = (dropped.clone(), duplicated.clone());
        async move {
            let mut buf = vec![0u8; 65536];
            for n in 1u64.. {
                let (len, from) = recv_from(&*outer, &mut buf).await;
                *client.lock().unwrap() = Some(from);
                if n % 3 == 0 {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                send_to(&*inner, &buf[..len], server).await;
                if n % 5 == 0 {
                    duplicated.fetch_add(1, Ordering::Relaxed);
                    send_to(&*inner, &buf[..len], server).await;
                }
            }
        }
    };
    let down = {
        let dropped = dropped.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            for n in 1u64.. {
                let (len, _) = recv_from(&*inner, &mut buf).await;
                let to = *client.lock().unwrap();
                if n % 3 == 0 {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(to) = to {
                    send_to(&*outer, &buf[..len], to).await;
                }
            }
        }
    };
    let (stop, registration) = AbortHandle::new_pair();
    let relay = Abortable::new(futures::future::join(up, down), registration);
    runtime.spawn(async move {
        let _ = relay.await;
    });
    Relay {
        addr,
        dropped,
        duplicated,
        stop,
    }
}

async fn lossy_path_resends_idempotent_calls_and_never_runs_a_request_twice<
    S: Runtime,
    C: Runtime,
>(
    server_rt: S,
    client_rt: C,
) {
    const IDEM: &str = "/test.Count/Idempotent";
    const ONCE: &str = "/test.Count/Once";
    let runs: Arc<Mutex<HashMap<Bytes, u32>>> = Arc::default();
    let count = |runs: Arc<Mutex<HashMap<Bytes, u32>>>, rt: S| {
        move |req: ServerRequest| {
            *runs.lock().unwrap().entry(req.body.clone()).or_default() += 1;
            let rt = rt.clone();
            async move {
                // Some handlers are still running when a duplicate arrives.
                if req.body.first().is_some_and(|b| b % 2 == 1) {
                    sleep(&rt, Duration::from_millis(20)).await;
                }
                ServerReply::ok(req.body)
            }
        }
    };
    let router = Router::new()
        .route(IDEM, count(runs.clone(), server_rt.clone()))
        .route(ONCE, count(runs.clone(), server_rt.clone()));
    let server = UdpServer::new(server_rt.clone(), router)
        .bind(loopback())
        .await
        .unwrap();
    let relay = start_relay(&server_rt, server.local_addr()).await;
    let client = Client::udp(
        client_rt.clone(),
        relay.addr,
        client_config().idempotent(IDEM),
    )
    .await
    .unwrap();

    let calls = |method: &'static str, prefix: &'static str, limit: Duration| {
        let client = client.clone();
        (0..30u32)
            .map(move |i| {
                let client = client.clone();
                let body = Bytes::from(format!("{}-{prefix}-{i}", i % 10));
                async move {
                    let result = client
                        .call_raw(method, 0, body.clone(), timeout(limit))
                        .await;
                    (body, result)
                }
            })
            .collect::<FuturesUnordered<_>>()
            .collect::<Vec<_>>()
    };

    // Every idempotent call gets through, each run exactly once.
    let results = within(
        &client_rt,
        30 * SECOND,
        "idempotent calls",
        calls(IDEM, "idem", 15 * SECOND),
    )
    .await;
    for (body, result) in &results {
        let rsp = result.as_ref().expect("an idempotent call succeeds");
        assert_eq!(rsp.body, body);
        assert_eq!(runs.lock().unwrap().get(body), Some(&1), "{body:?}");
    }

    // Calls not marked idempotent are sent once: lost ones end at their deadline, and none
    // runs twice though the relay duplicates some.
    let results = within(
        &client_rt,
        30 * SECOND,
        "calls sent once",
        calls(ONCE, "once", Duration::from_millis(500)),
    )
    .await;
    let mut lost = 0;
    for (body, result) in &results {
        let ran = runs.lock().unwrap().get(body).copied().unwrap_or(0);
        match result {
            Ok(rsp) => {
                assert_eq!(rsp.body, body);
                assert_eq!(ran, 1, "{body:?}");
            }
            Err(status) => {
                assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
                assert!(ran <= 1, "{body:?} ran {ran} times");
                lost += 1;
            }
        }
    }
    assert!(
        lost > 0,
        "the relay drops every third datagram, yet no call was lost"
    );
    assert!(relay.dropped.load(Ordering::Relaxed) > 0);
    assert!(relay.duplicated.load(Ordering::Relaxed) > 0);
    let stats = server.stats();
    assert!(
        stats.duplicates_answered + stats.duplicates_dropped > 0,
        "no duplicate reached the server: {stats:?}"
    );
    relay.stop.abort();
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

on_every_runtime!(
    calls_succeed,
    oversize_request_is_refused_and_the_server_keeps_serving,
    unknown_method_is_unimplemented,
    garbage_datagrams_do_not_disturb_calls,
    expired_deadline_gives_deadline_exceeded,
    dropped_call_is_forgotten,
    shutdown_answers_calls_in_flight,
    lossy_path_resends_idempotent_calls_and_never_runs_a_request_twice,
);
