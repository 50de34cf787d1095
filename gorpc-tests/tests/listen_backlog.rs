//! The listen backlog: a burst of connects waits in the kernel's accept queue instead of
//! having its SYNs dropped (and retried a second later), and servers ask the kernel for the
//! backlog they are configured with. Linux only: the accept queue is read through
//! `TCP_INFO`, which on a listening socket reports the queue's length (`tcpi_unacked`) and
//! its limit (`tcpi_sacked`).
#![cfg(target_os = "linux")]

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::join_all;
use gorpc::runtime::{tcp_listener, Listener, Runtime, DEFAULT_LISTEN_BACKLOG};
use gorpc::{Router, Server, ServerHandle};
use gorpc_tests::blocking::BlockingConn;
use gorpc_tests::{loopback, within, Smol, Tokio};
use socket2::{Domain, Socket, Type};

/// The accept queue of the listening socket `fd`: (connections waiting, limit).
fn accept_queue(fd: RawFd) -> (u32, u32) {
    // SAFETY: a zeroed tcp_info is a valid value of it (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (info.tcpi_unacked, info.tcpi_sacked)
}

/// The kernel's cap on any backlog.
fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("/proc/sys/net/core/somaxconn")
        .trim()
        .parse()
        .expect("a number")
}

/// `n` connects to `addr`, started without waiting for any to complete.
fn connect_burst(addr: SocketAddr, n: usize) -> Vec<Socket> {
    (0..n)
        .map(|_| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
            socket.set_nonblocking(true).expect("non-blocking");
            match socket.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("connect: {e}"),
            }
            socket
        })
        .collect()
}

