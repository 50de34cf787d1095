//! `gorpc call` without --proto, `gorpc list` and `gorpc describe`: the server's reflection
//! service types the calls, over gorpc's binary protocol and over gRPC alike. The server is
//! a gorpc server with HTTP, health and reflection on, serving the examples' helloworld and
//! route guide, in-process on tokio.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{gorpc, run};
use futures::StreamExt as _;
use gorpc_examples::helloworld::GreeterServer;
use gorpc_examples::routeguide::RouteGuideServer;
use gorpc_examples::services::{Guide, Hello};
use gorpc_tokio::{Router, Server, ServerHandle, Tokio};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const LIMIT: Duration = Duration::from_secs(60);

/// Both transports: every test that calls runs over each.
const TRANSPORTS: [&str; 2] = ["gorpc", "grpc"];

/// The server keeps running on the runtime's worker threads while the test blocks on the
/// CLI.
struct TestServer {
    runtime: tokio::runtime::Runtime,
    handle: Option<ServerHandle<Tokio>>,
    addr: SocketAddr,
}

impl TestServer {
    /// Serves helloworld and the route guide with HTTP (so gRPC) and health on, and
    /// reflection if asked.
    fn start(reflection: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let handle = runtime.block_on(async {
            let router = Router::new()
                .add_service(GreeterServer::new(Hello))
                .add_service(RouteGuideServer::new(Guide));
            let mut server = Server::new(Tokio::current(), router).http().health();
            if reflection {
                server = server.reflection();
            }
            server
                .bind("127.0.0.1:0".parse().unwrap())
                .await
                .expect("bind")
        });
        let addr = handle.local_addr();
        TestServer {
            runtime,
            handle: Some(handle),
            addr,
        }
    }

    /// `gorpc call` of `/routeguide.RouteGuide/{method}` (or a full path), without --proto.
    fn call(&self, transport: &str, method: &str, data: &str) -> Output {
        call_at(&self.addr, transport, method, data)
    }

    fn gorpc(&self, command: &str, transport: &str, extra: &[&str]) -> Output {
        run(
            gorpc()
                .args([command, &self.addr.to_string(), "--transport", transport])
                .args(["--timeout", "10"])
                .args(extra),
            LIMIT,
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.runtime
                .block_on(handle.shutdown(Duration::from_millis(100)));
        }
    }
}

fn call_at(addr: &SocketAddr, transport: &str, method: &str, data: &str) -> Output {
    let path = if method.starts_with('/') {
        method.to_owned()
    } else {
        format!("/routeguide.RouteGuide/{method}")
    };
    run(
        gorpc().args([
            "call",
            &addr.to_string(),
            &path,
            "--transport",
            transport,
            "--timeout",
            "10",
            "--data",
            data,
        ]),
        LIMIT,
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32, stderr_has: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    for part in stderr_has {
        assert!(err.contains(part), "stderr lacks {part:?}: {err}");
    }
    assert!(output.stdout.is_empty(), "stdout: {}", stdout(output));
}

/// Every JSON value on stdout, in order.
fn json_values(output: &Output) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("stdout is not JSON values ({e}): {}", stdout(output)))
}

#[track_caller]
fn success(output: &Output, transport: &str) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "{transport}: exit {:?}, stderr: {}",
        output.status.code(),
        stderr(output)
    );
    json_values(output)
}

#[test]
fn unary_calls_typed_by_reflection() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let output = server.call(
            transport,
            "/helloworld.Greeter/SayHello",
            r#"{"name":"reflection"}"#,
        );
        assert_eq!(
            success(&output, transport),
            [json!({"message": "Hello, reflection!"})],
            "{transport}"
        );
        let output = server.call(transport, "GetFeature", r#"{"latitude":3,"longitude":4}"#);
        assert_eq!(
            success(&output, transport),
            [json!({"name": "feature at 3,4", "location": {"latitude": 3, "longitude": 4}})],
            "{transport}"
        );
        // The server's error status, as with a .proto file.
        let output = server.call(transport, "/helloworld.Greeter/SayHello", "{}");
        assert_exit(&output, 4, &["invalid argument: name must not be empty"]);
    }
}

#[test]
fn server_stream_typed_by_reflection() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let output = server.call(
            transport,
            "ListFeatures",
            r#"{"lo":{"latitude":1,"longitude":1},"hi":{"latitude":2,"longitude":2}}"#,
        );
        let names: Vec<String> = success(&output, transport)
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "feature at 1,1",
                "feature at 1,2",
                "feature at 2,1",
                "feature at 2,2"
            ],
            "{transport}"
        );
        // Past the map's edge: the features, then the error status.
        let output = server.call(
            transport,
            "ListFeatures",
            r#"{"lo":{"latitude":99,"longitude":49},"hi":{"latitude":100,"longitude":49}}"#,
        );
        assert_eq!(
            output.status.code(),
            Some(4),
            "{transport}: {}",
            stderr(&output)
        );
        assert_eq!(
            json_values(&output),
            [json!({"name": "feature at 99,49", "location": {"latitude": 99, "longitude": 49}})],
            "{transport}"
        );
        assert!(
            stderr(&output).contains("out of range: the map ends at latitude 99"),
            "{transport}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn client_stream_typed_by_reflection() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let output = server.call(
            transport,
            "RecordRoute",
            r#"{"latitude":1,"longitude":1} {"latitude":1,"longitude":3} {"latitude":500}"#,
        );
        assert_eq!(
            success(&output, transport),
            // int64 fields are strings in protobuf's JSON mapping.
            [json!({"pointCount": 3, "featureCount": 2, "distance": "504"})],
            "{transport}"
        );
    }
}

