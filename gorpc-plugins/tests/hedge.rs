//! Hedged requests on the client against a real server whose handlers stall on demand.

#![cfg(feature = "hedge")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc::proto::policy::Hedging;
use gorpc::{
    CallOptions, Client, Code, Router, Runtime, Server, ServerHandle, ServerReply, ServerRequest,
    Status,
};
use gorpc_plugins::hedge::Hedge;
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};

const IDEMPOTENT: &str = "/test.Hedged/Read";
const NOT_IDEMPOTENT: &str = "/test.Hedged/Write";

/// What the server saw: handlers started, and handlers dropped before answering.
#[derive(Default)]
struct Seen {
    started: AtomicUsize,
    dropped_unanswered: AtomicUsize,
}

/// Counts a handler that never answered when its future is dropped (cancelled).
struct StallGuard(Arc<Seen>);

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.0.dropped_unanswered.fetch_add(1, Ordering::SeqCst);
    }
}

/// A server whose first `stalls` calls (counted together over both methods) never answer;
/// later ones answer "fast" at once.
async fn serve<S: Runtime>(runtime: S, stalls: usize) -> (ServerHandle<S>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let counter = seen.clone();
    let handler = move |_: ServerRequest| {
        let n = counter.started.fetch_add(1, Ordering::SeqCst);
        let guard = (n < stalls).then(|| StallGuard(counter.clone()));
        async move {
            if let Some(guard) = guard {
                std::future::pending::<()>().await;
                drop(guard);
            }
            ServerReply::ok(Bytes::from_static(b"fast"))
        }
    };
    let router = Router::new()
        .route(IDEMPOTENT, handler.clone())
        .route(NOT_IDEMPOTENT, handler);
    let server = Server::new(runtime, router).bind(loopback()).await.unwrap();
    (server, seen)
}

async fn client<C: Runtime>(runtime: C, addr: std::net::SocketAddr, hedge: Hedge<C>) -> Client {
    Client::connect(runtime, addr, client_config())
        .await
        .unwrap()
        .with_interceptor(hedge)
}

async fn call(client: &Client, method: &'static str, timeout: Duration) -> Result<Bytes, Status> {
    let options = CallOptions {
        timeout: Some(timeout),
        ..CallOptions::default()
    };
    Ok(client
        .call_raw(method, 0, Bytes::new(), options)
        .await?
        .body)
}

async fn eventually<R: Runtime>(rt: &R, what: &str, check: impl Fn() -> bool) {
    within(rt, 10 * SECOND, what, async {
        while !check() {
            gorpc_tests::sleep(rt, Duration::from_millis(5)).await;
        }
    })
    .await
}

async fn a_hedge_answers_when_the_first_attempt_stalls<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, seen) = serve(server_rt, 1).await;
    let hedge = Hedge::new(client_rt.clone())
        .method(IDEMPOTENT, Hedging::new(2, Duration::from_millis(50)));
    let client = client(client_rt.clone(), server.local_addr(), hedge).await;

    let started = Instant::now();
    let body = call(&client, IDEMPOTENT, 20 * SECOND).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(body, "fast");
    assert!(
        elapsed >= Duration::from_millis(50),
        "the hedge waited for its delay, took {elapsed:?}"
    );
    assert!(
        elapsed < 5 * SECOND,
        "the hedge answered, not the deadline: took {elapsed:?}"
    );
    assert_eq!(seen.started.load(Ordering::SeqCst), 2);
    // The stalled attempt was dropped on the client, which cancels it on the server.
    eventually(&client_rt, "the stalled handler is cancelled", || {
        seen.dropped_unanswered.load(Ordering::SeqCst) == 1
    })
    .await;
    server.abort().await;
}

async fn a_method_not_marked_idempotent_is_never_hedged<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, seen) = serve(server_rt, 1).await;
    let hedge = Hedge::new(client_rt.clone())
        .method(IDEMPOTENT, Hedging::new(3, Duration::from_millis(10)));
    let client = client(client_rt.clone(), server.local_addr(), hedge).await;

    let err = call(&client, NOT_IDEMPOTENT, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(seen.started.load(Ordering::SeqCst), 1, "one attempt only");
    server.abort().await;
}

async fn hedging_stops_at_max_attempts<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, seen) = serve(server_rt, usize::MAX).await;
    let hedge = Hedge::new(client_rt.clone())
        .method(IDEMPOTENT, Hedging::new(3, Duration::from_millis(20)));
    let client = client(client_rt.clone(), server.local_addr(), hedge).await;

    let timeout = Duration::from_millis(600);
    let started = Instant::now();
    let err = call(&client, IDEMPOTENT, timeout).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < timeout + 5 * SECOND);
    assert_eq!(
        seen.started.load(Ordering::SeqCst),
        3,
        "three attempts in all"
    );
    // Every attempt ended with the call, so every handler is cancelled.
    eventually(&client_rt, "all three handlers are cancelled", || {
        seen.dropped_unanswered.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(seen.started.load(Ordering::SeqCst), 3, "and none after");
    server.abort().await;
}

async fn no_hedge_is_sent_at_or_after_the_deadline<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, seen) = serve(server_rt, usize::MAX).await;
    // Hedges would be due at 200 ms, 400 ms, ...; the call's deadline is 300 ms.
    let hedge = Hedge::new(client_rt.clone())
        .method(IDEMPOTENT, Hedging::new(5, Duration::from_millis(200)));
    let client = client(client_rt.clone(), server.local_addr(), hedge).await;

    let err = call(&client, IDEMPOTENT, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    gorpc_tests::sleep(&client_rt, Duration::from_millis(300)).await;
    assert_eq!(
        seen.started.load(Ordering::SeqCst),
        2,
        "the original and the 200 ms hedge only"
    );
    server.abort().await;
}

on_every_runtime!(
    a_hedge_answers_when_the_first_attempt_stalls,
    a_method_not_marked_idempotent_is_never_hedged,
    hedging_stops_at_max_attempts,
    no_hedge_is_sent_at_or_after_the_deadline,
);
