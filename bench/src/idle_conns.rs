//! `--idle-connections N`: what an idle connection costs each system's server in resident
//! memory.
//!
//! For each selected system in turn: start its echo server (the child process and pinning
//! of the other workloads), open one connection that makes one echo call and closes, wait
//! [`BASELINE_SETTLE`], and read the server's `VmRSS` from `/proc/<pid>/status` as the
//! baseline. Then open `N` connections with the system's own client, each on a TCP
//! connection of its own and each making one echo call of `--payload` bytes (so the server
//! has set the connection up in full), at most [`OPENING`] at a time; hold them all idle for
//! [`IDLE_SETTLE`] (a quiet gorpc connection gives its buffers back within a second)
//! and read the RSS again, checking in `/proc/<pid>/fd` that the server still has every
//! connection open. A connection or call that fails, or a connection the server no longer
//! has, counts as an error; the row then says so and the run exits with a failure. Then
//! close every connection, stop the server, and go on to the next system.
//!
//! gorpc-grpc-client is not measured: its server is tonic's, which the tonic row measures.
//! gorpc-grpc-server is gorpc's server reached with tonic's client, as in the other
//! workloads.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{self, Either};
use futures::StreamExt;
use serde::Serialize;

use crate::systems::{self, System, Workload};
use crate::{
    and_list, print_json_line, ratio_lines, repeat_summary, round, run_heading, spread, Ratios,
};
use crate::{RunArgs, ServerProcess};

/// How long the server is left after the warm-up connection closes, before the baseline.
const BASELINE_SETTLE: Duration = Duration::from_millis(500);

/// How long the connections are held idle before the second reading.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// Connections being opened at once: well under the listen backlogs (1024 for every
/// server here), so that none overflows and leaves connects waiting for SYN retries.
const OPENING: usize = 256;

/// How long one connection may take to open and make its call before it counts as failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Open files this process (and each server) needs besides the connections: standard
/// streams, pipes to the server, the runtime's epoll and wakers, the listener.
const SPARE_FILES: u64 = 64;

/// Why a selected system is not measured (the bench's skipped list).
const NOT_MEASURED: &str = "--idle-connections measures servers, and gorpc-grpc-client's \
                            server is tonic's (the tonic row)";

/// The system the ratios are taken against.
const BASE: &str = "gorpc-tokio";

/// One result line; the field order is the output's key order.
#[derive(Serialize, Debug, Clone)]
pub struct IdleRow {
    pub system: &'static str,
    pub idle_connections: usize,
    pub payload: usize,
    /// The server's VmRSS before the connections, and with them open and idle.
    pub rss_baseline_kib: u64,
    pub rss_after_kib: u64,
    /// `(rss_after_kib - rss_baseline_kib)` over the connections held open (all of them
    /// unless `errors` says otherwise).
    pub kib_per_connection: f64,
    /// Connections that failed to open or to make their call, or that the server no longer
    /// had open at the second reading (all `N` when the system failed as a whole).
    pub errors: u64,
    /// Which run of `--repeat N` (absent when there is one run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<usize>,
}

/// What one system's client side saw.
struct Reading {
    baseline_kib: u64,
    after_kib: u64,
    /// Connections open and idle at the second reading.
    held: usize,
    /// Connections that failed, and the first failure's message.
    failed: usize,
    first_error: Option<String>,
}

