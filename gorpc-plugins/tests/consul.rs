//! The consul plugin against `FakeConsul`, an in-test fake of the agent's HTTP API
//! (tests/support/fake_consul.rs). Everything runs on 127.0.0.1 and is bounded in time.

#![cfg(feature = "consul")]

#[path = "support/fake_consul.rs"]
mod fake_consul;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fake_consul::FakeConsul;
use futures::stream::BoxStream;
use futures::StreamExt;
use gorpc::discovery::{Change, Discover, Instance, Register, Registration, WatchEvent};
use gorpc::Code;
use gorpc_plugins::consul::{Consul, ConsulError, ConsulOptions};

const TTL: Duration = Duration::from_millis(600);

fn options() -> ConsulOptions {
    ConsulOptions {
        ttl: TTL,
        wait: Duration::from_secs(5),
        request_timeout: Duration::from_secs(2),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        ..ConsulOptions::default()
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A 127.0.0.1 port nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind(local(0)).unwrap();
    listener.local_addr().unwrap()
}

async fn next_event(watch: &mut BoxStream<'static, WatchEvent>, within: Duration) -> WatchEvent {
    tokio::time::timeout(within, watch.next())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {within:?}"))
        .expect("the watch ended")
}

/// The next `Ok` batch, skipping errors, sorted for comparison.
async fn next_changes(watch: &mut BoxStream<'static, WatchEvent>, within: Duration) -> Vec<Change> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(mut changes) = next_event(watch, left).await {
            changes.sort_by_key(|c| format!("{c:?}"));
            return changes;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_instances_are_watched_with_their_weight_and_deregistered() {
    let fake = FakeConsul::start().await;
    let consul = Consul::with_options(&fake.url(), options()).unwrap();
    let registered = consul
        .register(&Registration::new("greeter").with_weight(3), local(7001))
        .await
        .unwrap();

    let services = fake.services();
    assert_eq!(services.len(), 1, "{services:?}");
    let service = &services[0];
    assert_eq!(service.id, "greeter-127.0.0.1-7001");
    assert_eq!(
        (
            service.name.as_str(),
            service.address.as_str(),
            service.port
        ),
        ("greeter", "127.0.0.1", 7001)
    );
    assert_eq!(service.weight, 3);
    assert_eq!(
        service.checks,
        vec![(
            "service:greeter-127.0.0.1-7001".to_owned(),
            TTL,
            "passing".to_owned()
        )]
    );

    let mut watch = consul.watch("greeter");
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Upsert(Instance::new(local(7001)).with_weight(3))]
    );
    // Another service's instance is not this watch's business.
    let _other = consul
        .register(&Registration::new("billing"), local(7002))
        .await
        .unwrap();
    let second = consul
        .register(&Registration::new("greeter"), local(7003))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Upsert(Instance::new(local(7003)))]
    );

    (registered.deregister)().await.unwrap();
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Remove(local(7001))]
    );
    assert!(fake.services().iter().all(|s| s.port != 7001));
    (second.deregister)().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_heartbeating_leaves_after_its_ttl() {
    let fake = FakeConsul::start().await;
    let consul = Consul::with_options(&fake.url(), options()).unwrap();
    let registered = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap();
    let upkeep = tokio::spawn(registered.upkeep);
    let mut watch = consul.watch("greeter");
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Upsert(Instance::new(local(7001)))]
    );

    // Heartbeats every TTL/3 keep it passing well past its TTL.
    let quiet = tokio::time::timeout(TTL * 3, watch.next()).await;
    assert!(
        quiet.is_err(),
        "the instance changed while heartbeating: {quiet:?}"
    );
    assert_eq!(fake.services()[0].checks[0].2, "passing");

    upkeep.abort();
    let stopped = Instant::now();
    assert_eq!(
        next_event(&mut watch, TTL * 4).await.unwrap(),
        vec![Change::Remove(local(7001))]
    );
    // Its last pass was at most TTL/3 before the stop, so the check lasts at least 2/3 TTL.
    assert!(
        stopped.elapsed() >= TTL / 2,
        "left after {:?}",
        stopped.elapsed()
    );
    assert_eq!(fake.services()[0].checks[0].2, "critical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_watch_blocks_instead_of_polling() {
    let fake = FakeConsul::start().await;
    let consul = Consul::with_options(&fake.url(), options()).unwrap();
    let registered = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap();
    let upkeep = tokio::spawn(registered.upkeep);
    let mut watch = consul.watch("greeter");
    next_event(&mut watch, Duration::from_secs(3))
        .await
        .unwrap();

    // Drive the watch for a quiet second (heartbeats included, which change nothing).
    let before = fake.health_queries();
    let quiet = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
    assert!(quiet.is_err(), "a change in a quiet second: {quiet:?}");
    let during = fake.health_queries() - before;
    assert!(during <= 1, "{during} health queries in a quiet second");

    // The blocked query still answers as soon as something changes.
    let started = Instant::now();
    let _second = consul
        .register(&Registration::new("greeter"), local(7002))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Upsert(Instance::new(local(7002)))]
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    upkeep.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_is_reported_and_the_watch_recovers() {
    let agent_addr = closed_port();
    let url = format!("http://{agent_addr}");
    let consul = Consul::with_options(&url, options()).unwrap();

    let err = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains(&url), "{err}");

    let mut watch = consul.watch("greeter");
    let started = Instant::now();
    let mut failures = 0;
    while started.elapsed() < Duration::from_secs(1) {
        let err = next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains(&url), "{err}");
        assert!(
            err.message().contains("/v1/health/service/greeter"),
            "{err}"
        );
        failures += 1;
    }
    // Backoff from 50 ms doubling to 200 ms: about 7 attempts in a second, never a hot loop.
    assert!(
        (3..=15).contains(&failures),
        "{failures} attempts in a second"
    );

    let fake = FakeConsul::start_with(agent_addr, None).await;
    let registered = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap();
    assert_eq!(
        next_changes(&mut watch, Duration::from_secs(3)).await,
        vec![Change::Upsert(Instance::new(local(7001)))]
    );
    (registered.deregister)().await.unwrap();
    assert!(fake.services().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_goes_backwards_restarts_the_watch() {
    let fake = FakeConsul::start().await;
    let options = ConsulOptions {
        wait: Duration::from_secs(2),
        // Long enough that no check expires without an upkeep during the test.
        ttl: Duration::from_secs(30),
        ..options()
    };
    let consul = Consul::with_options(&fake.url(), options).unwrap();
    let _a = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap();
    for port in 7100..7110 {
        // Churn elsewhere, to put the index well above where it will be moved back to.
        let other = consul
            .register(&Registration::new("billing"), local(port))
            .await
            .unwrap();
        (other.deregister)().await.unwrap();
    }
    let _b = consul
        .register(&Registration::new("greeter"), local(7002))
        .await
        .unwrap();
    let mut watch = consul.watch("greeter");
    assert_eq!(
        next_changes(&mut watch, Duration::from_secs(3)).await.len(),
        2
    );

    // A snapshot restore: the index drops below the one the watch blocks on. The blocked
    // query returns when its wait runs out, with a lower index: the watch must start over
    // from 0 rather than keep blocking on an index the agent will not reach for a while.
    fake.move_index_back_to(1);
    let _c = consul
        .register(&Registration::new("greeter"), local(7003))
        .await
        .unwrap();
    assert_eq!(
        next_changes(&mut watch, Duration::from_secs(4)).await,
        vec![Change::Upsert(Instance::new(local(7003)))]
    );
    let started = Instant::now();
    let _d = consul
        .register(&Registration::new("greeter"), local(7004))
        .await
        .unwrap();
    assert_eq!(
        next_changes(&mut watch, Duration::from_secs(4)).await,
        vec![Change::Upsert(Instance::new(local(7004)))]
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the change after the reset took {:?}: the watch kept blocking on the old index",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upkeep_registers_again_when_the_agent_forgets_but_never_after_deregistering() {
    let fake = FakeConsul::start().await;
    let consul = Consul::with_options(&fake.url(), options()).unwrap();
    let registered = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap();
    let upkeep = tokio::spawn(registered.upkeep);
    let mut watch = consul.watch("greeter");
    next_event(&mut watch, Duration::from_secs(3))
        .await
        .unwrap();

    fake.forget_everything();
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Remove(local(7001))]
    );
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Upsert(Instance::new(local(7001)))]
    );

    (registered.deregister)().await.unwrap();
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Remove(local(7001))]
    );
    // Several beats later it is still gone, and the upkeep has finished.
    tokio::time::sleep(TTL).await;
    assert!(fake.services().is_empty(), "{:?}", fake.services());
    assert!(upkeep.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_token_is_sent_and_a_refusal_is_reported() {
    let fake = FakeConsul::start_with(local(0), Some("s3cret")).await;
    let anonymous = Consul::with_options(&fake.url(), options()).unwrap();
    let err = next_event(&mut anonymous.watch("greeter"), Duration::from_secs(3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("HTTP 403"), "{err}");
    assert!(err.message().contains(&fake.url()), "{err}");

    let with_token = ConsulOptions {
        token: Some("s3cret".into()),
        ..options()
    };
    let consul = Consul::with_options(&fake.url(), with_token).unwrap();
    let _registered = consul
        .register(&Registration::new("greeter"), local(7001))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut consul.watch("greeter"), Duration::from_secs(3))
            .await
            .unwrap(),
        vec![Change::Upsert(Instance::new(local(7001)))]
    );
}

