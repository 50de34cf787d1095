//! gRPC over HTTP/2, gorpc's client against gorpc's server, on every runtime pairing: what
//! the mapping promises beyond the call kinds (examples/tests/route_guide.rs runs those):
//! deadlines and cancellation reach the handler, size limits, metadata both ways with
//! binary values, interceptors, health through a graceful shutdown, balancing over gRPC.
//! Clients and servers nobody here wrote are in examples/tests (grpcio, tonic).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use gorpc::client::InstanceProtocol;
use gorpc::discovery::{Instance, StaticList};
use gorpc::grpc::health::{HealthCheckRequest, HealthCheckResponse, ServingStatus, WATCH};
use gorpc::proto::StreamKind;
use gorpc::{
    CallOptions, Client, Code, Limits, Metadata, Protobuf, Router, Runtime, Server, ServerConfig,
    ServerReply, ServerRequest, Shutdown, Status,
};
use gorpc_tests::fault::{count, methods, TestServer};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};

fn grpc_client<C: Runtime>(client_rt: &C, server: &TestServer<impl Runtime>) -> Client {
    Client::grpc(client_rt.clone(), server.addr(), client_config())
}

async fn call<C: Runtime>(
    client_rt: &C,
    client: &Client,
    method: &'static str,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, Status> {
    let options = CallOptions {
        timeout: Some(timeout),
        ..CallOptions::default()
    };
    let call = client.call_raw(method, gorpc::proto::codec::RAW, body, options);
    within(client_rt, 30 * SECOND, method, call)
        .await
        .map(|rsp| rsp.body)
}

/// Waits (bounded) until no handler of `server` is alive.
async fn handlers_dropped<C: Runtime>(client_rt: &C, server: &TestServer<impl Runtime>) {
    let handlers = server.handlers.clone();
    gorpc_tests::discovery::eventually(client_rt, "the handler is dropped", move || {
        handlers.live() == 0
    })
    .await;
}

/// The deadline travels as grpc-timeout and ends the call; the server drops the handler.
async fn a_deadline_ends_the_call_and_drops_the_handler<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server = TestServer::start_grpc(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let client = grpc_client(&client_rt, &server);
    let echoed = call(&client_rt, &client, methods::ECHO, "hi".into(), SECOND).await;
    assert_eq!(echoed.unwrap(), Bytes::from("hi"));
    let status = call(
        &client_rt,
        &client,
        methods::STALL,
        Bytes::new(),
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    handlers_dropped(&client_rt, &server).await;
    server.handle.abort().await;
}

/// A client that gives up on a stream resets it; the server drops the handler, and the
/// connection goes on serving.
async fn a_dropped_stream_drops_the_handler<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = TestServer::start_grpc(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let client = grpc_client(&client_rt, &server);
    let stream = async {
        let request = count::request(7, 1_000_000, 16, 1);
        let (_, mut messages) = client
            .stream_raw(
                methods::COUNT,
                gorpc::proto::codec::RAW,
                StreamKind::ServerStreaming,
                request,
                CallOptions::default(),
            )
            .await
            .unwrap();
        let first = messages.next().await.unwrap().unwrap();
        assert_eq!(count::parse_message(&first), Some((7, 0)));
        // Dropped here, mid-stream.
    };
    within(&client_rt, 20 * SECOND, "stream", stream).await;
    handlers_dropped(&client_rt, &server).await;
    let echoed = call(&client_rt, &client, methods::ECHO, "after".into(), SECOND).await;
    assert_eq!(echoed.unwrap(), Bytes::from("after"));
    server.handle.abort().await;
}

/// A message over the receiver's limit is RESOURCE_EXHAUSTED, both ways; the connection
/// goes on.
async fn messages_over_the_limit_are_resource_exhausted<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let mut config = ServerConfig::default();
    config.conn.limits = Limits {
        max_frame_len: 1024,
        ..Limits::default()
    };
    let server = TestServer::start_built(server_rt, loopback(), SECOND, |server| {
        server.config(config).http()
    })
    .await
    .unwrap();
    let client = grpc_client(&client_rt, &server);
    let big = Bytes::from(vec![7u8; 4096]);
    let status = call(&client_rt, &client, methods::ECHO, big, 5 * SECOND)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");

    let mut small_client = client_config();
    small_client.pool.connection.conn.limits.max_frame_len = 100;
    let client = Client::grpc(client_rt.clone(), server.addr(), small_client);
    let answer = Bytes::from(vec![1u8; 500]);
    let status = call(&client_rt, &client, methods::ECHO, answer, 5 * SECOND)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    let fits = call(&client_rt, &client, methods::ECHO, "ok".into(), 5 * SECOND).await;
    assert_eq!(fits.unwrap(), Bytes::from("ok"));
    server.handle.abort().await;
}

