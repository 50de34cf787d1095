//! Calling a service by name: discovery, balancing, registration and outlier ejection over
//! real TCP on 127.0.0.1, on every runtime pairing. The registries here are the in-process
//! `MemoryRegistry` and `StaticList`; Consul and etcd have their own tests in gorpc-plugins.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use gorpc::client::OutlierDetection;
use gorpc::discovery::{
    Discover, Instance, MemoryRegistry, Register, Registered, Registration, StaticList, WatchEvent,
};
use gorpc::proto::balance::{ConsistentHash, RoundRobin};
use gorpc::{
    CallOptions, Client, Code, Router, Runtime, Server, ServerReply, ServerRequest, Shutdown,
    Status,
};
use gorpc_tests::discovery::{servers_come_and_go, spread, who_server, WHO};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};

async fn who(client: &Client, key: Option<u64>) -> Result<u16, Status> {
    let options = CallOptions {
        key,
        ..CallOptions::default()
    };
    let rsp = client.call_raw(WHO, 0, Bytes::new(), options).await?;
    Ok(u16::from_be_bytes(rsp.body[..2].try_into().unwrap()))
}

async fn spreads_calls_and_follows_instances_coming_and_going<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let registry = MemoryRegistry::new();
    servers_come_and_go(server_rt, client_rt, registry.clone(), Duration::ZERO).await;
    assert!(registry.instances("who").is_empty(), "shutdown deregisters");
}

async fn an_unreachable_instance_is_ejected_and_calls_go_elsewhere<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let registry = MemoryRegistry::new();
    let live = [
        who_server(&server_rt, registry.clone(), "who").await,
        who_server(&server_rt, registry.clone(), "who").await,
    ];
    // A port that refuses connections: bound, then closed.
    let dead = std::net::TcpListener::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    registry.insert("who", Instance::new(dead));
    let client = Client::builder(client_rt.clone())
        .discover(registry.clone(), "who")
        .balance(RoundRobin::new(0))
        .config(client_config())
        .outlier_detection(OutlierDetection {
            ejection: Duration::from_millis(300),
            ..OutlierDetection::default()
        })
        .build()
        .unwrap();
    let counts = spread(&client_rt, &client, 200).await;
    assert_eq!(counts.values().sum::<usize>(), 200, "no call failed");
    assert!(!counts.contains_key(&dead.port()));
    let ejected: Vec<SocketAddr> = client
        .instances()
        .iter()
        .filter(|i| i.ejected)
        .map(|i| i.addr)
        .collect();
    assert_eq!(ejected, vec![dead]);
    // The ejection ends; the instance is tried again, fails again, and is ejected again
    // while calls keep succeeding. One call at a time, looking after each: an ejection
    // ends only at a pick, so however slowly the calls run, the one that finds the
    // instance dead leaves it ejected until the next call (round robin over three
    // instances tries it within three calls).
    gorpc_tests::sleep(&client_rt, Duration::from_millis(400)).await;
    let mut ejected_again = false;
    for _ in 0..50 {
        let port = within(&client_rt, 30 * SECOND, "a call", who(&client, None))
            .await
            .expect("call succeeds");
        assert_ne!(port, dead.port());
        if client
            .instances()
            .iter()
            .any(|i| i.addr == dead && i.ejected)
        {
            ejected_again = true;
            break;
        }
    }
    assert!(
        ejected_again,
        "the instance is ejected again after its trial"
    );
    for server in live {
        server.shutdown(SECOND).await;
    }
}

