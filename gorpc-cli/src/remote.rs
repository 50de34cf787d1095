//! The server a command talks to: its address, the transport (gorpc's binary protocol or
//! gRPC), the timeout and the request metadata, shared by `call`, `list` and `describe`.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use clap::{Args, ValueEnum};
use gorpc_tokio::{CallOptions, Client, ClientConfig, Metadata, Status, Tokio};

use crate::{Failure, EXIT_CONNECT, EXIT_STATUS};

/// The protocol calls go over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// gorpc's binary protocol.
    #[default]
    Gorpc,
    /// gRPC over HTTP/2: any gRPC server, or a gorpc server with HTTP on (`Server::http()`).
    Grpc,
}

/// The options every command that calls a server takes.
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The protocol to call in.
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value_t)]
    transport: Transport,
    /// Timeout of each call in seconds (default 30), reflection's included; also bounds the
    /// connect (default 5).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Request metadata, KEY=VALUE (repeatable); sent with reflection's calls too.
    #[arg(short = 'H', long = "header", value_name = "KEY=VALUE")]
    headers: Vec<String>,
}

/// A server to call, checked: its addresses resolved, the options parsed.
#[derive(Debug)]
pub struct Remote {
    addrs: Vec<SocketAddr>,
    transport: Transport,
    timeout: Option<Duration>,
    metadata: Metadata,
}

impl Remote {
    pub fn new(addr: &str, args: &RemoteArgs) -> Result<Self, Failure> {
        let metadata = parse_headers(&args.headers)?;
        let timeout = match args.timeout {
            Some(secs) => Some(
                Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|t| !t.is_zero())
                    .ok_or_else(|| {
                        Failure::usage(format!(
                            "--timeout {secs}: expected a positive number of seconds"
                        ))
                    })?,
            ),
            None => None,
        };
        Ok(Remote {
            addrs: resolve(addr)?,
            transport: args.transport,
            timeout,
            metadata,
        })
    }

    /// The options of each call: the timeout and the metadata.
    pub fn options(&self) -> CallOptions {
        CallOptions {
            timeout: self.timeout,
            metadata: self.metadata.clone(),
            ..CallOptions::default()
        }
    }

    /// A client of the first address that accepts a connection.
    pub async fn connect(&self) -> Result<Client, Failure> {
        let mut config = ClientConfig::default();
        if let Some(timeout) = self.timeout {
            config.default_timeout = Some(timeout);
            config.pool.connection.connect_timeout = timeout;
        }
        let mut last = None;
        for &addr in &self.addrs {
            let connected = match self.transport {
                Transport::Gorpc => Client::connect(Tokio::current(), addr, config.clone())
                    .await
                    .map_err(|status| status.message().to_owned()),
                Transport::Grpc => {
                    // `Client::grpc` connects on its first call, where a server that cannot be
                    // reached would read like an UNAVAILABLE answer: a TCP connect first tells
                    // it apart (exit code 3). The probe's connection closes at once.
                    let limit = config.pool.connection.connect_timeout;
                    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
                        Ok(Ok(_probe)) => Ok(Client::grpc(Tokio::current(), addr, config.clone())),
                        Ok(Err(e)) => Err(format!("connect to {addr} failed: {e}")),
                        Err(_) => Err(format!("connect to {addr} timed out after {limit:?}")),
                    }
                }
            };
            match connected {
                Ok(client) => return Ok(client),
                Err(message) => last = Some((addr, message)),
            }
        }
        let (addr, message) = last.expect("resolve returns at least one address");
        Err(Failure {
            exit_code: EXIT_CONNECT,
            message: format!("cannot connect to {addr}: {message}"),
        })
    }
}

/// Runs `work` on a tokio runtime of the current thread.
pub fn block_on(work: impl Future<Output = Result<(), Failure>>) -> Result<(), Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other(format!("cannot start the tokio runtime: {e}")))?
        .block_on(work)
}

/// A non-OK status from the server: exit code 4.
pub fn status_failure(status: Status) -> Failure {
    Failure {
        exit_code: EXIT_STATUS,
        message: format!("{}: {}", status.code(), status.message()),
    }
}

/// `-H key=value` pairs.
fn parse_headers(headers: &[String]) -> Result<Metadata, Failure> {
    let mut metadata = Metadata::new();
    for header in headers {
        match header.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                metadata.append(key.trim().to_owned(), value.to_owned().into_bytes());
            }
            _ => return Err(Failure::usage(format!("-H `{header}`: expected KEY=VALUE"))),
        }
    }
    Ok(metadata)
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, Failure> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Failure::usage(format!("address `{addr}`: {e} (expected HOST:PORT)")))?
        .collect();
    if addrs.is_empty() {
        return Err(Failure::usage(format!(
            "address `{addr}` resolves to nothing"
        )));
    }
    Ok(addrs)
}
