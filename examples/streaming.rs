//! A log tail over stream calls, server and client in one process on tokio:
//!
//! - `Follow` (server streaming): one request, then the log's lines as they are written;
//!   the stream ends after the number of lines asked for.
//! - `Append` (client streaming): the client sends lines, the server answers once with how
//!   many it appended.
//! - `Count` (bidirectional): the client asks for levels one at a time; each answer comes
//!   back on the same call as soon as it is asked, and the call ends with a trailer saying
//!   how many were asked.
//!
//! A writer appends lines every 100 ms while a follower tails them, so lines print as they
//! arrive. Then the example asks for counts and stops.
//!
//! cargo run -p gorpc-examples --example streaming

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gorpc_tokio::stream::{RequestStream, ResponseSink};
use gorpc_tokio::{CallOptions, MsgPack, Request, Response, Router, Status};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const FOLLOW: &str = "/logs.Tail/Follow";
const APPEND: &str = "/logs.Tail/Append";
const COUNT: &str = "/logs.Tail/Count";

#[derive(Serialize, Deserialize, Debug, Clone)]
struct LogLine {
    level: String,
    message: String,
}

/// Tail the log from line `from` on, and end after `lines` lines.
#[derive(Serialize, Deserialize, Debug)]
struct FollowRequest {
    from: usize,
    lines: usize,
}

#[derive(Serialize, Deserialize, Debug)]
struct Appended {
    lines: usize,
}

#[derive(Serialize, Deserialize, Debug)]
struct LevelCount {
    level: String,
    lines: usize,
}

/// The server's log: its lines, and a signal for followers waiting for the next one.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<LogLine>>,
    appended: Notify,
}

impl Log {
    fn append(&self, line: LogLine) {
        self.lines.lock().unwrap().push(line);
        self.appended.notify_waiters();
    }

    fn line(&self, index: usize) -> Option<LogLine> {
        self.lines.lock().unwrap().get(index).cloned()
    }

    fn count(&self, level: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines.iter().filter(|l| l.level == level).count()
    }
}

fn router(log: Arc<Log>) -> Router {
    let (follow_log, append_log) = (log.clone(), log.clone());
    Router::new()
        .server_stream(
            FOLLOW,
            MsgPack,
            move |req: Request<FollowRequest>, mut sink: ResponseSink<LogLine>| {
                let log = follow_log.clone();
                async move {
                    let FollowRequest { from, lines } = req.message;
                    for index in from..from + lines {
                        let line = loop {
                            // Made before looking, so an append in between still wakes it.
                            let appended = log.appended.notified();
                            match log.line(index) {
                                Some(line) => break line,
                                None => appended.await,
                            }
                        };
                        // Waits while the follower is behind: flow control, not a buffer.
                        sink.send(&line).await?;
                    }
                    Ok(())
                }
            },
        )
        .client_stream(
            APPEND,
            MsgPack,
            move |req: Request<RequestStream<LogLine>>| {
                let log = append_log.clone();
                async move {
                    let mut incoming = req.message;
                    let mut lines = 0;
                    while let Some(line) = incoming.next().await {
                        log.append(line?);
                        lines += 1;
                    }
                    Ok(Response::new(Appended { lines }))
                }
            },
        )
        .bidi(
            COUNT,
            MsgPack,
            move |req: Request<RequestStream<String>>, mut sink: ResponseSink<LevelCount>| {
                let log = log.clone();
                async move {
                    let mut levels = req.message;
                    let mut asked = 0;
                    while let Some(level) = levels.next().await {
                        let level = level?;
                        let lines = log.count(&level);
                        sink.send(&LevelCount { level, lines }).await?;
                        asked += 1;
                    }
                    // Metadata that ends the call, after the last answer.
                    let trailers = [("x-levels-asked", asked.to_string())];
                    sink.set_trailers(trailers.into_iter().collect());
                    Ok(())
                }
            },
        )
}

/// What the writer sends, one line every 100 ms.
fn lines_to_write() -> Vec<LogLine> {
    [
        ("INFO", "server started on 127.0.0.1"),
        ("INFO", "connected to the database"),
        ("WARN", "cache miss rate at 35%"),
        ("INFO", "GET /orders/42 200 3 ms"),
        ("ERROR", "payment provider timed out after 2 s"),
        ("INFO", "GET /orders/43 200 2 ms"),
    ]
    .into_iter()
    .map(|(level, message)| LogLine {
        level: level.into(),
        message: message.into(),
    })
    .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_examples::init_logging();
    let server =
        gorpc_tokio::serve("127.0.0.1:0".parse()?, router(Arc::new(Log::default()))).await?;
    println!("log server on {}", server.local_addr());
    let client = gorpc_tokio::connect(server.local_addr()).await?;
    let lines = lines_to_write();
    let started = Instant::now();

    // The follower: tails the log from the start, for as many lines as the writer sends.
    // The deadline covers the whole stream.
    let follow = FollowRequest {
        from: 0,
        lines: lines.len(),
    };
    let options = CallOptions {
        timeout: Some(Duration::from_secs(10)),
        ..CallOptions::default()
    };
    let mut tail = client
        .server_stream::<_, FollowRequest, LogLine>(FOLLOW, MsgPack, &follow, options)
        .await?;
    let follower = tokio::spawn(async move {
        while let Some(line) = tail.next().await {
            let line = line?;
            let at = started.elapsed().as_millis();
            println!("tail   +{at:>4} ms  {:<5} {}", line.level, line.message);
        }
        Ok::<_, Status>(())
    });

    // The writer: a client stream of lines, then the server's one answer.
    let mut append = client
        .client_stream::<_, LogLine, Appended>(APPEND, MsgPack, CallOptions::default())
        .await?;
    for line in &lines {
        tokio::time::sleep(Duration::from_millis(100)).await;
        append.send(line).await?;
    }
    let appended = append.finish().await?.message;
    println!("append: the server appended {} lines", appended.lines);
    follower.await??;
    println!("tail: the stream ended after {} lines", lines.len());

    // Counts by level, asked and answered one at a time on one bidirectional call.
    let counting = client
        .bidi::<_, String, LevelCount>(COUNT, MsgPack, CallOptions::default())
        .await?;
    let (mut ask, mut answers) = counting.into_parts();
    for level in ["INFO", "WARN", "ERROR", "DEBUG"] {
        ask.send(&level.to_owned()).await?;
        let count = answers
            .next()
            .await
            .ok_or_else(|| Status::internal("the count stream ended early"))??;
        println!("count: {:<5} {}", count.level, count.lines);
    }
    ask.close_send().await?;
    // After the half-close the server's stream ends with OK, and its trailers.
    if let Some(extra) = answers.next().await {
        return Err(format!("unexpected message after the half-close: {extra:?}").into());
    }
    let asked = answers.trailers().and_then(|t| t.get_str("x-levels-asked"));
    println!("count: the server answered {} levels", asked.unwrap_or("?"));

    println!(
        "server: {:?}",
        server.shutdown(Duration::from_secs(1)).await
    );
    Ok(())
}
