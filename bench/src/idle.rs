//! gorpc-idle: what idle connections cost a gorpc server, and whether the memory comes
//! back once they close. The server runs in this process on the chosen runtime; the
//! clients are plain blocking sockets in a child process (so each process needs only its
//! own end of every connection under the open-file limit) that each make one unary call
//! of 1 KiB and then hold their connection without another call:
//!
//!     cargo run --release -p gorpc-bench --bin gorpc-idle -- --connections 19900 --rounds 3
//!
//! Each round opens `--connections`, waits for the server to release what a quiet
//! connection does not need, and reads the live heap (a counting allocator: bytes asked
//! for and not yet freed) and the RSS; then closes them all and reads both again. With
//! `--features mimalloc` the same runs on mimalloc instead of the system allocator.
//! `--trim` also asks glibc's malloc to give free memory back to the kernel before each
//! reading (what `malloc_trim(0)` recovers is what the allocator, not a connection, was
//! keeping). The server itself trims when a flood of connections recedes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use gorpc::{Router, Runtime, Server, ServerReply, ServerRequest};
use gorpc_tests::blocking::called_once;
use gorpc_tests::counting::{live, Counting};

#[cfg(feature = "mimalloc")]
type Inner = mimalloc::MiMalloc;
#[cfg(feature = "mimalloc")]
const INNER: Inner = mimalloc::MiMalloc;
#[cfg(not(feature = "mimalloc"))]
type Inner = std::alloc::System;
#[cfg(not(feature = "mimalloc"))]
const INNER: Inner = std::alloc::System;

/// The allocator in use, counting the bytes it has handed out and not had back.
#[global_allocator]
static GLOBAL: Counting<Inner> = Counting(INNER);

#[derive(Parser, Debug)]
#[command(
    name = "gorpc-idle",
    about = "Heap and RSS of idle connections, and after they close"
)]
struct Args {
    /// Connections opened (and closed) each round.
    #[arg(long, default_value_t = 19_900)]
    connections: usize,
    /// Rounds: the memory after each close should not grow from round to round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The server's runtime; both by default.
    #[arg(long, value_enum)]
    runtime: Option<Which>,
    /// Before each reading, ask glibc's malloc to return free memory (`malloc_trim(0)`).
    #[arg(long)]
    trim: bool,
    /// Client threads opening connections.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Internal: be the client process, opening connections to this address.
    #[arg(long, hide = true)]
    client_of: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Which {
    Tokio,
    Smol,
}

const ECHO: &str = "/idle.Bench/Echo";
/// How long a client waits for each read of its call's answer.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A quiet connection releases its buffers within a second; this leaves room for it.
const SETTLE: Duration = Duration::from_millis(2500);

fn main() {
    let args = Args::parse();
    let limit = gorpc_tests::raise_open_file_limit().unwrap_or(0);
    let want = args.connections as u64 + 64;
    if limit < want {
        eprintln!("open-file limit {limit} (wanted {want}): use fewer --connections");
    }
    if let Some(addr) = args.client_of {
        return client_process(addr, &args);
    }
    println!(
        "allocator: {}{}; {} connections x {} rounds",
        if cfg!(feature = "mimalloc") {
            "mimalloc"
        } else {
            "system (glibc)"
        },
        if args.trim {
            ", readings also after malloc_trim"
        } else {
            ""
        },
        args.connections,
        args.rounds
    );
    for which in [Which::Tokio, Which::Smol] {
        if args.runtime.is_some_and(|only| only != which) {
            continue;
        }
        match which {
            Which::Tokio => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let tokio = gorpc_tokio::Tokio::from_handle(rt.handle().clone());
                let server = rt.block_on(serve(tokio));
                measure("tokio", server.local_addr(), &args);
                rt.block_on(server.abort());
            }
            Which::Smol => {
                let smol = gorpc_smol::Smol::new();
                let server = smol::block_on(serve(smol));
                measure("smol", server.local_addr(), &args);
                smol::block_on(server.abort());
            }
        }
    }
}

async fn serve<R: Runtime>(runtime: R) -> gorpc::ServerHandle<R> {
    let router = Router::new().route(ECHO, |req: ServerRequest| async move {
        ServerReply::ok(req.body)
    });
    Server::new(runtime, router)
        .max_connections(usize::MAX)
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binds")
}

fn measure(name: &str, addr: SocketAddr, args: &Args) {
    let warm = called_once(addr, ECHO, READ_TIMEOUT);
    std::thread::sleep(SETTLE);
    let (heap0, rss0) = (live(), rss());
    println!(
        "{name}: baseline heap {:.1} MiB, RSS {:.1} MiB",
        mib(heap0),
        mib(rss0)
    );
    for round in 1..=args.rounds {
        let began = Instant::now();
        let mut client = Clients::open(addr, args);
        let opened = began.elapsed();
        std::thread::sleep(SETTLE);
        let (heap_idle, rss_idle) = (live(), rss());
        let rss_idle_trimmed = args.trim.then(|| {
            trim();
            rss()
        });
        client.close();
        std::thread::sleep(SETTLE);
        let (heap_after, rss_after) = (live(), rss());
        let trimmed = args.trim.then(|| {
            trim();
            rss()
        });
        let n = args.connections as isize;
        println!(
            "{name} round {round}: opened in {:.1} s; idle: heap {} B/conn, RSS {} B/conn{}; \
             closed: heap {:+.2} MiB, RSS {:+.1} MiB from baseline{}",
            opened.as_secs_f64(),
            (heap_idle - heap0) / n,
            (rss_idle - rss0) / n,
            rss_idle_trimmed.map_or(String::new(), |rss| format!(
                " (after malloc_trim: {} B/conn)",
                (rss - rss0) / n
            )),
            mib(heap_after - heap0),
            mib(rss_after - rss0),
            trimmed.map_or(String::new(), |rss| format!(
                " (after malloc_trim: RSS {:+.1} MiB)",
                mib(rss - rss0)
            )),
        );
    }
    drop(warm);
}

/// The client process, holding the round's connections.
struct Clients {
    child: std::process::Child,
}

impl Clients {
    /// Starts the client process and waits until all its connections have made their call.
    fn open(addr: SocketAddr, args: &Args) -> Clients {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(["--client-of", &addr.to_string()])
            .args(["--connections", &args.connections.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starts the client process");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .expect("the client reports");
        assert_eq!(line.trim(), "open", "the client process failed");
        Clients { child }
    }

    /// Closes every connection (the client process exits) and waits for it.
    fn close(&mut self) {
        drop(self.child.stdin.take());
        self.child.wait().expect("the client process ends");
    }
}

/// The client process: opens the connections, says so, and holds them until its stdin
/// closes.
fn client_process(addr: SocketAddr, args: &Args) {
    let held = open(addr, args.connections, args.threads);
    println!("open");
    std::io::stdout().flush().expect("stdout");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
}

/// `n` connections that have each made one call, opened by `threads` threads.
fn open(addr: SocketAddr, n: usize, threads: usize) -> Vec<TcpStream> {
    let threads = threads.max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = n / threads + usize::from(t < n % threads);
                scope.spawn(move || {
                    (0..count)
                        .map(|_| called_once(addr, ECHO, READ_TIMEOUT))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a client thread"))
            .collect()
    })
}

/// Resident set size, from /proc/self/statm.
fn rss() -> isize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: isize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as isize
}

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
