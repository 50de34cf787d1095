//! Calls under faults, on every runtime pairing: servers that crash, stall or answer slowly,
//! connections reset, blackholed or corrupted by a `FaultProxy`, a registry that fails, and
//! callers that give up at random. Every wait is bounded, everything runs on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::channel::mpsc;
use futures::future::{self, Either};
use futures::stream::{self, BoxStream, FuturesUnordered, StreamExt};
use gorpc::client::EndpointPool;
use gorpc::discovery::{Change, Discover, Instance, WatchEvent};
use gorpc::proto::balance::{RoundRobin, SplitMix64};
use gorpc::{CallOptions, Client, ClientConfig, Code, KeepaliveConfig, Runtime, Status};
use gorpc_tests::fault::{methods, Direction, Fault, FaultProxy, HandlerCounts, TestServer};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};

async fn call(
    client: &Client,
    method: &'static str,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, Status> {
    let options = CallOptions {
        timeout: Some(timeout),
        ..CallOptions::default()
    };
    Ok(client.call_raw(method, 0, body, options).await?.body)
}

async fn echo(client: &Client) -> Result<Bytes, Status> {
    call(
        client,
        methods::ECHO,
        Bytes::from_static(b"ping"),
        10 * SECOND,
    )
    .await
}

fn unique(tag: &str, i: usize) -> Bytes {
    Bytes::from(format!("{tag}-{i}"))
}

async fn eventually<R: Runtime>(rt: &R, limit: Duration, what: &str, check: impl Fn() -> bool) {
    within(rt, limit, what, async {
        while !check() {
            gorpc_tests::sleep(rt, Duration::from_millis(5)).await;
        }
    })
    .await
}

/// A client of one address whose pool the test can watch.
fn pooled<C: Runtime>(rt: &C, addr: SocketAddr, config: ClientConfig) -> (Client, EndpointPool<C>) {
    let pool = EndpointPool::new(rt.clone(), addr, config.pool);
    (Client::new(pool.clone(), config.default_timeout), pool)
}

/// `n` calls to `method` at once, each with a unique body; `during` runs alongside them and
/// its result is returned with theirs, in call order.
async fn calls_while<C: Runtime, T>(
    rt: &C,
    client: &Client,
    method: &'static str,
    tag: &str,
    n: usize,
    during: impl std::future::Future<Output = T>,
) -> (Vec<(Bytes, Result<Bytes, Status>)>, T) {
    let calls: FuturesUnordered<_> = (0..n)
        .map(|i| {
            let body = unique(tag, i);
            async move { (body.clone(), call(client, method, body, 20 * SECOND).await) }
        })
        .collect();
    within(
        rt,
        30 * SECOND,
        "calls",
        future::join(calls.collect(), during),
    )
    .await
}

async fn server_killed_mid_call<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = TestServer::start(server_rt.clone(), loopback(), SECOND)
        .await
        .unwrap();
    let (addr, handlers) = (server.addr(), server.handlers.clone());
    let client = Client::connect(client_rt.clone(), addr, client_config())
        .await
        .unwrap();

    let (results, killed_at) = calls_while(&client_rt, &client, methods::STALL, "k", 20, async {
        eventually(&client_rt, 10 * SECOND, "20 calls reach the server", || {
            handlers.live() == 20
        })
        .await;
        let killed_at = Instant::now();
        server.crash().await;
        killed_at
    })
    .await;
    let failed_within = killed_at.elapsed();
    for (_, result) in &results {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }
    assert!(
        failed_within < 3 * SECOND,
        "in-flight calls failed promptly, took {failed_within:?}"
    );
    eventually(
        &client_rt,
        5 * SECOND,
        "no handler outlives the crash",
        || handlers.live() == 0,
    )
    .await;

    // A new server on the same address: the next call reconnects.
    let restarted = TestServer::start(server_rt, addr, SECOND).await.unwrap();
    assert_eq!(echo(&client).await.unwrap(), "ping");
    restarted.crash().await;
}

