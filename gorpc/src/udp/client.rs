//! The UDP client: one socket per client, owned by a driver task with a
//! [`DatagramClient`]; callers reach it through a channel of commands and get their answer
//! through a oneshot.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use gorpc_proto::datagram::{DatagramClient, DatagramConfig};
use gorpc_proto::{CallHead, CallId, Code, Status};

use super::{recv_buf, RECV_BATCH};
use crate::client::{Channel, Client, OutgoingCall, RawResponse};
use crate::io::drive;
use crate::io::Timer;
use crate::metadata::Metadata;
use crate::runtime::{Runtime, UdpSocket};

/// Metadata key marking one call idempotent: sent again when unanswered, like a method in
/// [`UdpClientConfig::idempotent_methods`]. Its value is ignored and it is not sent.
pub const IDEMPOTENT: &str = "gorpc-idempotent";

/// Settings of a UDP client.
#[derive(Clone, Debug)]
pub struct UdpClientConfig {
    /// Datagram size limit and retransmit schedule.
    pub datagram: DatagramConfig,
    /// Deadline of calls that set none. There is always one: a lost datagram must end its
    /// call.
    pub default_timeout: Duration,
    /// Methods ("/package.Service/Method") safe to run more than once: their requests are
    /// sent again until answered.
    pub idempotent_methods: HashSet<Cow<'static, str>>,
    /// Local address to bind; `None`: any port on the unspecified address of the server's
    /// family.
    pub local_addr: Option<SocketAddr>,
}

impl Default for UdpClientConfig {
    fn default() -> Self {
        UdpClientConfig {
            datagram: DatagramConfig::default(),
            default_timeout: Duration::from_secs(30),
            idempotent_methods: HashSet::new(),
            local_addr: None,
        }
    }
}

impl UdpClientConfig {
    /// Marks `method` idempotent.
    pub fn idempotent(mut self, method: impl Into<Cow<'static, str>>) -> Self {
        self.idempotent_methods.insert(method.into());
        self
    }
}

impl Client {
    /// A client whose calls travel as datagrams to `server`, from a socket bound now (see
    /// [`crate::udp`]).
    pub async fn udp<R: Runtime>(
        runtime: R,
        server: SocketAddr,
        config: UdpClientConfig,
    ) -> Result<Client, Status> {
        let default_timeout = config.default_timeout;
        let channel = UdpChannel::bind(&runtime, server, config).await?;
        Ok(Client::from_channel(channel, Some(default_timeout)))
    }
}

/// Sends calls as datagrams to one server. Only datagrams from the server's address are
/// taken as answers, so give the address the server answers from (not a wildcard). Cloning
/// is cheap; the socket closes once every clone and every call in flight is gone.
#[derive(Clone, Debug)]
pub struct UdpChannel {
    commands: async_channel::Sender<Command>,
    next_ticket: Arc<AtomicU64>,
    local_addr: SocketAddr,
}

enum Command {
    Start {
        ticket: u64,
        call: OutgoingCall,
        reply: oneshot::Sender<Result<RawResponse, Status>>,
    },
    /// The caller stopped waiting.
    Forget { ticket: u64 },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Start { ticket, call, .. } => f
                .debug_struct("Start")
                .field("ticket", ticket)
                .field("method", &call.method)
                .finish(),
            Command::Forget { ticket } => f.debug_struct("Forget").field("ticket", ticket).finish(),
        }
    }
}

impl UdpChannel {
    /// Binds a socket and starts its driver on `runtime`.
    pub async fn bind<R: Runtime>(
        runtime: &R,
        server: SocketAddr,
        config: UdpClientConfig,
    ) -> Result<Self, Status> {
        let local = config.local_addr.unwrap_or(match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let unavailable = |e: std::io::Error| {
            Status::new(
                Code::Unavailable,
                format!("binding a UDP socket to {local} failed: {e}"),
            )
        };
        let socket = runtime.bind_udp(local).await.map_err(unavailable)?;
        let local_addr = socket.local_addr().map_err(unavailable)?;
        let (commands, commands_rx) = async_channel::unbounded();
        let driver = UdpClientDriver {
            timer: Timer::new(runtime),
            socket,
            server,
            core: DatagramClient::new(config.datagram, fastrand::u32(..)),
            tickets: HashMap::new(),
            commands: Box::pin(commands_rx),
            recv_buf: recv_buf(),
            unsent: VecDeque::new(),
            default_timeout: config.default_timeout,
            idempotent_methods: config.idempotent_methods,
        };
        runtime.spawn(driver);
        Ok(UdpChannel {
            commands,
            next_ticket: Arc::new(AtomicU64::new(0)),
            local_addr,
        })
    }

    /// The address the client's socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Channel for UdpChannel {
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .try_send(Command::Start {
                ticket,
                call,
                reply,
            })
            .is_err()
        {
            return futures::future::ready(Err(driver_stopped())).boxed();
        }
        Box::pin(PendingUdpCall {
            ticket,
            answer,
            commands: self.commands.clone(),
            done: false,
        })
    }
}

fn driver_stopped() -> Status {
    Status::new(Code::Unavailable, "the UDP client's driver has stopped")
}

/// A call waiting for its answer; dropping it makes the driver forget the call (no more
/// resends, a late answer is ignored).
struct PendingUdpCall {
    ticket: u64,
    answer: oneshot::Receiver<Result<RawResponse, Status>>,
    commands: async_channel::Sender<Command>,
    done: bool,
}

impl Future for PendingUdpCall {
    type Output = Result<RawResponse, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match Pin::new(&mut self.answer).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(result)) => result,
            Poll::Ready(Err(oneshot::Canceled)) => Err(driver_stopped()),
        };
        self.done = true;
        Poll::Ready(result)
    }
}

