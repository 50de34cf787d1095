//! Retry on the client against a real server whose handler fails its first calls.

#![cfg(feature = "retry")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc::proto::policy::{Backoff, GiveUpReason, RetryBudget, RetryDecision, RetryPolicy};
use gorpc::{
    CallOptions, Client, Code, Router, Runtime, Server, ServerHandle, ServerReply, ServerRequest,
    Status,
};
use gorpc_plugins::retry::Retry;
use gorpc_tests::{client_config, loopback, on_every_runtime};

const FLAKY: &str = "/test.Flaky/Call";
const OTHER: &str = "/test.Flaky/Other";

/// A server whose handlers fail their first `failures` calls (counted together) with `code`,
/// then answer "ok"; the counter says how often they ran.
async fn serve<S: Runtime>(
    runtime: S,
    failures: usize,
    code: Code,
) -> (ServerHandle<S>, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let handler = move |_: ServerRequest| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < failures {
                ServerReply::error(Status::new(code, format!("failure {}", n + 1)))
            } else {
                ServerReply::ok(Bytes::from_static(b"ok"))
            }
        }
    };
    let router = Router::new()
        .route(FLAKY, handler.clone())
        .route(OTHER, handler);
    let server = Server::new(runtime, router).bind(loopback()).await.unwrap();
    (server, handled)
}

/// Three attempts, retrying `Unavailable`, with 1–5 ms backoffs.
fn policy() -> RetryPolicy {
    RetryPolicy::new(7)
        .with_max_attempts(3)
        .with_backoff(Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(5),
            multiplier: 2.0,
        })
}

async fn client<C: Runtime>(
    runtime: C,
    server_addr: std::net::SocketAddr,
    retry: Retry<C>,
) -> Client {
    Client::connect(runtime, server_addr, client_config())
        .await
        .unwrap()
        .with_interceptor(retry)
}

async fn call(
    client: &Client,
    method: &'static str,
    options: CallOptions,
) -> Result<String, Status> {
    let rsp = client.call_raw(method, 0, Bytes::new(), options).await?;
    Ok(String::from_utf8(rsp.body.to_vec()).unwrap())
}

async fn two_failures_are_retried_to_success<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, handled) = serve(server_rt, 2, Code::Unavailable).await;
    let retry = Retry::new(client_rt.clone(), policy());
    let client = client(client_rt, server.local_addr(), retry).await;

    assert_eq!(
        call(&client, FLAKY, CallOptions::default()).await.unwrap(),
        "ok"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    server.abort().await;
}

async fn the_last_status_returns_after_max_attempts<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, handled) = serve(server_rt, 5, Code::Unavailable).await;
    let retry = Retry::new(client_rt.clone(), policy());
    let client = client(client_rt, server.local_addr(), retry).await;

    let err = call(&client, FLAKY, CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unavailable, "failure 3")
    );
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    server.abort().await;
}

async fn a_non_retryable_code_returns_at_once<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, handled) = serve(server_rt, 5, Code::PermissionDenied).await;
    let retry = Retry::new(client_rt.clone(), policy());
    let client = client(client_rt, server.local_addr(), retry).await;

    let err = call(&client, FLAKY, CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, "failure 1")
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    server.abort().await;
}

async fn an_empty_budget_allows_no_retry<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, handled) = serve(server_rt, 2, Code::Unavailable).await;
    let retry =
        Retry::new(client_rt.clone(), policy()).budget(RetryBudget::new(0.0, 0, 0, Instant::now()));
    let client = client(client_rt, server.local_addr(), retry).await;

    let err = call(&client, FLAKY, CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unavailable, "failure 1")
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    let err = call(&client, FLAKY, CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unavailable, "failure 2")
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        2,
        "still no retry on a second call"
    );
    server.abort().await;
}

async fn no_retry_sleeps_past_the_deadline<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, handled) = serve(server_rt, 5, Code::Unavailable).await;
    // A backoff drawn from up to an hour all but surely ends after a 300 ms deadline; with
    // this seed it does, as the first assertion checks on a copy of the policy.
    let slow = RetryPolicy::new(7).with_backoff(Backoff {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
        multiplier: 1.0,
    });
    let timeout = Duration::from_millis(300);
    let now = Instant::now();
    assert_eq!(
        slow.clone().decide(
            1,
            &Status::new(Code::Unavailable, ""),
            now,
            Some(now + timeout),
            &mut RetryBudget::standard(now),
        ),
        RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose),
        "the first backoff of this seed ends after the deadline"
    );
    let retry = Retry::new(client_rt.clone(), slow);
    let client = client(client_rt, server.local_addr(), retry).await;

    let options = CallOptions {
        timeout: Some(timeout),
        ..CallOptions::default()
    };
    let started = Instant::now();
    let err = call(&client, FLAKY, options).await.unwrap_err();
    assert!(started.elapsed() < timeout, "gave up before the deadline");
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unavailable, "failure 1")
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    server.abort().await;
}

async fn a_method_policy_overrides_the_default<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, handled) = serve(server_rt, 3, Code::Unavailable).await;
    let retry =
        Retry::new(client_rt.clone(), policy()).method(OTHER, policy().with_max_attempts(1));
    let client = client(client_rt, server.local_addr(), retry).await;

    let err = call(&client, OTHER, CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unavailable, "failure 1")
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1, "OTHER is never retried");
    assert_eq!(
        call(&client, FLAKY, CallOptions::default()).await.unwrap(),
        "ok"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        4,
        "FLAKY is, with the default policy"
    );
    server.abort().await;
}

on_every_runtime!(
    two_failures_are_retried_to_success,
    the_last_status_returns_after_max_attempts,
    a_non_retryable_code_returns_at_once,
    an_empty_budget_allows_no_retry,
    no_retry_sleeps_past_the_deadline,
    a_method_policy_overrides_the_default,
);
