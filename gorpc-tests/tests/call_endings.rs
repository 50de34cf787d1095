//! How calls end, as a server's interceptors hear it (`on_end`): answered, failed, past
//! the deadline, cancelled by the client, cut off with the connection, refused, over each
//! protocol the server speaks and on every runtime pairing.
//!
//! Stream calls end the same ways, and a client's interceptors hear of its own calls' ends.
//! A stream has no deadline unless its call sets one; the stream idle timeout ends one whose
//! server went quiet.
//!
//! Every wait is for an event: the handler says it started, the interceptor says the call
//! ended. Faults come from a proxy between client and server: a blackhole keeps the
//! client's own cancel from racing the server's deadline, a reset cuts the connection.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{select, Either};
use futures::StreamExt as _;
use gorpc::observe::{CallEnd, EndedCall};
use gorpc::proto::StreamKind;
use gorpc::stream::ResponseSink;
use gorpc::{
    CallOptions, Client, ClientConfig, ClientInterceptor, Code, Raw, Request, Router, Runtime,
    Server, ServerHandle, ServerInterceptor, ServerReply, ServerRequest, Status,
};
use gorpc_tests::fault::{Fault, FaultProxy};
use gorpc_tests::{client_config, loopback, on_every_runtime, within};

const WAIT: Duration = Duration::from_secs(20);

/// One call's end as the interceptor heard it.
#[derive(Clone, Debug)]
struct Ended {
    method: String,
    end: CallEnd,
    peer: Option<SocketAddr>,
    id: Option<u64>,
    message: Option<String>,
}

struct Recorder(async_channel::Sender<Ended>);

impl Recorder {
    fn record(&self, call: &EndedCall<'_>) {
        let _ = self.0.try_send(Ended {
            method: call.method.to_owned(),
            end: call.end,
            peer: call.peer,
            id: call.id,
            message: call.status.map(|s| s.message().to_owned()),
        });
    }
}

impl ServerInterceptor for Recorder {
    fn on_end(&self, call: &EndedCall<'_>) {
        self.record(call);
    }
}

impl ClientInterceptor for Recorder {
    fn on_end(&self, call: &EndedCall<'_>) {
        self.record(call);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Binary,
    Grpc,
    Http,
}

const OK: &str = "/ends.Ends/Ok";
const FAIL: &str = "/ends.Ends/Fail";
const HANG: &str = "/ends.Ends/Hang";
/// A server stream: one message, then another once released, then the end.
const STREAM: &str = "/ends.Ends/Stream";

/// A server answering all three protocols on one port, whose interceptor reports every
/// end, and whose `HANG` handler says when it started and then never answers.
struct Fixture<S: Runtime> {
    server: ServerHandle<S>,
    ends: async_channel::Receiver<Ended>,
    started: async_channel::Receiver<()>,
    /// Lets the `STREAM` handler send its second message.
    release: async_channel::Sender<()>,
}

impl<S: Runtime> Fixture<S> {
    async fn start(server_rt: S) -> Self {
        let (ends_tx, ends) = async_channel::unbounded();
        let (started_tx, started) = async_channel::unbounded();
        let (release, release_rx) = async_channel::unbounded::<()>();
        let router = Router::new()
            .route(
                OK,
                |req: ServerRequest| async move { ServerReply::ok(req.body) },
            )
            .route(FAIL, |_| async {
                ServerReply::error(Status::new(Code::NotFound, "no such thing"))
            })
            .route(HANG, {
                let started_tx = started_tx.clone();
                move |_| {
                    let _ = started_tx.try_send(());
                    std::future::pending()
                }
            })
            .server_stream(
                STREAM,
                Raw,
                move |_: Request<Bytes>, mut sink: ResponseSink<Bytes>| {
                    let release = release_rx.clone();
                    async move {
                        sink.send(&Bytes::from_static(b"first")).await?;
                        let _ = release.recv().await;
                        sink.send(&Bytes::from_static(b"second")).await?;
                        Ok(())
                    }
                },
            );
        let server = Server::new(server_rt, router)
            .interceptor(Recorder(ends_tx))
            .http()
            .bind(loopback())
            .await
            .expect("bind");
        Fixture {
            server,
            ends,
            started,
            release,
        }
    }

