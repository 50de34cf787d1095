//! A service generated from proto/helloworld.proto by gorpc-build, served and called on tokio.
//!
//! cargo run -p gorpc-examples --example helloworld

use gorpc_examples::helloworld::{
    Greeter, GreeterClient, GreeterServer, HelloAllReply, HelloAllRequest, HelloReply, HelloRequest,
};
use std::time::Duration;

use gorpc_tokio::{Request, Response, Router, Status};

struct MyGreeter;

impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.message.name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name must not be empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}!"),
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()?;
    let router = Router::new().add_service(GreeterServer::new(MyGreeter));
    let server = gorpc_tokio::serve(addr, router).await?;
    println!("helloworld server on {}", server.local_addr());

    // Every call of this client gets a 5 s deadline unless its request sets one.
    let client = GreeterClient::new(gorpc_tokio::connect(server.local_addr()).await?)
        .with_timeout(Duration::from_secs(5));
    let reply = client
        .say_hello(HelloRequest {
            name: "gorpc".into(),
        })
        .await?;
    println!("SayHello -> {:?}", reply.message.message);
    let all = client
        .say_hello_to_all(HelloAllRequest {
            names: vec!["ann".into(), "bob".into()],
        })
        .await?;
    println!("SayHelloToAll -> {:?}", all.message.messages);
    let err = client.say_hello(HelloRequest::default()).await.unwrap_err();
    println!("SayHello(\"\") -> error {err}");

    if std::env::args().any(|a| a == "--serve") {
        println!("serving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
