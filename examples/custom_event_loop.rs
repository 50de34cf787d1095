//! Drives the sans-IO core (`gorpc_proto::ServerConn` and `ClientConn`) from a hand-written
//! event loop over plain `std::net` TCP sockets on 127.0.0.1: no async runtime, just one
//! server thread, the main thread as client, and blocking sockets with read timeouts as timers.
//!
//! The client makes four calls: one answered at once, one the server answers slowly, one to
//! the same slow method whose deadline expires first (DEADLINE_EXCEEDED, and the server's late
//! answer is dropped), and one to a method that does not exist (UNIMPLEMENTED). Then it says
//! go-away and both sides close once the connection has drained.
//!
//! cargo run -p gorpc-examples --example custom-event-loop

use std::collections::hash_map::RandomState;
use std::error::Error;
use std::fmt::Display;
use std::hash::BuildHasher;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gorpc_proto::Conn as _;
use gorpc_proto::{
    codec, CallHead, CallId, ClientConn, ClientEvent, CloseReason, Code, ConnConfig, Request,
    Response, ServerConn, ServerEvent, Status,
};

const UPPER: &str = "/demo.Text/Upper";
const SLOW: &str = "/demo.Text/Slow";
/// How long the server holds a `Slow` request before answering it.
const SLOW_DELAY: Duration = Duration::from_millis(300);
/// The deadline of the call meant to expire against `Slow`.
const SHORT_DEADLINE: Duration = Duration::from_millis(100);
/// The client gives up on the whole example after this long, so it can never hang.
const WATCHDOG: Duration = Duration::from_secs(4);
/// `set_read_timeout` rejects a zero duration, so a timer that is already due waits this long.
const MIN_WAIT: Duration = Duration::from_millis(1);
const READ_CHUNK: usize = 16 * 1024;

fn main() -> Result<(), Box<dyn Error>> {
    gorpc_examples::init_logging();
    let start = Instant::now();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    log(start, "server", format_args!("listening on {addr}"));
    let server = thread::spawn(move || serve(listener, start));

    let mut stream = TcpStream::connect(addr)?;
    // Each loop iteration writes everything queued at once; Nagle would only delay it.
    stream.set_nodelay(true)?;

    let now = Instant::now();
    // The per-call data `T` is a label, handed back with the call's result.
    let mut conn: ClientConn<&'static str> = ClientConn::new(ConnConfig::default(), now);
    let calls: [(&'static str, CallHead<'_, _>, &[u8]); 4] = [
        (
            "Upper(\"hello\")",
            CallHead::new(UPPER, codec::RAW),
            b"hello",
        ),
        (
            "Slow(\"patience\")",
            CallHead::new(SLOW, codec::RAW),
            b"patience",
        ),
        (
            "Slow(\"hurry\") with a 100 ms deadline",
            CallHead::new(SLOW, codec::RAW).with_deadline(now + SHORT_DEADLINE),
            b"hurry",
        ),
        (
            "Reverse(\"abc\")",
            CallHead::new("/demo.Text/Reverse", codec::RAW),
            b"abc",
        ),
    ];
    for (label, head, body) in calls {
        match conn.start_call(now, head, body, label) {
            Ok(id) => log(
                start,
                "client",
                format_args!("call {} {label}", id.as_u32()),
            ),
            Err(rejected) => log(
                start,
                "client",
                format_args!("{label} not started: {}", rejected.status),
            ),
        }
    }

    let watchdog = start + WATCHDOG;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut go_away_sent = false;
    let reason = loop {
        let mut closed = None;
        while let Some(event) = conn.poll_event() {
            match event {
                ClientEvent::Finished { id, user, result } => log(
                    start,
                    "client",
                    format_args!("call {} {user}: {}", id.as_u32(), outcome(result)),
                ),
                ClientEvent::GoAway(status) => {
                    log(start, "client", format_args!("server go-away: {status}"))
                }
                ClientEvent::Closed(reason) => closed = Some(reason),
                // This client starts no stream calls, and the core fails a unary call the
                // server answers with a message stream, so neither event can arrive here.
                ClientEvent::Message { id, body } => conn.release(id, body.len()),
                // Writable, and whatever a later core adds: nothing for this client.
                _ => {}
            }
        }
        if let Err(e) = write_out(&mut stream, || conn.poll_transmit()) {
            if let Some(reason) = closed {
                break reason;
            }
            conn.abort(Status::new(Code::Unavailable, format!("write failed: {e}")));
            continue;
        }
        if let Some(reason) = closed {
            break reason;
        }
        if !go_away_sent && conn.calls_in_flight() == 0 {
            // Every call has finished. The connection closes once the server has answered
            // with its own go-away; loop again to send ours and see what it caused.
            log(start, "client", "all calls finished, sending go-away");
            conn.go_away();
            go_away_sent = true;
            continue;
        }

        let wake = [conn.poll_timeout(), Some(watchdog)]
            .into_iter()
            .flatten()
            .min();
        match read_some(&mut stream, &mut buf, read_timeout(wake)) {
            Ok(Input::Data) => {
                // A protocol error closes the connection: its Closed event says why.
                conn.handle_read(Instant::now(), &mut buf)
            }
            Ok(Input::Eof) => conn.handle_eof(),
            Ok(Input::TimedOut) => {}
            Err(e) => conn.abort(Status::new(Code::Unavailable, format!("read failed: {e}"))),
        }
        let now = Instant::now();
        if now >= watchdog {
            conn.abort(Status::new(Code::DeadlineExceeded, "example ran too long"));
        } else if conn.poll_timeout().is_some_and(|at| at <= now) {
            conn.handle_timeout(now);
        }
    };
    log(
        start,
        "client",
        format_args!("connection closed: {}", describe(&reason)),
    );
    drop(stream);

    server.join().map_err(|_| "server thread panicked")??;
    if reason != CloseReason::Drained {
        return Err(format!("connection did not drain cleanly: {}", describe(&reason)).into());
    }
    Ok(())
}

