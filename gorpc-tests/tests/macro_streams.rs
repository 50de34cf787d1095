//! `#[gorpc::service]` stream methods end to end: a trait with one method of each kind,
//! served by its generated server and called through its generated client (and once by
//! path, to pin the wire format), on every runtime pairing.

use std::sync::Mutex;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use gorpc::proto::StreamKind;
use gorpc::stream::{RequestStream, ResponseSink};
use gorpc::{
    CallOptions, Client, Code, Metadata, MsgPack, NamedService, Next, Router, Runtime, Server,
    ServerReply, ServerRequest, Service, Status,
};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Line {
    pub number: usize,
    pub text: String,
}

/// A log that clients append to and read back.
#[gorpc::service(package = "test")]
pub trait Log {
    /// Unary, beside the streams.
    async fn line_count(&self) -> Result<usize, Status>;

    /// Server streaming, with two request arguments: `limit` lines from line `from`; a
    /// `from` past the end is `OutOfRange` after nothing.
    async fn tail(&self, from: usize, limit: usize, sink: ResponseSink<Line>)
        -> Result<(), Status>;

    /// Client streaming: appends every line sent, answers how many the log holds.
    async fn append(&self, lines: RequestStream<String>) -> Result<usize, Status>;

    /// Bidirectional, the sink declared first: for each pattern, the numbers of the lines
    /// that contain it.
    async fn matches(
        &self,
        found: ResponseSink<Vec<usize>>,
        patterns: RequestStream<String>,
    ) -> Result<(), Status>;
}

#[derive(Default)]
struct MemoryLog {
    lines: Mutex<Vec<String>>,
}

impl Log for MemoryLog {
    async fn line_count(&self) -> Result<usize, Status> {
        Ok(self.lines.lock().unwrap().len())
    }

    async fn tail(
        &self,
        from: usize,
        limit: usize,
        mut sink: ResponseSink<Line>,
    ) -> Result<(), Status> {
        let lines: Vec<Line> = {
            let all = self.lines.lock().unwrap();
            if from > all.len() {
                return Err(Status::new(Code::OutOfRange, "past the end of the log"));
            }
            all.iter()
                .enumerate()
                .skip(from)
                .take(limit)
                .map(|(number, text)| Line {
                    number,
                    text: text.clone(),
                })
                .collect()
        };
        for line in &lines {
            sink.send(line).await?;
        }
        Ok(())
    }

    async fn append(&self, mut lines: RequestStream<String>) -> Result<usize, Status> {
        while let Some(line) = lines.next().await {
            self.lines.lock().unwrap().push(line?);
        }
        Ok(self.lines.lock().unwrap().len())
    }

    async fn matches(
        &self,
        mut found: ResponseSink<Vec<usize>>,
        mut patterns: RequestStream<String>,
    ) -> Result<(), Status> {
        while let Some(pattern) = patterns.next().await {
            let pattern = pattern?;
            let numbers = matching(&self.lines.lock().unwrap(), &pattern);
            found.send(&numbers).await?;
        }
        Ok(())
    }
}

fn matching(lines: &[String], pattern: &str) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, line)| line.contains(pattern))
        .map(|(number, _)| number)
        .collect()
}

fn line_text(i: usize) -> String {
    format!("entry {i}")
}

/// Lines appended: more bytes than a stream's 64 KiB window.
const LINES: usize = 6_000;

#[test]
fn stream_methods_report_their_kinds() {
    let server = LogServer::new(MemoryLog::default());
    assert_eq!(
        <LogServer<MemoryLog>>::METHODS,
        &[
            "/test.Log/line_count",
            "/test.Log/tail",
            "/test.Log/append",
            "/test.Log/matches"
        ]
    );
    assert_eq!(server.stream_kind("/test.Log/line_count"), None);
    assert_eq!(
        server.stream_kind("/test.Log/tail"),
        Some(StreamKind::ServerStreaming)
    );
    assert_eq!(
        server.stream_kind("/test.Log/append"),
        Some(StreamKind::ClientStreaming)
    );
    assert_eq!(
        server.stream_kind("/test.Log/matches"),
        Some(StreamKind::Bidirectional)
    );
    assert_eq!(server.stream_kind("/test.Log/nope"), None);
}

