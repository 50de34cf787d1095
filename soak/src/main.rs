//! `gorpc-soak`: mixed load with injected faults on both runtime adapters, for a bounded
//! time, checking the invariants users rely on when the network misbehaves.
//!
//! A tokio server and a smol server each sit behind a `FaultProxy`; a tokio client and a
//! smol client call both proxies (four pairings), with random methods (echo, handlers that
//! sleep, handlers that never answer; one call in ten a server stream of 1 to 200
//! messages, sent at once or paced, and one in ten a bidirectional stream that echoes as
//! many), random body sizes, random deadlines and random cancellations (the call future, or
//! the stream mid-way, dropped). Meanwhile a scheduler
//! switches the proxies through delays, blackholes, resets, truncations and corruption, back
//! to pass between faults.
//!
//! Checked, and printed as one summary line; any breach exits with status 1:
//! - every call started finishes exactly once: answered, failed with an expected code, or
//!   cancelled by its caller (`lost` = started − finished = 0), and none long after its
//!   deadline (`overdue`); a stream counts as one call, finished when it ends (after its
//!   last message, or with an error item) or is dropped;
//! - no answer reaches the wrong caller (`misrouted`): every body carries its call's unique
//!   id and a checksum; an intact body with another call's id is misrouted, a body failing
//!   its checksum is `corrupted`, which only corruption faults may cause (the protocol, like
//!   HTTP/2 over plain TCP, has no checksum of its own: TLS is what guarantees integrity);
//!   a stream with any misrouted message counts as misrouted, else one with any corrupted
//!   message as corrupted; a stream that ends OK must end with its own call's trailer
//!   (id, count and checksum), so the end of a stream is checked as its messages are;
//! - stream messages arrive in order (`stream_disorder`, streams breaching it): each stream
//!   message carries its index, and the intact ones must be 0, 1, 2, … with no gap and no
//!   repeat (a message failing its checksum stands for the next index); a stream ending
//!   with OK must have delivered exactly the messages asked for, else it must end with an
//!   error item of an expected code;
//! - memory (RSS from /proc/self/statm) and file descriptors (/proc/self/fd) stay flat
//!   between a sample after warm-up and one at the end of the load, within
//!   [`RSS_TOLERANCE_KIB`] plus [`RSS_TOLERANCE_RATIO`] of the first sample, and
//!   [`FD_TOLERANCE`];
//! - no task leaks: once the load stops, the clients are dropped and a quiet period passes,
//!   no handler is alive on either server and no connection is open through either proxy
//!   (so every client and server connection task has closed its socket).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use futures::future::{self, Either};
use futures::StreamExt;
use gorpc::{CallOptions, Client, ClientConfig, Code, KeepaliveConfig, Runtime, Status};
use gorpc_smol::Smol;
use gorpc_tests::fault::{count, methods, Direction, Fault, FaultProxy, TestServer};
use gorpc_tokio::Tokio;

/// Absolute RSS growth allowed between the two samples: allocator arenas and caches settle
/// for a while after warm-up.
const RSS_TOLERANCE_KIB: u64 = 24 * 1024;
/// Relative RSS growth allowed on top of [`RSS_TOLERANCE_KIB`].
const RSS_TOLERANCE_RATIO: f64 = 0.25;
/// File descriptors: connections are being reset and reopened at any moment (each one
/// costs four descriptors here: client, two in the proxy, server).
const FD_TOLERANCE: i64 = 32;
/// How long after its deadline a call may still finish before it counts as overdue.
const OVERDUE_AFTER: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(about = "Soak gorpc under injected faults and check its invariants")]
struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Concurrent callers per client (there are four clients).
    #[arg(long, default_value_t = 8)]
    callers: usize,
    /// Seed of every random choice (default: from the clock); printed in the summary.
    #[arg(long)]
    seed: Option<u64>,
}

