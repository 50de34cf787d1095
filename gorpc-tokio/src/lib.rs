//! gorpc-rs on tokio. Re-exports [`gorpc`], so this is the one crate a tokio user needs.
//!
//! ```no_run
//! use gorpc_tokio::{Router, Status};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move { Ok::<_, Status>(s) });
//! let server = gorpc_tokio::serve("127.0.0.1:0".parse()?, router).await?;
//! let client = gorpc_tokio::connect(server.local_addr()).await?;
//! let reply: String = client.call("/echo.Echo/Say", &"hi").await?;
//! # Ok(()) }
//! ```
//!
//! [`connect`], [`serve`], [`client()`] and [`server()`] are `Client::connect`,
//! `Server::bind`, `Client::builder` and `Server::new` on the current runtime
//! ([`Tokio::current`]); pass a [`Tokio`] to those for another.
//!
//! Everything here is the few lines that bind gorpc's drivers to tokio's sockets, timers
//! and tasks; the drivers themselves live in `gorpc`.

#![forbid(unsafe_code)]

pub use gorpc::*;

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;

/// A client of `addr` with the default settings ([`ClientConfig::default`]),
/// on the current tokio runtime, connected before this returns:
/// `Client::connect(Tokio::current(), addr, ClientConfig::default())`.
///
/// Panics outside a tokio runtime, as [`Tokio::current`] does.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = gorpc_tokio::connect("127.0.0.1:50051".parse()?).await?;
/// let reply: String = client.call("/echo.Echo/Say", &"hi").await?;
/// # Ok(()) }
/// ```
pub async fn connect(addr: SocketAddr) -> Result<Client, Status> {
    Client::connect(Tokio::current(), addr, ClientConfig::default()).await
}

/// Serves `service` (a [`Router`], a generated server...) on `addr`,
/// on the current tokio runtime, with the default settings:
/// `Server::new(Tokio::current(), service).bind(addr)`.
/// [`server()`] gives the builder for TLS, HTTP, interceptors and the rest.
///
/// Panics outside a tokio runtime, as [`Tokio::current`] does.
///
/// ```no_run
/// use gorpc_tokio::{Router, Status};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move {
///     Ok::<_, Status>(s)
/// });
/// let server = gorpc_tokio::serve("127.0.0.1:50051".parse()?, router).await?;
/// println!("listening on {}", server.local_addr());
/// # Ok(()) }
/// ```
pub async fn serve(addr: SocketAddr, service: impl Service) -> io::Result<ServerHandle<Tokio>> {
    Server::new(Tokio::current(), service).bind(addr).await
}

/// A server of `service` on the current tokio runtime, to configure before
/// [`bind`](Server::bind): `Server::new(Tokio::current(), service)`.
///
/// Panics outside a tokio runtime, as [`Tokio::current`] does.
///
/// ```no_run
/// use std::time::Duration;
/// use gorpc_tokio::{Router, Status};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move {
///     Ok::<_, Status>(s)
/// });
/// let server = gorpc_tokio::server(router).bind("127.0.0.1:50051".parse()?).await?;
/// server.shutdown(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
pub fn server(service: impl Service) -> Server<Tokio> {
    Server::new(Tokio::current(), service)
}

/// A client builder on the current tokio runtime: `Client::builder(Tokio::current())`.
///
/// Panics outside a tokio runtime, as [`Tokio::current`] does.
///
/// ```no_run
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = gorpc_tokio::client()
///     .endpoint("127.0.0.1:50051".parse()?)
///     .timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
pub fn client() -> client::ClientBuilder<Tokio> {
    Client::builder(Tokio::current())
}

/// The tokio runtime, as gorpc's drivers use it: tasks go to the captured runtime handle.
#[derive(Clone, Debug)]
pub struct Tokio {
    handle: Handle,
}

