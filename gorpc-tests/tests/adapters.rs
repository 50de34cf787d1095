//! The runtime adapters over real TCP on 127.0.0.1, on every runtime pairing.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::stream::{FuturesUnordered, StreamExt};
use gorpc::client::{ConnectionConfig, PoolConfig};
use gorpc::{
    CallOptions, Client, ClientConfig, Code, Router, Runtime, Server, ServerReply, ServerRequest,
    Shutdown,
};
use gorpc_tests::{
    client_config, concurrent_echoes, loopback, on_every_runtime, sleep, within, SECOND,
};

/// Echoes raw bodies; every other call first waits a tick of the server's timer so that
/// both the inline and the spawned handler paths are exercised.
fn echo_router<S: Runtime>(server: &S, peers: Arc<Mutex<HashSet<SocketAddr>>>) -> Router {
    let rt = server.clone();
    Router::new().route("/test.Echo/Echo", move |req: ServerRequest| {
        let rt = rt.clone();
        peers.lock().unwrap().insert(req.peer.unwrap());
        async move {
            if req.body.first().is_some_and(|b| b % 2 == 1) {
                sleep(&rt, Duration::from_micros(1)).await;
            }
            ServerReply::ok(req.body)
        }
    })
}

async fn ten_thousand_concurrent_calls_over_one_connection<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let server = Server::new(server_rt.clone(), echo_router(&server_rt, peers.clone()))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let bodies = (0..10_000u32).map(|i| Bytes::from(format!("{}-call-{i}", i % 10)));
    concurrent_echoes(&client_rt, &client, "/test.Echo/Echo", bodies).await;
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "all calls shared one connection"
    );
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
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

/// A router whose "/test.Hang/Forever" handler signals when it starts and when it is
/// dropped, and never finishes.
fn hanging_router(
    started: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
    dropped: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
) -> Router {
    Router::new().route("/test.Hang/Forever", move |_req: ServerRequest| {
        let started = started.lock().unwrap().pop();
        let guard = DropSignal(dropped.lock().unwrap().pop());
        async move {
            let _guard = guard;
            if let Some(tx) = started {
                let _ = tx.send(());
            }
            futures::future::pending::<ServerReply>().await
        }
    })
}

async fn deadline_exceeded_drops_the_server_handler<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let router = hanging_router(Arc::default(), Arc::new(Mutex::new(vec![dropped_tx])));
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();

    let started = Instant::now();
    let options = CallOptions {
        timeout: Some(Duration::from_millis(100)),
        ..CallOptions::default()
    };
    let err = client
        .call_raw("/test.Hang/Forever", 0, Bytes::new(), options)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(
        started.elapsed() < 2 * SECOND,
        "the deadline fired late: {:?}",
        started.elapsed()
    );
    within(
        &client_rt,
        2 * SECOND,
        "server handler dropped at its deadline",
        dropped_rx,
    )
    .await
    .unwrap();
    server.abort().await;
}

async fn dropping_the_call_cancels_it_on_the_server<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (started_tx, started_rx) = oneshot::channel();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let router = hanging_router(
        Arc::new(Mutex::new(vec![started_tx])),
        Arc::new(Mutex::new(vec![dropped_tx])),
    );
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();

    let call = client.call_raw(
        "/test.Hang/Forever",
        0,
        Bytes::new(),
        CallOptions::default(),
    );
    let mut call = Box::pin(call);
    // Drive the call until the handler runs, then drop it.
    let started = futures::future::select(call.as_mut(), started_rx);
    match within(&client_rt, 5 * SECOND, "handler start", started).await {
        futures::future::Either::Left((result, _)) => panic!("call ended early: {result:?}"),
        futures::future::Either::Right(_) => {}
    }
    drop(call);
    within(
        &client_rt,
        2 * SECOND,
        "server handler dropped after cancel",
        dropped_rx,
    )
    .await
    .unwrap();
    server.abort().await;
}

