//! `gorpc call` against the helloworld and route guide services, served in-process on
//! tokio: unary calls, and streams of every kind, over gorpc's binary protocol and gRPC.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use common::{gorpc, helloworld_proto, run};
use futures::StreamExt;
use gorpc_examples::helloworld::{
    Greeter, GreeterServer, HelloAllReply, HelloAllRequest, HelloReply, HelloRequest,
};
use gorpc_examples::routeguide::{
    Feature, Point, Rectangle, RouteGuide, RouteGuideServer, RouteNote, RouteSummary,
};
use gorpc_tokio::stream::{RequestStream, ResponseSink};
use gorpc_tokio::{Code, Request, Response, Router, Server, ServerHandle, Status, Tokio};

const LIMIT: Duration = Duration::from_secs(60);

struct TestGreeter;

impl Greeter for TestGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let greeting = request
            .metadata
            .get_str("greeting")
            .unwrap_or("Hello")
            .to_owned();
        let name = request.message.name;
        if name.is_empty() {
            return Err(Status::new(Code::InvalidArgument, "name must not be empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("{greeting}, {name}!"),
        }))
    }

    async fn say_hello_to_all(
        &self,
        request: Request<HelloAllRequest>,
    ) -> Result<Response<HelloAllReply>, Status> {
        let messages = request
            .message
            .names
            .iter()
            .map(|n| format!("Hello, {n}!"))
            .collect();
        Ok(Response::new(HelloAllReply { messages }))
    }
}

/// A route guide with one method of each kind.
struct TestGuide;

/// ListFeatures ends with this error past this latitude, after the features up to it.
const LAST_LATITUDE: i32 = 10;

impl RouteGuide for TestGuide {
    async fn get_feature(&self, request: Request<Point>) -> Result<Response<Feature>, Status> {
        Ok(Response::new(Feature {
            name: "here".to_owned(),
            location: Some(request.message),
        }))
    }

    /// A feature at each latitude from `lo` to `hi`.
    async fn list_features(
        &self,
        request: Request<Rectangle>,
        mut sink: ResponseSink<Feature>,
    ) -> Result<(), Status> {
        let lo = request.message.lo.unwrap_or_default().latitude;
        let hi = request.message.hi.unwrap_or_default().latitude;
        for latitude in lo..=hi.min(LAST_LATITUDE) {
            let feature = Feature {
                name: format!("f{latitude}"),
                location: Some(Point {
                    latitude,
                    longitude: 0,
                }),
            };
            sink.send(&feature).await?;
        }
        if hi > LAST_LATITUDE {
            return Err(Status::new(Code::OutOfRange, "the map ends at latitude 10"));
        }
        Ok(())
    }

    async fn record_route(
        &self,
        request: Request<RequestStream<Point>>,
    ) -> Result<Response<RouteSummary>, Status> {
        let mut points = request.message;
        let mut summary = RouteSummary::default();
        while let Some(point) = points.next().await {
            point?;
            summary.point_count += 1;
        }
        Ok(Response::new(summary))
    }

    /// Each note back, shouted.
    async fn route_chat(
        &self,
        request: Request<RequestStream<RouteNote>>,
        mut sink: ResponseSink<RouteNote>,
    ) -> Result<(), Status> {
        let mut notes = request.message;
        while let Some(note) = notes.next().await {
            let mut note = note?;
            note.message = note.message.to_uppercase();
            sink.send(&note).await?;
        }
        Ok(())
    }
}

/// The server keeps running on the runtime's worker threads while the test blocks on the
/// CLI.
struct TestServer {
    runtime: tokio::runtime::Runtime,
    handle: Option<ServerHandle<Tokio>>,
    addr: SocketAddr,
}

