//! The HTTP/1.1 edge against hand-made requests, over raw TCP, on every runtime pairing:
//! smuggling forms, methods other than POST, Host, a head sent a byte at a time, the
//! server-wide cap on request bodies, health and GET endpoints, the Authorization header,
//! stream methods, and the malformed framings that were always refused. The HTTP client
//! against a server that answers chunked, by host name.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use gorpc::http::{HttpConfig, HttpTarget, Response};
use gorpc::{
    CallOptions, Client, Code, Limits, Raw, Router, Runtime, Server, ServerConfig, ServerHandle,
    ServerReply, ServerRequest, Status,
};
use gorpc_tests::raw_http::{self, post, post_chunked, Expect, HttpReply};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};

/// What the test server's handlers report.
#[derive(Default)]
struct Seen {
    /// Calls of [`SMUGGLED`]: none may come through a smuggled request.
    smuggled: AtomicUsize,
}

const SMUGGLED: &str = "/test.Smuggled/Hit";
const ADD: &str = "/test.Calc/add";
const HOLD: &str = "/test.Hold/Stall";
const AUTH: &str = "/test.Meta/Authorization";
const COUNT: &str = "/test.Stream/Count";

struct TestServer<R: Runtime> {
    handle: ServerHandle<R>,
    seen: Arc<Seen>,
    /// A [`HOLD`] call started.
    held: mpsc::UnboundedReceiver<()>,
}

impl<R: Runtime> TestServer<R> {
    fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }
}

async fn start<R: Runtime>(runtime: &R, config: ServerConfig) -> TestServer<R> {
    let seen = Arc::new(Seen::default());
    let (held_tx, held) = mpsc::unbounded();
    let counted = seen.clone();
    let router = Router::new()
        .msgpack(
            ADD,
            |(a, b): (i64, i64)| async move { Ok::<_, Status>(a + b) },
        )
        .route(SMUGGLED, move |_: ServerRequest| {
            counted.smuggled.fetch_add(1, Ordering::SeqCst);
            async { ServerReply::ok(Bytes::from_static(b"smuggled")) }
        })
        .route(HOLD, move |_: ServerRequest| {
            let _ = held_tx.unbounded_send(());
            async {
                std::future::pending::<()>().await;
                ServerReply::ok(Bytes::new())
            }
        })
        .route(AUTH, |request: ServerRequest| {
            let value = request.metadata_value("authorization").unwrap_or_default();
            let body = Bytes::copy_from_slice(value);
            async move { ServerReply::ok(body) }
        })
        .server_stream(
            COUNT,
            Raw,
            |_, mut sink: gorpc::stream::ResponseSink<Bytes>| async move {
                sink.send(&Bytes::from_static(b"1")).await?;
                Ok(())
            },
        );
    let handle = Server::new(runtime.clone(), router)
        .config(config)
        .get("/version", |_request| async {
            Response::new(Bytes::from_static(b"1.2.3\n"))
        })
        .bind(loopback())
        .await
        .unwrap();
    TestServer { handle, seen, held }
}

/// Writes `request` on a new connection and reads what `expect` says.
async fn exchange<C: Runtime>(
    client_rt: &C,
    addr: SocketAddr,
    request: impl Into<Vec<u8>>,
    expect: Expect,
) -> (Vec<HttpReply>, bool) {
    within(
        client_rt,
        20 * SECOND,
        "raw HTTP exchange",
        raw_http::raw_http(addr, request.into(), expect),
    )
    .await
    .unwrap()
    .expect("HTTP exchange")
}

const ONE_THEN_CLOSE: Expect = Expect {
    replies: raw_http::replies(1),
    check_close: true,
};

const ONE: Expect = Expect {
    replies: raw_http::replies(1),
    check_close: false,
};

fn refused(reply: &HttpReply, http: u16, code: Code, message: &str) {
    assert_eq!(reply.status, http, "{reply:?}");
    assert_eq!(reply.gorpc_status(), code as u32, "{reply:?}");
    assert!(reply.gorpc_message().contains(message), "{reply:?}");
}

/// A request for [`SMUGGLED`] with no body: what a smuggler hides in another request.
fn smuggled_request() -> String {
    format!(
        "POST {SMUGGLED} HTTP/1.1\r\nhost: test\r\ncontent-type: application/octet-stream\r\n\
         content-length: 0\r\n\r\n"
    )
}

