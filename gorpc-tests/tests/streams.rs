//! Stream calls over real TCP on every runtime pairing: order, flow control against a slow
//! reader, cancel and deadline mid-stream, client streams, bidirectional echo, trailers, streams
//! beside unary calls on one connection, streams to a discovered service (and counted as
//! open on their instance), and client interceptors on stream calls.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::stream::{FuturesUnordered, StreamExt};
use gorpc::proto::balance::{Balancer, Endpoint, EndpointId};
use gorpc::stream::ResponseSink;
use gorpc::{CallOptions, Client, Code, Raw, Request, Response, Router, Runtime, Server, Status};
use gorpc_tests::{client_config, loopback, on_every_runtime, sleep, within, SECOND};

const COUNT: &str = "/test.Stream/Count";
const FLOOD: &str = "/test.Stream/Flood";
const HANG: &str = "/test.Stream/Hang";
const SUM: &str = "/test.Stream/Sum";
const ECHO: &str = "/test.Stream/Echo";
const UNARY: &str = "/test.Stream/Unary";
/// Server stream of n messages of `BLOB_MESSAGE` bytes; the request holds n.
const BLOB: &str = "/test.Stream/Blob";
const BLOB_MESSAGE: usize = 64 * 1024;
/// Server stream of the request's metadata value under `x-tag` and the server's port.
const WHO: &str = "/test.Stream/Who";
/// Server stream: the request holds n; answers 0..n and ends with trailers `x-sent: n`,
/// with status OK, or FailedPrecondition when n is 0.
const TRAILED: &str = "/test.Stream/Trailed";

/// Message size of the flood: small, so the window holds many.
const FLOOD_MESSAGE: usize = 100;
/// The per-call window clients grant by default.
const WINDOW: usize = gorpc::proto::DEFAULT_STREAM_WINDOW as usize;

/// Sends on its channel when dropped: proves a handler future was dropped.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Default)]
struct Probes {
    /// Messages the flood handler got through its sink.
    flooded: AtomicUsize,
    /// Drop signals for the next hanging handlers.
    dropped: Mutex<Vec<oneshot::Sender<()>>>,
}

fn u32_body(n: u32) -> Bytes {
    Bytes::copy_from_slice(&n.to_le_bytes())
}

fn body_u32(body: &[u8]) -> u32 {
    u32::from_le_bytes(body.try_into().expect("4-byte message"))
}