    /// A proxy to the server and a client of `protocol` through it.
    fn client<C: Runtime>(&self, client_rt: &C, protocol: Protocol) -> (FaultProxy, Client) {
        let proxy = FaultProxy::start(self.server.local_addr()).expect("proxy");
        let (rt, addr, config) = (client_rt.clone(), proxy.addr(), client_config());
        let client = match protocol {
            Protocol::Binary => Client::lazy(rt, addr, config),
            Protocol::Grpc => Client::grpc(rt, addr, config),
            Protocol::Http => Client::http(rt, addr, config),
        };
        (proxy, client)
    }

    async fn next_end<C: Runtime>(&self, client_rt: &C, method: &str) -> Ended {
        let ended = within(client_rt, WAIT, "the call's end", self.ends.recv())
            .await
            .expect("the server is up");
        assert_eq!(ended.method, method);
        ended
    }

    async fn handler_started<C: Runtime>(&self, client_rt: &C) {
        within(client_rt, WAIT, "the handler to start", self.started.recv())
            .await
            .expect("the server is up");
    }
}

fn timeout(t: Duration) -> CallOptions {
    CallOptions {
        timeout: Some(t),
        ..CallOptions::default()
    }
}

/// Calls `HANG` and, once its handler runs, does `then` while the call is still waiting;
/// returns the call's outcome, or `None` if `then` said to drop it.
async fn hang_then<C: Runtime, S: Runtime>(
    fixture: &Fixture<S>,
    client_rt: &C,
    client: &Client,
    options: CallOptions,
    then: impl FnOnce() -> bool,
) -> Option<Result<gorpc::RawResponse, Status>> {
    let call = std::pin::pin!(client.call_raw(HANG, 0, Bytes::new(), options));
    let started = std::pin::pin!(fixture.handler_started(client_rt));
    let call = match within(client_rt, WAIT, "the hanging call", select(call, started)).await {
        Either::Left((outcome, _)) => panic!("the hanging call ended first: {outcome:?}"),
        Either::Right(((), call)) => call,
    };
    if !then() {
        return None;
    }
    Some(within(client_rt, WAIT, "the call's outcome", call).await)
}

async fn every_ending<S: Runtime, C: Runtime>(server_rt: S, client_rt: C, protocol: Protocol) {
    let fixture = Fixture::start(server_rt).await;
    let (_proxy, client) = fixture.client(&client_rt, protocol);

    // Answered: OK, then an error of the handler's.
    let body = Bytes::from_static(b"hello");
    let answer = client
        .call_raw(OK, 0, body.clone(), CallOptions::default())
        .await
        .expect("answered");
    assert_eq!(answer.body, body);
    let ended = fixture.next_end(&client_rt, OK).await;
    assert_eq!(ended.end, CallEnd::Answered(Code::Ok));
    assert!(ended.peer.is_some_and(|peer| peer.ip().is_loopback()));
    assert_eq!(ended.id.is_some(), protocol == Protocol::Binary);

    let error = client
        .call_raw(FAIL, 0, Bytes::new(), CallOptions::default())
        .await
        .expect_err("the handler fails it");
    assert_eq!(error.code(), Code::NotFound);
    let ended = fixture.next_end(&client_rt, FAIL).await;
    assert_eq!(ended.end, CallEnd::Answered(Code::NotFound));
    assert_eq!(ended.message.as_deref(), Some("no such thing"));

    // The deadline: the client's cancel is held in a blackhole, so the server's own copy
    // of the deadline ends the call.
    let (proxy, client) = fixture.client(&client_rt, protocol);
    let outcome = hang_then(
        &fixture,
        &client_rt,
        &client,
        timeout(Duration::from_millis(300)),
        || {
            proxy.set(Fault::Blackhole);
            true
        },
    )
    .await;
    let error = outcome.expect("awaited").expect_err("past its deadline");
    assert_eq!(error.code(), Code::DeadlineExceeded);
    let ended = fixture.next_end(&client_rt, HANG).await;
    assert_eq!(ended.end, CallEnd::DeadlineExceeded);
    drop((proxy, client));

    // The caller stops waiting. The binary protocol sends CANCEL and gRPC resets the
    // stream; HTTP/1.1 can only close the connection.
    let (proxy, client) = fixture.client(&client_rt, protocol);
    let outcome = hang_then(&fixture, &client_rt, &client, timeout(WAIT), || false).await;
    assert!(outcome.is_none());
    let ended = fixture.next_end(&client_rt, HANG).await;
    let expected = match protocol {
        Protocol::Binary | Protocol::Grpc => CallEnd::Cancelled,
        Protocol::Http => CallEnd::ConnectionLost,
    };
    assert_eq!(ended.end, expected);
    drop((proxy, client));

    // The connection breaks under the call. hyper drops an HTTP/2 call without saying
    // whether the stream or the connection went: gRPC reports it cancelled.
    let (proxy, client) = fixture.client(&client_rt, protocol);
    let outcome = hang_then(&fixture, &client_rt, &client, timeout(WAIT), || {
        proxy.set(Fault::Reset);
        true
    })
    .await;
    let error = outcome.expect("awaited").expect_err("the connection broke");
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    let ended = fixture.next_end(&client_rt, HANG).await;
    let expected = match protocol {
        Protocol::Binary | Protocol::Http => CallEnd::ConnectionLost,
        Protocol::Grpc => CallEnd::Cancelled,
    };
    assert_eq!(ended.end, expected);
    drop((proxy, client));

    // Refused before any handler: a client stream opened on a unary method (the binary
    // protocol frames the two apart; gRPC and HTTP/1.1 do not).
    if protocol == Protocol::Binary {
        let (_proxy, client) = fixture.client(&client_rt, protocol);
        let (_sender, receiver) = client
            .stream_raw(
                OK,
                0,
                StreamKind::ClientStreaming,
                Bytes::new(),
                CallOptions::default(),
            )
            .await
            .expect("started");
        let error = within(&client_rt, WAIT, "the refusal", receiver.response())
            .await
            .expect_err("refused");
        assert_eq!(error.code(), Code::Unimplemented);
        let ended = fixture.next_end(&client_rt, OK).await;
        assert_eq!(ended.end, CallEnd::Refused(Code::Unimplemented));
    }

    assert!(fixture.ends.is_empty(), "one end per call");
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

/// Stream calls: one that runs to its end, one the client drops mid-stream. A stream has
/// no deadline from the client's default timeout; the stream idle timeout ends one whose
/// server went quiet.
async fn stream_endings<S: Runtime, C: Runtime>(server_rt: S, client_rt: C, protocol: Protocol) {
    let fixture = Fixture::start(server_rt).await;
    // A default timeout far shorter than the wait below: it must not touch the stream.
    let short = ClientConfig {
        default_timeout: Some(Duration::from_millis(50)),
        ..client_config()
    };
    let (rt, addr) = (client_rt.clone(), fixture.server.local_addr());
    let client = match protocol {
        Protocol::Binary => Client::lazy(rt, addr, short),
        Protocol::Grpc => Client::grpc(rt, addr, short),
        Protocol::Http => unreachable!("HTTP/1.1 carries no stream"),
    };
    async fn open(client: &Client) -> Result<gorpc::stream::ResponseStream<Bytes>, Status> {
        let empty = Bytes::new();
        client
            .server_stream::<_, Bytes, Bytes>(STREAM, Raw, &empty, CallOptions::default())
            .await
    }

    let mut messages = within(&client_rt, WAIT, "the stream", open(&client))
        .await
        .expect("started");
    let first = within(&client_rt, WAIT, "the first message", messages.next()).await;
    assert_eq!(first.unwrap().unwrap(), Bytes::from_static(b"first"));
    gorpc_tests::sleep(&client_rt, Duration::from_millis(300)).await;
    fixture.release.try_send(()).unwrap();
    let second = within(&client_rt, WAIT, "the second message", messages.next()).await;
    assert_eq!(second.unwrap().unwrap(), Bytes::from_static(b"second"));
    assert!(within(&client_rt, WAIT, "the end", messages.next())
        .await
        .is_none());
    let ended = fixture.next_end(&client_rt, STREAM).await;
    assert_eq!(ended.end, CallEnd::Answered(Code::Ok));

    // Dropped mid-stream: the server's handler is cancelled.
    let mut messages = within(&client_rt, WAIT, "the stream", open(&client))
        .await
        .expect("started");
    let first = within(&client_rt, WAIT, "the first message", messages.next()).await;
    assert_eq!(first.unwrap().unwrap(), Bytes::from_static(b"first"));
    drop(messages);
    let ended = fixture.next_end(&client_rt, STREAM).await;
    assert_eq!(ended.end, CallEnd::Cancelled);

    // Quiet past the idle timeout: the client gives up, and cancels.
    let idle = ClientConfig {
        stream_idle_timeout: Some(Duration::from_millis(100)),
        ..client_config()
    };
    let (rt, addr) = (client_rt.clone(), fixture.server.local_addr());
    let client = match protocol {
        Protocol::Binary => Client::lazy(rt, addr, idle),
        _ => Client::grpc(rt, addr, idle),
    };
    let mut messages = within(&client_rt, WAIT, "the stream", open(&client))
        .await
        .expect("started");
    let first = within(&client_rt, WAIT, "the first message", messages.next()).await;
    assert_eq!(first.unwrap().unwrap(), Bytes::from_static(b"first"));
    let quiet = within(&client_rt, WAIT, "the idle timeout", messages.next()).await;
    let error = quiet.expect("an item").expect_err("idle");
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    let ended = fixture.next_end(&client_rt, STREAM).await;
    assert_eq!(ended.end, CallEnd::Cancelled);
    drop(messages);

    assert!(fixture.ends.is_empty(), "one end per call");
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

async fn stream_endings_over_the_binary_protocol<S: Runtime, C: Runtime>(server: S, client: C) {
    stream_endings(server, client, Protocol::Binary).await;
}

async fn stream_endings_over_grpc<S: Runtime, C: Runtime>(server: S, client: C) {
    stream_endings(server, client, Protocol::Grpc).await;
}

/// A client's interceptors hear of its calls' ends: answered, failed, past the deadline,
/// abandoned by the caller.
async fn client_hears_every_ending<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let fixture = Fixture::start(server_rt).await;
    let (ends_tx, ends) = async_channel::unbounded();
    let client = Client::lazy(
        client_rt.clone(),
        fixture.server.local_addr(),
        client_config(),
    )
    .with_interceptor(Recorder(ends_tx));
    let next_end = || async {
        within(&client_rt, WAIT, "the client's end", ends.recv())
            .await
            .unwrap()
    };

    client
        .call_raw(OK, 0, Bytes::from_static(b"x"), CallOptions::default())
        .await
        .unwrap();
    let ended = next_end().await;
    assert_eq!(
        (ended.method.as_str(), ended.end),
        (OK, CallEnd::Answered(Code::Ok))
    );

    let _ = client
        .call_raw(FAIL, 0, Bytes::new(), CallOptions::default())
        .await;
    let ended = next_end().await;
    assert_eq!(ended.end, CallEnd::Answered(Code::NotFound));
    assert_eq!(ended.message.as_deref(), Some("no such thing"));

    let late = client
        .call_raw(HANG, 0, Bytes::new(), timeout(Duration::from_millis(100)))
        .await;
    assert_eq!(late.unwrap_err().code(), Code::DeadlineExceeded);
    assert_eq!(next_end().await.end, CallEnd::DeadlineExceeded);

    let outcome = hang_then(&fixture, &client_rt, &client, timeout(WAIT), || false).await;
    assert!(outcome.is_none());
    assert_eq!(next_end().await.end, CallEnd::Cancelled);
    assert!(ends.is_empty(), "one end per call");
    fixture.server.shutdown(Duration::from_secs(5)).await;
}

async fn every_ending_over_the_binary_protocol<S: Runtime, C: Runtime>(server: S, client: C) {
    every_ending(server, client, Protocol::Binary).await;
}

async fn every_ending_over_grpc<S: Runtime, C: Runtime>(server: S, client: C) {
    every_ending(server, client, Protocol::Grpc).await;
}

async fn every_ending_over_http<S: Runtime, C: Runtime>(server: S, client: C) {
    every_ending(server, client, Protocol::Http).await;
}

on_every_runtime!(
    every_ending_over_the_binary_protocol,
    every_ending_over_grpc,
    every_ending_over_http,
    stream_endings_over_the_binary_protocol,
    stream_endings_over_grpc,
    client_hears_every_ending,
);
