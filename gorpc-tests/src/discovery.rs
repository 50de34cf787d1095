//! The discovery scenario every registry must pass, written once: three servers register,
//! a round-robin client spreads calls over them, one leaves while calls run and none fails,
//! a new one joins and gets its share, and shutdown withdraws them all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use gorpc::discovery::{Discover, Register, Registration};
use gorpc::proto::balance::RoundRobin;
use gorpc::{
    CallOptions, Client, Router, Runtime, Server, ServerHandle, ServerReply, ServerRequest,
    Shutdown,
};

use crate::{client_config, loopback, within, SECOND};

/// The method every scenario server answers: with its own port, two bytes big-endian.
pub const WHO: &str = "/test.Who/Am";

/// A server of [`WHO`] registered in `registry` as `service`.
pub async fn who_server<S: Runtime>(
    rt: &S,
    registry: impl Register,
    service: &str,
) -> ServerHandle<S> {
    let port = Arc::new(OnceLock::<u16>::new());
    let answer = port.clone();
    let router = Router::new().route(WHO, move |_req: ServerRequest| {
        let port = *answer.get().expect("port set before serving");
        async move { ServerReply::ok(Bytes::copy_from_slice(&port.to_be_bytes())) }
    });
    let server = Server::new(rt.clone(), router)
        .register(registry, Registration::new(service))
        .bind(loopback())
        .await
        .expect("bind and register");
    port.set(server.local_addr().port()).unwrap();
    server
}

/// `n` calls to [`WHO`] at once, each of which must succeed; the answering ports, counted.
pub async fn spread<C: Runtime>(rt: &C, client: &Client, n: usize) -> HashMap<u16, usize> {
    let calls: FuturesUnordered<_> = (0..n)
        .map(|_| client.call_raw(WHO, 0, Bytes::new(), CallOptions::default()))
        .collect();
    let results: Vec<_> = within(rt, 30 * SECOND, "calls", calls.collect()).await;
    let mut counts = HashMap::new();
    for result in results {
        let body = result.expect("call succeeds").body;
        *counts
            .entry(u16::from_be_bytes(body[..2].try_into().unwrap()))
            .or_insert(0) += 1;
    }
    counts
}

/// Waits, polling every 10 ms, until `check` holds (at most 20 s).
pub async fn eventually<C: Runtime>(rt: &C, what: &str, mut check: impl FnMut() -> bool) {
    within(rt, 20 * SECOND, what, async {
        while !check() {
            crate::sleep(rt, Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The scenario, over `registry` (which servers write and the client reads). `quiet` is
/// waited between the first spread and the departure, for registries whose upkeep must be
/// seen to keep instances alive (several TTLs).
pub async fn servers_come_and_go<S, C, G>(server_rt: S, client_rt: C, registry: G, quiet: Duration)
where
    S: Runtime,
    C: Runtime,
    G: Discover + Register + Clone,
{
    let service = "who";
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(who_server(&server_rt, registry.clone(), service).await);
    }
    let client = Client::builder(client_rt.clone())
        .discover(registry.clone(), service)
        .balance(RoundRobin::new(0))
        .config(client_config())
        .build()
        .unwrap();
    eventually(&client_rt, "client sees three instances", || {
        client.instances().len() == 3
    })
    .await;
    let counts = spread(&client_rt, &client, 300).await;
    assert_eq!(counts.len(), 3, "every instance answers: {counts:?}");
    assert!(
        counts.values().all(|&n| n == 100),
        "round robin: {counts:?}"
    );
    if !quiet.is_zero() {
        crate::sleep(&client_rt, quiet).await;
        assert_eq!(
            spread(&client_rt, &client, 30).await.len(),
            3,
            "upkeep kept all three"
        );
    }

    // One server leaves while calls run: it deregisters first, then drains, so none fails.
    let leaving = servers.remove(0);
    let gone: SocketAddr = leaving.local_addr();
    let load = spread(&client_rt, &client, 500);
    let shutdown = within(
        &server_rt,
        20 * SECOND,
        "graceful shutdown under load",
        leaving.shutdown(5 * SECOND),
    );
    let (shutdown, counts) = futures::join!(shutdown, load);
    assert_eq!(shutdown, Shutdown::Graceful);
    assert_eq!(counts.values().sum::<usize>(), 500, "no call failed");
    eventually(&client_rt, "client drops the instance that left", || {
        client.instances().iter().all(|i| i.addr != gone)
    })
    .await;
    let after = spread(&client_rt, &client, 60).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        !after.contains_key(&gone.port()),
        "a deregistered instance got calls"
    );

    // A new server joins and gets its share.
    let joined = who_server(&server_rt, registry.clone(), service).await;
    let port = joined.local_addr().port();
    eventually(&client_rt, "client sees the new instance", || {
        client.instances().iter().any(|i| i.addr.port() == port)
    })
    .await;
    let counts = spread(&client_rt, &client, 90).await;
    assert_eq!(counts.get(&port), Some(&30), "{counts:?}");

    servers.push(joined);
    for server in servers {
        let shutdown = within(&server_rt, 20 * SECOND, "shutdown", server.shutdown(SECOND));
        assert_eq!(shutdown.await, Shutdown::Graceful);
    }
    // Every server withdrew itself: a fresh watch lists nobody.
    let mut watch = registry.watch(service);
    let listing = within(&client_rt, 20 * SECOND, "listing", watch.next()).await;
    assert_eq!(listing.unwrap().unwrap(), vec![], "shutdown deregisters");
}
