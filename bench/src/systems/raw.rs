//! The ceiling: a pipelined, length-prefixed TCP echo on tokio with no RPC layer at all.
//!
//! Frames are a big-endian `u32` length and that many bytes. The server echoes each frame
//! (or, for the hello workload, answers `name` with `"Hello " + name`), writing everything
//! it has for a connection once its read buffer is drained. The client keeps
//! `concurrency / connections` requests in flight per connection: a writer refills the
//! window, a reader matches replies to send times first in, first out.
//!
//! The stream workload is the least any server stream does, over plain TCP: each stream task
//! has a connection of its own (`--connections` does not apply) and sends an 8-byte
//! [`DownloadOrder`]; the server answers with `count` frames of the payload, written about
//! 64 KiB at a time from one batch built per order, then an end marker (length `u32::MAX`,
//! no body), and waits for the next order on the same connection. The client checks every
//! message against the payload. There is no flow control but TCP's own, so
//! `--stream-window` and `--connection-window` do not apply.
//!
//! The upload workload is the same the other way: each task writes `count` frames of the
//! payload about 64 KiB at a time, then the end marker; the server counts them and answers
//! with the 16-byte [`UploadTally`].
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{
    greeting, make_payload, ClientParams, DownloadOrder, UploadTally, Workload, HELLO_NAME, NO_HTTP,
};
use crate::loadgen::{
    take_recorder, Measurement, Recorder, StreamCaller, StreamTally, Window, GRACE,
};

/// Frames longer than this close the connection.
const MAX_FRAME: usize = 64 << 20;

/// The stream server's writes: as many whole messages as fit in this many bytes (one at
/// least).
const STREAM_BATCH: usize = 64 * 1024;

/// The length that ends a stream: a frame with no body.
const END_OF_STREAM: u32 = u32::MAX;

/// Binds 127.0.0.1:0 and serves in a background task, one task per connection.
pub async fn serve(workload: Workload) -> std::io::Result<SocketAddr> {
    if workload == Workload::Http {
        return Err(std::io::Error::other(NO_HTTP));
    }
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        let served = match workload {
                            Workload::Stream => serve_streams(stream).await,
                            Workload::Upload => serve_uploads(stream).await,
                            _ => serve_conn(stream, workload).await,
                        };
                        if let Err(e) = served {
                            eprintln!("raw server: {e}");
                        }
                    });
                }
                Err(e) => eprintln!("raw server accept: {e}"),
            }
        }
    });
    Ok(addr)
}

async fn serve_conn(mut stream: TcpStream, workload: Workload) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.split();
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut output = BytesMut::with_capacity(64 * 1024);
    loop {
        if rd.read_buf(&mut input).await? == 0 {
            break;
        }
        // Answer every complete frame, then write the answers at once.
        while input.len() >= 4 {
            let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
            if len > MAX_FRAME {
                return Err(std::io::Error::other("frame too long"));
            }
            if input.len() < 4 + len {
                input.reserve(4 + len - input.len());
                break;
            }
            match workload {
                Workload::Echo => output.extend_from_slice(&input[..4 + len]),
                Workload::Hello => {
                    output.put_u32((b"Hello ".len() + len) as u32);
                    output.extend_from_slice(b"Hello ");
                    output.extend_from_slice(&input[4..4 + len]);
                }
                Workload::Stream | Workload::Upload => {
                    unreachable!("streams are served by serve_streams and serve_uploads")
                }
                Workload::Http => unreachable!("refused by serve"),
            }
            input.advance(4 + len);
        }
        if !output.is_empty() {
            wr.write_all(&output).await?;
            output.clear();
        }
    }
    wr.shutdown().await
}

