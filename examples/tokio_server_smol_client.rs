//! A server on tokio and a client on smol, in separate threads, talking over TCP.
//!
//! cargo run -p gorpc-examples --example tokio-server-smol-client

use std::sync::mpsc;
use std::time::Duration;

fn main() {
    gorpc_examples::init_logging();
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let router = gorpc_tokio::Router::new()
                .msgpack("/demo.Math/Add", |(a, b): (i64, i64)| async move {
                    Ok::<_, gorpc_tokio::Status>(a + b)
                });
            let handle = gorpc_tokio::Server::new(gorpc_tokio::Tokio::current(), router)
                .bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            addr_tx.send(handle.local_addr()).unwrap();
            let _ = stop_rx.await;
            handle.shutdown(Duration::from_secs(1)).await
        })
    });
    let addr = addr_rx.recv().unwrap();
    println!("tokio server on {addr}");

    smol::block_on(async {
        let client = gorpc_smol::Client::connect(
            gorpc_smol::Smol::new(),
            addr,
            gorpc_smol::ClientConfig::default(),
        )
        .await
        .expect("connect");
        for (a, b) in [(1, 2), (40, 2), (-7, 7)] {
            let sum: i64 = client.call("/demo.Math/Add", &(a, b)).await.expect("call");
            println!("smol client: {a} + {b} = {sum}");
        }
    });
    stop_tx.send(()).unwrap();
    println!("server: {:?}", server.join().unwrap());
}
