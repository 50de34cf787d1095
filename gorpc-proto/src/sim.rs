//! A client and a server connection wired back to back under a simulated clock, and a model
//! checker that drives them with arbitrary operations.
//!
//! Used by the crate's tests, property tests and fuzz targets, and by anyone embedding the
//! core who wants to exercise it without sockets. Time only moves when told to.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use crate::flow::{effective_window, INITIAL_CONNECTION_WINDOW, INITIAL_STREAM_WINDOW};
use crate::{
    codec, CallHead, CallId, ClientConn, ClientEvent, CloseReason, Code, Conn, ConnConfig,
    ProtoError, SendError, ServerConn, ServerEvent, Status, StreamKind,
};

/// Which end of a [`Pair`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The [`ClientConn`].
    Client,
    /// The [`ServerConn`].
    Server,
}

/// A client and a server connected by two in-memory byte pipes.
#[derive(Debug)]
pub struct Pair<T = u64> {
    /// The client end; `T` is its per-call user data.
    pub client: ClientConn<T>,
    /// The server end.
    pub server: ServerConn,
    /// The simulated clock: moves only through [`Pair::advance`] (or when set).
    pub now: Instant,
    /// Deliver at most this many bytes per `handle_read` call, to split frames everywhere.
    pub chunk: usize,
    /// Bytes on the wire toward the server, not yet read.
    pub to_server: BytesMut,
    /// Bytes on the wire toward the client, not yet read.
    pub to_client: BytesMut,
    server_rx: BytesMut,
    client_rx: BytesMut,
}

/// Feeds `buf` to `conn` and reports the protocol error that closed it doing so, if any:
/// what a test wants to see beside the `Closed` event.
pub fn read(conn: &mut impl Conn, now: Instant, buf: &mut BytesMut) -> Result<(), ProtoError> {
    let was_closed = conn.is_closed();
    conn.handle_read(now, buf);
    match conn.close_reason() {
        Some(CloseReason::Error(e)) if !was_closed => Err(e.clone()),
        _ => Ok(()),
    }
}

impl<T> Pair<T> {
    /// A fresh client and server at `now`, with nothing on the wire and no chunking.
    pub fn new(now: Instant, client: ConnConfig, server: ConnConfig) -> Self {
        Pair {
            client: ClientConn::new(client, now),
            server: ServerConn::new(server, now, 0x5eed),
            now,
            chunk: usize::MAX,
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            server_rx: BytesMut::new(),
            client_rx: BytesMut::new(),
        }
    }

    /// Moves queued output of both sides onto the wire.
    pub fn flush(&mut self) {
        while let Some(b) = self.client.poll_transmit() {
            self.to_server.extend_from_slice(&b);
        }
        while let Some(b) = self.server.poll_transmit() {
            self.to_client.extend_from_slice(&b);
        }
    }

    /// Delivers at most `max` bytes from the wire to each side (the server reads only while
    /// it wants to). Returns the first protocol error either side reported.
    pub fn deliver(&mut self, max: usize) -> Result<usize, (Side, ProtoError)> {
        self.flush();
        let mut moved = 0;
        let mut error = None;
        if self.server.wants_read() && !self.to_server.is_empty() {
            let n = self.to_server.len().min(max).min(self.chunk);
            self.server_rx
                .extend_from_slice(&self.to_server.split_to(n));
            moved += n;
        }
        // Also re-offer buffered bytes: a slot may have freed up since the last read.
        if let Err(e) = read(&mut self.server, self.now, &mut self.server_rx) {
            error.get_or_insert((Side::Server, e));
        }
        if !self.to_client.is_empty() {
            let n = self.to_client.len().min(max).min(self.chunk);
            self.client_rx
                .extend_from_slice(&self.to_client.split_to(n));
            moved += n;
        }
        if let Err(e) = read(&mut self.client, self.now, &mut self.client_rx) {
            error.get_or_insert((Side::Client, e));
        }
        self.flush();
        match error {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }

    /// Delivers until nothing moves.
    pub fn pump(&mut self) -> Result<(), (Side, ProtoError)> {
        while self.deliver(usize::MAX)? > 0 {}
        Ok(())
    }

    /// Moves the clock forward and lets both sides handle their timers.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        self.flush();
    }

    /// Drains the client's pending events.
    pub fn client_events(&mut self) -> Vec<ClientEvent<T>> {
        std::iter::from_fn(|| self.client.poll_event()).collect()
    }

    /// Drains the server's pending events.
    pub fn server_events(&mut self) -> Vec<ServerEvent> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }
}

