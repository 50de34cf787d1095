//! The client side: calls as HTTP/1.1 requests over kept-alive connections, one call at a
//! time on each.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use futures::future::BoxFuture;
use gorpc_proto::{Code, Limits, Status};

use super::{
    code_for_http_status, is_header_value, is_token, percent_decode, poll_read_more, range_in,
    write_all, ContentType, MAX_HEADERS, MESSAGE_HEADER, METADATA_PREFIX, STATUS_HEADER,
    TIMEOUT_HEADER,
};
use crate::client::{Channel, Client, ClientConfig, ConnectionConfig, OutgoingCall, RawResponse};
use crate::metadata::Metadata;
use crate::runtime::{timeout, Io, Runtime};

/// Idle connections a channel keeps for reuse; more are closed after their call.
const MAX_IDLE: usize = 16;

/// Sends calls to one server as HTTP/1.1 requests (see [`crate::http`]). Each connection
/// carries one call at a time and is kept for the next; calls made at once open
/// connections of their own. Put it behind [`Client::from_channel`], or use
/// [`Client::http`].
pub struct HttpChannel<R: Runtime> {
    shared: Arc<ChannelShared<R>>,
}

impl<R: Runtime> std::fmt::Debug for HttpChannel<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpChannel")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

struct ChannelShared<R: Runtime> {
    runtime: R,
    addr: SocketAddr,
    /// The `Host` header.
    host: Box<str>,
    /// Connect timeout, limits and TLS.
    config: ConnectionConfig,
    idle: Mutex<Vec<HttpClientConn<HttpIo<R::Io>>>>,
}

/// A connection of the channel: a plain socket, or a TLS session over one when the
/// channel's config asks for TLS (HTTPS).
enum HttpIo<I: Io> {
    Plain(I),
    /// Boxed: a session is over a kilobyte, a socket a few words.
    #[cfg(feature = "tls")]
    Tls(Box<crate::tls::TlsIo<I>>),
}

impl<I: Io> Io for HttpIo<I> {
    fn poll_read_buf(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<std::io::Result<usize>> {
        match self {
            HttpIo::Plain(io) => io.poll_read_buf(cx, buf, max),
            #[cfg(feature = "tls")]
            HttpIo::Tls(io) => io.poll_read_buf(cx, buf, max),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self {
            HttpIo::Plain(io) => io.poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            HttpIo::Tls(io) => io.poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            HttpIo::Plain(io) => io.poll_flush(cx),
            #[cfg(feature = "tls")]
            HttpIo::Tls(io) => io.poll_flush(cx),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            HttpIo::Plain(io) => io.poll_shutdown(cx),
            #[cfg(feature = "tls")]
            HttpIo::Tls(io) => io.poll_shutdown(cx),
        }
    }
}

/// One connection with its buffers, reused from call to call.
struct HttpClientConn<I: Io> {
    io: I,
    read_buf: BytesMut,
    /// The request head being written.
    out: BytesMut,
    /// The answer's metadata headers, as positions in `read_buf`.
    metadata: Vec<(Range<usize>, Range<usize>)>,
}

impl<R: Runtime> HttpChannel<R> {
    /// A channel to `addr`, with the connect timeout, limits and TLS (HTTPS) of `config`.
    pub fn new(runtime: R, addr: SocketAddr, config: ConnectionConfig) -> Self {
        HttpChannel {
            shared: Arc::new(ChannelShared {
                runtime,
                addr,
                host: addr.to_string().into(),
                config,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl<R: Runtime> Channel for HttpChannel<R> {
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.send(call).await })
    }
}

impl Client {
    /// A client that sends its calls to `addr` as HTTP/1.1 requests (see [`crate::http`])
    /// instead of over the binary protocol, with the connect timeout, limits, TLS (HTTPS,
    /// when `config.pool.connection.tls` is set) and default timeout of `config`.
    pub fn http<R: Runtime>(runtime: R, addr: SocketAddr, config: ClientConfig) -> Client {
        let channel = HttpChannel::new(runtime, addr, config.pool.connection);
        Client::from_channel(channel, config.default_timeout)
    }
}

/// How one exchange ended: the call's result, and whether the connection can carry the next.
struct Answer {
    result: Result<RawResponse, Status>,
    reusable: bool,
}

impl<R: Runtime> ChannelShared<R> {
    async fn send(&self, call: OutgoingCall) -> Result<RawResponse, Status> {
        let content_type = ContentType::from_codec(call.codec).ok_or_else(|| {
            Status::new(
                Code::InvalidArgument,
                format!("codec {} has no HTTP content type", call.codec),
            )
        })?;
        // Refuse what the server's limits (assumed equal to ours) would refuse.
        let limits = &self.config.conn.limits;
        if call.body.len() > limits.max_frame_len as usize {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "request body of {} bytes is over the limit of {} bytes",
                    call.body.len(),
                    limits.max_frame_len
                ),
            ));
        }
        let exchange = self.exchange(&call, content_type);
        match call.deadline {
            None => exchange.await,
            Some(deadline) => timeout(&self.runtime, deadline, exchange)
                .await
                .unwrap_or_else(|| Err(deadline_exceeded())),
        }
    }

    async fn exchange(
        &self,
        call: &OutgoingCall,
        content_type: ContentType,
    ) -> Result<RawResponse, Status> {
        let mut conn = match self.reuse().await {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let answer = conn
            .exchange(call, content_type, &self.host, &self.config.conn.limits)
            .await?;
        if answer.reusable {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        answer.result
    }

    /// An idle connection that is still open, if there is one.
    async fn reuse(&self) -> Option<HttpClientConn<HttpIo<R::Io>>> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            // An idle connection has nothing to read: end of stream (the server closed it)
            // or stray bytes mean it is unusable.
            let open = poll_fn(|cx| {
                Poll::Ready(poll_read_more(&mut conn.io, cx, &mut conn.read_buf).is_pending())
            })
            .await;
            if open {
                return Some(conn);
            }
        }
    }

    async fn connect(&self) -> Result<HttpClientConn<HttpIo<R::Io>>, Status> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let addr = self.addr;
        let connected =
            crate::client::connect_socket(&self.runtime, addr, deadline, &self.config).await?;
        let io = match self.tls() {
            #[cfg(feature = "tls")]
            Some(tls) => {
                let (runtime, tls) = (&self.runtime, tls.clone());
                let session = crate::client::tls_connect(
                    runtime,
                    connected,
                    addr,
                    deadline,
                    tls,
                    &self.config,
                );
                HttpIo::Tls(Box::new(session.await?))
            }
            _ => HttpIo::Plain(connected),
        };
        Ok(HttpClientConn {
            io,
            read_buf: BytesMut::new(),
            out: BytesMut::new(),
            metadata: Vec::new(),
        })
    }