async fn connection_reset_by_the_proxy<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = TestServer::start(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let (client, pool) = pooled(&client_rt, proxy.addr(), client_config());
    assert_eq!(echo(&client).await.unwrap(), "ping");
    let handlers = server.handlers.clone();

    let (results, reset_at) = calls_while(&client_rt, &client, methods::STALL, "r", 10, async {
        eventually(&client_rt, 10 * SECOND, "10 calls reach the server", || {
            handlers.live() == 10
        })
        .await;
        proxy.set(Fault::Reset);
        Instant::now()
    })
    .await;
    let failed_within = reset_at.elapsed();
    for (_, result) in &results {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }
    assert!(failed_within < 3 * SECOND, "took {failed_within:?}");
    // The driver marks the connection closed just after failing its calls.
    eventually(
        &client_rt,
        2 * SECOND,
        "the pool drops the reset connection",
        || pool.open_connections() == 0,
    )
    .await;
    eventually(
        &client_rt,
        5 * SECOND,
        "the server drops the reset calls",
        || handlers.live() == 0,
    )
    .await;

    proxy.set(Fault::Pass);
    assert_eq!(echo(&client).await.unwrap(), "ping");
    assert_eq!(proxy.accepted(), 2, "one new connection");
    server.crash().await;
}

async fn half_open_connection<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = TestServer::start(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let mut config = client_config();
    // The ping's timeout ends well after the call's deadline below, so the deadline ends
    // the call even when the driver wakes late and finds both due (it expires calls first).
    config.pool.connection.conn.keepalive = KeepaliveConfig {
        interval: Some(Duration::from_millis(200)),
        timeout: Duration::from_millis(1000),
    };
    let (client, pool) = pooled(&client_rt, proxy.addr(), config);
    assert_eq!(echo(&client).await.unwrap(), "ping");
    assert_eq!(pool.open_connections(), 1);

    proxy.set(Fault::Blackhole);
    let blackholed_at = Instant::now();
    let timeout = Duration::from_millis(500);
    let err = call(&client, methods::ECHO, unique("h", 0), timeout)
        .await
        .unwrap_err();
    let took = blackholed_at.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        took >= timeout - Duration::from_millis(50) && took < 3 * SECOND,
        "the call ended at its deadline, took {took:?}"
    );
    // Keepalive: a ping after 200 ms of silence, dead 1 s later.
    eventually(
        &client_rt,
        5 * SECOND,
        "keepalive closes the dead connection",
        || pool.open_connections() == 0,
    )
    .await;

    proxy.set(Fault::Pass);
    assert_eq!(echo(&client).await.unwrap(), "ping");
    assert_eq!(proxy.accepted(), 2, "the pool reconnected");
    server.crash().await;
}

async fn slow_server<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = TestServer::start(server_rt, loopback(), 5 * SECOND)
        .await
        .unwrap();
    let handlers = server.handlers.clone();
    let client = Client::connect(client_rt.clone(), server.addr(), client_config())
        .await
        .unwrap();

    let started = Instant::now();
    let err = call(
        &client,
        methods::SLOW,
        unique("s", 0),
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() < 3 * SECOND);
    assert_eq!(handlers.started(), 1);
    // Well before the handler's 5 s: it was cancelled, not finished.
    eventually(
        &client_rt,
        3 * SECOND,
        "the slow handler is cancelled",
        || handlers.live() == 0,
    )
    .await;
    assert_eq!(handlers.answered(), 0);

    // A slow network instead: 100 ms per chunk, each way.
    let proxy = FaultProxy::start(server.addr()).unwrap();
    proxy.set(Fault::Delay(Duration::from_millis(100)));
    let client = Client::lazy(client_rt.clone(), proxy.addr(), client_config());
    let started = Instant::now();
    assert_eq!(echo(&client).await.unwrap(), "ping");
    assert!(started.elapsed() >= Duration::from_millis(200));
    let err = call(
        &client,
        methods::ECHO,
        unique("d", 0),
        Duration::from_millis(150),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    server.crash().await;
}

