//! What the gRPC interop tests (grpc_python.rs, grpc_tonic.rs) share: the test's own routes
//! beside Hello and Guide on the gorpc server, and the record of what handlers saw.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use gorpc::http::HttpConfig;
use gorpc::proto::StreamKind;
use gorpc::{
    Code, Metadata, Router, Runtime, Server, ServerConfig, ServerReply, ServerRequest, Status,
};
use gorpc_examples::helloworld::GreeterServer;
use gorpc_examples::routeguide::RouteGuideServer;
use gorpc_examples::services::{point, Guide, Hello};
use gorpc_tests::{loopback, within};
use prost::Message as _;

/// Bytes no text header can carry, for metadata under `-bin` keys.
pub const BLOB: &[u8] = &[0x00, 0xFF, 0xC3, 0xA9, 0x80, 0x0A, 0x7F];

/// The status message of NOT_FOUND from `/interop.Test/Missing`: non-ASCII and '%'
/// travel percent-encoded in `grpc-message`.
pub const MISSING: &str = "no feature named «Ünïcode» (100%)";

/// Handlers that never finish on their own: how many started, and how many were dropped.
pub struct Stalls {
    started: AtomicUsize,
    dropped: AtomicUsize,
    drops: mpsc::UnboundedSender<()>,
    drops_seen: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
}

/// Held by a stalled handler: counts its start, and its drop.
pub struct StallGuard(Arc<Stalls>);

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
        let _ = self.0.drops.unbounded_send(());
    }
}

impl Stalls {
    pub fn new() -> Arc<Stalls> {
        let (drops, drops_seen) = mpsc::unbounded();
        Arc::new(Stalls {
            started: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            drops,
            drops_seen: Mutex::new(Some(drops_seen)),
        })
    }

    /// A handler starts stalling; it drops the guard when it is dropped.
    pub fn start(self: &Arc<Self>) -> StallGuard {
        self.started.fetch_add(1, Ordering::SeqCst);
        StallGuard(self.clone())
    }

    /// Waits (10 s at most) until `n` stalled handlers were dropped, then checks that `n`
    /// started and `n` were dropped.
    pub async fn wait_dropped<R: Runtime>(&self, rt: &R, n: usize) {
        let mut drops = self
            .drops_seen
            .lock()
            .unwrap()
            .take()
            .expect("one waiter at a time");
        within(
            rt,
            Duration::from_secs(10),
            "stalled handlers dropped",
            async {
                while self.dropped.load(Ordering::SeqCst) < n {
                    drops.next().await;
                }
            },
        )
        .await;
        *self.drops_seen.lock().unwrap() = Some(drops);
        assert_eq!(
            self.started.load(Ordering::SeqCst),
            n,
            "stalled handlers started"
        );
        assert_eq!(
            self.dropped.load(Ordering::SeqCst),
            n,
            "stalled handlers dropped"
        );
    }
}

/// What one handler found under `x-text` and `x-blob-bin`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetadataSeen {
    pub method: String,
    pub text: Option<Vec<u8>>,
    pub blob: Option<Vec<u8>>,
}

impl MetadataSeen {
    /// What a client sending "interop" and [`BLOB`] should have delivered to `method`.
    pub fn sent_to(method: &str) -> MetadataSeen {
        MetadataSeen {
            method: method.to_owned(),
            text: Some(b"interop".to_vec()),
            blob: Some(BLOB.to_vec()),
        }
    }
}

/// What the test's routes on the gorpc server saw.
pub struct Seen {
    pub stalls: Arc<Stalls>,
    /// The request metadata of each Echo and Trailers call, in order.
    pub metadata: Mutex<Vec<MetadataSeen>>,
}

impl Seen {
    pub fn new() -> Arc<Seen> {
        Arc::new(Seen {
            stalls: Stalls::new(),
            metadata: Mutex::new(Vec::new()),
        })
    }

    pub fn metadata(&self) -> Vec<MetadataSeen> {
        self.metadata.lock().unwrap().clone()
    }
}