/// A chunk extension with a bare LF, and a trailer line with a bare LF that would make the
/// next request's head a trailer and its body a request: each refused with 400 and the
/// connection closed, and nothing smuggled reaches a handler.
async fn smuggling_forms_are_refused<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let addr = server.addr();

    let mut extension = post_chunked(
        ADD,
        "application/json",
        "1;a\nX\r\n[\r\n4\r\n1,2]\r\n0\r\n\r\n",
    );
    extension.extend(smuggled_request().into_bytes());
    let (replies, closed) = exchange(&client_rt, addr, extension, ONE_THEN_CLOSE).await;
    refused(
        &replies[0],
        400,
        Code::InvalidArgument,
        "malformed request body",
    );
    assert!(closed);

    // A front end ending lines at LF sees one request with a trailer, then a second one
    // whose body is the smuggled request.
    let hidden = smuggled_request();
    let mut trailer = post_chunked(ADD, "application/json", "5\r\n[1,2]\r\n0\r\nx: 1\n\r\n");
    trailer.extend(
        format!(
            "POST {ADD} HTTP/1.1\r\nhost: test\r\ncontent-type: application/octet-stream\r\n\
             content-length: {}\r\n\r\n{hidden}",
            hidden.len()
        )
        .into_bytes(),
    );
    let (replies, closed) = exchange(&client_rt, addr, trailer, ONE_THEN_CLOSE).await;
    refused(&replies[0], 400, Code::InvalidArgument, "trailer fields");
    assert!(closed);

    // Both framings at once: the body is framed as chunked (RFC 9112 6.3) and the
    // connection closes after the answer, so bytes the Content-Length would frame never
    // become a request.
    let mut both = format!(
        "POST {ADD} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\n[1,2]\r\n0\r\n\r\n"
    )
    .into_bytes();
    both.extend(smuggled_request().into_bytes());
    let (replies, closed) = exchange(&client_rt, addr, both, ONE_THEN_CLOSE).await;
    assert_eq!(replies[0].status, 200, "{:?}", replies[0]);
    assert_eq!(replies[0].json(), serde_json::json!(3));
    assert!(
        closed,
        "a request with both framings is its connection's last"
    );

    assert_eq!(server.seen.smuggled.load(Ordering::SeqCst), 0);
    server.handle.abort().await;
}

/// Only POST calls methods: other HTTP methods get 405 with `Allow`, and an answer to HEAD
/// has no body (the next answer on the connection follows the head at once).
async fn other_methods_get_405_with_allow<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let mut requests = format!("HEAD {ADD} HTTP/1.1\r\nhost: test\r\n\r\n").into_bytes();
    requests.extend(format!("GET {ADD} HTTP/1.1\r\nhost: test\r\n\r\n").into_bytes());
    requests.extend(format!("DELETE {ADD} HTTP/1.1\r\nhost: test\r\n\r\n").into_bytes());
    requests.extend(post(ADD, "application/json", "", b"[2,2]"));
    let expect = Expect {
        replies: &[true, false, false, false],
        check_close: false,
    };
    let (replies, _) = exchange(&client_rt, server.addr(), requests, expect).await;
    for reply in &replies[..3] {
        refused(reply, 405, Code::Unimplemented, "call methods with POST");
        assert_eq!(reply.header("allow"), Some("POST"));
    }
    assert!(replies[0].body.is_empty());
    assert_eq!(
        replies[3].json(),
        serde_json::json!(4),
        "the connection goes on"
    );
    server.handle.abort().await;
}

/// An HTTP/1.1 request without Host, or with two, gets 400 and the connection closes.
async fn host_is_required<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let no_host = format!(
        "POST {ADD} HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n[1,1]"
    );
    let (replies, closed) = exchange(&client_rt, server.addr(), no_host, ONE_THEN_CLOSE).await;
    refused(
        &replies[0],
        400,
        Code::InvalidArgument,
        "needs a Host header",
    );
    assert!(closed);
    let two = post(ADD, "application/json", "host: other\r\n", b"[1,1]");
    let (replies, closed) = exchange(&client_rt, server.addr(), two, ONE_THEN_CLOSE).await;
    refused(
        &replies[0],
        400,
        Code::InvalidArgument,
        "more than one Host",
    );
    assert!(closed);
    // HTTP/1.0 has no Host requirement.
    let old = format!(
        "POST {ADD} HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n[1,1]"
    );
    let (replies, _) = exchange(&client_rt, server.addr(), old, ONE).await;
    assert_eq!(replies[0].json(), serde_json::json!(2));
    server.handle.abort().await;
}

