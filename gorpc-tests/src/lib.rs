//! Support for the integration tests in tests/: run one scenario on every runtime pairing.
//!
//! A scenario is an `async fn(server: S, client: C)` generic over the server's and the
//! client's [`Runtime`]. [`on_every_runtime!`] turns it into one `#[test]` per pairing:
//! tokio, smol, the smol adapter under the async-std executor, and both cross pairings
//! (a tokio server with a smol client, and the other way round).
//!
//! [`fault`] injects faults: a TCP proxy that delays, blackholes, resets, truncates or
//! corrupts the stream on demand, and a server whose handlers answer slowly or stall.

pub mod blocking;
pub mod counting;
pub mod discovery;
pub mod etcd;
pub mod fault;
pub mod raw_http;

use std::future::Future;
use std::time::{Duration, Instant};

use gorpc::Runtime;
pub use gorpc_smol::Smol;
pub use gorpc_tokio::Tokio;
pub use {async_std, smol};

pub const SECOND: Duration = Duration::from_secs(1);

/// Port 0 on the loopback interface: every test server binds here.
pub fn loopback() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Client settings for tests: a default timeout long enough for a loaded CI machine, short
/// enough that a hang fails the test instead of the run.
pub fn client_config() -> gorpc::ClientConfig {
    gorpc::ClientConfig {
        default_timeout: Some(Duration::from_secs(20)),
        ..gorpc::ClientConfig::default()
    }
}

/// A multi-threaded tokio runtime of two workers (the CI machine has two cores).
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The smol adapter with its tasks on async-std's executor.
pub fn async_std_runtime() -> Smol {
    Smol::with_spawner(|task| {
        async_std::task::spawn(task);
    })
}

/// Waits on `runtime`'s timer.
pub async fn sleep<R: Runtime>(runtime: &R, d: Duration) {
    runtime.sleep_until(Instant::now() + d).await
}

/// Runs `future`, panicking with `what` if it takes longer than `limit`: every wait in
/// these tests is bounded.
pub async fn within<R: Runtime, T>(
    runtime: &R,
    limit: Duration,
    what: &str,
    future: impl Future<Output = T>,
) -> T {
    let mut future = std::pin::pin!(future);
    let mut timer = runtime.sleep_until(Instant::now() + limit);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(cx) {
            return std::task::Poll::Ready(v);
        }
        if std::pin::Pin::new(&mut timer).poll(cx).is_ready() {
            panic!("{what}: still waiting after {limit:?}");
        }
        std::task::Poll::Pending
    })
    .await
}

/// Sends every body in `bodies` at once through `client` to an echo `method`, and checks that
/// each caller got back exactly its own body: with many calls in flight on one connection, a
/// response matched to the wrong call would show here.
pub async fn concurrent_echoes<C: Runtime>(
    client_rt: &C,
    client: &gorpc::Client,
    method: &'static str,
    bodies: impl IntoIterator<Item = bytes::Bytes>,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let calls: FuturesUnordered<_> = bodies
        .into_iter()
        .map(|body| async move {
            let rsp = client
                .call_raw(method, 0, body.clone(), gorpc::CallOptions::default())
                .await;
            (body, rsp)
        })
        .collect();
    let count = calls.len();
    let results: Vec<_> = within(
        client_rt,
        Duration::from_secs(60),
        "concurrent calls",
        calls.collect(),
    )
    .await;
    assert_eq!(results.len(), count);
    for (sent, got) in results {
        assert_eq!(
            got.expect("call succeeds").body,
            sent,
            "a response reached the wrong caller"
        );
    }
}

/// One `#[test]` per runtime pairing for each scenario named.
#[macro_export]
macro_rules! on_every_runtime {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::*;

                #[test]
                fn tokio() {
                    let rt = $crate::tokio_runtime();
                    let t = $crate::Tokio::from_handle(rt.handle().clone());
                    rt.block_on(super::$scenario(t.clone(), t));
                }

                #[test]
                fn smol() {
                    $crate::smol::block_on(super::$scenario($crate::Smol::new(), $crate::Smol::new()));
                }

                #[test]
                fn smol_on_async_std() {
                    let rt = $crate::async_std_runtime();
                    $crate::async_std::task::block_on(super::$scenario(rt.clone(), rt));
                }

                #[test]
                fn tokio_server_smol_client() {
                    let rt = $crate::tokio_runtime();
                    let t = $crate::Tokio::from_handle(rt.handle().clone());
                    $crate::smol::block_on(super::$scenario(t, $crate::Smol::new()));
                }

                #[test]
                fn smol_server_tokio_client() {
                    let rt = $crate::tokio_runtime();
                    let t = $crate::Tokio::from_handle(rt.handle().clone());
                    rt.block_on(super::$scenario($crate::Smol::new(), t));
                }
            }
        )*
    };
}

/// Raises this process's open-file limit to its hard limit (for the binaries that hold
/// thousands of connections) and returns the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // An unlimited hard limit still stops at the kernel's nr_open (2^20 by default).
        let wanted = limit.rlim_max.min(1 << 20);
        if limit.rlim_cur < wanted {
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = wanted;
            }
        }
    }
    Ok(limit.rlim_cur)
}
