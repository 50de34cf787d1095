//! A caller's halves of a stream call: a receiver of the server's messages and final
//! status, and a sender of the client's messages.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use gorpc_proto::{CallId, Code, Status};

use super::handoff::{Delivery, InboxReader, Outbox, OutboxSender, StreamControl};
use crate::client::balanced::OpenStream;
use crate::client::{RawResponse, StreamEnd, StreamIdle, Timer};
use crate::codec::{id_name, Decoder, Encoder};
use crate::metadata::Metadata;
use crate::observe::{CallEnd, WatchGuard};
use crate::service::Response;

/// What drives a client's stream call (a binary connection's driver, a gRPC call's), as its
/// halves reach it: they say when messages are queued or taken, and when they give up.
pub(crate) trait StreamDriver: StreamControl {
    /// The application gave up on call `id` before its end.
    fn cancel(&self, id: CallId);
}

/// Gives up on a call whose half was dropped before the call ended.
fn abandon(outbox: &Outbox, driver: &dyn StreamDriver) {
    // Without an id the call has not started; the driver sees the ended outbox instead.
    if let Some(id) = outbox.end() {
        driver.cancel(id);
    }
}

/// The server's side of a stream call: its messages as raw bodies, in order, then the end.
/// A call ending with status OK ends the stream; any other status is the last item, as an
/// `Err`. Dropping the receiver before the end cancels the call on the server.
pub struct RawStreamReceiver {
    reader: InboxReader<StreamEnd>,
    outbox: Arc<Outbox>,
    /// The call's id, once read from the outbox (the call may start after this exists).
    id: Option<CallId>,
    commands: Arc<dyn StreamDriver>,
    /// The call ended and its end was handed out.
    done: bool,
    /// A stream to a discovered instance counts as open on it until it ends.
    open: Option<OpenStream>,
    /// The metadata the call ended with, once its end was handed out.
    trailers: Option<Metadata>,
    /// Reports the call's end (dropped unended: cancelled).
    watch: Option<WatchGuard>,
    /// Gives up on a server that went quiet.
    idle: Option<IdleWait>,
}

/// How long the receiver may wait for the server's next message.
struct IdleWait {
    timeout: Duration,
    timer: Timer,
    /// Armed while the receiver waits; when it fires, the wait is over unless a message
    /// came since (then it is armed again for the rest).
    sleep: Option<BoxFuture<'static, ()>>,
    /// When the last message (or the start) came.
    last: Instant,
}

impl IdleWait {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let due = self.last + self.timeout;
            let sleep = self.sleep.get_or_insert_with(|| (self.timer)(due));
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            self.sleep = None;
            if Instant::now() >= self.last + self.timeout {
                return true;
            }
        }
    }
}

impl std::fmt::Debug for RawStreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStreamReceiver")
            .field("id", &self.outbox.id())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

fn driver_gone() -> Status {
    Status::new(Code::Unavailable, "the connection's driver stopped")
}

impl RawStreamReceiver {
    pub(crate) fn new(
        reader: InboxReader<StreamEnd>,
        outbox: Arc<Outbox>,
        commands: Arc<dyn StreamDriver>,
    ) -> Self {
        RawStreamReceiver {
            reader,
            outbox,
            id: None,
            commands,
            done: false,
            open: None,
            trailers: None,
            watch: None,
            idle: None,
        }
    }

    /// Watched by `watch` to its end; given up after `idle` without a message.
    pub(crate) fn watched(mut self, watch: WatchGuard, idle: Option<StreamIdle>) -> Self {
        self.watch = Some(watch);
        self.idle = idle.map(|idle| IdleWait {
            timeout: idle.timeout,
            timer: idle.timer,
            sleep: None,
            last: Instant::now(),
        });
        self
    }

    /// The metadata the server ended the call with (its handler's trailers), once this
    /// stream handed out its end: after the last item, OK or not. `None` before that, or
    /// when the call ended without an answer (a broken connection, a local deadline).
    pub fn trailers(&self) -> Option<&Metadata> {
        self.trailers.as_ref()
    }

    /// Holds `open` until the call's end is handed out or the receiver is dropped.
    pub(crate) fn counted_open(mut self, open: OpenStream) -> Self {
        self.open = Some(open);
        self
    }

    /// The call's end was handed out: `end` is what it was.
    fn end(&mut self, end: &Delivery<StreamEnd>) {
        self.done = true;
        self.open = None;
        self.idle = None;
        if let Some(watch) = &mut self.watch {
            match end {
                Delivery::End(Ok(answer)) => {
                    watch.response_bytes(answer.body.len());
                    watch.end(
                        CallEnd::Answered(answer.status.code()),
                        Some(&answer.status),
                    );
                }
                Delivery::End(Err(status)) => {
                    watch.end(CallEnd::of_client_error(status), Some(status));
                }
                Delivery::Gone | Delivery::Message(_) => {
                    watch.end(CallEnd::ConnectionLost, None);
                }
            }
        }
    }

