//! tarpc over its serde transport on TCP, with bincode framing
//! (`tokio_serde::formats::Bincode`, tarpc's `serde-transport-bincode` feature). One client
//! per connection, shared round robin by the callers. Calls use `context::current()`, whose
//! deadline is 10 s away.

use std::net::SocketAddr;

use ::tarpc::client;
use ::tarpc::context;
use ::tarpc::serde_transport::tcp;
use ::tarpc::server::incoming::{spawn_incoming, Incoming};
use ::tarpc::server::BaseChannel;
use ::tarpc::tokio_serde::formats::Bincode;
use futures::StreamExt;

use super::{greeting, ClientParams, System, Workload, HELLO_NAME};
use crate::loadgen::Caller;

/// Frames up to this size; tarpc's length-delimited codec defaults to 8 MiB.
const MAX_FRAME: usize = 64 << 20;

#[::tarpc::service]
pub trait Echo {
    async fn echo(payload: Vec<u8>) -> Vec<u8>;
    async fn say_hello(name: String) -> String;
}

#[derive(Clone)]
struct EchoServer;

impl Echo for EchoServer {
    async fn echo(self, _: context::Context, payload: Vec<u8>) -> Vec<u8> {
        payload
    }

    async fn say_hello(self, _: context::Context, name: String) -> String {
        greeting(&name)
    }
}

/// Binds 127.0.0.1:0 and serves in a background task; every channel and every request gets
/// its own task, as tarpc's examples do.
pub async fn serve(workload: Workload) -> std::io::Result<SocketAddr> {
    if let Some(why) = refused(workload) {
        return Err(std::io::Error::other(why));
    }
    let mut incoming = tcp::listen(SocketAddr::from(([127, 0, 0, 1], 0)), Bincode::default).await?;
    incoming.config_mut().max_frame_length(MAX_FRAME);
    let addr = incoming.local_addr();
    let channels = incoming
        .filter_map(|accepted| async move {
            let transport = accepted.ok()?;
            // Like every other system here (and like gorpc), no Nagle delay.
            let _ = transport.get_ref().set_nodelay(true);
            Some(BaseChannel::with_defaults(transport))
        })
        .execute(EchoServer.serve());
    tokio::spawn(spawn_incoming(channels));
    Ok(addr)
}

pub enum TarpcCaller {
    Echo {
        client: EchoClient,
        payload: Vec<u8>,
    },
    Hello {
        client: EchoClient,
        name: String,
        expected: String,
    },
}

impl Caller for TarpcCaller {
    async fn call(&mut self) -> bool {
        match self {
            TarpcCaller::Echo { client, payload } => {
                match client.echo(context::current(), payload.clone()).await {
                    Ok(reply) => reply == *payload,
                    Err(_) => false,
                }
            }
            TarpcCaller::Hello {
                client,
                name,
                expected,
            } => match client.say_hello(context::current(), name.clone()).await {
                Ok(reply) => reply == *expected,
                Err(_) => false,
            },
        }
    }
}

/// One tarpc client (one TCP connection, its dispatch task spawned) per connection; caller
/// `i` uses client `i % connections`.
pub async fn callers(p: &ClientParams) -> Result<Vec<TarpcCaller>, String> {
    if let Some(why) = refused(p.workload) {
        return Err(why.to_owned());
    }
    let mut clients = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        clients.push(connect(p.addr).await?);
    }
    Ok((0..p.concurrency)
        .map(|i| {
            let client = clients[p.conn_of(i)].clone();
            match p.workload {
                Workload::Echo => TarpcCaller::Echo {
                    client,
                    payload: p.payload.to_vec(),
                },
                Workload::Hello => TarpcCaller::Hello {
                    client,
                    name: HELLO_NAME.to_owned(),
                    expected: greeting(HELLO_NAME),
                },
                Workload::Stream | Workload::Upload | Workload::Http => {
                    unreachable!("refused above")
                }
            }
        })
        .collect())
}

/// One connection of `--idle-connections`: a client of its own that has made one echo call
/// of `payload`. Holding the client holds the connection (and its dispatch task).
pub async fn idle_connection(addr: SocketAddr, payload: &[u8]) -> Result<EchoClient, String> {
    let client = connect(addr).await?;
    let reply = client
        .echo(context::current(), payload.to_vec())
        .await
        .map_err(|e| format!("tarpc echo: {e}"))?;
    if reply != payload {
        return Err("tarpc echo: the reply is not the payload".to_owned());
    }
    Ok(client)
}

/// A client on a TCP connection of its own, its dispatch task spawned.
async fn connect(addr: SocketAddr) -> Result<EchoClient, String> {
    let mut connect = tcp::connect(addr, Bincode::default);
    connect.config_mut().max_frame_length(MAX_FRAME);
    let transport = connect.await.map_err(|e| format!("tarpc connect: {e}"))?;
    transport
        .get_ref()
        .set_nodelay(true)
        .map_err(|e| e.to_string())?;
    Ok(EchoClient::new(client::Config::default(), transport).spawn())
}

/// Why tarpc does not run `workload`, if it does not.
fn refused(workload: Workload) -> Option<&'static str> {
    if System::Tarpc.runs(workload) {
        None
    } else {
        workload.not_run()
    }
}
