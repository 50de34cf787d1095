//! A client and a server connection wired back to back under a simulated clock, and a model
//! checker that drives them with arbitrary operations.
//!
//! Used by the crate's tests, property tests and fuzz targets, and by anyone embedding the
//! core who wants to exercise it without sockets. Time only moves when told to.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use crate::{
    codec, CallHead, CallId, ClientConn, ClientEvent, Code, ConnConfig, ProtoError, ServerConn,
    ServerEvent, Status,
};

/// Which end of a [`Pair`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// A client and a server connected by two in-memory byte pipes.
#[derive(Debug)]
pub struct Pair<T = u64> {
    pub client: ClientConn<T>,
    pub server: ServerConn,
    pub now: Instant,
    /// Deliver at most this many bytes per `handle_read` call, to split frames everywhere.
    pub chunk: usize,
    /// Bytes on the wire toward each side, not yet read.
    pub to_server: BytesMut,
    pub to_client: BytesMut,
    server_rx: BytesMut,
    client_rx: BytesMut,
}

impl<T> Pair<T> {
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
        if let Err(e) = self.server.handle_read(self.now, &mut self.server_rx) {
            error.get_or_insert((Side::Server, e));
        }
        if !self.to_client.is_empty() {
            let n = self.to_client.len().min(max).min(self.chunk);
            self.client_rx
                .extend_from_slice(&self.to_client.split_to(n));
            moved += n;
        }
        if let Err(e) = self.client.handle_read(self.now, &mut self.client_rx) {
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

    pub fn client_events(&mut self) -> Vec<ClientEvent<T>> {
        std::iter::from_fn(|| self.client.poll_event()).collect()
    }

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
        body_len: u16,
        timeout_ms: Option<u16>,
        metadata: bool,
    },
    /// Server answers the `pick`-th running call (echoing its body), or fails it.
    Respond {
        pick: u16,
        fail: bool,
    },
    /// Client cancels the `pick`-th live call.
    Cancel {
        pick: u16,
    },
    /// The clock moves forward.
    Advance {
        ms: u16,
    },
    /// At most `bytes` bytes move each way.
    Deliver {
        bytes: u16,
    },
    /// Everything on the wire moves.
    Pump,
    ClientGoAway,
    ServerGoAway,
    /// One byte on the wire toward the server is overwritten.
    Corrupt {
        offset: u16,
        value: u8,
    },
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
        let op = match tag % 16 {
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
            _ => {
                let [a, b, c] = take::<3>(&mut data);
                Op::Corrupt {
                    offset: u16::from_le_bytes([a, b]),
                    value: c,
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
    pub started: usize,
    pub ok: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub rejected: usize,
    pub protocol_errors: usize,
}

struct LiveCall {
    id: CallId,
    body: Bytes,
    deadline: Option<Instant>,
}

/// Runs `ops` against a fresh [`Pair`], then settles (answers everything, lets every
/// deadline pass) and checks the invariants users rely on:
///
/// - every started call finishes exactly once, unless the client cancelled it, in which
///   case it never finishes;
/// - a response reaches the call it answers: the echoed body matches what that call sent
///   (unless bytes were corrupted on the wire);
/// - a call fails with `DeadlineExceeded` only once its deadline has passed;
/// - the server never runs two calls with one id, and cancels only calls it is running.
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
    done: HashSet<u64>,
    running: Vec<(CallId, Bytes)>,
    corrupted: bool,
    outcome: Outcome,
}

impl Model {
    fn new(config: ConnConfig) -> Self {
        Model {
            pair: Pair::new(Instant::now(), config, config),
            next_tag: 1,
            live: HashMap::new(),
            live_order: Vec::new(),
            done: HashSet::new(),
            running: Vec::new(),
            corrupted: false,
            outcome: Outcome::default(),
        }
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
                match self.pair.client.start_call(now, head, body.clone(), tag) {
                    Ok(id) => {
                        self.outcome.started += 1;
                        self.live.insert(tag, LiveCall { id, body, deadline });
                        self.live_order.push(tag);
                    }
                    Err(rejected) => {
                        if rejected.user != tag {
                            return Err("rejected call returned the wrong user data".into());
                        }
                        self.outcome.rejected += 1;
                    }
                }
            }
            Op::Respond { pick, fail } => {
                if !self.running.is_empty() {
                    let (id, body) = self.running.swap_remove(pick as usize % self.running.len());
                    self.respond(id, body, fail);
                }
            }
            Op::Cancel { pick } => {
                self.live_order.retain(|t| self.live.contains_key(t));
                if !self.live_order.is_empty() {
                    let tag = self.live_order[pick as usize % self.live_order.len()];
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
        self.check_events()
    }

    fn respond(&mut self, id: CallId, body: Bytes, fail: bool) {
        let now = self.pair.now;
        let sent = if fail {
            let status = Status::new(Code::Internal, "sim failure");
            self.pair
                .server
                .respond(now, id, &status, [("why", &b"sim"[..])], &[][..])
        } else {
            self.pair.server.respond(now, id, &Status::ok(), [], body)
        };
        debug_assert!(sent, "running call refused a response");
    }

    fn note(&mut self, r: Result<(), (Side, ProtoError)>) {
        if r.is_err() {
            self.outcome.protocol_errors += 1;
        }
    }

    fn check_events(&mut self) -> Result<(), String> {
        while let Some(event) = self.pair.server.poll_event() {
            match event {
                ServerEvent::Request(req) => {
                    if self.running.iter().any(|(id, _)| *id == req.id) {
                        return Err(format!("server runs call {:?} twice", req.id));
                    }
                    if req.head.method() != "/sim.Echo/Call" && !self.corrupted {
                        return Err(format!("method arrived as {:?}", req.head.method()));
                    }
                    self.running.push((req.id, req.body));
                }
                ServerEvent::Cancelled { id, .. } => {
                    let Some(i) = self.running.iter().position(|(r, _)| *r == id) else {
                        return Err(format!("server cancelled {id:?}, which it was not running"));
                    };
                    self.running.swap_remove(i);
                }
                ServerEvent::GoAway(_) => {}
                ServerEvent::Closed(_) => self.running.clear(),
            }
        }
        while let Some(event) = self.pair.client.poll_event() {
            let ClientEvent::Finished { id, user, result } = event else {
                continue;
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
                    if !self.corrupted && rsp.body != call.body {
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

    /// Lets every call finish: the server answers all it runs, bytes flow, time passes.
    fn settle(&mut self) -> Result<(), String> {
        for _ in 0..64 {
            let r = self.pair.pump();
            self.note(r);
            self.check_events()?;
            while let Some((id, body)) = self.running.pop() {
                self.respond(id, body, false);
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

    /// Arbitrary bytes from a "server" into a client with calls in flight, in chunks sized
    /// by the first byte, with time passing. Every call finishes exactly once, with the data
    /// it was started with.
    pub fn client_read(data: &[u8]) {
        let Some((&chunk, data)) = data.split_first() else {
            return;
        };
        let chunk = chunk as usize % 64 + 1;
        let t0 = Instant::now();
        let config = ConnConfig {
            limits: small_limits(),
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
        let mut buf = BytesMut::new();
        let mut now = t0;
        let mut check = |client: &mut ClientConn<u32>| {
            while let Some(event) = client.poll_event() {
                if let ClientEvent::Finished { id, user, .. } = event {
                    assert_eq!(
                        live.remove(&user),
                        Some(id),
                        "call {user} finished twice or under another id"
                    );
                }
            }
        };
        for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            let _ = client.handle_read(now, &mut buf);
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
            ..ConnConfig::default()
        };
        let mut server = ServerConn::new(config, t0, 42);
        let mut running: Vec<CallId> = Vec::new();
        let mut buf = BytesMut::new();
        let mut now = t0;
        let big = vec![0u8; 1 << 16];
        for (i, piece) in data.chunks(chunk).enumerate() {
            buf.extend_from_slice(piece);
            let _ = server.handle_read(now, &mut buf);
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
                    ServerEvent::GoAway(_) => {}
                    ServerEvent::Closed(_) => running.clear(),
                }
            }
            // Answer the oldest call, cycling through ok, error and oversize answers.
            if !running.is_empty() {
                let id = running.remove(0);
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
            ..ConnConfig::default()
        };
        if let Err(broken) = run_ops(&ops_from_bytes(data), config) {
            panic!("invariant broken: {broken}");
        }
    }
}
