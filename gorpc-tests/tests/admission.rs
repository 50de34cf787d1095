//! Server-wide admission, on every runtime pairing: past `max_in_flight` calls wait in a
//! bounded queue, past that they are refused `ResourceExhausted` at once with a retry hint
//! the client sees (`Status::retry_after`) and gorpc-plugins' `Retry` waits out; a queued
//! call runs once a slot frees; health checks and other calls are not harmed.
//!
//! Every wait is for an event (a handler started, a call ended); the time limits only stop
//! a broken run.

use std::time::Duration;

use gorpc::observe::{CallEnd, EndedCall};
use gorpc::proto::policy::RetryPolicy;
use gorpc::server::AdmissionConfig;
use gorpc::{Client, Code, Router, Runtime, Server, ServerInterceptor};
use gorpc_plugins::retry::Retry;
use gorpc_tests::{client_config, loopback, on_every_runtime, within};

const WAIT: Duration = Duration::from_secs(20);
const HOLD: &str = "/admission.Test/Hold";

/// `HOLD` says it started, then answers once `release` gives it a token (or closes).
fn router(started: async_channel::Sender<u32>, release: async_channel::Receiver<()>) -> Router {
    Router::new().msgpack(HOLD, move |n: u32| {
        let (started, release) = (started.clone(), release.clone());
        async move {
            let _ = started.send(n).await;
            let _ = release.recv().await;
            Ok(n)
        }
    })
}

/// Tells the test how each call ended on the server.
struct Ends(async_channel::Sender<CallEnd>);

impl ServerInterceptor for Ends {
    fn on_end(&self, call: &EndedCall<'_>) {
        let _ = self.0.try_send(call.end);
    }
}

async fn client<R: Runtime>(runtime: R, addr: std::net::SocketAddr) -> Client {
    Client::builder(runtime)
        .config(client_config())
        .endpoint(addr)
        .connect()
        .await
        .expect("a client")
}

/// Two calls run, one waits, the next is refused at once with the hint; a freed slot lets
/// the waiting call run.
async fn over_capacity_calls_queue_then_are_refused<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (started_tx, started) = async_channel::unbounded();
    let (release_tx, release) = async_channel::unbounded();
    let admission = AdmissionConfig {
        max_in_flight: 2,
        max_queued: 1,
        max_queue_wait: Duration::from_secs(30),
        retry_after: Duration::from_millis(700),
    };
    let server = Server::new(server_rt, router(started_tx, release))
        .admission(admission)
        .bind(loopback())
        .await
        .unwrap();
    let client = client(client_rt.clone(), server.local_addr()).await;
    let call = |n: u32| {
        let client = client.clone();
        async move { client.call::<u32, u32>(HOLD, &n).await }
    };
    let running = futures::future::join(call(1), call(2));
    let scenario = async {
        let mut first = vec![
            within(&client_rt, WAIT, "a call started", started.recv())
                .await
                .unwrap(),
            within(&client_rt, WAIT, "a call started", started.recv())
                .await
                .unwrap(),
        ];
        first.sort();
        assert_eq!(first, [1, 2]);
        // The third waits (sent first on the one connection, so dispatched first); the
        // fourth finds the queue full.
        let (queued, refused) = futures::future::join(call(3), async {
            let refused = call(4).await;
            // Only now let the slots go: the third then runs.
            for _ in 0..3 {
                release_tx.send(()).await.unwrap();
            }
            refused
        })
        .await;
        let refused = refused.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
        assert!(refused.message().contains("overloaded"), "{refused}");
        assert_eq!(refused.retry_after(), Some(Duration::from_millis(700)));
        assert_eq!(queued.unwrap(), 3);
        assert_eq!(
            within(&client_rt, WAIT, "the queued call started", started.recv())
                .await
                .unwrap(),
            3
        );
    };
    let ((one, two), ()) = within(
        &client_rt,
        WAIT,
        "the scenario",
        futures::future::join(running, scenario),
    )
    .await;
    assert_eq!((one.unwrap(), two.unwrap()), (1, 2));
    server.abort().await;
}

/// A refused call retried by `Retry` waits the server's hint and then gets through.
async fn retry_waits_out_the_servers_hint<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (started_tx, started) = async_channel::unbounded();
    let (release_tx, release) = async_channel::unbounded();
    let (ends_tx, ends) = async_channel::unbounded();
    let admission = AdmissionConfig {
        max_in_flight: 1,
        max_queued: 0,
        max_queue_wait: Duration::from_millis(100),
        retry_after: Duration::from_millis(100),
    };
    let server = Server::new(server_rt, router(started_tx, release))
        .admission(admission)
        .interceptor(Ends(ends_tx))
        .bind(loopback())
        .await
        .unwrap();
    let plain = client(client_rt.clone(), server.local_addr()).await;
    // No code is retryable by this policy: only the server's hint makes the refusal so.
    let policy = RetryPolicy::new(7)
        .with_retryable_codes(&[])
        .with_max_attempts(50);
    let retrying = Client::builder(client_rt.clone())
        .config(client_config())
        .endpoint(server.local_addr())
        .interceptor(Retry::new(client_rt.clone(), policy))
        .connect()
        .await
        .unwrap();
    let held = plain.call::<u32, u32>(HOLD, &1);
    let scenario = async {
        assert_eq!(
            within(&client_rt, WAIT, "held", started.recv())
                .await
                .unwrap(),
            1
        );
        let retried = retrying.call::<u32, u32>(HOLD, &2);
        let release_after_a_refusal = async {
            let end = within(&client_rt, WAIT, "a refusal", ends.recv())
                .await
                .unwrap();
            assert_eq!(end, CallEnd::Answered(Code::ResourceExhausted));
            drop(release_tx);
        };
        let (retried, ()) = futures::future::join(retried, release_after_a_refusal).await;
        assert_eq!(retried.expect("the retry got through"), 2);
    };
    let (held, ()) = within(
        &client_rt,
        WAIT,
        "the scenario",
        futures::future::join(held, scenario),
    )
    .await;
    assert_eq!(held.unwrap(), 1);
    server.abort().await;
}

on_every_runtime!(
    over_capacity_calls_queue_then_are_refused,
    retry_waits_out_the_servers_hint,
);
