//! `gorpc-churn`: the soak with many connections coming and going. A gorpc server in this
//! process (tokio with two workers, or smol) holds `--connections` connections from a child
//! process, and for `--secs` seconds the child churns them: every second, `--churn` of them
//! are closed, each with a fault, and as many new ones open and make a call, while
//! `--checks` held ones make a call too (in turn, so every held connection calls every
//! `connections / checks` seconds). The faults a closing connection is given, in equal
//! shares:
//! - `graceful`: closed (FIN);
//! - `reset`: closed with SO_LINGER 0 (RST);
//! - `abandoned`: a call sent, then closed before its answer;
//! - `truncated`: half a call's bytes, then closed;
//! - `garbage`: bytes that are no frame, then read until the server closes it (it must,
//!   within [`GARBAGE_CLOSE`]);
//! - `stalled`: half a call's bytes, held a second, then closed.
//!
//! The clients are blocking sockets framed by gorpc's client core (`gorpc_tests::blocking`),
//! so the child needs a few threads, not a task per connection, and each process holds one
//! end of every connection under the open-file limit.
//!
//! Checked, and any breach exits with status 1:
//! - every call on a healthy connection (a new one, or a held one's check) is answered OK
//!   with its own body (`lost`: no answer; `failed`: an error; `misrouted`: another body);
//!   every connect succeeds; every garbage connection is closed by the server;
//! - the server's open file descriptors and live heap (a counting allocator) stay flat
//!   while the churn runs: the mean of the last [`WINDOW`] one-second samples is within
//!   [`FD_TOLERANCE`] and [`HEAP_TOLERANCE_BYTES`] (plus [`HEAP_TOLERANCE_RATIO`]) of the
//!   mean of the first [`WINDOW`] after [`WARM_UP`];
//! - once the child exits, the server's descriptors return to their baseline and its heap
//!   to within [`SETTLED_SLACK`] of it.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use gorpc::{Router, Runtime, Server, ServerReply, ServerRequest};
use gorpc_tests::blocking::{BlockingConn, CallError};
use gorpc_tests::counting::{live, Counting};

#[global_allocator]
static GLOBAL: Counting<std::alloc::System> = Counting(std::alloc::System);