impl Drop for PendingUdpCall {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.commands.try_send(Command::Forget {
                ticket: self.ticket,
            });
        }
    }
}

/// A call's data inside the core: who to answer.
struct Caller {
    ticket: u64,
    reply: oneshot::Sender<Result<RawResponse, Status>>,
}

struct UdpClientDriver<R: Runtime> {
    socket: R::UdpSocket,
    server: SocketAddr,
    core: DatagramClient<Caller>,
    /// Call id of each caller's ticket, to forget a call whose caller left.
    tickets: HashMap<u64, CallId>,
    commands: Pin<Box<async_channel::Receiver<Command>>>,
    recv_buf: Box<[u8]>,
    /// Datagrams the socket has not taken yet; first sends carry their call, so a failed
    /// send fails that call.
    unsent: VecDeque<(Option<CallId>, Bytes)>,
    timer: Timer<R>,
    default_timeout: Duration,
    idempotent_methods: HashSet<Cow<'static, str>>,
}

impl<R: Runtime> UdpClientDriver<R> {
    /// One pass over every source of work. Returns whether anything happened, or `None`
    /// once every handle is gone.
    fn poll_once(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let now = Instant::now();
        let mut progress = false;
        loop {
            match self.commands.as_mut().poll_next(cx) {
                Poll::Ready(Some(Command::Start {
                    ticket,
                    call,
                    reply,
                })) => {
                    progress = true;
                    self.start(now, ticket, call, reply);
                }
                Poll::Ready(Some(Command::Forget { ticket })) => {
                    progress = true;
                    if let Some(id) = self.tickets.remove(&ticket) {
                        self.core.cancel(id);
                    }
                }
                // No client and no call left: nobody can receive an answer.
                Poll::Ready(None) => return None,
                Poll::Pending => break,
            }
        }

        progress |= self.poll_recv(cx, now);

        if self.timer.poll(cx, self.core.poll_timeout(), now) {
            self.core.handle_timeout(now);
            progress = true;
        }
        while let Some(event) = self.core.poll_event() {
            progress = true;
            self.tickets.remove(&event.user.ticket);
            let result = match event.result {
                Ok(response) if response.status.is_ok() => Ok(RawResponse {
                    codec: response.codec,
                    metadata: Metadata::from_wire(
                        response.head.metadata(),
                        response.head.as_bytes(),
                    ),
                    body: response.body,
                }),
                Ok(response) => Err(response.status),
                Err(status) => Err(status),
            };
            let _ = event.user.reply.send(result);
        }
        while let Some(resend) = self.core.poll_transmit() {
            self.unsent.push_back((None, resend));
        }
        progress |= self.poll_send(cx);
        Some(progress)
    }

    fn start(
        &mut self,
        now: Instant,
        ticket: u64,
        call: OutgoingCall,
        reply: oneshot::Sender<Result<RawResponse, Status>>,
    ) {
        if reply.is_canceled() {
            return;
        }
        let deadline = call
            .deadline
            .or_else(|| now.checked_add(self.default_timeout));
        let idempotent = (!self.idempotent_methods.is_empty()
            && self.idempotent_methods.contains(&*call.method))
            || call.metadata.get(IDEMPOTENT).is_some();
        let metadata = call.metadata.iter().filter(|(key, _)| *key != IDEMPOTENT);
        let head = CallHead::new(&call.method, call.codec).with_metadata(metadata);
        let head = match deadline {
            Some(deadline) => head.with_deadline(deadline),
            None => head,
        };
        let caller = Caller { ticket, reply };
        let started = if idempotent {
            self.core
                .start_idempotent_call(now, head, call.body.clone(), caller)
        } else {
            self.core.start_call(now, head, call.body.clone(), caller)
        };
        match started {
            Ok((id, datagram)) => {
                self.tickets.insert(ticket, id);
                self.unsent.push_back((Some(id), datagram));
            }
            Err(rejected) => {
                let _ = rejected.user.reply.send(Err(rejected.status));
            }
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut received = 0;
        while received < RECV_BATCH {
            match self.socket.poll_recv_from(cx, &mut self.recv_buf) {
                Poll::Pending => break,
                Poll::Ready(Ok((len, from))) => {
                    if from == self.server {
                        self.core.handle_datagram(now, &self.recv_buf[..len]);
                    } else {
                        tracing::debug!(%from, len, "ignored a datagram not from the server");
                    }
                }
                Poll::Ready(Err(e)) => {
                    // An ICMP error about an earlier send, on systems that report them.
                    tracing::debug!(server = %self.server, error = %e, "UDP receive failed");
                }
            }
            received += 1;
        }
        received > 0
    }

    /// Sends queued datagrams until the socket is full. A first send that fails fails its
    /// call; a failed resend is left to the next one or the deadline.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while let Some((call, datagram)) = self.unsent.front() {
            let result = match self.socket.poll_send_to(cx, datagram, self.server) {
                Poll::Pending => break,
                Poll::Ready(result) => result,
            };
            let call = *call;
            self.unsent.pop_front();
            progress = true;
            let Err(e) = result else { continue };
            tracing::debug!(server = %self.server, error = %e, "UDP send failed");
            if let Some(caller) = call.and_then(|id| self.core.cancel(id)) {
                self.tickets.remove(&caller.ticket);
                let status = Status::new(
                    Code::Unavailable,
                    format!("sending to {} failed: {e}", self.server),
                );
                let _ = caller.reply.send(Err(status));
            }
        }
        progress
    }
}

impl<R: Runtime> Future for UdpClientDriver<R> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut stopped = false;
        drive(cx, |cx| match this.poll_once(cx) {
            Some(progress) => progress,
            None => {
                stopped = true;
                false
            }
        });
        if stopped {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
