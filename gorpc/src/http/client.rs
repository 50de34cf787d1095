//! The client side: calls as HTTP/1.1 requests through hyper's client, over kept-alive
//! connections, one call at a time on each.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use gorpc_proto::{Code, Status};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, Uri};
use hyper::client::conn::http1::SendRequest;

use super::body::{read_body, BodyError, EdgeBody};
use super::rt::HyperIo;
use super::{
    code_for_http_status, is_header_value, is_token, percent_decode, ContentType, MESSAGE_HEADER,
    METADATA_PREFIX, STATUS_HEADER, TIMEOUT_HEADER,
};
use crate::client::{Channel, Client, ClientConfig, ConnectionConfig, OutgoingCall, RawResponse};
use crate::metadata::Metadata;
use crate::runtime::{timeout, Io, Runtime};

/// Idle connections a channel keeps for reuse; more are closed after their call.
const MAX_IDLE: usize = 16;
/// Longest pause inside an answer's body before the call fails.
const BODY_IDLE: Duration = Duration::from_secs(60);

/// Where an HTTP client sends its calls: an address, or a host name and port resolved at
/// each new connection. The `Host` header names it as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpTarget {
    /// An address, connected as it is.
    Addr(SocketAddr),
    /// A host name, resolved at each new connection.
    Host {
        /// The name, as the `Host` header carries it.
        name: String,
        /// The TCP port.
        port: u16,
    },
}

impl HttpTarget {
    /// `name:port`; an IP address stays an address.
    pub fn host(name: impl Into<String>, port: u16) -> Self {
        let name = name.into();
        match name.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => HttpTarget::Addr(SocketAddr::new(ip, port)),
            Err(_) => HttpTarget::Host { name, port },
        }
    }

    /// The addresses to try, resolving a host name off the caller's task (name lookup
    /// blocks, and no runtime is assumed).
    pub(crate) async fn resolve(&self) -> Result<Vec<SocketAddr>, Status> {
        let (name, port) = match self {
            HttpTarget::Addr(addr) => return Ok(vec![*addr]),
            HttpTarget::Host { name, port } => (name.clone(), *port),
        };
        let (tx, rx) = futures::channel::oneshot::channel();
        let lookup = name.clone();
        std::thread::Builder::new()
            .name("gorpc-resolve".into())
            .spawn(move || {
                use std::net::ToSocketAddrs;
                let _ = tx.send(
                    (lookup.as_str(), port)
                        .to_socket_addrs()
                        .map(Vec::from_iter),
                );
            })
            .map_err(|e| {
                Status::unavailable(format!("cannot resolve {name}: {e}")).with_source(e)
            })?;
        match rx.await {
            Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            Ok(Ok(_)) => Err(Status::new(
                Code::Unavailable,
                format!("{name} has no address"),
            )),
            Ok(Err(e)) => {
                Err(Status::unavailable(format!("cannot resolve {name}: {e}")).with_source(e))
            }
            Err(_) => Err(Status::new(
                Code::Unavailable,
                format!("cannot resolve {name}"),
            )),
        }
    }
}

impl fmt::Display for HttpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpTarget::Addr(addr) => write!(f, "{addr}"),
            HttpTarget::Host { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl From<SocketAddr> for HttpTarget {
    fn from(addr: SocketAddr) -> Self {
        HttpTarget::Addr(addr)
    }
}

impl FromStr for HttpTarget {
    type Err = Status;

    /// `host:port` or `ip:port` (`[v6]:port`).
    fn from_str(s: &str) -> Result<Self, Status> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(HttpTarget::Addr(addr));
        }
        let invalid = || Status::new(Code::InvalidArgument, format!("{s:?} is not host:port"));
        let (name, port) = s.rsplit_once(':').ok_or_else(invalid)?;
        let port = port.parse::<u16>().map_err(|_| invalid())?;
        if name.is_empty() || name.contains(['/', ' ', '@']) {
            return Err(invalid());
        }
        Ok(HttpTarget::host(name, port))
    }
}

/// Sends calls to one server as HTTP/1.1 requests (see [`crate::http`]). Each connection
/// carries one call at a time and is kept for the next; calls made at once open
/// connections of their own. Put it behind [`Client::from_channel`], or use
/// [`Client::http`].
pub struct HttpChannel<R: Runtime> {
    shared: Arc<ChannelShared<R>>,
}

impl<R: Runtime> fmt::Debug for HttpChannel<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpChannel")
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

struct ChannelShared<R: Runtime> {
    runtime: R,
    target: HttpTarget,
    /// The `Host` header.
    host: HeaderValue,
    /// Connect timeout, limits and TLS.
    config: ConnectionConfig,
    idle: Mutex<Vec<SendRequest<EdgeBody>>>,
}

