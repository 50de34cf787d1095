//! Fault injection: [`FaultProxy`], a TCP proxy on 127.0.0.1 whose behaviour can be switched
//! while calls run through it, and [`TestServer`], a server whose handlers echo, answer
//! slowly, stall or stream checkable messages ([`methods::COUNT`]), counting the handlers
//! still alive.
//!
//! The proxy runs on plain threads with blocking sockets, so it works under every runtime
//! pairing and its faults do not depend on the runtime under test. Each connection has two
//! pump threads (one per direction) that read in short slices, so a mode switch takes effect
//! within a few milliseconds even on an idle connection.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use gorpc::stream::{RequestStream, ResponseSink};
use gorpc::{
    Code, Raw, Request, Router, Runtime, Server, ServerHandle, ServerReply, ServerRequest, Status,
};

/// Which way through the proxy a fault applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: requests, cancels, the client's pings.
    ToServer,
    /// Server to client: responses, the server's pongs and go-aways.
    ToClient,
    Both,
}

impl Direction {
    fn includes(self, other: Direction) -> bool {
        self == Direction::Both || self == other
    }
}

/// What a [`FaultProxy`] does to the bytes passing through it. A switch applies to the
/// connections already open as well as to new ones; counters (`bytes`, `offset`) start from
/// the switch, per connection and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Hold each chunk read for this long before forwarding it.
    Delay(Duration),
    /// Forward nothing either way but keep both sockets open: a half-open connection, as
    /// after a cable pull or a crashed host. Bytes wait in the kernel's buffers and flow
    /// again after a switch back to `Pass`.
    Blackhole,
    /// Close every connection with a TCP reset (`SO_LINGER` 0), and reset new ones as soon
    /// as they are accepted.
    Reset,
    /// Forward this many more bytes in each direction, then close the connection (FIN).
    Truncate { bytes: u64 },
    /// Invert bytes (XOR 0xFF) going `direction`: the byte at `offset`, then every
    /// `every`-th byte after it (`every` 0: that one byte only; 1: every byte from `offset`
    /// on).
    Corrupt {
        direction: Direction,
        offset: u64,
        every: u64,
    },
}

/// How long a pump blocks in one read or write before looking at the mode again.
const SLICE: Duration = Duration::from_millis(5);
const CHUNK: usize = 16 * 1024;

/// A TCP proxy on 127.0.0.1 to one loopback upstream, with switchable faults. Dropping it
/// closes every connection through it and joins its threads.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct ProxyShared {
    upstream: Mutex<SocketAddr>,
    /// The fault in force and a generation number bumped on every switch.
    mode: Mutex<(u64, Fault)>,
    stop: AtomicBool,
    accepted: AtomicUsize,
    open: AtomicUsize,
    links: Mutex<Vec<Weak<Link>>>,
}

/// One proxied connection: the client's socket and the upstream one.
struct Link {
    client: TcpStream,
    server: TcpStream,
    /// Set to close the link; `reset` says whether with RST.
    closing: AtomicBool,
    reset: AtomicBool,
}