#[tokio::test]
async fn bad_configuration_gives_clear_errors() {
    for url in ["127.0.0.1:8500", "http://127.0.0.1:8500/consul", "consul"] {
        let err = Consul::new(url).unwrap_err();
        assert!(
            matches!(err, ConsulError::InvalidUrl { .. }),
            "{url}: {err}"
        );
        assert!(err.to_string().contains(url), "{err}");
    }
    let consul = Consul::with_options(&format!("http://{}", closed_port()), options()).unwrap();

    let mut watch = consul.watch("");
    let err = next_event(&mut watch, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("empty"), "{err}");
    assert!(
        watch.next().await.is_none(),
        "a watch of no service should end"
    );

    let cases = [
        (Registration::new(""), local(7001), "empty"),
        (
            Registration::new("greeter").with_weight(0),
            local(7001),
            "weight 0",
        ),
        (
            Registration::new("greeter"),
            SocketAddr::from(([0, 0, 0, 0], 7001)),
            "0.0.0.0:7001",
        ),
    ];
    for (registration, addr, says) in cases {
        let err = consul.register(&registration, addr).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains(says), "{err}");
    }
}

/// The plugin driven from smol, with no tokio context on the driving thread: consulrs's
/// reqwest calls and the upkeep's timer run through async-compat. The fake agent runs on a
/// tokio runtime of its own, as a real agent would be another process.
#[test]
fn works_from_smol_without_a_tokio_context() {
    let agent_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fake = agent_runtime.block_on(FakeConsul::start());
    let url = fake.url();

    smol::block_on(async {
        assert!(tokio::runtime::Handle::try_current().is_err());
        let consul = Consul::with_options(&url, options()).unwrap();
        let registered = consul
            .register(&Registration::new("greeter").with_weight(2), local(7001))
            .await
            .unwrap();
        let upkeep = smol::spawn(registered.upkeep);
        let mut watch = consul.watch("greeter");
        let first = smol_timeout(Duration::from_secs(3), watch.next()).await;
        assert_eq!(
            first.unwrap().unwrap(),
            vec![Change::Upsert(Instance::new(local(7001)).with_weight(2))]
        );

        // Past two TTLs, the smol-driven heartbeats have kept it.
        smol::Timer::after(TTL * 2).await;
        assert_eq!(fake.services()[0].checks[0].2, "passing");

        (registered.deregister)().await.unwrap();
        let removed = smol_timeout(Duration::from_secs(3), watch.next()).await;
        assert_eq!(removed.unwrap().unwrap(), vec![Change::Remove(local(7001))]);
        upkeep.cancel().await;
    });
    drop(fake);
}