async fn unknown_method_is_unimplemented<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = Server::new(server_rt.clone(), echo_router(&server_rt, Arc::default()))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();
    let err = client
        .call_raw("/test.Echo/Nope", 0, Bytes::new(), CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "unknown method /test.Echo/Nope");
    // The connection is fine afterwards.
    let ok = client
        .call_raw(
            "/test.Echo/Echo",
            0,
            Bytes::from_static(b"2"),
            CallOptions::default(),
        )
        .await;
    assert_eq!(ok.unwrap().body, Bytes::from_static(b"2"));
    server.abort().await;
}

async fn handler_panic_is_internal_and_harms_nothing_else<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let router = echo_router(&server_rt, Arc::default())
        .route("/test.Panic/Now", |_req: ServerRequest| async {
            panic!("handler bug")
        });
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();
    let err = client
        .call_raw("/test.Panic/Now", 0, Bytes::new(), CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Internal, "handler panicked")
    );
    let ok = client
        .call_raw(
            "/test.Echo/Echo",
            0,
            Bytes::from_static(b"1"),
            CallOptions::default(),
        )
        .await;
    assert_eq!(ok.unwrap().body, Bytes::from_static(b"1"));
    server.abort().await;
}

/// Writes `bytes` from a plain blocking socket and reads until the server closes; returns
/// what the server sent back.
fn raw_client(
    addr: SocketAddr,
    bytes: &'static [u8],
) -> oneshot::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(5 * SECOND))?;
            stream.write_all(bytes)?;
            let mut back = Vec::new();
            stream.read_to_end(&mut back)?;
            Ok(back)
        })();
        let _ = tx.send(result);
    });
    rx
}

async fn garbage_bytes_close_only_that_connection<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server = Server::new(server_rt.clone(), echo_router(&server_rt, Arc::default()))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let slow = client.call_raw(
        "/test.Echo/Echo",
        0,
        Bytes::from_static(b"before"),
        CallOptions::default(),
    );

    let back = within(
        &client_rt,
        5 * SECOND,
        "server closes the garbage connection",
        raw_client(server.local_addr(), b"GET / HTTP/1.1\r\n\r\n"),
    )
    .await
    .unwrap()
    .expect("server closes cleanly instead of hanging");
    // The server explains itself in a go-away before closing (after the connection window
    // it grants every connection at start, a 24-byte WINDOW_UPDATE).
    let back = match back.strip_prefix(b"GR\x01\x08") {
        Some(_) => back[24..].to_vec(),
        None => back,
    };
    assert_eq!(
        &back[..4],
        b"GR\x01\x06",
        "expected a go-away frame, got {back:?}"
    );
    assert!(String::from_utf8_lossy(&back).contains("bad frame magic"));

    assert_eq!(slow.await.unwrap().body, Bytes::from_static(b"before"));
    let after = client
        .call_raw(
            "/test.Echo/Echo",
            0,
            Bytes::from_static(b"after"),
            CallOptions::default(),
        )
        .await;
    assert_eq!(after.unwrap().body, Bytes::from_static(b"after"));
    server.abort().await;
}

