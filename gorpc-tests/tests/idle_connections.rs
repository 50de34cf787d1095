//! Idle connections under a server's policy, on every runtime pairing: a connection with no
//! call in flight is closed after `idle_timeout` even while it answers pings; at
//! `max_connections`, the longest-idle connection makes room for a new one instead of
//! everyone new being refused; and `max_connections_per_ip` caps one address.
//!
//! Every wait is for an event (a handler started, a connection was told to go away); the
//! time limits only stop a broken run.

use std::time::{Duration, Instant};

use gorpc::client::{Connection, ConnectionConfig};
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
        let newcomer = client(client_rt.clone(), &server).await;
        let echoed: u32 = within(
            &client_rt,
            WAIT,
            "the newcomer's call",
            newcomer.call(ECHO, &1),
        )
        .await
        .expect("the newcomer is served");
        assert_eq!(echoed, 1);
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

on_every_runtime!(
    idle_connection_is_closed_even_while_it_pings,
    at_the_limit_the_longest_idle_makes_room,
    at_the_limit_with_none_idle_newcomers_are_refused,
    connections_per_ip_are_capped,
);
