//! gorpc-bench: the same loopback workload over gorpc-rs (tokio and smol), tonic, tarpc and a
//! raw pipelined TCP echo, one system after another.
//!
//! cargo run --release -p gorpc-bench -- --system all --concurrency 64 --payload 1024 \
//!     --secs 5 --connections 1
//!
//! Each system's server runs in a child process (this binary re-executed with the hidden
//! `serve` subcommand) pinned to `--server-cpu`; the client runs here, pinned to
//! `--client-cpu`. One JSON line per system goes to stdout; a markdown table and the qps
//! ratios go to stderr at the end.
//!
//! `--workload stream` measures server streams instead of calls: each of `--concurrency`
//! streams (default 1) asks for `--messages` messages of `--payload` bytes, takes them as fast
//! as flow control lets the server send, and opens the next stream when one ends; messages/s
//! and MB/s are counted over the measured window (every system but tarpc; raw's streams are
//! plain length-prefixed frames over TCP, one connection per stream, the ceiling):
//!
//! cargo run --release -p gorpc-bench -- --system all --workload stream --payload 1024 \
//!     --concurrency 1 --secs 5
//!
//! `--workload upload` is the same the other way: client streams of `--messages` messages
//! up, each answered with the count the server took; the server's receive windows are each
//! system's default (`--stream-window` and `--connection-window` set the clients' only).
//!
//! `--workload http` is the echo over HTTP/1.1: gorpc's HTTP client (`Client::http`, one
//! per caller, each keeping its connection alive) POSTs `--payload` bytes to gorpc's echo
//! method on a server with HTTP on (`Server::http`), on tokio and on smol:
//!
//! cargo run --release -p gorpc-bench -- --system all --workload http --payload 1024 --secs 5
//!
//! Beside tonic run two gRPC rows: gorpc-grpc-server (gorpc's server answering gRPC, called
//! by tonic's client) and gorpc-grpc-client (gorpc's gRPC client calling tonic's server),
//! for the echo, hello, stream and upload workloads alike, each set against tonic.
//!
//! `--repeat N` runs the whole selection N times and ends with each ratio's median and its
//! min–max over the runs.
//!
//! `--idle-connections N` measures memory instead of a load: for each system in turn, its
//! echo server's resident set (`VmRSS`) before and after N connections from the system's own
//! client, each on a TCP connection of its own, each having made one echo call of
//! `--payload` bytes and then held idle for 2 s; one JSON line per system with the KiB per
//! connection, and a table with each system's ratio to gorpc-tokio (`--secs`,
//! `--concurrency` and the like do not apply; gorpc-grpc-client, whose server is tonic's, is
//! skipped; see `idle_conns.rs`):
//!
//! cargo run --release -p gorpc-bench -- --system all --idle-connections 2000
//!
//! With `--sweep 1,4,16,64,256` instead of `--concurrency`, every selected system runs at each
//! of those concurrencies in turn (one JSON line per system and concurrency), and `--plot
//! PATH.png` draws qps and p99 latency against concurrency (for the stream workloads,
//! messages per second and MB/s):
//!
//! cargo run --release -p gorpc-bench -- --system all --sweep 1,4,16,64,256 --payload 1024 \
//!     --secs 2 --warmup 1 --connections 1 --plot bench/results.png

mod idle_conns;
mod loadgen;
mod plot;
mod progress;
mod systems;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use loadgen::{Measurement, StreamMeasurement};
use progress::Progress;
use systems::{ClientParams, System, Workload, HELLO_NAME};

#[derive(Parser, Debug)]
#[command(
    name = "gorpc-bench",
    about = "Loopback RPC benchmark: gorpc-rs vs tonic, tarpc and a raw TCP echo",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Internal: serve one system on 127.0.0.1:0, print the port, exit when stdin closes.
    #[command(hide = true)]
    Serve {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long, value_enum, default_value = "echo")]
        workload: Workload,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
}

/// Which systems to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Selection {
    GorpcTokio,
    GorpcSmol,
    Tonic,
    /// gorpc's server answering gRPC, called by tonic's client.
    GorpcGrpcServer,
    /// gorpc's gRPC client, calling tonic's server.
    GorpcGrpcClient,
    Tarpc,
    Raw,
    /// All of them, one after another, in the order above.
    All,
}

impl Selection {
    fn systems(self) -> Vec<System> {
        match self {
            Selection::GorpcTokio => vec![System::GorpcTokio],
            Selection::GorpcSmol => vec![System::GorpcSmol],
            Selection::Tonic => vec![System::Tonic],
            Selection::GorpcGrpcServer => vec![System::GorpcGrpcServer],
            Selection::GorpcGrpcClient => vec![System::GorpcGrpcClient],
            Selection::Tarpc => vec![System::Tarpc],
            Selection::Raw => vec![System::Raw],
            Selection::All => System::ALL.to_vec(),
        }
    }
}