/// Metadata reaches the handler and interceptors (binary values too), and the handler's
/// reaches the client; a failing handler's status and message (not ASCII) come back as
/// they were; interceptors see gRPC calls as they see binary ones.
async fn metadata_statuses_and_interceptors<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let seen: Arc<Mutex<Vec<(String, Code, bool)>>> = Arc::default();
    let recorded = seen.clone();
    let interceptor = move |request: ServerRequest, next: gorpc::Next| {
        let method = request.method().to_owned();
        let has_peer = request.peer.is_some();
        let recorded = recorded.clone();
        next.run(request)
            .map(move |reply| {
                recorded
                    .lock()
                    .unwrap()
                    .push((method, reply.status.code(), has_peer));
                reply
            })
            .boxed()
    };
    let router = Router::new()
        .route("/test.Meta/Echo", |request: ServerRequest| {
            let mut reply = ServerReply::ok(request.body.clone());
            for (key, value) in request.metadata().iter() {
                reply
                    .metadata
                    .append(format!("echo-{key}"), Bytes::copy_from_slice(value));
            }
            async move { reply }
        })
        .route("/test.Meta/Fail", |_: ServerRequest| async {
            ServerReply::error(Status::new(Code::NotFound, "nothing here — ünïcode 100%"))
        });
    let server = Server::new(server_rt, router)
        .interceptor(interceptor)
        .http()
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::grpc(client_rt.clone(), server.local_addr(), client_config());
    let mut metadata = Metadata::new();
    metadata.append("trace-id", "abc");
    metadata.append("blob-bin", Bytes::from_static(&[0, 159, 255, b'\n']));
    let options = CallOptions {
        metadata,
        ..CallOptions::default()
    };
    let call = client.call_raw("/test.Meta/Echo", 0, "body".into(), options);
    let answer = within(&client_rt, 10 * SECOND, "echo", call).await.unwrap();
    assert_eq!(answer.body, Bytes::from("body"));
    assert_eq!(answer.metadata.get_str("echo-trace-id"), Some("abc"));
    assert_eq!(
        answer.metadata.get("echo-blob-bin").map(|v| &v[..]),
        Some(&[0, 159, 255, b'\n'][..])
    );

    let call = client.call_raw("/test.Meta/Fail", 0, Bytes::new(), CallOptions::default());
    let status = within(&client_rt, 10 * SECOND, "fail", call)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "nothing here — ünïcode 100%");

    let call = client.call_raw("/test.Meta/Nope", 0, Bytes::new(), CallOptions::default());
    let status = within(&client_rt, 10 * SECOND, "unknown", call)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status}");
    // A client holding its request stream open learns at once, not at its deadline.
    let open = async {
        let (_sender, mut receiver) = client
            .stream_raw(
                "/test.Meta/Nope",
                0,
                StreamKind::Bidirectional,
                Bytes::new(),
                CallOptions::default(),
            )
            .await
            .unwrap();
        receiver.next().await.unwrap().unwrap_err()
    };
    let status = within(&client_rt, 10 * SECOND, "unknown stream", open).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status}");

    let mut metadata = Metadata::new();
    metadata.append("bad key", "x");
    let refused = client.call_raw(
        "/test.Meta/Echo",
        0,
        Bytes::new(),
        CallOptions {
            metadata,
            ..CallOptions::default()
        },
    );
    let status = within(&client_rt, 10 * SECOND, "bad metadata", refused)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("/test.Meta/Echo".to_owned(), Code::Ok, true),
            ("/test.Meta/Fail".to_owned(), Code::NotFound, true),
            ("/test.Meta/Nope".to_owned(), Code::Unimplemented, true),
            ("/test.Meta/Nope".to_owned(), Code::Unimplemented, true),
        ]
    );
    server.abort().await;
}

/// Health's Watch sees SERVING, then NOT_SERVING when the server shuts down, then ends, so
/// the shutdown is graceful.
async fn health_watch_follows_a_graceful_shutdown<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let server = TestServer::start_grpc(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let client = grpc_client(&client_rt, &server);
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut watch = within(
        &client_rt,
        10 * SECOND,
        "watch",
        client.server_stream::<_, _, HealthCheckResponse>(
            WATCH,
            Protobuf,
            &request,
            CallOptions::default(),
        ),
    )
    .await
    .unwrap();
    let first = within(&client_rt, 10 * SECOND, "first", watch.next()).await;
    assert_eq!(
        first.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let shutdown = server.handle.shutdown(10 * SECOND);
    let rest = async {
        let mut statuses = Vec::new();
        while let Some(item) = watch.next().await {
            statuses.push(item.unwrap().status);
        }
        statuses
    };
    let (outcome, statuses) = within(
        &client_rt,
        20 * SECOND,
        "shutdown",
        futures::future::join(shutdown, rest),
    )
    .await;
    assert_eq!(statuses, [ServingStatus::NotServing as i32]);
    assert_eq!(outcome, Shutdown::Graceful);
}

/// A discovered service's instances called over gRPC: the balancer spreads the calls.
async fn discovered_instances_are_called_over_grpc<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let a = TestServer::start_grpc(server_rt.clone(), loopback(), SECOND)
        .await
        .unwrap();
    let b = TestServer::start_grpc(server_rt, loopback(), SECOND)
        .await
        .unwrap();
    let list = StaticList::new().with("echo", [Instance::new(a.addr()), Instance::new(b.addr())]);
    let client = Client::builder(client_rt.clone())
        .discover(list, "echo")
        .balance(gorpc::proto::balance::RoundRobin::new(1))
        .protocol(InstanceProtocol::Grpc)
        .config(client_config())
        .build()
        .unwrap();
    for i in 0..20 {
        let body = Bytes::from(format!("call {i}"));
        let echoed = call(&client_rt, &client, methods::ECHO, body.clone(), 5 * SECOND).await;
        assert_eq!(echoed.unwrap(), body);
    }
    let answered = BTreeMap::from([("a", a.handlers.answered()), ("b", b.handlers.answered())]);
    assert_eq!(answered.values().sum::<usize>(), 20, "{answered:?}");
    assert!(answered.values().all(|&n| n >= 5), "{answered:?}");
    a.handle.abort().await;
    b.handle.abort().await;
}

on_every_runtime!(
    a_deadline_ends_the_call_and_drops_the_handler,
    a_dropped_stream_drops_the_handler,
    messages_over_the_limit_are_resource_exhausted,
    metadata_statuses_and_interceptors,
    health_watch_follows_a_graceful_shutdown,
    discovered_instances_are_called_over_grpc,
);
