//! The server side: telling the two protocols apart on an accepted connection, and serving
//! HTTP/1.1 requests on it one at a time, answered in order.

use std::fmt::Write as _;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use futures::FutureExt;
use gorpc_proto::{Code, ConnConfig, Limits, RequestHead, Status};

use super::chunked::{ChunkedBody, ChunkedError};
use super::transcode::{self, Descriptors};
use super::{
    http_status, is_header_value, is_token, poll_read_more, put_percent_encoded, range_in,
    reason_phrase, write_all, ContentType, ACCEPTED_CONTENT_TYPES, MAX_HEADERS, MESSAGE_HEADER,
    METADATA_PREFIX, STATUS_HEADER, TIMEOUT_HEADER,
};
use crate::metadata::Metadata;
use crate::runtime::{Io, PeerCertificates, Runtime, Sleep};
use crate::server::conn::{poll_closed, ServerConnection, SignalRx, Signals};
use crate::service::{ServerReply, ServerRequest, Service};

/// How long a new connection may stay silent before it is handed to the binary protocol,
/// whose clients may keep a connection open without a call; HTTP clients speak first.
const SNIFF_WAIT: Duration = Duration::from_secs(10);
/// How long an HTTP connection waits for the next bytes of a request, or for the next
/// request, before closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After refusing a request, how long the server reads and discards what the client still
/// sends before closing: closing with unread bytes would reset the connection, and the
/// client could lose the answer.
const LINGER: Duration = Duration::from_secs(2);

/// State shared by one server's HTTP connections.
#[derive(Debug, Default)]
pub(crate) struct HttpShared {
    descriptors: Descriptors,
}

/// A connection the accept loop took, with what serving it needs.
pub(crate) struct Accepted<R: Runtime, I: Io> {
    pub(crate) runtime: R,
    /// The socket, or a TLS session over it whose handshake is done.
    pub(crate) io: I,
    pub(crate) peer: SocketAddr,
    pub(crate) config: ConnConfig,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) signals: Signals,
    /// Set when the server is at its connection limit: the peer is told so, in its own
    /// protocol, and the connection closed.
    pub(crate) refusal: Option<Status>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Binary,
    Http,
}

/// Which protocol a connection that opened with `bytes` speaks; `None` until it can tell.
fn sniff(bytes: &[u8]) -> Option<Protocol> {
    match bytes {
        [] | [b'G'] => None, // "GR…" (a frame) or "GET"
        [b'G', b'R', ..] => Some(Protocol::Binary),
        [first, ..] if first.is_ascii_uppercase() => Some(Protocol::Http),
        // Neither: the binary driver reports the bad magic in a go-away.
        _ => Some(Protocol::Binary),
    }
}