/// One connection of the stream workload: order after order, each answered with its
/// messages and the end marker. A client that goes away, mid-stream or between orders, ends
/// the connection quietly.
async fn serve_streams(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut order = [0u8; 8];
    let served: std::io::Result<()> = async {
        loop {
            stream.read_exact(&mut order).await?;
            let order = DownloadOrder::decode(&order).expect("an order is 8 bytes");
            let size = order.size as usize;
            if size > MAX_FRAME {
                return Err(std::io::Error::other("stream message too long"));
            }
            // One batch of whole messages, written as often as the order needs.
            let frame_len = 4 + size;
            let per_batch = (STREAM_BATCH / frame_len).clamp(1, order.count.max(1) as usize);
            let message = make_payload(size);
            let mut batch = BytesMut::with_capacity(per_batch * frame_len + 4);
            for _ in 0..per_batch {
                batch.put_u32(order.size);
                batch.extend_from_slice(&message);
            }
            let count = order.count as usize;
            for _ in 0..count / per_batch {
                stream.write_all(&batch).await?;
            }
            // The rest, and the end marker, in one last write.
            batch.truncate(count % per_batch * frame_len);
            batch.put_u32(END_OF_STREAM);
            stream.write_all(&batch).await?;
        }
    }
    .await;
    match served {
        Err(e) if is_disconnect(&e) => Ok(()),
        other => other,
    }
}

/// One connection of the upload workload: upload after upload, each a run of frames ended by
/// the end marker and answered with its tally. A client that goes away ends the connection
/// quietly.
async fn serve_uploads(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut input = BytesMut::with_capacity(4 * STREAM_BATCH);
    let mut tally = UploadTally { count: 0, bytes: 0 };
    let served: std::io::Result<()> = async {
        loop {
            input.reserve(STREAM_BATCH);
            if stream.read_buf(&mut input).await? == 0 {
                return Ok(());
            }
            while input.len() >= 4 {
                let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
                if len == END_OF_STREAM {
                    input.advance(4);
                    stream.write_all(&tally.encode()).await?;
                    tally = UploadTally { count: 0, bytes: 0 };
                    continue;
                }
                let len = len as usize;
                if len > MAX_FRAME {
                    return Err(std::io::Error::other("upload message too long"));
                }
                if input.len() < 4 + len {
                    break;
                }
                input.advance(4 + len);
                tally.count += 1;
                tally.bytes += len as u64;
            }
        }
    }
    .await;
    match served {
        Err(e) if is_disconnect(&e) => Ok(()),
        other => other,
    }
}

/// Whether `e` means the peer closed or reset the connection.
fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted
    )
}

/// Runs the pipelined load over `p.connections` connections.
pub async fn run(p: &ClientParams) -> Result<Measurement, String> {
    let (request, expected) = match p.workload {
        Workload::Echo => (p.payload.clone(), p.payload.clone()),
        Workload::Hello => (
            Bytes::from_static(HELLO_NAME.as_bytes()),
            Bytes::from(greeting(HELLO_NAME)),
        ),
        Workload::Stream | Workload::Upload => {
            unreachable!("stream callers come from stream_callers")
        }
        Workload::Http => return Err(NO_HTTP.to_owned()),
    };
    let mut streams = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let stream = TcpStream::connect(p.addr)
            .await
            .map_err(|e| format!("raw connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        streams.push(stream);
    }
    let window = Window::starting_now(p.warmup, p.secs);
    let mut cells = Vec::new();
    let mut tasks = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        // Spread the callers over the connections like the other systems do.
        let depth = (0..p.concurrency).filter(|&c| p.conn_of(c) == i).count();
        if depth == 0 {
            continue;
        }
        let cell = Arc::new(Mutex::new(Recorder::new(window)));
        cells.push(cell.clone());
        tasks.push(tokio::spawn(pipeline(
            stream,
            depth,
            request.clone(),
            expected.clone(),
            window,
            cell,
        )));
    }
    let grace = tokio::time::sleep_until((window.end + GRACE).into());
    let mut grace = std::pin::pin!(grace);
    let mut failures = 0;
    for task in tasks {
        tokio::select! {
            joined = task => {
                if !matches!(joined, Ok(Ok(()))) {
                    failures += 1;
                }
            }
            () = &mut grace => {
                failures += 1;
            }
        }
    }
    let mut recorders: Vec<Recorder> = cells.iter().map(|c| take_recorder(c, &window)).collect();
    if let Some(r) = recorders.first_mut() {
        r.error(failures);
    }
    Ok(Measurement::merge(&window, recorders))
}

