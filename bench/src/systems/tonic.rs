//! tonic (gRPC over HTTP/2): one `tonic::transport::Server`; one `Channel` per connection,
//! shared round robin by the callers. Code generated from proto/bench.proto by build.rs.

use std::net::SocketAddr;

use ::tonic::transport::server::TcpIncoming;
use ::tonic::transport::{Channel, Endpoint, Server};
use ::tonic::{Request, Response, Status};
use bytes::Bytes;

use super::{greeting, ClientParams, Workload, HELLO_NAME};
use crate::loadgen::Caller;

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    ::tonic::include_proto!("bench");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, HelloReply, HelloRequest};

#[derive(Debug, Default)]
struct EchoService;

#[::tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            payload: request.into_inner().payload,
        }))
    }

    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            message: greeting(&request.into_inner().name),
        }))
    }
}

/// Binds 127.0.0.1:0 and serves in a background task. Both workloads are served; the
/// workload only picks what clients call.
pub async fn serve(_workload: Workload) -> std::io::Result<SocketAddr> {
    let incoming =
        TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?.with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("tonic server: {e}");
        }
    });
    Ok(addr)
}

pub enum TonicCaller {
    Echo {
        client: EchoClient<Channel>,
        payload: Bytes,
    },
    Hello {
        client: EchoClient<Channel>,
        name: String,
        expected: String,
    },
}

impl Caller for TonicCaller {
    async fn call(&mut self) -> bool {
        match self {
            TonicCaller::Echo { client, payload } => {
                let request = EchoRequest {
                    payload: payload.clone(),
                };
                match client.echo(request).await {
                    Ok(rsp) => rsp.into_inner().payload == *payload,
                    Err(_) => false,
                }
            }
            TonicCaller::Hello {
                client,
                name,
                expected,
            } => {
                let request = HelloRequest { name: name.clone() };
                match client.say_hello(request).await {
                    Ok(rsp) => rsp.into_inner().message == *expected,
                    Err(_) => false,
                }
            }
        }
    }
}

/// One HTTP/2 channel per connection, connected up front; caller `i` uses channel
/// `i % connections`.
pub async fn callers(p: &ClientParams) -> Result<Vec<TonicCaller>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{}", p.addr))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("tonic connect: {e}"))?,
        );
    }
    Ok((0..p.concurrency)
        .map(|i| {
            let client = EchoClient::new(channels[p.conn_of(i)].clone());
            match p.workload {
                Workload::Echo => TonicCaller::Echo {
                    client,
                    payload: p.payload.clone(),
                },
                Workload::Hello => TonicCaller::Hello {
                    client,
                    name: HELLO_NAME.to_owned(),
                    expected: greeting(HELLO_NAME),
                },
            }
        })
        .collect())
}
