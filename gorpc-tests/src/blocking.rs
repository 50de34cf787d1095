//! Connections made without any runtime: a blocking socket framed by the sans-IO client
//! core, so that a process measuring the server's memory counts (nearly) only the server,
//! and a process holding thousands of connections needs no task per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gorpc::proto::{codec, CallHead, ClientConn, ClientEvent, Conn as _, ConnConfig};

/// How a call on a [`BlockingConn`] went wrong.
#[derive(Debug)]
pub enum CallError {
    /// The server answered with an error status, or the client core ended the call.
    Status(gorpc::Status),
    /// The socket failed, or closed before the answer (or a read waited too long).
    Io(std::io::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Status(s) => write!(f, "{s}"),
            CallError::Io(e) => write!(f, "socket: {e}"),
        }
    }
}

/// One connection to a gorpc server over a blocking socket, making one unary call at a
/// time with a body already encoded (raw unless [`with_codec`](Self::with_codec) says
/// otherwise), framed by gorpc's own client core (as gorpc's client sends it). The core
/// answers the server's keepalive pings whenever the connection reads.
pub struct BlockingConn {
    socket: TcpStream,
    conn: ClientConn<()>,
    read: BytesMut,
    codec: u8,
}

impl BlockingConn {
    /// Connects; each read then waits at most `read_timeout`.
    pub fn connect(addr: SocketAddr, read_timeout: Duration) -> std::io::Result<BlockingConn> {
        let socket = TcpStream::connect(addr)?;
        socket.set_read_timeout(Some(read_timeout))?;
        socket.set_nodelay(true)?;
        Ok(BlockingConn {
            socket,
            conn: ClientConn::new(ConnConfig::default(), Instant::now()),
            read: BytesMut::new(),
            codec: codec::RAW,
        })
    }

    /// Calls carry bodies of `codec` (a [`codec`] id).
    pub fn with_codec(mut self, codec: u8) -> Self {
        self.codec = codec;
        self
    }

    /// Calls `method` with `body` and waits for its answer's body.
    pub fn call(&mut self, method: &str, body: &[u8]) -> Result<Bytes, CallError> {
        self.send(method, body)?;
        self.answer()
    }

    /// Waits for the answer to the call sent (by [`send`](Self::send), or [`frame`](Self::frame)
    /// and a write of its bytes) and returns its body.
    pub fn answer(&mut self) -> Result<Bytes, CallError> {
        loop {
            while let Some(event) = self.conn.poll_event() {
                if let ClientEvent::Finished { result, .. } = event {
                    return match result {
                        Ok(response) if response.status.is_ok() => Ok(response.body),
                        Ok(response) => Err(CallError::Status(response.status)),
                        Err(status) => Err(CallError::Status(status)),
                    };
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.socket.read(&mut chunk).map_err(CallError::Io)?;
            if n == 0 {
                return Err(CallError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.read.extend_from_slice(&chunk[..n]);
            self.conn.handle_read(Instant::now(), &mut self.read);
            // Pongs, window updates.
            self.flush()?;
        }
    }

    /// Sends a call of `method` with `body` without waiting for its answer.
    pub fn send(&mut self, method: &str, body: &[u8]) -> Result<(), CallError> {
        let bytes = self.frame(method, body)?;
        self.socket.write_all(&bytes).map_err(CallError::Io)
    }

    /// Starts a call of `method` with `body` in the client core and returns its bytes,
    /// with whatever else the core had to send, without sending them (a fault may send
    /// part of them).
    pub fn frame(&mut self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        let head = CallHead {
            method,
            codec: self.codec,
            deadline: None,
            metadata: std::iter::empty(),
        };
        self.conn
            .start_call(Instant::now(), head, body, ())
            .map_err(|rejected| CallError::Status(rejected.status))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = self.conn.poll_transmit() {
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    fn flush(&mut self) -> Result<(), CallError> {
        while let Some(bytes) = self.conn.poll_transmit() {
            self.socket.write_all(&bytes).map_err(CallError::Io)?;
        }
        Ok(())
    }

    /// The socket, for faults the client core would not make.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }

    /// Gives up the framing and keeps the socket.
    pub fn into_socket(self) -> TcpStream {
        self.socket
    }
}

/// A connection that has made one unary call of `method` with a 1 KiB raw body and read
/// its answer. Each read waits at most `read_timeout`; any failure panics.
pub fn called_once(addr: SocketAddr, method: &str, read_timeout: Duration) -> TcpStream {
    let mut conn = BlockingConn::connect(addr, read_timeout).expect("connects");
    conn.call(method, &[0x5au8; 1024]).expect("an answer");
    conn.into_socket()
}