/// One step of a model run. Built from raw bytes by [`ops_from_bytes`], so fuzzers and
/// property tests share one decoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Client starts a call carrying `body_len` bytes, with a timeout if given.
    Start {
        /// Request body size, bytes.
        body_len: u16,
        /// Timeout in milliseconds; `None`: no deadline.
        timeout_ms: Option<u16>,
        /// Whether the head carries a metadata entry.
        metadata: bool,
    },
    /// Server answers the `pick`-th running call (echoing a unary call's body), or fails it.
    Respond {
        /// Which running call, modulo their number.
        pick: u16,
        /// Fail it with `Internal` instead of answering.
        fail: bool,
    },
    /// Client cancels the `pick`-th live call.
    Cancel {
        /// Which live call, modulo their number.
        pick: u16,
    },
    /// The clock moves forward.
    Advance {
        /// How far, milliseconds.
        ms: u16,
    },
    /// At most `bytes` bytes move each way.
    Deliver {
        /// The most bytes delivered to each side.
        bytes: u16,
    },
    /// Everything on the wire moves.
    Pump,
    /// The client starts draining.
    ClientGoAway,
    /// The server starts draining.
    ServerGoAway,
    /// One byte on the wire toward the server is overwritten.
    Corrupt {
        /// Position in the unread bytes, modulo their number.
        offset: u16,
        /// The byte written there.
        value: u8,
    },
    /// Client starts a stream call of this kind, with a timeout if given.
    StartStream {
        /// Which side streams.
        kind: StreamKind,
        /// Timeout in milliseconds; `None`: no deadline.
        timeout_ms: Option<u16>,
    },
    /// Client sends a message of `len` filler bytes on the `pick`-th call whose request
    /// stream is open; with `end`, its last. With `batch` above 1, that many messages go
    /// through `send_batch` instead (so does any message while earlier batched ones wait
    /// for credit).
    ClientSend {
        /// Which call with an open request stream, modulo their number.
        pick: u16,
        /// Message size, bytes.
        len: u16,
        /// Whether this is the last message of the request stream.
        end: bool,
        /// How many messages; above 1 they go through `send_batch`.
        batch: u8,
    },
    /// Client half-closes the `pick`-th call whose request stream is open.
    CloseSend {
        /// Which call with an open request stream, modulo their number.
        pick: u16,
    },
    /// Server sends a message of `len` filler bytes on the `pick`-th running call whose
    /// method streams responses; `batch` as for [`Op::ClientSend`].
    ServerSend {
        /// Which running call that streams responses, modulo their number.
        pick: u16,
        /// Message size, bytes.
        len: u16,
        /// How many messages; above 1 they go through `send_batch`.
        batch: u8,
    },
    /// The client (or server) releases up to `bytes` received bytes of its `pick`-th call.
    Release {
        /// The client releases; otherwise the server.
        client: bool,
        /// Which call of that side, modulo their number.
        pick: u16,
        /// The most bytes released.
        bytes: u16,
    },
}

/// Messages in a send op: one, or a batch of 2 to 4, from an argument byte's high bits.
fn batch_of(arg: u8) -> u8 {
    match (arg >> 4) & 3 {
        0 => 1,
        k => k + 1,
    }
}

/// Decodes a byte string into operations: each op takes a tag byte and its arguments.
pub fn ops_from_bytes(mut data: &[u8]) -> Vec<Op> {
    fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        let n = data.len().min(N);
        out[..n].copy_from_slice(&data[..n]);
        *data = &data[n..];
        out
    }
    let mut ops = Vec::new();
    while let Some((&tag, rest)) = data.split_first() {
        data = rest;
        let op = match tag % 24 {
            0..=3 => {
                let [a, b, c, d] = take::<4>(&mut data);
                Op::Start {
                    body_len: u16::from_le_bytes([a, b & 0x0f]),
                    timeout_ms: (c & 1 == 1).then_some(d as u16 * 4),
                    metadata: c & 2 == 2,
                }
            }
            4..=6 => {
                let [a, b] = take::<2>(&mut data);
                Op::Respond {
                    pick: a as u16,
                    fail: b & 7 == 0,
                }
            }
            7 => Op::Cancel {
                pick: take::<1>(&mut data)[0] as u16,
            },
            8 => Op::Advance {
                ms: u16::from_le_bytes(take::<2>(&mut data)),
            },
            9 | 10 => Op::Deliver {
                bytes: u16::from_le_bytes(take::<2>(&mut data)),
            },
            11 | 12 => Op::Pump,
            13 => Op::ClientGoAway,
            14 => Op::ServerGoAway,
            15 => {
                let [a, b, c] = take::<3>(&mut data);
                Op::Corrupt {
                    offset: u16::from_le_bytes([a, b]),
                    value: c,
                }
            }
            16 | 17 => {
                let [a, b] = take::<2>(&mut data);
                Op::StartStream {
                    kind: match a % 3 {
                        0 => StreamKind::ServerStreaming,
                        1 => StreamKind::ClientStreaming,
                        _ => StreamKind::Bidirectional,
                    },
                    timeout_ms: (a & 0x80 != 0).then_some(b as u16 * 4),
                }
            }
            18 | 19 => {
                let [a, b, c] = take::<3>(&mut data);
                let end = c & 0xf0 == 0xf0;
                Op::ClientSend {
                    pick: a as u16,
                    len: u16::from_le_bytes([b, c & 0x0f]),
                    end,
                    batch: if end { 1 } else { batch_of(c) },
                }
            }
            20 => Op::CloseSend {
                pick: take::<1>(&mut data)[0] as u16,
            },
            21 | 22 => {
                let [a, b, c] = take::<3>(&mut data);
                Op::ServerSend {
                    pick: a as u16,
                    len: u16::from_le_bytes([b, c & 0x0f]),
                    batch: batch_of(c),
                }
            }
            _ => {
                let [a, b, c] = take::<3>(&mut data);
                Op::Release {
                    client: a & 1 == 0,
                    pick: (a >> 1) as u16,
                    bytes: u16::from_le_bytes([b, c]),
                }
            }
        };
        ops.push(op);
    }
    ops
}