async fn corrupted_stream<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = TestServer::start(server_rt, loopback(), Duration::from_millis(300))
        .await
        .unwrap();
    let handlers = server.handlers.clone();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    // `a` goes through the proxy, `b` on a connection of its own straight to the server.
    let a = Client::lazy(client_rt.clone(), proxy.addr(), client_config());
    let b = Client::connect(client_rt.clone(), server.addr(), client_config())
        .await
        .unwrap();
    const N: usize = 40;

    for (round, direction) in [Direction::ToClient, Direction::ToServer]
        .into_iter()
        .enumerate()
    {
        proxy.set(Fault::Pass);
        assert_eq!(echo(&a).await.unwrap(), "ping");
        let corrupt = Fault::Corrupt {
            direction,
            offset: 0,
            every: 1,
        };
        if direction == Direction::ToServer {
            // The requests themselves arrive garbled.
            proxy.set(corrupt);
        }
        let (a_tag, b_tag) = (format!("a{round}"), format!("b{round}"));
        let (a_results, (b_results, ())) = calls_while(
            &client_rt,
            &a,
            methods::SLOW,
            &a_tag,
            N,
            calls_while(&client_rt, &b, methods::SLOW, &b_tag, N, async {
                if direction == Direction::ToClient {
                    // Every request is in; no response byte has left yet (they take 300 ms).
                    eventually(
                        &client_rt,
                        10 * SECOND,
                        "all calls reach the server",
                        || handlers.live() == 2 * N,
                    )
                    .await;
                    proxy.set(corrupt);
                }
            }),
        )
        .await;

        for (sent, got) in &b_results {
            assert_eq!(
                got.as_ref().expect("calls on other connections succeed"),
                sent
            );
        }
        for (sent, got) in &a_results {
            match got {
                Ok(body) => {
                    panic!("{direction:?}: call {sent:?} got {body:?} from a corrupted stream")
                }
                Err(err) => assert_eq!(err.code(), Code::Unavailable, "{direction:?}: {err}"),
            }
        }
        if direction == Direction::ToClient {
            let err = a_results[0].1.as_ref().unwrap_err();
            assert!(
                err.message().contains("bad frame magic"),
                "a protocol error closed the connection: {err}"
            );
        }
        eventually(&client_rt, 5 * SECOND, "no handler left running", || {
            handlers.live() == 0
        })
        .await;
    }
    proxy.set(Fault::Pass);
    assert_eq!(echo(&a).await.unwrap(), "ping", "a reconnects");
    server.crash().await;
}

/// A registry the test scripts: the watch yields whatever the test sends.
struct ScriptedRegistry {
    watch: Mutex<Option<mpsc::UnboundedReceiver<WatchEvent>>>,
}

impl Discover for ScriptedRegistry {
    fn watch(&self, _service: &str) -> BoxStream<'static, WatchEvent> {
        match self.watch.lock().unwrap().take() {
            Some(rx) => rx.boxed(),
            None => stream::pending().boxed(),
        }
    }
}

async fn registry_outage<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(
            TestServer::start(server_rt.clone(), loopback(), SECOND)
                .await
                .unwrap(),
        );
    }
    let (events, rx) = mpsc::unbounded();
    let registry = ScriptedRegistry {
        watch: Mutex::new(Some(rx)),
    };
    let client = Client::builder(client_rt.clone())
        .discover(registry, "echo")
        .balance(RoundRobin::new(7))
        .config(client_config())
        .build()
        .unwrap();
    let upserts = servers
        .iter()
        .map(|s| Change::Upsert(Instance::new(s.addr())))
        .collect();
    events.unbounded_send(Ok(upserts)).unwrap();

    let both_answer = |round: &str, handlers: &[Arc<HandlerCounts>], before: &[usize]| {
        for (i, (h, b)) in handlers.iter().zip(before).enumerate() {
            assert!(h.started() > *b, "{round}: instance {i} still gets calls");
        }
    };
    let handlers: Vec<_> = servers.iter().map(|s| s.handlers.clone()).collect();
    let counts = |h: &[Arc<HandlerCounts>]| h.iter().map(|h| h.started()).collect::<Vec<_>>();

    let (results, ()) = calls_while(&client_rt, &client, methods::ECHO, "r0", 20, async {}).await;
    for (sent, got) in results {
        assert_eq!(got.unwrap(), sent);
    }

    // The registry fails, again and again: the client keeps calling what it knows.
    for outage in 0..3 {
        let before = counts(&handlers);
        events
            .unbounded_send(Err(Status::new(Code::Unavailable, "registry is down")))
            .unwrap();
        let tag = format!("r{}", outage + 1);
        let (results, ()) =
            calls_while(&client_rt, &client, methods::ECHO, &tag, 20, async {}).await;
        for (sent, got) in results {
            assert_eq!(got.expect("calls succeed during the outage"), sent);
        }
        both_answer(&tag, &handlers, &before);
        assert_eq!(client.instances().len(), 2);
    }

    // The watch ends altogether: the last known set stays.
    drop(events);
    let before = counts(&handlers);
    let (results, ()) = calls_while(&client_rt, &client, methods::ECHO, "end", 20, async {}).await;
    for (sent, got) in results {
        assert_eq!(got.expect("calls succeed after the watch ended"), sent);
    }
    both_answer("end", &handlers, &before);
    for server in servers {
        server.crash().await;
    }
}

