//! Sees every call: a log line per call (in a span naming method, peer, id, code and
//! duration), Prometheus metrics at `GET /metrics` and health at `GET /healthz`, on the
//! port the calls use. A built-in client makes a few calls, one failing and one past its
//! deadline; then the server runs until Ctrl-C.
//!
//! cargo run -p gorpc-examples --example observability -- 127.0.0.1:8080
//! curl http://127.0.0.1:8080/metrics
//! curl -i http://127.0.0.1:8080/healthz
//!
//! RUST_LOG picks what is logged (default: info).

use std::net::SocketAddr;
use std::time::Duration;

use gorpc::interceptor::Logging;
use gorpc_plugins::prometheus::Prometheus;
use gorpc_tokio::{CallOptions, Client, ClientConfig, Code, Router, Server, Status, Tokio};

const HELLO: &str = "/demo.Greeter/Hello";
const SLOW: &str = "/demo.Greeter/Slow";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(addr) => addr.parse()?,
        None => "127.0.0.1:8080".parse()?,
    };
    let runtime = Tokio::current();
    // Before the server binds: it registers its metrics with the recorder then.
    let prometheus = Prometheus::install(&runtime)?;

    let router = Router::new()
        .msgpack(HELLO, |name: String| async move {
            if name.is_empty() {
                return Err(Status::new(Code::InvalidArgument, "name must not be empty"));
            }
            tracing::info!(%name, "greeting"); // inside the call's span
            Ok(format!("Hello, {name}!"))
        })
        .msgpack(SLOW, |millis: u64| async move {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok(millis)
        });
    let server = prometheus
        .serve_on(Server::new(runtime.clone(), router).interceptor(Logging))
        .bind(addr)
        .await?;
    let addr = server.local_addr();

    let client = Client::connect(runtime, addr, ClientConfig::default())
        .await?
        .with_interceptor(Logging);
    let reply: String = client.call(HELLO, &"observability".to_owned()).await?;
    tracing::info!(%reply, "the client got its answer");
    let failed = client.call::<_, String>(HELLO, &String::new()).await;
    tracing::info!(error = %failed.unwrap_err(), "a call that fails, as the client sees it");
    let options = CallOptions {
        timeout: Some(Duration::from_millis(200)),
        ..CallOptions::default()
    };
    let late = client.call_with::<_, u64>(SLOW, &1_000u64, options).await;
    tracing::info!(error = %late.unwrap_err(), "a call past its deadline, as the client sees it");

    tracing::info!(
        "metrics at http://{addr}/metrics, health at http://{addr}/healthz; Ctrl-C stops"
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
