//! `gorpc call` against the helloworld service, served in-process on tokio.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use common::{gorpc, helloworld_proto, run};
use gorpc_examples::helloworld::{
    Greeter, GreeterServer, HelloAllReply, HelloAllRequest, HelloReply, HelloRequest,
};
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
            let router = Router::new().add_service(GreeterServer::new(TestGreeter));
            Server::new(Tokio::current(), router)
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