/// The systems of `selections`, in the order given, each once.
fn selected(selections: &[Selection]) -> Vec<System> {
    let mut systems = Vec::new();
    for system in selections.iter().flat_map(|s| s.systems()) {
        if !systems.contains(&system) {
            systems.push(system);
        }
    }
    systems
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The systems to measure (comma-separated, run in the order given), or all of them.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        value_name = "SYSTEM,...",
        default_value = "all"
    )]
    system: Vec<Selection>,
    /// Callers in the closed loop [default: 64; 100 with --workload hello]; with --workload
    /// stream or upload, the streams open at once [default: 1]; with --workload http, each
    /// caller has a connection of its own.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Run at each of these concurrencies (comma-separated, e.g. 1,4,16,64,256) instead of
    /// one.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N,N,...",
        conflicts_with = "concurrency"
    )]
    sweep: Option<Vec<usize>>,
    /// With --sweep: draw qps and p99 latency (streams: messages/s and MB/s) against
    /// concurrency into this PNG file.
    #[arg(long, value_name = "PATH.png", requires = "sweep")]
    plot: Option<PathBuf>,
    /// Echo payload, or each stream message, in bytes (ignored by --workload hello, which
    /// sends a 5-byte name).
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Connections the callers are spread over (not with --workload http: a connection per
    /// caller).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Warm-up before the measured window, in seconds; its samples are dropped.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// echo: payload bytes there and back; hello: the Go gorpc benchmark's SayHello;
    /// stream: server streams of payload-sized messages; upload: client streams of them;
    /// http: the echo as HTTP/1.1 requests to gorpc's server (gorpc-tokio and gorpc-smol).
    #[arg(long, value_enum, default_value = "echo")]
    workload: Workload,
    /// With --workload stream or upload: messages per stream call, after which the client
    /// opens the next stream.
    #[arg(long, default_value_t = 100_000)]
    messages: u32,
    /// The clients' receive window per stream call, in bytes, for gorpc and tonic alike
    /// [default: each system's own: 1 MiB for gorpc, 2 MiB for tonic (hyper)]; raw has
    /// none but TCP's own buffers.
    #[arg(long, value_name = "BYTES")]
    stream_window: Option<u32>,
    /// The clients' receive window per connection, in bytes, for gorpc and tonic alike
    /// [default: each system's own: 4 MiB for gorpc, 5 MiB for tonic (hyper)]; raw has
    /// none but TCP's own buffers.
    #[arg(long, value_name = "BYTES")]
    connection_window: Option<u32>,
    /// CPU the server process is pinned to.
    #[arg(long, default_value_t = 0)]
    server_cpu: usize,
    /// CPU the client (this process) is pinned to.
    #[arg(long, default_value_t = 1)]
    client_cpu: usize,
    /// Worker threads of the server's runtime.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Worker threads of the client's runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Run the whole selection this many times in a row, then print each ratio's median and
    /// min–max over the runs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    repeat: usize,
    /// Instead of a load: hold this many idle connections to each server, each having made
    /// one echo call of --payload bytes, and report the server's resident memory per
    /// connection (--secs, --warmup, --concurrency and --connections do not apply).
    #[arg(long, value_name = "N", conflicts_with_all = ["sweep", "plot"])]
    idle_connections: Option<usize>,
}

/// One result line; the field order is the output's key order.
#[derive(Serialize, Debug, Clone)]
struct Row {
    system: &'static str,
    concurrency: usize,
    payload: usize,
    connections: usize,
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    /// Which run of `--repeat N` (absent when there is one run).
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<usize>,
}

/// One stream result line; the field order is the output's key order.
#[derive(Serialize, Debug, Clone)]
struct StreamRow {
    system: &'static str,
    /// Streams open at once.
    concurrency: usize,
    /// Bytes per message.
    payload: usize,
    /// Messages per stream call.
    messages: u32,
    /// Connections the streams ran over (raw: one per stream, whatever --connections says).
    connections: usize,
    /// The clients' receive windows asked for; `null`: each system's default.
    stream_window: Option<u32>,
    connection_window: Option<u32>,
    msgs_per_s: f64,
    /// Message payload bytes per second in MB (10^6 bytes), framing not counted.
    mb_per_s: f64,
    errors: u64,
    /// Which run of `--repeat N` (absent when there is one run).
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Serve {
            system,
            workload,
            threads,
            cpu,
        }) => serve_main(system, workload, threads, cpu),
        None => run_main(cli.run),
    }
}

/// Pins the calling thread (and the threads it starts later) to `cpu`, or warns.
fn pin(cpu: usize, who: &str) {
    let pinned = cpu < 1024 && core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    if !pinned {
        eprintln!("warning: could not pin the {who} to CPU {cpu}; it runs unpinned");
    }
}

fn workload_name(w: Workload) -> &'static str {
    match w {
        Workload::Echo => "echo",
        Workload::Hello => "hello",
        Workload::Stream => "stream",
        Workload::Upload => "upload",
        Workload::Http => "http",
    }
}

/// The child: serve until stdin closes.
fn serve_main(system: System, workload: Workload, threads: usize, cpu: Option<usize>) -> ExitCode {
    if let Some(cpu) = cpu {
        pin(cpu, "server");
    }
    // The parent closes our stdin when it is done (or dies): then exit, whatever runs.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        std::process::exit(0);
    });
    let served = systems::serve_forever(system, workload, threads.max(1), |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", addr.port());
        let _ = out.flush();
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gorpc-bench serve {}: {e}", system.name());
            ExitCode::FAILURE
        }
    }
}