/// A `Slow` answer the server owes, due at `due`.
struct Delayed {
    due: Instant,
    id: CallId,
    body: Bytes,
}

/// The server: one connection, served on this thread until it closes.
fn serve(listener: TcpListener, start: Instant) -> io::Result<()> {
    let (mut stream, peer) = listener.accept()?;
    stream.set_nodelay(true)?;
    log(start, "server", format_args!("accepted {peer}"));

    // The hash seed keeps clients from choosing colliding call ids; std's randomly keyed
    // RandomState provides one without another dependency.
    let seed = RandomState::new().hash_one(peer);
    let mut conn = ServerConn::new(ConnConfig::default(), Instant::now(), seed);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut delayed: Vec<Delayed> = Vec::new();
    loop {
        // Answer the slow requests that have come due, even those whose caller gave up: the
        // core knows which calls still run and drops the rest (`respond` returns false), so
        // the handler keeps no bookkeeping of its own.
        let now = Instant::now();
        delayed.retain(|d| {
            if d.due > now {
                return true;
            }
            let sent = conn.respond(now, d.id, &Status::ok(), [], d.body.clone());
            let what = if sent {
                "sent"
            } else {
                "dropped, the call is gone"
            };
            log(
                start,
                "server",
                format_args!(
                    "delayed answer to call {}: respond returned {sent} ({what})",
                    d.id.as_u32()
                ),
            );
            false
        });

        let mut closed = None;
        while let Some(event) = conn.poll_event() {
            match event {
                ServerEvent::Request(req) => handle(&mut conn, req, &mut delayed, start),
                ServerEvent::Cancelled { id, reason } => log(
                    start,
                    "server",
                    format_args!("call {} cancelled ({reason:?})", id.as_u32()),
                ),
                ServerEvent::GoAway(status) => {
                    log(start, "server", format_args!("client go-away: {status}"))
                }
                ServerEvent::Closed(reason) => closed = Some(reason),
                // Client streams are refused in `handle`; a message still racing in for one
                // gives its credit straight back.
                ServerEvent::Message { id, body } => conn.release(id, body.len()),
                // HalfClosed, Writable, and whatever a later core adds: nothing for this
                // server.
                _ => {}
            }
        }
        if let Err(e) = write_out(&mut stream, || conn.poll_transmit()) {
            if closed.is_some() {
                break;
            }
            conn.abort(Status::new(Code::Unavailable, format!("write failed: {e}")));
            continue;
        }
        if let Some(reason) = closed {
            log(
                start,
                "server",
                format_args!("connection closed: {}", describe(&reason)),
            );
            break;
        }

        // Sleep until the core's next timer or the next owed answer, whichever comes first.
        let wake = [conn.poll_timeout(), delayed.iter().map(|d| d.due).min()]
            .into_iter()
            .flatten()
            .min();
        if conn.wants_read() {
            match read_some(&mut stream, &mut buf, read_timeout(wake)) {
                Ok(Input::Data) => conn.handle_read(Instant::now(), &mut buf),
                Ok(Input::Eof) => conn.handle_eof(),
                Ok(Input::TimedOut) => {}
                Err(e) => conn.abort(Status::new(Code::Unavailable, format!("read failed: {e}"))),
            }
        } else {
            // At its concurrency limit the server leaves further requests in the socket, so
            // TCP pushes back on the client. Only time frees a slot here: an answer coming
            // due or a deadline passing.
            thread::sleep(read_timeout(wake).unwrap_or(MIN_WAIT));
        }
        let now = Instant::now();
        if conn.poll_timeout().is_some_and(|at| at <= now) {
            conn.handle_timeout(now);
        }
    }
    Ok(())
}

