//! A connection made without any runtime: a blocking socket framed by the sans-IO client
//! core, so that a process measuring the server's memory counts (nearly) only the server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gorpc::proto::{codec, CallHead, ClientConn, ClientEvent, Conn as _, ConnConfig};

/// A connection that has made one unary call of `method` with a 1 KiB raw body and read
/// its answer, framed by gorpc's own client core (as gorpc's client sends it). Each read
/// waits at most `read_timeout`.
pub fn called_once(addr: SocketAddr, method: &str, read_timeout: Duration) -> TcpStream {
    let mut socket = TcpStream::connect(addr).expect("connects");
    socket.set_read_timeout(Some(read_timeout)).unwrap();
    let now = Instant::now();
    let mut conn = ClientConn::<()>::new(ConnConfig::default(), now);
    let head = CallHead {
        method,
        codec: codec::RAW,
        deadline: None,
        metadata: std::iter::empty(),
    };
    conn.start_call(now, head, &[0x5au8; 1024], ())
        .expect("the call starts");
    while let Some(bytes) = conn.poll_transmit() {
        socket.write_all(&bytes).expect("sends the call");
    }
    let mut read = BytesMut::new();
    loop {
        while let Some(event) = conn.poll_event() {
            if let ClientEvent::Finished { result, .. } = event {
                result.expect("an answer");
                return socket;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).expect("an answer");
        assert!(n > 0, "the server closed before answering");
        read.extend_from_slice(&chunk[..n]);
        conn.handle_read(Instant::now(), &mut read);
    }
}