fn router<S: Runtime>(server_rt: S, probes: Arc<Probes>) -> Router {
    let flood_probes = probes.clone();
    Router::new()
        // Count: the request holds n; answers 0..n, each a 4-byte message.
        .server_stream(COUNT, Raw, |req: Request<Bytes>, mut sink: ResponseSink<Bytes>| async move {
            let n = body_u32(&req.message);
            for i in 0..n {
                sink.send(&u32_body(i)).await?;
            }
            Ok(())
        })
        // Flood: sends small messages until the call ends, counting them.
        .server_stream(FLOOD, Raw, move |_req: Request<Bytes>, mut sink: ResponseSink<Bytes>| {
            let probes = flood_probes.clone();
            async move {
                let body = Bytes::from(vec![7u8; FLOOD_MESSAGE]);
                loop {
                    sink.send(&body).await?;
                    probes.flooded.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        // Hang: sends one message every 10 ms forever; signals when dropped.
        .server_stream(HANG, Raw, move |_req: Request<Bytes>, mut sink: ResponseSink<Bytes>| {
            let guard = DropSignal(probes.dropped.lock().unwrap().pop());
            let rt = server_rt.clone();
            async move {
                let _guard = guard;
                for i in 0u32.. {
                    sink.send(&u32_body(i)).await?;
                    sleep(&rt, Duration::from_millis(10)).await;
                }
                Ok(())
            }
        })
        // Blob: the request holds n; answers n large messages.
        .server_stream(BLOB, Raw, |req: Request<Bytes>, mut sink: ResponseSink<Bytes>| async move {
            let blob = Bytes::from(vec![3u8; BLOB_MESSAGE]);
            for _ in 0..body_u32(&req.message) {
                sink.send(&blob).await?;
            }
            Ok(())
        })
        .server_stream(TRAILED, Raw, |req: Request<Bytes>, mut sink: ResponseSink<Bytes>| async move {
            let n = body_u32(&req.message);
            for i in 0..n {
                sink.send(&u32_body(i)).await?;
            }
            sink.set_trailers([("x-first", "overwritten")].into_iter().collect());
            sink.set_trailers([("x-sent", n.to_string())].into_iter().collect());
            if n == 0 {
                return Err(Status::new(Code::FailedPrecondition, "nothing to send"));
            }
            Ok(())
        })
        // Sum: adds the client's 4-byte numbers.
        .client_stream(SUM, Raw, |req: Request<gorpc::stream::RequestStream<Bytes>>| async move {
            let mut messages = req.message;
            let mut sum = 0u32;
            while let Some(message) = messages.next().await {
                sum = sum.wrapping_add(body_u32(&message?));
            }
            Ok(Response::new(u32_body(sum)))
        })
        // Echo: each client message back, then OK when the client finishes.
        .bidi(
            ECHO,
            Raw,
            |req: Request<gorpc::stream::RequestStream<Bytes>>, mut sink: ResponseSink<Bytes>| async move {
                let mut messages = req.message;
                let mut echoed = 0u32;
                while let Some(message) = messages.next().await {
                    sink.send(&message?).await?;
                    echoed += 1;
                }
                sink.set_trailers([("x-echoed", echoed.to_string())].into_iter().collect());
                Ok(())
            },
        )
        .route(UNARY, |req: gorpc::ServerRequest| async move {
            gorpc::ServerReply::ok(req.body)
        })
}

/// Answers WHO with two messages: the `x-tag` metadata it got, then its own port.
fn who_router(port: Arc<AtomicUsize>) -> Router {
    Router::new().server_stream(
        WHO,
        Raw,
        move |req: Request<Bytes>, mut sink: ResponseSink<Bytes>| {
            let port = port.load(Ordering::SeqCst) as u32;
            let tag = req.metadata.get("x-tag").cloned().unwrap_or_default();
            async move {
                sink.send(&tag).await?;
                sink.send(&u32_body(port)).await?;
                Ok(())
            }
        },
    )
}

async fn who_server<S: Runtime>(
    rt: &S,
    registry: gorpc::discovery::MemoryRegistry,
) -> gorpc::ServerHandle<S> {
    let port = Arc::new(AtomicUsize::new(0));
    let server = Server::new(rt.clone(), who_router(port.clone()))
        .register(registry, gorpc::discovery::Registration::new("who"))
        .bind(loopback())
        .await
        .unwrap();
    port.store(server.local_addr().port() as usize, Ordering::SeqCst);
    server
}

/// Tags every stream call it sees; refuses methods under `/refused`.
struct Tagger;

impl gorpc::ClientInterceptor for Tagger {
    fn intercept(
        &self,
        call: gorpc::client::OutgoingCall,
        next: gorpc::ClientNext,
    ) -> gorpc::BoxFuture<'static, Result<gorpc::RawResponse, Status>> {
        next.run(call)
    }

    fn intercept_stream(&self, call: &mut gorpc::client::OutgoingCall) -> Result<(), Status> {
        if call.method.starts_with("/refused") {
            return Err(Status::new(Code::PermissionDenied, "not this one"));
        }
        call.metadata.insert("x-tag", "tagged");
        Ok(())
    }
}

/// Streams to a discovered service go round robin over its instances, skip one that
/// cannot be reached, and carry what client interceptors add to the opening call.
async fn streams_to_a_discovered_service<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let registry = gorpc::discovery::MemoryRegistry::new();
    let servers = [
        who_server(&server_rt, registry.clone()).await,
        who_server(&server_rt, registry.clone()).await,
    ];
    // A port that refuses connections: bound, then closed.
    let dead = std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    registry.insert("who", gorpc::discovery::Instance::new(dead));
    let client = Client::builder(client_rt.clone())
        .discover(registry.clone(), "who")
        .balance(gorpc::proto::balance::RoundRobin::new(0))
        .interceptor(Tagger)
        .build()
        .unwrap();
    let mut ports = std::collections::HashMap::<u32, usize>::new();
    for _ in 0..30 {
        let mut stream = client
            .server_stream(WHO, Raw, &Bytes::new(), long_call())
            .await
            .expect("the unreachable instance is skipped");
        let tag: Bytes = stream.next().await.unwrap().unwrap();
        assert_eq!(
            tag, "tagged",
            "the interceptor's metadata reached the handler"
        );
        let port = body_u32(&stream.next().await.unwrap().unwrap());
        assert!(stream.next().await.is_none(), "the stream ends OK");
        *ports.entry(port).or_default() += 1;
    }
    let live: Vec<u32> = servers
        .iter()
        .map(|s| s.local_addr().port() as u32)
        .collect();
    assert_eq!(ports.len(), 2, "both live instances served: {ports:?}");
    assert!(ports.keys().all(|p| live.contains(p)), "{ports:?}");
    let refused = client
        .server_stream::<_, Bytes, Bytes>("/refused.Who/Who", Raw, &Bytes::new(), long_call())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    for server in servers {
        assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
    }
}

/// Round robin that keeps count of the streams open on each instance, as a load-aware
/// balancer does.
struct OpenStreamCounter {
    inner: gorpc::proto::balance::RoundRobin,
    open: Arc<Mutex<std::collections::HashMap<EndpointId, i64>>>,
}

impl Balancer for OpenStreamCounter {
    fn update(&mut self, endpoints: &[Endpoint]) {
        self.inner.update(endpoints);
    }

    fn pick(&mut self, key: Option<u64>) -> Option<EndpointId> {
        self.inner.pick(key)
    }

    fn on_stream_open(&mut self, id: EndpointId) {
        *self.open.lock().unwrap().entry(id).or_default() += 1;
    }

    fn on_stream_end(&mut self, id: EndpointId) {
        *self.open.lock().unwrap().entry(id).or_default() -= 1;
    }
}

/// A stream to a discovered instance counts as open on it from its start until its end is
/// read or its receiver dropped; a unary call does not count.
async fn streams_count_as_open_on_their_instance<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let registry = gorpc::discovery::MemoryRegistry::new();
    let servers = [
        who_server(&server_rt, registry.clone()).await,
        who_server(&server_rt, registry.clone()).await,
    ];
    let open = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let client = Client::builder(client_rt.clone())
        .discover(registry.clone(), "who")
        .balance(OpenStreamCounter {
            inner: gorpc::proto::balance::RoundRobin::new(0),
            open: open.clone(),
        })
        .build()
        .unwrap();
    // The open counts, largest first.
    let counts = || {
        let mut counts: Vec<i64> = open.lock().unwrap().values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts
    };
    within(&client_rt, Duration::from_secs(30), "open streams", async {
        let mut first = client
            .server_stream::<_, Bytes, Bytes>(WHO, Raw, &Bytes::new(), long_call())
            .await
            .unwrap();
        first.next().await.unwrap().unwrap();
        assert_eq!(counts(), [1]);
        let mut second = client
            .server_stream::<_, Bytes, Bytes>(WHO, Raw, &Bytes::new(), long_call())
            .await
            .unwrap();
        second.next().await.unwrap().unwrap();
        assert_eq!(counts(), [1, 1], "one stream on each instance");
        let rsp = client
            .call_raw(WHO, 0, Bytes::new(), CallOptions::default())
            .await;
        assert!(rsp.is_err(), "WHO streams; a unary call of it is refused");
        assert_eq!(counts(), [1, 1], "unary calls are not streams");
        drop(second);
        assert_eq!(counts(), [1, 0], "a dropped stream no longer counts");
        first.next().await.unwrap().unwrap();
        assert_eq!(counts(), [1, 0], "open until its end is read");
        assert!(first.next().await.is_none());
        assert_eq!(counts(), [0, 0]);
    })
    .await;
    for server in servers {
        assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
    }
}

/// HTTP and UDP clients carry unary calls only: a stream call says so.
async fn streams_need_the_binary_protocol<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, _, _) = setup(&server_rt, &client_rt).await;
    let http = Client::http(client_rt.clone(), server.local_addr(), client_config());
    let udp = Client::udp(client_rt.clone(), server.local_addr(), Default::default())
        .await
        .unwrap();
    for client in [http, udp] {
        let status = client
            .server_stream::<_, Bytes, Bytes>(COUNT, Raw, &Bytes::new(), long_call())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status}");
    }
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