    /// Waits for the call's end, skipping any message, and returns its single response
    /// (client-streaming calls).
    pub async fn response(mut self) -> Result<RawResponse, Status> {
        loop {
            let event = std::future::poll_fn(|cx| self.poll_event(cx)).await;
            if !matches!(event, Delivery::Message(_)) {
                self.end(&event);
            }
            match event {
                Delivery::Message(_) => {}
                Delivery::End(result) => {
                    let rsp = result?;
                    if !rsp.status.is_ok() {
                        return Err(rsp.status);
                    }
                    return Ok(RawResponse {
                        codec: rsp.codec,
                        metadata: rsp.metadata,
                        body: rsp.body,
                    });
                }
                Delivery::Gone => return Err(driver_gone()),
            }
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Delivery<StreamEnd>> {
        if self.id.is_none() {
            self.id = self.outbox.id();
        }
        let polled = self.reader.poll_next(cx, self.id, &*self.commands);
        match &polled {
            Poll::Ready(Delivery::Message(body)) => {
                if let Some(watch) = &self.watch {
                    watch.response_bytes(body.len());
                }
                if let Some(idle) = &mut self.idle {
                    idle.last = Instant::now();
                }
            }
            Poll::Pending => {
                let expired = self.idle.as_mut().is_some_and(|idle| idle.expired(cx));
                if let (true, Some(idle)) = (expired, &self.idle) {
                    let waited = idle.timeout;
                    abandon(&self.outbox, &*self.commands);
                    let status = Status::deadline_exceeded(format!(
                        "no message from the server for {waited:?} (the stream idle timeout)"
                    ));
                    return Poll::Ready(Delivery::End(Err(status)));
                }
            }
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl Stream for RawStreamReceiver {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let event = match this.poll_event(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(event) => event,
        };
        if !matches!(event, Delivery::Message(_)) {
            this.end(&event);
        }
        match event {
            Delivery::Message(body) => Poll::Ready(Some(Ok(body))),
            Delivery::End(result) => match result {
                Ok(rsp) => {
                    this.trailers = Some(rsp.metadata);
                    if rsp.status.is_ok() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Err(rsp.status)))
                    }
                }
                Err(status) => Poll::Ready(Some(Err(status))),
            },
            Delivery::Gone => Poll::Ready(Some(Err(driver_gone()))),
        }
    }
}

impl Drop for RawStreamReceiver {
    fn drop(&mut self) {
        if !self.done {
            abandon(&self.outbox, &*self.commands);
        }
        self.reader.close(self.outbox.id(), &*self.commands);
    }
}

/// The client's side of a client-streaming or bidirectional call. [`send`](Self::send)
/// waits for flow-control credit. End the stream with [`close_send`](Self::close_send);
/// dropping the sender without it cancels the call.
pub struct RawStreamSender {
    sender: OutboxSender,
    commands: Arc<dyn StreamDriver>,
    closed: bool,
}

impl std::fmt::Debug for RawStreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStreamSender")
            .field("id", &self.sender.outbox.id())
            .finish_non_exhaustive()
    }
}

fn stream_ended() -> Status {
    Status::new(
        Code::Cancelled,
        "the call ended; its receiver holds the final status",
    )
}

impl RawStreamSender {
    pub(crate) fn new(outbox: Arc<Outbox>, commands: Arc<dyn StreamDriver>) -> Self {
        RawStreamSender {
            sender: OutboxSender {
                outbox,
                control: commands.clone(),
            },
            commands,
            closed: false,
        }
    }

    /// Sends one message. It is queued for the connection at once; this waits only until
    /// the call started, and while the server is behind by more than its window and the
    /// queue. Fails with `Cancelled` once the call ended; the receiving half then holds why.
    pub async fn send(&mut self, body: Bytes) -> Result<(), Status> {
        self.sender.send_bytes(&body, stream_ended).await
    }

    async fn send_encoded<T: 'static>(
        &mut self,
        codec: &dyn Encoder<T>,
        message: &T,
    ) -> Result<(), Status> {
        self.sender
            .send(|buf| codec.encode(message, buf), stream_ended)
            .await
    }

    /// Ends the client's stream (half-close) after the messages sent so far; the server's
    /// messages and status still come. Never waits for credit.
    pub async fn close_send(mut self) -> Result<(), Status> {
        self.closed = true;
        self.sender.close_send(stream_ended)
    }
}