/// Runs the mode: every selected server but gorpc-grpc-client, `args.repeat` times.
pub fn run(args: &RunArgs, n: usize) -> ExitCode {
    let limit = match gorpc_tests::raise_open_file_limit() {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("gorpc-bench: reading the open-file limit: {e}");
            return ExitCode::FAILURE;
        }
    };
    if n as u64 + SPARE_FILES > limit {
        eprintln!(
            "gorpc-bench: --idle-connections {n} needs about {} open files in this process \
             and as many in the server's, and the open-file limit is {limit}: use at most {}",
            n as u64 + SPARE_FILES,
            limit.saturating_sub(SPARE_FILES)
        );
        return ExitCode::from(2);
    }
    let (systems, skipped): (Vec<System>, Vec<System>) = crate::selected(&args.system)
        .into_iter()
        .partition(|&s| s != System::GorpcGrpcClient);
    if !skipped.is_empty() {
        let names: Vec<&str> = skipped.iter().map(|s| s.name()).collect();
        eprintln!("gorpc-bench: skipping {}: {NOT_MEASURED}", and_list(&names));
    }
    if systems.is_empty() {
        eprintln!("gorpc-bench: no system left to measure");
        return ExitCode::from(2);
    }
    let payload = systems::make_payload(args.payload);
    let mut failed = false;
    let mut runs: Vec<Vec<IdleRow>> = Vec::with_capacity(args.repeat);
    for run in 1..=args.repeat {
        let run = (args.repeat > 1).then_some(run);
        let mut rows = Vec::with_capacity(systems.len());
        for &system in &systems {
            let row = match measure(system, args, n, &payload) {
                Ok(reading) => {
                    if let Some(e) = &reading.first_error {
                        eprintln!(
                            "gorpc-bench: {}: {} of {n} connections failed, the first: {e}",
                            system.name(),
                            reading.failed
                        );
                    }
                    measured_row(system, n, args.payload, &reading, run)
                }
                Err(e) => {
                    eprintln!("gorpc-bench: {}: {e}", system.name());
                    failed_row(system, n, args.payload, run)
                }
            };
            failed |= row.errors > 0;
            print_json_line(&row);
            rows.push(row);
        }
        eprint!("{}{}", run_heading(run, args), summary(&rows));
        runs.push(rows);
    }
    if args.repeat > 1 {
        eprint!("{}", repeat_lines(&runs));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The row of a system measured, with whatever connections failed.
fn measured_row(
    system: System,
    n: usize,
    payload: usize,
    r: &Reading,
    run: Option<usize>,
) -> IdleRow {
    let grown = r.after_kib as f64 - r.baseline_kib as f64;
    IdleRow {
        system: system.name(),
        idle_connections: n,
        payload,
        rss_baseline_kib: r.baseline_kib,
        rss_after_kib: r.after_kib,
        kib_per_connection: if r.held == 0 {
            0.0
        } else {
            round(grown / r.held as f64, 2)
        },
        errors: r.failed as u64,
        run,
    }
}

/// The row of a system that could not be measured at all.
fn failed_row(system: System, n: usize, payload: usize, run: Option<usize>) -> IdleRow {
    IdleRow {
        system: system.name(),
        idle_connections: n,
        payload,
        rss_baseline_kib: 0,
        rss_after_kib: 0,
        kib_per_connection: 0.0,
        errors: n as u64,
        run,
    }
}

/// One system: start its echo server, hold `n` idle connections to it, stop it.
fn measure(system: System, args: &RunArgs, n: usize, payload: &Bytes) -> Result<Reading, String> {
    let mut server = ServerProcess::spawn(system, args, Workload::Echo)?;
    let port = server.port(Duration::from_secs(10))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pid = server.pid();
    let reading = hold(system, addr, payload, n, pid, args.client_threads);
    drop(server);
    reading
}

/// `system`'s client side, on its own runtime: the warm-up, the baseline, the `n`
/// connections and the second reading; every connection is closed when this returns.
fn hold(
    system: System,
    addr: SocketAddr,
    payload: &Bytes,
    n: usize,
    pid: u32,
    threads: usize,
) -> Result<Reading, String> {
    if system == System::GorpcSmol {
        return systems::smol_run(threads, |ex| async move {
            let rt = gorpc_smol::Smol::with_spawner(move |task| ex.spawn(task).detach());
            let sleep = |d| async move {
                smol::Timer::after(d).await;
            };
            let open = || systems::gorpc::idle_connection(rt.clone(), addr, payload);
            hold_on(pid, n, sleep, open).await
        });
    }
    let runtime = systems::tokio_runtime(threads).map_err(|e| e.to_string())?;
    let reading = runtime.block_on(async {
        let sleep = tokio::time::sleep;
        match system {
            System::GorpcTokio => {
                let rt = gorpc_tokio::Tokio::current();
                let open = || systems::gorpc::idle_connection(rt.clone(), addr, payload);
                hold_on(pid, n, sleep, open).await
            }
            System::Tonic | System::GorpcGrpcServer => {
                let open = || systems::tonic::idle_connection(addr, payload);
                hold_on(pid, n, sleep, open).await
            }
            System::Tarpc => {
                let open = || systems::tarpc::idle_connection(addr, payload);
                hold_on(pid, n, sleep, open).await
            }
            System::Raw => {
                let open = || systems::raw::idle_connection(addr, payload);
                hold_on(pid, n, sleep, open).await
            }
            System::GorpcGrpcClient => Err(NOT_MEASURED.to_owned()),
            System::GorpcSmol => unreachable!("held on smol above"),
        }
    });
    // Connections' background tasks (if any) must not outlive the measurement.
    runtime.shutdown_background();
    reading
}

/// The measurement, on whichever runtime `sleep` and `open` belong to: `open` opens one
/// connection and makes its call, returning what keeps the connection open.
async fn hold_on<H, O, OFut, S, SFut>(
    pid: u32,
    n: usize,
    sleep: S,
    open: O,
) -> Result<Reading, String>
where
    O: Fn() -> OFut,
    OFut: Future<Output = Result<H, String>>,
    S: Fn(Duration) -> SFut,
    SFut: Future<Output = ()>,
{
    let (open, sleep) = (&open, &sleep);
    let open_in_time = move || async move {
        let opened = std::pin::pin!(open());
        let late = std::pin::pin!(sleep(OPEN_TIMEOUT));
        match future::select(opened, late).await {
            Either::Left((opened, _)) => opened,
            Either::Right(_) => Err(format!("no answer within {OPEN_TIMEOUT:?}")),
        }
    };
    drop(
        open_in_time()
            .await
            .map_err(|e| format!("the warm-up connection: {e}"))?,
    );
    sleep(BASELINE_SETTLE).await;
    let baseline_kib = rss_kib(pid)?;
    let opened: Vec<Result<H, String>> = futures::stream::iter(0..n)
        .map(|_| open_in_time())
        .buffer_unordered(OPENING)
        .collect()
        .await;
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_error = None;
    for opened in opened {
        match opened {
            Ok(handle) => held.push(handle),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    sleep(IDLE_SETTLE).await;
    let after_kib = rss_kib(pid)?;
    // Every connection the client holds must still be open on the server's side.
    let serving = server_connections(pid)?;
    if serving < held.len() {
        failed += held.len() - serving;
        first_error.get_or_insert(format!(
            "the server has {serving} of the {} connections held open",
            held.len()
        ));
    }
    let reading = Reading {
        baseline_kib,
        after_kib,
        held: held.len().min(serving),
        failed,
        first_error,
    };
    drop(held);
    Ok(reading)
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    vm_rss_kib(&status).ok_or_else(|| format!("no VmRSS line in {path}"))
}

/// The connections process `pid` has open: its sockets but the listener.
fn server_connections(pid: u32) -> Result<usize, String> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
    let sockets = entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count();
    Ok(sockets.saturating_sub(1))
}

/// The `VmRSS:` figure of a `/proc/<pid>/status` text (the kernel writes it in kB, which
/// are KiB).
fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let kib = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then_some(kib)
}

/// The markdown table of `rows` and the ratios of each system's KiB per connection to
/// gorpc-tokio's.
fn summary(rows: &[IdleRow]) -> String {
    let mut s = String::from(
        "\n| system | idle connections | payload | RSS baseline KiB | RSS after KiB | KiB per connection | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.2} | {} |\n",
            r.system,
            r.idle_connections,
            r.payload,
            r.rss_baseline_kib,
            r.rss_after_kib,
            r.kib_per_connection,
            r.errors
        );
    }
    s += &ratio_lines("KiB per connection", &ratios(rows));
    s
}