/// What a model run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Calls the client accepted, unary and stream.
    pub started: usize,
    /// Calls that finished with an OK status.
    pub ok: usize,
    /// Calls that finished with an error status or a local failure.
    pub failed: usize,
    /// Calls the client cancelled.
    pub cancelled: usize,
    /// Calls the client refused to start.
    pub rejected: usize,
    /// Deliveries during which either side reported a protocol error.
    pub protocol_errors: usize,
    /// Stream calls among `started`.
    pub streams: usize,
    /// Stream messages delivered, both ways.
    pub messages: usize,
    /// Sends refused for lack of credit, both ways.
    pub no_credit: usize,
    /// `Writable` events, both ways.
    pub writable: usize,
    /// Half-closes the server saw.
    pub half_closed: usize,
}

/// Bytes a model message carries besides its filler: the call id and a sequence number.
const MESSAGE_PREFIX: usize = 12;

/// A model message: the call id, its sequence number on that call and direction, filler.
fn model_message(id: CallId, seq: u64, len: u16) -> Bytes {
    let mut body = BytesMut::with_capacity(MESSAGE_PREFIX + len as usize);
    body.put_u32(id.as_u32());
    body.put_u64(seq);
    body.put_bytes(seq as u8, len as usize);
    body.freeze()
}

/// Queues `n` model messages of `len` filler bytes behind the batched ones waiting in
/// `pending`, then sends what `send_batch` takes; `sent` counts what went.
fn send_batched(
    pending: &mut BytesMut,
    id: CallId,
    sent: &mut u64,
    n: u8,
    len: u16,
    send_batch: impl FnOnce(&mut BytesMut) -> Result<(), SendError>,
) -> Result<(), SendError> {
    let waiting = |pending: &BytesMut| {
        if pending.is_empty() {
            0
        } else {
            crate::batch::count(pending).expect("the model batches whole messages") as u64
        }
    };
    let before = waiting(pending);
    for k in 0..n as u64 {
        let body = model_message(id, *sent + before + k, len);
        let pushed = crate::batch::push_message(pending, |buf| {
            buf.extend_from_slice(&body);
            Ok::<(), ()>(())
        });
        pushed.expect("a model message fits a batch");
    }
    let result = send_batch(pending);
    *sent += before + n as u64 - waiting(pending);
    result
}

/// Whether `body` is message number `seq` of call `id`.
fn is_model_message(body: &[u8], id: CallId, seq: u64) -> bool {
    body.len() >= MESSAGE_PREFIX
        && body[..4] == id.as_u32().to_be_bytes()
        && body[4..12] == seq.to_be_bytes()
        && body[12..].iter().all(|&b| b == seq as u8)
}

const STREAM_METHODS: [(&str, StreamKind); 3] = [
    ("/sim.Stream/Server", StreamKind::ServerStreaming),
    ("/sim.Stream/Client", StreamKind::ClientStreaming),
    ("/sim.Stream/Bidi", StreamKind::Bidirectional),
];

struct LiveCall {
    id: CallId,
    body: Bytes,
    deadline: Option<Instant>,
    kind: Option<StreamKind>,
    /// The request stream is open.
    sending: bool,
    /// Messages sent, and received (the next expected sequence number).
    sent: u64,
    received: u64,
    wants_writable: bool,
    /// Batched messages waiting for credit, after the `sent` ones.
    pending: BytesMut,
}

/// A call as the server's handler sees it.
struct Running {
    id: CallId,
    body: Bytes,
    kind: Option<StreamKind>,
    received: u64,
    half_closed: bool,
    sent: u64,
    wants_writable: bool,
    /// Batched messages waiting for credit, after the `sent` ones.
    pending: BytesMut,
}

/// Runs `ops` against a fresh [`Pair`], then settles (releases and answers everything,
/// lets every deadline pass) and checks the invariants users rely on:
///
/// - every started call finishes exactly once, unless the client cancelled it, in which
///   case it never finishes;
/// - a response reaches the call it answers: the echoed body matches what that call sent
///   (unless bytes were corrupted on the wire);
/// - a call fails with `DeadlineExceeded` only once its deadline has passed;
/// - the server never runs two calls with one id, and cancels only calls it is running;
/// - stream messages arrive only for calls in flight that stream in that direction, in
///   order, each once, none missing; a half-close arrives once, after the last message;
/// - the bytes either side holds unreleased stay within one window plus one message, per
///   call and per connection;
/// - a send refused for lack of credit is followed by `Writable` once the peer released
///   everything (no stall).
///
/// Returns a description of the first broken invariant.
pub fn run_ops(ops: &[Op], config: ConnConfig) -> Result<Outcome, String> {
    let mut model = Model::new(config);
    for op in ops {
        model.apply(op)?;
    }
    model.settle()?;
    Ok(model.outcome)
}

