//! Server and client interceptors: order, metadata, short-circuit, observing outcomes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use gorpc::interceptor::Logging;
use gorpc::{
    CallOptions, Client, ClientNext, Code, Metadata, Next, RawResponse, Router, Runtime, Server,
    ServerReply, ServerRequest, Status,
};
use gorpc_tests::{client_config, loopback, on_every_runtime};

/// Answers with the caller's "user" metadata as seen by the handler.
fn whoami_router(handled: Arc<AtomicUsize>) -> Router {
    Router::new().route("/test.Who/Ami", move |req: ServerRequest| {
        handled.fetch_add(1, Ordering::SeqCst);
        let user = req
            .metadata_value("user")
            .map(Bytes::copy_from_slice)
            .unwrap_or_default();
        async move {
            let mut reply = ServerReply::ok(user);
            reply.metadata.insert("served-by", "handler");
            reply
        }
    })
}

async fn server_interceptors_run_in_order_and_can_refuse<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let handled = Arc::new(AtomicUsize::new(0));
    let (log_a, log_b) = (log.clone(), log.clone());
    let server = Server::new(server_rt, whoami_router(handled.clone()))
        // Authentication: refuse calls without a token, turn a token into a user.
        .interceptor(move |mut req: ServerRequest, next: Next| {
            log_a.lock().unwrap().push(format!("auth {}", req.method()));
            match req.metadata_value("authorization") {
                Some(b"Bearer secret") => {
                    req.metadata_mut().insert("user", "alice");
                    next.run(req)
                }
                Some(_) => futures::future::ready(ServerReply::error(Status::new(
                    Code::PermissionDenied,
                    "bad token",
                )))
                .boxed(),
                None => futures::future::ready(ServerReply::error(Status::new(
                    Code::Unauthenticated,
                    "no token",
                )))
                .boxed(),
            }
        })
        // Observation: sees every outcome the inner chain produced.
        .interceptor(move |req: ServerRequest, next: Next| {
            let log = log_b.clone();
            let method = req.method().to_owned();
            next.run(req)
                .map(move |reply| {
                    log.lock()
                        .unwrap()
                        .push(format!("observed {method} {}", reply.status.code()));
                    reply
                })
                .boxed()
        })
        .interceptor(Logging)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();
    let call = |token: Option<&'static str>| {
        let mut metadata = Metadata::new();
        if let Some(token) = token {
            metadata.insert("authorization", token);
        }
        client.call_raw(
            "/test.Who/Ami",
            0,
            Bytes::new(),
            CallOptions {
                metadata,
                ..CallOptions::default()
            },
        )
    };

    let ok = call(Some("Bearer secret")).await.unwrap();
    assert_eq!(
        ok.body,
        Bytes::from_static(b"alice"),
        "the handler sees metadata an interceptor added"
    );
    assert_eq!(ok.metadata.get_str("served-by"), Some("handler"));
    let err = call(None).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, "no token")
    );
    let err = call(Some("Bearer guess")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "refused calls never reach the handler"
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            "auth /test.Who/Ami",
            "observed /test.Who/Ami ok",
            "auth /test.Who/Ami",
            "auth /test.Who/Ami"
        ],
        "the first interceptor runs first; a short-circuit skips the rest of the chain"
    );
    server.abort().await;
}

async fn client_interceptors_change_metadata_short_circuit_and_observe<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let handled = Arc::new(AtomicUsize::new(0));
    let server = Server::new(server_rt, whoami_router(handled.clone()))
        .bind(loopback())
        .await
        .unwrap();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap()
        // Outermost: observes what the rest of the chain (and the network) produced.
        .with_interceptor(move |call: gorpc::client::OutgoingCall, next: ClientNext| {
            let seen = seen.clone();
            next.run(call)
                .map(move |result: Result<RawResponse, Status>| {
                    seen.lock().unwrap().push(
                        result
                            .as_ref()
                            .map(|r| r.body.clone())
                            .map_err(|s| s.code()),
                    );
                    result
                })
                .boxed()
        })
        // Attaches credentials to every call.
        .with_interceptor(|mut call: gorpc::client::OutgoingCall, next: ClientNext| {
            call.metadata.insert("user", "bob");
            next.run(call)
        })
        // Answers one method locally, without the network.
        .with_interceptor(|call: gorpc::client::OutgoingCall, next: ClientNext| {
            if call.method == "/test.Local/Answer" {
                let local = RawResponse {
                    codec: call.codec,
                    metadata: Metadata::new(),
                    body: Bytes::from_static(b"local"),
                };
                return futures::future::ready(Ok(local)).boxed();
            }
            next.run(call)
        })
        .with_interceptor(Logging);

    let remote = client
        .call_raw("/test.Who/Ami", 0, Bytes::new(), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(
        remote.body,
        Bytes::from_static(b"bob"),
        "the server saw metadata added on the client"
    );
    let local = client
        .call_raw(
            "/test.Local/Answer",
            0,
            Bytes::new(),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(local.body, Bytes::from_static(b"local"));
    let options = CallOptions {
        timeout: Some(Duration::from_secs(5)),
        ..CallOptions::default()
    };
    let missing = client
        .call_raw("/test.Nope/Nope", 0, Bytes::new(), options)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unimplemented);

    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "the local answer never went out"
    );
    assert_eq!(
        *outcomes.lock().unwrap(),
        [
            Ok(Bytes::from_static(b"bob")),
            Ok(Bytes::from_static(b"local")),
            Err(Code::Unimplemented)
        ]
    );
    server.abort().await;
}

on_every_runtime!(
    server_interceptors_run_in_order_and_can_refuse,
    client_interceptors_change_metadata_short_circuit_and_observe,
);
