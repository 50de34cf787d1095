//! Calls over datagrams (UDP): one request and one response per datagram, matched by call id
//! (docs/PROTOCOL.md, "Datagrams (UDP)").
//!
//! A datagram holds exactly one whole frame, encoded as on a stream: the 20-byte header, the
//! head, the body. Anything else in a datagram (garbage, a truncated frame, two frames, a
//! frame type that does not belong) makes that datagram ignored and counted; it never
//! affects another call and never panics. There is no connection, so no keepalive, go-away or
//! cancel on the wire.
//!
//! [`DatagramClient`] talks to one server; [`DatagramServer`] serves any number of senders,
//! identified by an address type of the driver's choosing (`A: Copy + Eq + Hash`, e.g.
//! `std::net::SocketAddr`), so the core needs no `std::net`.
//!
//! ```
//! use std::time::Instant;
//! use gorpc_proto::datagram::{DatagramClient, DatagramConfig, DatagramServer, ServerInput};
//! use gorpc_proto::{codec, CallHead, Status};
//!
//! let now = Instant::now();
//! let mut client: DatagramClient<&str> = DatagramClient::new(DatagramConfig::default(), 1);
//! let mut server = DatagramServer::new(DatagramConfig::default(), 7);
//!
//! let (id, request) = client
//!     .start_call(now, CallHead::new("/demo.Echo/Say", codec::RAW), b"hi", "caller 1")
//!     .unwrap();
//! let Some(ServerInput::Request(req)) = server.handle_datagram(now, "client addr", &request)
//! else { panic!() };
//! assert_eq!((req.from, req.head.method()), ("client addr", "/demo.Echo/Say"));
//! let body = req.body.clone();
//! let response = server.respond(now, req.token, &Status::ok(), [], body).unwrap();
//!
//! client.handle_datagram(now, &response);
//! let Some(ev) = client.poll_event() else { panic!() };
//! assert_eq!((ev.id, ev.user), (id, "caller 1"));
//! assert_eq!(&ev.result.unwrap().body[..], b"hi");
//! ```

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hashbrown::HashMap;

use crate::client::{CallHead, Rejected, Response};
use crate::config::Limits;
use crate::frame::{flags, FrameHeader, FrameRef, FrameType, HEADER_LEN};
use crate::head::{encode_request_head, encode_response_head, RequestHead, ResponseHead};
use crate::status::{Code, Status};
use crate::timers::Deadlines;
use crate::transmit::Payload;
use crate::{CallId, IdHasher};

/// Default largest datagram sent, in bytes: 1,200 fits in one packet on every common path
/// (IPv6's minimum MTU is 1,280 bytes, minus 48 bytes of IPv6 and UDP headers), so calls are
/// never IP-fragmented, where losing one fragment loses the whole datagram.
pub const DEFAULT_MAX_DATAGRAM: usize = 1200;

/// Configuration of a [`DatagramClient`] or [`DatagramServer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatagramConfig {
    /// Frame limits, as on a stream: received frames over them are ignored.
    pub limits: Limits,
    /// Largest datagram this side sends (header + head + body). Requests over it are refused
    /// locally; responses over it become a `ResourceExhausted` status.
    pub max_datagram: usize,
    /// Client: first wait before an idempotent call's request is sent again. Each further
    /// wait doubles.
    pub retransmit_interval: Duration,
    /// Client: how many times an idempotent call's request is sent again at most.
    pub max_retransmits: u32,
    /// Server: how long a (sender, call id) is remembered after its request arrived, and
    /// again after it was answered, to recognise duplicates.
    pub duplicate_window: Duration,
    /// Server: most (sender, call id) pairs remembered; past it the oldest is forgotten.
    /// Memory for cached responses is at most `max_tracked * max_datagram` bytes.
    pub max_tracked: usize,
}

impl Default for DatagramConfig {
    fn default() -> Self {
        DatagramConfig {
            limits: Limits::default(),
            max_datagram: DEFAULT_MAX_DATAGRAM,
            retransmit_interval: Duration::from_millis(250),
            max_retransmits: 4,
            duplicate_window: Duration::from_secs(10),
            max_tracked: 4096,
        }
    }
}