/// Runs one request: answers it now, holds it for later, or fails it.
fn handle(conn: &mut ServerConn, req: Request, delayed: &mut Vec<Delayed>, start: Instant) {
    let now = Instant::now();
    let id = req.id.as_u32();
    if req.client_streams {
        let status = Status::new(Code::Unimplemented, "this server serves no stream calls");
        conn.respond(now, req.id, &status, [], &[][..]);
        log(start, "server", format_args!("call {id}: stream refused"));
        return;
    }
    match req.head.method() {
        UPPER => {
            conn.respond(
                now,
                req.id,
                &Status::ok(),
                [],
                req.body.to_ascii_uppercase(),
            );
            log(start, "server", format_args!("call {id} {UPPER}: answered"));
        }
        SLOW => {
            delayed.push(Delayed {
                due: now + SLOW_DELAY,
                id: req.id,
                body: req.body.to_ascii_uppercase().into(),
            });
            let budget = match req.deadline {
                Some(at) => format!(
                    "client waits {} ms",
                    at.saturating_duration_since(now).as_millis()
                ),
                None => "no deadline".to_owned(),
            };
            log(
                start,
                "server",
                format_args!(
                    "call {id} {SLOW}: answering in {} ms ({budget})",
                    SLOW_DELAY.as_millis()
                ),
            );
        }
        other => {
            let status = Status::new(Code::Unimplemented, format!("unknown method {other}"));
            conn.respond(now, req.id, &status, [], Bytes::new());
            log(start, "server", format_args!("call {id} {other}: {status}"));
        }
    }
}

/// What one read from the socket brought.
enum Input {
    Data,
    Eof,
    /// The read timeout expired: a timer is due.
    TimedOut,
}

/// Reads what the socket has into `buf`, waiting at most `wait` (`None`: until data arrives).
fn read_some(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    wait: Option<Duration>,
) -> io::Result<Input> {
    stream.set_read_timeout(wait)?;
    let mut chunk = [0u8; READ_CHUNK];
    match stream.read(&mut chunk) {
        Ok(0) => Ok(Input::Eof),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(Input::Data)
        }
        // Unix reports an expired read timeout as WouldBlock, Windows as TimedOut. A signal
        // cutting the wait short is harmless too: the loop recomputes its timers.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            ) =>
        {
            Ok(Input::TimedOut)
        }
        Err(e) => Err(e),
    }
}

/// Writes out everything `next` yields, in order. Blocking writes suffice here because the
/// messages are tiny; a loop moving bulk data would use non-blocking writes, keep what did
/// not fit, and wait for the socket to become writable alongside reading.
fn write_out(stream: &mut TcpStream, mut next: impl FnMut() -> Option<Bytes>) -> io::Result<()> {
    while let Some(chunk) = next() {
        stream.write_all(&chunk)?;
    }
    Ok(())
}

/// The read timeout that wakes the loop at `wake`: never zero, and `None` (block) when there
/// is no timer.
fn read_timeout(wake: Option<Instant>) -> Option<Duration> {
    wake.map(|at| at.saturating_duration_since(Instant::now()).max(MIN_WAIT))
}

fn outcome(result: Result<Response, Status>) -> String {
    match result {
        Ok(response) if response.status.is_ok() => {
            format!("ok, {:?}", String::from_utf8_lossy(&response.body))
        }
        Ok(response) => format!("server answered {}", response.status),
        Err(status) => format!("failed locally: {status}"),
    }
}

fn describe(reason: &CloseReason) -> String {
    match reason {
        CloseReason::Drained => "drained".to_owned(),
        other => other.status().to_string(),
    }
}

fn log(start: Instant, who: &str, message: impl Display) {
    println!("[{:>4} ms] {who}: {message}", start.elapsed().as_millis());
}
