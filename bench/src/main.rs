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

mod loadgen;
mod systems;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use loadgen::Measurement;
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
    Tarpc,
    Raw,
    /// All five, one after another, in the order above.
    All,
}

impl Selection {
    fn systems(self) -> Vec<System> {
        match self {
            Selection::GorpcTokio => vec![System::GorpcTokio],
            Selection::GorpcSmol => vec![System::GorpcSmol],
            Selection::Tonic => vec![System::Tonic],
            Selection::Tarpc => vec![System::Tarpc],
            Selection::Raw => vec![System::Raw],
            Selection::All => System::ALL.to_vec(),
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The system to measure, or all of them.
    #[arg(long, value_enum, default_value = "all")]
    system: Selection,
    /// Callers in the closed loop [default: 64; 100 with --workload hello].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Echo payload in bytes (ignored by --workload hello, which sends a 5-byte name).
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Connections the callers are spread over.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Warm-up before the measured window, in seconds; its samples are dropped.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// echo: payload bytes there and back; hello: the Go gorpc benchmark's SayHello.
    #[arg(long, value_enum, default_value = "echo")]
    workload: Workload,
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
    let concurrency = args.concurrency.unwrap_or(match args.workload {
        Workload::Echo => 64,
        Workload::Hello => 100,
    });
    let problems = [
        (concurrency == 0, "--concurrency must be at least 1"),
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
    ];
    if let Some((_, msg)) = problems.iter().find(|(bad, _)| *bad) {
        eprintln!("gorpc-bench: {msg}");
        return ExitCode::from(2);
    }
    pin(args.client_cpu, "client");

    let payload = match args.workload {
        Workload::Echo => args.payload,
        Workload::Hello => HELLO_NAME.len(),
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for system in args.system.systems() {
        let measured = measure(system, &args, concurrency).unwrap_or_else(|e| {
            eprintln!("gorpc-bench: {}: {e}", system.name());
            failed = true;
            Measurement::failed()
        });
        let row = Row {
            system: system.name(),
            concurrency,
            payload,
            connections: args.connections,
            qps: round(measured.qps(), 1),
            p50_us: round(measured.quantile_us(0.50), 3),
            p99_us: round(measured.quantile_us(0.99), 3),
            p999_us: round(measured.quantile_us(0.999), 3),
            errors: measured.errors,
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(&row).expect("a row serializes")
        );
        let _ = out.flush();
        rows.push(row);
    }
    eprint!("{}", summary(&rows));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// One system: start its server, run the load against it, stop the server.
fn measure(system: System, args: &RunArgs, concurrency: usize) -> Result<Measurement, String> {
    let mut server = ServerProcess::spawn(system, args, args.workload)?;
    let port = server.port(Duration::from_secs(10))?;
    let params = ClientParams {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        workload: args.workload,
        concurrency,
        connections: args.connections,
        payload: systems::make_payload(args.payload),
        warmup: Duration::from_secs_f64(args.warmup),
        secs: Duration::from_secs_f64(args.secs),
        threads: args.client_threads,
    };
    let measured = systems::run_client(system, &params);
    drop(server);
    measured
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
    let qps = |name: &str| rows.iter().find(|r| r.system == name).map(|r| r.qps);
    let ratios: Vec<String> = [
        ("gorpc-tokio", "tonic"),
        ("gorpc-tokio", "tarpc"),
        ("gorpc-tokio", "raw"),
        ("gorpc-smol", "gorpc-tokio"),
    ]
    .iter()
    .filter_map(|&(a, b)| match (qps(a), qps(b)) {
        (Some(x), Some(y)) if y > 0.0 => Some(format!("{a}/{b} {:.2}x", x / y)),
        _ => None,
    })
    .collect();
    if !ratios.is_empty() {
        s += &format!("\nqps ratios: {}\n", ratios.join(", "));
    }
    s
}