/// Encodes one whole frame into its own buffer and checks it against `limits` and
/// `max_datagram`. Returns the datagram, or the sizes that broke a limit as a message.
#[allow(clippy::too_many_arguments)]
fn encode_datagram(
    frame_type: FrameType,
    codec: u8,
    call_id: u32,
    write_head: impl FnOnce(&mut BytesMut),
    body: &[u8],
    limits: &Limits,
    max_datagram: usize,
    what: &str,
) -> Result<Bytes, String> {
    let mut out = BytesMut::with_capacity(HEADER_LEN + 64 + body.len());
    out.put_bytes(0, HEADER_LEN);
    write_head(&mut out);
    let head_len = out.len() - HEADER_LEN;
    let len = out.len() + body.len();
    if head_len > limits.max_head_len as usize {
        return Err(format!(
            "{what} head of {head_len} bytes exceeds max_head_len of {} bytes",
            limits.max_head_len
        ));
    }
    if len > max_datagram {
        return Err(format!(
            "{what} of {len} bytes exceeds max_datagram of {max_datagram} bytes"
        ));
    }
    if len > limits.max_frame_len as usize {
        return Err(format!(
            "{what} of {len} bytes exceeds max_frame_len of {} bytes",
            limits.max_frame_len
        ));
    }
    let header = FrameHeader {
        frame_type,
        flags: flags::END_STREAM,
        codec,
        call_id,
        head_len: head_len as u32,
        body_len: body.len() as u32,
    };
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    out.put_slice(body);
    Ok(out.freeze())
}

/// Decodes a datagram that must be exactly one whole frame of type `want`.
fn decode_single(buf: &[u8], limits: &Limits, want: FrameType) -> Option<FrameHeader> {
    match FrameRef::decode(buf, limits) {
        Ok(Some((frame, n))) if n == buf.len() && frame.header.frame_type == want => {
            Some(frame.header)
        }
        _ => None,
    }
}

/// Slices the head and body of a validated single-frame datagram out of one owned copy.
fn owned_parts(buf: &[u8], header: &FrameHeader) -> (Bytes, Bytes) {
    let frame = Bytes::copy_from_slice(buf);
    let head_end = HEADER_LEN + header.head_len as usize;
    (frame.slice(HEADER_LEN..head_end), frame.slice(head_end..))
}

// ---------------------------------------------------------------------------------------
// Client

/// A call of a [`DatagramClient`] ended: exactly once per started call, unless it was
/// cancelled.
#[derive(Debug)]
pub struct Finished<T> {
    /// The call.
    pub id: CallId,
    /// The user data the call was started with.
    pub user: T,
    /// `Ok` with the server's response (whose status may be an error), or `Err` when the call
    /// ended locally: `DeadlineExceeded` at its deadline, `Unavailable` when an idempotent
    /// call without deadline ran out of retransmits, `Internal` for a malformed response.
    pub result: Result<Response, Status>,
}

#[derive(Debug)]
struct Retransmit {
    /// When the request is sent again.
    at: Instant,
    /// The wait after that one.
    interval: Duration,
    /// Resends left, this one included; at 0 `at` is when the call gives up.
    left: u32,
}

#[derive(Debug)]
struct DatagramCall<T> {
    user: T,
    deadline: Option<Instant>,
    /// Kept only for idempotent calls, to send again.
    datagram: Option<Bytes>,
    retransmit: Option<Retransmit>,
    /// The timer entry of this call: the earlier of the deadline and the retransmit time.
    wake: Option<Instant>,
}