/// One connection: the writer keeps `depth` requests in flight until the window ends, then
/// closes its half; the reader matches replies until the server closes its side.
async fn pipeline(
    stream: TcpStream,
    depth: usize,
    request: Bytes,
    expected: Bytes,
    window: Window,
    cell: Arc<Mutex<Recorder>>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let credits = Arc::new(Semaphore::new(depth));
    let sent_at = Arc::new(Mutex::new(VecDeque::<Instant>::with_capacity(depth)));

    let mut frame = BytesMut::with_capacity(4 + request.len());
    frame.put_u32(request.len() as u32);
    frame.extend_from_slice(&request);
    let frame = frame.freeze();

    let writer = {
        let credits = credits.clone();
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(depth * frame.len());
            loop {
                let Ok(first) = credits.acquire().await else {
                    break;
                };
                first.forget();
                let now = Instant::now();
                if now >= window.end {
                    break;
                }
                // Fill the window with every credit there is, in one write.
                let mut n = 1;
                while let Ok(more) = credits.try_acquire() {
                    more.forget();
                    n += 1;
                }
                {
                    let mut sent_at = sent_at.lock().unwrap_or_else(|e| e.into_inner());
                    sent_at.extend(std::iter::repeat_n(now, n));
                }
                for _ in 0..n {
                    out.extend_from_slice(&frame);
                }
                wr.write_all(&out).await?;
                out.clear();
            }
            // The server answers what it has and closes, which ends the reader.
            wr.shutdown().await
        })
    };

    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut reply = vec![0u8; expected.len()];
    let read_result: std::io::Result<()> = async {
        loop {
            let len = match rd.read_u32().await {
                Ok(len) => len as usize,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            if len > MAX_FRAME {
                return Err(std::io::Error::other("frame too long"));
            }
            reply.resize(len, 0);
            rd.read_exact(&mut reply).await?;
            let done = Instant::now();
            let sent = sent_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            {
                let mut rec = cell.lock().unwrap_or_else(|e| e.into_inner());
                match sent {
                    Some(sent) => rec.record(sent, done, reply[..] == expected[..]),
                    None => rec.error(1),
                }
            }
            credits.add_permits(1);
        }
    }
    .await;
    // Requests never answered are errors.
    let unanswered = sent_at.lock().unwrap_or_else(|e| e.into_inner()).len();
    cell.lock()
        .unwrap_or_else(|e| e.into_inner())
        .error(unanswered as u64);
    credits.close();
    let written = writer.await.map_err(std::io::Error::other)?;
    read_result.and(written)
}

/// One stream task of the stream or upload workload, on a connection of its own.
pub struct RawStreamCaller {
    addr: SocketAddr,
    /// Dropped when a stream is cut short or goes wrong, opened again by the next stream.
    conn: Option<TcpStream>,
    order: DownloadOrder,
    expected: Bytes,
    input: BytesMut,
    /// For uploads: as many whole frames of the payload as fit in `STREAM_BATCH` (one at
    /// least), written as often as an upload needs.
    upload_batch: Option<Bytes>,
}

/// How a stream read ended.
enum Ended {
    /// The end marker came: whether every message ordered came before it.
    Marker(bool),
    /// The run is over; the stream was cut short.
    Stopped,
    /// A read failed, or a message was not the one expected, or a frame was malformed.
    Broken,
}

impl StreamCaller for RawStreamCaller {
    async fn stream(&mut self, tally: &Arc<StreamTally>) -> bool {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => match connect(self.addr).await {
                Ok(conn) => {
                    self.input.clear();
                    self.conn.insert(conn)
                }
                Err(_) => return false,
            },
        };
        if let Some(batch) = &self.upload_batch {
            let ended = upload(conn, batch, self.order, tally).await;
            if !matches!(ended, Ended::Marker(_)) {
                self.conn = None;
            }
            return !matches!(ended, Ended::Broken | Ended::Marker(false));
        }
        let ended = match conn.write_all(&self.order.encode()).await {
            Ok(()) => {
                take_stream(
                    conn,
                    &mut self.input,
                    self.order.count,
                    &self.expected,
                    tally,
                )
                .await
            }
            Err(_) => Ended::Broken,
        };
        match ended {
            Ended::Marker(all) => all,
            Ended::Stopped => {
                self.conn = None;
                true
            }
            Ended::Broken => {
                self.conn = None;
                false
            }
        }
    }
}