async fn a_failing_instance_is_ejected_then_tried_and_taken_back<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let registry = MemoryRegistry::new();
    let good = who_server(&server_rt, registry.clone(), "who").await;
    // FAILING, then HELD (answers OK once released, so the trial call stays in flight while
    // the other calls are picked), then RECOVERED.
    const FAILING: u8 = 0;
    const HELD: u8 = 1;
    const RECOVERED: u8 = 2;
    let state = Arc::new(AtomicU8::new(FAILING));
    let handler_state = state.clone();
    let handler_rt = server_rt.clone();
    let flaky = Server::new(
        server_rt.clone(),
        Router::new().route(WHO, move |_req: ServerRequest| {
            let state = handler_state.clone();
            let rt = handler_rt.clone();
            async move {
                while state.load(Ordering::SeqCst) == HELD {
                    gorpc_tests::sleep(&rt, Duration::from_millis(5)).await;
                }
                if state.load(Ordering::SeqCst) == RECOVERED {
                    ServerReply::ok(Bytes::from_static(&[0, 0]))
                } else {
                    ServerReply::error(Status::new(Code::Unavailable, "overloaded"))
                }
            }
        }),
    )
    .register(registry.clone(), Registration::new("who"))
    .bind(loopback())
    .await
    .unwrap();
    let client = Client::builder(client_rt.clone())
        .discover(registry.clone(), "who")
        .balance(RoundRobin::new(0))
        .config(client_config())
        .outlier_detection(OutlierDetection {
            consecutive_failures: 3,
            ejection: Duration::from_millis(200),
            ..OutlierDetection::default()
        })
        .build()
        .unwrap();
    let mut failures = 0;
    for _ in 0..40 {
        if who(&client, None).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "ejected after three failures in a row");
    let is_ejected = |client: &Client| {
        client
            .instances()
            .iter()
            .any(|i| i.addr == flaky.local_addr() && i.ejected)
    };
    assert!(is_ejected(&client));

    // The instance recovers; after the ejection a trial call succeeds and it is back.
    state.store(HELD, Ordering::SeqCst);
    gorpc_tests::sleep(&client_rt, Duration::from_millis(300)).await;
    // One trial at a time: calls meanwhile go to the other instance. The trial is held
    // until every call was picked, so no timing lets it finish first.
    let release = async {
        gorpc_tests::sleep(&client_rt, Duration::from_millis(300)).await;
        state.store(RECOVERED, Ordering::SeqCst);
    };
    let (during_trial, ()) = futures::join!(spread(&client_rt, &client, 20), release);
    assert_eq!(during_trial.get(&0), Some(&1), "{during_trial:?}");
    let counts = spread(&client_rt, &client, 20).await;
    assert_eq!(
        counts.get(&0),
        Some(&10),
        "taken back into the rotation: {counts:?}"
    );
    assert!(!is_ejected(&client));
    good.shutdown(SECOND).await;
    flaky.shutdown(SECOND).await;
}

async fn the_same_key_goes_to_the_same_instance<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let registry = MemoryRegistry::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(who_server(&server_rt, registry.clone(), "who").await);
    }
    let client = Client::builder(client_rt.clone())
        .discover(registry.clone(), "who")
        .balance(ConsistentHash::new(7))
        .config(client_config())
        .build()
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for key in 0..30u64 {
        let first = who(&client, Some(key)).await.unwrap();
        for _ in 0..3 {
            assert_eq!(who(&client, Some(key)).await.unwrap(), first);
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "keys spread over every instance");
    for server in servers {
        server.shutdown(SECOND).await;
    }
}

/// A registry that never answers.
struct Silent;

impl Discover for Silent {
    fn watch(&self, _service: &str) -> BoxStream<'static, WatchEvent> {
        futures::stream::pending().boxed()
    }
}

/// A registry that cannot be reached.
struct Unreachable;

impl Discover for Unreachable {
    fn watch(&self, _service: &str) -> BoxStream<'static, WatchEvent> {
        futures::stream::once(async {
            Err(Status::new(
                Code::Unavailable,
                "registry at 127.0.0.1:1: connection refused",
            ))
        })
        .chain(futures::stream::pending())
        .boxed()
    }
}