/// A head sent one byte at a time, each in time to restart any idle timer, is cut off at
/// the head deadline.
async fn a_dripped_head_is_cut_off_at_its_deadline<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let head_timeout = Duration::from_millis(400);
    let config = ServerConfig {
        http: HttpConfig {
            head_timeout,
            ..HttpConfig::default()
        },
        ..ServerConfig::default()
    };
    let server = start(&server_rt, config).await;
    let addr = server.addr();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<(Duration, usize)> {
            let mut stream = TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_millis(50)))?;
            let head = format!(
                "POST {ADD} HTTP/1.1\r\nhost: test\r\nx-drip: {}",
                "a".repeat(400)
            );
            let started = Instant::now();
            // Far longer than the deadline: 400 bytes, one every 50 ms, 20 s in all.
            for (sent, byte) in head.bytes().enumerate() {
                if stream.write_all(&[byte]).is_err() {
                    return Ok((started.elapsed(), sent));
                }
                let mut buf = [0; 512];
                match stream.read(&mut buf) {
                    Ok(0) => return Ok((started.elapsed(), sent)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return Ok((started.elapsed(), sent))
                    }
                    // An answer (408) before the close is fine; the close decides.
                    Ok(_) | Err(_) => {}
                }
            }
            Ok((started.elapsed(), head.len()))
        })();
        let _ = tx.send(result);
    });
    let (elapsed, sent) = within(&client_rt, 30 * SECOND, "dripped head", rx)
        .await
        .unwrap()
        .unwrap();
    assert!(sent < 400, "the whole head was accepted over {elapsed:?}");
    assert!(elapsed >= head_timeout, "closed after {elapsed:?}");
    // Bounded well below the 20 s the drip would take, however slow the machine.
    assert!(elapsed < 15 * SECOND, "closed only after {elapsed:?}");
    server.handle.abort().await;
}

/// Request bodies held across all connections are capped: one over the cap gets 503, and
/// the budget comes back when the call that held it ends.
async fn request_bodies_held_are_capped_server_wide<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let config = ServerConfig {
        http: HttpConfig {
            max_body_bytes_held: 64 * 1024,
            ..HttpConfig::default()
        },
        ..ServerConfig::default()
    };
    let mut server = start(&server_rt, config).await;
    let addr = server.addr();
    let body = vec![b'x'; 40 * 1024];
    // The first call holds its 40 KiB while its handler runs (it never answers).
    let holding = TcpStream::connect(addr).unwrap();
    (&holding)
        .write_all(&post(HOLD, "application/octet-stream", "", &body))
        .unwrap();
    within(
        &client_rt,
        10 * SECOND,
        "the holding call starts",
        server.held.next(),
    )
    .await
    .unwrap();
    let second = post(ADD, "application/octet-stream", "", &body);
    let (replies, closed) = exchange(&client_rt, addr, second.clone(), ONE_THEN_CLOSE).await;
    refused(
        &replies[0],
        503,
        Code::Unavailable,
        "too many request bodies",
    );
    assert!(closed);
    let small = post(ADD, "application/json", "", b"[1,1]");
    let (replies, _) = exchange(&client_rt, addr, small, ONE).await;
    assert_eq!(
        replies[0].json(),
        serde_json::json!(2),
        "a body within the cap"
    );

    // The holding client leaves: its handler is dropped and its bytes go back.
    drop(holding);
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let request = post(SMUGGLED, "application/octet-stream", "", &body);
        let (replies, _) = exchange(&client_rt, addr, request, ONE).await;
        if replies[0].status == 200 {
            break;
        }
        assert_eq!(replies[0].status, 503, "{:?}", replies[0]);
        assert!(Instant::now() < deadline, "the held bytes never came back");
        gorpc_tests::sleep(&client_rt, Duration::from_millis(20)).await;
    }
    server.handle.abort().await;
}