/// Waits until `fd`'s accept queue holds at least `n` connections; how many it holds. The
/// bound only stops a broken run: on loopback the handshakes complete as the connects are
/// made.
fn wait_queued(fd: RawFd, n: u32) -> u32 {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let (queued, limit) = accept_queue(fd);
        if queued >= n {
            return queued;
        }
        assert!(
            Instant::now() < give_up,
            "{queued} of {n} connects queued (limit {limit}): SYNs were dropped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With the default backlog, a burst of 1,000 connects all completes while nothing is
/// accepted; the kernel holds them all.
#[test]
fn default_backlog_holds_a_burst() {
    let backlog = DEFAULT_LISTEN_BACKLOG.min(somaxconn());
    let listener = tcp_listener(loopback(), DEFAULT_LISTEN_BACKLOG).unwrap();
    let fd = listener.as_raw_fd();
    assert_eq!(accept_queue(fd), (0, backlog));
    let addr = listener.local_addr().unwrap();
    let n = 1000.min(backlog as usize);
    let _clients = connect_burst(addr, n);
    assert_eq!(wait_queued(fd, n as u32), n as u32);
}

/// What std's own bind gave (a backlog of 128): the queue never holds more than one past
/// the limit, so the rest of a burst has its SYNs dropped.
#[test]
fn a_small_backlog_caps_the_queue() {
    let listener = tcp_listener(loopback(), 128).unwrap();
    let fd = listener.as_raw_fd();
    let addr = listener.local_addr().unwrap();
    let _clients = connect_burst(addr, 300);
    // Linux admits one past the limit before it counts the queue as full.
    let queued = wait_queued(fd, 128);
    assert!(queued <= 129, "{queued} queued past a limit of 128");
    let (queued, limit) = accept_queue(fd);
    assert_eq!(limit, 128);
    assert!(queued <= 129, "{queued} queued past a limit of 128");
}

/// The socket of this process listening on `addr`: its inode from /proc/net/tcp, then the
/// descriptor pointing at it.
/// The sockets in /proc/net/tcp, each row split into its columns.
fn tcp_table() -> Vec<Vec<String>> {
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn listening_fd(addr: SocketAddr) -> RawFd {
    let port = format!(":{:04X}", addr.port());
    let inode = tcp_table()
        .into_iter()
        .find(|cols| cols[1].ends_with(&port) && cols[3] == "0A")
        .map(|cols| cols[9].to_string())
        .expect("a listening socket on the port");
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .find(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|link| link.to_string_lossy() == target)
        })
        .and_then(|entry| entry.file_name().to_str()?.parse().ok())
        .expect("this process holds the listening socket")
}

async fn bound<R: Runtime>(runtime: R, backlog: Option<u32>) -> ServerHandle<R> {
    let router = Router::new().msgpack("/burst.Test/Echo", |n: u32| async move { Ok(n) });
    let mut server = Server::new(runtime, router);
    if let Some(backlog) = backlog {
        server = server.listen_backlog(backlog);
    }
    server.bind(loopback()).await.unwrap()
}

/// Servers listen with their configured backlog, the default unless told otherwise, on
/// both runtimes.
#[test]
fn servers_listen_with_their_backlog() {
    let cap = somaxconn();
    let rt = gorpc_tests::tokio_runtime();
    let tokio = Tokio::from_handle(rt.handle().clone());
    for (backlog, expected) in [(None, DEFAULT_LISTEN_BACKLOG), (Some(1500), 1500)] {
        let server = rt.block_on(bound(tokio.clone(), backlog));
        let (_, limit) = accept_queue(listening_fd(server.local_addr()));
        assert_eq!(limit, expected.min(cap), "tokio, {backlog:?}");
        rt.block_on(server.abort());

        let server = smol::block_on(bound(Smol::new(), backlog));
        let (_, limit) = accept_queue(listening_fd(server.local_addr()));
        assert_eq!(limit, expected.min(cap), "smol, {backlog:?}");
        smol::block_on(server.abort());
    }
}

/// 2,000 clients connect at once (every client of a restarted server coming back) and each
/// makes a call: all are accepted and answered.
async fn burst_of_clients<R: Runtime>(server_rt: R, client_rt: R) {
    let fds = gorpc_tests::raise_open_file_limit().expect("the open-file limit");
    // Each connection is two descriptors in this process; leave room for the rest.
    let n = 2000.min((fds.saturating_sub(200) / 2) as u32);
    assert!(
        n >= 1000,
        "the open-file limit ({fds}) leaves room for {n} connections"
    );
    let server = bound(server_rt, None).await;
    let addr = server.local_addr();
    let calls = (0..n).map(|i| {
        let client_rt = client_rt.clone();
        async move {
            let client = gorpc::Client::builder(client_rt)
                .endpoint(addr)
                .timeout(Duration::from_secs(30))
                .connect()
                .await?;
            let echoed: u32 = client.call("/burst.Test/Echo", &i).await?;
            assert_eq!(echoed, i);
            Ok::<_, gorpc::Status>(client)
        }
    });
    let results = within(
        &client_rt,
        Duration::from_secs(60),
        "the burst",
        join_all(calls),
    )
    .await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {n} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    drop(results);
    server.abort().await;
}

#[test]
fn a_burst_of_clients_is_accepted_on_tokio() {
    let rt = gorpc_tests::tokio_runtime();
    let t = Tokio::from_handle(rt.handle().clone());
    rt.block_on(burst_of_clients(t.clone(), t));
}

#[test]
fn a_burst_of_clients_is_accepted_on_smol() {
    smol::block_on(burst_of_clients(Smol::new(), Smol::new()));
}

/// A runtime whose listeners take nothing until the server drains: the accept loop waits
/// on a gate that never opens, so every connection stays in the kernel's accept queue, and
/// only [`Listener::accept_ready`] (which a draining server calls) reaches it.
#[derive(Clone)]
struct Gated<R>(R);

struct GatedListener<L>(L);

impl<L: Listener> Listener for GatedListener<L> {
    type Io = L::Io;

    fn poll_accept(&self, _: &mut Context<'_>) -> Poll<std::io::Result<(L::Io, SocketAddr)>> {
        Poll::Pending
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn accept_ready(&self) -> std::io::Result<Option<(L::Io, SocketAddr)>> {
        self.0.accept_ready()
    }
}

impl<R: Runtime> Runtime for Gated<R> {
    type Io = R::Io;
    type Listener = GatedListener<R::Listener>;
    type Sleep = R::Sleep;
    type UdpSocket = R::UdpSocket;

    fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.spawn(future);
    }

    fn sleep_until(&self, deadline: Instant) -> R::Sleep {
        self.0.sleep_until(deadline)
    }

    fn connect(&self, addr: SocketAddr) -> impl Future<Output = std::io::Result<R::Io>> + Send {
        self.0.connect(addr)
    }

    async fn bind(
        &self,
        addr: SocketAddr,
        backlog: u32,
    ) -> std::io::Result<GatedListener<R::Listener>> {
        self.0.bind(addr, backlog).await.map(GatedListener)
    }

    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = std::io::Result<R::UdpSocket>> + Send {
        self.0.bind_udp(addr)
    }
}

/// Unread bytes the kernel holds for the server side of the connection from `client`
/// (accepted or not), from /proc/net/tcp's `rx_queue`.
fn server_side_unread(server: SocketAddr, client: SocketAddr) -> usize {
    let local = format!(":{:04X}", server.port());
    let remote = format!(":{:04X}", client.port());
    tcp_table()
        .into_iter()
        .find(|cols| cols[1].ends_with(&local) && cols[2].ends_with(&remote))
        .and_then(|cols| usize::from_str_radix(cols[4].split(':').nth(1)?, 16).ok())
        .unwrap_or(0)
}

/// A client connected, and sent its call, while the server was not accepting; then the
/// server drains. Closing the port would reset that connection, and its client could not
/// tell whether the call was served: the drain takes it first, answers the call and says
/// go-away. The client is a blocking socket framed by gorpc's client core, so that the
/// drain starts only once every byte of the call is in the server's kernel.
async fn a_connection_queued_when_the_drain_starts_is_served<R: Runtime>(runtime: R) {
    use std::io::Write;

    let server = bound(Gated(runtime.clone()), None).await;
    let addr = server.local_addr();
    let fd = listening_fd(addr);

    let mut client = BlockingConn::connect(addr, Duration::from_secs(20))
        .expect("connects")
        .with_codec(gorpc::proto::codec::MSGPACK);
    // MessagePack's 7 is the one byte 0x07.
    let call = client
        .frame("/burst.Test/Echo", &[0x07u8])
        .expect("the call starts");
    client.socket().write_all(&call).expect("sends the call");
    let sent = call.len();
    let client_addr = client.socket().local_addr().unwrap();
    let answer = std::thread::spawn(move || {
        client
            .answer()
            .expect("the queued connection's call is answered")
    });

    // Queued, with the whole call in the kernel: the accept loop cannot take it yet.
    while accept_queue(fd).0 == 0 || server_side_unread(addr, client_addr) < sent {
        gorpc_tests::sleep(&runtime, Duration::from_millis(5)).await;
    }
    let shutdown = within(
        &runtime,
        Duration::from_secs(30),
        "the drain",
        server.shutdown(Duration::from_secs(10)),
    )
    .await;
    assert_eq!(answer.join().expect("the client thread"), [0x07u8][..]);
    assert_eq!(shutdown, gorpc::Shutdown::Graceful);
}

#[test]
fn a_connection_queued_when_the_drain_starts_is_served_on_tokio() {
    let rt = gorpc_tests::tokio_runtime();
    let t = Tokio::from_handle(rt.handle().clone());
    rt.block_on(a_connection_queued_when_the_drain_starts_is_served(t));
}

#[test]
fn a_connection_queued_when_the_drain_starts_is_served_on_smol() {
    smol::block_on(a_connection_queued_when_the_drain_starts_is_served(
        Smol::new(),
    ));
}
