//! Calls a service by name through Consul: three servers register with the local agent, a
//! client discovers them and spreads its calls, one server leaves, the calls follow.
//!
//! Needs a Consul agent, e.g. `consul agent -dev` (HTTP API on 127.0.0.1:8500):
//!
//! cargo run -p gorpc-examples --features consul --example discovery-consul [-- http://127.0.0.1:8500]
//!
//! The agent URL comes from the first argument, else `CONSUL_HTTP_ADDR`, else
//! `http://127.0.0.1:8500`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use gorpc::discovery::{Discover, Registration};
use gorpc::proto::balance::RoundRobin;
use gorpc_plugins::consul::Consul;
use gorpc_tokio::{Client, Router, Server, ServerHandle, Tokio};

const SERVICE: &str = "greeter";

async fn greeter(consul: &Consul) -> Result<ServerHandle<Tokio>, Box<dyn std::error::Error>> {
    let name = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let me = name.clone();
    let router = Router::new().msgpack("/helloworld.Greeter/SayHello", move |who: String| {
        let me = me.get().cloned().unwrap_or_default();
        async move { Ok(format!("Hello, {who}! (from {me})")) }
    });
    let server = Server::new(Tokio::current(), router)
        .register(consul.clone(), Registration::new(SERVICE))
        .bind("127.0.0.1:0".parse()?)
        .await?;
    name.set(server.local_addr().to_string()).unwrap();
    println!("server {} registered as {SERVICE:?}", server.local_addr());
    Ok(server)
}

async fn spread(client: &Client, calls: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut by_server = BTreeMap::new();
    for i in 0..calls {
        let reply: String = client
            .call("/helloworld.Greeter/SayHello", &format!("caller {i}"))
            .await?;
        let server = reply
            .rsplit("from ")
            .next()
            .unwrap_or("")
            .trim_end_matches(')');
        *by_server.entry(server.to_owned()).or_insert(0) += 1;
    }
    println!("{calls} calls answered by: {by_server:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("CONSUL_HTTP_ADDR").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8500".to_owned());
    let consul = Consul::new(&url)?;

    // One look at the agent first, so a missing agent gives one clear line.
    let mut probe = consul.watch(SERVICE);
    match tokio::time::timeout(Duration::from_secs(5), probe.next()).await {
        Ok(Some(Ok(_))) => println!("Consul agent at {url} answers"),
        Ok(Some(Err(status))) => {
            eprintln!("no usable Consul agent at {url}: {}", status.message());
            eprintln!("start one with `consul agent -dev`, or pass its URL as the first argument");
            std::process::exit(1);
        }
        Ok(None) | Err(_) => {
            eprintln!("the Consul agent at {url} did not answer within 5 s");
            std::process::exit(1);
        }
    }
    drop(probe);

    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(greeter(&consul).await?);
    }
    let client = Client::builder(Tokio::current())
        .discover(consul.clone(), SERVICE)
        .balance(RoundRobin::new(0))
        .build()?;
    spread(&client, 9).await?;

    let leaving = servers.remove(0);
    println!(
        "server {} leaves (deregisters, then drains)",
        leaving.local_addr()
    );
    leaving.shutdown(Duration::from_secs(5)).await;
    // The client follows Consul's blocking query; give it a moment to hear of the change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    spread(&client, 6).await?;

    for server in servers {
        server.shutdown(Duration::from_secs(5)).await;
    }
    println!("all servers deregistered");
    Ok(())
}