const ECHO: &str = "/churn.Soak/Echo";
/// How long a client waits for each read of an answer before the call counts as lost.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How soon the server must close a connection that sent garbage.
const GARBAGE_CLOSE: Duration = Duration::from_secs(10);
/// Samples skipped before the first window: the heap grows while the first buffers,
/// tables and the runtime's structures reach their working size.
const WARM_UP: usize = 3;
/// One-second samples averaged at the start and at the end of the churn.
const WINDOW: usize = 5;
/// Growth of the server's descriptors allowed between the windows.
const FD_TOLERANCE: f64 = 64.0;
/// Growth of the server's live heap allowed between the windows: connections that called
/// in the last second still hold their buffers (about 40 KiB each), and how many do at a
/// sample varies with scheduling.
const HEAP_TOLERANCE_BYTES: f64 = 16.0 * 1024.0 * 1024.0;
const HEAP_TOLERANCE_RATIO: f64 = 0.10;
/// What the heap may still differ from its baseline once every connection closed: the
/// runtimes keep the room their tables grew to (async-executor's task slab, tokio's
/// scheduler queues and I/O registrations freed in batches).
const SETTLED_SLACK: isize = 4 * 1024 * 1024;
/// How long the server has to close everything after the child exits.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gorpc-churn",
    about = "Many connections opening and closing under faults: no call lost, descriptors and heap flat"
)]
struct Args {
    /// Connections held.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// How long the churn runs, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Connections closed (with a fault) and opened (with a call) each second.
    #[arg(long, default_value_t = 1_000)]
    churn: usize,
    /// Held connections that make a call each second.
    #[arg(long, default_value_t = 500)]
    checks: usize,
    /// The server's runtime; both, one after the other, by default.
    #[arg(long, value_enum)]
    runtime: Option<Which>,
    /// Client threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Seed of every random choice (default: from the clock); printed in the summary.
    #[arg(long)]
    seed: Option<u64>,
    /// Internal: be the client process, connecting to this address.
    #[arg(long, hide = true)]
    client_of: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Which {
    Tokio,
    Smol,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let limit = match gorpc_tests::raise_open_file_limit() {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("gorpc-churn: reading the open-file limit: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Held, stalled until the next second, and closing ones, plus the process's own.
    let needed = (args.connections + 2 * args.churn + 256) as u64;
    if needed > limit {
        eprintln!(
            "gorpc-churn: {} connections churning {} a second need about {needed} open files \
             in each process, and the limit is {limit}",
            args.connections, args.churn
        );
        return ExitCode::from(2);
    }
    if args.threads == 0 || args.churn > args.connections || args.checks > args.connections {
        eprintln!(
            "gorpc-churn: --threads must be positive, --churn and --checks at most --connections"
        );
        return ExitCode::from(2);
    }
    let seed = *args.seed.get_or_insert_with(|| fastrand::u64(..));
    if let Some(addr) = args.client_of {
        return client_process(addr, &args);
    }
    println!(
        "gorpc-churn: {} connections, {} closed with a fault and {} opened each second, {} \
         checks a second, {} s, seed {seed}",
        args.connections, args.churn, args.churn, args.checks, args.secs
    );
    let mut ok = true;
    for which in [Which::Tokio, Which::Smol] {
        if args.runtime.is_some_and(|only| only != which) {
            continue;
        }
        ok &= match which {
            Which::Tokio => {
                let rt = gorpc_tests::tokio_runtime();
                let tokio = gorpc_tests::Tokio::from_handle(rt.handle().clone());
                let server = rt.block_on(serve(tokio, &args));
                let ok = soak("tokio", server.local_addr(), &args);
                rt.block_on(server.abort());
                ok
            }
            Which::Smol => {
                let smol = gorpc_tests::Smol::new();
                let server = smol::block_on(serve(smol, &args));
                let ok = soak("smol", server.local_addr(), &args);
                smol::block_on(server.abort());
                ok
            }
        };
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn serve<R: Runtime>(runtime: R, args: &Args) -> gorpc::ServerHandle<R> {
    let router = Router::new().route(ECHO, |req: ServerRequest| async move {
        ServerReply::ok(req.body)
    });
    // The connection limit is not what this measures: room for every connection the
    // churn can hold at once.
    Server::new(runtime, router)
        .max_connections(args.connections + 4 * args.churn)
        .bind(gorpc_tests::loopback())
        .await
        .expect("binds")
}

/// One server's run: baseline, the child's churn sampled each second, the close. Returns
/// whether every check held.
fn soak(name: &str, addr: SocketAddr, args: &Args) -> bool {
    // One call first, so what is made once is in the baseline.
    let mut warm = BlockingConn::connect(addr, READ_TIMEOUT).expect("connects");
    warm.call(ECHO, b"warm").expect("the warm-up call");
    drop(warm);
    std::thread::sleep(Duration::from_millis(1500));
    let (fds0, heap0) = (open_fds(), live());
    println!(
        "{name}: baseline {fds0} descriptors, heap {:.1} MiB",
        mib(heap0)
    );

    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--client-of", &addr.to_string()])
        .args(["--connections", &args.connections.to_string()])
        .args(["--secs", &args.secs.to_string()])
        .args(["--churn", &args.churn.to_string()])
        .args(["--checks", &args.checks.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--seed", &args.seed.expect("set").to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starts the client process");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut summary = None;
    for line in stdout.lines() {
        let Ok(line) = line else { break };
        if line.starts_with("tick") {
            let (fds, heap) = (open_fds(), live());
            samples.push((fds as f64, heap as f64));
            println!(
                "{name}: {line}; server: {fds} descriptors, heap {:.1} MiB",
                mib(heap)
            );
        } else if line.starts_with("open") {
            println!(
                "{name}: {line}; server: {} descriptors, heap {:.1} MiB",
                open_fds(),
                mib(live())
            );
        } else if let Some(rest) = line.strip_prefix("done ") {
            summary = Some(rest.to_string());
        } else {
            println!("{name}: {line}");
        }
    }
    let status = child.wait().expect("the client process ends");
    let mut ok = status.success();
    match &summary {
        Some(s) => println!("{name}: clients: {s}"),
        None => println!("{name}: the client process ended without a summary ({status})"),
    }

    if samples.len() >= WARM_UP + 2 * WINDOW {
        let mean = |w: &[(f64, f64)]| {
            let n = w.len() as f64;
            (
                w.iter().map(|s| s.0).sum::<f64>() / n,
                w.iter().map(|s| s.1).sum::<f64>() / n,
            )
        };
        let (fds_a, heap_a) = mean(&samples[WARM_UP..WARM_UP + WINDOW]);
        let (fds_b, heap_b) = mean(&samples[samples.len() - WINDOW..]);
        let fds_flat = fds_b - fds_a <= FD_TOLERANCE;
        let heap_flat = heap_b - heap_a <= HEAP_TOLERANCE_BYTES + HEAP_TOLERANCE_RATIO * heap_a;
        println!(
            "{name}: during the churn, first and last {WINDOW} s: descriptors {fds_a:.0} -> \
             {fds_b:.0} ({}), heap {:.1} -> {:.1} MiB ({})",
            if fds_flat { "flat" } else { "GREW" },
            heap_a / 1048576.0,
            heap_b / 1048576.0,
            if heap_flat { "flat" } else { "GREW" },
        );
        ok &= fds_flat && heap_flat;
    } else {
        println!(
            "{name}: only {} samples: run at least {} s to check flatness",
            samples.len(),
            WARM_UP + 2 * WINDOW
        );
        ok = false;
    }

    // Every connection is closed now: the server must close its ends and free them.
    let began = Instant::now();
    let (fds, heap) = loop {
        let (fds, heap) = (open_fds(), live());
        if (fds <= fds0 && (heap - heap0).abs() <= SETTLED_SLACK) || began.elapsed() > SETTLE {
            break (fds, heap);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let settled = fds <= fds0 && (heap - heap0).abs() <= SETTLED_SLACK;
    println!(
        "{name}: after the close ({:.1} s): {fds} descriptors (baseline {fds0}), heap {:+.2} MiB \
         from the baseline ({})",
        began.elapsed().as_secs_f64(),
        mib(heap - heap0),
        if settled { "settled" } else { "DID NOT SETTLE" }
    );
    ok &= settled;
    println!("{name}: {}", if ok { "PASS" } else { "FAIL" });
    ok
}

/// The child's counts, across its threads.
#[derive(Default)]
struct Counts {
    /// Calls on healthy connections, and how they ended.
    calls: AtomicU64,
    ok: AtomicU64,
    lost: AtomicU64,
    failed: AtomicU64,
    misrouted: AtomicU64,
    connects_failed: AtomicU64,
    /// Connections closed with a fault, and garbage ones the server left open.
    faulted: AtomicU64,
    garbage_kept_open: AtomicU64,
    /// Seconds whose work ran past the second.
    late: AtomicU64,
    /// The first few breaches, for the summary.
    notes: Mutex<Vec<String>>,
}

impl Counts {
    fn note(&self, what: String) {
        let mut notes = self.notes.lock().unwrap();
        if notes.len() < 5 {
            notes.push(what);
        }
    }

    fn breaches(&self) -> u64 {
        self.lost.load(Ordering::SeqCst)
            + self.failed.load(Ordering::SeqCst)
            + self.misrouted.load(Ordering::SeqCst)
            + self.connects_failed.load(Ordering::SeqCst)
            + self.garbage_kept_open.load(Ordering::SeqCst)
    }
}

/// The child: opens the connections, says so, churns for `--secs`, reports each second
/// and at the end, and exits (closing everything).
fn client_process(addr: SocketAddr, args: &Args) -> ExitCode {
    let counts = Arc::new(Counts::default());
    let threads = args.threads;
    let share = |total: usize, t: usize| total / threads + usize::from(t < total % threads);
    // Every thread has opened its share: the churn starts.
    let opened = Arc::new(std::sync::Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let worker = Worker {
                addr,
                thread: t as u64,
                held: Vec::new(),
                stalled: Vec::new(),
                next_check: 0,
                next_id: 0,
                rng: fastrand::Rng::with_seed(args.seed.expect("set") ^ ((t as u64) << 32)),
                counts: counts.clone(),
            };
            let (n, churn, checks) = (
                share(args.connections, t),
                share(args.churn, t),
                share(args.checks, t),
            );
            let (opened, stop) = (opened.clone(), stop.clone());
            std::thread::spawn(move || worker.run(n, churn, checks, &opened, &stop))
        })
        .collect();
    opened.wait();
    println!("open: {} connections", args.connections);
    std::io::stdout().flush().expect("stdout");
    let began = Instant::now();
    for second in 1..=args.secs {
        let at = began + Duration::from_secs(second);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        println!(
            "tick {second}: calls {} ok {} breaches {} faulted {}",
            counts.calls.load(Ordering::SeqCst),
            counts.ok.load(Ordering::SeqCst),
            counts.breaches(),
            counts.faulted.load(Ordering::SeqCst),
        );
        std::io::stdout().flush().expect("stdout");
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().expect("a client thread");
    }
    let c = &counts;
    println!(
        "done calls {} ok {} lost {} failed {} misrouted {} connects_failed {} faulted {} \
         garbage_kept_open {} late_seconds {} seed {}{}",
        c.calls.load(Ordering::SeqCst),
        c.ok.load(Ordering::SeqCst),
        c.lost.load(Ordering::SeqCst),
        c.failed.load(Ordering::SeqCst),
        c.misrouted.load(Ordering::SeqCst),
        c.connects_failed.load(Ordering::SeqCst),
        c.faulted.load(Ordering::SeqCst),
        c.garbage_kept_open.load(Ordering::SeqCst),
        c.late.load(Ordering::SeqCst),
        args.seed.expect("set"),
        c.notes
            .lock()
            .unwrap()
            .iter()
            .map(|n| format!("; {n}"))
            .collect::<String>(),
    );
    if c.breaches() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One client thread and its share of the connections.
struct Worker {
    addr: SocketAddr,
    thread: u64,
    held: Vec<BlockingConn>,
    /// Connections holding half a call, closed at the next second.
    stalled: Vec<TcpStream>,
    /// The held connection whose turn to call is next.
    next_check: usize,
    next_id: u64,
    rng: fastrand::Rng,
    counts: Arc<Counts>,
}

impl Worker {
    fn run(
        mut self,
        n: usize,
        churn: usize,
        checks: usize,
        opened: &std::sync::Barrier,
        stop: &AtomicBool,
    ) {
        for _ in 0..n {
            if let Some(conn) = self.open() {
                self.held.push(conn);
            }
        }
        opened.wait();
        let began = Instant::now();
        let mut second = 0;
        while !stop.load(Ordering::SeqCst) {
            self.stalled.clear();
            for _ in 0..churn.min(self.held.len()) {
                let i = self.rng.usize(..self.held.len());
                let conn = self.held.swap_remove(i);
                self.fault(conn);
                if let Some(conn) = self.open() {
                    self.held.push(conn);
                }
            }
            for _ in 0..checks.min(self.held.len()) {
                self.next_check = (self.next_check + 1) % self.held.len();
                let body = self.body();
                if !checked_call(&self.counts, &mut self.held[self.next_check], &body) {
                    // Counted; the connection is done with.
                    self.held.swap_remove(self.next_check);
                }
            }
            second += 1;
            let next = began + Duration::from_secs(second);
            match next.checked_duration_since(Instant::now()) {
                Some(wait) => {
                    // Wake for the stop flag at least every 100 ms.
                    let until = Instant::now() + wait;
                    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                        std::thread::sleep(
                            until
                                .saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(100)),
                        );
                    }
                }
                None => {
                    self.counts.late.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// A body of 64 to 1024 bytes starting with a call id unique in the process.
    fn body(&mut self) -> Vec<u8> {
        self.next_id += 1;
        let id = self.thread << 48 | self.next_id;
        let len = self.rng.usize(64..=1024);
        let mut body = id.to_le_bytes().to_vec();
        body.resize(len, (id % 251) as u8);
        body
    }

    /// A new connection that has made one call, or `None` (counted) if it could not.
    fn open(&mut self) -> Option<BlockingConn> {
        match BlockingConn::connect(self.addr, READ_TIMEOUT) {
            Ok(mut conn) => {
                let body = self.body();
                checked_call(&self.counts, &mut conn, &body).then_some(conn)
            }
            Err(e) => {
                self.counts.connects_failed.fetch_add(1, Ordering::SeqCst);
                self.counts.note(format!("connect: {e}"));
                None
            }
        }
    }

    /// Closes `conn` with a fault picked at random.
    fn fault(&mut self, mut conn: BlockingConn) {
        self.counts.faulted.fetch_add(1, Ordering::SeqCst);
        // Half of a call's bytes, as the client core frames it.
        let half_call = |conn: &mut BlockingConn, body: &[u8]| {
            let mut frame = conn.frame(ECHO, body).unwrap_or_default();
            frame.truncate(frame.len() / 2);
            frame
        };
        match self.rng.u8(0..6) {
            0 => drop(conn),
            1 => {
                let _ = socket2::SockRef::from(&*conn.socket()).set_linger(Some(Duration::ZERO));
                drop(conn);
            }
            2 => {
                let body = self.body();
                let _ = conn.send(ECHO, &body);
                drop(conn);
            }
            3 => {
                let body = self.body();
                let half = half_call(&mut conn, &body);
                let _ = conn.socket().write_all(&half);
                drop(conn);
            }
            4 => {
                let mut garbage = vec![0u8; self.rng.usize(20..=512)];
                self.rng.fill(&mut garbage);
                // Every frame starts with the magic `GR`: this is no frame.
                garbage[..2].copy_from_slice(b"XX");
                let mut socket = conn.into_socket();
                let _ = socket.set_read_timeout(Some(GARBAGE_CLOSE));
                let _ = socket.write_all(&garbage);
                let mut sink = [0u8; 4096];
                loop {
                    match socket.read(&mut sink) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            self.counts.garbage_kept_open.fetch_add(1, Ordering::SeqCst);
                            self.counts
                                .note("the server kept a connection that sent garbage".into());
                            break;
                        }
                        // A reset: closed.
                        Err(_) => break,
                    }
                }
            }
            _ => {
                let body = self.body();
                let half = half_call(&mut conn, &body);
                let mut socket = conn.into_socket();
                let _ = socket.write_all(&half);
                self.stalled.push(socket);
            }
        }
    }
}

/// The process's open file descriptors.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Calls on a healthy connection and checks the answer is its own body; counts how it
/// ended. Returns whether it was answered OK.
fn checked_call(counts: &Counts, conn: &mut BlockingConn, body: &[u8]) -> bool {
    counts.calls.fetch_add(1, Ordering::SeqCst);
    let what = match conn.call(ECHO, body) {
        Ok(answer) if answer[..] == body[..] => {
            counts.ok.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        Ok(answer) => {
            counts.misrouted.fetch_add(1, Ordering::SeqCst);
            format!(
                "misrouted: sent id {:x}, answered with {} bytes",
                u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
                answer.len()
            )
        }
        Err(CallError::Io(e)) => {
            counts.lost.fetch_add(1, Ordering::SeqCst);
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!("lost: no answer within {READ_TIMEOUT:?}")
            } else {
                format!("lost: {e}")
            }
        }
        Err(CallError::Status(s)) => {
            counts.failed.fetch_add(1, Ordering::SeqCst);
            format!("failed: {s}")
        }
    };
    counts.note(what);
    false
}
