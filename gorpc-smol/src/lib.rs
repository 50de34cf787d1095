//! gorpc-rs on smol (async-io sockets and timers). Re-exports [`gorpc`], so this is the one
//! crate a smol user needs. The sockets and timers work under any executor; tasks go to
//! smol's global executor unless a spawner is given, e.g. async-std's:
//!
//! ```no_run
//! let runtime = gorpc_smol::Smol::with_spawner(|task| {
//!     // async_std::task::spawn(task);
//!     # drop(task);
//! });
//! ```
//!
//! [`connect`], [`serve`], [`client()`] and [`server()`] are `Client::connect`,
//! `Server::bind`, `Client::builder` and `Server::new` on [`Smol::new`]:
//!
//! ```no_run
//! use gorpc_smol::{Router, Status};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move { Ok::<_, Status>(s) });
//! let server = gorpc_smol::serve("127.0.0.1:0".parse()?, router).await?;
//! let client = gorpc_smol::connect(server.local_addr()).await?;
//! let reply: String = client.call("/echo.Echo/Say", &"hi").await?;
//! # Ok(()) }
//! ```

// One audited exception: `recv_into_spare`.
#![deny(unsafe_code)]

pub use gorpc::*;

use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use async_io::{Async, Timer};
use bytes::BytesMut;
use futures::io::AsyncWrite;
use futures::FutureExt;

type Spawner = Arc<dyn Fn(BoxFuture<'static, ()>) + Send + Sync>;

/// A client of `addr` with the default settings ([`ClientConfig::default`]),
/// on smol (tasks on its global executor), connected before this returns:
/// `Client::connect(Smol::new(), addr, ClientConfig::default())`.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = gorpc_smol::connect("127.0.0.1:50051".parse()?).await?;
/// let reply: String = client.call("/echo.Echo/Say", &"hi").await?;
/// # Ok(()) }
/// ```
pub async fn connect(addr: SocketAddr) -> Result<Client, Status> {
    Client::connect(Smol::new(), addr, ClientConfig::default()).await
}

/// Serves `service` (a [`Router`], a generated server...) on `addr`,
/// on smol (tasks on its global executor), with the default settings:
/// `Server::new(Smol::new(), service).bind(addr)`.
/// [`server()`] gives the builder for TLS, HTTP, interceptors and the rest.
///
/// ```no_run
/// use gorpc_smol::{Router, Status};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move {
///     Ok::<_, Status>(s)
/// });
/// let server = gorpc_smol::serve("127.0.0.1:50051".parse()?, router).await?;
/// println!("listening on {}", server.local_addr());
/// # Ok(()) }
/// ```
pub async fn serve(addr: SocketAddr, service: impl Service) -> io::Result<ServerHandle<Smol>> {
    Server::new(Smol::new(), service).bind(addr).await
}

/// A server of `service` on smol (tasks on its global executor), to configure before
/// [`bind`](Server::bind): `Server::new(Smol::new(), service)`.
///
/// ```no_run
/// use std::time::Duration;
/// use gorpc_smol::{Router, Status};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move {
///     Ok::<_, Status>(s)
/// });
/// let server = gorpc_smol::server(router).bind("127.0.0.1:50051".parse()?).await?;
/// server.shutdown(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
pub fn server(service: impl Service) -> Server<Smol> {
    Server::new(Smol::new(), service)
}

/// A client builder on smol (tasks on its global executor): `Client::builder(Smol::new())`.
///
/// ```no_run
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = gorpc_smol::client()
///     .endpoint("127.0.0.1:50051".parse()?)
///     .timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
pub fn client() -> client::ClientBuilder<Smol> {
    Client::builder(Smol::new())
}

/// The smol runtime, as gorpc's drivers use it.
#[derive(Clone, Default)]
pub struct Smol {
    spawner: Option<Spawner>,
}

impl fmt::Debug for Smol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smol")
            .field("custom_spawner", &self.spawner.is_some())
            .finish()
    }
}

impl Smol {
    /// Tasks run on smol's global executor.
    pub fn new() -> Self {
        Smol::default()
    }