/// A server child process: killed and reaped when dropped, whatever happened.
struct ServerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl ServerProcess {
    fn spawn(system: System, args: &RunArgs, workload: Workload) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut child = Command::new(exe)
            .args(["serve", "--system", system.name()])
            .args(["--workload", workload_name(workload)])
            .args(["--threads", &args.server_threads.to_string()])
            .args(["--cpu", &args.server_cpu.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning the server: {e}"))?;
        let stdin = child.stdin.take();
        Ok(ServerProcess { child, stdin })
    }

    /// The child's process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to print its port.
    fn port(&mut self, timeout: Duration) -> Result<u16, String> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or("the server's stdout is gone")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(line)) => line
                .trim()
                .parse()
                .map_err(|_| format!("the server printed {line:?} instead of a port")),
            Ok(Err(e)) => Err(format!("reading the server's port: {e}")),
            Err(_) => Err(format!("the server printed no port within {timeout:?}")),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Closing stdin asks the child to exit; give it a moment, then kill it.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_main(args: RunArgs) -> ExitCode {
    let concurrencies = args.sweep.clone().unwrap_or_else(|| {
        vec![args.concurrency.unwrap_or(match args.workload {
            Workload::Echo | Workload::Http => 64,
            Workload::Hello => 100,
            Workload::Stream | Workload::Upload => 1,
        })]
    });
    let not_run = args.workload.not_run().unwrap_or_default();
    let problems = [
        (
            args.sweep.is_none() && concurrencies.contains(&0),
            "--concurrency must be at least 1",
        ),
        (
            args.sweep.is_some() && concurrencies.contains(&0),
            "--sweep concurrencies must be at least 1",
        ),
        (concurrencies.is_empty(), "--sweep needs a concurrency"),
        (
            args.plot.as_deref().is_some_and(|p| !is_png_path(p)),
            "--plot must name a .png file in an existing directory",
        ),
        (args.connections == 0, "--connections must be at least 1"),
        (
            args.server_threads == 0,
            "--server-threads must be at least 1",
        ),
        (
            args.client_threads == 0,
            "--client-threads must be at least 1",
        ),
        (
            !(args.secs > 0.0 && args.secs.is_finite()),
            "--secs must be positive",
        ),
        (
            !(args.warmup >= 0.0 && args.warmup.is_finite()),
            "--warmup must not be negative",
        ),
        (
            args.payload > u32::MAX as usize / 2,
            "--payload is too large",
        ),
        (args.messages == 0, "--messages must be at least 1"),
        (args.repeat == 0, "--repeat must be at least 1"),
        (
            args.idle_connections == Some(0),
            "--idle-connections must be at least 1",
        ),
        (
            args.idle_connections.is_some() && args.workload != Workload::Echo,
            "--idle-connections holds connections to the echo servers; it takes no other \
             --workload",
        ),
        (
            args.repeat > 1 && args.plot.is_some(),
            "--plot draws one run; it does not combine with --repeat",
        ),
        (
            [args.stream_window, args.connection_window]
                .iter()
                .flatten()
                .any(|&w| !(64 * 1024..=1 << 30).contains(&w)),
            "--stream-window and --connection-window must be between 64 KiB and 1 GiB",
        ),
        (
            selected(&args.system)
                .iter()
                .all(|s| !s.runs(args.workload)),
            not_run,
        ),
        (
            args.workload == Workload::Upload
                && (args.stream_window.is_some() || args.connection_window.is_some()),
            "--stream-window and --connection-window set the clients' receive windows, \
             which an upload does not use",
        ),
    ];
    if let Some((_, msg)) = problems.iter().find(|(bad, _)| *bad) {
        eprintln!("gorpc-bench: {msg}");
        return ExitCode::from(2);
    }
    pin(args.client_cpu, "client");
    eprintln!(
        "machine: {}; server on CPU {}, client on CPU {}",
        machine(),
        args.server_cpu,
        args.client_cpu
    );
    if let Some(n) = args.idle_connections {
        return idle_conns::run(&args, n);
    }

    let (systems, skipped): (Vec<System>, Vec<System>) = selected(&args.system)
        .into_iter()
        .partition(|s| s.runs(args.workload));
    if !skipped.is_empty() {
        let names: Vec<&str> = skipped.iter().map(|s| s.name()).collect();
        eprintln!("gorpc-bench: skipping {}: {not_run}", and_list(&names));
    }
    let progress = Progress::new(
        args.repeat * concurrencies.len() * systems.len(),
        Duration::from_secs_f64(args.warmup + args.secs),
    );
    let plan = Plan {
        args: &args,
        systems: &systems,
        concurrencies: &concurrencies,
        progress: &progress,
    };
    let mut runs = Vec::with_capacity(args.repeat);
    let mut failed = false;
    for run in 1..=args.repeat {
        let run = (args.repeat > 1).then_some(run);
        let outcome = if args.workload.streams() {
            run_streams(&plan, run)
        } else {
            run_calls(&plan, run)
        };
        failed |= outcome.failed;
        runs.push(outcome.ratios);
    }
    drop(progress);
    if args.repeat > 1 {
        let what = if args.workload.streams() {
            "messages/s"
        } else {
            "qps"
        };
        eprint!("{}", repeat_summary(what, &runs));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What every run of the selection measures.
struct Plan<'a> {
    args: &'a RunArgs,
    /// The selected systems that run the workload, in order.
    systems: &'a [System],
    concurrencies: &'a [usize],
    progress: &'a Progress,
}

impl Plan<'_> {
    /// What the progress line says while `system` runs at `concurrency`.
    fn label(&self, run: Option<usize>, system: System, concurrency: usize) -> String {
        let run = run.map_or_else(String::new, |r| {
            format!("run {r} of {}: ", self.args.repeat)
        });
        format!(
            "{run}{}, {} workload, concurrency {concurrency}",
            system.name(),
            workload_name(self.args.workload),
        )
    }
}

/// One run of the selection: its ratios, and whether any system failed.
struct RunOutcome {
    ratios: Ratios,
    failed: bool,
}

/// Heads a run's table when there are several runs.
fn run_heading(run: Option<usize>, args: &RunArgs) -> String {
    run.map_or_else(String::new, |r| format!("\nrun {r} of {}:\n", args.repeat))
}

/// The call workloads (echo, hello, http): every system at each concurrency, once.
fn run_calls(plan: &Plan, run: Option<usize>) -> RunOutcome {
    let args = plan.args;
    let payload = match args.workload {
        Workload::Echo | Workload::Stream | Workload::Upload | Workload::Http => args.payload,
        Workload::Hello => HELLO_NAME.len(),
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for &concurrency in plan.concurrencies {
        for &system in plan.systems {
            plan.progress.start(plan.label(run, system, concurrency));
            let measured = measure(system, args, concurrency);
            plan.progress.done();
            let measured = measured.unwrap_or_else(|e| {
                eprintln!("gorpc-bench: {}: {e}", system.name());
                failed = true;
                Measurement::failed()
            });
            let row = Row {
                system: system.name(),
                concurrency,
                payload,
                // Over HTTP/1.1 every caller has its own connection.
                connections: if args.workload == Workload::Http {
                    concurrency
                } else {
                    args.connections
                },
                qps: round(measured.qps(), 1),
                p50_us: round(measured.quantile_us(0.50), 3),
                p99_us: round(measured.quantile_us(0.99), 3),
                p999_us: round(measured.quantile_us(0.999), 3),
                errors: measured.errors,
                run,
            };
            print_json_line(&row);
            rows.push(row);
        }
    }
    eprint!("{}{}", run_heading(run, args), summary(&rows));
    if let Some(path) = &args.plot {
        let points: Vec<(&str, plot::Point)> = rows
            .iter()
            .map(|r| {
                let point = plot::Point {
                    concurrency: r.concurrency,
                    throughput: r.qps,
                    second: r.p99_us,
                };
                (r.system, point)
            })
            .collect();
        let series = plot_series(plan.systems, &points);
        let title = plot_title(args, payload);
        failed |= !draw_plot(path, &title, plot::Measured::Calls, &series);
    }
    let results: Vec<(&str, usize, f64)> = rows
        .iter()
        .map(|r| (r.system, r.concurrency, r.qps))
        .collect();
    RunOutcome {
        ratios: ratios(&results),
        failed,
    }
}

/// The stream or upload workload: every selected system at each concurrency, once.
fn run_streams(plan: &Plan, run: Option<usize>) -> RunOutcome {
    let args = plan.args;
    let mut rows = Vec::new();
    let mut failed = false;
    for &concurrency in plan.concurrencies {
        for &system in plan.systems {
            plan.progress.start(plan.label(run, system, concurrency));
            let measured = measure_streams(system, args, concurrency);
            plan.progress.done();
            let measured = measured.unwrap_or_else(|e| {
                eprintln!("gorpc-bench: {}: {e}", system.name());
                failed = true;
                StreamMeasurement::failed()
            });
            let row = StreamRow {
                system: system.name(),
                concurrency,
                payload: args.payload,
                messages: args.messages,
                connections: if system == System::Raw {
                    concurrency
                } else {
                    args.connections
                },
                stream_window: args.stream_window,
                connection_window: args.connection_window,
                msgs_per_s: round(measured.messages_per_sec(), 1),
                mb_per_s: round(measured.mb_per_sec(args.payload), 2),
                errors: measured.errors,
                run,
            };
            print_json_line(&row);
            rows.push(row);
        }
    }
    eprint!(
        "{}{}",
        run_heading(run, args),
        stream_summary(args.workload, &rows)
    );
    if let Some(path) = &args.plot {
        let points: Vec<(&str, plot::Point)> = rows
            .iter()
            .map(|r| {
                let point = plot::Point {
                    concurrency: r.concurrency,
                    throughput: r.msgs_per_s,
                    second: r.mb_per_s,
                };
                (r.system, point)
            })
            .collect();
        let series = plot_series(plan.systems, &points);
        let title = plot_title(args, args.payload);
        failed |= !draw_plot(path, &title, plot::Measured::Streams, &series);
    }
    let results: Vec<(&str, usize, f64)> = rows
        .iter()
        .map(|r| (r.system, r.concurrency, r.msgs_per_s))
        .collect();
    RunOutcome {
        ratios: ratios(&results),
        failed,
    }
}

/// Starts `system`'s server and returns it with the client's parameters.
fn start(
    system: System,
    args: &RunArgs,
    concurrency: usize,
) -> Result<(ServerProcess, ClientParams), String> {
    let mut server = ServerProcess::spawn(system, args, args.workload)?;
    let port = server.port(Duration::from_secs(10))?;
    let params = ClientParams {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        workload: args.workload,
        concurrency,
        connections: args.connections,
        payload: systems::make_payload(args.payload),
        stream_messages: args.messages,
        stream_window: args.stream_window,
        connection_window: args.connection_window,
        warmup: Duration::from_secs_f64(args.warmup),
        secs: Duration::from_secs_f64(args.secs),
        threads: args.client_threads,
    };
    Ok((server, params))
}

/// One system: start its server, run the load against it, stop the server.
fn measure(system: System, args: &RunArgs, concurrency: usize) -> Result<Measurement, String> {
    let (server, params) = start(system, args, concurrency)?;
    let measured = systems::run_client(system, &params);
    drop(server);
    measured
}

/// One system's stream run: start its server, take its streams, stop the server.
fn measure_streams(
    system: System,
    args: &RunArgs,
    concurrency: usize,
) -> Result<StreamMeasurement, String> {
    let (server, params) = start(system, args, concurrency)?;
    let measured = systems::run_stream_client(system, &params);
    drop(server);
    measured
}

/// Whether `path` names a `.png` file whose directory exists (checked before a sweep that
/// may run for minutes rather than after it).
fn is_png_path(path: &Path) -> bool {
    let png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let dir_exists = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.is_dir(),
        _ => true,
    };
    png && dir_exists
}

/// One plot line per system, in the order the systems ran, from (system, point) pairs.
fn plot_series(systems: &[System], points: &[(&str, plot::Point)]) -> Vec<plot::Series> {
    systems
        .iter()
        .map(|system| plot::Series {
            name: system.name().to_string(),
            points: points
                .iter()
                .filter(|(name, _)| *name == system.name())
                .map(|&(_, point)| point)
                .collect(),
        })
        .collect()
}

/// Draws the `--plot` PNG; whether it was written (a failure is reported on stderr).
fn draw_plot(path: &Path, title: &str, measured: plot::Measured, series: &[plot::Series]) -> bool {
    match plot::render(path, title, measured, series) {
        Ok(()) => {
            eprintln!("\nplot: {}", path.display());
            true
        }
        Err(e) => {
            eprintln!("gorpc-bench: --plot: {e}");
            false
        }
    }
}

/// The plot's title: what was measured, with the payload and connections, and on what.
fn plot_title(args: &RunArgs, payload: usize) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "gorpc-bench sweep: {}, payload {payload} B, {}, {} s per point, on {}",
        workload_name(args.workload),
        plural(args.connections, "connection", "connections"),
        args.secs,
        machine(),
    )
}