struct Model {
    pair: Pair<u64>,
    next_tag: u64,
    live: HashMap<u64, LiveCall>,
    live_order: Vec<u64>,
    /// Client call ids back to their tags.
    tags: HashMap<CallId, u64>,
    done: HashSet<u64>,
    running: Vec<Running>,
    corrupted: bool,
    outcome: Outcome,
    /// Most unreleased bytes allowed per call and per connection.
    stream_bound: usize,
    connection_bound: usize,
}

impl Model {
    fn new(config: ConnConfig) -> Self {
        // One window plus the largest message the model sends (12-bit filler).
        let largest = MESSAGE_PREFIX + 0x0fff;
        Model {
            pair: Pair::new(Instant::now(), config, config),
            next_tag: 1,
            live: HashMap::new(),
            live_order: Vec::new(),
            tags: HashMap::new(),
            done: HashSet::new(),
            running: Vec::new(),
            corrupted: false,
            outcome: Outcome::default(),
            stream_bound: effective_window(config.stream_window, INITIAL_STREAM_WINDOW) as usize
                + largest,
            connection_bound: effective_window(config.connection_window, INITIAL_CONNECTION_WINDOW)
                as usize
                + largest,
        }
    }

    fn pick_live(&mut self, pick: u16, filter: impl Fn(&LiveCall) -> bool) -> Option<u64> {
        self.live_order.retain(|t| self.live.contains_key(t));
        let candidates: Vec<u64> = self
            .live_order
            .iter()
            .copied()
            .filter(|t| filter(&self.live[t]))
            .collect();
        (!candidates.is_empty()).then(|| candidates[pick as usize % candidates.len()])
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let now = self.pair.now;
        match *op {
            Op::Start {
                body_len,
                timeout_ms,
                metadata,
            } => {
                let tag = self.next_tag;
                self.next_tag += 1;
                let mut body = BytesMut::with_capacity(body_len as usize + 8);
                body.put_u64(tag);
                body.put_bytes(tag as u8, body_len as usize);
                let body = body.freeze();
                let deadline = timeout_ms.map(|ms| now + Duration::from_millis(ms as u64));
                let meta: &[(&str, &[u8])] = if metadata {
                    &[("k", b"v"), ("trace", b"0123")]
                } else {
                    &[]
                };
                let head = CallHead {
                    method: "/sim.Echo/Call",
                    codec: codec::RAW,
                    deadline,
                    metadata: meta.iter().copied(),
                };
                let started = self.pair.client.start_call(now, head, body.clone(), tag);
                self.started(tag, started, body, deadline, None)?;
            }
            Op::StartStream { kind, timeout_ms } => {
                let tag = self.next_tag;
                self.next_tag += 1;
                let deadline = timeout_ms.map(|ms| now + Duration::from_millis(ms as u64));
                let method = STREAM_METHODS
                    .iter()
                    .find(|(_, k)| *k == kind)
                    .map_or("", |(m, _)| m);
                let mut head = CallHead::new(method, codec::RAW);
                head.deadline = deadline;
                let request = if kind.client_streams() {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(&tag.to_be_bytes())
                };
                let started = self
                    .pair
                    .client
                    .start_stream(now, head, kind, request.clone(), tag);
                self.started(tag, started, request, deadline, Some(kind))?;
            }
            Op::Respond { pick, fail } => {
                if !self.running.is_empty() {
                    let call = self.running.swap_remove(pick as usize % self.running.len());
                    self.respond(call, fail);
                }
            }
            Op::Cancel { pick } => {
                if let Some(tag) = self.pick_live(pick, |_| true) {
                    let id = self.live[&tag].id;
                    match self.pair.client.cancel(id) {
                        Some(user) if user == tag => {
                            self.live.remove(&tag);
                            self.done.insert(tag);
                            self.outcome.cancelled += 1;
                        }
                        Some(_) => return Err("cancel returned another call's user data".into()),
                        None => return Err(format!("live call {tag} could not be cancelled")),
                    }
                }
            }
            Op::ClientSend {
                pick,
                len,
                end,
                batch,
            } => {
                if let Some(tag) = self.pick_live(pick, |c| c.sending) {
                    let call = self.live.get_mut(&tag).expect("picked a live call");
                    let client = &mut self.pair.client;
                    let sent = if batch > 1 || !call.pending.is_empty() {
                        let id = call.id;
                        send_batched(&mut call.pending, id, &mut call.sent, batch, len, |m| {
                            client.send_batch(id, m)
                        })
                    } else {
                        let body = model_message(call.id, call.sent, len);
                        client.send_message(call.id, body, end).map(|()| {
                            call.sent += 1;
                            call.sending = !end;
                        })
                    };
                    match sent {
                        Ok(()) => {}
                        Err(SendError::NoCredit) => {
                            call.wants_writable = true;
                            self.outcome.no_credit += 1;
                        }
                        Err(e) => return Err(format!("call {tag} refused a message: {e}")),
                    }
                }
            }
            Op::CloseSend { pick } => {
                // Not while batched messages wait: they would never go.
                if let Some(tag) = self.pick_live(pick, |c| c.sending && c.pending.is_empty()) {
                    let call = self.live.get_mut(&tag).expect("picked a live call");
                    if let Err(e) = self.pair.client.close_send(call.id) {
                        return Err(format!("call {tag} refused to half-close: {e}"));
                    }
                    call.sending = false;
                }
            }
            Op::ServerSend { pick, len, batch } => {
                let streaming: Vec<usize> = (0..self.running.len())
                    .filter(|&i| self.running[i].kind.is_some_and(StreamKind::server_streams))
                    .collect();
                if !streaming.is_empty() {
                    let call = &mut self.running[streaming[pick as usize % streaming.len()]];
                    let server = &mut self.pair.server;
                    let id = call.id;
                    let sent = if batch > 1 || !call.pending.is_empty() {
                        send_batched(&mut call.pending, id, &mut call.sent, batch, len, |m| {
                            server.send_batch(id, m)
                        })
                    } else {
                        let body = model_message(id, call.sent, len);
                        server.send_message(id, body).map(|()| call.sent += 1)
                    };
                    match sent {
                        Ok(()) => {}
                        Err(SendError::NoCredit) => {
                            call.wants_writable = true;
                            self.outcome.no_credit += 1;
                        }
                        Err(e) => return Err(format!("running {id:?} refused a message: {e}")),
                    }
                }
            }
            Op::Release {
                client: true,
                pick,
                bytes,
            } => {
                if let Some(tag) = self.pick_live(pick, |c| c.kind.is_some()) {
                    let id = self.live[&tag].id;
                    self.pair.client.release(id, bytes as usize);
                }
            }
            Op::Release {
                client: false,
                pick,
                bytes,
            } => {
                if !self.running.is_empty() {
                    let id = self.running[pick as usize % self.running.len()].id;
                    self.pair.server.release(id, bytes as usize);
                }
            }
            Op::Advance { ms } => self.pair.advance(Duration::from_millis(ms as u64)),
            Op::Deliver { bytes } => {
                let r = self.pair.deliver(bytes as usize);
                self.note(r.map(|_| ()));
            }
            Op::Pump => {
                let r = self.pair.pump();
                self.note(r);
            }
            Op::ClientGoAway => self.pair.client.go_away(),
            Op::ServerGoAway => self.pair.server.go_away(),
            Op::Corrupt { offset, value } => {
                self.pair.flush();
                let wire = &mut self.pair.to_server;
                if !wire.is_empty() {
                    let i = offset as usize % wire.len();
                    if wire[i] != value {
                        wire[i] = value;
                        self.corrupted = true;
                    }
                }
            }
        }
        self.check_events()?;
        self.check_buffered()
    }

