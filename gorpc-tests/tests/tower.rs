//! tower layers around a server's calls and a client's, and a client as a tower service,
//! on tokio and on smol. tower's timeout, rate limit and buffer use tokio's timer or
//! spawner: on smol the tasks are spawned under async-compat's tokio context, the recipe
//! `gorpc::tower` gives.
//!
//! Every wait is for an event, not a duration: a call that must be held finds the stack
//! not ready (a limit reached) and is shed at once by `LoadShed`; the held call is then
//! released by the test, and the limit is free once its answer is back.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{select, Either};
use gorpc::client::OutgoingCall;
use gorpc::{
    CallOptions, Client, Code, Router, Runtime, Server, ServerHandle, ServerReply, ServerRequest,
};
use gorpc_tests::{client_config, loopback, within, Smol, Tokio};
use tower::buffer::BufferLayer;
use tower::limit::{ConcurrencyLimitLayer, RateLimitLayer};
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;
use tower::{ServiceBuilder, ServiceExt as _};

const ECHO: &str = "/tower.Test/Echo";
const HOLD: &str = "/tower.Test/Hold";
const WAIT: Duration = Duration::from_secs(20);

/// A server whose `ECHO` answers its body and whose `HOLD` says it started, then answers
/// once the test releases it.
struct Fixture<S: Runtime> {
    server: ServerHandle<S>,
    started: async_channel::Receiver<()>,
    release: async_channel::Sender<()>,
}

async fn serve<S: Runtime>(runtime: S, build: impl FnOnce(Server<S>) -> Server<S>) -> Fixture<S> {
    let (started_tx, started) = async_channel::unbounded();
    let (release, release_rx) = async_channel::unbounded::<()>();
    let router = Router::new()
        .route(ECHO, |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        })
        .route(HOLD, move |_| {
            let _ = started_tx.try_send(());
            let release = release_rx.clone();
            async move {
                let _ = release.recv().await;
                ServerReply::ok(Bytes::from_static(b"released"))
            }
        });
    let server = build(Server::new(runtime, router))
        .bind(loopback())
        .await
        .expect("bind");
    Fixture {
        server,
        started,
        release,
    }
}

fn echo(body: &'static [u8]) -> OutgoingCall {
    OutgoingCall {
        method: ECHO.into(),
        codec: 0,
        metadata: Default::default(),
        deadline: Some(Instant::now() + WAIT),
        key: None,
        body: Bytes::from_static(body),
    }
}

/// While a `HOLD` call through `client` waits in its handler, a second call through
/// `client` must be shed; then the held call is released and answered, and a third call
/// passes.
async fn shed_while_held<S: Runtime, C: Runtime>(
    fixture: &Fixture<S>,
    client_rt: &C,
    client: &Client,
) {
    let held = client.call_raw(HOLD, 0, Bytes::new(), CallOptions::default());
    let second = async {
        within(client_rt, WAIT, "the handler", fixture.started.recv())
            .await
            .unwrap();
        client
            .call_raw(ECHO, 0, Bytes::from_static(b"x"), CallOptions::default())
            .await
    };
    let (second, held) = match select(Box::pin(held), Box::pin(second)).await {
        Either::Right((second, held)) => (second, held),
        Either::Left((outcome, _)) => panic!("the held call ended: {outcome:?}"),
    };
    let error = second.expect_err("shed");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");

    fixture.release.try_send(()).unwrap();
    let answer = within(client_rt, WAIT, "the released call", held).await;
    assert_eq!(
        answer.expect("answered").body,
        Bytes::from_static(b"released")
    );
    let third = client.call_raw(ECHO, 0, Bytes::from_static(b"y"), CallOptions::default());
    let third = within(client_rt, WAIT, "a call once the limit is free", third).await;
    assert_eq!(third.expect("answered").body, Bytes::from_static(b"y"));
}

/// A server behind `LoadShed` then `ConcurrencyLimit(1)`: while one call is in the
/// handler, the next is refused at once with `ResourceExhausted`, before any handler.
async fn server_sheds_past_its_concurrency_limit<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let fixture = serve(server_rt, |server| {
        server
            .layer(LoadShedLayer::new())
            .layer(ConcurrencyLimitLayer::new(1))
    })
    .await;
    let client = Client::lazy(
        client_rt.clone(),
        fixture.server.local_addr(),
        client_config(),
    );
    shed_while_held(&fixture, &client_rt, &client).await;
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

