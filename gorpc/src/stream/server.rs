//! A handler's halves of a stream call.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use gorpc_proto::{CallId, Code, Status};

use super::handoff::{Delivery, InboxReader, OutboxSender, StreamControl};
use crate::codec::{Decoder, Encoder};
use crate::metadata::Metadata;

/// The messages of a client stream, as a handler reads them: raw bodies, in order; the
/// stream ends when the client half-closes. Dropping it discards the rest.
pub struct RawRequestStream {
    pub(crate) id: CallId,
    pub(crate) reader: InboxReader<()>,
    pub(crate) control: Arc<dyn StreamControl>,
    pub(crate) done: bool,
}

impl std::fmt::Debug for RawRequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRequestStream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Stream for RawRequestStream {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.reader.poll_next(cx, Some(this.id), &*this.control) {
            Poll::Ready(Delivery::Message(body)) => Poll::Ready(Some(body)),
            Poll::Ready(Delivery::End(()) | Delivery::Gone) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for RawRequestStream {
    fn drop(&mut self) {
        self.reader.close(Some(self.id), &*self.control);
    }
}

/// A client stream's messages decoded with the method's codec. A message that does not
/// decode ends the stream with that error.
pub struct RequestStream<T> {
    raw: RawRequestStream,
    codec: Arc<dyn Decoder<T>>,
    failed: bool,
}

impl<T> std::fmt::Debug for RequestStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<T> RequestStream<T> {
    pub(crate) fn new(raw: RawRequestStream, codec: Arc<dyn Decoder<T>>) -> Self {
        RequestStream {
            raw,
            codec,
            failed: false,
        }
    }

    /// The undecoded stream.
    pub fn into_raw(self) -> RawRequestStream {
        self.raw
    }
}

impl<T: 'static> Stream for RequestStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.raw).poll_next(cx) {
            Poll::Ready(Some(body)) => {
                let item = this.codec.decode(body);
                this.failed = item.is_err();
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The response stream of a call, as a handler writes it: raw bodies in the call's codec.
/// [`send`](Self::send) returns once the message is queued for the connection; it waits
/// only while the client is behind by more than its window and the queue.
pub struct RawResponseSink {
    pub(crate) sender: OutboxSender,
}

impl std::fmt::Debug for RawResponseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponseSink")
            .field("sender", &self.sender)
            .finish()
    }
}

pub(crate) fn call_ended() -> Status {
    Status::new(
        Code::Cancelled,
        "the call ended; its stream takes no more messages",
    )
}

impl RawResponseSink {
    /// Sends one message. Fails with `Cancelled` once the call ended (the client
    /// cancelled, the deadline passed, the connection closed, the handler returned).
    pub async fn send(&mut self, body: Bytes) -> Result<(), Status> {
        self.sender.send_bytes(&body, call_ended).await
    }

    /// Metadata to end the call with (trailers), sent after the messages beside the
    /// handler's status, OK or not; the client reads it from its stream once the stream
    /// ended (`ResponseStream::trailers`). The last set wins; set after the call ended, it
    /// goes nowhere.
    pub fn set_trailers(&mut self, trailers: Metadata) {
        self.sender.outbox.set_trailers(trailers);
    }
}

/// The response stream of a call, typed: messages encoded with the method's codec
/// straight into the call's outbox.
pub struct ResponseSink<T> {
    raw: RawResponseSink,
    codec: Arc<dyn Encoder<T>>,
}

impl<T> std::fmt::Debug for ResponseSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseSink")
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> ResponseSink<T> {
    pub(crate) fn new(raw: RawResponseSink, codec: Arc<dyn Encoder<T>>) -> Self {
        ResponseSink { raw, codec }
    }

    /// Encodes and sends one message; see [`RawResponseSink::send`].
    pub async fn send(&mut self, message: &T) -> Result<(), Status> {
        let codec = &self.codec;
        self.raw
            .sender
            .send(|buf| codec.encode(message, buf), call_ended)
            .await
    }

    /// Metadata to end the call with; see [`RawResponseSink::set_trailers`].
    pub fn set_trailers(&mut self, trailers: Metadata) {
        self.raw.set_trailers(trailers);
    }

    /// The undecoded sink.
    pub fn into_raw(self) -> RawResponseSink {
        self.raw
    }
}
