//! The systems under test. Each module has a server (run in the child process) and a client
//! that builds callers for the shared load generator (run in the parent).

pub mod gorpc;
pub mod grpc;
pub mod raw;
pub mod tarpc;
pub mod tonic;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::ValueEnum;
use futures::future::BoxFuture;

use crate::loadgen::{self, Caller, Measurement, StreamCaller, StreamMeasurement, Window};

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum System {
    GorpcTokio,
    GorpcSmol,
    Tonic,
    /// gorpc's server on tokio answering gRPC (`Server::http`), called by tonic's client.
    GorpcGrpcServer,
    /// gorpc's gRPC client (`Client::grpc`) on tokio, calling tonic's server.
    GorpcGrpcClient,
    Tarpc,
    Raw,
}

impl System {
    pub const ALL: [System; 7] = [
        System::GorpcTokio,
        System::GorpcSmol,
        System::Tonic,
        System::GorpcGrpcServer,
        System::GorpcGrpcClient,
        System::Tarpc,
        System::Raw,
    ];

    /// Whether the system runs the stream workload: all but tarpc, which has no streaming
    /// calls. Raw streams are plain length-prefixed frames over TCP, the ceiling.
    pub fn streams(self) -> bool {
        !matches!(self, System::Tarpc)
    }

    /// Whether the system runs `workload`: the stream workloads wherever there are streams,
    /// the http workload on gorpc's own HTTP/1.1 server and client only.
    pub fn runs(self, workload: Workload) -> bool {
        match workload {
            Workload::Echo | Workload::Hello => true,
            Workload::Stream | Workload::Upload => self.streams(),
            Workload::Http => matches!(self, System::GorpcTokio | System::GorpcSmol),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            System::GorpcTokio => "gorpc-tokio",
            System::GorpcSmol => "gorpc-smol",
            System::Tonic => "tonic",
            System::GorpcGrpcServer => "gorpc-grpc-server",
            System::GorpcGrpcClient => "gorpc-grpc-client",
            System::Tarpc => "tarpc",
            System::Raw => "raw",
        }
    }
}

/// What each call carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// `payload` bytes out, the same bytes back.
    Echo,
    /// The Go gorpc benchmark: SayHello{name: "gorpc"} answered by "Hello gorpc".
    Hello,
    /// A server stream: one small request, `messages` messages of `payload` bytes back.
    Stream,
    /// A client stream: `messages` messages of `payload` bytes up, a count back.
    Upload,
    /// `payload` bytes out and back as HTTP/1.1 POSTs to gorpc's echo method, raw codec
    /// (`application/octet-stream`), over kept-alive connections: gorpc's HTTP client
    /// against gorpc's server with HTTP on.
    Http,
}

impl Workload {
    /// Whether the workload counts stream messages rather than calls.
    pub fn streams(self) -> bool {
        matches!(self, Workload::Stream | Workload::Upload)
    }

    /// What the systems that do not run this workload are told (`None`: all run it).
    pub fn not_run(self) -> Option<&'static str> {
        match self {
            Workload::Echo | Workload::Hello => None,
            Workload::Stream | Workload::Upload => Some(NO_STREAMS),
            Workload::Http => Some(NO_HTTP),
        }
    }
}

/// The message the stream-less systems give when asked for the stream workload.
pub const NO_STREAMS: &str =
    "the stream and upload workloads run on every system but tarpc, which has no streams";

/// The message the systems without gorpc's HTTP/1.1 give when asked for the http workload.
pub const NO_HTTP: &str = "the http workload runs on gorpc-tokio and gorpc-smol only";

/// The name the hello workload sends.
pub const HELLO_NAME: &str = "gorpc";

/// The greeting every server answers the hello workload with.
pub fn greeting(name: &str) -> String {
    format!("Hello {name}")
}

/// The echo methods' path for gorpc.
pub const ECHO_METHOD: &str = "/bench.Echo/Echo";
pub const HELLO_METHOD: &str = "/bench.Echo/SayHello";
pub const DOWNLOAD_METHOD: &str = "/bench.Echo/Download";
pub const UPLOAD_METHOD: &str = "/bench.Echo/Upload";