impl Drop for RawStreamSender {
    fn drop(&mut self) {
        if !self.closed {
            abandon(&self.sender.outbox, &*self.commands);
        }
    }
}

fn check_codec(got: u8, expected: u8, name: &str) -> Result<(), Status> {
    if got == expected {
        return Ok(());
    }
    Err(Status::new(
        Code::Internal,
        format!(
            "server answered in codec {got} ({}), expected {name}",
            id_name(got)
        ),
    ))
}

/// A stream of the server's messages decoded with the method's codec; ends like
/// [`RawStreamReceiver`].
pub struct ResponseStream<T> {
    raw: RawStreamReceiver,
    codec: Arc<dyn Decoder<T>>,
}

impl<T> std::fmt::Debug for ResponseStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> ResponseStream<T> {
    pub(crate) fn new(raw: RawStreamReceiver, codec: Arc<dyn Decoder<T>>) -> Self {
        ResponseStream { raw, codec }
    }

    /// The metadata the server ended the call with; see [`RawStreamReceiver::trailers`].
    pub fn trailers(&self) -> Option<&Metadata> {
        self.raw.trailers()
    }

    /// The undecoded stream.
    pub fn into_raw(self) -> RawStreamReceiver {
        self.raw
    }
}

impl<T: 'static> Stream for ResponseStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.raw.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(body))) => Poll::Ready(Some(this.codec.decode(body))),
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The client's messages, encoded with the method's codec straight into the call's outbox.
pub struct StreamSender<T> {
    raw: RawStreamSender,
    codec: Arc<dyn Encoder<T>>,
}

impl<T> std::fmt::Debug for StreamSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> StreamSender<T> {
    pub(crate) fn new(raw: RawStreamSender, codec: Arc<dyn Encoder<T>>) -> Self {
        StreamSender { raw, codec }
    }

    /// Encodes and sends one message; see [`RawStreamSender::send`].
    pub async fn send(&mut self, message: &T) -> Result<(), Status> {
        self.raw.send_encoded(&*self.codec, message).await
    }

    /// Ends the client's stream; see [`RawStreamSender::close_send`].
    pub async fn close_send(self) -> Result<(), Status> {
        self.raw.close_send().await
    }
}

/// A client-streaming call in progress: send messages, then [`finish`](Self::finish) for
/// the one response. Dropping it without finishing cancels the call.
pub struct ClientStreaming<Req, Rsp> {
    sender: StreamSender<Req>,
    receiver: RawStreamReceiver,
    codec: Arc<dyn Decoder<Rsp>>,
}

impl<Req, Rsp> std::fmt::Debug for ClientStreaming<Req, Rsp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStreaming")
            .field("receiver", &self.receiver)
            .finish_non_exhaustive()
    }
}

impl<Req: 'static, Rsp: 'static> ClientStreaming<Req, Rsp> {
    pub(crate) fn new(
        sender: StreamSender<Req>,
        receiver: RawStreamReceiver,
        codec: Arc<dyn Decoder<Rsp>>,
    ) -> Self {
        ClientStreaming {
            sender,
            receiver,
            codec,
        }
    }

    /// Sends one message, waiting for credit. An `Err` means the call ended: `finish`
    /// gives its status.
    pub async fn send(&mut self, message: &Req) -> Result<(), Status> {
        self.sender.send(message).await
    }

    /// Ends the client's stream and waits for the response.
    pub async fn finish(self) -> Result<Response<Rsp>, Status> {
        let ClientStreaming {
            sender,
            receiver,
            codec,
        } = self;
        // If the call already ended, the receiver has the reason.
        let _ = sender.close_send().await;
        let raw = receiver.response().await?;
        check_codec(raw.codec, codec.id(), codec.name())?;
        Ok(Response {
            message: codec.decode(raw.body)?,
            metadata: raw.metadata,
        })
    }
}

/// A bidirectional call in progress: the sender of the client's messages and the stream of
/// the server's, each usable on its own (from two tasks if need be). Close the sender
/// with [`StreamSender::close_send`] when done sending; dropping it first cancels the call.
pub struct Bidi<Req, Rsp> {
    /// Sends the client's messages.
    pub sender: StreamSender<Req>,
    /// The server's messages, then its status.
    pub responses: ResponseStream<Rsp>,
}

impl<Req, Rsp> std::fmt::Debug for Bidi<Req, Rsp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bidi")
            .field("sender", &self.sender)
            .field("responses", &self.responses)
            .finish()
    }
}

impl<Req, Rsp> Bidi<Req, Rsp> {
    /// The two halves, to move them apart.
    pub fn into_parts(self) -> (StreamSender<Req>, ResponseStream<Rsp>) {
        (self.sender, self.responses)
    }
}