impl<T> DatagramCall<T> {
    fn next_wake(&self) -> Option<Instant> {
        match (self.deadline, self.retransmit.as_ref().map(|r| r.at)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The client side of calls over datagrams to one server: fed datagrams and time, never
/// doing I/O.
///
/// # Driving it
///
/// Send the datagram [`start_call`](Self::start_call) returns; send every datagram
/// [`poll_transmit`](Self::poll_transmit) returns (retransmits); feed every datagram
/// received from the server to [`handle_datagram`](Self::handle_datagram); re-arm the timer
/// to [`poll_timeout`](Self::poll_timeout) and call [`handle_timeout`](Self::handle_timeout)
/// when it fires; drain [`poll_event`](Self::poll_event) after each input.
///
/// Only calls started with [`start_idempotent_call`](Self::start_idempotent_call) are sent
/// again; any other call whose request or response is lost ends at its deadline, or never
/// without one, so give every call a deadline.
#[derive(Debug)]
pub struct DatagramClient<T = ()> {
    config: DatagramConfig,
    calls: HashMap<u32, DatagramCall<T>, IdHasher>,
    next_id: u32,
    timers: Deadlines,
    events: VecDeque<Finished<T>>,
    out: VecDeque<Bytes>,
    ignored: u64,
}

impl<T> DatagramClient<T> {
    /// `first_id` is the first call id used (0 counts as 1). Give each client a random one:
    /// a server remembers (sender, id) for [`DatagramConfig::duplicate_window`], so a client
    /// restarted on the same address must not start again from the same id.
    pub fn new(config: DatagramConfig, first_id: u32) -> Self {
        DatagramClient {
            config,
            calls: HashMap::with_hasher(IdHasher::default()),
            next_id: first_id.max(1),
            timers: Deadlines::default(),
            events: VecDeque::new(),
            out: VecDeque::new(),
            ignored: 0,
        }
    }

    /// Starts a call that is sent once. Returns its id and the datagram to send.
    ///
    /// Fails without sending anything when the request does not fit in
    /// [`DatagramConfig::max_datagram`] or the frame limits (`ResourceExhausted`, naming both
    /// sizes), at `max_concurrent_calls` (`ResourceExhausted`), or when the deadline has
    /// already passed (`DeadlineExceeded`).
    pub fn start_call<'m, M>(
        &mut self,
        now: Instant,
        head: CallHead<'_, M>,
        body: impl Into<Payload<'m>>,
        user: T,
    ) -> Result<(CallId, Bytes), Rejected<T>>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        self.start(now, head, body.into(), user, false)
    }

    /// Starts a call that is safe to run more than once: like
    /// [`start_call`](Self::start_call), and its datagram is sent again through
    /// [`poll_transmit`](Self::poll_transmit) after `retransmit_interval` (doubling each
    /// time), up to `max_retransmits` times, until a response arrives or the deadline passes.
    /// Without a deadline, the call fails with `Unavailable` one interval after its last
    /// resend.
    pub fn start_idempotent_call<'m, M>(
        &mut self,
        now: Instant,
        head: CallHead<'_, M>,
        body: impl Into<Payload<'m>>,
        user: T,
    ) -> Result<(CallId, Bytes), Rejected<T>>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        self.start(now, head, body.into(), user, true)
    }

    fn start<'m, M>(
        &mut self,
        now: Instant,
        head: CallHead<'_, M>,
        body: Payload<'m>,
        user: T,
        idempotent: bool,
    ) -> Result<(CallId, Bytes), Rejected<T>>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        let reject = |code, message: std::borrow::Cow<'static, str>, user| {
            Err(Rejected {
                status: Status::new(code, message),
                user,
            })
        };
        if self.calls.len() >= self.config.limits.max_concurrent_calls as usize {
            return reject(
                Code::ResourceExhausted,
                "too many datagram calls in flight".into(),
                user,
            );
        }
        let timeout_micros = match head.deadline {
            None => 0,
            Some(deadline) => match deadline.checked_duration_since(now) {
                Some(left) if !left.is_zero() => (left.as_micros() as u64).max(1),
                _ => {
                    return reject(
                        Code::DeadlineExceeded,
                        "deadline passed before the call started".into(),
                        user,
                    )
                }
            },
        };
        let id = crate::client::allocate_id(&mut self.next_id, &self.calls);
        let body_bytes: &[u8] = match &body {
            Payload::Slice(s) => s,
            Payload::Bytes(b) => b,
        };
        let datagram = match encode_datagram(
            FrameType::Request,
            head.codec,
            id,
            |out| encode_request_head(head.method, timeout_micros, head.metadata, out),
            body_bytes,
            &self.config.limits,
            self.config.max_datagram,
            "request",
        ) {
            Ok(d) => d,
            Err(message) => return reject(Code::ResourceExhausted, message.into(), user),
        };
        let retransmit = idempotent.then(|| Retransmit {
            at: now + self.config.retransmit_interval,
            interval: self.config.retransmit_interval,
            left: self.config.max_retransmits,
        });
        let mut call = DatagramCall {
            user,
            deadline: head.deadline,
            datagram: idempotent.then(|| datagram.clone()),
            retransmit,
            wake: None,
        };
        call.wake = call.next_wake();
        if let Some(at) = call.wake {
            self.timers.push(at, id);
        }
        self.calls.insert(id, call);
        Ok((CallId(id), datagram))
    }

    /// Gives up on a call locally (nothing is sent: the server may still run it, and its
    /// late response is ignored). Returns the call's data, or `None` if it already finished.
    pub fn cancel(&mut self, id: CallId) -> Option<T> {
        let call = self.calls.remove(&id.0)?;
        self.after_removal();
        Some(call.user)
    }

    /// Takes in one datagram from the server. A datagram that is not exactly one response
    /// frame, or answers no call in flight (unknown, finished, cancelled), is ignored and
    /// counted in [`ignored`](Self::ignored).
    pub fn handle_datagram(&mut self, _now: Instant, datagram: &[u8]) {
        let Some(header) = decode_single(datagram, &self.config.limits, FrameType::Response) else {
            self.ignored += 1;
            return;
        };
        let Some(call) = self.calls.remove(&header.call_id) else {
            self.ignored += 1;
            return;
        };
        let (head, body) = owned_parts(datagram, &header);
        let result = match ResponseHead::decode(head) {
            Ok((head, status)) => Ok(Response {
                codec: header.codec,
                status,
                head,
                body,
            }),
            Err(e) => Err(Status::new(Code::Internal, format!("server sent a {e}"))),
        };
        self.events.push_back(Finished {
            id: CallId(header.call_id),
            user: call.user,
            result,
        });
        self.after_removal();
    }

    /// Fails calls whose deadline is at or before `now` and queues due retransmits.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((at, id)) = self.timers.pop_due(now) {
            let Some(call) = self.calls.get_mut(&id) else {
                continue;
            };
            if call.wake != Some(at) {
                continue;
            }
            let failure = if call.deadline.is_some_and(|d| d <= now) {
                Some(Status::new(
                    Code::DeadlineExceeded,
                    "no response before the deadline",
                ))
            } else {
                match &mut call.retransmit {
                    Some(r) if r.at <= now && r.left > 0 => {
                        if let Some(d) = &call.datagram {
                            self.out.push_back(d.clone());
                        }
                        r.left -= 1;
                        r.interval = r.interval.saturating_mul(2);
                        r.at = now + r.interval;
                        None
                    }
                    Some(r) if r.at <= now && call.deadline.is_none() => Some(Status::new(
                        Code::Unavailable,
                        format!(
                            "no response after {} retransmissions",
                            self.config.max_retransmits
                        ),
                    )),
                    Some(r) if r.at <= now => {
                        // Out of resends: wait for the deadline alone.
                        call.retransmit = None;
                        None
                    }
                    _ => None,
                }
            };
            if let Some(status) = failure {
                if let Some(call) = self.calls.remove(&id) {
                    self.events.push_back(Finished {
                        id: CallId(id),
                        user: call.user,
                        result: Err(status),
                    });
                }
                continue;
            }
            call.wake = call.next_wake();
            if let Some(at) = call.wake {
                self.timers.push(at, id);
            }
        }
        self.after_removal();
    }

    /// The earliest instant at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next finished call.
    pub fn poll_event(&mut self) -> Option<Finished<T>> {
        self.events.pop_front()
    }

    /// The next datagram to send again (a retransmit), to the server.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// Datagrams received and ignored: malformed, not a single response frame, or for no
    /// call in flight.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// The data of a call in flight.
    pub fn user(&self, id: CallId) -> Option<&T> {
        self.calls.get(&id.0).map(|c| &c.user)
    }

    /// Calls started and not yet finished or cancelled.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    fn after_removal(&mut self) {
        let calls = &self.calls;
        self.timers.prune(
            calls.len(),
            |at, id| matches!(calls.get(&id), Some(c) if c.wake == Some(at)),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Server

/// Proof that a request is being run; hand it back to [`DatagramServer::respond`].
#[derive(Debug)]
pub struct ReplyToken<A> {
    from: A,
    id: u32,
    codec: u8,
    generation: u64,
}

/// A request to run, from `from`.
#[derive(Debug)]
pub struct DatagramRequest<A> {
    /// The sender, to send the response to.
    pub from: A,
    /// The call's id, chosen by the client.
    pub id: CallId,
    /// Codec id of the request and of the response.
    pub codec: u8,
    /// Method, timeout and metadata.
    pub head: RequestHead,
    /// The request message.
    pub body: Bytes,
    /// When the client stops waiting, on this side's clock. `None`: no deadline.
    pub deadline: Option<Instant>,
    /// Answers the request through [`DatagramServer::respond`].
    pub token: ReplyToken<A>,
}

/// What a datagram given to [`DatagramServer::handle_datagram`] asks for.
#[derive(Debug)]
pub enum ServerInput<A> {
    /// Run this request.
    Request(DatagramRequest<A>),
    /// Send `datagram` to `to` and run nothing: the cached response to a duplicate request,
    /// or an error status (malformed head, unsupported stream, too many requests running).
    Reply {
        /// The request's sender.
        to: A,
        /// The whole response datagram.
        datagram: Bytes,
    },
}

/// Counters of a [`DatagramServer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatagramServerStats {
    /// Datagrams ignored: not exactly one request frame, or call id 0.
    pub ignored: u64,
    /// Duplicates answered again from the response cache.
    pub duplicates_answered: u64,
    /// Duplicates dropped because their first copy is still running.
    pub duplicates_dropped: u64,
    /// (sender, id) pairs forgotten before their window ended, to stay within `max_tracked`.
    pub evicted: u64,
}

