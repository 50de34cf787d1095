//! The etcd registry (gorpc-plugins, feature `etcd`) against a real etcd server started on
//! 127.0.0.1 by the harness in `gorpc_tests::etcd` (Debian package etcd-server).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use futures::stream::BoxStream;
use futures::StreamExt;
use gorpc::discovery::{Change, Discover, Instance, Register, Registered, Registration};
use gorpc::{Code, Runtime, Status};
use gorpc_plugins::etcd::{Etcd, EtcdConfigError};
use gorpc_tests::etcd::{free_port, EtcdServer};
use gorpc_tests::{within, Smol, Tokio};

type Watch = BoxStream<'static, Result<Vec<Change>, Status>>;

/// Every wait on etcd is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(2);

fn registry(etcd: &EtcdServer) -> Etcd {
    Etcd::new([etcd.endpoint()])
        .unwrap()
        .with_lease_ttl(TTL)
        .unwrap()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs `scenario` on tokio and on smol (where there is no tokio context at all).
macro_rules! on_tokio_and_smol {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn tokio() {
                    let rt = gorpc_tests::tokio_runtime();
                    let t = gorpc_tests::Tokio::from_handle(rt.handle().clone());
                    rt.block_on(super::$scenario(t));
                }

                #[test]
                fn smol() {
                    gorpc_tests::smol::block_on(async {
                        assert!(
                            tokio::runtime::Handle::try_current().is_err(),
                            "the smol test must run without a tokio context"
                        );
                        super::$scenario(gorpc_tests::Smol::new()).await
                    });
                }
            }
        )*
    };
}

on_tokio_and_smol!(
    registered_instance_is_watched_with_weight_and_removed_by_deregister,
    lease_expires_when_upkeep_stops_and_not_while_it_runs,
    unreachable_etcd_is_unavailable_quickly,
);

/// The next watch item, which must be a batch of changes.
async fn next_changes<R: Runtime>(rt: &R, watch: &mut Watch, what: &str) -> Vec<Change> {
    match within(rt, LIMIT, what, watch.next()).await {
        Some(Ok(changes)) => changes,
        Some(Err(status)) => panic!("{what}: the watch failed: {status}"),
        None => panic!("{what}: the watch ended"),
    }
}

/// The next watch item, if one comes within `quiet`.
async fn next_within<R: Runtime>(
    rt: &R,
    watch: &mut Watch,
    quiet: Duration,
) -> Option<Option<Result<Vec<Change>, Status>>> {
    let timer = rt.sleep_until(Instant::now() + quiet);
    match select(watch.next(), timer).await {
        Either::Left((item, _)) => Some(item),
        Either::Right(_) => None,
    }
}

/// Spawns the registration's upkeep on `rt`; dropping the guard stops it.
fn run_upkeep<R: Runtime>(rt: &R, upkeep: futures::future::BoxFuture<'static, ()>) -> UpkeepGuard {
    let (upkeep, handle) = futures::future::abortable(upkeep);
    rt.spawn(async move {
        let _ = upkeep.await;
    });
    UpkeepGuard(handle)
}

struct UpkeepGuard(futures::future::AbortHandle);

impl Drop for UpkeepGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn register<R: Runtime>(
    rt: &R,
    registry: &Etcd,
    registration: Registration,
    at: SocketAddr,
) -> Registered {
    within(rt, LIMIT, "register", registry.register(&registration, at))
        .await
        .expect("registration succeeds")
}

