//! Idle connections under a server's policy, on every runtime pairing: a connection with no
//! call in flight is closed after `idle_timeout` even while it answers pings; at
//! `max_connections`, the longest-idle connection makes room for a new one instead of
//! everyone new being refused; and `max_connections_per_ip` caps one address. HTTP/1.1 and
//! HTTP/2 connections, which hyper drives, are under the same policy as binary ones.
//!
//! Every wait is for an event (a handler started, a connection was told to go away); the
//! time limits only stop a broken run.

use std::future::poll_fn;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gorpc::client::{Connection, ConnectionConfig};
use gorpc::runtime::Io;
use gorpc::{Client, Code, Router, Runtime, Server, ServerHandle};
use gorpc_tests::{client_config, loopback, on_every_runtime, sleep, within};

const WAIT: Duration = Duration::from_secs(20);
const ECHO: &str = "/idle.Test/Echo";
const HOLD: &str = "/idle.Test/Hold";

/// `ECHO` answers at once; `HOLD` says it started, then answers once `release` closes.
fn router(started: async_channel::Sender<()>, release: async_channel::Receiver<()>) -> Router {
    Router::new()
        .msgpack(ECHO, |n: u32| async move { Ok(n) })
        .msgpack(HOLD, move |n: u32| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let _ = started.send(()).await;
                let _ = release.recv().await;
                Ok(n)
            }
        })
}

/// A raw connection that pings every 20 ms, and never calls.
async fn pinging<R: Runtime>(runtime: &R, server: &ServerHandle<impl Runtime>) -> Connection {
    let mut config = ConnectionConfig {
        idle_timeout: None,
        ..ConnectionConfig::default()
    };
    config.conn.keepalive.interval = Some(Duration::from_millis(20));
    Connection::connect(runtime, server.local_addr(), config)
        .await
        .expect("connects")
}