#[test]
fn bidirectional_stream_typed_by_reflection() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        // Each note comes back with the notes left at its point before it.
        let output = server.call(
            transport,
            "RouteChat",
            r#"{"location":{"latitude":5},"message":"a"}
               {"location":{"latitude":5},"message":"b"}
               {"location":{"latitude":6},"message":"c"}
               {"location":{"latitude":5},"message":"d"}"#,
        );
        let messages: Vec<String> = success(&output, transport)
            .iter()
            .map(|v| v["message"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(messages, ["a", "a", "b"], "{transport}");
    }
}

#[test]
fn list_prints_the_services() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let output = server.gorpc("list", transport, &[]);
        assert!(output.status.success(), "{transport}: {}", stderr(&output));
        assert_eq!(
            stdout(&output),
            "grpc.health.v1.Health\n\
             grpc.reflection.v1.ServerReflection\n\
             grpc.reflection.v1alpha.ServerReflection\n\
             helloworld.Greeter\n\
             routeguide.RouteGuide\n",
            "{transport}"
        );
    }
}

#[test]
fn describe_prints_declarations() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let output = server.gorpc("describe", transport, &["routeguide.RouteGuide"]);
        assert!(output.status.success(), "{transport}: {}", stderr(&output));
        assert_eq!(
            stdout(&output),
            "service routeguide.RouteGuide {\n  \
             rpc GetFeature(routeguide.Point) returns (routeguide.Feature);\n  \
             rpc ListFeatures(routeguide.Rectangle) returns (stream routeguide.Feature);\n  \
             rpc RecordRoute(stream routeguide.Point) returns (routeguide.RouteSummary);\n  \
             rpc RouteChat(stream routeguide.RouteNote) returns (stream routeguide.RouteNote);\n\
             }\n",
            "{transport}"
        );
    }
    let output = server.gorpc("describe", "gorpc", &["routeguide.RouteSummary"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "message routeguide.RouteSummary {\n  int32 point_count = 1;\n  \
         int32 feature_count = 2;\n  int64 distance = 3;\n}\n"
    );
    let output = server.gorpc("describe", "grpc", &["/helloworld.Greeter/SayHello"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "rpc SayHello(helloworld.HelloRequest) returns (helloworld.HelloReply);\n"
    );
    let output = server.gorpc("describe", "gorpc", &["routeguide.Nowhere"]);
    assert_exit(
        &output,
        2,
        &["the server does not know `routeguide.Nowhere`"],
    );
}

#[test]
fn unknown_names_exit_2_with_what_the_server_has() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let output = server.call(transport, "/routeguide.Atlas/GetFeature", "{}");
        assert_exit(
            &output,
            2,
            &[
                "unknown service `routeguide.Atlas`",
                "helloworld.Greeter, routeguide.RouteGuide",
            ],
        );
        let output = server.call(transport, "GetFeatures", "{}");
        assert_exit(
            &output,
            2,
            &["unknown method `GetFeatures`", "GetFeature, ListFeatures"],
        );
        let output = server.call(transport, "GetFeature", r#"{"lat":1}"#);
        assert_exit(&output, 2, &["lat", "routeguide.Point"]);
    }
}

#[test]
fn server_without_reflection_exits_2() {
    let server = TestServer::start(false);
    for transport in TRANSPORTS {
        let output = server.call(transport, "GetFeature", "{}");
        assert_exit(
            &output,
            2,
            &["no reflection service", "--proto", "Server::reflection()"],
        );
        let output = server.gorpc("list", transport, &[]);
        assert_exit(&output, 2, &["no reflection service"]);
    }
}

#[test]
fn unreachable_server_exits_3() {
    // A port nobody listens on: bind one, then free it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for transport in TRANSPORTS {
        let output = call_at(&addr, transport, "GetFeature", "{}");
        assert_exit(&output, 3, &["cannot connect", &addr.to_string()]);
    }
}