async fn setup<S: Runtime, C: Runtime>(
    server_rt: &S,
    client_rt: &C,
) -> (gorpc::ServerHandle<S>, Client, Arc<Probes>) {
    let probes = Arc::new(Probes::default());
    let server = Server::new(server_rt.clone(), router(server_rt.clone(), probes.clone()))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    (server, client, probes)
}

/// The options of a stream call that may run long.
fn long_call() -> CallOptions {
    CallOptions {
        timeout: Some(Duration::from_secs(120)),
        ..CallOptions::default()
    }
}

/// A million messages, in order, through every pairing (a debug build moves them in about
/// a second per pairing); `STREAM_MESSAGES` sets another count.
fn stream_count() -> u32 {
    std::env::var("STREAM_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

async fn server_stream_arrives_in_order<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, _) = setup(&server_rt, &client_rt).await;
    let n = stream_count();
    let request = u32_body(n);
    let started = Instant::now();
    let mut stream = client
        .server_stream(COUNT, Raw, &request, long_call())
        .await
        .unwrap();
    let mut expected = 0u32;
    within(
        &client_rt,
        Duration::from_secs(60),
        "server stream",
        async {
            while let Some(message) = stream.next().await {
                assert_eq!(
                    body_u32(&message.unwrap()),
                    expected,
                    "message out of order"
                );
                expected += 1;
            }
        },
    )
    .await;
    assert_eq!(expected, n, "every message arrived");
    eprintln!("{n} messages in {:?}", started.elapsed());
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

async fn slow_consumer_bounds_the_producer<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, probes) = setup(&server_rt, &client_rt).await;
    let mut stream = client
        .server_stream(FLOOD, Raw, &Bytes::new(), long_call())
        .await
        .unwrap();
    // Read nothing: the producer must stop at the window. Wait until it has filled the
    // window (an event, whenever a loaded machine gets there), then give it time to run
    // past the bound if flow control were broken: the bound below decides, not the wait
    // (a producer merely descheduled for a while is not mistaken for a stalled one).
    let filled = WINDOW / FLOOD_MESSAGE - 1;
    let started = Instant::now();
    while probes.flooded.load(Ordering::SeqCst) < filled {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the window was never filled"
        );
        sleep(&client_rt, Duration::from_millis(20)).await;
    }
    sleep(&client_rt, Duration::from_millis(300)).await;
    let still = probes.flooded.load(Ordering::SeqCst);
    // Sent messages (the sink returned for them) are the window's, one of overdraft, and
    // what the producer's side holds: its outbox, at most OUTBOX_LIMIT (4 bytes a message
    // more) and one message past it.
    let held = gorpc::stream::OUTBOX_LIMIT / (FLOOD_MESSAGE + 4) + 1;
    assert!(
        held * FLOOD_MESSAGE <= WINDOW,
        "the producer's side holds less than a window"
    );
    let bound = WINDOW / FLOOD_MESSAGE + 1 + held;
    assert!(
        still <= bound,
        "{still} messages of {FLOOD_MESSAGE} bytes sent to a reader that read nothing (bound {bound})"
    );
    assert!(
        still >= WINDOW / FLOOD_MESSAGE - 1,
        "only {still} messages sent: the window was not used"
    );
    // Reading lets it go on.
    within(
        &client_rt,
        Duration::from_secs(20),
        "reading resumes the flood",
        async {
            for _ in 0..(3 * bound) {
                stream.next().await.unwrap().unwrap();
            }
        },
    )
    .await;
    assert!(probes.flooded.load(Ordering::SeqCst) > still);
    drop(stream);
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

