//! `#[gorpc::service]` end to end: a trait served by its generated server and called through
//! its generated client and through raw msgpack calls, on every runtime pairing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gorpc::{Client, Code, NamedService, Router, Runtime, Server, Shutdown, Status};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Point {
    pub x: i64,
    pub y: i64,
}

/// Arithmetic over the wire.
#[gorpc::service]
pub trait Calculator {
    /// Counts the calls served so far (no argument).
    async fn calls(&self) -> Result<usize, Status>;

    /// One argument: sent as the value itself.
    async fn negate(&self, x: i64) -> Result<i64, Status>;

    /// Two arguments: sent as a tuple.
    async fn add(&self, a: i64, b: i64) -> Result<i64, Status>;

    /// A struct argument and result.
    async fn translate(&self, p: Point, by: Point) -> Result<Point, Status>;

    /// Always fails: `InvalidArgument` for a zero divisor.
    async fn divide(&self, a: i64, b: i64) -> Result<i64, Status>;

    /// A default body is allowed and runs on the server.
    async fn double(&self, x: i64) -> Result<i64, Status> {
        self.add(x, x).await
    }
}

#[derive(Default)]
struct Calc {
    calls: AtomicUsize,
}

impl Calc {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

impl Calculator for Calc {
    async fn calls(&self) -> Result<usize, Status> {
        Ok(self.calls.load(Ordering::SeqCst))
    }

    async fn negate(&self, x: i64) -> Result<i64, Status> {
        self.count();
        Ok(-x)
    }

    async fn add(&self, a: i64, b: i64) -> Result<i64, Status> {
        self.count();
        a.checked_add(b)
            .ok_or_else(|| Status::new(Code::OutOfRange, "overflow"))
    }

    async fn translate(&self, p: Point, by: Point) -> Result<Point, Status> {
        self.count();
        Ok(Point {
            x: p.x + by.x,
            y: p.y + by.y,
        })
    }

    async fn divide(&self, a: i64, b: i64) -> Result<i64, Status> {
        self.count();
        if b == 0 {
            return Err(Status::new(Code::InvalidArgument, "division by zero"));
        }
        Ok(a / b)
    }
}

/// The same shape under a package, through the smol adapter's re-export and `crate` option.
#[gorpc_smol::service(package = "demo.math", crate = "::gorpc_smol")]
trait Echo {
    async fn echo(&self, text: String) -> Result<String, gorpc_smol::Status>;
}

struct Echoer;

impl Echo for Echoer {
    async fn echo(&self, text: String) -> Result<String, Status> {
        Ok(text)
    }
}

async fn generated_client_calls_every_method<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let router = Router::new().add_service(CalculatorServer::new(Calc::default()));
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let calc = CalculatorClient::new(client.clone());

    within(
        &client_rt,
        Duration::from_secs(20),
        "calculator calls",
        async {
            assert_eq!(calc.calls().await.unwrap(), 0);
            assert_eq!(calc.negate(7).await.unwrap(), -7);
            assert_eq!(calc.add(2, 3).await.unwrap(), 5);
            assert_eq!(
                calc.translate(Point { x: 1, y: 2 }, Point { x: 10, y: 20 })
                    .await
                    .unwrap(),
                Point { x: 11, y: 22 }
            );
            assert_eq!(calc.double(21).await.unwrap(), 42);
            assert_eq!(calc.divide(9, 3).await.unwrap(), 3);

            let err = calc.divide(1, 0).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(err.message().contains("division by zero"), "{err}");
            let err = calc.add(i64::MAX, 1).await.unwrap_err();
            assert_eq!(err.code(), Code::OutOfRange, "{err}");

            // negate, add, translate, double's add, 2 divides, the overflowing add.
            assert_eq!(calc.calls().await.unwrap(), 7);
            // The generated client is a thin layer over the same `Client`.
            assert!(calc
                .clone()
                .inner()
                .call::<(), usize>("/Calculator/calls", &())
                .await
                .is_ok());
        },
    )
    .await;
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

async fn raw_calls_use_the_documented_wire_format<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let router = Router::new().add_service(CalculatorServer::new(Calc::default()));
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();