/// Waits until `conn` has been told to go away.
async fn until_told_to_go<R: Runtime>(runtime: &R, conn: &Connection, what: &str) {
    within(runtime, WAIT, what, async {
        while conn.is_usable() {
            sleep(runtime, Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn client<R: Runtime>(runtime: R, server: &ServerHandle<impl Runtime>) -> Client {
    Client::builder(runtime)
        .config(client_config())
        .endpoint(server.local_addr())
        .connect()
        .await
        .expect("a client")
}

/// A new client connects and its call is answered (`context` goes in the failure message).
async fn newcomer_is_served<C: Runtime>(
    client_rt: &C,
    server: &ServerHandle<impl Runtime>,
    context: &str,
) {
    let newcomer = client(client_rt.clone(), server).await;
    let echoed: u32 = within(
        client_rt,
        WAIT,
        "the newcomer's call",
        newcomer.call(ECHO, &1),
    )
    .await
    .unwrap_or_else(|e| panic!("the newcomer is served{context}: {e}"));
    assert_eq!(echoed, 1);
}

/// A connection that answers pings but makes no call is closed at the idle timeout; one
/// that keeps calling is not, and the server keeps serving.
async fn idle_connection_is_closed_even_while_it_pings<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (started, _) = async_channel::unbounded();
    let (_release, release) = async_channel::unbounded();
    let server = Server::new(server_rt, router(started, release))
        .idle_timeout(Some(Duration::from_millis(300)))
        .bind(loopback())
        .await
        .unwrap();
    let began = Instant::now();
    let quiet = pinging(&client_rt, &server).await;
    until_told_to_go(&client_rt, &quiet, "the idle connection closed").await;
    assert!(
        began.elapsed() >= Duration::from_millis(300),
        "closed before its time"
    );

    let busy = client(client_rt.clone(), &server).await;
    for i in 0..3 {
        let echoed: u32 = busy.call(ECHO, &i).await.unwrap();
        assert_eq!(echoed, i);
    }
    server.abort().await;
}

/// At the connection limit, the idle connection goes to make room: the new client is
/// served, the busy connection's call is unharmed.
async fn at_the_limit_the_longest_idle_makes_room<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (started_tx, started) = async_channel::unbounded();
    let (release_tx, release) = async_channel::unbounded();
    let server = Server::new(server_rt, router(started_tx, release))
        .max_connections(2)
        .idle_timeout(None)
        .bind(loopback())
        .await
        .unwrap();
    // First: a connection that only pings. Second: one with a call in flight.
    let quiet = pinging(&client_rt, &server).await;
    let busy = client(client_rt.clone(), &server).await;
    let held = {
        let busy = busy.clone();
        async move { busy.call::<u32, u32>(HOLD, &7).await }
    };
    let held = futures::future::join(held, async {
        within(&client_rt, WAIT, "the held call started", started.recv())
            .await
            .unwrap();
        // The third connection: admitted, since the first is idle.
        newcomer_is_served(&client_rt, &server, "").await;
        until_told_to_go(&client_rt, &quiet, "the idle connection evicted").await;
        drop(release_tx);
    });
    let (held, ()) = within(&client_rt, WAIT, "the held call", held).await;
    assert_eq!(held.expect("the busy connection's call is unharmed"), 7);
    server.abort().await;
}

/// With every connection busy at the limit, a new one is still refused, saying why.
async fn at_the_limit_with_none_idle_newcomers_are_refused<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (started_tx, started) = async_channel::unbounded();
    let (release_tx, release) = async_channel::unbounded();
    let server = Server::new(server_rt, router(started_tx, release))
        .max_connections(1)
        .idle_timeout(None)
        .bind(loopback())
        .await
        .unwrap();
    let busy = client(client_rt.clone(), &server).await;
    let held = {
        let busy = busy.clone();
        async move { busy.call::<u32, u32>(HOLD, &3).await }
    };
    let (held, ()) = futures::future::join(held, async {
        within(&client_rt, WAIT, "the held call started", started.recv())
            .await
            .unwrap();
        let newcomer = client(client_rt.clone(), &server).await;
        let err = within(
            &client_rt,
            WAIT,
            "the refusal",
            newcomer.call::<u32, u32>(ECHO, &1),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("connection limit"), "{err}");
        drop(release_tx);
    })
    .await;
    assert_eq!(held.unwrap(), 3);
    server.abort().await;
}

/// `max_connections_per_ip`: a third connection from 127.0.0.1 is refused; once one closes,
/// a new one is served.
async fn connections_per_ip_are_capped<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (started, _) = async_channel::unbounded();
    let (_release, release) = async_channel::unbounded();
    let server = Server::new(server_rt, router(started, release))
        .max_connections_per_ip(2)
        .bind(loopback())
        .await
        .unwrap();
    let first = client(client_rt.clone(), &server).await;
    let second = client(client_rt.clone(), &server).await;
    for c in [&first, &second] {
        let _: u32 = c.call(ECHO, &1).await.unwrap();
    }
    let third = client(client_rt.clone(), &server).await;
    let err = third.call::<u32, u32>(ECHO, &1).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("127.0.0.1"), "{err}");
    drop(third);

    // Closing a client frees its place (the server sees the close, then admits again).
    drop(first);
    within(&client_rt, WAIT, "a place freed", async {
        loop {
            let again = client(client_rt.clone(), &server).await;
            if again.call::<u32, u32>(ECHO, &2).await.is_ok() {
                return;
            }
            sleep(&client_rt, Duration::from_millis(10)).await;
        }
    })
    .await;
    let _: u32 = second.call(ECHO, &3).await.unwrap();
    server.abort().await;
}