async fn dropping_the_receiver_drops_the_handler<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, client, probes) = setup(&server_rt, &client_rt).await;
    let (tx, dropped) = oneshot::channel();
    probes.dropped.lock().unwrap().push(tx);
    let mut stream = client
        .server_stream(HANG, Raw, &Bytes::new(), long_call())
        .await
        .unwrap();
    for i in 0..3u32 {
        assert_eq!(body_u32(&stream.next().await.unwrap().unwrap()), i);
    }
    drop(stream);
    within(
        &client_rt,
        Duration::from_secs(5),
        "handler dropped",
        dropped,
    )
    .await
    .expect("the guard signals, not just drops its sender");
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// Shutdown lets an open stream finish within the grace period; one that would not finish
/// is ended when the grace runs out: its handler is dropped and the client's stream ends
/// with an error rather than hanging or ending OK.
async fn shutdown_drains_or_ends_open_streams<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, _) = setup(&server_rt, &client_rt).await;
    let request = u32_body(20_000);
    let mut counted = client
        .server_stream(COUNT, Raw, &request, long_call())
        .await
        .unwrap();
    assert_eq!(body_u32(&counted.next().await.unwrap().unwrap()), 0);
    let reader = async {
        let mut next = 1u32;
        while let Some(message) = counted.next().await {
            assert_eq!(body_u32(&message.unwrap()), next);
            next += 1;
        }
        next
    };
    let drained = futures::future::join(server.shutdown(10 * SECOND), reader);
    let (outcome, taken) = within(&client_rt, Duration::from_secs(30), "drain", drained).await;
    assert_eq!(outcome, gorpc::Shutdown::Graceful);
    assert_eq!(taken, 20_000, "every message before the end");

    let (server, client, probes) = setup(&server_rt, &client_rt).await;
    let (tx, dropped) = oneshot::channel();
    probes.dropped.lock().unwrap().push(tx);
    let mut hanging = client
        .server_stream::<_, Bytes, Bytes>(HANG, Raw, &Bytes::new(), long_call())
        .await
        .unwrap();
    hanging.next().await.unwrap().unwrap();
    let reader = async {
        loop {
            match hanging.next().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => break Some(status),
                None => break None,
            }
        }
    };
    let forced = futures::future::join(server.shutdown(Duration::from_millis(300)), reader);
    let (outcome, end) = within(&client_rt, Duration::from_secs(30), "forced", forced).await;
    assert_eq!(outcome, gorpc::Shutdown::Forced);
    let status = end.expect("the stream ends with an error, not OK");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Cancelled),
        "{status}"
    );
    within(
        &client_rt,
        Duration::from_secs(5),
        "handler dropped",
        dropped,
    )
    .await
    .expect("the guard signals, not just drops its sender");
}

