//! A server with the Prometheus recorder: `GET /metrics` counts calls by method and code,
//! with durations, in-flight calls and connections, beside `/healthz`; and a call that ends
//! at its deadline shows up in the interceptors, the logs and the metrics alike.
//!
//! The recorder and the log subscriber are the process's own, so this file holds one test.

#![cfg(feature = "prometheus")]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gorpc::observe::{CallEnd, EndedCall};
use gorpc::{
    CallOptions, Client, Code, Router, Server, ServerInterceptor, ServerReply, ServerRequest,
    Status,
};
use gorpc_plugins::prometheus::Prometheus;
use gorpc_tests::fault::{Fault, FaultProxy};
use gorpc_tests::raw_http::{raw_http, replies, Expect};
use gorpc_tests::{client_config, loopback, within, Tokio};

const OK: &str = "/metrics.Test/Ok";
const FAIL: &str = "/metrics.Test/Fail";
const HANG: &str = "/metrics.Test/Hang";
const WAIT: Duration = Duration::from_secs(20);

/// Where the log lines go: a buffer the test reads.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Ends(async_channel::Sender<CallEnd>);

impl ServerInterceptor for Ends {
    fn on_end(&self, call: &EndedCall<'_>) {
        let _ = self.0.try_send(call.end);
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes()
}

#[test]
fn metrics_logs_and_interceptors_see_every_end() {
    let lines = Lines::default();
    let writer = lines.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("gorpc=info")
        .init();
    let rt = gorpc_tests::tokio_runtime();
    let runtime = Tokio::from_handle(rt.handle().clone());
    rt.block_on(async move {
        let prometheus = Prometheus::install(&runtime).expect("the first recorder");
        let (ends_tx, ends) = async_channel::unbounded();
        let (started_tx, started) = async_channel::unbounded();
        let router = Router::new()
            .route(OK, |req: ServerRequest| async move { ServerReply::ok(req.body) })
            .route(FAIL, |_| async {
                ServerReply::error(Status::new(Code::NotFound, "nothing here"))
            })
            .route(HANG, move |_| {
                let _ = started_tx.try_send(());
                std::future::pending()
            });
        let server = prometheus
            .serve_on(Server::new(runtime.clone(), router).interceptor(Ends(ends_tx)))
            .bind(loopback())
            .await
            .unwrap();
        let addr = server.local_addr();
        let proxy = FaultProxy::start(addr).unwrap();
        let client = Client::lazy(runtime.clone(), proxy.addr(), client_config());

        for _ in 0..3 {
            client
                .call_raw(OK, 0, Bytes::from_static(b"12345"), CallOptions::default())
                .await
                .unwrap();
        }
        let error = client
            .call_raw(FAIL, 0, Bytes::new(), CallOptions::default())
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::NotFound);
        // Held in a blackhole, the client's cancel cannot beat the server's deadline.
        let options = CallOptions {
            timeout: Some(Duration::from_millis(200)),
            ..CallOptions::default()
        };
        let call = client.call_raw(HANG, 0, Bytes::new(), options);
        let blackhole = async {
            within(&runtime, WAIT, "the handler", started.recv()).await.unwrap();
            proxy.set(Fault::Blackhole);
        };
        let (outcome, ()) = futures::join!(call, blackhole);
        assert_eq!(outcome.unwrap_err().code(), Code::DeadlineExceeded);

        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(within(&runtime, WAIT, "an end", ends.recv()).await.unwrap());
        }
        assert_eq!(
            seen,
            [
                CallEnd::Answered(Code::Ok),
                CallEnd::Answered(Code::Ok),
                CallEnd::Answered(Code::Ok),
                CallEnd::Answered(Code::NotFound),
                CallEnd::DeadlineExceeded,
            ]
        );

        let exchange = raw_http(addr, get("/metrics"), Expect { replies: replies(1), check_close: false });
        let (answers, _) = within(&runtime, WAIT, "GET /metrics", exchange).await.unwrap().unwrap();
        let scrape = &answers[0];
        assert_eq!(scrape.status, 200);
        assert!(scrape.header("content-type").unwrap().starts_with("text/plain"));
        let text = String::from_utf8(scrape.body.clone()).unwrap();
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in the exposition:\n{text}"
            )
        };
        has(r#"gorpc_server_calls_total{method="/metrics.Test/Ok",code="OK"} 3"#);
        has(r#"gorpc_server_calls_total{method="/metrics.Test/Fail",code="NOT_FOUND"} 1"#);
        has(r#"gorpc_server_calls_total{method="/metrics.Test/Hang",code="DEADLINE_EXCEEDED"} 1"#);
        has(r#"gorpc_server_call_duration_seconds_count{method="/metrics.Test/Ok",code="OK"} 3"#);
        has(r#"gorpc_server_call_duration_seconds_bucket{method="/metrics.Test/Ok",code="OK",le="+Inf"} 3"#);
        has(r#"gorpc_server_calls_in_flight{method="/metrics.Test/Hang"} 0"#);
        has(r#"gorpc_server_request_bytes_total{method="/metrics.Test/Ok"} 15"#);
        has(r#"gorpc_server_response_bytes_total{method="/metrics.Test/Ok"} 15"#);
        assert!(text.contains("# TYPE gorpc_server_call_duration_seconds histogram"));
        assert!(text.contains("# HELP gorpc_server_calls_total"));
        // The client's connection (through the proxy) is open; so is this scrape's.
        let connections = text
            .lines()
            .find_map(|l| l.strip_prefix("gorpc_server_connections "))
            .expect("a connections gauge");
        assert!(connections.parse::<f64>().unwrap() >= 1.0, "{connections}");
        // The client's side, recorded in this same process.
        has(r#"gorpc_client_calls_total{method="/metrics.Test/Ok",code="OK"} 3"#);
        has(r#"gorpc_client_call_duration_seconds_count{method="/metrics.Test/Ok",code="OK"} 3"#);
        let client_connections = text
            .lines()
            .find_map(|l| l.strip_prefix("gorpc_client_connections "))
            .expect("a client connections gauge");
        assert!(client_connections.parse::<f64>().unwrap() >= 1.0, "{client_connections}");

        let exchange = raw_http(addr, get("/healthz"), Expect { replies: replies(1), check_close: false });
        let (answers, _) = within(&runtime, WAIT, "GET /healthz", exchange).await.unwrap().unwrap();
        assert_eq!(answers[0].status, 200);

        // The log: the failed calls at WARN, inside spans naming method, peer and id.
        let log = lines.text();
        let deadline = log
            .lines()
            .find(|l| l.contains("deadline exceeded") && l.contains(HANG))
            .unwrap_or_else(|| panic!("no line for the deadline in:\n{log}"));
        assert!(deadline.contains("WARN"), "{deadline}");
        assert!(deadline.contains("peer=127.0.0.1:"), "{deadline}");
        assert!(deadline.contains("code=DEADLINE_EXCEEDED"), "{deadline}");
        // Both sides log it, each in its own span naming the peer (the client's names the
        // connection its pool picked: the proxy's address).
        let both: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("deadline exceeded") && l.contains(HANG))
            .collect();
        assert_eq!(both.len(), 2, "{log}");
        assert!(both.iter().all(|l| l.contains("peer=127.0.0.1:")), "{log}");
        let failed = log
            .lines()
            .find(|l| l.contains(FAIL))
            .unwrap_or_else(|| panic!("no line for the failed call in:\n{log}"));
        assert!(failed.contains("WARN") && failed.contains("nothing here"), "{failed}");
        // Successes are logged at DEBUG only (this filter is INFO).
        assert!(!log.lines().any(|l| l.contains(OK)), "{log}");

        drop((client, proxy));
        server.shutdown(Duration::from_secs(5)).await;
    });
}