/// A raw HTTP connection that made one exchange and then stays quiet: HTTP/2 (the preface
/// and an empty SETTINGS frame, answered by the server's SETTINGS) or HTTP/1.1 (a kept-alive
/// `GET /healthz`, answered).
async fn quiet_http<R: Runtime>(runtime: &R, addr: SocketAddr, http2: bool) -> R::Io {
    let mut io = runtime.connect(addr).await.expect("connects");
    /// Whether what the server sent so far answers the request.
    type Answered = fn(&[u8]) -> bool;
    let (request, answered): (&[u8], Answered) = if http2 {
        (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
            // The server's first frame: SETTINGS (type 4).
            |read| read.len() >= 9 && read[3] == 4,
        )
    } else {
        (b"GET /healthz HTTP/1.1\r\nHost: idle\r\n\r\n", |read| {
            read.ends_with(b"serving\n")
        })
    };
    let mut written = 0;
    while written < request.len() {
        let slice = [IoSlice::new(&request[written..])];
        written += poll_fn(|cx| io.poll_write_vectored(cx, &slice))
            .await
            .expect("writes");
    }
    let mut read = BytesMut::new();
    while !answered(&read) {
        let n = poll_fn(|cx| io.poll_read_buf(cx, &mut read, 4096))
            .await
            .expect("reads");
        assert!(n > 0, "closed before answering: {read:?}");
    }
    io
}

/// Reads until the server closes the connection; what came before the close.
async fn until_closed<R: Runtime>(runtime: &R, io: &mut impl Io, what: &str) -> BytesMut {
    within(runtime, WAIT, what, async {
        let mut read = BytesMut::new();
        loop {
            match poll_fn(|cx| io.poll_read_buf(cx, &mut read, 4096)).await {
                Ok(0) | Err(_) => return read,
                Ok(_) => {}
            }
        }
    })
    .await
}

/// Whether `frames` (whole HTTP/2 frames) hold a GOAWAY.
fn has_goaway(mut frames: &[u8]) -> bool {
    while frames.len() >= 9 {
        let len = u32::from_be_bytes([0, frames[0], frames[1], frames[2]]) as usize;
        if frames[3] == 7 {
            return true;
        }
        frames = &frames[(9 + len).min(frames.len())..];
    }
    false
}

/// An HTTP/2 connection with no call in flight is told to go away and closed at the idle
/// timeout, as a binary one is.
async fn idle_http2_connection_is_closed<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (started, _) = async_channel::unbounded();
    let (_release, release) = async_channel::unbounded();
    let server = Server::new(server_rt, router(started, release))
        .http()
        .idle_timeout(Some(Duration::from_millis(300)))
        .bind(loopback())
        .await
        .unwrap();
    let began = Instant::now();
    let mut quiet = quiet_http(&client_rt, server.local_addr(), true).await;
    let frames = until_closed(&client_rt, &mut quiet, "the idle HTTP/2 connection closed").await;
    assert!(
        began.elapsed() >= Duration::from_millis(300),
        "closed before its time"
    );
    assert!(has_goaway(&frames), "closed with a GOAWAY: {frames:?}");
    server.abort().await;
}

/// At the connection limit, an idle HTTP connection (either version) makes room for a new
/// client, as a binary one does.
async fn at_the_limit_an_idle_http_connection_makes_room<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    for http2 in [true, false] {
        let (started, _) = async_channel::unbounded();
        let (_release, release) = async_channel::unbounded();
        let server = Server::new(server_rt.clone(), router(started, release))
            .http()
            .max_connections(1)
            .idle_timeout(None)
            .bind(loopback())
            .await
            .unwrap();
        let mut quiet = quiet_http(&client_rt, server.local_addr(), http2).await;
        newcomer_is_served(&client_rt, &server, &format!(" (HTTP/2: {http2})")).await;
        until_closed(&client_rt, &mut quiet, "the idle HTTP connection evicted").await;
        server.abort().await;
    }
}

on_every_runtime!(
    idle_connection_is_closed_even_while_it_pings,
    at_the_limit_the_longest_idle_makes_room,
    at_the_limit_with_none_idle_newcomers_are_refused,
    connections_per_ip_are_capped,
    idle_http2_connection_is_closed,
    at_the_limit_an_idle_http_connection_makes_room,
);