/// The CPU model (`/proc/cpuinfo`'s first `model name`) and how many CPUs the machine has
/// (its `processor` entries: this process is pinned to one, which `available_parallelism`
/// would count), so that figures say what they were measured on.
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let cpus = info
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    format!("{model} ({cpus} CPUs)")
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// One result as a JSON line on stdout, flushed at once so that a reader sees each row as
/// it is measured.
fn print_json_line(row: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(row).expect("a row serializes")
    );
    let _ = out.flush();
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// The markdown table of `rows` and the qps ratios of the pairs that ran.
fn summary(rows: &[Row]) -> String {
    let mut s = String::from(
        "\n| system | concurrency | payload | connections | qps | p50 µs | p99 µs | p99.9 µs | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |\n",
            r.system,
            r.concurrency,
            r.payload,
            r.connections,
            r.qps,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.errors
        );
    }
    let results: Vec<(&str, usize, f64)> = rows
        .iter()
        .map(|r| (r.system, r.concurrency, r.qps))
        .collect();
    s += &ratio_lines("qps", &ratios(&results));
    s
}

/// The markdown table of stream `rows` of `workload` and the messages/s ratios of the pairs
/// that ran.
fn stream_summary(workload: Workload, rows: &[StreamRow]) -> String {
    let mut s = String::from(
        "\n| system | streams | payload | messages per stream | connections | messages/s | MB/s | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {} |\n",
            r.system,
            r.concurrency,
            r.payload,
            r.messages,
            r.connections,
            r.msgs_per_s,
            r.mb_per_s,
            r.errors
        );
    }
    if let Some(r) = rows.first() {
        let window = |w: Option<u32>, default: &str| {
            w.map_or_else(|| default.to_owned(), |w| format!("{w} B"))
        };
        let raw = if rows.iter().any(|r| r.system == System::Raw.name()) {
            "; none for raw (TCP's own buffers only)"
        } else {
            ""
        };
        s += &if workload == Workload::Upload {
            format!(
                "\nserver receive windows: per stream gorpc 1 MiB, tonic 1 MiB; per connection \
                 gorpc 4 MiB, tonic 1 MiB (each system's default){raw}\n"
            )
        } else {
            format!(
                "\nclient receive windows: per stream {}, per connection {}{raw}\n",
                window(r.stream_window, "default (gorpc 1 MiB, tonic 2 MiB)"),
                window(r.connection_window, "default (gorpc 4 MiB, tonic 5 MiB)"),
            )
        };
        if rows.iter().any(|r| r.system.starts_with("gorpc-grpc-")) {
            s += if workload == Workload::Upload {
                "gorpc-grpc-server has gorpc's server windows, gorpc-grpc-client tonic's\n"
            } else {
                "gorpc-grpc-server has tonic's client windows, gorpc-grpc-client gorpc's\n"
            };
        }
    }
    let results: Vec<(&str, usize, f64)> = rows
        .iter()
        .map(|r| (r.system, r.concurrency, r.msgs_per_s))
        .collect();
    s += &ratio_lines("messages/s", &ratios(&results));
    s
}

