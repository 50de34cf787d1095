//! A server and a client on tokio in one process, talking over UDP: one request and one
//! response per datagram.
//!
//! cargo run -p gorpc-examples --example udp

use std::time::Duration;

use gorpc_tokio::udp::{UdpClientConfig, UdpServer};
use gorpc_tokio::{CallOptions, Client, Code, Router, Status, Tokio};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let router = Router::new()
        .msgpack("/demo.Math/Add", |(a, b): (i64, i64)| async move {
            Ok::<_, Status>(a + b)
        })
        .msgpack("/demo.Echo/Say", |text: String| async move {
            Ok::<_, Status>(text)
        })
        .msgpack("/demo.Echo/Slow", |millis: u64| async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok::<_, Status>(millis)
        });
    let server = UdpServer::new(Tokio::current(), router)
        .bind("127.0.0.1:0".parse()?)
        .await?;
    println!("UDP server on {}", server.local_addr());

    // Add has no side effect: if its datagram or the answer is lost, send it again.
    let config = UdpClientConfig::default().idempotent("/demo.Math/Add");
    let client = Client::udp(Tokio::current(), server.local_addr(), config).await?;

    for (a, b) in [(1, 2), (40, 2), (-7, 7)] {
        let sum: i64 = client.call("/demo.Math/Add", &(a, b)).await?;
        println!("Add({a}, {b}) -> {sum}");
    }

    let said: String = client
        .call("/demo.Echo/Say", &"over UDP".to_string())
        .await?;
    println!("Say(\"over UDP\") -> {said:?}");

    // A call must fit in one datagram (1,200 bytes by default).
    let err = client
        .call::<_, String>("/demo.Echo/Say", &"x".repeat(2000))
        .await
        .unwrap_err();
    println!("Say(2,000 bytes) -> {:?}: {}", err.code(), err.message());

    let err = client
        .call_with::<_, u64>(
            "/demo.Echo/Slow",
            &1000u64,
            CallOptions {
                timeout: Some(Duration::from_millis(100)),
                ..CallOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    println!("Slow(1000 ms) with a 100 ms timeout -> {:?}", err.code());

    println!(
        "shutdown: {:?}",
        server.shutdown(Duration::from_secs(1)).await
    );
    Ok(())
}
