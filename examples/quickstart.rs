//! Starts a server and a client in one process and makes a few calls.
//!
//! cargo run -p gorpc-examples --example quickstart

use std::time::Duration;

use gorpc_tokio::{CallOptions, Router, Status};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug)]
struct HelloRequest {
    name: String,
}

#[derive(Serialize, Deserialize, Debug)]
struct HelloReply {
    message: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let router = Router::new()
        .msgpack(
            "/helloworld.Greeter/SayHello",
            |req: HelloRequest| async move {
                if req.name.is_empty() {
                    return Err(Status::invalid_argument("name must not be empty"));
                }
                Ok(HelloReply {
                    message: format!("Hello, {}!", req.name),
                })
            },
        )
        .msgpack("/helloworld.Greeter/Slow", |millis: u64| async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok(millis)
        });
    let server = gorpc_tokio::serve("127.0.0.1:0".parse()?, router).await?;
    println!("server listening on {}", server.local_addr());

    let client = gorpc_tokio::connect(server.local_addr()).await?;

    let reply: HelloReply = client
        .call(
            "/helloworld.Greeter/SayHello",
            &HelloRequest {
                name: "gorpc".into(),
            },
        )
        .await?;
    println!("SayHello(gorpc) -> {:?}", reply.message);

    // Many calls in flight on one connection, answered in any order.
    let calls = (0..5).map(|i| {
        let client = client.clone();
        async move {
            client
                .call::<_, HelloReply>(
                    "/helloworld.Greeter/SayHello",
                    &HelloRequest {
                        name: format!("caller {i}"),
                    },
                )
                .await
        }
    });
    for reply in futures::future::join_all(calls).await {
        println!("  concurrent -> {:?}", reply?.message);
    }

    let err = client
        .call::<_, HelloReply>(
            "/helloworld.Greeter/SayHello",
            &HelloRequest {
                name: String::new(),
            },
        )
        .await
        .unwrap_err();
    println!("SayHello(\"\") -> error {err}");

    let err = client
        .call::<_, HelloReply>(
            "/helloworld.Greeter/Nope",
            &HelloRequest { name: "x".into() },
        )
        .await
        .unwrap_err();
    println!("Nope -> error {err}");

    // The deadline travels with the call: the server drops the handler when it passes.
    // A client's default timeout is set on its builder...
    let impatient = gorpc_tokio::client()
        .endpoint(server.local_addr())
        .timeout(Duration::from_millis(50))
        .connect()
        .await?;
    let err = impatient
        .call::<u64, u64>("/helloworld.Greeter/Slow", &500)
        .await
        .unwrap_err();
    println!("Slow(500ms) on a client with a 50ms timeout -> error {err}");

    // ...and one call's in its options.
    let options = CallOptions {
        timeout: Some(Duration::from_millis(50)),
        ..CallOptions::default()
    };
    let err = client
        .call_with::<u64, u64>("/helloworld.Greeter/Slow", &500, options)
        .await
        .unwrap_err();
    println!("Slow(500ms) with a 50ms call timeout -> error {err}");

    let outcome = server.shutdown(Duration::from_secs(1)).await;
    println!("server shut down: {outcome:?}");
    Ok(())
}