impl<R: Runtime> HttpChannel<R> {
    /// A channel to `target`, with the connect timeout, limits and TLS (HTTPS) of `config`.
    pub fn new(runtime: R, target: impl Into<HttpTarget>, config: ConnectionConfig) -> Self {
        let target = target.into();
        let host = HeaderValue::from_str(&target.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        HttpChannel {
            shared: Arc::new(ChannelShared {
                runtime,
                target,
                host,
                config,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl<R: Runtime> Channel for HttpChannel<R> {
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.send(call).await })
    }
}

impl Client {
    /// A client that sends its calls to `target` (an address, or an [`HttpTarget`] host
    /// name and port) as HTTP/1.1 requests (see [`crate::http`]) instead of over the binary
    /// protocol, with the connect timeout, limits, TLS (HTTPS, when
    /// `config.pool.connection.tls` is set) and default timeout of `config`.
    pub fn http<R: Runtime>(
        runtime: R,
        target: impl Into<HttpTarget>,
        config: ClientConfig,
    ) -> Client {
        let channel = HttpChannel::new(runtime.clone(), target, config.pool.connection.clone());
        Client::of_channel(runtime, channel, &config)
    }
}

impl<R: Runtime> ChannelShared<R> {
    async fn send(&self, call: OutgoingCall) -> Result<RawResponse, Status> {
        let content_type = ContentType::from_codec(call.codec).ok_or_else(|| {
            Status::new(
                Code::InvalidArgument,
                format!("codec {} has no HTTP content type", call.codec),
            )
        })?;
        // Refuse what the server's limits (assumed equal to ours) would refuse.
        let max = self.config.conn.limits.max_frame_len as usize;
        if call.body.len() > max {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "request body of {} bytes is over the limit of {max} bytes",
                    call.body.len()
                ),
            ));
        }
        let request = self.request(&call, content_type)?;
        let exchange = self.exchange(request, call.codec);
        match call.deadline {
            None => exchange.await,
            Some(deadline) => timeout(&self.runtime, deadline, exchange)
                .await
                .unwrap_or_else(|| Err(deadline_exceeded())),
        }
    }

    /// The request for `call`. Fails for calls HTTP cannot carry.
    fn request(
        &self,
        call: &OutgoingCall,
        content_type: ContentType,
    ) -> Result<Request<EdgeBody>, Status> {
        let uri = Uri::try_from(&*call.method)
            .ok()
            .filter(|uri| uri.scheme().is_none() && call.method.starts_with('/'))
            .ok_or_else(|| {
                Status::new(
                    Code::InvalidArgument,
                    format!("method {:?} is not a path HTTP can carry", call.method),
                )
            })?;
        let mut request = Request::new(EdgeBody::full(call.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(content_type.as_str()),
        );
        if let Some(deadline) = call.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(deadline_exceeded());
            }
            // Rounded up, so the server never gives up before the client.
            let millis = left.as_nanos().div_ceil(1_000_000);
            headers.insert(TIMEOUT_HEADER, HeaderValue::from(millis as u64));
        }
        for (key, value) in call.metadata.iter() {
            let header = (is_token(key.as_bytes()) && is_header_value(value))
                .then(|| {
                    let name = format!("{METADATA_PREFIX}{key}").to_ascii_lowercase();
                    let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
                    Some((name, HeaderValue::from_bytes(value).ok()?))
                })
                .flatten();
            let Some((name, value)) = header else {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "metadata {key:?} cannot travel as an HTTP header (a key must be a \
                         token, a value printable without surrounding blanks)"
                    ),
                ));
            };
            headers.append(name, value);
        }
        Ok(request)
    }

    async fn exchange(&self, request: Request<EdgeBody>, codec: u8) -> Result<RawResponse, Status> {
        let failed = |e: &hyper::Error| {
            Status::new(
                Code::Unavailable,
                format!("HTTP request failed: {}", super::server::error_chain(e)),
            )
        };
        let (sender, response) = match self.reuse().await {
            Some(mut sender) => match sender.try_send_request(request).await {
                Ok(response) => (sender, response),
                // The kept connection closed before the request left (the server timed
                // it out): the request goes on a new one.
                Err(mut e) => match e.take_message() {
                    Some(request) => {
                        let mut sender = self.connect().await?;
                        let response = sender.send_request(request).await;
                        (sender, response.map_err(|e| failed(&e))?)
                    }
                    None => return Err(failed(e.error())),
                },
            },
            None => {
                let mut sender = self.connect().await?;
                let response = sender.send_request(request).await;
                (sender, response.map_err(|e| failed(&e))?)
            }
        };
        let (parts, body) = response.into_parts();
        let max = self.config.conn.limits.max_frame_len as usize;
        let body = read_body(&self.runtime, body, max, None, BODY_IDLE)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge => Status::new(
                    Code::ResourceExhausted,
                    format!("answer body over the limit of {max} bytes"),
                ),
                other => Status::new(
                    Code::Unavailable,
                    format!("reading the answer failed: {other}"),
                ),
            })?;
        // The answer is read whole: the connection can carry the next call.
        if !sender.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
        }
        answer(parts.status.as_u16(), &parts.headers, body, codec)
    }

    /// An idle connection that is still open, if there is one. One just put back may not
    /// be ready yet (its driver has yet to see the last answer end): it is waited for,
    /// which ends at once if it closed.
    async fn reuse(&self) -> Option<SendRequest<EdgeBody>> {
        loop {
            let mut sender = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// A new connection, its driver running on the runtime.
    async fn connect(&self) -> Result<SendRequest<EdgeBody>, Status> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let addrs = match timeout(&self.runtime, deadline, self.target.resolve()).await {
            Some(addrs) => addrs?,
            None => {
                return Err(
                    Status::unavailable(format!("resolving {} timed out", self.target))
                        .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                )
            }
        };
        let mut failure = None;
        for addr in addrs {
            match self.connect_to(addr, deadline).await {
                Ok(sender) => return Ok(sender),
                Err(status) => failure = Some(status),
            }
        }
        Err(failure.unwrap_or_else(|| Status::new(Code::Unavailable, "no address to connect to")))
    }

    async fn connect_to(
        &self,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<SendRequest<EdgeBody>, Status> {
        let connected =
            crate::client::connect_socket(&self.runtime, addr, deadline, &self.config).await?;
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.config.tls {
            let (runtime, tls) = (&self.runtime, tls.clone());
            let session =
                crate::client::tls_connect(runtime, connected, addr, deadline, tls, &self.config);
            return self.handshake(session.await?).await;
        }
        self.handshake(connected).await
    }

    async fn handshake<I: Io>(&self, io: I) -> Result<SendRequest<EdgeBody>, Status> {
        let io = HyperIo::new(io, bytes::BytesMut::new());
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| {
                Status::unavailable(format!("HTTP handshake failed: {e}")).with_source(e)
            })?;
        let gauge = crate::observe::ConnectionGauge::new(crate::observe::Side::Client);
        self.runtime.spawn(async move {
            let _gauge = gauge;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP client connection ended");
            }
        });
        Ok(sender)
    }
}