/// What a stream call asks for: `count` messages of `size` bytes. gorpc and raw send it as 8
/// bytes (two little-endian u32s); tonic as the protobuf `DownloadRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownloadOrder {
    pub count: u32,
    pub size: u32,
}

impl DownloadOrder {
    pub fn encode(self) -> Bytes {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.count.to_le_bytes());
        b[4..].copy_from_slice(&self.size.to_le_bytes());
        Bytes::copy_from_slice(&b)
    }

    pub fn decode(body: &[u8]) -> Option<Self> {
        let b: &[u8; 8] = body.try_into().ok()?;
        Some(DownloadOrder {
            count: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

/// What the server of an upload answers: the messages and bytes it took. gorpc and raw send
/// it as 16 bytes (two little-endian u64s); tonic as the protobuf `UploadReply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadTally {
    pub count: u64,
    pub bytes: u64,
}

impl UploadTally {
    pub fn encode(self) -> Bytes {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..].copy_from_slice(&self.bytes.to_le_bytes());
        Bytes::copy_from_slice(&b)
    }

    pub fn decode(body: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = body.try_into().ok()?;
        let (count, bytes) = b.split_at(8);
        Some(UploadTally {
            count: u64::from_le_bytes(count.try_into().ok()?),
            bytes: u64::from_le_bytes(bytes.try_into().ok()?),
        })
    }

    /// What a complete upload of `count` messages of `size` bytes is answered with.
    pub fn of(count: u32, size: usize) -> Self {
        UploadTally {
            count: count.into(),
            bytes: u64::from(count) * size as u64,
        }
    }
}

/// Everything a client side needs for one run.
#[derive(Clone, Debug)]
pub struct ClientParams {
    pub addr: SocketAddr,
    pub workload: Workload,
    pub concurrency: usize,
    pub connections: usize,
    /// The echo request body (and expected reply); for streams, every message.
    pub payload: Bytes,
    /// Messages per stream call (stream workload).
    pub stream_messages: u32,
    /// The client's receive window per stream call and per connection, in bytes; `None`
    /// leaves each system's default.
    pub stream_window: Option<u32>,
    pub connection_window: Option<u32>,
    pub warmup: Duration,
    pub secs: Duration,
    pub threads: usize,
}

impl ClientParams {
    /// The connection caller `i` uses: callers are spread round robin.
    pub fn conn_of(&self, caller: usize) -> usize {
        caller % self.connections
    }
}

/// The echo payload: `len` bytes of a repeating pattern, so a reply that is off by a byte
/// does not compare equal.
pub fn make_payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A tokio runtime with `threads` workers: current-thread for one.
pub fn tokio_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// An `async_executor::Executor` run on `threads` threads (this one included) until `main`
/// finishes; async-io's reactor is driven by whichever thread is waiting.
pub fn smol_run<T, Fut>(
    threads: usize,
    main: impl FnOnce(Arc<async_executor::Executor<'static>>) -> Fut,
) -> T
where
    Fut: Future<Output = T>,
{
    let ex = Arc::new(async_executor::Executor::new());
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let helpers: Vec<_> = (1..threads.max(1))
        .map(|i| {
            let ex = ex.clone();
            let stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("smol-{i}"))
                .spawn(move || smol::block_on(ex.run(stopped.recv())))
                .expect("spawning an executor thread")
        })
        .collect();
    let out = smol::block_on(ex.run(main(ex.clone())));
    drop(stop);
    for h in helpers {
        let _ = h.join();
    }
    out
}

/// Runs the closed loop on the current tokio runtime.
pub async fn closed_loop_tokio<C: Caller>(callers: Vec<C>, window: Window) -> Measurement {
    loadgen::closed_loop(
        callers,
        window,
        |task: BoxFuture<'static, ()>| {
            tokio::spawn(task);
        },
        |at: Instant| tokio::time::sleep_until(at.into()),
    )
    .await
}

