//! The ceiling: a pipelined, length-prefixed TCP echo on tokio with no RPC layer at all.
//!
//! Frames are a big-endian `u32` length and that many bytes. The server echoes each frame
//! (or, for the hello workload, answers `name` with `"Hello " + name`), writing everything
//! it has for a connection once its read buffer is drained. The client keeps
//! `concurrency / connections` requests in flight per connection: a writer refills the
//! window, a reader matches replies to send times first in, first out.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{greeting, ClientParams, Workload, HELLO_NAME, NO_STREAMS};
use crate::loadgen::{take_recorder, Measurement, Recorder, Window, GRACE};

/// Frames longer than this close the connection.
const MAX_FRAME: usize = 64 << 20;

/// Binds 127.0.0.1:0 and serves in a background task, one task per connection.
pub async fn serve(workload: Workload) -> std::io::Result<SocketAddr> {
    if workload == Workload::Stream {
        return Err(std::io::Error::other(NO_STREAMS));
    }
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve_conn(stream, workload).await {
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
                Workload::Stream => unreachable!("serve refuses the stream workload"),
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

/// Runs the pipelined load over `p.connections` connections.
pub async fn run(p: &ClientParams) -> Result<Measurement, String> {
    let (request, expected) = match p.workload {
        Workload::Echo => (p.payload.clone(), p.payload.clone()),
        Workload::Hello => (
            Bytes::from_static(HELLO_NAME.as_bytes()),
            Bytes::from(greeting(HELLO_NAME)),
        ),
        Workload::Stream => return Err(NO_STREAMS.to_owned()),
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