/// The call's result from an answer's status, headers and body.
fn answer(
    http: u16,
    headers: &HeaderMap,
    body: Bytes,
    request_codec: u8,
) -> Result<RawResponse, Status> {
    let code = match headers.get(STATUS_HEADER) {
        Some(value) => {
            let code = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    Status::new(
                        Code::Internal,
                        format!("malformed HTTP answer: bad {STATUS_HEADER}"),
                    )
                })?;
            Code::from_u32(code)
        }
        None => code_for_http_status(http),
    };
    if code != Code::Ok {
        let message = match headers.get(MESSAGE_HEADER) {
            Some(message) => percent_decode(message.as_bytes()),
            None => format!("HTTP status {http}"),
        };
        return Err(Status::new(code, message));
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| ContentType::parse(v.as_bytes()));
    let codec = match content_type {
        Some(content_type) => content_type.codec(),
        None if body.is_empty() => request_codec,
        None => {
            return Err(Status::new(
                Code::Internal,
                "answer without a known Content-Type",
            ))
        }
    };
    let metadata = headers
        .iter()
        .filter_map(|(name, value)| {
            let key = name.as_str().strip_prefix(METADATA_PREFIX)?;
            (!key.is_empty()).then(|| (key.to_owned(), Bytes::copy_from_slice(value.as_bytes())))
        })
        .collect::<Metadata>();
    Ok(RawResponse {
        codec,
        metadata,
        body,
    })
}

fn deadline_exceeded() -> Status {
    Status::new(Code::DeadlineExceeded, "deadline exceeded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_addresses_and_host_names() {
        assert_eq!(
            "127.0.0.1:80".parse::<HttpTarget>().unwrap(),
            HttpTarget::Addr("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "[::1]:8080".parse::<HttpTarget>().unwrap(),
            HttpTarget::Addr("[::1]:8080".parse().unwrap())
        );
        assert_eq!(
            "localhost:9000".parse::<HttpTarget>().unwrap(),
            HttpTarget::host("localhost", 9000)
        );
        assert_eq!(
            HttpTarget::host("localhost", 9000).to_string(),
            "localhost:9000"
        );
        for bad in ["localhost", "host:port", ":80", "a b:1", "http://x:1"] {
            assert!(bad.parse::<HttpTarget>().is_err(), "{bad}");
        }
    }
}
