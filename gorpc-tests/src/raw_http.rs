//! HTTP/1.1 by hand over blocking sockets: requests written byte for byte (including the
//! malformed and hostile ones no HTTP client would send) and answers read as they come.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use futures::channel::oneshot;

/// One HTTP response as a test reads it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `x-gorpc-status` code.
    pub fn gorpc_status(&self) -> u32 {
        self.header("x-gorpc-status")
            .unwrap_or_else(|| panic!("no x-gorpc-status in {self:?}"))
            .parse()
            .unwrap()
    }

    /// The `x-gorpc-message`.
    pub fn gorpc_message(&self) -> &str {
        self.header("x-gorpc-message")
            .unwrap_or_else(|| panic!("no x-gorpc-message in {self:?}"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// What [`raw_http`] saw: the replies, and whether the server then closed the connection.
pub type Exchange = std::io::Result<(Vec<HttpReply>, bool)>;

/// What a raw exchange expects back.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// Answers to read, in order; `true` for an answer to HEAD (a head without its body).
    pub replies: &'static [bool],
    /// Then read on to learn whether the server closes (within 5 s).
    pub check_close: bool,
}

/// `n` answers to requests other than HEAD.
pub const fn replies(n: usize) -> &'static [bool] {
    const FALSES: [bool; 64] = [false; 64];
    assert!(n <= 64);
    FALSES.split_at(n).0
}

/// On one blocking TCP connection (in a thread of its own): writes `request`, reads the
/// answers `expect` names, then, if asked, whether the server closes.
pub fn raw_http(addr: SocketAddr, request: Vec<u8>, expect: Expect) -> oneshot::Receiver<Exchange> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let mut stream = TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(&request)?;
            let mut reader = BufReader::new(stream);
            let mut got = Vec::new();
            for &head in expect.replies {
                got.push(read_reply(&mut reader, head)?);
            }
            let closed = expect.check_close && closes(&mut reader)?;
            Ok((got, closed))
        })();
        let _ = tx.send(result);
    });
    rx
}

/// Whether the peer closes (EOF or reset) before the read timeout, discarding what comes.
pub fn closes(reader: &mut impl Read) -> std::io::Result<bool> {
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
        Err(e) => Err(e),
    }
}

/// Reads one answer; for an answer to HEAD (`head_only`), the head alone.
pub fn read_reply(reader: &mut impl BufRead, head_only: bool) -> std::io::Result<HttpReply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let text = line.trim_end();
        if text.is_empty() {
            break;
        }
        let (name, value) = text.split_once(':').ok_or_else(|| bad(text))?;
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let reply = HttpReply {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only {
        return Ok(reply);
    }
    let body = if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(reader)?
    } else {
        let len: usize = reply
            .header("content-length")
            .ok_or_else(|| bad("no content-length"))?
            .parse()
            .map_err(|_| bad("bad content-length"))?;
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        body
    };
    Ok(HttpReply { body, ..reply })
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim_end(), 16).map_err(|_| bad(&line))?;
        if size == 0 {
            line.clear();
            reader.read_line(&mut line)?; // the empty line after no trailers
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size + 2, 0);
        reader.read_exact(&mut body[start..])?;
        body.truncate(start + size);
    }
}

/// A POST request for `path`.
pub fn post(path: &str, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A POST request for `path` with a chunked body: `chunks` as they are (size lines, data,
/// trailers and all).
pub fn post_chunked(path: &str, content_type: &str, chunks: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: {content_type}\r\n\
         transfer-encoding: chunked\r\n\r\n{chunks}"
    )
    .into_bytes()
}
