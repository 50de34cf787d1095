//! Calls a service by name through etcd: three servers register under leases, a client
//! discovers them and spreads its calls, one server leaves and another joins, the calls
//! follow.
//!
//! Needs an etcd server, e.g. `etcd` run with no arguments (client URL 127.0.0.1:2379;
//! Debian package etcd-server):
//!
//! cargo run -p gorpc-examples --features etcd --example discovery-etcd [-- http://127.0.0.1:2379]
//!
//! The endpoint comes from the first argument, else `ETCD_ENDPOINT`, else
//! `http://127.0.0.1:2379`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use gorpc::discovery::{Discover, Registration};
use gorpc::proto::balance::RoundRobin;
use gorpc_plugins::etcd::Etcd;
use gorpc_tokio::{Client, Router, Server, ServerHandle, Tokio};

const SERVICE: &str = "greeter";

async fn greeter(etcd: &Etcd) -> Result<ServerHandle<Tokio>, Box<dyn std::error::Error>> {
    let name = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let me = name.clone();
    let router = Router::new().msgpack("/helloworld.Greeter/SayHello", move |who: String| {
        let me = me.get().cloned().unwrap_or_default();
        async move { Ok(format!("Hello, {who}! (from {me})")) }
    });
    let server = Server::new(Tokio::current(), router)
        .register(etcd.clone(), Registration::new(SERVICE))
        .bind("127.0.0.1:0".parse()?)
        .await?;
    name.set(server.local_addr().to_string()).unwrap();
    println!(
        "server {} registered as {}",
        server.local_addr(),
        etcd.instance_key(SERVICE, server.local_addr())
    );
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
    let endpoint = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("ETCD_ENDPOINT").ok())
        .unwrap_or_else(|| "http://127.0.0.1:2379".to_owned());
    let etcd = Etcd::new([endpoint.as_str()])?.with_lease_ttl(Duration::from_secs(5))?;

    // One look at etcd first, so a missing server gives one clear line.
    let mut probe = etcd.watch(SERVICE);
    match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
        Ok(Some(Ok(_))) => println!("etcd at {endpoint} answers"),
        Ok(Some(Err(status))) => {
            eprintln!("no usable etcd at {endpoint}: {}", status.message());
            eprintln!("start one with `etcd`, or pass its client URL as the first argument");
            std::process::exit(1);
        }
        Ok(None) | Err(_) => {
            eprintln!("etcd at {endpoint} did not answer within 10 s");
            std::process::exit(1);
        }
    }
    drop(probe);

    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(greeter(&etcd).await?);
    }
    let client = Client::builder(Tokio::current())
        .discover(etcd.clone(), SERVICE)
        .balance(RoundRobin::new(0))
        .build()?;
    spread(&client, 9).await?;

    let leaving = servers.remove(0);
    println!(
        "server {} leaves (revokes its lease, then drains)",
        leaving.local_addr()
    );
    leaving.shutdown(Duration::from_secs(5)).await;
    servers.push(greeter(&etcd).await?);
    // The client follows etcd's watch; give it a moment to hear of the changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    spread(&client, 9).await?;

    for server in servers {
        server.shutdown(Duration::from_secs(5)).await;
    }
    println!("all servers deregistered");
    Ok(())
}
