//! Calls over UDP: one request and one response per datagram (docs/PROTOCOL.md, "Datagrams
//! (UDP)"), driven from the sans-IO mapping in [`gorpc_proto::datagram`].
//!
//! [`UdpServer`] serves any [`Service`](crate::Service) (a [`Router`](crate::Router), a
//! generated server) with the same interceptors as TCP, answering each request to the
//! address it came from. [`Client::udp`](crate::Client::udp) gives an ordinary
//! [`Client`](crate::Client) whose calls travel as datagrams through a [`UdpChannel`].
//!
//! A call must fit in one datagram ([`DatagramConfig::max_datagram`], 1,200 bytes by
//! default): a bigger request fails locally with `ResourceExhausted` naming both sizes, a
//! bigger response comes back as that status from the server.
//!
//! # Idempotent calls
//!
//! UDP loses datagrams. A call marked idempotent is sent again, byte for byte, until it is
//! answered or its deadline passes; the server answers a repeat it has already run from its
//! cache instead of running it again. A call is idempotent when its method is listed in
//! [`UdpClientConfig::idempotent_methods`], or when its metadata holds the key
//! [`IDEMPOTENT`] (any value; the key is removed before sending). Any other call is sent once
//! and, if its request or response is lost, fails with `DeadlineExceeded` at its deadline.
//! Every call has one: the call's own, else the client's default timeout.
//!
//! ```no_run
//! # async fn run<R: gorpc::Runtime>(runtime: R) -> Result<(), Box<dyn std::error::Error>> {
//! use gorpc::udp::{UdpClientConfig, UdpServer};
//! use gorpc::{Client, Router, Status};
//!
//! let router = Router::new().msgpack("/echo.Echo/Say", |s: String| async move { Ok::<_, Status>(s) });
//! let server = UdpServer::new(runtime.clone(), router).bind("127.0.0.1:0".parse()?).await?;
//! let config = UdpClientConfig::default().idempotent("/echo.Echo/Say");
//! let client = Client::udp(runtime, server.local_addr(), config).await?;
//! let reply: String = client.call("/echo.Echo/Say", &"hi".to_string()).await?;
//! # Ok(()) }
//! ```

mod client;
mod server;

pub use client::{UdpChannel, UdpClientConfig, IDEMPOTENT};
pub use gorpc_proto::datagram::{DatagramConfig, DatagramServerStats};
pub use server::{UdpServer, UdpServerHandle};

/// Receive buffer of each socket: the largest UDP payload fits, so no datagram is cut.
const RECV_BUF_LEN: usize = 64 * 1024;

/// Datagrams received in one pass of a driver before it turns to its other work.
const RECV_BATCH: usize = 64;

fn recv_buf() -> Box<[u8]> {
    vec![0; RECV_BUF_LEN].into_boxed_slice()
}