/// Counts kept by every caller.
#[derive(Default)]
struct Stats {
    started: AtomicU64,
    ok: AtomicU64,
    cancelled: AtomicU64,
    corrupted: AtomicU64,
    misrouted: AtomicU64,
    overdue: AtomicU64,
    /// Stream calls started (also counted in `started`).
    streams: AtomicU64,
    /// Streams whose intact messages came out of order, with a gap or a repeat, or that
    /// ended with OK after the wrong number of messages.
    stream_disorder: AtomicU64,
    /// What the first disordered streams saw.
    disorder_notes: Mutex<Vec<String>>,
    /// The fault in force on some proxy (the last one set), for the notes.
    fault_now: Mutex<&'static str>,
    /// Failed calls, by status code.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Failures with a code no fault injected here explains.
    unexpected: Mutex<Vec<String>>,
    /// Corruption faults injected so far: only they explain corrupted bodies and the codes
    /// of garbled heads.
    corruptions: AtomicU64,
}

impl Stats {
    fn finished(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
            + self.cancelled.load(Ordering::SeqCst)
            + self.corrupted.load(Ordering::SeqCst)
            + self.misrouted.load(Ordering::SeqCst)
            + self.errors.lock().unwrap().values().sum::<u64>()
    }

    fn error(&self, status: &Status) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(format!("{:?}", status.code()))
            .or_default() += 1;
        self.check_code(status);
    }

    /// Notes `status` if no fault injected here explains its code.
    fn check_code(&self, status: &Status) {
        let expected = match status.code() {
            // Connections failing (resets, truncation, keepalive, protocol errors) and
            // deadlines.
            Code::Unavailable | Code::DeadlineExceeded => true,
            // A garbled head: the client fails that call with Internal, the server answers
            // InvalidArgument, or routes a garbled method name to Unimplemented.
            Code::Internal | Code::InvalidArgument | Code::Unimplemented => {
                self.corruptions.load(Ordering::SeqCst) > 0
            }
            _ => false,
        };
        if !expected {
            let mut unexpected = self.unexpected.lock().unwrap();
            if unexpected.len() < 10 {
                unexpected.push(status.to_string());
            }
        }
    }
}

/// A body: `[sleep ms: u16][id: u64][payload len: u32][payload][fnv1a-64 of all before]`.
fn encode_body(sleep_ms: u16, id: u64, payload_len: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(22 + payload_len);
    body.put_u16(sleep_ms);
    body.put_u64(id);
    body.put_u32(payload_len as u32);
    body.extend((0..payload_len).map(|i| (id as usize).wrapping_add(i) as u8));
    let sum = fnv1a(&body);
    body.put_u64(sum);
    body.freeze()
}

