//! `Client::builder`'s settings reach the connections they configure, on every runtime
//! pairing. (`.tls` is tested in tls.rs, `.connect_timeout` in faults.rs, beside their
//! certificates and hanging listeners.)

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc::stream::ResponseSink;
use gorpc::{
    CallOptions, Client, Code, KeepaliveConfig, Limits, Raw, Request, Router, Runtime, Server,
    ServerHandle, ServerReply, ServerRequest, Shutdown,
};
use gorpc_tests::{loopback, on_every_runtime, sleep, within, SECOND};

const ECHO: &str = "/test.Builder/Echo";
const STALL: &str = "/test.Builder/Stall";
const FLOOD: &str = "/test.Builder/Flood";
const FLOOD_MESSAGE: usize = 16 * 1024;

/// An echo that records each caller's address, a method that never answers, and a server
/// stream that sends as fast as it may, counting what it sent.
async fn serve<S: Runtime>(
    server_rt: &S,
    peers: Arc<Mutex<HashSet<SocketAddr>>>,
    flooded: Arc<AtomicUsize>,
) -> ServerHandle<S> {
    let router = Router::new()
        .route(ECHO, move |req: ServerRequest| {
            peers.lock().unwrap().insert(req.peer.unwrap());
            async move { ServerReply::ok(req.body) }
        })
        .route(STALL, |_req: ServerRequest| async move {
            std::future::pending::<ServerReply>().await
        })
        .server_stream(
            FLOOD,
            Raw,
            move |_req: Request<Bytes>, mut sink: ResponseSink<Bytes>| {
                let flooded = flooded.clone();
                async move {
                    let body = Bytes::from(vec![7u8; FLOOD_MESSAGE]);
                    loop {
                        sink.send(&body).await?;
                        flooded.fetch_add(1, Ordering::SeqCst);
                    }
                }
            },
        );
    Server::new(server_rt.clone(), router)
        .bind(loopback())
        .await
        .unwrap()
}

async fn echo(client: &Client, body: Bytes) -> Result<Bytes, gorpc::Status> {
    let rsp = client
        .call_raw(ECHO, 0, body, CallOptions::default())
        .await?;
    Ok(rsp.body)
}

/// How far a server stream runs ahead of a client that reads nothing, in bytes: once it
/// is at least `at_least` ahead (an event, whenever a loaded machine gets there), the
/// producer is given time to overrun its windows if they did not hold it.
async fn ahead_of_a_silent_reader<C: Runtime>(
    client_rt: &C,
    client: &Client,
    flooded: &AtomicUsize,
    at_least: usize,
) -> usize {
    flooded.store(0, Ordering::SeqCst);
    let options = CallOptions {
        timeout: Some(30 * SECOND),
        ..CallOptions::default()
    };
    let stream = client
        .server_stream::<_, Bytes, Bytes>(FLOOD, Raw, &Bytes::new(), options)
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let ahead = flooded.load(Ordering::SeqCst) * FLOOD_MESSAGE;
        if ahead >= at_least {
            break;
        }
        assert!(
            started.elapsed() < 30 * SECOND,
            "the server got only {ahead} bytes ahead, not {at_least}"
        );
        sleep(client_rt, Duration::from_millis(20)).await;
    }
    sleep(client_rt, Duration::from_millis(300)).await;
    let ahead = flooded.load(Ordering::SeqCst) * FLOOD_MESSAGE;
    drop(stream);
    ahead
}

async fn every_setting_reaches_the_connection<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let flooded = Arc::new(AtomicUsize::new(0));
    let server = serve(&server_rt, peers.clone(), flooded.clone()).await;
    let addr = server.local_addr();

    within(&client_rt, 60 * SECOND, "builder settings", async {
        // .connect() connects before it returns; .timeout ends a call that gets no answer.
        let client = Client::builder(client_rt.clone())
            .endpoint(addr)
            .timeout(Duration::from_millis(300))
            .connect()
            .await
            .unwrap();
        assert_eq!(
            echo(&client, Bytes::from_static(b"hi")).await.unwrap(),
            "hi"
        );
        let started = Instant::now();
        let err = client
            .call_raw(STALL, 0, Bytes::new(), CallOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "ended early: {waited:?}"
        );
        assert!(
            waited < 10 * SECOND,
            "the builder's timeout ended it: {waited:?}"
        );

        // .limits: a request over max_frame_len is refused before it leaves.
        let client = Client::builder(client_rt.clone())
            .endpoint(addr)
            .limits(Limits {
                max_frame_len: 4096,
                ..Limits::default()
            })
            .connect()
            .await
            .unwrap();
        let err = echo(&client, Bytes::from(vec![1u8; 8192]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("max_frame_len"), "{err}");
        assert_eq!(
            echo(&client, Bytes::from_static(b"small")).await.unwrap(),
            "small"
        );

        // .pool_size: the pool keeps up to that many connections, though it opens
        // another only when none is usable, so calls here all share the first.
        peers.lock().unwrap().clear();
        let client = Client::builder(client_rt.clone())
            .endpoint(addr)
            .pool_size(3)
            .connect()
            .await
            .unwrap();
        for i in 0..9u8 {
            assert_eq!(echo(&client, Bytes::from(vec![i])).await.unwrap(), vec![i]);
        }
        assert_eq!(peers.lock().unwrap().len(), 1);

        // .stream_window and .connection_window: a reader that reads nothing lets the
        // server run as far ahead as its windows (and the server's outbox), no further.
        let default = Client::builder(client_rt.clone())
            .endpoint(addr)
            .connect()
            .await
            .unwrap();
        let narrow = ahead_of_a_silent_reader(
            &client_rt,
            &default,
            &flooded,
            (1 << 20) - 2 * FLOOD_MESSAGE,
        )
        .await;
        let wide = Client::builder(client_rt.clone())
            .endpoint(addr)
            .stream_window(4 << 20)
            .connection_window(8 << 20)
            .connect()
            .await
            .unwrap();
        let ahead = ahead_of_a_silent_reader(&client_rt, &wide, &flooded, (3 << 20) + 1).await;
        assert!(
            narrow < 2 << 20,
            "default 1 MiB window, {narrow} bytes ahead"
        );
        assert!(ahead > 3 << 20, "a 4 MiB window, only {ahead} bytes ahead");
    })
    .await;
    assert_eq!(server.shutdown(5 * SECOND).await, Shutdown::Graceful);
}

/// `.keepalive`: a peer that accepts the connection and then says nothing, not even to a
/// ping, is declared dead at the keepalive's timeout, long before the call's.
async fn keepalive_finds_a_silent_peer<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let _ = server_rt;
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = std::thread::spawn(move || {
        let (socket, _) = listener.accept().unwrap();
        // Read what comes, answer nothing, until the client gives up on the connection.
        socket.set_read_timeout(Some(10 * SECOND)).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(1..) = std::io::Read::read(&mut &socket, &mut buf) {}
    });
    let client = Client::builder(client_rt.clone())
        .endpoint(addr)
        .timeout(20 * SECOND)
        .keepalive(KeepaliveConfig {
            interval: Some(Duration::from_millis(100)),
            timeout: Duration::from_millis(200),
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let err = within(&client_rt, 10 * SECOND, "a call to a silent peer", async {
        client
            .call_raw(ECHO, 0, Bytes::from_static(b"x"), CallOptions::default())
            .await
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        started.elapsed() < 5 * SECOND,
        "the keepalive ended it: {:?}",
        started.elapsed()
    );
    silent.join().unwrap();
}

on_every_runtime!(
    every_setting_reaches_the_connection,
    keepalive_finds_a_silent_peer
);