/// Runs the closed loop on `ex`, timing with async-io.
pub async fn closed_loop_smol<C: Caller>(
    ex: &Arc<async_executor::Executor<'static>>,
    callers: Vec<C>,
    window: Window,
) -> Measurement {
    loadgen::closed_loop(
        callers,
        window,
        |task: BoxFuture<'static, ()>| ex.spawn(task).detach(),
        |at: Instant| async move {
            smol::Timer::at(at).await;
        },
    )
    .await
}

/// Runs the stream loop on the current tokio runtime.
pub async fn stream_loop_tokio<C: StreamCaller>(
    callers: Vec<C>,
    window: Window,
) -> StreamMeasurement {
    loadgen::stream_loop(
        callers,
        window,
        |task: BoxFuture<'static, ()>| {
            tokio::spawn(task);
        },
        |at: Instant| tokio::time::sleep_until(at.into()),
    )
    .await
}

/// Runs the stream loop on `ex`, timing with async-io.
pub async fn stream_loop_smol<C: StreamCaller>(
    ex: &Arc<async_executor::Executor<'static>>,
    callers: Vec<C>,
    window: Window,
) -> StreamMeasurement {
    loadgen::stream_loop(
        callers,
        window,
        |task: BoxFuture<'static, ()>| ex.spawn(task).detach(),
        |at: Instant| async move {
            smol::Timer::at(at).await;
        },
    )
    .await
}

/// Starts `system`'s server on 127.0.0.1:0 and returns its address; it serves in the
/// background of a runtime that `block_on` keeps running. Called in the child process; never
/// returns unless starting fails.
pub fn serve_forever(
    system: System,
    workload: Workload,
    threads: usize,
    on_bound: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    match system {
        System::GorpcSmol => smol_run(threads, |ex| async move {
            let rt = gorpc_smol::Smol::with_spawner(move |task| ex.spawn(task).detach());
            let addr = gorpc::serve(rt, workload).await?;
            on_bound(addr);
            futures::future::pending::<std::io::Result<()>>().await
        }),
        _ => tokio_runtime(threads)?.block_on(async move {
            let addr = match system {
                System::GorpcTokio => gorpc::serve(gorpc_tokio::Tokio::current(), workload).await?,
                System::GorpcGrpcServer => {
                    grpc::serve(gorpc_tokio::Tokio::current(), workload).await?
                }
                System::Tonic | System::GorpcGrpcClient => tonic::serve(workload).await?,
                System::Tarpc => tarpc::serve(workload).await?,
                System::Raw => raw::serve(workload).await?,
                System::GorpcSmol => unreachable!("served on smol above"),
            };
            on_bound(addr);
            futures::future::pending::<std::io::Result<()>>().await
        }),
    }
}

/// Runs `system`'s client side for one measured run, on its own runtime.
pub fn run_client(system: System, p: &ClientParams) -> Result<Measurement, String> {
    match system {
        System::GorpcSmol => smol_run(p.threads, |ex| async move {
            let spawner = ex.clone();
            let rt = gorpc_smol::Smol::with_spawner(move |task| spawner.spawn(task).detach());
            let callers = gorpc::callers(rt, p).await?;
            let window = Window::starting_now(p.warmup, p.secs);
            Ok(closed_loop_smol(&ex, callers, window).await)
        }),
        _ => {
            let runtime = tokio_runtime(p.threads).map_err(|e| e.to_string())?;
            let out = runtime.block_on(async move {
                match system {
                    System::GorpcTokio => {
                        let callers = gorpc::callers(gorpc_tokio::Tokio::current(), p).await?;
                        let window = Window::starting_now(p.warmup, p.secs);
                        Ok(closed_loop_tokio(callers, window).await)
                    }
                    System::Tonic | System::GorpcGrpcServer => {
                        let callers = tonic::callers(p).await?;
                        let window = Window::starting_now(p.warmup, p.secs);
                        Ok(closed_loop_tokio(callers, window).await)
                    }
                    System::GorpcGrpcClient => {
                        let callers = grpc::callers(gorpc_tokio::Tokio::current(), p).await?;
                        let window = Window::starting_now(p.warmup, p.secs);
                        Ok(closed_loop_tokio(callers, window).await)
                    }
                    System::Tarpc => {
                        let callers = tarpc::callers(p).await?;
                        let window = Window::starting_now(p.warmup, p.secs);
                        Ok(closed_loop_tokio(callers, window).await)
                    }
                    System::Raw => raw::run(p).await,
                    System::GorpcSmol => unreachable!("run on smol above"),
                }
            });
            // Abandoned callers (if any) must not keep the run going.
            runtime.shutdown_background();
            out
        }
    }
}