impl TestServer {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let handle = runtime.block_on(async {
            let router = Router::new()
                .add_service(GreeterServer::new(TestGreeter))
                .add_service(RouteGuideServer::new(TestGuide));
            // HTTP on: gRPC shares the port with the binary protocol.
            Server::new(Tokio::current(), router)
                .http()
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

    fn call(&self, method: &str, extra: &[&str]) -> Output {
        call_at(&self.addr.to_string(), method, &helloworld_proto(), extra)
    }

    fn call_route_guide(&self, method: &str, extra: &[&str]) -> Output {
        let proto = format!(
            "{}/../examples/proto/route_guide.proto",
            env!("CARGO_MANIFEST_DIR")
        );
        let path = format!("/routeguide.RouteGuide/{method}");
        call_at(&self.addr.to_string(), &path, &proto, extra)
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

fn call_at(addr: &str, method: &str, proto: &str, extra: &[&str]) -> Output {
    run(
        gorpc()
            .args(["call", addr, method, "--proto", proto, "--timeout", "10"])
            .args(extra),
        LIMIT,
    )
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32, stderr_has: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    for part in stderr_has {
        assert!(err.contains(part), "stderr lacks {part:?}: {err}");
    }
    assert!(output.stdout.is_empty(), "stdout: {:?}", output.stdout);
}

fn json_stdout(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "stderr: {}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn says_hello() {
    let server = TestServer::start();
    let output = server.call(
        "/helloworld.Greeter/SayHello",
        &["--data", r#"{"name":"cli"}"#],
    );
    assert_eq!(
        json_stdout(&output),
        serde_json::json!({"message": "Hello, cli!"})
    );
}

#[test]
fn repeated_fields_and_metadata() {
    let server = TestServer::start();
    let output = server.call(
        "/helloworld.Greeter/SayHelloToAll",
        &["--data", r#"{"names":["ann","bob"]}"#],
    );
    assert_eq!(
        json_stdout(&output),
        serde_json::json!({"messages": ["Hello, ann!", "Hello, bob!"]})
    );
    let output = server.call(
        "/helloworld.Greeter/SayHello",
        &["-d", r#"{"name":"cli"}"#, "-H", "greeting=Hi"],
    );
    assert_eq!(
        json_stdout(&output),
        serde_json::json!({"message": "Hi, cli!"})
    );
}

#[test]
fn input_errors_exit_2() {
    let server = TestServer::start();
    let say_hello = "/helloworld.Greeter/SayHello";

    let output = server.call(say_hello, &["--data", r#"{"nmae":"cli"}"#]);
    assert_exit(&output, 2, &["nmae", "helloworld.HelloRequest"]);

    let output = server.call(say_hello, &["--data", r#"{"name":5}"#]);
    assert_exit(&output, 2, &["`name`", "invalid type"]);

    let output = server.call(say_hello, &["--data", r#"{"name":"cli""#]);
    assert_exit(&output, 2, &["EOF"]);

    let output = server.call("/helloworld.Greeter/SayGoodbye", &[]);
    assert_exit(&output, 2, &["unknown method `SayGoodbye`", "SayHello"]);

    let output = server.call("/helloworld.Farewell/SayHello", &[]);
    assert_exit(&output, 2, &["unknown service `helloworld.Farewell`"]);

    let output = server.call("helloworld.Greeter", &[]);
    assert_exit(&output, 2, &["/package.Service/Method"]);

    let output = server.call(say_hello, &["-H", "no-equals-sign"]);
    assert_exit(&output, 2, &["KEY=VALUE"]);

    let output = call_at(&server.addr.to_string(), say_hello, "no/such.proto", &[]);
    assert_exit(&output, 2, &["no/such.proto"]);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.proto");
    std::fs::write(&bad, "syntax = \"proto3\";\nmessage M { strin x = 1; }\n").unwrap();
    let output = call_at(&server.addr.to_string(), "/M/x", bad.to_str().unwrap(), &[]);
    assert_exit(&output, 2, &["bad.proto:2:13:", "strin"]);
}

#[test]
fn unreachable_server_exits_3() {
    // A port nobody listens on: bind one, then free it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = call_at(
        &addr.to_string(),
        "/helloworld.Greeter/SayHello",
        &helloworld_proto(),
        &["--data", r#"{"name":"cli"}"#],
    );
    assert_exit(&output, 3, &["cannot connect", &addr.to_string()]);
}

#[test]
fn error_status_exits_4() {
    let server = TestServer::start();
    let output = server.call("/helloworld.Greeter/SayHello", &["--data", "{}"]);
    assert_exit(
        &output,
        4,
        &["error: invalid argument: name must not be empty"],
    );
}

#[test]
fn method_the_server_does_not_serve_exits_4() {
    // The .proto declares a method that the server does not have.
    let dir = tempfile::tempdir().unwrap();
    let proto = std::fs::read_to_string(helloworld_proto())
        .unwrap()
        .replace(
            "service Greeter {",
            "service Greeter {\n  rpc SayGoodbye (HelloRequest) returns (HelloReply);",
        );
    let path = dir.path().join("helloworld.proto");
    std::fs::write(&path, proto).unwrap();

    let server = TestServer::start();
    let output = call_at(
        &server.addr.to_string(),
        "/helloworld.Greeter/SayGoodbye",
        path.to_str().unwrap(),
        &[],
    );
    assert_exit(
        &output,
        4,
        &["error: unimplemented", "/helloworld.Greeter/SayGoodbye"],
    );
}

/// Every JSON value on stdout, in order.
fn json_values(output: &Output) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON values ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
}

fn names(values: &[serde_json::Value]) -> Vec<&str> {
    values.iter().map(|v| v["name"].as_str().unwrap()).collect()
}

#[test]
fn server_stream_prints_each_message() {
    let server = TestServer::start();
    let output = server.call_route_guide(
        "ListFeatures",
        &["-d", r#"{"lo":{"latitude":1},"hi":{"latitude":3}}"#],
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert_eq!(names(&json_values(&output)), ["f1", "f2", "f3"]);

    // An error status after some messages: they are printed, then the error, exit 4.
    let output = server.call_route_guide(
        "ListFeatures",
        &["-d", r#"{"lo":{"latitude":9},"hi":{"latitude":12}}"#],
    );
    assert_eq!(output.status.code(), Some(4), "stderr: {}", stderr(&output));
    assert_eq!(names(&json_values(&output)), ["f9", "f10"]);
    assert!(
        stderr(&output).contains("out of range: the map ends at latitude 10"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn client_stream_sends_every_message() {
    let server = TestServer::start();
    let output = server.call_route_guide(
        "RecordRoute",
        &[
            "-d",
            r#"{"latitude":1} {"latitude":2}
            {"latitude":3}"#,
        ],
    );
    assert_eq!(json_stdout(&output), serde_json::json!({"pointCount": 3}));
    // No messages at all: an empty stream.
    let output = server.call_route_guide("RecordRoute", &["-d", " ", "--emit-defaults"]);
    assert_eq!(json_stdout(&output)["pointCount"], 0);
}

#[test]
fn bidirectional_stream_sends_and_prints() {
    let server = TestServer::start();
    let output = server.call_route_guide(
        "RouteChat",
        &["-d", r#"{"message":"a"} {"message":"b"} {"message":"c"}"#],
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let values = json_values(&output);
    let messages: Vec<&str> = values
        .iter()
        .map(|v| v["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["A", "B", "C"]);
}

#[test]
fn message_counts_and_stream_inputs_are_checked() {
    let server = TestServer::start();
    let output = server.call_route_guide("GetFeature", &["-d", "{} {}"]);
    assert_exit(
        &output,
        2,
        &["--data holds 2 messages", "takes exactly one"],
    );
    let output = server.call_route_guide("ListFeatures", &["-d", ""]);
    assert_exit(&output, 2, &["--data holds 0 messages"]);
    let output = server.call_route_guide("RecordRoute", &["-d", r#"{"latitude":1} {"lat":2}"#]);
    assert_exit(&output, 2, &["(message 2)", "lat", "routeguide.Point"]);
}

/// `extra` after `--transport grpc`.
fn grpc<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&["--transport", "grpc"], extra].concat()
}

#[test]
fn grpc_transport_calls_every_kind() {
    let server = TestServer::start();

    let output = server.call(
        "/helloworld.Greeter/SayHello",
        &grpc(&["-d", r#"{"name":"h2"}"#, "-H", "greeting=Hi"]),
    );
    assert_eq!(
        json_stdout(&output),
        serde_json::json!({"message": "Hi, h2!"})
    );
    let output = server.call("/helloworld.Greeter/SayHello", &grpc(&["-d", "{}"]));
    assert_exit(&output, 4, &["invalid argument: name must not be empty"]);

    let output = server.call_route_guide(
        "ListFeatures",
        &grpc(&["-d", r#"{"lo":{"latitude":9},"hi":{"latitude":12}}"#]),
    );
    assert_eq!(output.status.code(), Some(4), "stderr: {}", stderr(&output));
    assert_eq!(names(&json_values(&output)), ["f9", "f10"]);
    assert!(
        stderr(&output).contains("out of range: the map ends at latitude 10"),
        "{}",
        stderr(&output)
    );

    let output = server.call_route_guide(
        "RecordRoute",
        &grpc(&["-d", r#"{"latitude":1} {"latitude":2}"#]),
    );
    assert_eq!(json_stdout(&output), serde_json::json!({"pointCount": 2}));

    let output = server.call_route_guide(
        "RouteChat",
        &grpc(&["-d", r#"{"message":"a"} {"message":"b"}"#]),
    );
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let messages: Vec<String> = json_values(&output)
        .iter()
        .map(|v| v["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, ["A", "B"]);
}