async fn registered_instance_is_watched_with_weight_and_removed_by_deregister<R: Runtime>(rt: R) {
    let etcd = EtcdServer::start();
    // The default 10 s lease: the removal below comes from the revocation, not an expiry.
    let registry = Etcd::new([etcd.endpoint()]).unwrap();
    let mut watch = registry.watch("greeter");
    assert_eq!(
        next_changes(&rt, &mut watch, "first listing").await,
        vec![],
        "no instance yet"
    );

    let at = addr(7001);
    let registered = register(
        &rt,
        &registry,
        Registration::new("greeter").with_weight(3),
        at,
    )
    .await;
    let _upkeep = run_upkeep(&rt, registered.upkeep);
    assert_eq!(
        next_changes(&rt, &mut watch, "registration").await,
        vec![Change::Upsert(Instance::new(at).with_weight(3))]
    );

    // A watch started now finds it in its first listing; another service's watch does not.
    let mut late = registry.watch("greeter");
    assert_eq!(
        next_changes(&rt, &mut late, "late listing").await,
        vec![Change::Upsert(Instance::new(at).with_weight(3))]
    );
    let mut other = registry.watch("greeter2");
    assert_eq!(next_changes(&rt, &mut other, "other service").await, vec![]);

    let deregistered_at = Instant::now();
    within(&rt, LIMIT, "deregister", (registered.deregister)())
        .await
        .expect("deregistration succeeds");
    assert_eq!(
        next_changes(&rt, &mut watch, "deregistration").await,
        vec![Change::Remove(at)]
    );
    assert!(
        deregistered_at.elapsed() < Duration::from_secs(3),
        "removed only after {:?}: the lease expired instead of being revoked",
        deregistered_at.elapsed()
    );
    assert_eq!(
        next_changes(&rt, &mut late, "deregistration (late watch)").await,
        vec![Change::Remove(at)]
    );
    assert!(
        next_within(&rt, &mut other, Duration::from_millis(500))
            .await
            .is_none(),
        "another service's watch heard of greeter"
    );
}

async fn lease_expires_when_upkeep_stops_and_not_while_it_runs<R: Runtime>(rt: R) {
    let etcd = EtcdServer::start();
    let registry = registry(&etcd);
    let mut watch = registry.watch("greeter");
    assert_eq!(next_changes(&rt, &mut watch, "first listing").await, vec![]);

    let (kept, abandoned) = (addr(7001), addr(7002));
    let kept_registration = register(&rt, &registry, Registration::new("greeter"), kept).await;
    let _upkeep = run_upkeep(&rt, kept_registration.upkeep);
    next_changes(&rt, &mut watch, "first registration").await;
    // The second registration's upkeep is never run: its lease must run out.
    let abandoned_registration =
        register(&rt, &registry, Registration::new("greeter"), abandoned).await;
    let registered_at = Instant::now();
    drop(abandoned_registration);
    assert_eq!(
        next_changes(&rt, &mut watch, "second registration").await,
        vec![Change::Upsert(Instance::new(abandoned))]
    );

    assert_eq!(
        next_changes(&rt, &mut watch, "lease expiry").await,
        vec![Change::Remove(abandoned)]
    );
    let lived = registered_at.elapsed();
    assert!(
        lived >= TTL - Duration::from_millis(500),
        "removed after {lived:?}, before its {TTL:?} lease ran out"
    );

    // The kept instance outlives two more TTLs.
    if let Some(item) = next_within(&rt, &mut watch, TTL * 2).await {
        panic!("the kept instance's lease is kept alive, yet the watch said {item:?}");
    }
    within(&rt, LIMIT, "deregister", (kept_registration.deregister)())
        .await
        .unwrap();
    assert_eq!(
        next_changes(&rt, &mut watch, "deregistration").await,
        vec![Change::Remove(kept)]
    );
}