async fn macro_stream_methods<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let router = Router::new().add_service(LogServer::new(MemoryLog::default()));
    let server = Server::new(server_rt, router)
        .bind(loopback())
        .await
        .unwrap();
    let raw = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let client = LogClient::new(raw.clone());

    within(&client_rt, Duration::from_secs(60), "log service", async {
        // Client streaming.
        let mut append = client.append().await.unwrap();
        for i in 0..LINES {
            append.send(&line_text(i)).await.unwrap();
        }
        assert_eq!(append.finish().await.unwrap().message, LINES);
        assert_eq!(client.line_count().await.unwrap(), LINES);

        // Server streaming, in order, past the window.
        let lines: Vec<Line> = client
            .tail(10, LINES)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(lines.len(), LINES - 10);
        for (k, line) in lines.iter().enumerate() {
            assert_eq!(line.number, 10 + k);
            assert_eq!(line.text, line_text(10 + k));
        }
        let mut past_end = client.tail(LINES + 1, 5).await.unwrap();
        let status = past_end.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status}");
        assert!(past_end.next().await.is_none());

        // Bidirectional, in lockstep.
        let gorpc::client::Bidi {
            sender: mut patterns,
            responses: mut found,
        } = client.matches().await.unwrap();
        let all: Vec<String> = (0..LINES).map(line_text).collect();
        for pattern in ["entry 59", "entry 1234", "no such entry", "7"] {
            patterns.send(&pattern.to_owned()).await.unwrap();
            let numbers = found.next().await.unwrap().unwrap();
            assert_eq!(numbers, matching(&all, pattern), "{pattern}");
        }
        patterns.close_send().await.unwrap();
        assert!(found.next().await.is_none(), "ends OK after the client");

        // The wire format: the request of a server stream is the tuple of its plain
        // arguments, each response one msgpack value.
        let request = (LINES - 2, 10usize);
        let by_path: Vec<Line> = raw
            .server_stream("/test.Log/tail", MsgPack, &request, CallOptions::default())
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(
            by_path.iter().map(|l| l.number).collect::<Vec<_>>(),
            [LINES - 2, LINES - 1]
        );
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

on_every_runtime!(macro_stream_methods);

/// Only calls that carry a `tenant` get through.
fn tenant_required(request: ServerRequest, next: Next) -> gorpc::BoxFuture<'static, ServerReply> {
    if request.metadata_value("tenant").is_some() {
        next.run(request)
    } else {
        let status = Status::new(Code::Unauthenticated, "no tenant");
        futures::future::ready(ServerReply::error(status)).boxed()
    }
}

/// `with_options` puts its metadata on every kind of call, and its timeout is the deadline
/// of a whole stream.
async fn macro_client_options<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = Server::new(
        server_rt,
        Router::new().add_service(LogServer::new(MemoryLog::default())),
    )
    .interceptor(tenant_required)
    .bind(loopback())
    .await
    .unwrap();
    let raw = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    let mut metadata = Metadata::new();
    metadata.insert("tenant", "a");
    let options = CallOptions {
        timeout: Some(Duration::from_millis(300)),
        metadata,
        key: None,
    };
    let plain = LogClient::new(raw.clone());
    let client = LogClient::new(raw).with_options(options);

    within(
        &client_rt,
        Duration::from_secs(30),
        "client options",
        async {
            let refused = plain.line_count().await.unwrap_err();
            assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
            let refused = plain.tail(0, 1).await.unwrap().next().await.unwrap();
            assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);

            let mut append = client.append().await.unwrap();
            append.send(&line_text(0)).await.unwrap();
            assert_eq!(append.finish().await.unwrap().message, 1);
            assert_eq!(client.line_count().await.unwrap(), 1);
            let tail: Vec<_> = client.tail(0, 5).await.unwrap().collect().await;
            assert_eq!(tail.len(), 1);
            assert_eq!(tail[0].as_ref().unwrap().text, line_text(0));

            // A bidirectional call the client never sends on: the server waits for patterns
            // until the 300 ms deadline ends the stream on both sides.
            let mut call = client.matches().await.unwrap();
            let found = &mut call.responses;
            let status = found.next().await.unwrap().unwrap_err();
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
        },
    )
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

on_every_runtime!(macro_client_options);
