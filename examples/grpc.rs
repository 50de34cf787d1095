//! gRPC on the same port as gorpc's binary protocol and HTTP/1.1: helloworld and route_guide
//! (examples/proto), served until Ctrl-C, with the standard health and reflection services.
//!
//! cargo run -p gorpc-examples --example grpc [-- ADDR]     (default 127.0.0.1:50051)
//!
//! Any gRPC client can call it. With Python's grpcio (`pip install grpcio grpcio-tools`,
//! stubs from `python -m grpc_tools.protoc -I examples/proto --python_out=. --grpc_python_out=.
//! examples/proto/helloworld.proto`):
//!
//! ```text
//! import grpc, helloworld_pb2, helloworld_pb2_grpc
//! stub = helloworld_pb2_grpc.GreeterStub(grpc.insecure_channel("127.0.0.1:50051"))
//! print(stub.SayHello(helloworld_pb2.HelloRequest(name="grpcio")).message)
//! ```
//!
//! grpcurl finds the services through reflection:
//!
//! ```text
//! grpcurl -plaintext 127.0.0.1:50051 list
//! grpcurl -plaintext -d '{"name":"grpcurl"}' 127.0.0.1:50051 helloworld.Greeter/SayHello
//! grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check
//! ```
//!
//! gorpc's own tool does too, over gRPC or the binary protocol, and curl over HTTP/1.1:
//!
//! ```text
//! gorpc call 127.0.0.1:50051 /helloworld.Greeter/SayHello --data '{"name":"gorpc"}'
//! curl -d '{"name":"curl"}' -H 'content-type: application/json' \
//!     http://127.0.0.1:50051/helloworld.Greeter/SayHello
//! ```

use std::time::Duration;

use gorpc_examples::helloworld::GreeterServer;
use gorpc_examples::routeguide::RouteGuideServer;
use gorpc_examples::services::{Guide, Hello};
use gorpc_tokio::Router;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into())
        .parse()?;
    let router = Router::new()
        .add_service(GreeterServer::new(Hello))
        .add_service(RouteGuideServer::new(Guide));
    let server = gorpc_tokio::server(router)
        .http()
        .health()
        .reflection()
        .bind(addr)
        .await?;
    println!(
        "serving helloworld.Greeter and routeguide.RouteGuide on {} (gRPC, gorpc, HTTP/1.1) until Ctrl-C",
        server.local_addr()
    );
    tokio::signal::ctrl_c().await?;
    println!("shutting down");
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