    fn started(
        &mut self,
        tag: u64,
        started: Result<CallId, crate::Rejected<u64>>,
        body: Bytes,
        deadline: Option<Instant>,
        kind: Option<StreamKind>,
    ) -> Result<(), String> {
        match started {
            Ok(id) => {
                self.outcome.started += 1;
                self.outcome.streams += kind.is_some() as usize;
                self.tags.insert(id, tag);
                self.live.insert(
                    tag,
                    LiveCall {
                        id,
                        body,
                        deadline,
                        kind,
                        sending: kind.is_some_and(StreamKind::client_streams),
                        sent: 0,
                        received: 0,
                        wants_writable: false,
                        pending: BytesMut::new(),
                    },
                );
                self.live_order.push(tag);
            }
            Err(rejected) => {
                if rejected.user != tag {
                    return Err("rejected call returned the wrong user data".into());
                }
                self.outcome.rejected += 1;
            }
        }
        Ok(())
    }

    /// Unary calls get their body echoed; stream calls get their id, so the client can
    /// tell the answer reached the right call.
    fn respond(&mut self, call: Running, fail: bool) {
        let now = self.pair.now;
        let sent = if fail {
            let status = Status::new(Code::Internal, "sim failure");
            self.pair
                .server
                .respond(now, call.id, &status, [("why", &b"sim"[..])], &[][..])
        } else if call.kind.is_some() {
            let body = call.id.as_u32().to_be_bytes();
            self.pair
                .server
                .respond(now, call.id, &Status::ok(), [], &body[..])
        } else {
            self.pair
                .server
                .respond(now, call.id, &Status::ok(), [], call.body)
        };
        debug_assert!(sent, "running call refused a response");
    }

    fn note(&mut self, r: Result<(), (Side, ProtoError)>) {
        if r.is_err() {
            self.outcome.protocol_errors += 1;
        }
    }

    fn check_buffered(&self) -> Result<(), String> {
        let (client, server) = (&self.pair.client, &self.pair.server);
        if client.buffered_bytes() > self.connection_bound {
            return Err(format!(
                "client holds {} unreleased bytes, over {}",
                client.buffered_bytes(),
                self.connection_bound
            ));
        }
        if server.buffered_bytes() > self.connection_bound {
            return Err(format!(
                "server holds {} unreleased bytes, over {}",
                server.buffered_bytes(),
                self.connection_bound
            ));
        }
        for call in self.live.values() {
            if let Some(n) = client.buffered(call.id).filter(|&n| n > self.stream_bound) {
                return Err(format!("client holds {n} bytes of {:?}", call.id));
            }
        }
        for call in &self.running {
            if let Some(n) = server.buffered(call.id).filter(|&n| n > self.stream_bound) {
                return Err(format!("server holds {n} bytes of {:?}", call.id));
            }
        }
        Ok(())
    }