/// Serves one accepted connection in whichever protocol it speaks, to its end. The bytes
/// read to tell the protocols apart go to the driver that takes the connection.
pub(crate) async fn serve_sniffed<R: Runtime, I: Io>(
    accepted: Accepted<R, I>,
    shared: Arc<HttpShared>,
) {
    let Accepted {
        runtime,
        mut io,
        peer,
        config,
        service,
        signals,
        refusal,
    } = accepted;
    let mut first_bytes = BytesMut::new();
    let mut drain: SignalRx = Box::pin(signals.drain.clone());
    let mut abort: SignalRx = Box::pin(signals.abort.clone());
    let mut silence = runtime.sleep_until(Instant::now() + SNIFF_WAIT);
    let protocol = poll_fn(|cx| loop {
        if poll_closed(&mut abort, cx) {
            return Poll::Ready(None);
        }
        if let Some(protocol) = sniff(&first_bytes) {
            return Poll::Ready(Some(protocol));
        }
        // A silent peer at a drain (or for long) is taken for a binary client: its driver
        // then says go-away or pings, as it would have without HTTP.
        if poll_closed(&mut drain, cx) || Pin::new(&mut silence).poll(cx).is_ready() {
            return Poll::Ready(Some(Protocol::Binary));
        }
        match poll_read_more(&mut io, cx, &mut first_bytes) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    match protocol {
        None => {}
        Some(Protocol::Binary) => {
            let mut conn = ServerConnection::new(runtime, io, peer, config, service, signals);
            match refusal {
                Some(status) => conn.refuse(status),
                None => conn.feed_read(first_bytes),
            }
            conn.await;
        }
        Some(Protocol::Http) => {
            let conn = HttpConnection {
                peer_certificates: io.peer_certificates(),
                timer: runtime.sleep_until(Instant::now() + IDLE_TIMEOUT),
                io,
                peer,
                service,
                shared,
                limits: config.limits,
                read_buf: first_bytes,
                head_buf: BytesMut::new(),
                out: BytesMut::new(),
                metadata: Vec::new(),
                drain,
            };
            let mut run = std::pin::pin!(conn.run(refusal));
            // Aborting the server drops the connection wherever it is.
            poll_fn(|cx| {
                if poll_closed(&mut abort, cx) {
                    return Poll::Ready(());
                }
                run.as_mut().poll(cx)
            })
            .await;
        }
    }
}

/// One HTTP connection's state between requests; buffers are reused from one request to
/// the next.
struct HttpConnection<S: Sleep, I: Io> {
    io: I,
    peer: SocketAddr,
    peer_certificates: Option<PeerCertificates>,
    service: Arc<dyn Service>,
    shared: Arc<HttpShared>,
    limits: Limits,
    read_buf: BytesMut,
    /// Each request's head (method, metadata) is encoded here as the binary protocol's,
    /// then split off for its `ServerRequest`.
    head_buf: BytesMut,
    /// The response head being written.
    out: BytesMut,
    /// The current request's metadata headers: key (after the prefix) and value, as
    /// positions in `read_buf`.
    metadata: Vec<(Range<usize>, Range<usize>)>,
    /// Idle timeout while reading, the call's deadline while its handler runs.
    timer: S,
    drain: SignalRx,
}

/// A request the connection cannot frame: answered, then the connection closes.
#[derive(Debug)]
struct Refusal {
    http: u16,
    status: Status,
}

impl Refusal {
    fn new(http: u16, code: Code, message: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Refusal {
            http,
            status: Status::new(code, message),
        }
    }
}

/// What a request head says, as positions in the read buffer.
#[derive(Debug)]
struct ParsedHead {
    head_len: usize,
    path: Range<usize>,
    /// From Content-Length; 0 for a chunked body.
    body_len: usize,
    /// `Transfer-Encoding: chunked`: the body's length shows as it is decoded.
    chunked: bool,
    content_type: Option<ContentType>,
    timeout: Option<Duration>,
    keep_alive: bool,
    expect_continue: bool,
    /// Something wrong that the framing survives: answered once the body is read, and the
    /// connection stays open.
    problem: Option<Refusal>,
}

/// What waiting for bytes ended with.
#[derive(Debug, PartialEq, Eq)]
enum ReadOutcome {
    Data,
    /// End of stream, or a failed read.
    Closed,
    /// The server is draining and no request is under way.
    Drained,
    TimedOut,
}

/// How a served request leaves the connection.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

impl<S: Sleep, I: Io> HttpConnection<S, I> {
    async fn run(mut self, refusal: Option<Status>) {
        if let Some(status) = refusal {
            let http = http_status(status.code());
            return self.refuse(Refusal { http, status }).await;
        }
        loop {
            let head = match self.read_head().await {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(refusal) => return self.refuse(refusal).await,
            };
            match self.serve(head).await {
                Ok(Next::KeepAlive) => {}
                Ok(Next::Close) => break,
                Err(ConnectionLost) => return,
            }
        }
        let _ = poll_fn(|cx| self.io.poll_shutdown(cx)).await;
    }

    /// Waits for a whole request head. `Ok(None)`: the connection ends without one (closed,
    /// idle too long, or the server drains).
    async fn read_head(&mut self) -> Result<Option<ParsedHead>, Refusal> {
        loop {
            if !self.read_buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&self.read_buf) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        let parsed =
                            inspect(&request, &self.read_buf, head_len, &mut self.metadata);
                        return parsed.and_then(|head| self.check_limits(head)).map(Some);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(Refusal::new(
                            431,
                            Code::ResourceExhausted,
                            format!("more than {MAX_HEADERS} request headers"),
                        ))
                    }
                    Err(e) => {
                        return Err(Refusal::new(
                            400,
                            Code::InvalidArgument,
                            format!("malformed HTTP request: {e}"),
                        ))
                    }
                }
                if self.read_buf.len() > self.limits.max_head_len as usize {
                    return Err(Refusal::new(
                        431,
                        Code::ResourceExhausted,
                        format!(
                            "request head over the server's limit of {} bytes",
                            self.limits.max_head_len
                        ),
                    ));
                }
            }
            let between_requests = self.read_buf.is_empty();
            if self.read(between_requests).await != ReadOutcome::Data {
                return Ok(None);
            }
        }
    }

    /// Refuses a body over the frame limit before reading it.
    fn check_limits(&self, head: ParsedHead) -> Result<ParsedHead, Refusal> {
        let max = self.limits.max_frame_len as usize;
        if head.body_len > max {
            return Err(Refusal::new(
                413,
                Code::ResourceExhausted,
                format!(
                    "request body of {} bytes is over the server's limit of {max} bytes",
                    head.body_len
                ),
            ));
        }
        Ok(head)
    }

    /// Reads the body, runs the call and writes the answer.
    async fn serve(&mut self, head: ParsedHead) -> Result<Next, ConnectionLost> {
        let mut total = head.head_len + head.body_len;
        let mut chunked = head.chunked.then(ChunkedBody::default);
        if head.expect_continue && (chunked.is_some() || self.read_buf.len() < total) {
            write_all(&mut self.io, b"HTTP/1.1 100 Continue\r\n\r\n", &[])
                .await
                .map_err(|_| ConnectionLost)?;
        }
        if let Some(body) = &mut chunked {
            total = head.head_len + self.read_chunked(head.head_len, body).await?;
        }
        while self.read_buf.len() < total {
            if self.read(false).await != ReadOutcome::Data {
                return Err(ConnectionLost);
            }
        }
        let next = if head.keep_alive && !self.draining() {
            Next::KeepAlive
        } else {
            Next::Close
        };
        if let Some(problem) = head.problem {
            self.read_buf.advance(total);
            self.respond_error(problem.http, &problem.status, &next)
                .await?;
            return Ok(next);
        }
        let request_head = self.encode_request_head(&head);
        let body = match chunked {
            Some(body) => {
                self.read_buf.advance(total);
                body.into_body()
            }
            None => {
                self.read_buf.advance(head.head_len);
                self.read_buf.split_to(head.body_len).freeze()
            }
        };
        let Some(request_head) = request_head else {
            let status = Status::new(Code::InvalidArgument, "request target is not a method path");
            self.respond_error(400, &status, &next).await?;
            return Ok(next);
        };
        let content_type = head.content_type.unwrap_or(ContentType::OctetStream);
        let schema = match content_type {
            ContentType::Json => self.service.schema(request_head.method()),
            _ => None,
        };
        let (codec, body) = match &schema {
            Some(schema) => {
                match transcode::json_to_native(&self.shared.descriptors, schema, &body) {
                    Ok(native) => (schema.codec(), native),
                    Err(status) => {
                        self.respond_error(http_status(status.code()), &status, &next)
                            .await?;
                        return Ok(next);
                    }
                }
            }
            None => (content_type.codec(), body),
        };
        let deadline = head.timeout.and_then(|t| Instant::now().checked_add(t));
        let request = ServerRequest {
            head: request_head,
            edited: None,
            codec,
            body,
            deadline,
            peer: Some(self.peer),
            peer_certificates: self.peer_certificates.clone(),
            streams: Default::default(),
        };
        let reply = self.call(request, deadline).await;
        if !reply.status.is_ok() {
            let http = http_status(reply.status.code());
            self.respond_error(http, &reply.status, &next).await?;
            return Ok(next);
        }
        let body = match &schema {
            Some(schema) => {
                match transcode::native_to_json(&self.shared.descriptors, schema, &reply.body) {
                    Ok(json) => json,
                    Err(status) => {
                        self.respond_error(http_status(status.code()), &status, &next)
                            .await?;
                        return Ok(next);
                    }
                }
            }
            None => reply.body,
        };
        self.out.clear();
        put_response_head(
            &mut self.out,
            200,
            &reply.status,
            content_type.as_str(),
            body.len(),
            &reply.metadata,
            &next,
        );
        write_all(&mut self.io, &self.out, &body)
            .await
            .map_err(|_| ConnectionLost)?;
        Ok(next)
    }

    /// Reads a chunked body that starts at `start` in the read buffer to its end, decoding
    /// it into `body`, and returns its encoded length. A malformed or oversized body is
    /// refused and the connection closed. The encoded bytes may be at most twice the
    /// body limit and 64 KiB (a client framing one byte per chunk is refused).
    async fn read_chunked(
        &mut self,
        start: usize,
        body: &mut ChunkedBody,
    ) -> Result<usize, ConnectionLost> {
        let max_body = self.limits.max_frame_len as usize;
        let max_encoded = max_body.saturating_mul(2).saturating_add(64 * 1024);
        let max_trailers = self.limits.max_head_len as usize;
        loop {
            let encoded = &self.read_buf[start..];
            let refusal = match body.decode(encoded, max_body, max_trailers) {
                Ok(Some(len)) => return Ok(len),
                Ok(None) if encoded.len() <= max_encoded => {
                    if self.read(false).await != ReadOutcome::Data {
                        return Err(ConnectionLost);
                    }
                    continue;
                }
                Ok(None) | Err(ChunkedError::TooLarge) => Refusal::new(
                    413,
                    Code::ResourceExhausted,
                    format!("chunked request body over the server's limit of {max_body} bytes"),
                ),
                Err(ChunkedError::Malformed(why)) => Refusal::new(
                    400,
                    Code::InvalidArgument,
                    format!("malformed chunked request body: {why}"),
                ),
            };
            self.refuse(refusal).await;
            return Err(ConnectionLost);
        }
    }

    /// The request's head as the binary protocol's, so handlers and interceptors see the
    /// same `ServerRequest` either way. Lowercases the metadata keys in place (HTTP
    /// header names ignore case). `None` if the target is no method path.
    fn encode_request_head(&mut self, head: &ParsedHead) -> Option<RequestHead> {
        for (key, _) in &self.metadata {
            self.read_buf[key.clone()].make_ascii_lowercase();
        }
        let text = |range: &Range<usize>| std::str::from_utf8(&self.read_buf[range.clone()]);
        let path = text(&head.path).ok()?;
        let entries = self.metadata.iter().filter_map(|(key, value)| {
            // Header names are tokens, so always UTF-8.
            let key = text(key).ok()?;
            Some((key, &self.read_buf[value.clone()]))
        });
        let timeout_micros = head
            .timeout
            .map_or(0, |t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX));
        gorpc_proto::head::encode_request_head(path, timeout_micros, entries, &mut self.head_buf);
        RequestHead::decode(self.head_buf.split().freeze()).ok()
    }

    /// Runs the service (and its interceptors), within the call's deadline. A panic is an
    /// `Internal` answer, as on the binary protocol.
    async fn call(&mut self, request: ServerRequest, deadline: Option<Instant>) -> ServerReply {
        let panicked = || ServerReply::error(Status::new(Code::Internal, "handler panicked"));
        let service = &self.service;
        let future = match std::panic::catch_unwind(AssertUnwindSafe(|| service.call(request))) {
            Ok(future) => future,
            Err(_) => return panicked(),
        };
        let mut future = AssertUnwindSafe(future).catch_unwind();
        if let Some(deadline) = deadline {
            self.timer.reset(deadline);
        }
        let timer = &mut self.timer;
        poll_fn(|cx| {
            if let Poll::Ready(result) = future.poll_unpin(cx) {
                return Poll::Ready(result.unwrap_or_else(|_| panicked()));
            }
            if deadline.is_some() && Pin::new(&mut *timer).poll(cx).is_ready() {
                let status = Status::new(
                    Code::DeadlineExceeded,
                    "deadline exceeded before the handler answered",
                );
                return Poll::Ready(ServerReply::error(status));
            }
            Poll::Pending
        })
        .await
    }

    /// Answers with an error status, its message also as a plain-text body for people
    /// reading `curl` output.
    async fn respond_error(
        &mut self,
        http: u16,
        status: &Status,
        next: &Next,
    ) -> Result<(), ConnectionLost> {
        self.out.clear();
        let body_len = status.message().len() + 1;
        let text = "text/plain; charset=utf-8";
        put_response_head(
            &mut self.out,
            http,
            status,
            text,
            body_len,
            &Metadata::new(),
            next,
        );
        self.out.put_slice(status.message().as_bytes());
        self.out.put_u8(b'\n');
        write_all(&mut self.io, &self.out, &[])
            .await
            .map_err(|_| ConnectionLost)
    }

    /// Answers a request the connection cannot go on after, then closes: the write side at
    /// once, the read side after discarding what the client still sends (for a while).
    async fn refuse(&mut self, refusal: Refusal) {
        tracing::debug!(peer = %self.peer, status = %refusal.status, "HTTP request refused");
        if self
            .respond_error(refusal.http, &refusal.status, &Next::Close)
            .await
            .is_err()
        {
            return;
        }
        let _ = poll_fn(|cx| self.io.poll_shutdown(cx)).await;
        self.timer.reset(Instant::now() + LINGER);
        let (io, buf, timer) = (&mut self.io, &mut self.read_buf, &mut self.timer);
        poll_fn(|cx| loop {
            buf.clear();
            match poll_read_more(io, cx, buf) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    return match Pin::new(&mut *timer).poll(cx) {
                        Poll::Ready(()) => Poll::Ready(()),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        })
        .await;
    }

    /// Reads once more, waiting at most [`IDLE_TIMEOUT`]. Between requests, a drain ends
    /// the wait too.
    async fn read(&mut self, between_requests: bool) -> ReadOutcome {
        self.timer.reset(Instant::now() + IDLE_TIMEOUT);
        let (io, buf) = (&mut self.io, &mut self.read_buf);
        let (drain, timer) = (&mut self.drain, &mut self.timer);
        poll_fn(|cx| {
            if between_requests && poll_closed(drain, cx) {
                return Poll::Ready(ReadOutcome::Drained);
            }
            match poll_read_more(io, cx, buf) {
                Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(ReadOutcome::Closed),
                Poll::Ready(Ok(_)) => Poll::Ready(ReadOutcome::Data),
                Poll::Pending => match Pin::new(&mut *timer).poll(cx) {
                    Poll::Ready(()) => Poll::Ready(ReadOutcome::TimedOut),
                    Poll::Pending => Poll::Pending,
                },
            }
        })
        .await
    }

    /// Whether the server has started draining: the answer in progress is then the
    /// connection's last.
    fn draining(&mut self) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        poll_closed(&mut self.drain, &mut cx)
    }
}