    /// Tasks run wherever `spawn` puts them (async-std, an `async_executor::Executor`...).
    pub fn with_spawner(spawn: impl Fn(BoxFuture<'static, ()>) + Send + Sync + 'static) -> Self {
        Smol {
            spawner: Some(Arc::new(spawn)),
        }
    }
}

/// Room a read is given: small while reads are small, doubling while reads fill it, and
/// never more than gorpc asks for (the rest of a frame and 16 KiB, or inside a large
/// frame all its buffer's room). Up to 128 KiB rather than 16 KiB, one stream of 1 KiB
/// messages went from 2.71-2.82M to 3.01-3.09M messages/s and eight from 3.49-3.81M to
/// 3.84-4.24M (alternating runs): zeroing costs the same per byte however it is split,
/// and each read saved is a system call.
const READ_MIN: usize = 2 * 1024;
const READ_MAX: usize = 128 * 1024;

/// A TCP stream. Reads land straight in gorpc's buffer, in its spare room, which is not
/// zeroed first ([`recv_into_spare`]), and the room is sized by recent reads. A read
/// that took less than its room drained the socket, so the next one waits until the
/// reactor says readable rather than trying at once (tokio's sockets do the same): a
/// one-stream client otherwise read 390,000 times a second, about 7 KiB each; waiting
/// first, 57,000 reads, and 2.9M to 3.3M messages/s (medians of six alternating runs;
/// unary calls unchanged within noise).
pub struct SmolIo {
    stream: Async<TcpStream>,
    /// How much room a read is given: doubles while reads fill it.
    read_size: usize,
    /// The last read took less than its room: the socket is probably empty.
    drained: bool,
}

impl fmt::Debug for SmolIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmolIo")
            .field("stream", &self.stream)
            .finish()
    }
}

impl SmolIo {
    /// Adopts a connected stream, setting `TCP_NODELAY`.
    pub fn new(stream: Async<TcpStream>) -> io::Result<Self> {
        stream.get_ref().set_nodelay(true)?;
        Ok(SmolIo {
            stream,
            read_size: READ_MIN,
            drained: false,
        })
    }
}