async fn graceful_shutdown_loses_no_in_flight_call<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let started = Arc::new(AtomicUsize::new(0));
    let rt = server_rt.clone();
    let counter = started.clone();
    let router = Router::new().route("/test.Slow/Echo", move |req: ServerRequest| {
        let rt = rt.clone();
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            sleep(&rt, Duration::from_millis(200)).await;
            ServerReply::ok(req.body)
        }
    });
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let client = Client::connect(client_rt.clone(), addr, client_config())
        .await
        .unwrap();
    let calls: FuturesUnordered<_> = (0..100u32)
        .map(|i| {
            let client = client.clone();
            async move {
                client
                    .call_raw(
                        "/test.Slow/Echo",
                        0,
                        Bytes::from(i.to_string()),
                        CallOptions::default(),
                    )
                    .await
            }
        })
        .collect();
    let calls = Box::pin(calls.collect::<Vec<_>>());
    let (results, outcome) = within(&client_rt, 10 * SECOND, "calls and shutdown", async {
        let shutdown = async {
            while started.load(Ordering::SeqCst) < 100 {
                sleep(&client_rt, Duration::from_millis(5)).await;
            }
            server.shutdown(5 * SECOND).await
        };
        futures::join!(calls, shutdown)
    })
    .await;
    assert_eq!(outcome, Shutdown::Graceful);
    assert_eq!(results.len(), 100);
    for result in results {
        result.expect("a call in flight during shutdown was answered");
    }
    // The port is closed now: new calls fail with Unavailable.
    let err = client
        .call_raw("/test.Slow/Echo", 0, Bytes::new(), CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

async fn killed_server_fails_calls_promptly_and_the_pool_reconnects<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let router = || hanging_router(Arc::default(), Arc::default()).merge_echo();
    let server = Server::new(server_rt.clone(), router())
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    let pool = PoolConfig {
        backoff_min: Duration::from_millis(20),
        connection: ConnectionConfig {
            connect_timeout: SECOND,
            ..ConnectionConfig::default()
        },
        ..PoolConfig::default()
    };
    let client = Client::connect(
        client_rt.clone(),
        addr,
        ClientConfig {
            pool,
            ..client_config()
        },
    )
    .await
    .unwrap();

    let hung = client.call_raw(
        "/test.Hang/Forever",
        0,
        Bytes::new(),
        CallOptions::default(),
    );
    let kill = async {
        sleep(&client_rt, Duration::from_millis(100)).await;
        server.abort().await;
        Instant::now()
    };
    let (result, killed_at) = within(
        &client_rt,
        5 * SECOND,
        "call fails after the kill",
        futures::future::join(hung, kill),
    )
    .await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        killed_at.elapsed() < SECOND,
        "failure reported {:?} after the kill",
        killed_at.elapsed()
    );

    // While the server is down, calls fail fast with a reason.
    let err = client
        .call_raw("/test.Echo/Echo", 0, Bytes::new(), CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains(&addr.to_string()), "{err}");

    // Back on the same port: the pool reconnects once its backoff allows.
    let server = Server::new(server_rt, router()).bind(addr).await.unwrap();
    let mut attempts = 0;
    let body = loop {
        attempts += 1;
        match client
            .call_raw(
                "/test.Echo/Echo",
                0,
                Bytes::from_static(b"back"),
                CallOptions::default(),
            )
            .await
        {
            Ok(rsp) => break rsp.body,
            Err(e) if attempts < 100 => {
                assert_eq!(e.code(), Code::Unavailable);
                sleep(&client_rt, Duration::from_millis(20)).await;
            }
            Err(e) => panic!("never reconnected: {e}"),
        }
    };
    assert_eq!(body, Bytes::from_static(b"back"));
    server.abort().await;
}

trait MergeEcho {
    fn merge_echo(self) -> Router;
}

impl MergeEcho for Router {
    fn merge_echo(self) -> Router {
        self.route("/test.Echo/Echo", |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        })
    }
}