/// The pairs whose ratios are reported, numerator first, in the order printed.
const RATIO_PAIRS: [(&str, &str); 7] = [
    ("gorpc-tokio", "tonic"),
    ("gorpc-tokio", "tarpc"),
    ("gorpc-tokio", "raw"),
    ("gorpc-smol", "tonic"),
    ("gorpc-smol", "gorpc-tokio"),
    ("gorpc-grpc-server", "tonic"),
    ("gorpc-grpc-client", "tonic"),
];

/// One run's ratios: per concurrency, in the order run, each pair present (`a/b`) and its
/// value.
type Ratios = Vec<(usize, Vec<(String, f64)>)>;

/// The ratios of the pairs present in `results` (system, concurrency, value), compared at
/// the same concurrency; concurrencies with no pair are left out.
fn ratios(results: &[(&str, usize, f64)]) -> Ratios {
    let mut concurrencies: Vec<usize> = Vec::new();
    for &(_, c, _) in results {
        if !concurrencies.contains(&c) {
            concurrencies.push(c);
        }
    }
    concurrencies
        .into_iter()
        .filter_map(|c| {
            let value = |name: &str| {
                results
                    .iter()
                    .find(|&&(system, at, _)| system == name && at == c)
                    .map(|&(_, _, v)| v)
            };
            let pairs: Vec<(String, f64)> = RATIO_PAIRS
                .iter()
                .filter_map(|&(a, b)| match (value(a), value(b)) {
                    (Some(x), Some(y)) if y > 0.0 => Some((format!("{a}/{b}"), x / y)),
                    _ => None,
                })
                .collect();
            (!pairs.is_empty()).then_some((c, pairs))
        })
        .collect()
}

