//! BearerToken on the client and BearerAuth on the server, over real sockets.

#![cfg(feature = "auth")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use gorpc::{
    CallOptions, Client, Code, Metadata, Router, Runtime, Server, ServerHandle, ServerReply,
    ServerRequest, Status,
};
use gorpc_plugins::auth::{BearerAuth, BearerToken, Identity, AUTHORIZATION, SUBJECT};
use gorpc_tests::{client_config, loopback, on_every_runtime};

const WHOAMI: &str = "/test.Who/Ami";
const DELETE: &str = "/test.Who/Delete";
const HEALTH: &str = "/test.Health/Check";
/// A server stream of one message: what the handler saw, as the unary handlers answer.
const WATCH: &str = "/test.Who/Watch";

/// alice may call anything, bob only WHOAMI; any other token is unknown.
fn verify(token: &str, method: &str) -> Result<Identity, Status> {
    match (token, method) {
        ("alice-token", _) => Ok(Identity::new("alice")),
        ("bob-token", WHOAMI) => Ok(Identity::new("bob")),
        ("bob-token", _) => Err(Status::new(Code::PermissionDenied, "bob may not call this")),
        _ => Err(Status::new(Code::Unauthenticated, "unknown token")),
    }
}

/// A server whose handlers answer "<subject>|<authorization>" as they see them ("-" when
/// absent) and count how often they ran.
async fn serve<S: Runtime>(runtime: S) -> (ServerHandle<S>, Arc<AtomicUsize>) {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let handler = move |req: ServerRequest| {
        counter.fetch_add(1, Ordering::SeqCst);
        let seen =
            |key| String::from_utf8_lossy(req.metadata_value(key).unwrap_or(b"-")).into_owned();
        let body = format!("{}|{}", seen(SUBJECT), seen(AUTHORIZATION));
        async move { ServerReply::ok(Bytes::from(body)) }
    };
    let watch_counter = handled.clone();
    let watch = move |req: gorpc::Request<Bytes>, mut sink: gorpc::stream::ResponseSink<Bytes>| {
        watch_counter.fetch_add(1, Ordering::SeqCst);
        let seen = |key| {
            String::from_utf8_lossy(req.metadata.get(key).map_or(&b"-"[..], |v| v)).into_owned()
        };
        let body = Bytes::from(format!("{}|{}", seen(SUBJECT), seen(AUTHORIZATION)));
        async move { sink.send(&body).await }
    };
    let router = Router::new()
        .server_stream(WATCH, gorpc::Raw, watch)
        .route(WHOAMI, handler.clone())
        .route(DELETE, handler.clone())
        .route(HEALTH, handler);
    let server = Server::new(runtime, router)
        .interceptor(BearerAuth::new(verify).allow_unauthenticated(HEALTH))
        .bind(loopback())
        .await
        .unwrap();
    (server, handled)
}

/// Calls `method` with `metadata` and returns what the handler saw.
async fn call(client: &Client, method: &'static str, metadata: Metadata) -> Result<String, Status> {
    let options = CallOptions {
        metadata,
        ..CallOptions::default()
    };
    let rsp = client.call_raw(method, 0, Bytes::new(), options).await?;
    Ok(String::from_utf8(rsp.body.to_vec()).unwrap())
}

fn authorization(value: &'static [u8]) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.insert(AUTHORIZATION, Bytes::from_static(value));
    metadata
}

async fn calls_without_a_valid_bearer_token_are_refused<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, handled) = serve(server_rt).await;
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();

    let refusals = [
        (Metadata::new(), "missing authorization metadata"),
        (
            authorization(b"Bearer \xff\xfe"),
            "authorization metadata is not UTF-8",
        ),
        (
            authorization(b"Basic YWxpY2U6c2VjcmV0"),
            "authorization metadata is not `Bearer <token>`",
        ),
        (
            authorization(b"Bearer "),
            "authorization metadata is not `Bearer <token>`",
        ),
    ];
    for (metadata, message) in refusals {
        let err = call(&client, WHOAMI, metadata).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::Unauthenticated, message)
        );
    }
    assert_eq!(handled.load(Ordering::SeqCst), 0, "the handler never ran");
    server.abort().await;
}

async fn a_wrong_token_gets_the_status_verify_chose<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, handled) = serve(server_rt).await;
    let connect = Client::connect(client_rt, server.local_addr(), client_config());
    let stranger = connect.await.unwrap();
    let bob = stranger
        .clone()
        .with_interceptor(BearerToken::new("bob-token"));

    let err = call(&stranger, WHOAMI, authorization(b"Bearer guess"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "unknown token")
    );
    let err = call(&bob, DELETE, Metadata::new()).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, "bob may not call this"),
        "verify sees the method"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0, "the handler never ran");
    assert_eq!(call(&bob, WHOAMI, Metadata::new()).await.unwrap(), "bob|-");
    server.abort().await;
}

async fn a_right_token_reaches_the_handler_as_a_subject<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, handled) = serve(server_rt).await;
    let alice = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap()
        .with_interceptor(BearerToken::new("alice-token"));

    assert_eq!(
        call(&alice, WHOAMI, Metadata::new()).await.unwrap(),
        "alice|-"
    );
    assert_eq!(
        call(&alice, DELETE, Metadata::new()).await.unwrap(),
        "alice|-"
    );
    // BearerToken replaces the call's own token; the server replaces a forged subject.
    let forged: Metadata = [
        (AUTHORIZATION, "Bearer bob-token"),
        (SUBJECT, "root"),
        (SUBJECT, "admin"),
    ]
    .into_iter()
    .collect();
    assert_eq!(call(&alice, DELETE, forged).await.unwrap(), "alice|-");
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    server.abort().await;
}

async fn an_allow_listed_method_needs_no_token<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, handled) = serve(server_rt).await;
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();

    assert_eq!(call(&client, HEALTH, Metadata::new()).await.unwrap(), "-|-");
    let forged: Metadata = [(SUBJECT, "root"), (AUTHORIZATION, "Bearer alice-token")]
        .into_iter()
        .collect();
    assert_eq!(
        call(&client, HEALTH, forged).await.unwrap(),
        "-|-",
        "the handler of an open method sees neither a token nor a client-chosen subject"
    );
    let err = call(&client, WHOAMI, Metadata::new()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "other methods stay closed"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 2);
    server.abort().await;
}

/// Stream calls carry the token too (BearerToken's `intercept_stream`), and the server
/// checks them like unary calls.
async fn stream_calls_are_authenticated<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    use futures::StreamExt;
    let (server, handled) = serve(server_rt).await;
    let plain = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();
    let alice = plain
        .clone()
        .with_interceptor(BearerToken::new("alice-token"));

    let mut stream = alice
        .server_stream::<_, Bytes, Bytes>(WATCH, gorpc::Raw, &Bytes::new(), Default::default())
        .await
        .unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), "alice|-");
    assert!(stream.next().await.is_none());

    let mut refused = plain
        .server_stream::<_, Bytes, Bytes>(WATCH, gorpc::Raw, &Bytes::new(), Default::default())
        .await
        .unwrap();
    let status = refused.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "the refused stream never ran"
    );
    server.abort().await;
}

on_every_runtime!(
    stream_calls_are_authenticated,
    calls_without_a_valid_bearer_token_are_refused,
    a_wrong_token_gets_the_status_verify_chose,
    a_right_token_reaches_the_handler_as_a_subject,
    an_allow_listed_method_needs_no_token,
);
