//! Connection pools: where a client gets a connection for its next call.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use gorpc_proto::{Code, Status};

use super::conn::{Connection, ConnectionConfig};
use crate::runtime::{timeout, Runtime};

/// The answer to "which connection for this call?".
pub enum Checkout<'a> {
    /// Use this one now.
    Ready(Connection),
    /// Wait for one (e.g. while connecting).
    Wait(BoxFuture<'a, Result<Connection, Status>>),
    /// None can be had now; fail the call with this status.
    Failed(Status),
}

impl std::fmt::Debug for Checkout<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checkout::Ready(c) => f.debug_tuple("Ready").field(c).finish(),
            Checkout::Wait(_) => f.write_str("Wait"),
            Checkout::Failed(s) => f.debug_tuple("Failed").field(s).finish(),
        }
    }
}

/// A source of connections. [`EndpointPool`] is the default; implement this to choose
/// connections your own way. A pool must never hand out a connection it knows is closed.
pub trait Pool: Send + Sync + 'static {
    /// A connection for a call that must have its answer by `deadline`: a
    /// [`Checkout::Wait`] should end by then (with `DeadlineExceeded`) rather than outlive
    /// the call while a connect hangs.
    fn checkout(&self, deadline: Option<Instant>) -> Checkout<'_>;
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Connections kept to the endpoint; calls spread over them round robin.
    pub size: usize,
    /// Settings of each connection.
    pub connection: ConnectionConfig,
    /// First wait after a failed connect; doubles per failure, with ±20% jitter.
    pub backoff_min: Duration,
    /// The longest wait between connects, however many failed (default 10 s).
    pub backoff_max: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 1,
            connection: ConnectionConfig::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

type Connecting = Shared<BoxFuture<'static, Result<Connection, Status>>>;

enum SlotState {
    Idle,
    Connecting(Connecting),
    /// The last connect failed; calls fail fast until `until`.
    Backoff {
        until: Instant,
        error: Status,
    },
}

struct Slot {
    conn: ArcSwapOption<Connection>,
    state: Mutex<SlotState>,
    failures: AtomicUsize,
}

struct Inner<R: Runtime> {
    runtime: R,
    addr: SocketAddr,
    config: PoolConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

/// Connections to one endpoint: lazily connected, replaced when they fail or drain,
/// reconnected with exponential backoff.
pub struct EndpointPool<R: Runtime> {
    inner: Arc<Inner<R>>,
}

impl<R: Runtime> Clone for EndpointPool<R> {
    fn clone(&self) -> Self {
        EndpointPool {
            inner: self.inner.clone(),
        }
    }
}

impl<R: Runtime> std::fmt::Debug for EndpointPool<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("addr", &self.inner.addr)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl<R: Runtime> EndpointPool<R> {
    /// A pool that connects on first use.
    pub fn new(runtime: R, addr: SocketAddr, config: PoolConfig) -> Self {
        let slots = (0..config.size.max(1))
            .map(|_| Slot {
                conn: ArcSwapOption::empty(),
                state: Mutex::new(SlotState::Idle),
                failures: AtomicUsize::new(0),
            })
            .collect();
        EndpointPool {
            inner: Arc::new(Inner {
                runtime,
                addr,
                config,
                slots,
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Connects one connection now, so that a bad address fails here rather than at the
    /// first call.
    pub async fn warm_up(&self) -> Result<(), Status> {
        match self.checkout(None) {
            Checkout::Ready(_) => Ok(()),
            Checkout::Wait(f) => f.await.map(drop),
            Checkout::Failed(s) => Err(s),
        }
    }

    /// Connections open and usable now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|s| s.conn.load().as_ref().is_some_and(|c| c.is_usable()))
            .count()
    }
}

impl<R: Runtime> Pool for EndpointPool<R> {
    fn checkout(&self, deadline: Option<Instant>) -> Checkout<'_> {
        let inner = &self.inner;
        let n = inner.slots.len();
        let first = if n == 1 {
            0
        } else {
            inner.next.fetch_add(1, Ordering::Relaxed) % n
        };
        for i in 0..n {
            let slot = &inner.slots[(first + i) % n];
            if let Some(conn) = &*slot.conn.load() {
                if conn.is_usable() {
                    return Checkout::Ready(Connection::clone(conn));
                }
            }
        }
        match (Inner::reconnect(inner, first), deadline) {
            (Checkout::Wait(connecting), Some(deadline)) => {
                let (runtime, addr) = (inner.runtime.clone(), inner.addr);
                Checkout::Wait(Box::pin(async move {
                    timeout(&runtime, deadline, connecting)
                        .await
                        .unwrap_or_else(|| {
                            Err(Status::new(
                                Code::DeadlineExceeded,
                                format!("deadline passed while connecting to {addr}"),
                            ))
                        })
                }))
            }
            (checkout, _) => checkout,
        }
    }
}

impl<R: Runtime> Inner<R> {
    fn reconnect(this: &Arc<Self>, index: usize) -> Checkout<'static> {
        let slot = &this.slots[index];
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        // Someone may have reconnected while we waited for the lock.
        if let Some(conn) = &*slot.conn.load() {
            if conn.is_usable() {
                return Checkout::Ready(Connection::clone(conn));
            }
        }
        match &*state {
            SlotState::Backoff { until, error } if Instant::now() < *until => {
                return Checkout::Failed(error.clone())
            }
            SlotState::Connecting(connecting) => return Checkout::Wait(connecting.clone().boxed()),
            _ => {}
        }
        let connecting = Self::connect(this.clone(), index).boxed().shared();
        *state = SlotState::Connecting(connecting.clone());
        Checkout::Wait(connecting.boxed())
    }

    async fn connect(this: Arc<Self>, index: usize) -> Result<Connection, Status> {
        let result =
            Connection::connect(&this.runtime, this.addr, this.config.connection.clone()).await;
        let slot = &this.slots[index];
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(conn) => {
                slot.failures.store(0, Ordering::Relaxed);
                if let Some(old) = slot.conn.swap(Some(Arc::new(conn.clone()))) {
                    old.close();
                }
                *state = SlotState::Idle;
            }
            Err(error) => {
                let failures = slot.failures.fetch_add(1, Ordering::Relaxed) as u32;
                let wait = backoff(this.config.backoff_min, this.config.backoff_max, failures);
                let message = format!(
                    "{} (next attempt in {} ms)",
                    error.message(),
                    wait.as_millis()
                );
                // Connects fail with `Unavailable`; the cause (an io::Error) stays under it.
                let error = error.clone().with_message(message);
                *state = SlotState::Backoff {
                    until: Instant::now() + wait,
                    error,
                };
            }
        }
        result
    }
}

/// `min · 2^failures`, capped at `max`, ±20% jitter so reconnecting clients spread out.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let base = min.saturating_mul(1u32 << failures.min(16)).min(max);
    base.mul_f64(0.8 + 0.4 * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let first = backoff(min, max, 0);
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let fourth = backoff(min, max, 3);
        assert!(fourth >= Duration::from_millis(640) && fourth <= Duration::from_millis(960));
        assert!(backoff(min, max, 40) <= Duration::from_secs(12));
    }
}
