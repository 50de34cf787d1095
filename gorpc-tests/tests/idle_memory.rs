//! What idle connections cost the server, counted by a global allocator that tracks live
//! heap bytes: each connection has made one call and holds its buffers, then sits idle.
//! An idle binary connection costs at most [`IDLE_BUDGET`] bytes of heap, and once every
//! connection closes, the heap returns to its baseline.
//!
//! Its own test binary, since the allocator is process-wide. The clients are plain blocking
//! sockets framed by the sans-IO client core, so nearly all the heap counted is the
//! server's (and the test runtime's). The tests run one after the other (a lock), so neither sees the other's
//! connections.

use std::alloc::System;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gorpc::{Router, Runtime, Server, ServerReply, ServerRequest};
use gorpc_tests::blocking::called_once;
use gorpc_tests::counting::{live, Counting};
use gorpc_tests::{loopback, Smol, Tokio};

#[global_allocator]
static GLOBAL: Counting<System> = Counting(System);

/// Heap an idle binary connection may hold on the server, in bytes.
const IDLE_BUDGET: isize = 4096;
/// Heap a connection may hold on the server right after its one call, whether or not it
/// has released its tables yet: its read buffer (32 KiB) is already lent back to the
/// thread, since nothing is buffered and no call is in flight.
const JUST_CALLED_BUDGET: isize = 2 * IDLE_BUDGET;
/// How many idle connections are measured (two sockets each, well under the open-file
/// limit of a default shell).
const CONNECTIONS: usize = 400;
/// What the heap may still differ from its baseline once everything closed (the busy peak
/// was about 15 MB): the runtimes' own tables keep the room the peak grew them to
/// (async-executor's task slab, tokio's scheduler queues), and tokio frees released I/O
/// registrations in batches.
const SETTLED_SLACK: isize = 128 * 1024;
const WAIT: Duration = Duration::from_secs(20);
const ECHO: &str = "/idle.Memory/Echo";

/// Waits until the live heap is within `slack` of `target`, or fails after [`WAIT`];
/// returns what it settled at.
fn settles_near(target: isize, slack: isize, what: &str) -> isize {
    let began = Instant::now();
    loop {
        let now = live();
        if (now - target).abs() <= slack {
            return now;
        }
        assert!(
            began.elapsed() < WAIT,
            "{what}: live heap {now} B, not within {slack} B of {target} B"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Opens [`CONNECTIONS`] connections that each call once, then go idle; checks the heap
/// they hold and that it comes back once they close.
async fn idle_connections_cost_little_and_give_it_back<R: Runtime>(runtime: R) {
    let router = Router::new().route(ECHO, |req: ServerRequest| async move {
        ServerReply::ok(req.body)
    });
    let server = Server::new(runtime, router).bind(loopback()).await.unwrap();
    let addr = server.local_addr();
    // One connection first, so what is made once (the tables, the runtime's first pages)
    // is in the baseline.
    let warm = blocking(move || called_once(addr, ECHO, WAIT)).await;
    let baseline = live();

    let held = blocking(move || {
        (0..CONNECTIONS)
            .map(|_| called_once(addr, ECHO, WAIT))
            .collect::<Vec<_>>()
    })
    .await;
    let just_called = (live() - baseline) / CONNECTIONS as isize;
    eprintln!("{CONNECTIONS} connections right after their call: {just_called} B of heap each");
    assert!(
        just_called <= JUST_CALLED_BUDGET,
        "a connection that just made its call holds {just_called} B of heap \
         (budget {JUST_CALLED_BUDGET} B)"
    );
    // A connection releases its other buffers once quiet (50 ms after one call, up to a
    // second after a busy spell): wait for the heap to come
    // down within the budget (a failure is a heap that never does).
    let idle = blocking(move || {
        settles_near(
            baseline,
            IDLE_BUDGET * CONNECTIONS as isize,
            "while the connections idle",
        )
    })
    .await;
    let per_connection = (idle - baseline) / CONNECTIONS as isize;
    eprintln!(
        "{CONNECTIONS} idle connections: {per_connection} B of heap each (baseline {baseline} B)"
    );
    assert!(
        per_connection <= IDLE_BUDGET,
        "an idle connection holds {per_connection} B of heap (budget {IDLE_BUDGET} B)"
    );

    drop(held);
    drop(warm);
    let after =
        blocking(move || settles_near(baseline, SETTLED_SLACK, "after the connections closed"))
            .await;
    eprintln!(
        "after they closed: {} B over the baseline",
        after - baseline
    );
    server.abort().await;
}

/// Runs blocking socket work off the runtime's threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = async_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send_blocking(work());
    });
    rx.recv().await.expect("the blocking work finished")
}

#[test]
fn on_tokio() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = gorpc_tests::tokio_runtime();
    let tokio = Tokio::from_handle(rt.handle().clone());
    rt.block_on(idle_connections_cost_little_and_give_it_back(tokio));
}

#[test]
fn on_smol() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    smol::block_on(idle_connections_cost_little_and_give_it_back(Smol::new()));
}