async fn idle_connections_close_and_calls_reconnect_transparently<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let server = Server::new(server_rt.clone(), echo_router(&server_rt, peers.clone()))
        .bind(loopback())
        .await
        .unwrap();
    let connection = ConnectionConfig {
        idle_timeout: Some(Duration::from_millis(50)),
        ..ConnectionConfig::default()
    };
    let pool = gorpc::client::EndpointPool::new(
        client_rt.clone(),
        server.local_addr(),
        PoolConfig {
            connection,
            ..PoolConfig::default()
        },
    );
    let client = Client::new(pool.clone(), Some(5 * SECOND));
    let call = |body: &'static [u8]| {
        client.call_raw(
            "/test.Echo/Echo",
            0,
            Bytes::from_static(body),
            CallOptions::default(),
        )
    };
    assert_eq!(call(b"2").await.unwrap().body, Bytes::from_static(b"2"));
    assert_eq!(pool.open_connections(), 1);
    within(&client_rt, 5 * SECOND, "idle connection closes", async {
        while pool.open_connections() > 0 {
            sleep(&client_rt, Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        call(b"4").await.unwrap().body,
        Bytes::from_static(b"4"),
        "the next call reconnects"
    );
    assert_eq!(
        peers.lock().unwrap().len(),
        2,
        "a second connection was opened"
    );
    server.abort().await;
}

/// A user pool: alternates between two endpoints.
struct Alternate<R: Runtime> {
    pools: [gorpc::client::EndpointPool<R>; 2],
    next: AtomicUsize,
}

impl<R: Runtime> gorpc::client::Pool for Alternate<R> {
    fn checkout(&self, deadline: Option<Instant>) -> gorpc::client::Checkout<'_> {
        self.pools[self.next.fetch_add(1, Ordering::Relaxed) % 2].checkout(deadline)
    }
}

async fn a_user_defined_pool_chooses_the_connections<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let named = |name: &'static str| {
        Router::new().route("/test.Who/Am", move |_req: ServerRequest| async move {
            ServerReply::ok(Bytes::from_static(name.as_bytes()))
        })
    };
    let a = Server::new(server_rt.clone(), named("a"))
        .bind(loopback())
        .await
        .unwrap();
    let b = Server::new(server_rt, named("b"))
        .bind(loopback())
        .await
        .unwrap();
    let endpoint =
        |addr| gorpc::client::EndpointPool::new(client_rt.clone(), addr, PoolConfig::default());
    let pool = Alternate {
        pools: [endpoint(a.local_addr()), endpoint(b.local_addr())],
        next: AtomicUsize::new(0),
    };
    let client = Client::new(pool, Some(5 * SECOND));
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(
            client
                .call_raw("/test.Who/Am", 0, Bytes::new(), CallOptions::default())
                .await
                .unwrap()
                .body,
        );
    }
    assert_eq!(
        answers,
        ["a", "b", "a", "b"].map(|s| Bytes::from_static(s.as_bytes()))
    );
    a.abort().await;
    b.abort().await;
}

/// Requests for "/test.Echo/Echo" with 16 KiB bodies, as a client would frame them.
fn echo_requests(count: u32) -> Vec<u8> {
    use gorpc::proto::frame::{flags, FrameHeader, FrameType};
    let mut head = Vec::new();
    gorpc::proto::head::encode_request_head("/test.Echo/Echo", 0, [], &mut head);
    let body = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    for id in 1..=count {
        let header = FrameHeader {
            frame_type: FrameType::Request,
            flags: flags::END_STREAM,
            codec: 0,
            call_id: id,
            head_len: head.len() as u32,
            body_len: body.len() as u32,
        };
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&body);
    }
    out
}

async fn a_client_that_never_reads_cannot_make_the_server_buffer_without_bound<
    S: Runtime,
    C: Runtime,