/// What one call of the cancellation storm does.
enum Plan {
    /// Calls a handler that never answers, and gives up after `give_up`.
    Stall { give_up: Duration },
    /// Waits for the answer, which comes after `sleep` milliseconds.
    Answer { sleep: u16 },
    /// Gives up after `give_up` unless the answer, after `sleep` ms, came first.
    Race { sleep: u16, give_up: Duration },
}

/// How one call of the cancellation storm ended.
enum Ending {
    Answered(Bytes, Result<Bytes, Status>),
    Cancelled,
}

async fn thousands_of_calls_cancelled_at_random<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server = TestServer::start(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let handlers = server.handlers.clone();
    let mut config = client_config();
    config.pool.size = 2;
    let client = Client::connect(client_rt.clone(), server.addr(), config)
        .await
        .unwrap();
    const CALLS: usize = 3000;
    let seed = Instant::now().elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut rng = SplitMix64::new(seed);
    // The mix is made by construction, whatever the timing: a third of the calls go to a
    // handler that never answers and are given up at a random moment (before they are
    // sent, in flight, or while their handler waits), so they end cancelled; a third
    // answer after a random sleep (0: inline) and are never given up; a third race a
    // random sleep against a random give-up, and may end either way.
    let plan: Vec<Plan> = (0..CALLS)
        .map(|_| {
            let sleep = if rng.below(4) == 0 {
                0
            } else {
                rng.below(20) as u16
            };
            let give_up = Duration::from_micros(rng.below(30_000));
            match rng.below(3) {
                0 => Plan::Stall { give_up },
                1 => Plan::Answer { sleep },
                _ => Plan::Race { sleep, give_up },
            }
        })
        .collect();
    let stalled = plan
        .iter()
        .filter(|p| matches!(p, Plan::Stall { .. }))
        .count();

    let endings: Vec<Ending> = within(
        &client_rt,
        60 * SECOND,
        "the storm",
        stream::iter(plan.into_iter().enumerate())
            .map(|(i, plan)| {
                let (client, client_rt) = (&client, &client_rt);
                async move {
                    let (method, sleep, give_up) = match plan {
                        Plan::Stall { give_up } => (methods::STALL, 0, Some(give_up)),
                        Plan::Answer { sleep } => (methods::SLEEP, sleep, None),
                        Plan::Race { sleep, give_up } => (methods::SLEEP, sleep, Some(give_up)),
                    };
                    let mut body = BytesMut::new();
                    body.put_u16(sleep);
                    body.put_u64(i as u64);
                    let body = body.freeze();
                    let answer = Box::pin(call(client, method, body.clone(), 20 * SECOND));
                    let Some(after) = give_up else {
                        return Ending::Answered(body, answer.await);
                    };
                    let give_up = client_rt.sleep_until(Instant::now() + after);
                    match future::select(answer, give_up).await {
                        Either::Left((result, _)) => Ending::Answered(body, result),
                        // Dropping the call future here is the cancellation.
                        Either::Right(((), _)) => Ending::Cancelled,
                    }
                }
            })
            .buffer_unordered(300)
            .collect(),
    )
    .await;

    let mut cancelled = 0;
    for ending in &endings {
        match ending {
            Ending::Answered(sent, got) => match got {
                Ok(body) => assert_eq!(
                    body, sent,
                    "seed {seed}: a response reached the wrong caller"
                ),
                Err(err) => panic!("seed {seed}: a call that was not cancelled failed: {err}"),
            },
            Ending::Cancelled => cancelled += 1,
        }
    }
    assert_eq!(endings.len(), CALLS);
    assert!(
        stalled > CALLS / 5 && cancelled >= stalled,
        "seed {seed}: {stalled} calls to a handler that never answers, {cancelled} cancelled"
    );
    eventually(
        &client_rt,
        10 * SECOND,
        "every cancelled handler is dropped on the server",
        || handlers.live() == 0,
    )
    .await;
    gorpc_tests::concurrent_echoes(
        &client_rt,
        &client,
        methods::ECHO,
        (0..100).map(|i| unique("after", i)),
    )
    .await;
    server.crash().await;
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// hangs (until the SYN retries give up, long after any test). The streams that filled the
/// queue are returned to keep it full.
fn listener_that_never_completes_a_connect(
) -> (socket2::Socket, SocketAddr, Vec<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&loopback().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut filling = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => filling.push(stream),
            Err(_) => return (socket, addr, filling),
        }
    }
    panic!("16 connects to a listener with backlog 0 all completed: cannot make a hanging connect here");
}

