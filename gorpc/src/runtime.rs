//! What a runtime adapter provides: sockets, a resettable timer and task spawning. Everything
//! else (connection drivers, pools, servers) is written once, here, over these traits.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use rustls_pki_types::CertificateDer;

/// The listen backlog servers ask for unless configured otherwise
/// ([`ServerConfig::listen_backlog`](crate::ServerConfig::listen_backlog)). A burst of
/// connects beyond the backlog has its SYNs dropped and waits a second to retry; Linux caps
/// the number at `net.core.somaxconn` (4096 by default since 5.4).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;

/// A non-blocking TCP listener on `addr` with the given backlog, for a runtime to adopt
/// (what [`Runtime::bind`] implementations build on). `SO_REUSEADDR` is set on Unix, as
/// std's own bind does, so a restarted server can bind the port its predecessor left.
pub fn tcp_listener(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The certificate chain a peer presented (end entity first), shared by every request of
/// its connection.
pub type PeerCertificates = Arc<[CertificateDer<'static>]>;

/// A connected byte stream (TCP today; TLS and others wrap one).
pub trait Io: Send + Unpin + 'static {
    /// Reads at most `max` bytes (at least 1) into the spare capacity of `buf`, appending
    /// (`buf` may grow if it has less room). `Ok(0)` means end of stream. The caller sizes
    /// reads by what it expects, independently of how large a buffer it keeps for reuse.
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<usize>>;

    /// Writes from `bufs` in order and returns how many bytes it took, possibly fewer than
    /// offered.
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>>;

    /// Writes out whatever an earlier `poll_write_vectored` accepted but kept back (a TLS
    /// session's encrypted records). Called by the drivers once their own queue is empty;
    /// plain sockets keep nothing back.
    #[inline]
    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Closes the write side once everything written has been flushed.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The connection has nothing in flight: release memory kept between reads, so that
    /// idle connections stay small.
    fn release_buffers(&mut self) {}

    /// The certificates the peer authenticated with (mutual TLS), once the handshake is
    /// done. `None` for plain sockets and for TLS peers that sent none.
    fn peer_certificates(&self) -> Option<PeerCertificates> {
        None
    }

    /// The application protocol the handshake chose (TLS ALPN: `h2`, `http/1.1`), if any.
    fn alpn_protocol(&self) -> Option<&[u8]> {
        None
    }
}

/// A timer that can be re-armed without allocating.
pub trait Sleep: Future<Output = ()> + Send + Sync + Unpin + 'static {
    /// Re-arms the timer to fire at `deadline` (at once if it has passed).
    fn reset(&mut self, deadline: Instant);
}

/// A bound listening socket.
pub trait Listener: Send + Sync + 'static {
    /// The connections it accepts.
    type Io: Io;

    /// Accepts one connection, with the peer's address.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, SocketAddr)>>;

    /// The address it is bound to (with the port the system chose for port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Takes a connection the kernel has already completed, without waiting and whatever
    /// the reactor last reported: `Ok(None)` when there is none. A draining server takes
    /// these before it closes the port, which would reset them. The default sees none.
    fn accept_ready(&self) -> io::Result<Option<(Self::Io, SocketAddr)>> {
        Ok(None)
    }
}

/// [`Listener::accept_ready`] for a listener with a file descriptor: one `accept` call
/// straight to the kernel. The connection comes back non-blocking.
#[cfg(unix)]
pub fn accept_ready(
    listener: &impl std::os::fd::AsFd,
) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
    let listener = socket2::SockRef::from(listener);
    loop {
        match listener.accept() {
            Ok((socket, peer)) => {
                socket.set_nonblocking(true)?;
                let peer = peer
                    .as_socket()
                    .ok_or_else(|| io::Error::other("a TCP peer without an IP address"))?;
                return Ok(Some((socket.into(), peer)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A bound UDP socket. Methods take `&self`, like the runtimes' own sockets, so receiving
/// and sending can wait at the same time.
pub trait UdpSocket: Send + Sync + Unpin + 'static {
    /// Receives one datagram into `buf`, returning its length and sender. A datagram longer
    /// than `buf` is cut to it (the drivers pass 64 KiB, the largest UDP payload).
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>>;

    /// Sends `datagram` to `target` as one datagram.
    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        datagram: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>>;

    /// The address it is bound to (with the port the system chose for port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// An async runtime, as the drivers see it. Implemented by gorpc-tokio and gorpc-smol.
pub trait Runtime: Clone + Send + Sync + Unpin + 'static {
    /// A TCP connection.
    type Io: Io;
    /// A TCP listener.
    type Listener: Listener<Io = Self::Io>;
    /// The resettable timer.
    type Sleep: Sleep;
    /// A UDP socket.
    type UdpSocket: UdpSocket;

    /// Runs a task to completion in the background.
    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static;

    /// A timer that fires at `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Self::Sleep;

    /// Opens a TCP connection with `TCP_NODELAY` set.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// Listens on `addr` with room for `backlog` connections the kernel has completed and
    /// the accept loop has not taken yet ([`tcp_listener`] builds such a socket).
    fn bind(
        &self,
        addr: SocketAddr,
        backlog: u32,
    ) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Binds a UDP socket to `addr` (port 0: any free port).
    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::UdpSocket>> + Send;
}

/// Runs `future` unless `deadline` passes first.
pub(crate) async fn timeout<R: Runtime, T>(
    runtime: &R,
    deadline: Instant,
    future: impl Future<Output = T>,
) -> Option<T> {
    let mut future = std::pin::pin!(future);
    let mut sleep = runtime.sleep_until(deadline);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        match Pin::new(&mut sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}
