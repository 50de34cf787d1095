//! A server stops reading while over 1 MiB of answers waits unwritten. The pass that holds
//! the read back uses up the socket's readiness; when the same pass then writes the whole
//! backlog out, the server must pass again and read, or a request that arrived meanwhile
//! waits forever (nothing else wakes the connection).
//!
//! Real sockets cannot be made to take a backlog in one write on demand, so the server
//! here runs on tokio with an in-memory socket the test controls, and the peer is the
//! sans-IO client core driven by hand.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gorpc::proto::sim::read;
use gorpc::proto::Conn as _;
use gorpc::proto::{codec, CallHead, ClientConn, ClientEvent, ConnConfig, StreamKind};
use gorpc::runtime::{Io, Listener, Runtime};
use gorpc::stream::ResponseSink;
use gorpc::{Raw, Request, Router, Server};
use gorpc_tokio::{Tokio, TokioSleep, TokioUdpSocket};

const BLOB: &str = "/test.Held/Blob";
const ECHO: &str = "/test.Held/Echo";

/// Both directions of the in-memory socket, and whether the server's writes go through.
#[derive(Default)]
struct Pipe {
    to_server: VecDeque<Bytes>,
    reader: Option<Waker>,
    from_server: BytesMut,
    writable: bool,
    writer: Option<Waker>,
}

#[derive(Clone, Default)]
struct SharedPipe(Arc<Mutex<Pipe>>);

impl SharedPipe {
    fn send(&self, bytes: Bytes) {
        let waker = {
            let mut pipe = self.0.lock().unwrap();
            pipe.to_server.push_back(bytes);
            pipe.reader.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// From now on the server's writes all go through at once.
    fn open_writes(&self) {
        let waker = {
            let mut pipe = self.0.lock().unwrap();
            pipe.writable = true;
            pipe.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn take_written(&self) -> BytesMut {
        self.0.lock().unwrap().from_server.split()
    }
}

struct PipeIo(SharedPipe);

impl Io for PipeIo {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let mut pipe = self.0 .0.lock().unwrap();
        match pipe.to_server.pop_front() {
            Some(mut bytes) => {
                let n = bytes.len().min(max.max(1));
                buf.extend_from_slice(&bytes.split_to(n));
                if !bytes.is_empty() {
                    pipe.to_server.push_front(bytes);
                }
                Poll::Ready(Ok(n))
            }
            None => {
                pipe.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut pipe = self.0 .0.lock().unwrap();
        if !pipe.writable {
            pipe.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut n = 0;
        for buf in bufs {
            pipe.from_server.extend_from_slice(buf);
            n += buf.len();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_shutdown(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Hands out one in-memory connection, then none.
struct PipeListener(Mutex<Option<PipeIo>>);

impl Listener for PipeListener {
    type Io = PipeIo;

    fn poll_accept(&self, _: &mut Context<'_>) -> Poll<io::Result<(PipeIo, SocketAddr)>> {
        match self.0.lock().unwrap().take() {
            Some(io) => Poll::Ready(Ok((io, "127.0.0.1:1".parse().unwrap()))),
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok("127.0.0.1:1".parse().unwrap())
    }
}

/// Tokio for tasks and timers; the one connection is the pipe.
#[derive(Clone)]
struct PipeRuntime {
    tokio: Tokio,
    pipe: SharedPipe,
}

impl Runtime for PipeRuntime {
    type Io = PipeIo;
    type Listener = PipeListener;
    type Sleep = TokioSleep;
    type UdpSocket = TokioUdpSocket;

    fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tokio.spawn(future);
    }

    fn sleep_until(&self, deadline: Instant) -> TokioSleep {
        self.tokio.sleep_until(deadline)
    }

    async fn connect(&self, _: SocketAddr) -> io::Result<PipeIo> {
        Err(io::ErrorKind::Unsupported.into())
    }

    async fn bind(&self, _: SocketAddr, _: u32) -> io::Result<PipeListener> {
        Ok(PipeListener(Mutex::new(Some(PipeIo(self.pipe.clone())))))
    }

    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> impl std::future::Future<Output = io::Result<TokioUdpSocket>> + Send {
        self.tokio.bind_udp(addr)
    }
}

#[test]
fn a_request_that_arrives_while_reads_are_held_is_served() {
    let rt = gorpc_tests::tokio_runtime();
    rt.block_on(async {
        let pipe = SharedPipe::default();
        let runtime = PipeRuntime {
            tokio: Tokio::current(),
            pipe: pipe.clone(),
        };
        let router = Router::new()
            .server_stream(
                BLOB,
                Raw,
                |req: Request<Bytes>, mut sink: ResponseSink<Bytes>| async move {
                    let blob = Bytes::from(vec![5u8; 64 * 1024]);
                    for _ in 0..req.message[0] {
                        sink.send(&blob).await?;
                    }
                    Ok(())
                },
            )
            .route(ECHO, |req: gorpc::ServerRequest| async move {
                gorpc::ServerReply::ok(req.body)
            });
        let server = Server::new(runtime, router)
            .bind(gorpc_tests::loopback())
            .await
            .unwrap();

        // The peer: wide windows, so the server queues all 2 MiB it is asked for.
        let config = ConnConfig {
            stream_window: 64 << 20,
            connection_window: 64 << 20,
            ..ConnConfig::default()
        };
        let mut client = ClientConn::<u8>::new(config, Instant::now());
        let flush = |client: &mut ClientConn<u8>| {
            while let Some(bytes) = client.poll_transmit() {
                pipe.send(bytes);
            }
        };
        let head = CallHead::new(BLOB, codec::RAW);
        client
            .start_stream(
                Instant::now(),
                head,
                StreamKind::ServerStreaming,
                &[32u8][..],
                1,
            )
            .unwrap();
        flush(&mut client);
        // Nothing the server writes goes out yet: its answers pile up past 1 MiB.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let echo = client
            .start_call(
                Instant::now(),
                CallHead::new(ECHO, codec::RAW),
                &b"held"[..],
                2,
            )
            .unwrap();
        flush(&mut client);
        // The server wakes for the request, holds its read back, and waits to write.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Now one write takes the whole backlog.
        pipe.open_writes();

        let deadline = Instant::now() + Duration::from_secs(10);
        let mut blob_bytes = 0;
        let mut answered = None;
        while answered.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut written = pipe.take_written();
            read(&mut client, Instant::now(), &mut written).unwrap();
            while let Some(event) = client.poll_event() {
                match event {
                    ClientEvent::Message { id, body } => {
                        blob_bytes += body.len();
                        client.release(id, body.len());
                    }
                    ClientEvent::Finished { id, result, .. } if id == echo => {
                        answered = Some(result.expect("the echo is answered OK").body);
                    }
                    _ => {}
                }
            }
            flush(&mut client);
        }
        assert_eq!(
            blob_bytes,
            32 * 64 * 1024,
            "the stream's answers all arrived"
        );
        assert_eq!(
            answered.as_deref(),
            Some(&b"held"[..]),
            "the request that arrived while reads were held was served"
        );
        drop(server);
    });
}
