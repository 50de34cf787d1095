//! gorpc-overload: offers a server many times the calls it can finish and reports what got
//! done. The server (on `--runtime`, tokio by default) has one runtime worker (pinned to
//! CPU 0); its handler spins for
//! `--service-us` of CPU and then waits `--backend-ms` (a backend call), so the CPU bounds
//! its capacity while calls overlap. Callers (on CPU 1) keep `--callers` calls
//! outstanding, each with a `--timeout-ms` deadline; a refused caller waits the server's
//! retry hint before trying again, as a well-behaved client does. Run once with admission
//! off and once on, in one session, to compare:
//!
//!     cargo run --release -p gorpc-bench --bin gorpc-overload -- --secs 30
//!
//! Reported: goodput (calls answered OK per second) against the capacity measured first
//! with one caller per slot, the p50/p99 latency of the OK calls, and how every other call
//! ended: refused (with the hint), past its deadline, or anything else (which would be a
//! lost call: there should be none).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use gorpc::server::AdmissionConfig;
use gorpc::Runtime;
use gorpc_tokio::{Client, Code, Router, Server, Tokio};
use hdrhistogram::Histogram;

#[derive(Parser, Debug)]
#[command(
    name = "gorpc-overload",
    about = "Goodput and latency under overload, admission off and on"
)]
struct Args {
    /// Seconds of overload per run (after a 1 s warm-up).
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// CPU time each call spins for in its handler, in microseconds.
    #[arg(long, default_value_t = 100)]
    service_us: u64,
    /// Then the handler waits this long, in milliseconds (a backend call).
    #[arg(long, default_value_t = 10)]
    backend_ms: u64,
    /// Calls kept outstanding during the overload.
    #[arg(long, default_value_t = 2000)]
    callers: usize,
    /// Each call's deadline, in milliseconds.
    #[arg(long, default_value_t = 100)]
    timeout_ms: u64,
    /// Admission's max_in_flight; also the callers of the capacity run.
    #[arg(long, default_value_t = 64)]
    slots: usize,
    /// Admission's max_queued.
    #[arg(long, default_value_t = 64)]
    queued: usize,
    /// Admission's retry hint, in milliseconds.
    #[arg(long, default_value_t = 250)]
    retry_after_ms: u64,
    /// Run only with admission off, or only on; both by default.
    #[arg(long)]
    admission: Option<bool>,
    /// The server's runtime (the callers run on tokio).
    #[arg(long, value_enum, default_value_t = Which::Tokio)]
    runtime: Which,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Which {
    Tokio,
    Smol,
}

const METHOD: &str = "/overload.Test/Work";

#[derive(Default)]
struct Tally {
    ok: u64,
    refused: u64,
    refused_with_hint: u64,
    deadline: u64,
    other: u64,
    latency: Option<Histogram<u64>>,
}

fn spin(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// A server on its own pinned thread.
struct RunningServer {
    addr: std::net::SocketAddr,
    stop: futures::channel::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RunningServer {
    /// Stops the server and waits for its thread, so that the calls it still has queued
    /// take no CPU from the next run's server.
    fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("the server thread");
    }
}

/// Starts the server on its own pinned thread.
fn start_server(args: &Args, admission: bool) -> RunningServer {
    let service = Duration::from_micros(args.service_us);
    let backend = Duration::from_millis(args.backend_ms);
    let config = AdmissionConfig {
        max_in_flight: args.slots,
        max_queued: args.queued,
        max_queue_wait: Duration::from_millis(args.timeout_ms / 4),
        retry_after: Duration::from_millis(args.retry_after_ms),
    };
    let config = admission.then_some(config);
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = futures::channel::oneshot::channel();
    let which = args.runtime;
    let thread = std::thread::spawn(move || {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: 0 });
        match which {
            Which::Tokio => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    serve(Tokio::current(), config, service, backend, tx, stopped).await
                });
            }
            Which::Smol => {
                // Every task on this one pinned thread, as tokio's current-thread runtime.
                let executor = Arc::new(async_executor::Executor::new());
                let spawner = executor.clone();
                let smol = gorpc_smol::Smol::with_spawner(move |task| spawner.spawn(task).detach());
                smol::block_on(executor.run(serve(smol, config, service, backend, tx, stopped)));
            }
        }
    });
    RunningServer {
        addr: rx.recv().unwrap(),
        stop,
        thread,
    }
}