/// Each measured system's KiB per connection over gorpc-tokio's (`tonic/gorpc-tokio
/// 3.00x`: tonic's server holds three times as much per idle connection), for the rows
/// without errors; none when gorpc-tokio did not run, failed, or grew by nothing.
fn ratios(rows: &[IdleRow]) -> Ratios {
    let clean = |r: &&IdleRow| r.errors == 0;
    let Some(base) = rows.iter().filter(clean).find(|r| r.system == BASE) else {
        return Vec::new();
    };
    if base.kib_per_connection <= 0.0 {
        return Vec::new();
    }
    let pairs: Vec<(String, f64)> = rows
        .iter()
        .filter(clean)
        .filter(|r| r.system != BASE)
        .map(|r| {
            let ratio = r.kib_per_connection / base.kib_per_connection;
            (format!("{}/{BASE}", r.system), ratio)
        })
        .collect();
    if pairs.is_empty() {
        Vec::new()
    } else {
        vec![(base.idle_connections, pairs)]
    }
}

/// After `--repeat`: each system's KiB per connection and each ratio, as the median and
/// min–max over the runs (runs with errors left out).
fn repeat_lines(runs: &[Vec<IdleRow>]) -> String {
    let mut systems: Vec<&str> = Vec::new();
    for r in runs.iter().flatten() {
        if !systems.contains(&r.system) {
            systems.push(r.system);
        }
    }
    let figures: Vec<String> = systems
        .iter()
        .filter_map(|&system| {
            let values: Vec<f64> = runs
                .iter()
                .flatten()
                .filter(|r| r.system == system && r.errors == 0)
                .map(|r| r.kib_per_connection)
                .collect();
            if values.is_empty() {
                return None;
            }
            let (median, min, max) = spread(&values);
            let over = if values.len() < runs.len() {
                format!(" in {} of {} runs", values.len(), runs.len())
            } else {
                String::new()
            };
            Some(format!("{system} {median:.2} ({min:.2}–{max:.2}{over})"))
        })
        .collect();
    let ratios: Vec<Ratios> = runs.iter().map(|rows| ratios(rows)).collect();
    let mut s = String::new();
    if !figures.is_empty() {
        s += &format!(
            "\nKiB per connection, median of {} runs (min–max): {}\n",
            runs.len(),
            figures.join(", ")
        );
    }
    s + &repeat_summary("KiB per connection", &ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &'static str, kib_per_connection: f64) -> IdleRow {
        IdleRow {
            system,
            idle_connections: 2000,
            payload: 1024,
            rss_baseline_kib: 10_000,
            rss_after_kib: 10_000 + (kib_per_connection * 2000.0) as u64,
            kib_per_connection,
            errors: 0,
            run: None,
        }
    }

    #[test]
    fn vm_rss_is_read_from_a_status_text() {
        let status = "Name:\tgorpc-bench\nVmPeak:\t  123456 kB\nVmHWM:\t    9000 kB\n\
                      VmRSS:\t    8532 kB\nRssAnon:\t    4000 kB\nThreads:\t2\n";
        assert_eq!(vm_rss_kib(status), Some(8532));
        assert_eq!(vm_rss_kib("Name:\tx\nVmHWM:\t9000 kB\n"), None);
        assert_eq!(vm_rss_kib("VmRSS:\tmany kB\n"), None);
        assert_eq!(vm_rss_kib("VmRSS:\t8532 MB\n"), None);
    }

    #[test]
    fn our_own_rss_is_readable() {
        let kib = rss_kib(std::process::id()).expect("reads /proc/self's status");
        assert!(kib > 0);
    }

    #[test]
    fn the_table_has_every_row_and_ratios_to_gorpc_tokio() {
        let mut failed = row("tarpc", 0.0);
        failed.errors = 3;
        let s = summary(&[
            row("gorpc-tokio", 8.0),
            row("gorpc-smol", 10.0),
            row("tonic", 24.0),
            failed,
        ]);
        assert!(
            s.contains("| gorpc-tokio | 2000 | 1024 | 10000 | 26000 | 8.00 | 0 |\n"),
            "{s}"
        );
        assert!(
            s.contains("| tarpc | 2000 | 1024 | 10000 | 10000 | 0.00 | 3 |\n"),
            "{s}"
        );
        assert!(
            s.ends_with(
                "\n\nKiB per connection ratios: gorpc-smol/gorpc-tokio 1.25x, \
                 tonic/gorpc-tokio 3.00x\n"
            ),
            "{s}"
        );
        // No ratios without gorpc-tokio.
        let s = summary(&[row("tonic", 24.0), row("raw", 4.0)]);
        assert!(!s.contains("ratios"), "{s}");
    }

    #[test]
    fn repeated_runs_end_with_medians() {
        let runs = vec![
            vec![row("gorpc-tokio", 8.0), row("tonic", 24.0)],
            vec![row("gorpc-tokio", 10.0), row("tonic", 20.0)],
            vec![row("gorpc-tokio", 9.0), row("tonic", 27.0)],
        ];
        assert_eq!(
            repeat_lines(&runs),
            "\nKiB per connection, median of 3 runs (min–max): gorpc-tokio 9.00 (8.00–10.00), \
             tonic 24.00 (20.00–27.00)\n\
             \nKiB per connection ratios, median of 3 runs (min–max): tonic/gorpc-tokio 3.00x \
             (2.00–3.00x)\n"
        );
    }
}