/// Runs `system`'s client side of the stream or upload workload for one measured run.
pub fn run_stream_client(system: System, p: &ClientParams) -> Result<StreamMeasurement, String> {
    match system {
        System::GorpcSmol => smol_run(p.threads, |ex| async move {
            let spawner = ex.clone();
            let rt = gorpc_smol::Smol::with_spawner(move |task| spawner.spawn(task).detach());
            let callers = gorpc::stream_callers(rt, p).await?;
            let window = Window::starting_now(p.warmup, p.secs);
            Ok(stream_loop_smol(&ex, callers, window).await)
        }),
        System::GorpcTokio
        | System::Tonic
        | System::GorpcGrpcServer
        | System::GorpcGrpcClient
        | System::Raw => {
            let runtime = tokio_runtime(p.threads).map_err(|e| e.to_string())?;
            let out = runtime.block_on(async move {
                // The measured window starts once the callers are ready.
                let window = || Window::starting_now(p.warmup, p.secs);
                Ok(match system {
                    System::Tonic | System::GorpcGrpcServer => {
                        stream_loop_tokio(tonic::stream_callers(p).await?, window()).await
                    }
                    System::GorpcGrpcClient => {
                        let rt = gorpc_tokio::Tokio::current();
                        stream_loop_tokio(grpc::stream_callers(rt, p).await?, window()).await
                    }
                    System::Raw => stream_loop_tokio(raw::stream_callers(p).await?, window()).await,
                    System::GorpcTokio => {
                        let rt = gorpc_tokio::Tokio::current();
                        stream_loop_tokio(gorpc::stream_callers(rt, p).await?, window()).await
                    }
                    System::GorpcSmol | System::Tarpc => unreachable!("matched above"),
                })
            });
            // Streams still open (if any) must not keep the run going.
            runtime.shutdown_background();
            out
        }
        System::Tarpc => Err(NO_STREAMS.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_order_round_trips() {
        let order = DownloadOrder {
            count: 100_000,
            size: 1024,
        };
        assert_eq!(DownloadOrder::decode(&order.encode()), Some(order));
        assert_eq!(DownloadOrder::decode(&[0; 7]), None);
    }

    #[test]
    fn an_upload_tally_round_trips() {
        let tally = UploadTally::of(100_000, 1024);
        assert_eq!(tally.bytes, 102_400_000);
        assert_eq!(UploadTally::decode(&tally.encode()), Some(tally));
        assert_eq!(UploadTally::decode(&[0; 15]), None);
    }

    #[test]
    fn all_but_tarpc_stream() {
        let streaming: Vec<&str> = System::ALL
            .iter()
            .filter(|s| s.streams())
            .map(|s| s.name())
            .collect();
        assert_eq!(
            streaming,
            [
                "gorpc-tokio",
                "gorpc-smol",
                "tonic",
                "gorpc-grpc-server",
                "gorpc-grpc-client",
                "raw"
            ]
        );
    }

    #[test]
    fn only_gorpc_runs_the_http_workload() {
        let http: Vec<&str> = System::ALL
            .iter()
            .filter(|s| s.runs(Workload::Http))
            .map(|s| s.name())
            .collect();
        assert_eq!(http, ["gorpc-tokio", "gorpc-smol"]);
        assert!(System::ALL.iter().all(|s| s.runs(Workload::Echo)));
        assert_eq!(Workload::Echo.not_run(), None);
        assert_eq!(Workload::Http.not_run(), Some(NO_HTTP));
    }
}