>(
    server_rt: S,
    client_rt: C,
) {
    let server = Server::new(server_rt.clone(), echo_router(&server_rt, Arc::default()))
        .bind(loopback())
        .await
        .unwrap();
    let addr = server.local_addr();
    // 256 MiB of echo requests, written until the server stops taking them.
    let stream = echo_requests(16 * 1024);
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<usize> {
            let mut socket = std::net::TcpStream::connect(addr)?;
            socket.set_write_timeout(Some(2 * SECOND))?;
            let mut written = 0;
            for chunk in stream.chunks(64 * 1024) {
                match socket.write(chunk) {
                    Ok(n) => written += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(written)
        })();
        let _ = tx.send(result);
    });
    let written = within(&client_rt, 30 * SECOND, "the non-reading client stalls", rx)
        .await
        .unwrap()
        .unwrap();
    // The server's own backlog is 1 MiB; the rest is kernel socket buffers on both sides.
    assert!(
        written < 64 << 20,
        "the server kept reading: {} MiB accepted from a client that reads nothing",
        written >> 20
    );
    // Other clients are served meanwhile.
    let client = Client::connect(client_rt, addr, client_config())
        .await
        .unwrap();
    let ok = client
        .call_raw(
            "/test.Echo/Echo",
            0,
            Bytes::from_static(b"2"),
            CallOptions::default(),
        )
        .await;
    assert_eq!(ok.unwrap().body, Bytes::from_static(b"2"));
    server.abort().await;
}

on_every_runtime!(
    a_client_that_never_reads_cannot_make_the_server_buffer_without_bound,
    idle_connections_close_and_calls_reconnect_transparently,
    a_user_defined_pool_chooses_the_connections,
    ten_thousand_concurrent_calls_over_one_connection,
    deadline_exceeded_drops_the_server_handler,
    dropping_the_call_cancels_it_on_the_server,
    unknown_method_is_unimplemented,
    handler_panic_is_internal_and_harms_nothing_else,
    garbage_bytes_close_only_that_connection,
    graceful_shutdown_loses_no_in_flight_call,
    killed_server_fails_calls_promptly_and_the_pool_reconnects,
);

/// The tokio adapter's shortcuts: `serve` and `connect` on the current runtime, and the
/// builders `server` and `client` from it.
#[test]
fn tokio_shortcuts_serve_and_call() {
    let rt = gorpc_tests::tokio_runtime();
    rt.block_on(async {
        let router = Router::new().msgpack("/test.Short/Shout", |s: String| async move {
            Ok::<_, gorpc::Status>(s.to_uppercase())
        });
        let server = gorpc_tokio::serve(loopback(), router.clone())
            .await
            .unwrap();
        let client = gorpc_tokio::connect(server.local_addr()).await.unwrap();
        let reply: String = client.call("/test.Short/Shout", &"hi").await.unwrap();
        assert_eq!(reply, "HI");

        let built = gorpc_tokio::server(router).bind(loopback()).await.unwrap();
        let client = gorpc_tokio::client()
            .endpoint(built.local_addr())
            .timeout(10 * SECOND)
            .connect()
            .await
            .unwrap();
        let reply: String = client.call("/test.Short/Shout", &"built").await.unwrap();
        assert_eq!(reply, "BUILT");

        let closed = std::net::TcpListener::bind(loopback())
            .unwrap()
            .local_addr()
            .unwrap();
        let err = gorpc_tokio::connect(closed).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
        assert_eq!(built.shutdown(SECOND).await, Shutdown::Graceful);
    });
}

/// The same shortcuts of the smol adapter.
#[test]
fn smol_shortcuts_serve_and_call() {
    gorpc_tests::smol::block_on(async {
        let router = Router::new().msgpack("/test.Short/Shout", |s: String| async move {
            Ok::<_, gorpc::Status>(s.to_uppercase())
        });
        let server = gorpc_smol::serve(loopback(), router.clone()).await.unwrap();
        let client = gorpc_smol::connect(server.local_addr()).await.unwrap();
        let reply: String = client.call("/test.Short/Shout", &"hi").await.unwrap();
        assert_eq!(reply, "HI");

        let built = gorpc_smol::server(router).bind(loopback()).await.unwrap();
        let client = gorpc_smol::client()
            .endpoint(built.local_addr())
            .timeout(10 * SECOND)
            .connect()
            .await
            .unwrap();
        let reply: String = client.call("/test.Short/Shout", &"built").await.unwrap();
        assert_eq!(reply, "BUILT");
        assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
        assert_eq!(built.shutdown(SECOND).await, Shutdown::Graceful);
    });
}