/// A call whose connect hangs ends at the call's deadline, not at the longer connect
/// timeout.
async fn connect_that_hangs<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let _ = server_rt;
    let (_listener, addr, _filling) = listener_that_never_completes_a_connect();
    let client = Client::lazy(client_rt.clone(), addr, client_config());
    let started = Instant::now();
    let err = within(
        &client_rt,
        10 * SECOND,
        "call to a hanging connect",
        async {
            call(
                &client,
                methods::ECHO,
                Bytes::new(),
                Duration::from_millis(300),
            )
            .await
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("connecting"), "{err}");
    assert!(
        started.elapsed() < 2 * SECOND,
        "took {:?}",
        started.elapsed()
    );
}

/// The io::Error under a status, by `std::error::Error::source`.
fn io_source(status: &Status) -> std::io::ErrorKind {
    use std::error::Error as _;
    status
        .source()
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("no io::Error under {status:?}"))
        .kind()
}

/// A failed connect keeps its cause: the refusal of a closed port, the timeout of a
/// connect that hangs.
async fn connect_failures_keep_their_io_error<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let _ = server_rt;
    let closed = {
        let listener = std::net::TcpListener::bind(loopback()).unwrap();
        listener.local_addr().unwrap()
    };
    let err = Client::connect(client_rt.clone(), closed, client_config())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(io_source(&err), std::io::ErrorKind::ConnectionRefused);

    // The builder's connect timeout bounds the connect.
    let (_listener, addr, _filling) = listener_that_never_completes_a_connect();
    let started = Instant::now();
    let connecting = Client::builder(client_rt.clone())
        .endpoint(addr)
        .connect_timeout(Duration::from_millis(200))
        .connect();
    let err = within(&client_rt, 10 * SECOND, "a connect that hangs", connecting)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(io_source(&err), std::io::ErrorKind::TimedOut);
    assert!(err.message().contains("timed out after 200ms"), "{err}");
    assert!(started.elapsed() < 3 * SECOND, "{:?}", started.elapsed());
}

on_every_runtime!(
    connect_that_hangs,
    connect_failures_keep_their_io_error,
    server_killed_mid_call,
    connection_reset_by_the_proxy,
    half_open_connection,
    slow_server,
    corrupted_stream,
    registry_outage,
    thousands_of_calls_cancelled_at_random,
);

#[test]
fn the_proxy_forwards_to_loopback_only() {
    let err = FaultProxy::start(SocketAddr::from(([10, 0, 0, 1], 80))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let proxy = FaultProxy::start(loopback_addr()).unwrap();
    let err = proxy
        .set_upstream(SocketAddr::from(([192, 168, 1, 1], 80)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(proxy.addr().ip().is_loopback());
}

fn loopback_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9))
}

/// A dropped proxy closes its connections and its port.
#[test]
fn a_dropped_proxy_stops() {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = FaultProxy::start(upstream.local_addr().unwrap()).unwrap();
    let addr = proxy.addr();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    let (mut server, _) = upstream.accept().unwrap();
    client.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    drop(proxy);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert!(
        matches!(client.read_to_end(&mut rest), Ok(0) | Err(_)),
        "the client's connection is closed"
    );
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the port is closed"
    );
}