/// `GET /healthz` says whether the server serves; mounted GET endpoints answer beside the
/// RPC routes, HEAD without a body; other methods on them get 405.
async fn health_and_get_endpoints<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let addr = server.addr();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    let mut requests = get("/healthz");
    requests.push_str(&get("/version"));
    requests.push_str("HEAD /version HTTP/1.1\r\nhost: test\r\n\r\n");
    requests.push_str(&get("/version?verbose=1"));
    requests.push_str("POST /healthz HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n");
    let expect = Expect {
        replies: &[false, false, true, false, false],
        check_close: false,
    };
    let (replies, _) = exchange(&client_rt, addr, requests, expect).await;
    assert_eq!(replies[0].status, 200);
    assert_eq!(replies[0].body, b"serving\n");
    assert_eq!(replies[1].body, b"1.2.3\n");
    assert_eq!(replies[2].status, 200);
    assert_eq!(
        replies[3].body, b"1.2.3\n",
        "the query is not part of the path"
    );
    refused(&replies[4], 405, Code::Unimplemented, "GET and HEAD");
    assert_eq!(replies[4].header("allow"), Some("GET, HEAD"));

    server.handle.set_serving(false);
    let (replies, _) = exchange(&client_rt, addr, get("/healthz"), ONE).await;
    assert_eq!(replies[0].status, 503);
    assert_eq!(replies[0].body, b"not serving\n");
    server.handle.set_serving(true);
    let (replies, _) = exchange(&client_rt, addr, get("/healthz"), ONE).await;
    assert_eq!(replies[0].status, 200);
    server.handle.abort().await;
}

/// `Authorization` reaches handlers as `authorization` metadata; a stream method called
/// over HTTP/1.1 gets 501 UNIMPLEMENTED saying why.
async fn authorization_and_stream_methods<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let mut requests = post(
        AUTH,
        "application/octet-stream",
        "authorization: Bearer s3cret\r\n",
        b"",
    );
    requests.extend(post(COUNT, "application/octet-stream", "", b""));
    requests.extend(post(ADD, "application/json", "", b"[3,3]"));
    let (replies, _) = exchange(
        &client_rt,
        server.addr(),
        requests,
        Expect {
            replies: raw_http::replies(3),
            check_close: false,
        },
    )
    .await;
    assert_eq!(replies[0].body, b"Bearer s3cret");
    refused(&replies[1], 501, Code::Unimplemented, "server-streaming");
    assert!(
        replies[1].gorpc_message().contains("gRPC"),
        "{:?}",
        replies[1]
    );
    assert_eq!(
        replies[2].json(),
        serde_json::json!(6),
        "the connection goes on"
    );
    server.handle.abort().await;
}

/// Framings refused before, and still: each gets a 4xx and, where the framing is lost,
/// the connection closes.
async fn malformed_framings_are_refused<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let addr = server.addr();
    let json = "application/json";
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "two different Content-Lengths",
            post(ADD, json, "content-length: 7\r\n", b"[1,1]"),
            400,
        ),
        (
            "a signed chunk size",
            post_chunked(ADD, json, "-5\r\n[1,1]\r\n0\r\n\r\n"),
            400,
        ),
        (
            "a 0x chunk size",
            post_chunked(ADD, json, "0x5\r\n[1,1]\r\n0\r\n\r\n"),
            400,
        ),
        (
            "an overflowing chunk size",
            post_chunked(ADD, json, "fffffffffffffffffffff\r\n[1,1]\r\n0\r\n\r\n"),
            400,
        ),
        (
            "an obs-folded header",
            post(ADD, json, "x-folded: a\r\n  b\r\n", b"[1,1]"),
            400,
        ),
        (
            "a NUL in a value",
            post(ADD, json, "x-bad: a\0b\r\n", b"[1,1]"),
            400,
        ),
        (
            "a CR in a value",
            post(ADD, json, "x-bad: a\rb\r\n", b"[1,1]"),
            400,
        ),
        (
            "10,000 headers",
            post(ADD, json, &"x-many: 1\r\n".repeat(10_000), b"[1,1]"),
            431,
        ),
        (
            "a 1 MB header line",
            post(
                ADD,
                json,
                &format!("x-long: {}\r\n", "a".repeat(1 << 20)),
                b"[1,1]",
            ),
            431,
        ),
        (
            "a 100 MB declared length",
            format!(
                "POST {ADD} HTTP/1.1\r\nhost: test\r\ncontent-type: {json}\r\n\
                 content-length: 100000000\r\n\r\n[1,1]"
            )
            .into_bytes(),
            413,
        ),
    ];
    for (what, request, http) in cases {
        let (replies, closed) = exchange(&client_rt, addr, request, ONE_THEN_CLOSE).await;
        assert_eq!(replies[0].status, http, "{what}: {:?}", replies[0]);
        assert!(closed, "{what}: the connection closes");
    }
    // A timeout header that is not whole milliseconds: 400, and the connection goes on.
    let mut requests = post(ADD, json, "x-gorpc-timeout-ms: 1.5\r\n", b"[1,1]");
    requests.extend(post(ADD, json, "", b"[1,1]"));
    let (replies, _) = exchange(
        &client_rt,
        addr,
        requests,
        Expect {
            replies: raw_http::replies(2),
            check_close: false,
        },
    )
    .await;
    refused(
        &replies[0],
        400,
        Code::InvalidArgument,
        "whole number of milliseconds",
    );
    assert_eq!(replies[1].json(), serde_json::json!(2));
    server.handle.abort().await;
}