/// Serves the overload's method on `runtime`, sends its address, and aborts once `stopped`.
async fn serve<R: Runtime>(
    runtime: R,
    admission: Option<AdmissionConfig>,
    service: Duration,
    backend: Duration,
    tx: std::sync::mpsc::Sender<std::net::SocketAddr>,
    stopped: futures::channel::oneshot::Receiver<()>,
) {
    let timer = runtime.clone();
    let router = Router::new().msgpack(METHOD, move |n: u64| {
        let timer = timer.clone();
        async move {
            spin(service);
            timer.sleep_until(Instant::now() + backend).await;
            Ok(n)
        }
    });
    let mut server = Server::new(runtime, router);
    if let Some(config) = admission {
        server = server.admission(config);
    }
    let server = server.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    tx.send(server.local_addr()).unwrap();
    let _ = stopped.await;
    server.abort().await;
}

/// `callers` closed-loop callers for `secs` after a warm-up; what they saw.
async fn offer(
    addr: std::net::SocketAddr,
    callers: usize,
    timeout: Duration,
    secs: u64,
) -> (Tally, Duration) {
    let client = Client::builder(Tokio::current())
        .endpoint(addr)
        .timeout(timeout)
        .connect()
        .await
        .unwrap();
    let tally = Arc::new(Mutex::new(Tally {
        latency: Some(Histogram::new(3).unwrap()),
        ..Tally::default()
    }));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..callers {
        let (client, tally, counting, stop) = (
            client.clone(),
            tally.clone(),
            counting.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = i as u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = client.call::<u64, u64>(METHOD, &n).await;
                n += 1;
                let took = started.elapsed();
                let mut wait = None;
                if counting.load(Ordering::Relaxed) {
                    let mut t = tally.lock().unwrap();
                    match &result {
                        Ok(_) => {
                            t.ok += 1;
                            let _ = t.latency.as_mut().unwrap().record(took.as_micros() as u64);
                        }
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            t.refused += 1;
                            if s.retry_after().is_some() {
                                t.refused_with_hint += 1;
                            }
                        }
                        Err(s) if s.code() == Code::DeadlineExceeded => t.deadline += 1,
                        Err(_) => t.other += 1,
                    }
                }
                if let Err(s) = &result {
                    wait = s.retry_after();
                }
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    counting.store(true, Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    counting.store(false, Ordering::Relaxed);
    let window = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    (tally, window)
}

fn report(what: &str, tally: &Tally, window: Duration, capacity: f64) {
    let secs = window.as_secs_f64();
    let latency = tally.latency.as_ref().unwrap();
    let goodput = tally.ok as f64 / secs;
    println!(
        "{what}: goodput {:.0} calls/s ({:.0}% of capacity), OK p50 {:.1} ms p99 {:.1} ms; per second: refused {:.0} ({} of {} with a retry hint), past deadline {:.0}, other {}",
        goodput,
        100.0 * goodput / capacity,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        tally.refused as f64 / secs,
        tally.refused_with_hint,
        tally.refused,
        tally.deadline as f64 / secs,
        tally.other,
    );
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| {
            let _ = core_affinity::set_for_current(core_affinity::CoreId { id: 1 });
        })
        .build()
        .unwrap();
    let timeout = Duration::from_millis(args.timeout_ms);
    let runs: Vec<bool> = match args.admission {
        Some(on) => vec![on],
        None => vec![false, true],
    };
    // Capacity: as many callers as slots, no admission, no overload.
    let server = start_server(&args, false);
    let (cap, window) = rt.block_on(offer(
        server.addr,
        args.slots,
        Duration::from_secs(5),
        args.secs.min(5),
    ));
    server.stop();
    let capacity = cap.ok as f64 / window.as_secs_f64();
    println!(
        "capacity: {capacity:.0} calls/s with {} callers ({} us of CPU and {} ms of waiting per call, one server worker, {:?})",
        args.slots, args.service_us, args.backend_ms, args.runtime
    );
    for admission in runs {
        let server = start_server(&args, admission);
        let (tally, window) = rt.block_on(offer(server.addr, args.callers, timeout, args.secs));
        server.stop();
        let what = if admission {
            format!(
                "admission on ({} running, {} queued), {} callers",
                args.slots, args.queued, args.callers
            )
        } else {
            format!("admission off, {} callers", args.callers)
        };
        report(&what, &tally, window, capacity);
    }
}