/// The connection failed or the peer left: nothing more to write.
#[derive(Debug)]
struct ConnectionLost;

/// Reads what the connection needs from a complete request head. Errors are framing
/// problems; other problems are kept in `problem` and answered after the body.
fn inspect(
    request: &httparse::Request<'_, '_>,
    buf: &[u8],
    head_len: usize,
    metadata: &mut Vec<(Range<usize>, Range<usize>)>,
) -> Result<ParsedHead, Refusal> {
    metadata.clear();
    let mut problem = None;
    // `Complete` guarantees the method, path and version.
    let method = request.method.unwrap_or_default();
    if method != "POST" {
        problem = Some(Refusal::new(
            405,
            Code::Unimplemented,
            format!("HTTP method {method} is not served: call methods with POST"),
        ));
    }
    let target = request.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if !path.starts_with('/') || path.len() < 2 {
        problem = problem.or(Some(Refusal::new(
            400,
            Code::InvalidArgument,
            format!("request target {target:?} is not a method path (/package.Service/Method)"),
        )));
    }
    let mut body_len: Option<usize> = None;
    let mut chunked = false;
    let mut content_type: Option<Result<ContentType, &[u8]>> = None;
    let mut timeout = None;
    let (mut close, mut keep_alive_token, mut expect_continue) = (false, false, false);
    for header in request.headers.iter() {
        let (name, value) = (header.name, header.value);
        if name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (length, body_len) {
                (Some(n), None) => body_len = Some(n),
                (Some(n), Some(earlier)) if n == earlier => {}
                _ => {
                    return Err(Refusal::new(
                        400,
                        Code::InvalidArgument,
                        "invalid or conflicting Content-Length",
                    ))
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked` alone: any other coding would have to be undone to frame the
            // body, and a repeated header is how smuggled requests disagree.
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::new(
                    501,
                    Code::Unimplemented,
                    format!(
                        "Transfer-Encoding {:?} is not supported: send the body chunked or with Content-Length",
                        String::from_utf8_lossy(value)
                    ),
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(ContentType::parse(value).ok_or(value));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(TIMEOUT_HEADER) {
            let millis = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match millis {
                Some(millis) => timeout = Some(Duration::from_millis(millis)),
                None => {
                    problem = problem.or(Some(Refusal::new(
                        400,
                        Code::InvalidArgument,
                        format!("{TIMEOUT_HEADER} must be a whole number of milliseconds"),
                    )))
                }
            }
        } else if name.len() > METADATA_PREFIX.len()
            && name.as_bytes()[..METADATA_PREFIX.len()]
                .eq_ignore_ascii_case(METADATA_PREFIX.as_bytes())
        {
            let key = &name.as_bytes()[METADATA_PREFIX.len()..];
            metadata.push((range_in(buf, key), range_in(buf, value)));
        }
    }
    let content_type = match content_type {
        Some(Ok(content_type)) => Some(content_type),
        Some(Err(unsupported)) => {
            let named = String::from_utf8_lossy(unsupported);
            problem = problem.or(Some(Refusal::new(
                415,
                Code::InvalidArgument,
                format!("Content-Type {named:?} is not served; accepted: {ACCEPTED_CONTENT_TYPES}"),
            )));
            None
        }
        None => {
            problem = problem.or(Some(Refusal::new(
                415,
                Code::InvalidArgument,
                format!("Content-Type missing; accepted: {ACCEPTED_CONTENT_TYPES}"),
            )));
            None
        }
    };
    if chunked && body_len.is_some() {
        return Err(Refusal::new(
            400,
            Code::InvalidArgument,
            "both Transfer-Encoding and Content-Length: the body's length is ambiguous",
        ));
    }
    if chunked && request.version != Some(1) {
        return Err(Refusal::new(
            400,
            Code::InvalidArgument,
            "a chunked request body needs HTTP/1.1",
        ));
    }
    // HTTP/1.1 keeps connections by default, HTTP/1.0 only when asked.
    let keep_alive = !close && (request.version == Some(1) || keep_alive_token);
    Ok(ParsedHead {
        head_len,
        path: range_in(buf, path.as_bytes()),
        body_len: body_len.unwrap_or(0),
        chunked,
        content_type,
        timeout,
        keep_alive,
        expect_continue,
        problem,
    })
}

/// Writes a response's status line and headers.
fn put_response_head(
    out: &mut BytesMut,
    http: u16,
    status: &Status,
    content_type: &str,
    body_len: usize,
    metadata: &Metadata,
    next: &Next,
) {
    // Writing to a BytesMut cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {http} {}\r\ncontent-type: {content_type}\r\ncontent-length: {body_len}\r\n\
         {STATUS_HEADER}: {}\r\n{MESSAGE_HEADER}: ",
        reason_phrase(http),
        status.code() as u32,
    );
    put_percent_encoded(out, status.message());
    out.put_slice(b"\r\n");
    for (key, value) in metadata.iter() {
        if !is_token(key.as_bytes()) || !is_header_value(value) {
            tracing::warn!(
                key,
                "response metadata cannot travel as an HTTP header; left out"
            );
            continue;
        }
        out.put_slice(METADATA_PREFIX.as_bytes());
        out.put_slice(key.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    }
    if *next == Next::Close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_frames_from_requests() {
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"G"), None);
        assert_eq!(sniff(b"GR\x01"), Some(Protocol::Binary));
        assert_eq!(sniff(b"GE"), Some(Protocol::Http));
        assert_eq!(sniff(b"POST /"), Some(Protocol::Http));
        assert_eq!(sniff(b"\x00\x01"), Some(Protocol::Binary));
    }

    #[test]
    fn a_request_head_is_read_into_positions() {
        let raw = b"POST /pkg.Svc/Call?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
                    Content-Length: 2\r\nX-Gorpc-Md-Trace: abc\r\nx-gorpc-timeout-ms: 1500\r\n\r\n{}";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(raw).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("complete head"),
        };
        let mut metadata = Vec::new();
        let head = inspect(&request, raw, head_len, &mut metadata).unwrap();
        assert!(head.problem.is_none(), "{:?}", head.problem);
        assert_eq!(&raw[head.path.clone()], b"/pkg.Svc/Call");
        assert_eq!(head.body_len, 2);
        assert_eq!(head.content_type, Some(ContentType::Json));
        assert_eq!(head.timeout, Some(Duration::from_millis(1500)));
        assert!(head.keep_alive);
        assert_eq!(metadata.len(), 1);
        assert_eq!(&raw[metadata[0].0.clone()], b"Trace");
        assert_eq!(&raw[metadata[0].1.clone()], b"abc");
    }

    #[test]
    fn response_heads_carry_status_and_metadata() {
        let mut out = BytesMut::new();
        let mut metadata = Metadata::new();
        metadata.append("trace", &b"abc"[..]);
        metadata.append("bad key", &b"x"[..]);
        let status = Status::new(Code::NotFound, "no such user: ü");
        put_response_head(
            &mut out,
            404,
            &status,
            "text/plain",
            3,
            &metadata,
            &Next::Close,
        );
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("\r\nx-gorpc-status: 5\r\n"), "{text}");
        assert!(
            text.contains("\r\nx-gorpc-message: no such user: %C3%BC\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nx-gorpc-md-trace: abc\r\n"), "{text}");
        assert!(!text.contains("bad key"), "{text}");
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
    }
}