/// Writes one upload of `order.count` messages on `conn`, `batch` (whole frames) at a time,
/// then the end marker, and reads the server's tally: `Marker(true)` when it matches.
async fn upload(
    conn: &mut TcpStream,
    batch: &Bytes,
    order: DownloadOrder,
    tally: &StreamTally,
) -> Ended {
    let frame_len = 4 + order.size as usize;
    let per_batch = (batch.len() / frame_len) as u32;
    let mut left = order.count;
    while left > 0 {
        let n = left.min(per_batch);
        if conn
            .write_all(&batch[..n as usize * frame_len])
            .await
            .is_err()
        {
            return Ended::Broken;
        }
        left -= n;
        if !tally.messages(n.into()) {
            return Ended::Stopped;
        }
    }
    let mut answer = [0u8; 16];
    let answered = async {
        conn.write_all(&END_OF_STREAM.to_be_bytes()).await?;
        conn.read_exact(&mut answer).await
    };
    match answered.await {
        Ok(_) => Ended::Marker(
            UploadTally::decode(&answer) == Some(UploadTally::of(order.count, order.size as usize)),
        ),
        Err(_) => Ended::Broken,
    }
}

/// Reads one stream's frames from `conn` through `input`, checking each message against
/// `expected`.
async fn take_stream(
    conn: &mut TcpStream,
    input: &mut BytesMut,
    count: u32,
    expected: &[u8],
    tally: &StreamTally,
) -> Ended {
    let mut taken = 0u32;
    loop {
        // Every complete frame in the buffer, then one advance past them.
        let mut at = 0;
        let mut ended = None;
        let mut wanted = 4;
        while input.len() - at >= 4 {
            let len = u32::from_be_bytes([input[at], input[at + 1], input[at + 2], input[at + 3]]);
            if len == END_OF_STREAM {
                at += 4;
                ended = Some(Ended::Marker(taken == count));
                break;
            }
            let len = len as usize;
            if len > MAX_FRAME {
                ended = Some(Ended::Broken);
                break;
            }
            if input.len() - at - 4 < len {
                wanted = 4 + len;
                break;
            }
            let frame = &input[at + 4..at + 4 + len];
            at += 4 + len;
            if frame != expected {
                ended = Some(Ended::Broken);
                break;
            }
            taken += 1;
            if !tally.message() {
                ended = Some(Ended::Stopped);
                break;
            }
        }
        input.advance(at);
        if let Some(ended) = ended {
            return ended;
        }
        input.reserve(wanted.max(STREAM_BATCH));
        match conn.read_buf(input).await {
            Ok(0) | Err(_) => return Ended::Broken,
            Ok(_) => {}
        }
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// One connection of `--idle-connections`: a connection that has echoed one frame of
/// `payload`. Holding the stream holds the connection.
pub async fn idle_connection(addr: SocketAddr, payload: &Bytes) -> Result<TcpStream, String> {
    let mut conn = connect(addr)
        .await
        .map_err(|e| format!("raw connect: {e}"))?;
    let mut frame = BytesMut::with_capacity(4 + payload.len());
    frame.put_u32(payload.len() as u32);
    frame.extend_from_slice(payload);
    let mut reply = vec![0u8; payload.len()];
    let echoed: std::io::Result<bool> = async {
        conn.write_all(&frame).await?;
        if conn.read_u32().await? as usize != payload.len() {
            return Ok(false);
        }
        conn.read_exact(&mut reply).await?;
        Ok(reply[..] == payload[..])
    }
    .await;
    match echoed {
        Ok(true) => Ok(conn),
        Ok(false) => Err("raw echo: the reply is not the payload".to_owned()),
        Err(e) => Err(format!("raw echo: {e}")),
    }
}

/// `p.concurrency` stream tasks, each with its own connection, connected up front.
pub async fn stream_callers(p: &ClientParams) -> Result<Vec<RawStreamCaller>, String> {
    let order = DownloadOrder {
        count: p.stream_messages,
        size: p.payload.len() as u32,
    };
    let upload_batch = (p.workload == Workload::Upload).then(|| {
        let frame_len = 4 + p.payload.len();
        let mut batch = BytesMut::new();
        for _ in 0..(STREAM_BATCH / frame_len).max(1) {
            batch.put_u32(p.payload.len() as u32);
            batch.extend_from_slice(&p.payload);
        }
        batch.freeze()
    });
    let mut callers = Vec::with_capacity(p.concurrency);
    for _ in 0..p.concurrency {
        let conn = connect(p.addr)
            .await
            .map_err(|e| format!("raw connect: {e}"))?;
        callers.push(RawStreamCaller {
            addr: p.addr,
            conn: Some(conn),
            order,
            expected: p.payload.clone(),
            input: BytesMut::with_capacity(4 * STREAM_BATCH),
            upload_batch: upload_batch.clone(),
        });
    }
    Ok(callers)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::systems::stream_loop_tokio;

    fn params(addr: SocketAddr, payload: Bytes, messages: u32) -> ClientParams {
        ClientParams {
            addr,
            workload: Workload::Stream,
            concurrency: 2,
            connections: 1,
            payload,
            stream_messages: messages,
            stream_window: None,
            connection_window: None,
            warmup: Duration::ZERO,
            secs: Duration::from_millis(200),
            threads: 1,
        }
    }

    #[tokio::test]
    async fn raw_streams_deliver_every_message_and_stop_cleanly() {
        let addr = serve(Workload::Stream).await.expect("serves");
        // Many messages to a batch and streams that are not a whole number of batches; one
        // message to a batch, split over reads; a stream far longer than the run, cut short.
        for (size, messages) in [(64, 1001), (100_000, 7), (1024, u32::MAX)] {
            let p = params(addr, make_payload(size), messages);
            let callers = stream_callers(&p).await.expect("connects");
            let measured = stream_loop_tokio(callers, Window::starting_now(p.warmup, p.secs)).await;
            assert_eq!(measured.errors, 0, "{size} B: {measured:?}");
            assert!(measured.messages > 0, "{size} B: {measured:?}");
        }
    }

    #[tokio::test]
    async fn raw_uploads_are_counted_and_stop_cleanly() {
        let addr = serve(Workload::Upload).await.expect("serves");
        for (size, messages) in [(64, 1001), (100_000, 7), (1024, u32::MAX)] {
            let mut p = params(addr, make_payload(size), messages);
            p.workload = Workload::Upload;
            let callers = stream_callers(&p).await.expect("connects");
            let measured = stream_loop_tokio(callers, Window::starting_now(p.warmup, p.secs)).await;
            assert_eq!(measured.errors, 0, "{size} B: {measured:?}");
            assert!(measured.messages > 0, "{size} B: {measured:?}");
        }
    }

    #[tokio::test]
    async fn a_wrong_upload_tally_fails_the_upload() {
        // A server that reads to the end marker and answers one message short.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            while !seen.ends_with(&END_OF_STREAM.to_be_bytes()) {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client wrote no end marker");
                seen.extend_from_slice(&buf[..n]);
            }
            let short = UploadTally::of(9, 64);
            conn.write_all(&short.encode()).await.unwrap();
        });
        let mut p = params(addr, make_payload(64), 10);
        p.workload = Workload::Upload;
        let mut caller = stream_callers(&p).await.expect("connects").remove(0);
        let tally = Arc::new(StreamTally::new(Arc::default()));
        assert!(!caller.stream(&tally).await, "a short count is an error");
        assert_eq!(tally.total(), 10);
    }

    #[tokio::test]
    async fn a_wrong_message_fails_the_stream() {
        let addr = serve(Workload::Stream).await.expect("serves");
        let mut p = params(addr, Bytes::from(vec![7u8; 64]), 10);
        p.secs = Duration::from_millis(50);
        let callers = stream_callers(&p).await.expect("connects");
        let measured = stream_loop_tokio(callers, Window::starting_now(p.warmup, p.secs)).await;
        assert_eq!(measured.messages, 0, "{measured:?}");
        assert!(measured.errors > 0, "{measured:?}");
    }
}