/// Forwards each connection to `upstream`, recording the first bytes the client sent on it
/// (at least 4, unless it closed first).
fn relay(runtime: &tokio::runtime::Runtime, upstream: SocketAddr) -> (SocketAddr, Recorded) {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the relay");
    let addr = listener.local_addr().unwrap();
    let recorded = Recorded::default();
    let seen = recorded.clone();
    runtime.spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut first = Vec::new();
                let mut chunk = [0; 64];
                while first.len() < 4 {
                    match client.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => first.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock().unwrap().push(first.clone());
                if first.is_empty() {
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if server.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, recorded)
}

type Recorded = Arc<Mutex<Vec<Vec<u8>>>>;

#[test]
fn transport_picks_the_protocol() {
    let server = TestServer::start(true);
    for transport in TRANSPORTS {
        let (addr, recorded) = relay(&server.runtime, server.addr);
        let output = call_at(&addr, transport, "GetFeature", r#"{"latitude":1}"#);
        assert_eq!(
            success(&output, transport)[0]["name"],
            "feature at 1,0",
            "{transport}"
        );
        let connections: Vec<Vec<u8>> = recorded
            .lock()
            .unwrap()
            .iter()
            .filter(|first| !first.is_empty())
            .cloned()
            .collect();
        assert!(
            !connections.is_empty(),
            "{transport}: no connection relayed"
        );
        for first in connections {
            // HTTP/2's connection preface opens every gRPC connection.
            let http2 = first.starts_with(b"PRI * HTTP/2.0");
            assert_eq!(http2, transport == "grpc", "{transport}: {first:?}");
        }
    }
}

/// A reflection service as some servers have it: `v1alpha` only, answers that leave the
/// imports out (asked for by name then), and no well-known types. Beside it, `/t.Echo/Say`
/// answers each request with itself.
fn sparse_reflection_server(runtime: &tokio::runtime::Runtime) -> ServerHandle<Tokio> {
    use gorpc_tokio::grpc::reflection::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ErrorResponse, FileDescriptorResponse, ListServiceResponse, ServerReflectionRequest,
        ServerReflectionResponse, ServiceResponse, V1ALPHA,
    };
    use gorpc_tokio::stream::{RequestStream, ResponseSink};
    use gorpc_tokio::{Protobuf, Request, ServerReply, ServerRequest, Status};
    use prost::Message as _;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    std::fs::write(
        dir.path().join("t/types.proto"),
        r#"syntax = "proto3";
        package t;
        import "google/protobuf/timestamp.proto";
        message Stamp { google.protobuf.Timestamp at = 1; string note = 2; }"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t/echo.proto"),
        r#"syntax = "proto3";
        package t;
        import "t/types.proto";
        service Echo { rpc Say(Stamp) returns (Stamp); }"#,
    )
    .unwrap();
    let mut compiler = protox::Compiler::new([dir.path()]).unwrap();
    compiler
        .include_imports(true)
        .open_file("t/echo.proto")
        .unwrap();
    let files: Arc<Vec<(String, bytes::Bytes)>> = Arc::new(
        compiler
            .file_descriptor_set()
            .file
            .iter()
            .filter(|file| file.name().starts_with("t/"))
            .map(|file| (file.name().to_owned(), file.encode_to_vec().into()))
            .collect(),
    );
    assert_eq!(files.len(), 2);

    let reflection = move |request: Request<RequestStream<ServerReflectionRequest>>,
                           mut sink: ResponseSink<ServerReflectionResponse>| {
        let files = files.clone();
        async move {
            let file = |name: &str| {
                files
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, encoded)| encoded.clone())
            };
            let mut requests = request.message;
            while let Some(request) = requests.next().await {
                let asked = request?.message_request;
                let answer = match asked {
                    Some(MessageRequest::ListServices(_)) => {
                        MessageResponse::ListServicesResponse(ListServiceResponse {
                            service: vec![ServiceResponse {
                                name: "t.Echo".into(),
                            }],
                        })
                    }
                    // The service's file alone, without its imports.
                    Some(MessageRequest::FileContainingSymbol(symbol)) if symbol == "t.Echo" => {
                        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                            file_descriptor_proto: vec![file("t/echo.proto").unwrap()],
                        })
                    }
                    Some(MessageRequest::FileByFilename(name)) if file(&name).is_some() => {
                        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                            file_descriptor_proto: vec![file(&name).unwrap()],
                        })
                    }
                    _ => MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: 5,
                        error_message: "not here".into(),
                    }),
                };
                sink.send(&ServerReflectionResponse {
                    valid_host: String::new(),
                    original_request: None,
                    message_response: Some(answer),
                })
                .await?;
            }
            Ok::<_, Status>(())
        }
    };
    runtime.block_on(async {
        let router = Router::new()
            .bidi(V1ALPHA, Protobuf, reflection)
            .route("/t.Echo/Say", |request: ServerRequest| async move {
                ServerReply::ok(request.body)
            });
        Server::new(Tokio::current(), router)
            .http()
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind")
    })
}

#[test]
fn imports_are_asked_for_and_v1alpha_answers() {
    let server = TestServer::start(false);
    let sparse = sparse_reflection_server(&server.runtime);
    for transport in TRANSPORTS {
        let output = call_at(
            &sparse.local_addr(),
            transport,
            "/t.Echo/Say",
            r#"{"at":"2024-01-02T03:04:05Z","note":"hi"}"#,
        );
        assert_eq!(
            success(&output, transport),
            [json!({"at": "2024-01-02T03:04:05Z", "note": "hi"})],
            "{transport}"
        );
    }
    server
        .runtime
        .block_on(sparse.shutdown(Duration::from_millis(100)));
}