async fn smol_timeout<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    futures::select! {
        value = futures::FutureExt::fuse(future) => value,
        _ = futures::FutureExt::fuse(smol::Timer::after(limit)) => panic!("nothing within {limit:?}"),
    }
}

/// The scenario through Consul (the fake), with a quiet spell of three TTLs in which
/// heartbeats must keep every instance registered.
async fn servers_come_and_go_through_consul<R: gorpc::Runtime>(rt: R, agent_url: String) {
    let consul = Consul::with_options(&agent_url, options()).unwrap();
    gorpc_tests::discovery::servers_come_and_go(rt.clone(), rt, consul, TTL * 3).await;
}

#[test]
fn servers_come_and_go_through_consul_on_tokio() {
    let rt = gorpc_tests::tokio_runtime();
    let fake = rt.block_on(FakeConsul::start());
    let url = fake.url();
    rt.block_on(servers_come_and_go_through_consul(
        gorpc_tests::Tokio::from_handle(rt.handle().clone()),
        url,
    ));
    assert!(
        fake.services().is_empty(),
        "shutdown deregisters: {:?}",
        fake.services()
    );
}

#[test]
fn servers_come_and_go_through_consul_on_smol() {
    let agent_runtime = gorpc_tests::tokio_runtime();
    let fake = agent_runtime.block_on(FakeConsul::start());
    let url = fake.url();
    smol::block_on(servers_come_and_go_through_consul(
        gorpc_tests::Smol::new(),
        url,
    ));
    assert!(
        fake.services().is_empty(),
        "shutdown deregisters: {:?}",
        fake.services()
    );
}