/// tower's timeout around a server's calls: a handler that does not answer is answered
/// with `DeadlineExceeded` by the layer, long before the client's own deadline.
async fn server_times_calls_out<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let fixture = serve(server_rt, |server| {
        server.layer(TimeoutLayer::new(Duration::from_millis(50)))
    })
    .await;
    let client = Client::lazy(
        client_rt.clone(),
        fixture.server.local_addr(),
        client_config(),
    );
    let call = client.call_raw(HOLD, 0, Bytes::new(), CallOptions::default());
    let error = within(&client_rt, WAIT, "the timed-out call", call)
        .await
        .expect_err("timed out");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    assert!(error.message().contains("tower"), "{error}");
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

/// A rate of one call a minute: the first passes, the second waits for the rate and
/// meets its deadline first. RateLimit is not `Clone` (its rate is its own), so a `Buffer`
/// in front shares it between calls, as tower's documentation advises.
async fn server_rate_limits<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let fixture = serve(server_rt, |server| {
        server.layer(
            ServiceBuilder::new()
                .layer(BufferLayer::new(16))
                .layer(RateLimitLayer::new(1, Duration::from_secs(60))),
        )
    })
    .await;
    let client = Client::lazy(
        client_rt.clone(),
        fixture.server.local_addr(),
        client_config(),
    );
    let first = client.call_raw(ECHO, 0, Bytes::from_static(b"1"), CallOptions::default());
    let first = within(&client_rt, WAIT, "the first call", first).await;
    assert_eq!(
        first.expect("within the rate").body,
        Bytes::from_static(b"1")
    );
    let options = CallOptions {
        timeout: Some(Duration::from_millis(300)),
        ..CallOptions::default()
    };
    let second = client.call_raw(ECHO, 0, Bytes::from_static(b"2"), options);
    let second = within(&client_rt, WAIT, "the second call", second).await;
    assert_eq!(
        second.expect_err("over the rate").code(),
        Code::DeadlineExceeded
    );
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

/// Layers on the client: load shedding over a concurrency limit of one refuses a second
/// call locally while the first waits; a timeout ends a call the server does not answer.
/// The client itself answers as a tower service.
async fn client_layers_and_client_as_a_service<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let fixture = serve(server_rt, |server| server).await;
    let client = Client::lazy(
        client_rt.clone(),
        fixture.server.local_addr(),
        client_config(),
    );

    let answer = within(
        &client_rt,
        WAIT,
        "oneshot",
        client.clone().oneshot(echo(b"tower")),
    )
    .await
    .expect("answered");
    assert_eq!(answer.body, Bytes::from_static(b"tower"));

    let limited = client
        .clone()
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1));
    shed_while_held(&fixture, &client_rt, &limited).await;

    let timed = client.layer(TimeoutLayer::new(Duration::from_millis(50)));
    let call = timed.call_raw(HOLD, 0, Bytes::new(), CallOptions::default());
    let error = within(&client_rt, WAIT, "the timed-out call", call)
        .await
        .expect_err("timed out");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    fixture.release.try_send(()).unwrap();
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

/// smol with its tasks spawned under a tokio context, for tower's tokio timers.
fn smol_with_tokio_timers() -> Smol {
    Smol::with_spawner(|task| {
        smol::spawn(async_compat::Compat::new(task)).detach();
    })
}

fn on_tokio<F: Future<Output = ()>>(scenario: impl FnOnce(Tokio, Tokio) -> F) {
    let rt = gorpc_tests::tokio_runtime();
    let t = Tokio::from_handle(rt.handle().clone());
    rt.block_on(scenario(t.clone(), t));
}

fn on_smol<F: Future<Output = ()>>(scenario: impl FnOnce(Smol, Smol) -> F) {
    let rt = smol_with_tokio_timers();
    smol::block_on(async_compat::Compat::new(scenario(rt.clone(), rt)));
}

macro_rules! on_both_runtimes {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn tokio() {
                    super::on_tokio(super::$scenario);
                }

                #[test]
                fn smol() {
                    super::on_smol(super::$scenario);
                }
            }
        )*
    };
}

on_both_runtimes!(
    server_sheds_past_its_concurrency_limit,
    server_times_calls_out,
    server_rate_limits,
    client_layers_and_client_as_a_service,
);