impl Tokio {
    /// The runtime this is called from. Panics outside a tokio runtime, like `tokio::spawn`.
    pub fn current() -> Self {
        Tokio {
            handle: Handle::current(),
        }
    }

    /// The runtime behind `handle`, for code outside it (another runtime's thread, `main`).
    pub fn from_handle(handle: Handle) -> Self {
        Tokio { handle }
    }
}

/// A TCP stream read straight into the spare capacity of gorpc's buffers.
#[derive(Debug)]
pub struct TokioIo(TcpStream);

impl TokioIo {
    /// Adopts a connected stream, setting `TCP_NODELAY`.
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(TokioIo(stream))
    }
}

impl gorpc::runtime::Io for TokioIo {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(&mut self.0), cx, &mut buf.limit(max.max(1)))
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A resettable tokio timer.
#[derive(Debug)]
pub struct TokioSleep(Pin<Box<tokio::time::Sleep>>);

impl Future for TokioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl gorpc::runtime::Sleep for TokioSleep {
    fn reset(&mut self, deadline: Instant) {
        self.0.as_mut().reset(deadline.into());
    }
}

/// A tokio TCP listener whose connections are [`TokioIo`]s.
#[derive(Debug)]
pub struct TokioListener(TcpListener);

impl gorpc::runtime::Listener for TokioListener {
    type Io = TokioIo;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TokioIo, SocketAddr)>> {
        self.0
            .poll_accept(cx)
            .map(|r| r.and_then(|(stream, peer)| Ok((TokioIo::new(stream)?, peer))))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    #[cfg(unix)]
    fn accept_ready(&self) -> io::Result<Option<(TokioIo, SocketAddr)>> {
        // tokio's own accept trusts the readiness its reactor last saw, which may predate
        // the connection: ask the kernel.
        match gorpc::runtime::accept_ready(&self.0)? {
            Some((stream, peer)) => Ok(Some((TokioIo::new(TcpStream::from_std(stream)?)?, peer))),
            None => Ok(None),
        }
    }
}

/// A UDP socket on tokio's reactor.
#[derive(Debug)]
pub struct TokioUdpSocket(UdpSocket);

impl gorpc::runtime::UdpSocket for TokioUdpSocket {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        let mut buf = ReadBuf::new(buf);
        self.0
            .poll_recv_from(cx, &mut buf)
            .map_ok(|from| (buf.filled().len(), from))
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        datagram: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        self.0.poll_send_to(cx, datagram, target)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl gorpc::Runtime for Tokio {
    type Io = TokioIo;
    type Listener = TokioListener;
    type Sleep = TokioSleep;
    type UdpSocket = TokioUdpSocket;

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(future);
    }

    fn sleep_until(&self, deadline: Instant) -> TokioSleep {
        let _entered = self.handle.enter();
        TokioSleep(Box::pin(tokio::time::sleep_until(deadline.into())))
    }

    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<TokioIo>> + Send {
        // Connect on the captured runtime, so that callers polling from another executor
        // still get a socket registered with this runtime's reactor.
        let connecting = self.handle.spawn(TcpStream::connect(addr));
        async move {
            let stream = connecting.await.map_err(io::Error::other)??;
            TokioIo::new(stream)
        }
    }

    fn bind(
        &self,
        addr: SocketAddr,
        backlog: u32,
    ) -> impl Future<Output = io::Result<TokioListener>> + Send {
        // Binding does not block; registering with the reactor needs the runtime entered.
        let bound = gorpc::runtime::tcp_listener(addr, backlog).and_then(|l| {
            let _entered = self.handle.enter();
            TcpListener::from_std(l)
        });
        std::future::ready(bound.map(TokioListener))
    }

    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<TokioUdpSocket>> + Send {
        let bound = std::net::UdpSocket::bind(addr).and_then(|s| {
            s.set_nonblocking(true)?;
            let _entered = self.handle.enter();
            UdpSocket::from_std(s)
        });
        std::future::ready(bound.map(TokioUdpSocket))
    }
}
