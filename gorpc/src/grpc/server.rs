//! gRPC calls on the server: an HTTP/2 request with an `application/grpc` content type
//! becomes the same [`ServerRequest`] the binary driver builds, stream halves included, and
//! the handler's messages and status go back as DATA frames and trailers.
//!
//! One call is one hyper stream task. Until the answer's headers can be sent, the request's
//! future drives the call; then the response body does: each poll of it runs the handler,
//! moves client messages into the handler's stream (while the handler keeps up: hyper grants
//! HTTP/2 credit as the body is read, so an unread stream stops the client), and hands out
//! what the handler queued. Dropping it (RST_STREAM, a closed connection) drops the handler.

use std::any::Any;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::task::AtomicWaker;
use futures::FutureExt;
use gorpc_proto::{codec, CallId, Code, Status, StreamKind};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tracing::Instrument as _;

use super::headers::{self, GRPC_ACCEPT_ENCODING, GRPC_ENCODING, GRPC_TIMEOUT};
use super::message::{self, Decoder, Encoding, ACCEPT_ENCODING, PREFIX};
use crate::http::body::{read_body, BodyError, BodyHold, EdgeBody};
use crate::http::server::{call_within, request_head, Edge};
use crate::http::transcode;
use crate::observe::{answered, CallEnd, WatchGuard};
use crate::runtime::Runtime;
use crate::service::{CallStreams, ServerReply, ServerRequest};
use crate::stream::handoff::{Framing, Inbox, InboxReader, Outbox, OutboxSender, StreamControl};
use crate::stream::{RawRequestStream, RawResponseSink};

/// A message this large or smaller is copied behind its prefix into one DATA frame; a
/// larger one goes as two frames, prefix then message, uncopied.
const COPY_LIMIT: usize = 16 * 1024;

/// Serves one gRPC call. `codec` comes from the request's content type.
pub(crate) async fn serve<R: Runtime>(
    edge: &Edge<R>,
    request: Request<hyper::body::Incoming>,
    codec: u8,
) -> Response<EdgeBody> {
    match start(edge, request, codec).await {
        Ok(response) => response,
        Err(status) => trailers_only(codec, &status, &crate::Metadata::new()),
    }
}

/// Refuses a call before it starts.
pub(crate) fn refuse(status: &Status) -> Response<EdgeBody> {
    trailers_only(codec::PROTOBUF, status, &crate::Metadata::new())
}

