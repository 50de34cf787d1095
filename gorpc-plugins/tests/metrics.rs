//! Metrics on a real client and server: counts per method and status, latency percentiles.

#![cfg(feature = "metrics")]

use std::time::Duration;

use bytes::Bytes;
use gorpc::{
    CallOptions, Client, Code, Router, Runtime, Server, ServerReply, ServerRequest, Status,
};
use gorpc_plugins::metrics::{MethodStats, Metrics};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};

const ECHO: &str = "/test.M/Echo";
const FAIL: &str = "/test.M/Fail";
const MISSING: &str = "/test.M/Missing";
const HANG: &str = "/test.M/Hang";

fn router() -> Router {
    Router::new()
        .route(ECHO, |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        })
        .route(FAIL, |_| async {
            ServerReply::error(Status::new(Code::NotFound, "no such thing"))
        })
        .route(HANG, |_| futures::future::pending())
}

async fn call(client: &Client, method: &'static str) -> Result<Bytes, Status> {
    let body = Bytes::from_static(b"ping");
    let rsp = client
        .call_raw(method, 0, body, CallOptions::default())
        .await?;
    Ok(rsp.body)
}

fn assert_latencies_ordered(method: &str, stats: &MethodStats) {
    assert!(stats.p50_us > 0, "{method}: {stats:?}");
    assert!(
        stats.p50_us <= stats.p90_us
            && stats.p90_us <= stats.p99_us
            && stats.p99_us <= stats.max_us,
        "{method}: {stats:?}"
    );
}

async fn counts_ok_and_failed_calls_per_method_on_both_sides<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server_metrics = Metrics::new();
    let server = Server::new(server_rt, router())
        .interceptor(server_metrics.clone())
        .bind(loopback())
        .await
        .unwrap();
    let client_metrics = Metrics::new();
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap()
        .with_interceptor(client_metrics.clone());

    for _ in 0..20 {
        assert_eq!(call(&client, ECHO).await.unwrap(), "ping");
    }
    for _ in 0..3 {
        assert_eq!(
            call(&client, FAIL).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    for _ in 0..2 {
        let err = call(&client, MISSING).await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
    }

    // The server records before it answers, so its numbers are complete by now too.
    for (side, metrics) in [("client", &client_metrics), ("server", &server_metrics)] {
        let snapshot = metrics.snapshot();
        assert_eq!(
            snapshot.keys().map(String::as_str).collect::<Vec<_>>(),
            [ECHO, FAIL, MISSING],
            "{side}"
        );
        let counts = |method: &str| {
            let stats = &snapshot[method];
            (stats.total, stats.ok, stats.errors.clone())
        };
        assert_eq!(counts(ECHO), (20, 20, vec![]), "{side}");
        assert_eq!(counts(FAIL), (3, 0, vec![(Code::NotFound, 3)]), "{side}");
        assert_eq!(
            counts(MISSING),
            (2, 0, vec![(Code::Unimplemented, 2)]),
            "{side}"
        );
        for (method, stats) in &snapshot {
            assert_latencies_ordered(&format!("{side} {method}"), stats);
        }
    }
    server.abort().await;
}

async fn abandoned_calls_count_as_deadline_exceeded_and_cancelled<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server_metrics = Metrics::new();
    let server = Server::new(server_rt.clone(), router())
        .interceptor(server_metrics.clone())
        .bind(loopback())
        .await
        .unwrap();
    let client_metrics = Metrics::new();
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap()
        .with_interceptor(client_metrics.clone());

    let options = CallOptions {
        timeout: Some(Duration::from_millis(100)),
        ..CallOptions::default()
    };
    let began = std::time::Instant::now();
    let err = client
        .call_raw(HANG, 0, Bytes::new(), options)
        .await
        .unwrap_err();
    let waited = began.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    // The deadline is set when the call is made, so the caller waited at least that long;
    // the interceptor, which starts a little later, measured a part of it.
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    let stats = &client_metrics.snapshot()[HANG];
    assert_eq!(stats.errors, [(Code::DeadlineExceeded, 1)], "client");
    assert!(
        stats.max_us > 0 && stats.max_us <= waited.as_micros() as u64,
        "the client waited: {stats:?}"
    );

    // The server drops the handler at its own deadline, which may come a little later.
    let dropped = async {
        while server_metrics.snapshot().get(HANG).map_or(0, |s| s.total) == 0 {
            gorpc_tests::sleep(&server_rt, Duration::from_millis(10)).await;
        }
    };
    within(
        &server_rt,
        5 * SECOND,
        "the server dropping the handler",
        dropped,
    )
    .await;
    let stats = &server_metrics.snapshot()[HANG];
    assert_eq!(stats.errors, [(Code::Cancelled, 1)], "server");
    server.abort().await;
}

on_every_runtime!(
    counts_ok_and_failed_calls_per_method_on_both_sides,
    abandoned_calls_count_as_deadline_exceeded_and_cancelled,
);