#[derive(Debug)]
enum Seen {
    Running,
    Answered(Bytes),
}

#[derive(Debug)]
struct Tracked {
    /// Hash of the request datagram: a duplicate is the same bytes, not just the same id.
    fingerprint: u64,
    generation: u64,
    expires: Instant,
    state: Seen,
}

/// The server side of calls over datagrams, for any number of senders: fed datagrams and
/// time, never doing I/O.
///
/// Every request is remembered by (sender, call id) for `duplicate_window` from arrival and
/// again from its response. A byte-identical request arriving in that window is a duplicate
/// (a retransmit, or the network duplicating a datagram): it is dropped while the first copy
/// is running, and answered with the cached response datagram once that was sent. So no
/// request runs twice while it is remembered. At most `max_tracked` pairs are remembered; a
/// new request past that forgets the oldest one.
///
/// Answer every [`DatagramRequest`] with [`respond`](Self::respond), even one whose client
/// has given up: that is what frees its place under `max_concurrent_calls`.
#[derive(Debug)]
pub struct DatagramServer<A> {
    config: DatagramConfig,
    seen: HashMap<(A, u32), Tracked, IdHasher>,
    /// (expires, key, generation) in arrival order; entries whose generation no longer
    /// matches are stale. Expiry times are non-decreasing as `now` is.
    order: VecDeque<(Instant, A, u32, u64)>,
    next_generation: u64,
    running: usize,
    fingerprints: IdHasher,
    stats: DatagramServerStats,
}