/// Records the request's `x-text` and `x-blob-bin`, and returns them as `x-echo-text` and
/// `x-echo-blob-bin`.
fn echo_metadata(seen: &Seen, request: &ServerRequest) -> Metadata {
    let text = request.metadata_value("x-text").map(<[u8]>::to_vec);
    let blob = request.metadata_value("x-blob-bin").map(<[u8]>::to_vec);
    seen.metadata.lock().unwrap().push(MetadataSeen {
        method: request.method().to_owned(),
        text: text.clone(),
        blob: blob.clone(),
    });
    let mut metadata = Metadata::new();
    if let Some(text) = text {
        metadata.insert("x-echo-text", text);
    }
    if let Some(blob) = blob {
        metadata.insert("x-echo-blob-bin", blob);
    }
    metadata
}

/// Hello and Guide, and the test's routes, which take any codec:
/// - `/interop.Test/Stall` (unary) never answers; see [`Stalls`];
/// - `/interop.Test/Deadline` (unary) answers a protobuf `Point` whose latitude is the
///   milliseconds left until the call's deadline, -1 if it has none;
/// - `/interop.Test/Missing` (unary) answers NOT_FOUND with [`MISSING`];
/// - `/interop.Test/Echo` (unary) answers its request, with the request's `x-text` and
///   `x-blob-bin` as `x-echo-text` and `x-echo-blob-bin` metadata;
/// - `/interop.Test/Trailers` (server streaming) sends its request twice, then the same
///   echo as trailers.
pub fn router(seen: &Arc<Seen>) -> Router {
    let stalls = seen.stalls.clone();
    let echo = seen.clone();
    let trailers = seen.clone();
    Router::new()
        .add_service(GreeterServer::new(Hello))
        .add_service(RouteGuideServer::new(Guide))
        .route("/interop.Test/Stall", move |_request| {
            let guard = stalls.start();
            async move {
                let _guard = guard;
                std::future::pending::<ServerReply>().await
            }
        })
        .route("/interop.Test/Deadline", |request| {
            let left = request.deadline.map_or(-1, |deadline| {
                let left = deadline.saturating_duration_since(Instant::now());
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
            });
            let body = point(left, 0).encode_to_vec();
            async move { ServerReply::ok(body.into()) }
        })
        .route("/interop.Test/Missing", |_request| async {
            ServerReply::error(Status::new(Code::NotFound, MISSING))
        })
        .route("/interop.Test/Echo", move |request| {
            let metadata = echo_metadata(&echo, &request);
            async move {
                ServerReply {
                    status: Status::ok(),
                    metadata,
                    body: request.body,
                }
            }
        })
        .stream_route(
            "/interop.Test/Trailers",
            StreamKind::ServerStreaming,
            move |mut request| {
                let metadata = echo_metadata(&trailers, &request);
                let mut sink = request.take_response_sink().expect("a server stream");
                let body: Bytes = request.body;
                async move {
                    for _ in 0..2 {
                        if let Err(status) = sink.send(body.clone()).await {
                            return ServerReply::error(status);
                        }
                    }
                    sink.set_trailers(metadata);
                    ServerReply::ok(Bytes::new())
                }
            },
        )
}

/// The gorpc server on `rt`, and a second one that gzips its answers.
pub async fn servers<R: Runtime>(
    rt: R,
    seen: &Arc<Seen>,
) -> (gorpc::ServerHandle<R>, gorpc::ServerHandle<R>) {
    let server = Server::new(rt.clone(), router(seen))
        .http()
        .bind(loopback())
        .await
        .expect("the server binds");
    let gzip_config = ServerConfig {
        http: HttpConfig {
            compress_grpc_responses: true,
            ..HttpConfig::default()
        },
        ..ServerConfig::default()
    };
    let gzip_server = Server::new(rt, router(seen))
        .config(gzip_config)
        .http()
        .bind(loopback())
        .await
        .expect("the gzip server binds");
    (server, gzip_server)
}