/// The `what` ratios of one run: one line for a single concurrency, one line per
/// concurrency for a sweep; preceded by an empty line when there is any.
fn ratio_lines(what: &str, ratios: &Ratios) -> String {
    let lines: Vec<String> = ratios
        .iter()
        .map(|(c, pairs)| {
            let pairs: Vec<String> = pairs
                .iter()
                .map(|(name, x)| format!("{name} {x:.2}x"))
                .collect();
            if ratios.len() == 1 {
                format!("{what} ratios: {}\n", pairs.join(", "))
            } else {
                format!("{what} ratios at concurrency {c}: {}\n", pairs.join(", "))
            }
        })
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n{}", lines.concat())
    }
}

/// Each ratio's median and min–max over the runs of `--repeat`, one line per concurrency
/// (a ratio missing from some runs, whose denominator failed there, says over how many it
/// was taken).
fn repeat_summary(what: &str, runs: &[Ratios]) -> String {
    // Every (concurrency, pair) in the order first seen, with its value in each run.
    type Values<'a> = Vec<(&'a str, Vec<f64>)>;
    let mut table: Vec<(usize, Values)> = Vec::new();
    for run in runs {
        for (c, pairs) in run {
            let at = match table.iter().position(|(at, _)| at == c) {
                Some(i) => i,
                None => {
                    table.push((*c, Vec::new()));
                    table.len() - 1
                }
            };
            let row = &mut table[at].1;
            for (name, x) in pairs {
                match row.iter_mut().find(|(n, _)| n == name) {
                    Some((_, values)) => values.push(*x),
                    None => row.push((name, vec![*x])),
                }
            }
        }
    }
    let n = runs.len();
    let lines: Vec<String> = table
        .iter()
        .map(|(c, pairs)| {
            let pairs: Vec<String> = pairs
                .iter()
                .map(|(name, values)| {
                    let (median, min, max) = spread(values);
                    let over = if values.len() < n {
                        format!(" in {} of {n} runs", values.len())
                    } else {
                        String::new()
                    };
                    format!("{name} {median:.2}x ({min:.2}–{max:.2}x{over})")
                })
                .collect();
            let at = if table.len() > 1 {
                format!(" at concurrency {c}")
            } else {
                String::new()
            };
            format!(
                "{what} ratios{at}, median of {n} runs (min–max): {}\n",
                pairs.join(", ")
            )
        })
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n{}", lines.concat())
    }
}

