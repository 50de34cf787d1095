//! TLS over any [`Io`], written once for every runtime: rustls's own sans-IO session
//! (`read_tls`, `process_new_packets`, `reader`, `writer`, `write_tls`) driven from the
//! [`Io`] methods the connection drivers already call. The handshake runs inside those
//! calls (or up front, through [`TlsIo::handshake`]); shutting down sends `close_notify`.
//!
//! Servers take a [`rustls::ServerConfig`] through `Server::tls`; clients a [`ClientTls`]
//! in `ConnectionConfig::tls`. With a client certificate verifier on the server (mutual
//! TLS), handlers see the client's chain through `ServerRequest::peer_certificates`.

use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
pub use rustls;
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::runtime::{Io, PeerCertificates};

/// Room the ciphertext buffer is given before a read: one full TLS record and its header.
const RECORD_CHUNK: usize = 16 * 1024 + 512;
/// Plaintext read per call when the caller's buffer has no spare room.
const PLAINTEXT_CHUNK: usize = 16 * 1024;

/// What a client needs to open TLS connections.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The rustls client settings: roots to trust, a client certificate for mutual TLS.
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry (a DNS name or an IP address).
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// Connections with `config`, checking the server's certificate against `server_name`.
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        ClientTls {
            config,
            server_name,
        }
    }
}

/// A TLS session over a connected stream `I`; itself an [`Io`], so the drivers run over it
/// unchanged.
pub struct TlsIo<I: Io> {
    io: I,
    session: rustls::Connection,
    /// Ciphertext read from `io` and not yet handed to the session.
    rx: BytesMut,
    /// Decrypted bytes waiting in the session.
    plaintext: usize,
    /// `io` reached end of stream.
    eof: bool,
    /// The peer sent `close_notify`.
    peer_closed: bool,
    close_sent: bool,
}

impl<I: Io> std::fmt::Debug for TlsIo<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIo")
            .field("handshaking", &self.session.is_handshaking())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<I: Io> TlsIo<I> {
    /// The client end of a session with `server_name`.
    pub fn client(
        io: I,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        let session = rustls::ClientConnection::new(config, server_name)?;
        Ok(Self::with_session(io, session.into()))
    }

    /// The server end of a session.
    pub fn server(io: I, config: Arc<rustls::ServerConfig>) -> Result<Self, rustls::Error> {
        let session = rustls::ServerConnection::new(config)?;
        Ok(Self::with_session(io, session.into()))
    }

    fn with_session(io: I, session: rustls::Connection) -> Self {
        TlsIo {
            io,
            session,
            rx: BytesMut::new(),
            plaintext: 0,
            eof: false,
            peer_closed: false,
            close_sent: false,
        }
    }

    /// The rustls session, e.g. for the negotiated protocol version or ALPN.
    pub fn session(&self) -> &rustls::Connection {
        &self.session
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Completes the handshake. Not required (reads and writes complete it as needed), but
    /// it lets a caller bound it with a timeout and see its error before anything else.
    pub fn handshake(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_handshake(cx))
    }

    /// Drives the handshake until the session is established.
    pub fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_tls(cx))?;
            if !self.session.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if !self.session.wants_read() || ready!(self.poll_read_tls(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the TLS handshake",
                )));
            }
        }
    }

    /// Writes the session's pending records to `io`.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.wants_write() {
            let mut writer = SyncWriter {
                io: &mut self.io,
                cx,
            };
            match self.session.write_tls(&mut writer) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads ciphertext once and processes it. `Ok(0)`: `io` reached end of stream.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rx.is_empty() {
            if self.eof {
                return Poll::Ready(Ok(0));
            }
            if self.rx.capacity() < RECORD_CHUNK / 4 {
                self.rx.reserve(RECORD_CHUNK);
            }
            let room = self.rx.capacity() - self.rx.len();
            if ready!(self.io.poll_read_buf(cx, &mut self.rx, room))? == 0 {
                self.eof = true;
                // Tells the session the stream ended (a read of nothing).
                let _ = self.session.read_tls(&mut io::empty());
                self.process(cx)?;
                return Poll::Ready(Ok(0));
            }
        }
        let n = self.session.read_tls(&mut &self.rx[..])?;
        self.rx.advance(n);
        self.process(cx)?;
        Poll::Ready(Ok(n.max(1)))
    }

    fn process(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.session.process_new_packets() {
            Ok(state) => {
                self.plaintext = state.plaintext_bytes_to_read();
                self.peer_closed |= state.peer_has_closed();
                Ok(())
            }
            Err(e) => {
                // Best effort: tell the peer why (the session queued an alert).
                let _ = self.poll_flush_tls(cx);
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Moves decrypted bytes into `buf`. `None`: none waiting and the stream goes on.
    fn read_plaintext(&mut self, buf: &mut BytesMut, max: usize) -> Option<io::Result<usize>> {
        if self.plaintext == 0 {
            // End of stream, with or without close_notify: the framing above notices a
            // truncated frame either way.
            return (self.peer_closed || self.eof).then_some(Ok(0));
        }
        let start = buf.len();
        let room = match buf.capacity() - start {
            0 => PLAINTEXT_CHUNK,
            room => room,
        }
        .min(max.max(1));
        // Zero-filled rather than uninitialised (no unsafe code), and only as much as is
        // there to read.
        buf.resize(start + room.min(self.plaintext), 0);
        let read = self.session.reader().read(&mut buf[start..]);
        let n = *read.as_ref().unwrap_or(&0);
        buf.truncate(start + n);
        self.plaintext -= n.min(self.plaintext);
        Some(read)
    }
}

impl<I: Io> Io for TlsIo<I> {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(result) = self.read_plaintext(buf, max) {
                return Poll::Ready(result);
            }
            // Handshake messages, tickets and alerts the session wants sent; a full socket
            // does not stop reading.
            if let Poll::Ready(Err(e)) = self.poll_flush_tls(cx) {
                return Poll::Ready(Err(e));
            }
            ready!(self.poll_read_tls(cx))?;
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_flush_tls(cx))?;
        if self.session.is_handshaking() {
            ready!(self.poll_handshake(cx))?;
            // The handshake may have read past its own records: make sure the reader looks.
            if self.plaintext > 0 || !self.rx.is_empty() {
                cx.waker().wake_by_ref();
            }
        }
        let n = self.session.writer().write_vectored(bufs)?;
        // Sent now if the socket takes it; otherwise `poll_flush` finishes the job.
        if let Poll::Ready(Err(e)) = self.poll_flush_tls(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush_tls(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            self.close_sent = true;
            self.session.send_close_notify();
        }
        ready!(self.poll_flush_tls(cx))?;
        self.io.poll_shutdown(cx)
    }

    fn release_buffers(&mut self) {
        if self.rx.is_empty() {
            self.rx = BytesMut::new();
        }
        self.io.release_buffers();
    }

    fn peer_certificates(&self) -> Option<PeerCertificates> {
        self.session
            .peer_certificates()
            .filter(|chain| !chain.is_empty())
            .map(Arc::from)
    }

    fn alpn_protocol(&self) -> Option<&[u8]> {
        self.session.alpn_protocol()
    }
}

/// `io` as a blocking writer for rustls's `write_tls`: a full socket is `WouldBlock`, with
/// the task registered for wake-up.
struct SyncWriter<'a, 'b, I> {
    io: &'a mut I,
    cx: &'a mut Context<'b>,
}

impl<I: Io> Write for SyncWriter<'_, '_, I> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.io.poll_write_vectored(self.cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