/// Receives at most `room` bytes from `stream` into `buf`'s spare capacity and extends `buf`
/// over them. The room is not zeroed first, as a read into `&mut [u8]` would need: zeroing
/// 16 KiB or more before every read cost a smol echo client about a sixth of its
/// instructions per call.
#[allow(unsafe_code)]
fn recv_into_spare(stream: &TcpStream, buf: &mut BytesMut, room: usize) -> io::Result<usize> {
    buf.reserve(room);
    let spare = &mut buf.spare_capacity_mut()[..room];
    let n = socket2::SockRef::from(stream).recv(spare)?;
    assert!(
        n <= room,
        "a read reported more bytes than it was given room for"
    );
    // SAFETY: `recv` wrote the `n` bytes it reports at the start of `spare`, which starts at
    // `buf.len()` (socket2 writes only initialised bytes into the slice, and the kernel
    // writes no more than the slice's length, checked above), so `buf.len() + n` bytes of
    // `buf` are initialised, within its capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

impl gorpc::runtime::Io for SmolIo {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let start = buf.len();
        if self.drained {
            ready!(self.stream.poll_readable(cx))?;
            self.drained = false;
        }
        let room = (buf.capacity() - start)
            .clamp(READ_MIN, self.read_size)
            .min(max.max(1));
        loop {
            match recv_into_spare(self.stream.get_ref(), buf, room) {
                Ok(n) => {
                    self.drained = n < room;
                    if n == room && self.read_size < READ_MAX {
                        self.read_size *= 2;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.stream.poll_readable(cx))?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    /// Sends FIN. async-io's `poll_close` only flushes (it is generic over any handle), so
    /// the peer learnt of a close when the socket was dropped, not when it was shut down.
    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream.get_ref().shutdown(std::net::Shutdown::Write) {
            // Already closed by the peer: nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            result => Poll::Ready(result),
        }
    }

    fn release_buffers(&mut self) {
        self.read_size = READ_MIN;
    }
}

/// A resettable async-io timer.
#[derive(Debug)]
pub struct SmolSleep(Timer);

impl Future for SmolSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

impl gorpc::runtime::Sleep for SmolSleep {
    fn reset(&mut self, deadline: Instant) {
        self.0.set_at(deadline);
    }
}

/// An async-io TCP listener whose connections are [`SmolIo`]s.
#[derive(Debug)]
pub struct SmolListener(Async<TcpListener>);

impl gorpc::runtime::Listener for SmolListener {
    type Io = SmolIo;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(SmolIo, SocketAddr)>> {
        loop {
            match self.accept_ready() {
                Ok(Some(accepted)) => return Poll::Ready(Ok(accepted)),
                Ok(None) => ready!(self.0.poll_readable(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    fn accept_ready(&self) -> io::Result<Option<(SmolIo, SocketAddr)>> {
        loop {
            match self.0.get_ref().accept() {
                Ok((stream, peer)) => {
                    return Ok(Some((Async::new(stream).and_then(SmolIo::new)?, peer)))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A UDP socket on async-io's reactor.
#[derive(Debug)]
pub struct SmolUdpSocket(Async<UdpSocket>);

impl gorpc::runtime::UdpSocket for SmolUdpSocket {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        loop {
            match self.0.get_ref().recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.0.poll_readable(cx))?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                received => return Poll::Ready(received),
            }
        }
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        datagram: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.0.get_ref().send_to(datagram, target) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.0.poll_writable(cx))?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                sent => return Poll::Ready(sent),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

impl gorpc::Runtime for Smol {
    type Io = SmolIo;
    type Listener = SmolListener;
    type Sleep = SmolSleep;
    type UdpSocket = SmolUdpSocket;

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.spawner {
            Some(spawn) => spawn(future.boxed()),
            None => smol::spawn(future).detach(),
        }
    }

    fn sleep_until(&self, deadline: Instant) -> SmolSleep {
        SmolSleep(Timer::at(deadline))
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<SmolIo> {
        SmolIo::new(Async::<TcpStream>::connect(addr).await?)
    }

    async fn bind(&self, addr: SocketAddr, backlog: u32) -> io::Result<SmolListener> {
        let listener = gorpc::runtime::tcp_listener(addr, backlog)?;
        Ok(SmolListener(Async::new(listener)?))
    }

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<SmolUdpSocket> {
        Ok(SmolUdpSocket(Async::<UdpSocket>::bind(addr)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncWriteExt;
    use gorpc::runtime::Io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A loopback connection: the peer's end, and the accepted end as a `SmolIo`.
    async fn connected_pair() -> (Async<TcpStream>, SmolIo) {
        let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let peer = Async::<TcpStream>::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (peer, SmolIo::new(accepted).unwrap())
    }

    /// After a read that drained the socket, the next read waits for the reactor without
    /// reading, is woken when data comes, and then takes it.
    #[test]
    fn a_read_after_draining_waits_for_data_and_is_woken() {
        smol::block_on(async {
            let (mut peer, mut io) = connected_pair().await;
            let mut buf = BytesMut::with_capacity(64 * 1024);

            peer.write_all(b"hello").await.unwrap();
            let n = futures::future::poll_fn(|cx| io.poll_read_buf(cx, &mut buf, usize::MAX))
                .await
                .unwrap();
            assert_eq!((n, &buf[..]), (5, &b"hello"[..]));
            assert!(io.drained, "five bytes in 2 KiB of room: a short read");

            let flag = Arc::new(Flag(AtomicBool::new(false)));
            let waker = std::task::Waker::from(flag.clone());
            let mut cx = Context::from_waker(&waker);
            assert!(io.poll_read_buf(&mut cx, &mut buf, usize::MAX).is_pending());
            assert!(!flag.0.load(Ordering::SeqCst));

            peer.write_all(b" world").await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                while !flag.0.swap(false, Ordering::SeqCst) {
                    assert!(
                        Instant::now() < deadline,
                        "the waiting read was never woken"
                    );
                    Timer::after(Duration::from_millis(1)).await;
                }
                // A wake-up may come before the bytes do (other tests share the reactor):
                // the read then waits again.
                match io.poll_read_buf(&mut cx, &mut buf, usize::MAX) {
                    Poll::Ready(Ok(6)) => break assert_eq!(&buf[..], b"hello world"),
                    Poll::Pending => continue,
                    other => panic!("expected the six new bytes, got {other:?}"),
                }
            }
        });
    }

    /// Reads land after what the buffer holds, take no more than their room and `max`,
    /// and keep every byte in order across reads that split the peer's writes.
    #[test]
    fn reads_append_exactly_what_arrived_within_their_room() {
        smol::block_on(async {
            let (mut peer, mut io) = connected_pair().await;

            let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            // Written while the reads run: more than the socket buffers hold.
            let write = async { peer.write_all(&sent).await.unwrap() };
            let mut buf = BytesMut::from(&b"kept"[..]);
            let read = async {
                let mut max = 1;
                while buf.len() < 4 + sent.len() {
                    let before = buf.len();
                    let n = futures::future::poll_fn(|cx| io.poll_read_buf(cx, &mut buf, max))
                        .await
                        .unwrap();
                    assert!(n > 0 && n <= max, "read {n} bytes with a limit of {max}");
                    assert_eq!(buf.len(), before + n);
                    max = max * 3 % 70_001 + 1;
                }
            };
            futures::join!(write, read);
            assert_eq!(&buf[..4], b"kept");
            assert_eq!(&buf[4..], &sent[..]);
        });
    }
}