    fn check_events(&mut self) -> Result<(), String> {
        while let Some(event) = self.pair.server.poll_event() {
            match event {
                ServerEvent::Request(req) => {
                    if self.running.iter().any(|r| r.id == req.id) {
                        return Err(format!("server runs call {:?} twice", req.id));
                    }
                    let method = req.head.method();
                    let kind = STREAM_METHODS
                        .iter()
                        .find(|(m, _)| *m == method)
                        .map(|(_, k)| *k);
                    if !self.corrupted {
                        if kind.is_none() && method != "/sim.Echo/Call" {
                            return Err(format!("method arrived as {method:?}"));
                        }
                        if kind.is_some_and(StreamKind::client_streams) != req.client_streams {
                            return Err(format!("{method} arrived with the wrong stream flag"));
                        }
                    }
                    self.running.push(Running {
                        id: req.id,
                        body: req.body,
                        kind,
                        received: 0,
                        half_closed: !req.client_streams,
                        sent: 0,
                        wants_writable: false,
                        pending: BytesMut::new(),
                    });
                }
                ServerEvent::Cancelled { id, .. } => {
                    let Some(i) = self.running.iter().position(|r| r.id == id) else {
                        return Err(format!("server cancelled {id:?}, which it was not running"));
                    };
                    self.running.swap_remove(i);
                }
                ServerEvent::Message { id, body } => {
                    let corrupted = self.corrupted;
                    let Some(call) = self.running.iter_mut().find(|r| r.id == id) else {
                        return Err(format!("server got a message for {id:?}, not running"));
                    };
                    if call.half_closed {
                        return Err(format!("server got a message for {id:?} after half-close"));
                    }
                    if !corrupted && !is_model_message(&body, id, call.received) {
                        return Err(format!(
                            "server got {id:?}'s messages out of order, duplicated or garbled (expected #{})",
                            call.received
                        ));
                    }
                    call.received += 1;
                    self.outcome.messages += 1;
                }
                ServerEvent::HalfClosed { id } => {
                    let corrupted = self.corrupted;
                    let Some(call) = self.running.iter_mut().find(|r| r.id == id) else {
                        return Err(format!("server got a half-close for {id:?}, not running"));
                    };
                    if call.half_closed {
                        return Err(format!("server got a second half-close for {id:?}"));
                    }
                    call.half_closed = true;
                    self.outcome.half_closed += 1;
                    let sent = self
                        .tags
                        .get(&id)
                        .and_then(|t| self.live.get(t))
                        .map(|c| c.sent);
                    if !corrupted && sent.is_some_and(|sent| sent != call.received) {
                        return Err(format!(
                            "{id:?} half-closed before all its messages arrived"
                        ));
                    }
                }
                ServerEvent::Writable { id } => {
                    let Some(call) = self.running.iter_mut().find(|r| r.id == id) else {
                        return Err(format!("server got Writable for {id:?}, not running"));
                    };
                    if !call.wants_writable {
                        return Err(format!("server got Writable for {id:?} unasked"));
                    }
                    call.wants_writable = false;
                    self.outcome.writable += 1;
                }
                ServerEvent::GoAway(_) => {}
                ServerEvent::Closed(_) => self.running.clear(),
            }
        }
        while let Some(event) = self.pair.client.poll_event() {
            let (id, user, result) = match event {
                ClientEvent::Finished { id, user, result } => (id, user, result),
                ClientEvent::Message { id, body } => {
                    let Some(call) = self.tags.get(&id).and_then(|t| self.live.get_mut(t)) else {
                        return Err(format!("client got a message for {id:?}, not in flight"));
                    };
                    if !call.kind.is_some_and(StreamKind::server_streams) {
                        return Err(format!("client got a message for non-streaming {id:?}"));
                    }
                    if !is_model_message(&body, id, call.received) {
                        return Err(format!(
                            "client got {id:?}'s messages out of order, duplicated or garbled (expected #{})",
                            call.received
                        ));
                    }
                    call.received += 1;
                    self.outcome.messages += 1;
                    continue;
                }
                ClientEvent::Writable { id } => {
                    let Some(call) = self.tags.get(&id).and_then(|t| self.live.get_mut(t)) else {
                        return Err(format!("client got Writable for {id:?}, not in flight"));
                    };
                    if !call.wants_writable {
                        return Err(format!("client got Writable for {id:?} unasked"));
                    }
                    call.wants_writable = false;
                    self.outcome.writable += 1;
                    continue;
                }
                ClientEvent::GoAway(_) | ClientEvent::Closed(_) => continue,
            };
            let Some(call) = self.live.remove(&user) else {
                let why = if self.done.contains(&user) {
                    "finished twice or after cancel"
                } else {
                    "never started"
                };
                return Err(format!("call {user} {why}"));
            };
            self.done.insert(user);
            if call.id != id {
                return Err(format!(
                    "call {user} finished under id {id:?}, started as {:?}",
                    call.id
                ));
            }
            match result {
                Ok(rsp) if rsp.status.is_ok() => {
                    let expected = match call.kind {
                        None => call.body.clone(),
                        Some(_) => Bytes::copy_from_slice(&id.as_u32().to_be_bytes()),
                    };
                    if !self.corrupted && rsp.body != expected {
                        return Err(format!("call {user} got another call's response"));
                    }
                    self.outcome.ok += 1;
                }
                Ok(_) => self.outcome.failed += 1,
                Err(status) => {
                    if status.code() == Code::DeadlineExceeded
                        && call.deadline.is_none_or(|d| d > self.pair.now)
                    {
                        return Err(format!(
                            "call {user} failed with deadline exceeded before its deadline"
                        ));
                    }
                    self.outcome.failed += 1;
                }
            }
        }
        Ok(())
    }