async fn deadline_mid_stream_ends_both_sides<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, probes) = setup(&server_rt, &client_rt).await;
    let (tx, dropped) = oneshot::channel();
    probes.dropped.lock().unwrap().push(tx);
    let options = CallOptions {
        timeout: Some(Duration::from_millis(300)),
        ..CallOptions::default()
    };
    let mut stream = client
        .server_stream(HANG, Raw, &Bytes::new(), options)
        .await
        .unwrap();
    let mut received = 0;
    let status = within(&client_rt, Duration::from_secs(5), "deadline", async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => received += 1,
                Some(Err(status)) => break status,
                None => panic!("stream ended OK past its deadline"),
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    assert!(
        received > 3,
        "messages flowed before the deadline ({received})"
    );
    assert!(
        stream.next().await.is_none(),
        "nothing after the final status"
    );
    within(
        &client_rt,
        Duration::from_secs(5),
        "handler dropped at its deadline",
        dropped,
    )
    .await
    .unwrap();
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

async fn client_stream_and_bidi_echo<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, _) = setup(&server_rt, &client_rt).await;
    within(
        &client_rt,
        Duration::from_secs(30),
        "client stream",
        async {
            let mut call = client
                .client_stream::<_, Bytes, Bytes>(SUM, Raw, CallOptions::default())
                .await
                .unwrap();
            // 40,000 messages of 4 bytes: more than the window, so the client waits for credit.
            for i in 0..40_000u32 {
                call.send(&u32_body(i)).await.unwrap();
            }
            let sum = call.finish().await.unwrap();
            let expected = (0..40_000u32).fold(0u32, |a, b| a.wrapping_add(b));
            assert_eq!(body_u32(&sum.message), expected);
        },
    )
    .await;

    within(&client_rt, Duration::from_secs(30), "bidi echo", async {
        let (mut tx, mut rx) = client
            .bidi::<_, Bytes, Bytes>(ECHO, Raw, CallOptions::default())
            .await
            .unwrap()
            .into_parts();
        // Lockstep: each message comes back before the next goes.
        for i in 0..1_000u32 {
            tx.send(&u32_body(i)).await.unwrap();
            assert_eq!(body_u32(&rx.next().await.unwrap().unwrap()), i);
        }
        // Then a burst larger than both windows, read concurrently.
        let writer = async {
            for i in 0..50_000u32 {
                tx.send(&u32_body(i)).await.unwrap();
            }
            tx.close_send().await.unwrap();
        };
        let reader = async {
            let mut next = 0u32;
            while let Some(message) = rx.next().await {
                assert_eq!(body_u32(&message.unwrap()), next);
                next += 1;
            }
            next
        };
        let ((), got) = futures::join!(writer, reader);
        assert_eq!(got, 50_000);
        let trailers = rx.trailers().expect("the call ended with trailers");
        assert_eq!(trailers.get_str("x-echoed"), Some("51000"));
    })
    .await;

    // A sum the client abandons: dropping it cancels the call, and the server carries on.
    let mut call = client
        .client_stream::<_, Bytes, Bytes>(SUM, Raw, CallOptions::default())
        .await
        .unwrap();
    call.send(&u32_body(1)).await.unwrap();
    drop(call);
    let rsp = client
        .call_raw(UNARY, 0, Bytes::from_static(b"ok"), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(rsp.body, "ok");
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// A handler's trailers reach the client after its last message, with an OK end and with
/// an error; before the end there are none.
async fn trailers_end_a_server_stream<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, _) = setup(&server_rt, &client_rt).await;
    within(&client_rt, Duration::from_secs(30), "trailers", async {
        let request = u32_body(3);
        let mut stream = client
            .server_stream::<_, Bytes, Bytes>(TRAILED, Raw, &request, long_call())
            .await
            .unwrap();
        for i in 0..3 {
            assert_eq!(body_u32(&stream.next().await.unwrap().unwrap()), i);
            assert!(stream.trailers().is_none(), "no trailers before the end");
        }
        assert!(stream.next().await.is_none(), "ends OK");
        let trailers = stream.trailers().expect("trailers after the end");
        assert_eq!(trailers.get_str("x-sent"), Some("3"));
        assert_eq!(trailers.get("x-first"), None, "the last set wins");

        let request = u32_body(0);
        let mut failed = client
            .server_stream::<_, Bytes, Bytes>(TRAILED, Raw, &request, long_call())
            .await
            .unwrap();
        let status = failed.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
        assert_eq!(failed.trailers().unwrap().get_str("x-sent"), Some("0"));
        assert!(failed.next().await.is_none());

        // A stream whose handler sets none ends with empty trailers.
        let request = u32_body(1);
        let mut plain = client
            .server_stream::<_, Bytes, Bytes>(COUNT, Raw, &request, long_call())
            .await
            .unwrap();
        while plain.next().await.is_some() {}
        assert!(plain.trailers().unwrap().is_empty());
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

async fn streams_and_unary_calls_share_a_connection<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, client, _) = setup(&server_rt, &client_rt).await;
    let streams: FuturesUnordered<_> = (0..50u32)
        .map(|k| {
            let client = client.clone();
            async move {
                let request = u32_body(1_000 + k);
                let stream = client
                    .server_stream(COUNT, Raw, &request, long_call())
                    .await
                    .unwrap();
                let got: Vec<u32> = stream.map(|m| body_u32(&m.unwrap())).collect().await;
                assert_eq!(got, (0..1_000 + k).collect::<Vec<_>>(), "stream {k}");
            }
        })
        .collect();
    let unary: FuturesUnordered<_> = (0..500u32)
        .map(|i| {
            let client = client.clone();
            async move {
                let rsp = client
                    .call_raw(UNARY, 0, u32_body(i), CallOptions::default())
                    .await
                    .unwrap();
                assert_eq!(body_u32(&rsp.body), i, "a reply reached the wrong caller");
            }
        })
        .collect();
    within(
        &client_rt,
        Duration::from_secs(60),
        "streams and calls",
        async { futures::join!(streams.collect::<Vec<()>>(), unary.collect::<Vec<()>>()) },
    )
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// A server stops reading while megabytes of answers wait for a client that does not read
/// them; a request that arrived meanwhile is still served once they went, in order, on the
/// same connection.
async fn a_request_held_behind_unread_answers_is_served<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let probes = Arc::new(Probes::default());
    let server = Server::new(server_rt.clone(), router(server_rt.clone(), probes))
        .bind(loopback())
        .await
        .unwrap();
    // One connection with windows wide enough that the server queues far more than a
    // socket holds.
    let mut config = client_config();
    config.pool.size = 1;
    config.pool.connection.conn.stream_window = 64 << 20;
    config.pool.connection.conn.connection_window = 64 << 20;
    let client = Client::connect(client_rt.clone(), server.local_addr(), config)
        .await
        .unwrap();
    let blobs = 256u32; // 16 MiB, far more than the sockets hold
    let request = u32_body(blobs);
    let mut stream = client
        .server_stream(BLOB, Raw, &request, long_call())
        .await
        .unwrap();
    // Let the server queue its answers against a reader that reads nothing.
    sleep(&client_rt, Duration::from_millis(300)).await;
    let unary = client.call_raw(UNARY, 0, u32_body(7), CallOptions::default());
    let read_all = async {
        let mut got = 0u32;
        while let Some(message) = stream.next().await {
            assert_eq!(message.unwrap().len(), BLOB_MESSAGE);
            got += 1;
        }
        got
    };
    let (rsp, got) = within(
        &client_rt,
        Duration::from_secs(30),
        "the stream and the call behind it",
        async { futures::join!(unary, read_all) },
    )
    .await;
    assert_eq!(got, blobs);
    assert_eq!(body_u32(&rsp.expect("the held call was served").body), 7);
    // And the connection still reads what comes after.
    let rsp = client
        .call_raw(UNARY, 0, u32_body(8), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(body_u32(&rsp.body), 8);
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// A call framed for another kind of method is refused, and the connection carries on.
async fn mismatched_framing_is_unimplemented<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, _) = setup(&server_rt, &client_rt).await;
    let (_tx, mut rx) = client
        .stream_raw(
            UNARY,
            0,
            gorpc::proto::StreamKind::Bidirectional,
            Bytes::new(),
            CallOptions::default(),
        )
        .await
        .unwrap();
    let status: Status = rx.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status}");
    let rsp = client
        .call_raw(UNARY, 0, Bytes::from_static(b"ok"), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(rsp.body, "ok");
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

on_every_runtime!(
    server_stream_arrives_in_order,
    slow_consumer_bounds_the_producer,
    dropping_the_receiver_drops_the_handler,
    deadline_mid_stream_ends_both_sides,
    shutdown_drains_or_ends_open_streams,
    client_stream_and_bidi_echo,
    trailers_end_a_server_stream,
    streams_and_unary_calls_share_a_connection,
    mismatched_framing_is_unimplemented,
    streams_to_a_discovered_service,
    streams_count_as_open_on_their_instance,
    streams_need_the_binary_protocol,
    a_request_held_behind_unread_answers_is_served,
);