async fn start<R: Runtime>(
    edge: &Edge<R>,
    request: Request<hyper::body::Incoming>,
    codec: u8,
) -> Result<Response<EdgeBody>, Status> {
    if let Some(status) = &edge.refusal {
        return Err(status.clone());
    }
    if request.method() != Method::POST {
        return Err(Status::new(
            Code::Unimplemented,
            format!("gRPC calls are POST, not {}", request.method()),
        ));
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let timeout = match parts.headers.get(GRPC_TIMEOUT) {
        None => None,
        Some(value) => Some(headers::parse_timeout(value.as_bytes()).ok_or_else(|| {
            Status::new(
                Code::InvalidArgument,
                format!("{GRPC_TIMEOUT} {value:?} is not a gRPC timeout"),
            )
        })?),
    };
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let encoding = match parts.headers.get(GRPC_ENCODING) {
        None => Encoding::Identity,
        Some(value) => Encoding::parse(value.as_bytes()).ok_or_else(|| {
            Status::new(
                Code::Unimplemented,
                format!("grpc-encoding {value:?} is not supported (gzip, identity)"),
            )
        })?,
    };
    let compress = edge.shared.config.compress_grpc_responses
        && parts
            .headers
            .get(GRPC_ACCEPT_ENCODING)
            .is_some_and(|list| Encoding::accepts_gzip(list.as_bytes()));
    let metadata = headers::metadata_of(&parts.headers)?;
    let head = request_head(
        path,
        timeout,
        metadata.iter().map(|(key, value)| (*key, &value[..])),
    )
    .ok_or_else(|| {
        Status::new(
            Code::Unimplemented,
            format!("{path:?} is not a method path"),
        )
    })?;
    // Watched from here (dropped unanswered: the client reset the stream or the
    // connection went): every end below is the call's.
    let mut watch = Some(edge.watch(&head, Instant::now(), CallEnd::Cancelled));
    let result = async {
        let kind = edge.served.service.stream_kind(path);
        let schema = (codec == codec::JSON)
            .then(|| edge.served.service.schema(path))
            .flatten();
        if schema.is_some() && kind.is_some() {
            return Err(Status::new(
                Code::Unimplemented,
                "gRPC with JSON is translated for unary methods only; call stream methods in their own codec",
            ));
        }
        // A method the service does not have is answered at once (through the interceptors,
        // as on the binary protocol), not after the request: a client may hold its request
        // stream open until it hears back.
        if !edge.served.service.has_method(path) {
            let request = edge_request(
                edge,
                head,
                codec,
                Bytes::new(),
                deadline,
                Default::default(),
            );
            let watch = watch.as_mut().expect("watched until the stream call starts");
            let reply = call_within(&edge.runtime, &edge.served, request, deadline, watch).await;
            watch.end(answered(&reply.status), Some(&reply.status));
            return Ok(answer(codec, reply, false));
        }
        let max = edge.limits.max_frame_len as usize;
        let id = edge.next_call_id();
        let control = Arc::new(Control::default());
        let mut streams = CallStreams::default();
        let mut pump = None;
        let mut hold = BodyHold::new(&edge.shared.budget);
        let request_body = if kind.is_some_and(|k| k.client_streams()) {
            let inbox = Arc::new(Inbox::default());
            streams.requests = Some(RawRequestStream {
                id,
                reader: InboxReader::new(inbox.clone()),
                control: control.clone(),
                done: false,
            });
            pump = Some(Pump {
                body,
                decoder: Decoder::new(max, encoding),
                inbox,
                window: edge.stream_window,
                run: VecDeque::new(),
                ended: false,
            });
            Bytes::new()
        } else {
            let whole = read_body(
                &edge.runtime,
                body,
                max.saturating_add(PREFIX),
                Some(&mut hold),
                edge.shared.config.body_idle_timeout,
            )
            .await
            .map_err(|e| match e {
                BodyError::TooLarge | BodyError::OverBudget => {
                    Status::new(Code::ResourceExhausted, format!("request: {e}"))
                }
                other => Status::new(Code::Internal, format!("request body: {other}")),
            })?;
            one_message(whole, max, encoding)?
        };
        let outbox = kind.is_some_and(|k| k.server_streams()).then(|| {
            let outbox = Arc::new(Outbox::framed(Some(id), Framing::Grpc));
            streams.responses = Some(RawResponseSink {
                sender: OutboxSender {
                    outbox: outbox.clone(),
                    control: control.clone(),
                },
            });
            outbox
        });
        let (codec, body) = match &schema {
            Some(schema) => (
                schema.codec(),
                transcode::json_to_native(&edge.shared.descriptors, schema, &request_body)?,
            ),
            None => (codec, request_body),
        };
        let request = edge_request(edge, head, codec, body, deadline, streams);

        // A unary call needs no machinery: the answer is known before anything is sent.
        if kind.is_none() {
            let watch = watch.as_mut().expect("watched until the stream call starts");
            let mut reply = call_within(&edge.runtime, &edge.served, request, deadline, watch).await;
            drop(hold);
            if let (Some(schema), true) = (&schema, reply.status.is_ok()) {
                match transcode::native_to_json(&edge.shared.descriptors, schema, &reply.body) {
                    Ok(json) => reply.body = json,
                    Err(status) => reply = ServerReply::error(status),
                }
            }
            watch.response_bytes(reply.body.len());
            watch.end(answered(&reply.status), Some(&reply.status));
            let response_codec = if schema.is_some() { codec::JSON } else { codec };
            return Ok(answer(response_codec, reply, compress));
        }

        let watch = watch.take();
        let span = watch.as_ref().map_or_else(tracing::Span::none, WatchGuard::span);
        let call = || span.in_scope(|| edge.served.service.call(request));
        let handler = match std::panic::catch_unwind(AssertUnwindSafe(call)) {
            Ok(future) => Some(AssertUnwindSafe(future).catch_unwind().instrument(span).boxed()),
            Err(_) => return Err(panicked()),
        };
        let mut call = Call {
            watch,
            end_as: CallEnd::Cancelled,
            handler,
            reply: None,
            pump,
            outbox,
            control,
            deadline,
            timer: None,
            runtime: edge.runtime.clone(),
            kind,
            compress,
            pending: VecDeque::new(),
            done: false,
        };
        // Headers go once the first message is ready, or with the status if it comes first:
        // a call that fails before answering gets a trailers-only response. A bidirectional
        // call's go after the handler's first poll whatever it did: its client may wait for
        // them before it sends (tonic's does), while the handler waits for a message.
        let at_once = kind == Some(StreamKind::Bidirectional);
        let mut polled = false;
        poll_fn(|cx| {
            call.progress(cx);
            if at_once && std::mem::replace(&mut polled, true) {
                return Poll::Ready(());
            }
            if call.outbox.as_ref().is_some_and(|o| !o.is_empty()) || call.reply.is_some() {
                return Poll::Ready(());
            }
            if at_once {
                // Answered at the next poll, after whatever this one woke.
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await;
        if let Some(reply) = call.reply.as_ref().filter(|_| !call.has_messages()) {
            if !reply.status.is_ok() {
                if let Some(watch) = &mut call.watch {
                    watch.end(call.end_as, Some(&reply.status));
                }
                let trailers = call.outbox.as_ref().map(|o| o.take_trailers());
                let mut metadata = reply.metadata.clone();
                if let Some(trailers) = trailers {
                    metadata.append_all(trailers);
                }
                return Ok(trailers_only(codec, &reply.status, &metadata));
            }
        }
        let mut response = Response::new(EdgeBody::Stream(Box::pin(call)));
        put_response_headers(response.headers_mut(), codec, compress);
        Ok(response)
    }
    .await;
    if let (Err(status), Some(watch)) = (&result, &mut watch) {
        watch.end(answered(status), Some(status));
    }
    result
}

/// The request a handler sees, as the binary driver would build it.
fn edge_request<R>(
    edge: &Edge<R>,
    head: gorpc_proto::RequestHead,
    codec: u8,
    body: Bytes,
    deadline: Option<Instant>,
    streams: CallStreams,
) -> ServerRequest {
    ServerRequest {
        streams,
        head,
        edited: None,
        codec,
        body,
        deadline,
        peer: Some(edge.peer),
        peer_certificates: edge.peer_certificates.clone(),
    }
}

/// The single message of a unary or server-streaming request.
fn one_message(body: Bytes, max: usize, encoding: Encoding) -> Result<Bytes, Status> {
    let mut decoder = Decoder::new(max, encoding);
    decoder.push(body);
    let message = decoder
        .next()?
        .ok_or_else(|| Status::new(Code::Internal, "the request ended without its message"))?;
    if decoder.pending() > 0 {
        return Err(Status::new(
            Code::Internal,
            "more than one request message for a method that takes one",
        ));
    }
    Ok(message)
}

fn panicked() -> Status {
    Status::new(Code::Internal, "handler panicked")
}

/// The headers every answer opens with.
fn put_response_headers(headers: &mut HeaderMap, codec: u8, compress: bool) {
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(headers::content_type(codec)),
    );
    headers.insert(
        GRPC_ACCEPT_ENCODING,
        HeaderValue::from_static(ACCEPT_ENCODING),
    );
    if compress {
        headers.insert(GRPC_ENCODING, HeaderValue::from_static("gzip"));
    }
}

/// An answer with no message: the status (and metadata) in the headers, which end the
/// stream.
fn trailers_only(codec: u8, status: &Status, metadata: &crate::Metadata) -> Response<EdgeBody> {
    let mut response = Response::new(EdgeBody::empty());
    let headers = response.headers_mut();
    put_response_headers(headers, codec, false);
    headers.remove(GRPC_ENCODING);
    let _ = headers::put_metadata(headers, metadata.iter(), true);
    headers::put_status(headers, status);
    response
}

/// The answer of a unary call: its message and OK, or trailers-only for an error.
fn answer(codec: u8, reply: ServerReply, compress: bool) -> Response<EdgeBody> {
    if !reply.status.is_ok() {
        return trailers_only(codec, &reply.status, &reply.metadata);
    }
    let mut frames = VecDeque::with_capacity(3);
    push_message(&mut frames, reply.body, compress);
    let mut trailers = HeaderMap::new();
    headers::put_status(&mut trailers, &reply.status);
    frames.push_back(Frame::trailers(trailers));
    let mut response = Response::new(EdgeBody::Frames(frames));
    let headers = response.headers_mut();
    put_response_headers(headers, codec, compress);
    let _ = headers::put_metadata(headers, reply.metadata.iter(), true);
    response
}

/// Queues one message as DATA: copied behind its prefix when small, else the prefix and
/// the message as frames of their own.
fn push_message(frames: &mut VecDeque<Frame<Bytes>>, body: Bytes, compress: bool) {
    let body = if compress { message::gzip(&body) } else { body };
    if body.len() <= COPY_LIMIT {
        let mut out = BytesMut::with_capacity(PREFIX + body.len());
        message::put_message(&mut out, compress, &body);
        frames.push_back(Frame::data(out.freeze()));
    } else {
        let mut prefix = BytesMut::with_capacity(PREFIX);
        message::put_message(&mut prefix, compress, &[]);
        prefix[1..5].copy_from_slice(&(body.len() as u32).to_be_bytes());
        frames.push_back(Frame::data(prefix.freeze()));
        frames.push_back(Frame::data(body));
    }
}

/// Between a stream call's halves and its driver (this call's body): the one waker to wake
/// when the handler queued messages or took some, and the request bytes it holds.
#[derive(Debug, Default)]
pub(crate) struct Control {
    waker: AtomicWaker,
    /// Request bytes delivered to the handler's stream and not yet taken.
    held: AtomicUsize,
}

impl StreamControl for Control {
    fn ready(&self, _: CallId) -> bool {
        self.waker.wake();
        true
    }

    fn release(&self, _: CallId, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.waker.wake();
    }
}

/// Moves a client stream's messages from the HTTP/2 body into the handler's stream, up to
/// a window of bytes the handler has not taken.
struct Pump {
    body: hyper::body::Incoming,
    decoder: Decoder,
    inbox: Arc<Inbox<()>>,
    window: usize,
    /// Messages decoded and not yet delivered.
    run: VecDeque<Bytes>,
    ended: bool,
}

impl Pump {
    /// Returns the message bytes it delivered.
    fn poll(&mut self, cx: &mut Context<'_>, control: &Control) -> Result<usize, Status> {
        let mut delivered = 0;
        while !self.ended && control.held.load(Ordering::Relaxed) < self.window {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Ok(delivered),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers from a client carry nothing gRPC defines.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.decoder.push(data);
                    let mut len = 0;
                    while let Some(message) = self.decoder.next()? {
                        len += message.len();
                        self.run.push_back(message);
                    }
                    delivered += len;
                    if !self.run.is_empty() {
                        control.held.fetch_add(len, Ordering::Relaxed);
                        if !self.inbox.push(&mut self.run) {
                            // The handler dropped its stream: nobody takes these.
                            control.held.fetch_sub(len, Ordering::Relaxed);
                            self.run.clear();
                        }
                    }
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    if self.decoder.pending() > 0 {
                        return Err(Status::new(
                            Code::Internal,
                            "the request stream ended inside a message",
                        ));
                    }
                    self.inbox.end(());
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    self.inbox.close();
                    return Err(Status::new(
                        Code::Cancelled,
                        format!("the request stream broke: {e}"),
                    ));
                }
            }
        }
        Ok(delivered)
    }
}

type Handler = futures::future::BoxFuture<'static, Result<ServerReply, Box<dyn Any + Send>>>;

/// A stream call once its request has arrived: the handler, the pump of its client stream,
/// its outbox, its deadline; and, as the response body, what goes out next.
struct Call<R: Runtime> {
    /// Ends when the status is queued; dropped before, the call was cancelled.
    watch: Option<WatchGuard>,
    /// How the call ended, once `reply` is set.
    end_as: CallEnd,
    handler: Option<Handler>,
    /// How the handler ended (or the deadline, or a broken request stream).
    reply: Option<ServerReply>,
    pump: Option<Pump>,
    outbox: Option<Arc<Outbox>>,
    control: Arc<Control>,
    deadline: Option<Instant>,
    timer: Option<R::Sleep>,
    runtime: R,
    kind: Option<StreamKind>,
    compress: bool,
    /// Frames ready to go, in order; the trailers last.
    pending: VecDeque<Frame<Bytes>>,
    /// The trailers were queued.
    done: bool,
}

impl<R: Runtime> Call<R> {
    /// Runs everything that can run: the pump, the handler, the deadline.
    fn progress(&mut self, cx: &mut Context<'_>) {
        self.control.waker.register(cx.waker());
        if let Some(pump) = &mut self.pump {
            match pump.poll(cx, &self.control) {
                Ok(bytes) => {
                    if let Some(watch) = self.watch.as_ref().filter(|_| bytes > 0) {
                        watch.request_bytes(bytes);
                    }
                }
                Err(status) => {
                    self.pump = None;
                    let end = answered(&status);
                    self.end(ServerReply::error(status), end);
                }
            }
        }
        if let Some(handler) = &mut self.handler {
            if let Poll::Ready(result) = handler.as_mut().poll(cx) {
                self.handler = None;
                let reply = result.unwrap_or_else(|_| ServerReply::error(panicked()));
                let end = answered(&reply.status);
                self.end(reply, end);
            }
        }
        if self.reply.is_none() {
            if let Some(deadline) = self.deadline {
                let timer = self
                    .timer
                    .get_or_insert_with(|| self.runtime.sleep_until(deadline));
                if Pin::new(timer).poll(cx).is_ready() {
                    let status = Status::new(
                        Code::DeadlineExceeded,
                        "deadline exceeded before the handler finished",
                    );
                    self.end(ServerReply::error(status), CallEnd::DeadlineExceeded);
                }
            }
        }
    }

    /// The call ends with `reply` (the first end wins): the handler is dropped, its stream
    /// takes no more messages, and what it queued before goes out ahead of the status.
    fn end(&mut self, reply: ServerReply, how: CallEnd) {
        if self.reply.is_some() {
            return;
        }
        self.end_as = how;
        self.handler = None;
        self.pump = None;
        if let Some(outbox) = &self.outbox {
            outbox.end();
        }
        self.reply = Some(reply);
    }

    fn has_messages(&self) -> bool {
        !self.pending.is_empty() || self.outbox.as_ref().is_some_and(|o| !o.is_empty())
    }

    /// Queues what the handler sent since the last time, then the end once it came.
    fn collect(&mut self) {
        if let Some(outbox) = &self.outbox {
            let taken = outbox.take();
            if let Some(watch) = self.watch.as_ref().filter(|_| !taken.messages.is_empty()) {
                watch.response_bytes(taken.messages.len());
            }
            if !taken.messages.is_empty() {
                let messages = if self.compress {
                    message::gzip_all(&taken.messages)
                } else {
                    taken.messages
                };
                self.pending.push_back(Frame::data(messages));
            }
        }
        if self.done {
            return;
        }
        let Some(reply) = self.reply.take() else {
            return;
        };
        self.done = true;
        let ServerReply {
            status,
            mut metadata,
            body,
        } = reply;
        // A call with one response sends it as its message.
        if status.is_ok() && !self.kind.is_some_and(|k| k.server_streams()) {
            push_message(&mut self.pending, body, self.compress);
        }
        if let Some(outbox) = &self.outbox {
            metadata.append_all(outbox.take_trailers());
        }
        let mut trailers = HeaderMap::new();
        let _ = headers::put_metadata(&mut trailers, metadata.iter(), true);
        headers::put_status(&mut trailers, &status);
        self.pending.push_back(Frame::trailers(trailers));
        if let Some(watch) = &mut self.watch {
            watch.end(self.end_as, Some(&status));
        }
    }
}

impl<R: Runtime> Body for Call<R> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.pending.is_empty() && !this.done {
            this.progress(cx);
            this.collect();
        }
        match this.pending.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None if this.done => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