    /// The TLS the config asks for; never any without the `tls` feature.
    #[cfg(feature = "tls")]
    fn tls(&self) -> Option<&crate::tls::ClientTls> {
        self.config.tls.as_ref()
    }

    #[cfg(not(feature = "tls"))]
    fn tls(&self) -> Option<std::convert::Infallible> {
        None
    }
}

fn deadline_exceeded() -> Status {
    Status::new(Code::DeadlineExceeded, "deadline exceeded")
}

/// What the connection needs from a response head, as positions in the read buffer.
struct ResponseHead {
    head_len: usize,
    http: u16,
    body_len: usize,
    content_type: Option<ContentType>,
    /// The `x-gorpc-status` value, if sent.
    code: Option<Code>,
    message: Option<Range<usize>>,
    keep_alive: bool,
}

impl<I: Io> HttpClientConn<I> {
    /// Writes `call` and reads its answer. `Err`: the connection failed and is dropped.
    async fn exchange(
        &mut self,
        call: &OutgoingCall,
        content_type: ContentType,
        host: &str,
        limits: &Limits,
    ) -> Result<Answer, Status> {
        if let Err(status) = self.put_request_head(call, content_type, host) {
            return Ok(Answer {
                result: Err(status),
                reusable: true,
            });
        }
        write_all(&mut self.io, &self.out, &call.body)
            .await
            .map_err(|e| Status::new(Code::Unavailable, format!("HTTP request not sent: {e}")))?;
        let head = self.read_head(limits).await?;
        if head.body_len > limits.max_frame_len as usize {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "answer body of {} bytes is over the limit of {} bytes",
                    head.body_len, limits.max_frame_len
                ),
            ));
        }
        while self.read_buf.len() < head.head_len + head.body_len {
            self.read_more().await?;
        }
        let raw_head = self.read_buf.split_to(head.head_len).freeze();
        let body = self.read_buf.split_to(head.body_len).freeze();
        let code = head.code.unwrap_or_else(|| code_for_http_status(head.http));
        let result = if code == Code::Ok {
            let codec = match head.content_type {
                Some(content_type) => Ok(content_type.codec()),
                None if body.is_empty() => Ok(call.codec),
                None => Err(Status::new(
                    Code::Internal,
                    "answer without a known Content-Type",
                )),
            };
            codec.map(|codec| RawResponse {
                codec,
                metadata: self
                    .metadata
                    .iter()
                    .map(|(key, value)| {
                        let key = String::from_utf8_lossy(&raw_head[key.clone()]).to_lowercase();
                        (key, raw_head.slice(value.clone()))
                    })
                    .collect::<Metadata>(),
                body,
            })
        } else {
            let message = match &head.message {
                Some(message) => percent_decode(&raw_head[message.clone()]),
                None => format!("HTTP status {}", head.http),
            };
            Err(Status::new(code, message))
        };
        Ok(Answer {
            result,
            reusable: head.keep_alive,
        })
    }

    /// The request line and headers. Fails for calls HTTP cannot carry.
    fn put_request_head(
        &mut self,
        call: &OutgoingCall,
        content_type: ContentType,
        host: &str,
    ) -> Result<(), Status> {
        let method = call.method.as_bytes();
        if method.first() != Some(&b'/') || !method.iter().all(|b| (b'!'..=b'~').contains(b)) {
            return Err(Status::new(
                Code::InvalidArgument,
                format!("method {:?} is not a path HTTP can carry", call.method),
            ));
        }
        let out = &mut self.out;
        out.clear();
        // Writing to a BytesMut cannot fail.
        let _ = write!(
            out,
            "POST {} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
            call.method,
            content_type.as_str(),
            call.body.len(),
        );
        if let Some(deadline) = call.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(deadline_exceeded());
            }
            // Rounded up, so the server never gives up before the client.
            let millis = left.as_nanos().div_ceil(1_000_000);
            let _ = write!(out, "{TIMEOUT_HEADER}: {millis}\r\n");
        }
        for (key, value) in call.metadata.iter() {
            if !is_token(key.as_bytes()) || !is_header_value(value) {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "metadata {key:?} cannot travel as an HTTP header (a key must be a \
                         token, a value printable without surrounding blanks)"
                    ),
                ));
            }
            out.put_slice(METADATA_PREFIX.as_bytes());
            out.put_slice(key.as_bytes());
            out.put_slice(b": ");
            out.put_slice(value);
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"\r\n");
        Ok(())
    }

    /// Waits for a whole final response head (skipping `100 Continue` and the like).
    async fn read_head(&mut self, limits: &Limits) -> Result<ResponseHead, Status> {
        loop {
            if !self.read_buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut response = httparse::Response::new(&mut headers);
                match response.parse(&self.read_buf) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        let head =
                            inspect(&response, &self.read_buf, head_len, &mut self.metadata)?;
                        if (100..200).contains(&head.http) {
                            bytes::Buf::advance(&mut self.read_buf, head_len);
                            continue;
                        }
                        return Ok(head);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => {
                        return Err(Status::new(
                            Code::Internal,
                            format!("malformed HTTP answer: {e}"),
                        ))
                    }
                }
                if self.read_buf.len() > limits.max_head_len as usize {
                    return Err(Status::new(
                        Code::Internal,
                        format!(
                            "answer head over the limit of {} bytes",
                            limits.max_head_len
                        ),
                    ));
                }
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<(), Status> {
        let (io, buf) = (&mut self.io, &mut self.read_buf);
        match poll_fn(|cx| poll_read_more(io, cx, buf)).await {
            Ok(0) => Err(Status::new(
                Code::Unavailable,
                "the server closed the connection before answering",
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(Status::new(
                Code::Unavailable,
                format!("reading the answer failed: {e}"),
            )),
        }
    }
}

/// Reads what the client needs from a complete response head.
fn inspect(
    response: &httparse::Response<'_, '_>,
    buf: &[u8],
    head_len: usize,
    metadata: &mut Vec<(Range<usize>, Range<usize>)>,
) -> Result<ResponseHead, Status> {
    let malformed = |what: Cow<'static, str>| {
        Status::new(Code::Internal, format!("malformed HTTP answer: {what}"))
    };
    metadata.clear();
    let http = response.code.unwrap_or_default();
    let mut head = ResponseHead {
        head_len,
        http,
        body_len: 0,
        content_type: None,
        code: None,
        message: None,
        keep_alive: response.version == Some(1),
    };
    let mut has_length = false;
    for header in response.headers.iter() {
        let (name, value) = (header.name, header.value);
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if name.eq_ignore_ascii_case("content-length") {
            let length = number().and_then(|n| usize::try_from(n).ok());
            head.body_len = length.ok_or_else(|| malformed("bad Content-Length".into()))?;
            has_length = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(malformed("transfer-coded answers are not supported".into()));
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = ContentType::parse(value);
        } else if name.eq_ignore_ascii_case("connection") {
            let close = value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
            head.keep_alive &= !close;
        } else if name.eq_ignore_ascii_case(STATUS_HEADER) {
            let code = number().and_then(|n| u32::try_from(n).ok());
            let code = code.ok_or_else(|| malformed(format!("bad {STATUS_HEADER}").into()))?;
            head.code = Some(Code::from_u32(code));
        } else if name.eq_ignore_ascii_case(MESSAGE_HEADER) {
            head.message = Some(range_in(buf, value));
        } else if name.len() > METADATA_PREFIX.len()
            && name.as_bytes()[..METADATA_PREFIX.len()]
                .eq_ignore_ascii_case(METADATA_PREFIX.as_bytes())
        {
            let key = &name.as_bytes()[METADATA_PREFIX.len()..];
            metadata.push((range_in(buf, key), range_in(buf, value)));
        }
    }
    // Informational answers have no body; a final one must say how long its body is.
    if !has_length && !(100..200).contains(&http) && http != 204 && http != 304 {
        return Err(malformed("no Content-Length".into()));
    }
    Ok(head)
}