    /// Releases everything both sides hold, until nothing moves.
    fn release_all(&mut self) -> Result<(), String> {
        for _ in 0..16 {
            let r = self.pair.pump();
            self.note(r);
            self.check_events()?;
            let mut released = false;
            for call in self.live.values() {
                if let Some(n) = self.pair.client.buffered(call.id).filter(|&n| n > 0) {
                    self.pair.client.release(call.id, n);
                    released = true;
                }
            }
            for call in &self.running {
                if let Some(n) = self.pair.server.buffered(call.id).filter(|&n| n > 0) {
                    self.pair.server.release(call.id, n);
                    released = true;
                }
            }
            if !released {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Lets every call finish: both sides release what they hold (after which no send may
    /// still wait for credit), the server answers all it runs, bytes flow, time passes.
    fn settle(&mut self) -> Result<(), String> {
        self.release_all()?;
        if !self.corrupted && !self.pair.client.is_closed() && self.pair.server.calls_waiting() == 0
        {
            let stalled = self.live.values().filter(|c| c.wants_writable).count()
                + self.running.iter().filter(|c| c.wants_writable).count();
            if stalled > 0 {
                return Err(format!(
                    "{stalled} sends still wait for credit after everything was released"
                ));
            }
        }
        for _ in 0..64 {
            let r = self.pair.pump();
            self.note(r);
            self.check_events()?;
            while let Some(call) = self.running.pop() {
                self.respond(call, false);
            }
            let r = self.pair.pump();
            self.note(r);
            self.check_events()?;
            if self.live.is_empty() {
                return Ok(());
            }
            if self.pair.client.is_closed() {
                break;
            }
            if self.corrupted {
                // A corrupted call id can orphan a call with no deadline: nothing on a live
                // connection ends it. Dropping the connection must.
                self.pair.client.abort(Status::new(
                    Code::Unavailable,
                    "sim: dropping a corrupted connection",
                ));
                self.check_events()?;
                continue;
            }
            // Past every deadline and keepalive timeout.
            self.pair.advance(Duration::from_secs(600));
            self.check_events()?;
        }
        if self.live.is_empty() {
            Ok(())
        } else {
            Err(format!("{} calls never finished", self.live.len()))
        }
    }
}

/// Bodies of the fuzz targets (fuzz/), shared with the tests that replay the committed
/// corpus on stable. Each panics when an invariant breaks.
pub mod targets {
    use super::*;
    use crate::frame::{FrameRef, HEADER_LEN};
    use crate::head::{RequestHeadRef, ResponseHeadRef};
    use crate::{Limits, Payload};

    fn small_limits() -> Limits {
        Limits {
            max_frame_len: 1 << 16,
            max_head_len: 1 << 12,
            max_concurrent_calls: 8,
        }
    }

    /// Arbitrary bytes into the frame and head decoders: no panic, and every accepted
    /// header re-encodes to the bytes it came from (reserved bytes aside).
    pub fn frame_decode(data: &[u8]) {
        let limits = small_limits();
        let mut buf = data;
        while let Ok(Some((frame, n))) = FrameRef::decode(buf, &limits) {
            assert_eq!(n, HEADER_LEN + frame.head.len() + frame.body.len());
            let mut again = Vec::with_capacity(HEADER_LEN);
            frame.header.encode(&mut again);
            assert_eq!(again[..6], buf[..6]);
            assert_eq!(again[8..HEADER_LEN], buf[8..HEADER_LEN]);
            if let Ok(head) = RequestHeadRef::decode(frame.head) {
                assert!(!head.method.is_empty());
                head.metadata().for_each(drop);
            }
            if let Ok(head) = ResponseHeadRef::decode(frame.head) {
                head.metadata().for_each(drop);
            }
            buf = &buf[n..];
        }
    }

    /// Arbitrary bytes from a "server" into a client with unary and stream calls in flight,
    /// in chunks sized by the first byte, with time passing. Every call finishes exactly
    /// once, with the data it was started with, and stream events name only live calls.
    pub fn client_read(data: &[u8]) {
        let Some((&chunk, data)) = data.split_first() else {
            return;
        };
        let chunk = chunk as usize % 64 + 1;
        let t0 = Instant::now();
        let config = ConnConfig {
            limits: small_limits(),
            stream_window: INITIAL_STREAM_WINDOW,
            connection_window: INITIAL_CONNECTION_WINDOW,
            ..ConnConfig::default()
        };
        let mut client: ClientConn<u32> = ClientConn::new(config, t0);
        let mut live = HashMap::new();
        for tag in 0..4u32 {
            let head = CallHead::new("/fuzz.Svc/Call", codec::RAW)
                .with_deadline(t0 + Duration::from_millis(10 * (tag as u64 + 1)));
            let id = client
                .start_call(t0, head, &b"req"[..], tag)
                .expect("fresh connection accepts calls");
            live.insert(tag, id);
        }
        // Two streams too, so arbitrary messages and window updates meet live calls.
        for (tag, kind) in [
            (4, StreamKind::ServerStreaming),
            (5, StreamKind::Bidirectional),
        ] {
            let head = CallHead::new("/fuzz.Svc/Stream", codec::RAW);
            let id = client
                .start_stream(t0, head, kind, &[][..], tag)
                .expect("fresh connection accepts calls");
            live.insert(tag, id);
        }
        let mut buf = BytesMut::new();
        let mut now = t0;
        let mut check = |client: &mut ClientConn<u32>| {
            while let Some(event) = client.poll_event() {
                match event {
                    ClientEvent::Finished { id, user, .. } => assert_eq!(
                        live.remove(&user),
                        Some(id),
                        "call {user} finished twice or under another id"
                    ),
                    ClientEvent::Message { id, body } => {
                        assert!(live.values().any(|l| *l == id), "message for a call gone");
                        client.release(id, body.len());
                    }
                    ClientEvent::Writable { id } => {
                        assert!(live.values().any(|l| *l == id), "writable for a call gone");
                    }
                    ClientEvent::GoAway(_) | ClientEvent::Closed(_) => {}
                }
            }
        };
        for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            client.handle_read(now, &mut buf);
            now += Duration::from_millis(1);
            client.handle_timeout(now);
            while client.poll_transmit().is_some() {}
            check(&mut client);
        }
        client.abort(Status::new(Code::Unavailable, "fuzz input ended"));
        check(&mut client);
        assert!(live.is_empty(), "calls never finished: {live:?}");
    }

    /// Arbitrary bytes from a "client" into a server, which answers each request (some
    /// with errors, some too large to send). The server only cancels calls it runs and
    /// never hands out one id twice at once.
    pub fn server_read(data: &[u8]) {
        let Some((&chunk, data)) = data.split_first() else {
            return;
        };
        let chunk = chunk as usize % 64 + 1;
        let t0 = Instant::now();
        let config = ConnConfig {
            limits: small_limits(),
            stream_window: INITIAL_STREAM_WINDOW,
            connection_window: INITIAL_CONNECTION_WINDOW,
            ..ConnConfig::default()
        };
        let mut server = ServerConn::new(config, t0, 42);
        let mut running: Vec<CallId> = Vec::new();
        let mut buf = BytesMut::new();
        let mut now = t0;
        let big = vec![0u8; 1 << 16];
        for (i, piece) in data.chunks(chunk).enumerate() {
            buf.extend_from_slice(piece);
            server.handle_read(now, &mut buf);
            now += Duration::from_millis(1);
            server.handle_timeout(now);
            while let Some(event) = server.poll_event() {
                match event {
                    ServerEvent::Request(req) => {
                        assert!(!running.contains(&req.id), "{:?} handed out twice", req.id);
                        req.head.metadata().for_each(drop);
                        running.push(req.id);
                    }
                    ServerEvent::Cancelled { id, .. } => {
                        let at = running
                            .iter()
                            .position(|r| *r == id)
                            .expect("cancelled a call not running");
                        running.swap_remove(at);
                    }
                    ServerEvent::Message { id, body } => {
                        assert!(running.contains(&id), "message for a call not running");
                        server.release(id, body.len());
                    }
                    ServerEvent::HalfClosed { id } => {
                        assert!(running.contains(&id), "half-close of a call not running");
                    }
                    ServerEvent::Writable { .. } => {}
                    ServerEvent::GoAway(_) => {}
                    ServerEvent::Closed(_) => running.clear(),
                }
            }
            // Answer the oldest call, cycling through ok, error and oversize answers, after
            // a stream message.
            if !running.is_empty() {
                let id = running.remove(0);
                match server.send_message(id, &b"msg"[..]) {
                    Ok(()) | Err(crate::SendError::NoCredit) => {}
                    Err(e) => panic!("a running call refused a message: {e}"),
                }
                let body: Payload<'_> = match i % 3 {
                    0 => Payload::Slice(b"ok"),
                    1 => Payload::Slice(&[]),
                    _ => Payload::Slice(&big),
                };
                let status = if i % 3 == 1 {
                    Status::new(Code::Internal, "fuzz")
                } else {
                    Status::ok()
                };
                assert!(
                    server.respond(now, id, &status, [], body),
                    "a running call refused its response"
                );
            }
            while server.poll_transmit().is_some() {}
        }
    }

    /// A client and a server driven by an arbitrary operation sequence; see [`run_ops`].
    pub fn pair_ops(data: &[u8]) {
        let config = ConnConfig {
            limits: small_limits(),
            stream_window: INITIAL_STREAM_WINDOW,
            connection_window: INITIAL_CONNECTION_WINDOW,
            ..ConnConfig::default()
        };
        if let Err(broken) = run_ops(&ops_from_bytes(data), config) {
            panic!("invariant broken: {broken}");
        }
    }
}
