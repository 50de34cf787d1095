//! HTTP/1.1 and the binary protocol on one port: a msgpack method and a generated protobuf
//! service, called with JSON by `curl` (run when it is installed) and by `Client::http`.
//!
//! cargo run -p gorpc-examples --example http-curl [-- 127.0.0.1:8080]
//!
//! With an address, the server stays up after the demo (Ctrl-C stops it) so that you can
//! try the printed curl lines yourself.

use std::process::Command;
use std::time::Duration;

use gorpc_examples::helloworld::{
    Greeter, GreeterClient, GreeterServer, HelloAllReply, HelloAllRequest, HelloReply, HelloRequest,
};
use gorpc_tokio::{Client, ClientConfig, Request, Response, Router, Server, Status, Tokio};
use serde::{Deserialize, Serialize};

struct MyGreeter;

impl Greeter for MyGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            message: format!("Hello, {}!", request.message.name),
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

#[derive(Serialize, Deserialize, Debug)]
struct Order {
    item: String,
    quantity: u32,
}

#[derive(Serialize, Deserialize, Debug)]
struct Receipt {
    item: String,
    total_cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let stay_up = std::env::args().nth(1);
    let addr = stay_up.as_deref().unwrap_or("127.0.0.1:0").parse()?;
    let router = Router::new()
        .add_service(GreeterServer::new(MyGreeter))
        .msgpack("/shop.Till/Buy", |order: Order| async move {
            if order.quantity == 0 {
                return Err(Status::invalid_argument("quantity must be positive"));
            }
            Ok(Receipt {
                total_cents: 250 * u64::from(order.quantity),
                item: order.item,
            })
        });
    let server = Server::new(Tokio::current(), router)
        .http()
        .bind(addr)
        .await?;
    let addr = server.local_addr();
    println!("serving HTTP and the binary protocol on {addr}\n");

    let calls = [
        ("/helloworld.Greeter/SayHello", r#"{"name":"curl"}"#),
        ("/shop.Till/Buy", r#"{"item":"tea","quantity":3}"#),
        ("/shop.Till/Buy", r#"{"item":"tea","quantity":0}"#),
    ];
    let have_curl = Command::new("curl").arg("--version").output().is_ok();
    for (path, json) in calls {
        let url = format!("http://{addr}{path}");
        println!("$ curl -i -H 'content-type: application/json' -d '{json}' {url}");
        if !have_curl {
            continue;
        }
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--include", "--max-time", "10"])
            .args([
                "--header",
                "content-type: application/json",
                "--data",
                json,
                &url,
            ])
            .output()?;
        println!("{}", String::from_utf8_lossy(&output.stdout).trim_end());
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        println!();
    }
    if !have_curl {
        println!("(curl is not installed: the lines above were not run)\n");
    }

    // The same methods through gorpc's own HTTP client, protobuf and msgpack on the wire.
    let client = Client::http(Tokio::current(), addr, ClientConfig::default());
    let reply = GreeterClient::new(client.clone())
        .say_hello(HelloRequest {
            name: "Client::http".into(),
        })
        .await?;
    println!("Client::http SayHello -> {:?}", reply.message.message);
    let receipt: Receipt = client
        .call(
            "/shop.Till/Buy",
            &Order {
                item: "cake".into(),
                quantity: 2,
            },
        )
        .await?;
    println!("Client::http Buy -> {receipt:?}");

    if stay_up.is_some() {
        println!("\nserving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    let outcome = server.shutdown(Duration::from_secs(1)).await;
    println!("server shut down: {outcome:?}");
    Ok(())
}