impl<A: Copy + Eq + Hash> DatagramServer<A> {
    /// `hash_seed` keys the tables of sender-chosen ids; give each server a random one.
    pub fn new(config: DatagramConfig, hash_seed: u64) -> Self {
        DatagramServer {
            config,
            seen: HashMap::with_hasher(IdHasher::with_seed(hash_seed)),
            order: VecDeque::new(),
            next_generation: 0,
            running: 0,
            fingerprints: IdHasher::with_seed(hash_seed.rotate_left(17) ^ 0x9e37_79b9),
            stats: DatagramServerStats::default(),
        }
    }

    /// Takes in one datagram from `from`. Returns a request to run, a datagram to send back
    /// at once, or `None` when the datagram is ignored (malformed, not exactly one request
    /// frame, or a duplicate of a request still running).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: A,
        datagram: &[u8],
    ) -> Option<ServerInput<A>> {
        self.expire(now);
        let Some(header) = decode_single(datagram, &self.config.limits, FrameType::Request) else {
            self.stats.ignored += 1;
            return None;
        };
        if header.call_id == 0 {
            self.stats.ignored += 1;
            return None;
        }
        let key = (from, header.call_id);
        let fingerprint = self.fingerprints.hash_one(datagram);
        if let Some(tracked) = self.seen.get(&key) {
            if tracked.fingerprint == fingerprint {
                return match &tracked.state {
                    Seen::Running => {
                        self.stats.duplicates_dropped += 1;
                        None
                    }
                    Seen::Answered(response) => {
                        self.stats.duplicates_answered += 1;
                        Some(ServerInput::Reply {
                            to: from,
                            datagram: response.clone(),
                        })
                    }
                };
            }
            // Same id, different request: a new call (e.g. a restarted client).
            self.forget(&key);
        }
        let error = |code, message: String| Status::new(code, message);
        let (head, body) = owned_parts(datagram, &header);
        let head = if header.flags & flags::END_STREAM == 0 {
            Err(error(
                Code::Unimplemented,
                "streams are not supported over datagrams".into(),
            ))
        } else {
            RequestHead::decode(head).map_err(|e| error(Code::InvalidArgument, e.to_string()))
        };
        let head = match head {
            Ok(head) => head,
            Err(status) => {
                let response = self.error_response(header.call_id, header.codec, &status);
                self.track(now, key, fingerprint, Seen::Answered(response.clone()));
                return Some(ServerInput::Reply {
                    to: from,
                    datagram: response,
                });
            }
        };
        if self.running >= self.config.limits.max_concurrent_calls as usize {
            // Not remembered: a retransmit may find room.
            let status = Status::new(Code::ResourceExhausted, "too many requests running");
            let response = self.error_response(header.call_id, header.codec, &status);
            return Some(ServerInput::Reply {
                to: from,
                datagram: response,
            });
        }
        let generation = self.track(now, key, fingerprint, Seen::Running);
        self.running += 1;
        let deadline = match head.timeout_micros() {
            0 => None,
            micros => now.checked_add(Duration::from_micros(micros)),
        };
        Some(ServerInput::Request(DatagramRequest {
            from,
            id: CallId(header.call_id),
            codec: header.codec,
            head,
            body,
            deadline,
            token: ReplyToken {
                from,
                id: header.call_id,
                codec: header.codec,
                generation,
            },
        }))
    }

    /// Answers a request: returns the response datagram, to send to the request's `from`,
    /// and caches it for duplicates. A response over `max_datagram` (or the frame limits)
    /// becomes a `ResourceExhausted` status naming both sizes. Fails only when not even that
    /// fits (a `max_datagram` under about 100 bytes).
    pub fn respond<'m, M>(
        &mut self,
        now: Instant,
        token: ReplyToken<A>,
        status: &Status,
        metadata: M,
        body: impl Into<Payload<'m>>,
    ) -> Result<Bytes, Status>
    where
        M: IntoIterator<Item = (&'m str, &'m [u8])>,
    {
        self.expire(now);
        self.running = self.running.saturating_sub(1);
        let body = body.into();
        let body: &[u8] = match &body {
            Payload::Slice(s) => s,
            Payload::Bytes(b) => b,
        };
        let (code, message) = (status.code() as u32, status.message());
        let encoded = encode_datagram(
            FrameType::Response,
            token.codec,
            token.id,
            |out| encode_response_head(code, message, metadata, out),
            body,
            &self.config.limits,
            self.config.max_datagram,
            "response",
        );
        let response = match encoded {
            Ok(d) => d,
            Err(why) => {
                let status = Status::new(Code::ResourceExhausted, why);
                self.try_error_response(token.id, token.codec, &status)?
            }
        };
        let key = (token.from, token.id);
        if let Some(tracked) = self.seen.get_mut(&key) {
            if tracked.generation == token.generation {
                tracked.state = Seen::Answered(response.clone());
                tracked.expires = now + self.config.duplicate_window;
                self.order
                    .push_back((tracked.expires, token.from, token.id, token.generation));
            }
        }
        Ok(response)
    }

    /// Counters since this server was made.
    pub fn stats(&self) -> DatagramServerStats {
        self.stats
    }

    /// Requests handed out and not yet answered.
    pub fn running(&self) -> usize {
        self.running
    }

    /// (sender, call id) pairs remembered.
    pub fn tracked(&self) -> usize {
        self.seen.len()
    }

    fn try_error_response(&self, id: u32, codec: u8, status: &Status) -> Result<Bytes, Status> {
        let encode = |message: &str| {
            encode_datagram(
                FrameType::Response,
                codec,
                id,
                |out| encode_response_head(status.code() as u32, message, [], out),
                &[],
                &self.config.limits,
                self.config.max_datagram,
                "response",
            )
        };
        encode(status.message())
            .or_else(|_| encode(""))
            .map_err(|why| Status::new(Code::ResourceExhausted, why))
    }

    /// An error response; if even the bare status does not fit, a header-only frame would
    /// not either, so fall back to the shortest encoding, ignoring `max_datagram`.
    fn error_response(&self, id: u32, codec: u8, status: &Status) -> Bytes {
        self.try_error_response(id, codec, status)
            .unwrap_or_else(|_| {
                let mut out = BytesMut::new();
                let mut head = BytesMut::new();
                encode_response_head(status.code() as u32, "", [], &mut head);
                FrameHeader {
                    frame_type: FrameType::Response,
                    flags: flags::END_STREAM,
                    codec,
                    call_id: id,
                    head_len: head.len() as u32,
                    body_len: 0,
                }
                .encode(&mut out);
                out.put_slice(&head);
                out.freeze()
            })
    }

    fn track(&mut self, now: Instant, key: (A, u32), fingerprint: u64, state: Seen) -> u64 {
        while self.seen.len() >= self.config.max_tracked.max(1) {
            let Some((_, from, id, generation)) = self.order.pop_front() else {
                break;
            };
            if self.seen.get(&(from, id)).map(|t| t.generation) == Some(generation) {
                self.forget(&(from, id));
                self.stats.evicted += 1;
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let expires = now + self.config.duplicate_window;
        self.seen.insert(
            key,
            Tracked {
                fingerprint,
                generation,
                expires,
                state,
            },
        );
        self.order.push_back((expires, key.0, key.1, generation));
        generation
    }

    fn forget(&mut self, key: &(A, u32)) {
        // A forgotten running request still answers through its token; it just is not cached.
        self.seen.remove(key);
    }

    /// Forgets pairs whose window has passed, and drops stale order entries.
    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, from, id, generation)) = self.order.front() {
            let live = self.seen.get(&(from, id)).map(|t| t.generation) == Some(generation);
            if live {
                let current = self.seen.get(&(from, id)).map(|t| t.expires);
                if expires > now {
                    break;
                }
                // A record older than the entry's current expiry (answered since) is stale.
                if current == Some(expires) {
                    self.seen.remove(&(from, id));
                }
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.seen.len() + 64 {
            let seen = &self.seen;
            self.order.retain(|(expires, from, id, generation)| {
                matches!(seen.get(&(*from, *id)), Some(t) if t.generation == *generation && t.expires == *expires)
            });
        }
    }
}