/// 10,000 requests pipelined on one connection are all answered, in order.
async fn ten_thousand_pipelined_requests<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let server = start(&server_rt, ServerConfig::default()).await;
    let addr = server.addr();
    const N: usize = 10_000;
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<usize> {
            let stream = TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut writer = stream.try_clone()?;
            let sending = std::thread::spawn(move || {
                for i in 0..N {
                    let body = format!("[{i},1]");
                    writer.write_all(&post(ADD, "application/json", "", body.as_bytes()))?;
                }
                Ok::<_, std::io::Error>(())
            });
            let mut reader = BufReader::new(stream);
            for i in 0..N {
                let reply = raw_http::read_reply(&mut reader, false)?;
                assert_eq!(reply.json(), serde_json::json!(i + 1), "answer {i}");
            }
            sending.join().unwrap()?;
            Ok(N)
        })();
        let _ = tx.send(result);
    });
    let answered = within(&client_rt, 120 * SECOND, "pipelined requests", rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answered, N);
    server.handle.abort().await;
}

/// A server of our own that answers one call chunked, recording the request's head.
fn chunked_answer_server() -> (SocketAddr, oneshot::Receiver<String>) {
    let listener = TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
            let end = line == "\r\n";
            head.push_str(&line);
            if end {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                      x-gorpc-status: 0\r\ntransfer-encoding: chunked\r\n\r\n\
                      5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        let _ = (&stream).write_all(answer.as_bytes());
        let _ = tx.send(head);
    });
    (addr, rx)
}

/// The HTTP client reads chunked answers, and dials host names, naming them in `Host`.
async fn the_client_reads_chunked_answers_from_host_names<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let _ = server_rt;
    let (addr, head) = chunked_answer_server();
    let target = HttpTarget::host("localhost", addr.port());
    let client = Client::http(client_rt.clone(), target, client_config());
    let call = client.call_raw(ADD, 0, Bytes::from_static(b"x"), CallOptions::default());
    let answer = within(&client_rt, 10 * SECOND, "chunked answer", call)
        .await
        .unwrap();
    assert_eq!(answer.body, Bytes::from_static(b"hello, world"));
    let head = within(&client_rt, 10 * SECOND, "request head", head)
        .await
        .unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: localhost:{}\r\n", addr.port())),
        "{head}"
    );

    let unknown = Client::http(
        client_rt.clone(),
        HttpTarget::host("no-such-host.invalid", 80),
        client_config(),
    );
    let call = unknown.call_raw(ADD, 0, Bytes::new(), CallOptions::default());
    let status = within(&client_rt, 30 * SECOND, "unknown host", call)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(
        status.message().contains("no-such-host.invalid"),
        "{status}"
    );
}

/// A server whose frame limit is small refuses a body over it at once: its declared length,
/// or its chunks once they pass it.
async fn bodies_over_the_limit_get_413<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let mut config = ServerConfig::default();
    config.conn.limits = Limits {
        max_frame_len: 1024,
        ..Limits::default()
    };
    let server = start(&server_rt, config).await;
    let mut chunked = post_chunked(ADD, "application/json", "fffffffff\r\n");
    chunked.extend(vec![b'1'; 4096]);
    let (replies, closed) = exchange(&client_rt, server.addr(), chunked, ONE_THEN_CLOSE).await;
    refused(
        &replies[0],
        413,
        Code::ResourceExhausted,
        "over the server's limit",
    );
    assert!(closed);
    server.handle.abort().await;
}

on_every_runtime!(
    smuggling_forms_are_refused,
    other_methods_get_405_with_allow,
    host_is_required,
    a_dripped_head_is_cut_off_at_its_deadline,
    request_bodies_held_are_capped_server_wide,
    health_and_get_endpoints,
    authorization_and_stream_methods,
    malformed_framings_are_refused,
    ten_thousand_pipelined_requests,
    the_client_reads_chunked_answers_from_host_names,
    bodies_over_the_limit_get_413,
);