impl Link {
    fn close(&self, reset: bool) {
        if reset {
            // The RST goes out when the last handle to each socket closes, i.e. once both
            // pumps have let go of the link.
            self.reset.store(true, Ordering::SeqCst);
            for socket in [&self.client, &self.server] {
                let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
            }
        } else {
            for socket in [&self.client, &self.server] {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        self.closing.store(true, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn loopback_only(addr: SocketAddr) -> io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("FaultProxy only forwards to loopback addresses, not {addr}"),
        ))
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, which must be a
    /// loopback address; starts in [`Fault::Pass`].
    pub fn start(upstream: SocketAddr) -> io::Result<Self> {
        loopback_only(upstream)?;
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ProxyShared {
            upstream: Mutex::new(upstream),
            mode: Mutex::new((0, Fault::Pass)),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            links: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept_thread = std::thread::Builder::new()
            .name(format!("fault-proxy {addr}"))
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(FaultProxy {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the fault, for open connections and new ones.
    pub fn set(&self, fault: Fault) {
        {
            let mut mode = lock(&self.shared.mode);
            *mode = (mode.0 + 1, fault);
        }
        if fault == Fault::Reset {
            for link in lock(&self.shared.links).iter().filter_map(Weak::upgrade) {
                link.close(true);
            }
        }
    }

    pub fn fault(&self) -> Fault {
        lock(&self.shared.mode).1
    }

    /// Forwards new connections to `upstream` (a restarted server on another port, say);
    /// open connections keep theirs.
    pub fn set_upstream(&self, upstream: SocketAddr) -> io::Result<()> {
        loopback_only(upstream)?;
        *lock(&self.shared.upstream) = upstream;
        Ok(())
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections through the proxy that are not closed in both directions yet.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &*lock(&self.shared.upstream))
            .field("fault", &self.fault())
            .field("open_connections", &self.open_connections())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for link in lock(&self.shared.links).iter().filter_map(Weak::upgrade) {
            link.close(false);
        }
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(SLICE);
                continue;
            }
            Err(_) => {
                std::thread::sleep(SLICE);
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        pumps.retain(|pump| !pump.is_finished());
        if lock(&shared.mode).1 == Fault::Reset {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue; // dropped: RST
        }
        let upstream = *lock(&shared.upstream);
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
            // Nobody upstream: the client sees its connection reset, as it would have.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue;
        };
        let configured = [&client, &server].iter().all(|socket| {
            socket.set_nonblocking(false).is_ok()
                && socket.set_nodelay(true).is_ok()
                && socket.set_read_timeout(Some(SLICE)).is_ok()
                && socket.set_write_timeout(Some(SLICE)).is_ok()
        });
        if !configured {
            continue;
        }
        let link = Arc::new(Link {
            client,
            server,
            closing: AtomicBool::new(false),
            reset: AtomicBool::new(false),
        });
        {
            let mut links = lock(&shared.links);
            links.retain(|link| link.strong_count() > 0);
            links.push(Arc::downgrade(&link));
        }
        // Counted open until both pumps have let go of the link.
        shared.open.fetch_add(1, Ordering::SeqCst);
        let open = Arc::new(OpenGuard(shared.clone()));
        for direction in [Direction::ToServer, Direction::ToClient] {
            let (pumped, shared, open) = (link.clone(), shared.clone(), open.clone());
            let spawned = std::thread::Builder::new()
                .name("fault-proxy pump".into())
                .spawn(move || {
                    pump(&pumped, direction, &shared);
                    drop(pumped);
                    drop(open);
                });
            match spawned {
                Ok(pump) => pumps.push(pump),
                Err(_) => link.close(true),
            }
        }
    }
    for pump in pumps {
        let _ = pump.join();
    }
}

/// Decrements the open-connection count when the last pump of a link ends.
struct OpenGuard(Arc<ProxyShared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Moves bytes one way through `link` under the proxy's current fault, until either side
/// closes, the link is closed, or the proxy stops.
fn pump(link: &Link, direction: Direction, shared: &ProxyShared) {
    let (mut from, mut to) = match direction {
        Direction::ToServer => (&link.client, &link.server),
        _ => (&link.server, &link.client),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut generation = u64::MAX;
    // Bytes forwarded in this direction since the last switch.
    let mut since_switch = 0u64;
    // Whether a blackhole is in force, or the pump must stop: checked before each read, so
    // that a blackholed pump reads nothing, and again after it, since the fault read before
    // may have changed while the read waited.
    let settle = |generation: &mut u64, since_switch: &mut u64| -> Option<Fault> {
        loop {
            if shared.stop.load(Ordering::SeqCst) || link.closing.load(Ordering::SeqCst) {
                return None;
            }
            let (current, fault) = *lock(&shared.mode);
            if current != *generation {
                *generation = current;
                *since_switch = 0;
            }
            match fault {
                Fault::Blackhole => std::thread::sleep(SLICE),
                Fault::Reset => {
                    link.close(true);
                    return None;
                }
                fault => return Some(fault),
            }
        }
    };
    loop {
        if settle(&mut generation, &mut since_switch).is_none() {
            return;
        }
        let read = from.read(&mut buf);
        if matches!(&read, Err(e) if is_timeout(e)) {
            continue;
        }
        let Some(fault) = settle(&mut generation, &mut since_switch) else {
            return;
        };
        let n = match read {
            Ok(0) => {
                // End of stream: pass the half-close on.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(_) => {
                link.close(true);
                return;
            }
        };
        let mut chunk = &mut buf[..n];
        let mut close_after = false;
        match fault {
            Fault::Delay(delay) => std::thread::sleep(delay),
            Fault::Truncate { bytes } => {
                let left = bytes.saturating_sub(since_switch);
                if left <= n as u64 {
                    chunk = &mut chunk[..left as usize];
                    close_after = true;
                }
            }
            Fault::Corrupt {
                direction: target,
                offset,
                every,
            } if target.includes(direction) => {
                for (i, byte) in chunk.iter_mut().enumerate() {
                    let position = since_switch + i as u64;
                    let hit = position == offset
                        || (every > 0
                            && position > offset
                            && (position - offset).is_multiple_of(every));
                    if hit {
                        *byte ^= 0xFF;
                    }
                }
            }
            _ => {}
        }
        since_switch += chunk.len() as u64;
        if write_all(&mut to, chunk, link, shared).is_err() {
            link.close(true);
            return;
        }
        if close_after {
            link.close(false);
            return;
        }
    }
}

/// `write_all` that gives up when the link or the proxy closes instead of blocking on a
/// peer that does not read.
fn write_all(
    to: &mut &TcpStream,
    mut bytes: &[u8],
    link: &Link,
    shared: &ProxyShared,
) -> io::Result<()> {
    while !bytes.is_empty() {
        if shared.stop.load(Ordering::SeqCst) || link.closing.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::ConnectionAborted));
        }
        match to.write(bytes) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Counts handlers: how many started, how many are alive (not yet dropped), how many
/// answered. A handler future dropped before answering (cancelled, timed out, its
/// connection gone) is alive no more but never counted as answered.
#[derive(Debug, Default)]
pub struct HandlerCounts {
    started: AtomicUsize,
    live: AtomicUsize,
    answered: AtomicUsize,
}

impl HandlerCounts {
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Taken when a handler is called and moved into its future, so that a future dropped
    /// before its first poll still counts down.
    pub fn guard(self: &Arc<Self>) -> LiveHandler {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        LiveHandler(self.clone())
    }
}

/// One live handler; see [`HandlerCounts::guard`].
#[derive(Debug)]
pub struct LiveHandler(Arc<HandlerCounts>);

impl LiveHandler {
    /// The handler answers (just before returning its reply).
    pub fn answered(&self) {
        self.0.answered.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for LiveHandler {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Methods of [`TestServer`]: the unary ones echo the request body.
pub mod methods {
    /// Answers at once.
    pub const ECHO: &str = "/fault.Test/Echo";
    /// Answers after the server's `slow` delay.
    pub const SLOW: &str = "/fault.Test/Slow";
    /// Answers after a delay in milliseconds read from the body's first two bytes
    /// (big-endian); 0 answers inline.
    pub const SLEEP: &str = "/fault.Test/Sleep";
    /// Never answers: its handler waits until it is cancelled, or the server aborted.
    pub const STALL: &str = "/fault.Test/Stall";
    /// Server stream: the request is a [`count::request`]; the handler sends its `n`
    /// messages ([`count::message`], indices 0 to n − 1), pausing before each one, then
    /// ends with OK and the trailer [`count::END_TRAILER`], `count::message(id, n, 0)`. A
    /// request failing its checksum ends the stream with InvalidArgument.
    pub const COUNT: &str = "/fault.Test/Count";
    /// Bidirectional: each message the client sends comes back as it is; when the client
    /// finishes, the call ends with OK and the trailer [`count::END_TRAILER`],
    /// `count::message(id, received, 0)`, where `id` is the call's, from the request
    /// metadata [`count::ID_METADATA`] (`count::message(id, 0, 0)`; garbled or missing:
    /// InvalidArgument).
    pub const ECHOES: &str = "/fault.Test/Echoes";
}

/// The bodies of [`methods::COUNT`]. Each carries an FNV-1a-64 checksum of everything before
/// it, so that a garbled body is told from an intact one that belongs to another call.
pub mod count {
    use bytes::{BufMut, Bytes, BytesMut};

    /// The trailer a complete stream ends with: [`message`]`(id, n, 0)`, so that the end
    /// can be checked for its call as the messages are.
    pub const END_TRAILER: &str = "x-count-end";

    /// The request metadata that names an [`ECHOES`](super::methods::ECHOES) call.
    pub const ID_METADATA: &str = "x-count-id";

    /// A parsed [`request`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CountRequest {
        pub id: u64,
        pub n: u32,
        pub size: u32,
        pub pause_ms: u16,
    }

    /// `[id: u64][n: u32][size: u32][pause ms: u16][checksum: u64]`: `n` messages of `size`
    /// payload bytes for call `id`, with a pause of `pause_ms` before each.
    pub fn request(id: u64, n: u32, size: u32, pause_ms: u16) -> Bytes {
        let mut body = BytesMut::with_capacity(26);
        body.put_u64(id);
        body.put_u32(n);
        body.put_u32(size);
        body.put_u16(pause_ms);
        let sum = fnv1a(&body);
        body.put_u64(sum);
        body.freeze()
    }

    /// The request in `body`, `None` if it is not one or fails its checksum.
    pub fn parse_request(body: &[u8]) -> Option<CountRequest> {
        let content = checked(body)?;
        if content.len() != 18 {
            return None;
        }
        Some(CountRequest {
            id: u64::from_be_bytes(content[0..8].try_into().ok()?),
            n: u32::from_be_bytes(content[8..12].try_into().ok()?),
            size: u32::from_be_bytes(content[12..16].try_into().ok()?),
            pause_ms: u16::from_be_bytes(content[16..18].try_into().ok()?),
        })
    }

    /// Message `index` of call `id`: `[id: u64][index: u32][size payload bytes][checksum: u64]`.
    pub fn message(id: u64, index: u32, size: u32) -> Bytes {
        let mut body = BytesMut::with_capacity(20 + size as usize);
        body.put_u64(id);
        body.put_u32(index);
        let seed = id.wrapping_add(u64::from(index)) as usize;
        body.extend((0..size as usize).map(|i| seed.wrapping_add(i) as u8));
        let sum = fnv1a(&body);
        body.put_u64(sum);
        body.freeze()
    }

    /// The call id and index of an intact message, `None` if its checksum fails.
    pub fn parse_message(body: &[u8]) -> Option<(u64, u32)> {
        let content = checked(body)?;
        if content.len() < 12 {
            return None;
        }
        Some((
            u64::from_be_bytes(content[0..8].try_into().ok()?),
            u32::from_be_bytes(content[8..12].try_into().ok()?),
        ))
    }

    /// The content of `body` before its checksum, if the checksum holds.
    fn checked(body: &[u8]) -> Option<&[u8]> {
        let split = body.len().checked_sub(8)?;
        let (content, sum) = body.split_at(split);
        (fnv1a(content) == u64::from_be_bytes(sum.try_into().ok()?)).then_some(content)
    }

    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
}

/// A server with the [`methods`], counting its handlers. `crash` aborts it mid-call.
pub struct TestServer<S: Runtime> {
    pub handle: ServerHandle<S>,
    pub handlers: Arc<HandlerCounts>,
}

impl<S: Runtime> std::fmt::Debug for TestServer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr())
            .field("handlers", &self.handlers)
            .finish()
    }
}

impl<S: Runtime> TestServer<S> {
    /// Binds `addr` (port 0 for any) on `runtime`; `slow` is how long [`methods::SLOW`]
    /// takes.
    pub async fn start(runtime: S, addr: SocketAddr, slow: Duration) -> io::Result<Self> {
        Self::start_with(runtime, addr, slow, gorpc::ServerConfig::default()).await
    }

    pub async fn start_with(
        runtime: S,
        addr: SocketAddr,
        slow: Duration,
        config: gorpc::ServerConfig,
    ) -> io::Result<Self> {
        Self::start_built(runtime, addr, slow, |server| server.config(config)).await
    }

    /// Binds `addr`, answering HTTP/1.1 and gRPC too, with gRPC's health service.
    pub async fn start_grpc(runtime: S, addr: SocketAddr, slow: Duration) -> io::Result<Self> {
        Self::start_built(runtime, addr, slow, |server| server.http().health()).await
    }

    /// Binds `addr` with the server `build` makes of the test methods' server.
    pub async fn start_built(
        runtime: S,
        addr: SocketAddr,
        slow: Duration,
        build: impl FnOnce(Server<S>) -> Server<S>,
    ) -> io::Result<Self> {
        let handlers = Arc::new(HandlerCounts::default());
        let router = Router::new()
            .route(methods::ECHO, echo_after(&runtime, &handlers, |_| None))
            .route(
                methods::SLOW,
                echo_after(&runtime, &handlers, move |_| Some(slow)),
            )
            .route(
                methods::SLEEP,
                echo_after(&runtime, &handlers, |body| {
                    let millis = u16::from_be_bytes([
                        body.first().copied().unwrap_or(0),
                        body.get(1).copied().unwrap_or(0),
                    ]);
                    (millis > 0).then(|| Duration::from_millis(millis.into()))
                }),
            )
            .route(methods::STALL, {
                let handlers = handlers.clone();
                move |_: ServerRequest| {
                    let guard = handlers.guard();
                    async move {
                        std::future::pending::<()>().await;
                        drop(guard);
                        ServerReply::ok(Bytes::new())
                    }
                }
            })
            .server_stream(methods::COUNT, Raw, {
                let (runtime, handlers) = (runtime.clone(), handlers.clone());
                move |req: Request<Bytes>, mut sink: ResponseSink<Bytes>| {
                    let guard = handlers.guard();
                    let runtime = runtime.clone();
                    async move {
                        let Some(count) = count::parse_request(&req.message) else {
                            return Err(Status::new(
                                Code::InvalidArgument,
                                "garbled count request",
                            ));
                        };
                        for index in 0..count.n {
                            if count.pause_ms > 0 {
                                let pause = Duration::from_millis(count.pause_ms.into());
                                runtime.sleep_until(Instant::now() + pause).await;
                            }
                            sink.send(&count::message(count.id, index, count.size))
                                .await?;
                        }
                        let end = count::message(count.id, count.n, 0);
                        sink.set_trailers([(count::END_TRAILER, end)].into_iter().collect());
                        guard.answered();
                        Ok(())
                    }
                }
            });
        let router = router.bidi(methods::ECHOES, Raw, {
            let handlers = handlers.clone();
            move |req: Request<RequestStream<Bytes>>, mut sink: ResponseSink<Bytes>| {
                let guard = handlers.guard();
                async move {
                    let id = req
                        .metadata
                        .get(count::ID_METADATA)
                        .and_then(|value| count::parse_message(value))
                        .map(|(id, _)| id)
                        .ok_or_else(|| {
                            Status::new(Code::InvalidArgument, "garbled or missing call id")
                        })?;
                    let mut messages = req.message;
                    let mut received = 0u32;
                    while let Some(message) = messages.next().await {
                        sink.send(&message?).await?;
                        received += 1;
                    }
                    let end = count::message(id, received, 0);
                    sink.set_trailers([(count::END_TRAILER, end)].into_iter().collect());
                    guard.answered();
                    Ok(())
                }
            }
        });
        let handle = build(Server::new(runtime, router)).bind(addr).await?;
        Ok(TestServer { handle, handlers })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// Kills the server: every connection closes at once, no call in flight is answered.
    pub async fn crash(self) {
        self.handle.abort().await
    }
}

/// A handler that echoes the body after `delay(body)`, if any.
fn echo_after<S: Runtime>(
    runtime: &S,
    handlers: &Arc<HandlerCounts>,
    delay: impl Fn(&[u8]) -> Option<Duration> + Send + Sync + 'static,
) -> impl Fn(ServerRequest) -> futures::future::BoxFuture<'static, ServerReply> + Send + Sync + 'static
{
    let (runtime, handlers) = (runtime.clone(), handlers.clone());
    move |request: ServerRequest| {
        let guard = handlers.guard();
        let wait = delay(&request.body).map(|d| runtime.sleep_until(Instant::now() + d));
        Box::pin(async move {
            if let Some(wait) = wait {
                wait.await;
            }
            guard.answered();
            ServerReply::ok(request.body)
        })
    }
}