impl Register for Unreachable {
    fn register(
        &self,
        _registration: &Registration,
        _addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>> {
        Box::pin(async {
            Err(Status::new(
                Code::Unavailable,
                "registry at 127.0.0.1:1: connection refused",
            ))
        })
    }
}

async fn bad_discovery_fails_calls_clearly_and_in_time<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let _ = server_rt;
    let quick = CallOptions {
        timeout: Some(Duration::from_millis(200)),
        ..CallOptions::default()
    };
    // Unreachable registry: Unavailable, with the registry's reason.
    let client = Client::builder(client_rt.clone())
        .discover(Unreachable, "who")
        .build()
        .unwrap();
    let err = within(
        &client_rt,
        5 * SECOND,
        "call",
        client.call_raw(WHO, 0, Bytes::new(), quick.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("connection refused"), "{err}");

    // A registry that never answers: the call ends at its deadline.
    let client = Client::builder(client_rt.clone())
        .discover(Silent, "who")
        .build()
        .unwrap();
    let started = Instant::now();
    let err = within(
        &client_rt,
        5 * SECOND,
        "call",
        client.call_raw(WHO, 0, Bytes::new(), quick.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < 2 * SECOND);

    // A service nobody registered.
    let client = Client::builder(client_rt.clone())
        .discover(MemoryRegistry::new(), "nobody")
        .build()
        .unwrap();
    let err = client
        .call_raw(WHO, 0, Bytes::new(), quick.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no instances of \"nobody\""),
        "{err}"
    );

    // A static list without the service, an empty service name, no target at all.
    let client = Client::builder(client_rt.clone())
        .discover(StaticList::parse("who", &["127.0.0.1:1"]).unwrap(), "what")
        .build()
        .unwrap();
    let err = client
        .call_raw(WHO, 0, Bytes::new(), quick)
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("static list has no service \"what\""),
        "{err}"
    );
    let err = Client::builder(client_rt.clone())
        .discover(MemoryRegistry::new(), " ")
        .build()
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = Client::builder(client_rt.clone()).build().unwrap_err();
    assert!(err.message().contains("nothing to call"), "{err}");
}

async fn bad_registration_fails_the_bind<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let _ = client_rt;
    let router = || {
        Router::new().route(WHO, |_req: ServerRequest| async {
            ServerReply::ok(Bytes::new())
        })
    };
    let Err(err) = Server::new(server_rt.clone(), router())
        .register(Unreachable, Registration::new("who"))
        .bind(loopback())
        .await
    else {
        panic!("bind succeeded with an unreachable registry");
    };
    assert!(err.to_string().contains("connection refused"), "{err}");

    let Err(err) = Server::new(server_rt.clone(), router())
        .register(MemoryRegistry::new(), Registration::new("who"))
        .bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await
    else {
        panic!("registered a wildcard address");
    };
    assert!(err.to_string().contains("with_addr"), "{err}");
}

/// Records whether the server still accepted connections when it deregistered.
struct Probe(Arc<AtomicBool>);

impl Register for Probe {
    fn register(
        &self,
        _registration: &Registration,
        addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>> {
        let accepting = self.0.clone();
        Box::pin(async move {
            Ok(Registered {
                upkeep: Box::pin(futures::future::pending()),
                deregister: Box::new(move || {
                    // A loopback connect answers at once; blocking here is brief.
                    let open = std::net::TcpStream::connect(addr).is_ok();
                    accepting.store(open, Ordering::SeqCst);
                    Box::pin(async { Ok(()) })
                }),
            })
        })
    }
}

/// Deregistration comes before the drain: clients stop choosing the instance while it
/// still serves, so none of them meets a closed port.
async fn shutdown_deregisters_before_draining<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let _ = client_rt;
    let accepting = Arc::new(AtomicBool::new(false));
    let server = Server::new(server_rt.clone(), Router::new())
        .register(Probe(accepting.clone()), Registration::new("who"))
        .bind(loopback())
        .await
        .unwrap();
    assert_eq!(server.shutdown(5 * SECOND).await, Shutdown::Graceful);
    assert!(
        accepting.load(Ordering::SeqCst),
        "deregistered after the port closed"
    );
}

on_every_runtime!(
    spreads_calls_and_follows_instances_coming_and_going,
    an_unreachable_instance_is_ejected_and_calls_go_elsewhere,
    a_failing_instance_is_ejected_then_tried_and_taken_back,
    the_same_key_goes_to_the_same_instance,
    bad_discovery_fails_calls_clearly_and_in_time,
    bad_registration_fails_the_bind,
    shutdown_deregisters_before_draining,
);