async fn unreachable_etcd_is_unavailable_quickly<R: Runtime>(rt: R) {
    // Nothing listens on this port: connections are refused.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let registry = Etcd::new([endpoint.as_str()])
        .unwrap()
        .with_connect_timeout(Duration::from_secs(1))
        .with_request_timeout(Duration::from_secs(2));
    let quickly = Duration::from_secs(8);

    let started = Instant::now();
    let mut watch = registry.watch("greeter");
    match within(&rt, quickly, "watch of an unreachable etcd", watch.next()).await {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{status}");
            assert!(status.message().contains(&endpoint), "{status}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // The watch keeps trying, with a pause between attempts.
    match within(&rt, quickly, "second watch attempt", watch.next()).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }

    let registration = Registration::new("greeter");
    let result = within(
        &rt,
        quickly,
        "registration with an unreachable etcd",
        registry.register(&registration, addr(7001)),
    )
    .await;
    let status = result.expect_err("registration cannot succeed");
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(status.message().contains(&endpoint), "{status}");
    assert!(
        started.elapsed() < quickly * 2,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_configuration_gives_typed_errors() {
    match Etcd::new(["http://127.0.0.1"]) {
        Err(EtcdConfigError::BadEndpoint { endpoint, reason }) => {
            assert_eq!(endpoint, "http://127.0.0.1");
            assert!(reason.contains("port"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let error = Etcd::new(["https://127.0.0.1:2379"]).unwrap_err();
    assert!(
        error.to_string().contains("https://127.0.0.1:2379"),
        "{error}"
    );
    assert_eq!(
        Etcd::new(Vec::<&str>::new()).unwrap_err(),
        EtcdConfigError::NoEndpoints
    );
    let status: Status = EtcdConfigError::NoEndpoints.into();
    assert_eq!(status.code(), Code::InvalidArgument);

    // An empty service name is refused at once, without dialling (this port is closed).
    let registry = Etcd::new([format!("127.0.0.1:{}", free_port())]).unwrap();
    gorpc_tests::smol::block_on(async {
        let rt = Smol::new();
        let mut watch = registry.watch("");
        let status = within(&rt, LIMIT, "watch of no service", watch.next())
            .await
            .expect("one item")
            .expect_err("an error");
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
        assert!(status.message().contains("empty"), "{status}");
        assert!(watch.next().await.is_none(), "retrying cannot fix a name");

        let status = within(
            &rt,
            LIMIT,
            "registration of no service",
            registry.register(&Registration::new(""), addr(7001)),
        )
        .await
        .expect_err("an error");
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    });
}

/// Runs `admin` with a plain etcd client, for what the registry itself never does. On a
/// thread of its own, so it can be called from inside a test's tokio runtime.
fn with_etcd_client<T, F>(
    etcd: &EtcdServer,
    admin: impl FnOnce(etcd_client::Client) -> F + Send,
) -> T
where
    F: Future<Output = Result<T, etcd_client::Error>>,
    T: Send,
{
    let endpoint = etcd.endpoint();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let client = etcd_client::Client::connect([endpoint], None)
                        .await
                        .expect("connect");
                    admin(client).await.expect("etcd request")
                })
            })
            .join()
            .expect("etcd admin thread")
    })
}

#[test]
fn lost_lease_is_granted_again_by_upkeep() {
    let rt = gorpc_tests::tokio_runtime();
    let t = Tokio::from_handle(rt.handle().clone());
    let etcd = EtcdServer::start();
    let registry = registry(&etcd);
    rt.block_on(async {
        let mut watch = registry.watch("greeter");
        next_changes(&t, &mut watch, "first listing").await;
        let at = addr(7001);
        let registered = register(&t, &registry, Registration::new("greeter"), at).await;
        let _upkeep = run_upkeep(&t, registered.upkeep);
        assert_eq!(
            next_changes(&t, &mut watch, "registration").await,
            vec![Change::Upsert(Instance::new(at))]
        );

        // Revoke every lease behind the registry's back, as if etcd had lost them.
        let revoked = with_etcd_client(&etcd, |mut client| async move {
            let ids: Vec<i64> = client
                .leases()
                .await?
                .leases()
                .iter()
                .map(|l| l.id())
                .collect();
            for &id in &ids {
                client.lease_revoke(id).await?;
            }
            Ok(ids.len())
        });
        assert_eq!(revoked, 1);
        assert_eq!(
            next_changes(&t, &mut watch, "revocation").await,
            vec![Change::Remove(at)]
        );
        assert_eq!(
            next_changes(&t, &mut watch, "registration by upkeep").await,
            vec![Change::Upsert(Instance::new(at))]
        );

        // Deregistration revokes the new lease, not the lost one.
        within(&t, LIMIT, "deregister", (registered.deregister)())
            .await
            .unwrap();
        assert_eq!(
            next_changes(&t, &mut watch, "deregistration").await,
            vec![Change::Remove(at)]
        );
        if let Some(item) = next_within(&t, &mut watch, TTL).await {
            panic!("upkeep registered again after deregistration: {item:?}");
        }
    });
}

#[test]
fn malformed_values_are_skipped() {
    let etcd = EtcdServer::start();
    let registry = registry(&etcd);
    let prefix = format!("{}/greeter/", registry.prefix());
    let good = addr(7001);
    with_etcd_client(&etcd, |mut client| {
        let prefix = prefix.clone();
        async move {
            client
                .put(format!("{prefix}junk"), "not json", None)
                .await?;
            client
                .put(
                    format!("{prefix}{good}"),
                    format!(r#"{{"addr":"{good}","weight":2}}"#),
                    None,
                )
                .await?;
            Ok(())
        }
    });
    gorpc_tests::smol::block_on(async {
        let rt = Smol::new();
        let mut watch = registry.watch("greeter");
        assert_eq!(
            next_changes(&rt, &mut watch, "listing").await,
            vec![Change::Upsert(Instance::new(good).with_weight(2))]
        );
        let other = addr(7002);
        with_etcd_client(&etcd, |mut client| async move {
            client
                .put(format!("{prefix}nonsense"), r#"{"addr":"nowhere"}"#, None)
                .await?;
            // No weight: weight 1.
            client
                .put(
                    format!("{prefix}{other}"),
                    format!(r#"{{"addr":"{other}"}}"#),
                    None,
                )
                .await?;
            client.delete(format!("{prefix}junk"), None).await?;
            client.delete(format!("{prefix}{good}"), None).await?;
            Ok(())
        });
        let mut seen: HashMap<SocketAddr, Option<u32>> = HashMap::new();
        while seen.len() < 2 {
            for change in next_changes(&rt, &mut watch, "changes").await {
                match change {
                    Change::Upsert(i) => seen.insert(i.addr, Some(i.weight)),
                    Change::Remove(a) => seen.insert(a, None),
                };
            }
        }
        assert_eq!(seen, HashMap::from([(other, Some(1)), (good, None)]));
    });
}

#[test]
fn watch_reports_unavailable_while_etcd_is_down_and_catches_up_after() {
    let rt = gorpc_tests::tokio_runtime();
    let t = Tokio::from_handle(rt.handle().clone());
    let mut etcd = EtcdServer::start();
    let registry = registry(&etcd).with_request_timeout(Duration::from_secs(2));
    rt.block_on(async {
        let mut watch = registry.watch("greeter");
        next_changes(&t, &mut watch, "first listing").await;
        let first = addr(7001);
        let registered = register(&t, &registry, Registration::new("greeter"), first).await;
        let _upkeep = run_upkeep(&t, registered.upkeep);
        next_changes(&t, &mut watch, "registration").await;

        etcd.stop();
        match within(&t, LIMIT, "watch error", watch.next()).await {
            Some(Err(status)) => {
                assert_eq!(status.code(), Code::Unavailable, "{status}");
                assert!(status.message().contains(&etcd.endpoint()), "{status}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        etcd.restart();

        // Registered by another client while the watch is still re-listing.
        let second = addr(7002);
        let other_registration =
            register(&t, &registry, Registration::new("greeter"), second).await;
        let _other_upkeep = run_upkeep(&t, other_registration.upkeep);
        let deadline = Instant::now() + LIMIT;
        let mut instances: HashMap<SocketAddr, u32> = HashMap::from([(first, 1)]);
        while instances.len() < 2 {
            assert!(Instant::now() < deadline, "the watch never caught up");
            match within(&t, LIMIT, "catching up", watch.next()).await {
                Some(Ok(changes)) => {
                    for change in changes {
                        match change {
                            Change::Upsert(i) => instances.insert(i.addr, i.weight),
                            Change::Remove(a) => instances.remove(&a),
                        };
                    }
                }
                // More attempts may fail while etcd elects itself leader again.
                Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
                None => panic!("the watch ended"),
            }
        }
        assert_eq!(instances, HashMap::from([(first, 1), (second, 1)]));
        // The first registration's lease survived the restart and is still kept alive.
        if let Some(item) = next_within(&t, &mut watch, TTL * 2).await {
            panic!("nothing should change, yet the watch said {item:?}");
        }
    });
}

mod scenario {
    //! Servers registered in etcd and a client discovering them through it, on every
    //! runtime pairing.

    use std::time::Duration;

    use gorpc::Runtime;
    use gorpc_tests::discovery::servers_come_and_go;
    use gorpc_tests::etcd::EtcdServer;
    use gorpc_tests::on_every_runtime;

    async fn servers_registered_in_etcd_share_calls_and_come_and_go<S: Runtime, C: Runtime>(
        server_rt: S,
        client_rt: C,
    ) {
        let etcd = EtcdServer::start();
        let registry = super::registry(&etcd);
        servers_come_and_go(server_rt, client_rt, registry, Duration::ZERO).await;
    }

    on_every_runtime!(servers_registered_in_etcd_share_calls_and_come_and_go);
}