/// The median, minimum and maximum of `values` (not empty); an even count's median is
/// the mean of the middle two.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    (median, sorted[0], sorted[sorted.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &'static str, concurrency: usize, qps: f64) -> Row {
        Row {
            system,
            concurrency,
            payload: 1024,
            connections: 1,
            qps,
            p50_us: 10.0,
            p99_us: 20.0,
            p999_us: 30.0,
            errors: 0,
            run: None,
        }
    }

    #[test]
    fn sweep_parses_a_comma_separated_list() {
        let cli = Cli::try_parse_from(["gorpc-bench", "--sweep", "1,4,16", "--plot", "a.png"])
            .expect("parses");
        assert_eq!(cli.run.sweep, Some(vec![1, 4, 16]));
        assert_eq!(cli.run.plot, Some(PathBuf::from("a.png")));
        assert!(Cli::try_parse_from(["gorpc-bench", "--plot", "a.png"]).is_err());
        assert!(
            Cli::try_parse_from(["gorpc-bench", "--sweep", "1,4", "--concurrency", "8"]).is_err()
        );
        assert!(Cli::try_parse_from(["gorpc-bench", "--sweep", "1,x"]).is_err());
    }

    #[test]
    fn idle_connections_is_a_mode_of_its_own() {
        let cli =
            Cli::try_parse_from(["gorpc-bench", "--idle-connections", "2000"]).expect("parses");
        assert_eq!(cli.run.idle_connections, Some(2000));
        for with in [
            &["--sweep", "1,4"][..],
            &["--sweep", "1,4", "--plot", "a.png"],
        ] {
            let args = ["gorpc-bench", "--idle-connections", "10"]
                .iter()
                .chain(with);
            assert!(Cli::try_parse_from(args).is_err(), "{with:?}");
        }
    }

    #[test]
    fn png_paths() {
        assert!(is_png_path(Path::new("results.png")));
        assert!(is_png_path(Path::new("RESULTS.PNG")));
        assert!(is_png_path(&std::env::temp_dir().join("a.png")));
        assert!(!is_png_path(Path::new("results.svg")));
        assert!(!is_png_path(Path::new("results")));
        assert!(!is_png_path(Path::new("/no/such/dir/a.png")));
    }

    #[test]
    fn one_concurrency_keeps_the_single_ratio_line() {
        let s = summary(&[row("gorpc-tokio", 64, 200.0), row("tonic", 64, 100.0)]);
        assert!(
            s.ends_with("\n\nqps ratios: gorpc-tokio/tonic 2.00x\n"),
            "{s}"
        );
        assert!(s.contains("| gorpc-tokio | 64 | 1024 | 1 | 200 | 10.0 | 20.0 | 30.0 | 0 |"));
    }

    #[test]
    fn a_sweep_has_a_ratio_line_per_concurrency() {
        let s = summary(&[
            row("gorpc-tokio", 1, 300.0),
            row("tonic", 1, 100.0),
            row("gorpc-tokio", 4, 200.0),
            row("tonic", 4, 100.0),
        ]);
        assert!(
            s.ends_with(
                "\n\nqps ratios at concurrency 1: gorpc-tokio/tonic 3.00x\n\
                 qps ratios at concurrency 4: gorpc-tokio/tonic 2.00x\n"
            ),
            "{s}"
        );
    }

    fn stream_row(system: &'static str, msgs_per_s: f64) -> StreamRow {
        StreamRow {
            system,
            concurrency: 1,
            payload: 1024,
            messages: 100_000,
            connections: 1,
            stream_window: None,
            connection_window: None,
            msgs_per_s,
            mb_per_s: msgs_per_s * 1024.0 / 1e6,
            errors: 0,
            run: None,
        }
    }

    #[test]
    fn the_stream_summary_has_its_table_and_ratios() {
        let s = stream_summary(
            Workload::Stream,
            &[
                stream_row("gorpc-tokio", 300_000.0),
                stream_row("gorpc-smol", 150_000.0),
                stream_row("tonic", 100_000.0),
            ],
        );
        assert!(
            s.contains("| gorpc-tokio | 1 | 1024 | 100000 | 1 | 300000 | 307.2 | 0 |"),
            "{s}"
        );
        assert!(
            s.contains("per stream default (gorpc 1 MiB, tonic 2 MiB)"),
            "{s}"
        );
        assert!(
            s.ends_with(
                "\n\nmessages/s ratios: gorpc-tokio/tonic 3.00x, gorpc-smol/tonic 1.50x, \
                 gorpc-smol/gorpc-tokio 0.50x\n"
            ),
            "{s}"
        );
    }

    #[test]
    fn the_stream_summary_sets_raw_beside_the_others() {
        let s = stream_summary(
            Workload::Stream,
            &[
                stream_row("gorpc-tokio", 300_000.0),
                stream_row("tonic", 100_000.0),
                stream_row("raw", 1_200_000.0),
            ],
        );
        assert!(
            s.contains("| raw | 1 | 1024 | 100000 | 1 | 1200000 | 1228.8 | 0 |"),
            "{s}"
        );
        assert!(
            s.contains(
                "per connection default (gorpc 4 MiB, tonic 5 MiB); none for raw \
                 (TCP's own buffers only)\n"
            ),
            "{s}"
        );
        assert!(
            s.ends_with("\n\nmessages/s ratios: gorpc-tokio/tonic 3.00x, gorpc-tokio/raw 0.25x\n"),
            "{s}"
        );
        let without = stream_summary(Workload::Stream, &[stream_row("gorpc-tokio", 300_000.0)]);
        assert!(!without.contains("raw"), "{without}");
    }

    #[test]
    fn stream_options_parse() {
        let cli = Cli::try_parse_from([
            "gorpc-bench",
            "--workload",
            "stream",
            "--messages",
            "500",
            "--stream-window",
            "2097152",
        ])
        .expect("parses");
        assert_eq!(cli.run.workload, Workload::Stream);
        assert_eq!(cli.run.messages, 500);
        assert_eq!(cli.run.stream_window, Some(2 << 20));
        assert_eq!(cli.run.connection_window, None);
    }

    #[test]
    fn the_grpc_rows_are_set_against_tonic() {
        let s = summary(&[
            row("tonic", 64, 100.0),
            row("gorpc-grpc-server", 64, 150.0),
            row("gorpc-grpc-client", 64, 120.0),
        ]);
        assert!(
            s.ends_with(
                "\n\nqps ratios: gorpc-grpc-server/tonic 1.50x, gorpc-grpc-client/tonic 1.20x\n"
            ),
            "{s}"
        );
    }

    #[test]
    fn the_stream_summary_says_whose_windows_the_grpc_rows_have() {
        let rows = [
            stream_row("tonic", 100_000.0),
            stream_row("gorpc-grpc-server", 150_000.0),
        ];
        let s = stream_summary(Workload::Stream, &rows);
        assert!(
            s.contains("gorpc-grpc-server has tonic's client windows"),
            "{s}"
        );
        let s = stream_summary(Workload::Upload, &rows);
        assert!(
            s.contains("gorpc-grpc-server has gorpc's server windows"),
            "{s}"
        );
    }

    #[test]
    fn a_row_names_its_run_only_when_repeated() {
        let once = serde_json::to_string(&row("tonic", 1, 1.0)).unwrap();
        assert!(!once.contains("run"), "{once}");
        let again = serde_json::to_string(&Row {
            run: Some(2),
            ..row("tonic", 1, 1.0)
        })
        .unwrap();
        assert!(again.ends_with(",\"errors\":0,\"run\":2}"), "{again}");
    }

    #[test]
    fn skipped_systems_are_listed() {
        assert_eq!(and_list(&["tarpc"]), "tarpc");
        assert_eq!(and_list(&["tarpc", "raw"]), "tarpc and raw");
        assert_eq!(and_list(&["tonic", "tarpc", "raw"]), "tonic, tarpc and raw");
    }

    #[test]
    fn medians_and_spreads() {
        assert_eq!(spread(&[3.0]), (3.0, 3.0, 3.0));
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn repeated_runs_end_with_each_ratios_median_and_spread() {
        let run = |tokio: f64, smol: f64| {
            ratios(&[
                ("gorpc-tokio", 64, tokio),
                ("gorpc-smol", 64, smol),
                ("tonic", 64, 100.0),
            ])
        };
        let s = repeat_summary(
            "qps",
            &[run(200.0, 100.0), run(150.0, 0.0), run(250.0, 90.0)],
        );
        assert_eq!(
            s,
            "\nqps ratios, median of 3 runs (min–max): gorpc-tokio/tonic 2.00x (1.50–2.50x), \
             gorpc-smol/tonic 0.90x (0.00–1.00x), gorpc-smol/gorpc-tokio 0.36x (0.00–0.50x)\n"
        );
        // A ratio whose denominator failed in a run is taken over the others.
        let failed = ratios(&[("gorpc-tokio", 64, 200.0), ("tonic", 64, 0.0)]);
        let s = repeat_summary("qps", &[run(200.0, 100.0), failed]);
        assert!(
            s.contains("gorpc-tokio/tonic 2.00x (2.00–2.00x in 1 of 2 runs)"),
            "{s}"
        );
    }

    #[test]
    fn a_repeated_sweep_has_a_median_line_per_concurrency() {
        let run = |x: f64| {
            ratios(&[
                ("gorpc-tokio", 1, x),
                ("tonic", 1, 100.0),
                ("gorpc-tokio", 4, 2.0 * x),
                ("tonic", 4, 100.0),
            ])
        };
        let s = repeat_summary("qps", &[run(100.0), run(300.0)]);
        assert_eq!(
            s,
            "\nqps ratios at concurrency 1, median of 2 runs (min–max): gorpc-tokio/tonic \
             2.00x (1.00–3.00x)\n\
             qps ratios at concurrency 4, median of 2 runs (min–max): gorpc-tokio/tonic \
             4.00x (2.00–6.00x)\n"
        );
    }

    #[test]
    fn repeat_and_the_new_names_parse() {
        let cli = Cli::try_parse_from([
            "gorpc-bench",
            "--repeat",
            "3",
            "--system",
            "gorpc-grpc-server",
            "--workload",
            "http",
        ])
        .expect("parses");
        assert_eq!(cli.run.repeat, 3);
        assert_eq!(selected(&cli.run.system), [System::GorpcGrpcServer]);
        assert_eq!(cli.run.workload, Workload::Http);
        let cli = Cli::try_parse_from(["gorpc-bench", "--system", "tonic,gorpc-grpc-client,tonic"])
            .expect("parses");
        assert_eq!(
            selected(&cli.run.system),
            [System::Tonic, System::GorpcGrpcClient]
        );
        let cli = Cli::try_parse_from(["gorpc-bench"]).expect("parses");
        assert_eq!(selected(&cli.run.system), System::ALL);
        let all = Selection::All.systems();
        let names: Vec<&str> = all.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "gorpc-tokio",
                "gorpc-smol",
                "tonic",
                "gorpc-grpc-server",
                "gorpc-grpc-client",
                "tarpc",
                "raw"
            ]
        );
    }

    #[test]
    fn plot_series_follow_the_systems() {
        let point = |concurrency, throughput| plot::Point {
            concurrency,
            throughput,
            second: 0.0,
        };
        let points = [
            ("gorpc-tokio", point(1, 300.0)),
            ("tonic", point(1, 100.0)),
            ("gorpc-tokio", point(4, 200.0)),
            ("tonic", point(4, 100.0)),
        ];
        let series = plot_series(&[System::Tonic, System::GorpcTokio], &points);
        let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["tonic", "gorpc-tokio"]);
        let tokio: Vec<(usize, f64)> = series[1]
            .points
            .iter()
            .map(|p| (p.concurrency, p.throughput))
            .collect();
        assert_eq!(tokio, [(1, 300.0), (4, 200.0)]);
    }
}