    within(&client_rt, Duration::from_secs(20), "raw calls", async {
        // Several arguments: a tuple in order.
        let sum = client
            .call::<(i64, i64), i64>("/Calculator/add", &(2, 3))
            .await
            .unwrap();
        assert_eq!(sum, 5);
        let moved = client
            .call::<(Point, Point), Point>(
                "/Calculator/translate",
                &(Point { x: 1, y: 1 }, Point { x: 2, y: 3 }),
            )
            .await
            .unwrap();
        assert_eq!(moved, Point { x: 3, y: 4 });
        // One argument: the value itself.
        let neg = client
            .call::<i64, i64>("/Calculator/negate", &5)
            .await
            .unwrap();
        assert_eq!(neg, -5);
        // No argument: unit.
        let calls = client
            .call::<(), usize>("/Calculator/calls", &())
            .await
            .unwrap();
        assert_eq!(calls, 3, "the raw calls reached the same methods");
        // An error status travels as the call's status.
        let err = client
            .call::<(i64, i64), i64>("/Calculator/divide", &(1, 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");

        // A body of the wrong shape is refused, and the method is not run.
        let err = client
            .call::<i64, i64>("/Calculator/add", &2)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        // Unknown methods of a hosted service are unimplemented.
        let err = client
            .call::<(), i64>("/Calculator/multiply", &())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err}");
        let err = client
            .call::<(i64, i64), i64>("/demo.Calculator/add", &(2, 3))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err}");
        let calls = client
            .call::<(), usize>("/Calculator/calls", &())
            .await
            .unwrap();
        assert_eq!(calls, 4, "only the divide ran among the failures");
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

async fn package_option_changes_the_path<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    assert_eq!(
        <EchoServer<Echoer> as NamedService>::METHODS,
        &["/demo.math.Echo/echo"]
    );
    // Hosted beside the calculator and a plain msgpack route.
    let router = Router::new()
        .add_service(EchoServer::new(Echoer))
        .add_service(CalculatorServer::new(Calc::default()))
        .msgpack("/plain/shout", |s: String| async move {
            Ok::<_, Status>(s.to_uppercase())
        });
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();

    within(&client_rt, Duration::from_secs(20), "echo calls", async {
        let echo = EchoClient::new(client.clone());
        assert_eq!(echo.echo("hi".into()).await.unwrap(), "hi");
        let raw: String = client
            .call("/demo.math.Echo/echo", &"raw".to_string())
            .await
            .unwrap();
        assert_eq!(raw, "raw");
        let err = client
            .call::<String, String>("/Echo/echo", &"x".to_string())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err}");
        let calc = CalculatorClient::new(client.clone());
        assert_eq!(calc.add(1, 1).await.unwrap(), 2);
        let shout: String = client
            .call("/plain/shout", &"hey".to_string())
            .await
            .unwrap();
        assert_eq!(shout, "HEY");
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

/// Handlers that never answer, to see whose deadline ends the call.
#[gorpc::service]
pub trait Stalled {
    /// Never returns.
    async fn wait(&self) -> Result<(), Status>;

    /// Sends one tick, then never ends.
    async fn ticks(&self, sink: gorpc::stream::ResponseSink<u32>) -> Result<(), Status>;
}

struct Staller;

impl Stalled for Staller {
    async fn wait(&self) -> Result<(), Status> {
        std::future::pending().await
    }

    async fn ticks(&self, mut sink: gorpc::stream::ResponseSink<u32>) -> Result<(), Status> {
        sink.send(&0).await?;
        std::future::pending().await
    }
}

/// `with_timeout` and `with_options` on a macro client set the deadline of each of its
/// calls, streams included, below the underlying client's default (20 s here).
async fn client_level_timeout_ends_slow_calls<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    use futures::StreamExt;
    let router = Router::new().add_service(StalledServer::new(Staller));
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let timed = StalledClient::new(client.clone()).with_timeout(Duration::from_millis(300));
    let options = gorpc::CallOptions {
        timeout: Some(Duration::from_millis(300)),
        ..gorpc::CallOptions::default()
    };
    let optioned = StalledClient::new(client).with_options(options);

    within(
        &client_rt,
        10 * SECOND,
        "calls to stalled handlers",
        async {
            for stalled in [&timed, &optioned] {
                let started = std::time::Instant::now();
                let err = stalled.wait().await.unwrap_err();
                assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
                let waited = started.elapsed();
                assert!(
                    waited >= Duration::from_millis(250),
                    "ended early: {waited:?}"
                );
                assert!(
                    waited < 5 * SECOND,
                    "the client's timeout ended it: {waited:?}"
                );

                let started = std::time::Instant::now();
                let mut ticks = stalled.ticks().await.unwrap();
                assert_eq!(ticks.next().await.unwrap().unwrap(), 0);
                let err = ticks.next().await.unwrap().unwrap_err();
                assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
                assert!(started.elapsed() < 5 * SECOND, "{:?}", started.elapsed());
            }
        },
    )
    .await;
    assert_eq!(server.shutdown(SECOND).await, Shutdown::Graceful);
}

on_every_runtime!(
    generated_client_calls_every_method,
    raw_calls_use_the_documented_wire_format,
    package_option_changes_the_path,
    client_level_timeout_ends_slow_calls,
);

#[test]
fn server_lists_its_methods_and_shares_one_instance() {
    assert_eq!(
        <CalculatorServer<Calc> as NamedService>::METHODS,
        &[
            "/Calculator/calls",
            "/Calculator/negate",
            "/Calculator/add",
            "/Calculator/translate",
            "/Calculator/divide",
            "/Calculator/double",
        ]
    );
    let shared = Arc::new(Calc::default());
    let server = CalculatorServer::from_arc(shared.clone());
    let copy = server.clone();
    assert!(format!("{copy:?}").contains("/Calculator/add"));
    assert_eq!(Arc::strong_count(&shared), 3);
}