/// The id of an intact body, `None` if its checksum fails.
fn decode_id(body: &[u8]) -> Option<u64> {
    if body.len() < 22 {
        return None;
    }
    let (content, mut sum) = body.split_at(body.len() - 8);
    if fnv1a(content) != sum.get_u64() {
        return None;
    }
    Some(u64::from_be_bytes(content[2..10].try_into().ok()?))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What one stream call saw of its messages.
struct StreamCheck {
    id: u64,
    n: u32,
    /// The index the next message must carry.
    next: u32,
    misrouted: bool,
    corrupted: bool,
    /// The first breach of order, if any.
    disorder: Option<String>,
}

impl StreamCheck {
    /// The trailer of a stream that ended OK: its call's id and message count, intact.
    fn end(&mut self, trailer: Option<&[u8]>) {
        match trailer.and_then(count::parse_message) {
            // Missing (its key garbled) or failing its checksum.
            None => self.corrupted = true,
            Some((other, _)) if other != self.id => self.misrouted = true,
            Some((_, n)) if n != self.n && self.disorder.is_none() => {
                self.disorder = Some(format!("ended with the trailer of n={n}, not {}", self.n));
            }
            Some(_) => {}
        }
    }

    fn message(&mut self, body: &[u8]) {
        match count::parse_message(body) {
            None => {
                self.corrupted = true;
                self.next = self.next.saturating_add(1);
            }
            Some((other, _)) if other != self.id => self.misrouted = true,
            Some((_, index)) => {
                if (index != self.next || index >= self.n) && self.disorder.is_none() {
                    self.disorder = Some(format!(
                        "message index {index} where {} was due (n={})",
                        self.next, self.n
                    ));
                }
                self.next = index.saturating_add(1);
            }
        }
    }
}

/// Runs one server stream of `request` (a [`count::request`]), checking each message.
/// Runs `call`, or drops it (which cancels the call, mid-stream for a stream) once `after`
/// has passed; `None` if it was given up.
async fn give_up_after<C: Runtime, F: std::future::Future>(
    rt: &C,
    after: Option<Duration>,
    call: F,
) -> Option<F::Output> {
    let call = std::pin::pin!(call);
    match after {
        None => Some(call.await),
        Some(after) => {
            let give_up = rt.sleep_until(Instant::now() + after);
            match future::select(call, give_up).await {
                Either::Left((result, _)) => Some(result),
                Either::Right(((), _)) => None,
            }
        }
    }
}

/// Which kind of stream a stream call is.
#[derive(Clone, Copy, Debug)]
enum StreamKind {
    /// [`methods::COUNT`]: the server sends the messages.
    Server,
    /// [`methods::ECHOES`]: the client sends them, the server echoes each one.
    Echo,
}

/// Runs one stream of `n` messages of `size` bytes for call `id`, checking each message
/// and the end: the server's [`methods::COUNT`] stream, or an [`methods::ECHOES`] call the
/// client feeds (pausing `pause_ms` before each message either way).
async fn run_stream<C: Runtime>(
    rt: &C,
    client: &Client,
    kind: StreamKind,
    (id, n, size, pause_ms): (u64, u32, u32, u16),
    deadline: Instant,
    check: &mut StreamCheck,
) -> Result<(), Status> {
    match kind {
        StreamKind::Server => {
            let request = count::request(id, n, size, pause_ms);
            let options = CallOptions {
                timeout: Some(deadline.saturating_duration_since(Instant::now())),
                ..CallOptions::default()
            };
            let messages = client
                .server_stream::<_, Bytes, Bytes>(methods::COUNT, gorpc::Raw, &request, options)
                .await?;
            take_stream(messages, check).await
        }
        StreamKind::Echo => {
            let mut options = CallOptions {
                timeout: Some(deadline.saturating_duration_since(Instant::now())),
                ..CallOptions::default()
            };
            options
                .metadata
                .insert(count::ID_METADATA, count::message(id, 0, 0));
            let (mut sender, echoes) = client
                .bidi::<_, Bytes, Bytes>(methods::ECHOES, gorpc::Raw, options)
                .await?
                .into_parts();
            let rt = rt.clone();
            let feed = async move {
                for index in 0..n {
                    if pause_ms > 0 {
                        let pause = Duration::from_millis(pause_ms.into());
                        rt.sleep_until(Instant::now() + pause).await;
                    }
                    // A send fails once the call ended; the echoes then hold why.
                    if sender.send(&count::message(id, index, size)).await.is_err() {
                        return;
                    }
                }
                let _ = sender.close_send().await;
            };
            // The feed runs beside the reading; both go when the call is dropped.
            let ((), taken) = future::join(feed, take_stream(echoes, check)).await;
            taken
        }
    }
}

/// Checks every message of `stream`, then the trailer it ended with.
async fn take_stream(
    mut stream: gorpc::client::ResponseStream<Bytes>,
    check: &mut StreamCheck,
) -> Result<(), Status> {
    while let Some(item) = stream.next().await {
        check.message(&item?);
    }
    let end = stream.trailers().and_then(|t| t.get(count::END_TRAILER));
    check.end(end.map(|value| &value[..]));
    Ok(())
}

/// One caller: calls until `stop_at`, recording how each call ended.
async fn caller<C: Runtime>(
    rt: C,
    client: Client,
    stats: Arc<Stats>,
    ids: Arc<AtomicU64>,
    stop_at: Instant,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while Instant::now() < stop_at {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        match rng.u32(0..10) {
            0 => {
                stream_call(&rt, &client, &stats, id, StreamKind::Server, &mut rng).await;
                continue;
            }
            1 => {
                stream_call(&rt, &client, &stats, id, StreamKind::Echo, &mut rng).await;
                continue;
            }
            _ => {}
        }
        let (method, sleep_ms) = match rng.u32(0..100) {
            0..=59 => (methods::ECHO, 0),
            60..=89 => (methods::SLEEP, rng.u16(1..50)),
            90..=96 => (methods::SLEEP, rng.u16(500..3000)),
            _ => (methods::STALL, 0),
        };
        let payload = if rng.u32(0..20) == 0 {
            rng.usize(8 * 1024..64 * 1024)
        } else {
            rng.usize(0..256)
        };
        let body = encode_body(sleep_ms, id, payload);
        let timeout = Duration::from_millis(rng.u64(50..3000));
        let cancel_after = (rng.u32(0..10) == 0).then(|| Duration::from_millis(rng.u64(0..100)));
        let options = CallOptions {
            timeout: Some(timeout),
            ..CallOptions::default()
        };
        let deadline = Instant::now() + timeout;
        stats.started.fetch_add(1, Ordering::SeqCst);
        let call = client.call_raw(method, 0, body.clone(), options);
        let result = give_up_after(&rt, cancel_after, call).await;
        if Instant::now() > deadline + OVERDUE_AFTER {
            stats.overdue.fetch_add(1, Ordering::SeqCst);
        }
        match result {
            None => {
                stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            Some(Ok(rsp)) if rsp.body == body => {
                stats.ok.fetch_add(1, Ordering::SeqCst);
            }
            Some(Ok(rsp)) => match decode_id(&rsp.body) {
                Some(other) if other != id => {
                    stats.misrouted.fetch_add(1, Ordering::SeqCst);
                }
                _ => {
                    stats.corrupted.fetch_add(1, Ordering::SeqCst);
                }
            },
            Some(Err(status)) => {
                stats.error(&status);
                if status.code() == Code::Unavailable {
                    // As a real caller would: do not spin while the connection is down.
                    rt.sleep_until(Instant::now() + Duration::from_millis(10))
                        .await;
                }
            }
        }
    }
}

/// One stream call of `kind` with a random count, size, pace, deadline and cancellation.
async fn stream_call<C: Runtime>(
    rt: &C,
    client: &Client,
    stats: &Stats,
    id: u64,
    kind: StreamKind,
    rng: &mut fastrand::Rng,
) {
    let n = rng.u32(1..=200);
    let size = if rng.u32(0..10) == 0 {
        rng.u32(1024..8192)
    } else {
        rng.u32(0..128)
    };
    let pause_ms = if rng.bool() { 0 } else { rng.u16(1..20) };
    let timeout = Duration::from_millis(rng.u64(50..3000));
    let cancel_after = (rng.u32(0..10) == 0).then(|| Duration::from_millis(rng.u64(0..300)));
    let deadline = Instant::now() + timeout;
    let mut check = StreamCheck {
        id,
        n,
        next: 0,
        misrouted: false,
        corrupted: false,
        disorder: None,
    };
    stats.started.fetch_add(1, Ordering::SeqCst);
    stats.streams.fetch_add(1, Ordering::SeqCst);
    let call = run_stream(
        rt,
        client,
        kind,
        (id, n, size, pause_ms),
        deadline,
        &mut check,
    );
    let result = give_up_after(rt, cancel_after, call).await;
    if Instant::now() > deadline + OVERDUE_AFTER {
        stats.overdue.fetch_add(1, Ordering::SeqCst);
    }
    if check.disorder.is_none() && matches!(result, Some(Ok(()))) && check.next != n {
        check.disorder = Some(format!(
            "ended with OK after message {} of n={n}",
            check.next
        ));
    }
    if let Some(disorder) = &check.disorder {
        stats.stream_disorder.fetch_add(1, Ordering::SeqCst);
        let mut notes = stats.disorder_notes.lock().unwrap();
        if notes.len() < 10 {
            let fault = *stats.fault_now.lock().unwrap();
            notes.push(format!(
                "{kind:?} stream {id} (size={size} pause_ms={pause_ms}, last fault {fault}): {disorder}; \
                 ended {result:?}"
            ));
        }
    }
    if check.misrouted {
        stats.misrouted.fetch_add(1, Ordering::SeqCst);
    } else if check.corrupted {
        stats.corrupted.fetch_add(1, Ordering::SeqCst);
    }
    match result {
        _ if check.misrouted || check.corrupted => {
            if let Some(Err(status)) = &result {
                stats.check_code(status);
            }
        }
        None => {
            stats.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        Some(Ok(())) => {
            stats.ok.fetch_add(1, Ordering::SeqCst);
        }
        Some(Err(status)) => {
            stats.error(&status);
            if status.code() == Code::Unavailable {
                rt.sleep_until(Instant::now() + Duration::from_millis(10))
                    .await;
            }
        }
    }
}

/// Resident set size in KiB, from /proc/self/statm.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * page_size_kib()
}

/// The kernel's page size, from the first mapping in /proc/self/smaps (4 KiB if unreadable).
fn page_size_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|smaps| {
            smaps
                .lines()
                .find_map(|line| line.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(4)
}

fn open_fds() -> i64 {
    std::fs::read_dir("/proc/self/fd").map_or(-1, |dir| dir.count() as i64)
}

/// Picks the next fault and how long it lasts.
fn next_fault(rng: &mut fastrand::Rng) -> (&'static str, Fault, Duration) {
    let hold = Duration::from_millis(rng.u64(100..1500));
    match rng.u32(0..5) {
        0 => (
            "delay",
            Fault::Delay(Duration::from_millis(rng.u64(1..30))),
            hold,
        ),
        1 => ("blackhole", Fault::Blackhole, hold),
        2 => (
            "reset",
            Fault::Reset,
            Duration::from_millis(rng.u64(10..200)),
        ),
        3 => (
            "truncate",
            Fault::Truncate {
                bytes: rng.u64(0..4096),
            },
            hold,
        ),
        _ => {
            let direction = if rng.bool() {
                Direction::ToServer
            } else {
                Direction::ToClient
            };
            // Every byte from the offset on: a garbled header always closes the connection
            // (a flipped length is over the frame limit), so at most the frame in progress
            // is delivered garbled, and only to its own caller.
            let corrupt = Fault::Corrupt {
                direction,
                offset: rng.u64(0..8192),
                every: 1,
            };
            ("corrupt", corrupt, hold)
        }
    }
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig {
        default_timeout: Some(Duration::from_secs(5)),
        ..ClientConfig::default()
    };
    // Short keepalive, so that blackholed connections are noticed within a second.
    config.pool.connection.conn.keepalive = KeepaliveConfig {
        interval: Some(Duration::from_millis(300)),
        timeout: Duration::from_millis(500),
    };
    config.pool.backoff_min = Duration::from_millis(20);
    config.pool.backoff_max = Duration::from_millis(500);
    config
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));

    let tokio_rt = gorpc_tests::tokio_runtime();
    let tokio = Tokio::from_handle(tokio_rt.handle().clone());
    let smol = Smol::new();
    let slow = Duration::from_millis(20);
    let servers = (
        tokio_rt
            .block_on(TestServer::start(tokio.clone(), loopback, slow))
            .expect("tokio server binds"),
        smol::block_on(TestServer::start(smol.clone(), loopback, slow)).expect("smol server binds"),
    );
    let proxies = [
        FaultProxy::start(servers.0.addr()).expect("proxy starts"),
        FaultProxy::start(servers.1.addr()).expect("proxy starts"),
    ];

    let stats = Arc::new(Stats::default());
    let ids = Arc::new(AtomicU64::new(1));
    let running = Arc::new(AtomicUsize::new(0));
    let started_at = Instant::now();
    let stop_at = started_at + Duration::from_secs(args.secs);
    let mut clients = Vec::new();
    for proxy in &proxies {
        let tokio_client = Client::lazy(tokio.clone(), proxy.addr(), client_config());
        let smol_client = Client::lazy(smol.clone(), proxy.addr(), client_config());
        for _ in 0..args.callers {
            spawn_caller(
                &tokio,
                &tokio_client,
                &stats,
                &ids,
                &running,
                stop_at,
                rng.u64(..),
            );
            spawn_caller(
                &smol,
                &smol_client,
                &stats,
                &ids,
                &running,
                stop_at,
                rng.u64(..),
            );
        }
        clients.push(tokio_client);
        clients.push(smol_client);
    }

    let progress = Progress::start(&stats, args.secs);
    // Faults until the load stops; samples after warm-up and at the end.
    let warm_up = Duration::from_secs((args.secs / 4).clamp(1, 15));
    let mut first_sample = None;
    let mut faults = BTreeMap::<&str, u64>::new();
    while Instant::now() + Duration::from_millis(500) < stop_at {
        if first_sample.is_none() && started_at.elapsed() >= warm_up {
            first_sample = Some((rss_kib(), open_fds()));
        }
        let proxy = &proxies[rng.usize(0..proxies.len())];
        let (kind, fault, hold) = next_fault(&mut rng);
        if kind == "corrupt" {
            stats.corruptions.fetch_add(1, Ordering::SeqCst);
        }
        *faults.entry(kind).or_default() += 1;
        *stats.fault_now.lock().unwrap() = kind;
        proxy.set(fault);
        std::thread::sleep(hold.min(stop_at.saturating_duration_since(Instant::now())));
        proxy.set(Fault::Pass);
        *stats.fault_now.lock().unwrap() = "pass";
        std::thread::sleep(Duration::from_millis(rng.u64(200..1000)));
    }
    let first_sample = first_sample.unwrap_or_else(|| (rss_kib(), open_fds()));
    for proxy in &proxies {
        proxy.set(Fault::Pass);
    }
    std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
    let last_sample = (rss_kib(), open_fds());
    drop(progress);

    // Every call has a deadline of at most 3 s: callers end within that after `stop_at`.
    let callers_done = wait_until(Duration::from_secs(15), || {
        running.load(Ordering::SeqCst) == 0
    });
    let lost = stats
        .started
        .load(Ordering::SeqCst)
        .saturating_sub(stats.finished());

    // Quiet period: drop the clients, then every connection and handler must wind down.
    drop(clients);
    let quiet = wait_until(Duration::from_secs(10), || {
        servers.0.handlers.live() == 0
            && servers.1.handlers.live() == 0
            && proxies.iter().all(|p| p.open_connections() == 0)
    });
    let live_handlers = servers.0.handlers.live() + servers.1.handlers.live();
    let open_connections: usize = proxies.iter().map(FaultProxy::open_connections).sum();

    let errors = stats.errors.lock().unwrap().clone();
    let by_code = errors
        .iter()
        .map(|(code, n)| format!("{code}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    let fault_kinds = faults
        .iter()
        .map(|(kind, n)| format!("{kind}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    let (misrouted, overdue, corrupted, stream_disorder) = (
        stats.misrouted.load(Ordering::SeqCst),
        stats.overdue.load(Ordering::SeqCst),
        stats.corrupted.load(Ordering::SeqCst),
        stats.stream_disorder.load(Ordering::SeqCst),
    );
    println!(
        "calls={} streams={} ok={} errors={} (by code: {}) cancelled={} faults={} ({}) lost={} \
         misrouted={} corrupted={} stream_disorder={} overdue={} rss_kib={}->{} fds={}->{} live_handlers={} open_connections={} seed={}",
        stats.started.load(Ordering::SeqCst),
        stats.streams.load(Ordering::SeqCst),
        stats.ok.load(Ordering::SeqCst),
        errors.values().sum::<u64>(),
        by_code,
        stats.cancelled.load(Ordering::SeqCst),
        faults.values().sum::<u64>(),
        fault_kinds,
        lost,
        misrouted,
        corrupted,
        stream_disorder,
        overdue,
        first_sample.0,
        last_sample.0,
        first_sample.1,
        last_sample.1,
        live_handlers,
        open_connections,
        seed,
    );

    let mut broken = Vec::new();
    if !callers_done {
        broken.push("callers still running 15 s after the load stopped".to_owned());
    }
    if lost > 0 {
        broken.push(format!("{lost} calls never finished"));
    }
    if misrouted > 0 {
        broken.push(format!("{misrouted} answers reached the wrong caller"));
    }
    if corrupted > 0 && stats.corruptions.load(Ordering::SeqCst) == 0 {
        broken.push(format!(
            "{corrupted} garbled answers without any corruption fault"
        ));
    }
    if stream_disorder > 0 {
        broken.push(format!(
            "{stream_disorder} streams delivered messages out of order or ended early"
        ));
        for note in stats.disorder_notes.lock().unwrap().iter() {
            broken.push(format!("stream disorder: {note}"));
        }
    }
    if overdue > 0 {
        broken.push(format!(
            "{overdue} calls finished more than {OVERDUE_AFTER:?} after their deadline"
        ));
    }
    for status in stats.unexpected.lock().unwrap().iter() {
        broken.push(format!("unexpected error: {status}"));
    }
    let rss_limit = first_sample.0 as f64 * (1.0 + RSS_TOLERANCE_RATIO) + RSS_TOLERANCE_KIB as f64;
    if last_sample.0 as f64 > rss_limit {
        broken.push(format!(
            "RSS grew from {} to {} KiB (limit {rss_limit:.0})",
            first_sample.0, last_sample.0
        ));
    }
    if (last_sample.1 - first_sample.1).abs() > FD_TOLERANCE {
        broken.push(format!(
            "open file descriptors went from {} to {}",
            first_sample.1, last_sample.1
        ));
    }
    if !quiet {
        broken.push(format!(
            "after the quiet period: {live_handlers} handlers alive, {open_connections} connections open"
        ));
    }
    if broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        for breach in &broken {
            eprintln!("invariant broken: {breach}");
        }
        ExitCode::FAILURE
    }
}

/// A progress bar on stderr while the load runs (hidden unless stderr is a terminal): the
/// time gone, the calls so far and the fault in force.
struct Progress {
    bar: indicatif::ProgressBar,
    ticker: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Progress {
    fn start(stats: &Arc<Stats>, secs: u64) -> Progress {
        let bar = indicatif::ProgressBar::new(secs);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = {
            let (bar, stats, stop) = (bar.clone(), stats.clone(), stop.clone());
            let started = Instant::now();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    bar.set_position(started.elapsed().as_secs().min(secs));
                    let errors: u64 = stats.errors.lock().unwrap().values().sum();
                    bar.set_message(format!(
                        "calls {} ok {} errors {} fault {}",
                        stats.started.load(Ordering::Relaxed),
                        stats.ok.load(Ordering::Relaxed),
                        errors,
                        *stats.fault_now.lock().unwrap(),
                    ));
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Progress {
            bar,
            ticker: Some(ticker),
            stop,
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        self.bar.finish_and_clear();
    }
}

fn spawn_caller<C: Runtime>(
    rt: &C,
    client: &Client,
    stats: &Arc<Stats>,
    ids: &Arc<AtomicU64>,
    running: &Arc<AtomicUsize>,
    stop_at: Instant,
    seed: u64,
) {
    running.fetch_add(1, Ordering::SeqCst);
    let done = RunningGuard(running.clone());
    let task = caller(
        rt.clone(),
        client.clone(),
        stats.clone(),
        ids.clone(),
        stop_at,
        seed,
    );
    rt.spawn(async move {
        task.await;
        drop(done);
    });
}

/// Counts a caller as running until its task ends (or is dropped).
struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Polls `check` every 10 ms for up to `limit`.
fn wait_until(limit: Duration, check: impl Fn() -> bool) -> bool {
    let until = Instant::now() + limit;
    while !check() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
