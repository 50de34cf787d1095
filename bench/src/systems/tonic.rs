//! tonic (gRPC over HTTP/2): one `tonic::transport::Server`; one `Channel` per connection,
//! shared round robin by the callers. Code generated from proto/bench.proto by build.rs.
//!
//! The stream workload's `Download` answers with a plain stream that repeats one message:
//! tonic's encoder polls it directly as HTTP/2 flow control allows, with no channel or
//! producer task in between, the cheapest way to feed a tonic server stream. The upload
//! workload's client feeds `Upload` the same way, counting each message as tonic takes it.

use std::net::SocketAddr;
use std::sync::Arc;

use ::tonic::transport::server::TcpIncoming;
use ::tonic::transport::{Channel, Endpoint, Server};
use ::tonic::{Request, Response, Status, Streaming};
use bytes::Bytes;
use futures::stream::{self, Repeat, Take};
use futures::StreamExt;

use super::{greeting, make_payload, ClientParams, UploadTally, Workload, HELLO_NAME};
use crate::loadgen::{Caller, StreamCaller, StreamTally};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    ::tonic::include_proto!("bench");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{Chunk, DownloadRequest, EchoReply, EchoRequest, HelloReply, HelloRequest, UploadReply};

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

    type DownloadStream = Take<Repeat<Result<Chunk, Status>>>;

    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let order = request.into_inner();
        let chunk = Chunk {
            payload: make_payload(order.size as usize),
        };
        // Each item is a clone of `chunk`: a reference count on the same payload.
        Ok(Response::new(
            stream::repeat(Ok(chunk)).take(order.count as usize),
        ))
    }

    async fn upload(
        &self,
        request: Request<Streaming<Chunk>>,
    ) -> Result<Response<UploadReply>, Status> {
        let mut chunks = request.into_inner();
        let mut reply = UploadReply { count: 0, bytes: 0 };
        while let Some(chunk) = chunks.message().await? {
            reply.count += 1;
            reply.bytes += chunk.payload.len() as u64;
        }
        Ok(Response::new(reply))
    }
}

/// Binds 127.0.0.1:0 and serves in a background task. Every workload is served; the
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
    let channels = connect(p).await?;
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
                Workload::Stream | Workload::Upload => {
                    unreachable!("stream callers come from stream_callers")
                }
                Workload::Http => unreachable!("tonic does not run the http workload"),
            }
        })
        .collect())
}

/// One stream task of the stream workload (downloads) or the upload workload.
pub struct TonicStreamCaller {
    client: EchoClient<Channel>,
    request: DownloadRequest,
    /// Every message of the stream.
    payload: Bytes,
    upload: bool,
}

impl StreamCaller for TonicStreamCaller {
    async fn stream(&mut self, tally: &Arc<StreamTally>) -> bool {
        if self.upload {
            self.upload(tally).await
        } else {
            self.download(tally).await
        }
    }
}

impl TonicStreamCaller {
    async fn upload(&mut self, tally: &Arc<StreamTally>) -> bool {
        let count = self.request.count;
        let chunk = Chunk {
            payload: self.payload.clone(),
        };
        // The request stream ends early once the run is over (tonic then finishes the call).
        let counter = tally.clone();
        let chunks = stream::repeat(chunk)
            .take(count as usize)
            .take_while(move |_| futures::future::ready(counter.message()));
        let expected = UploadTally::of(count, self.payload.len());
        match self.client.upload(chunks).await {
            Ok(rsp) => {
                let reply = rsp.into_inner();
                let taken = UploadTally {
                    count: reply.count,
                    bytes: reply.bytes,
                };
                // An upload cut short when the run ended is answered with fewer.
                taken == expected || tally.stopped()
            }
            Err(_) => false,
        }
    }

    async fn download(&mut self, tally: &StreamTally) -> bool {
        let mut messages = match self.client.download(self.request).await {
            Ok(rsp) => rsp.into_inner(),
            Err(_) => return false,
        };
        let mut taken = 0u32;
        loop {
            match messages.message().await {
                Ok(Some(chunk)) if chunk.payload == self.payload => {
                    taken += 1;
                    if !tally.message() {
                        return true;
                    }
                }
                Ok(None) => return taken == self.request.count,
                _ => return false,
            }
        }
    }
}

/// The stream tasks, spread over the channels like the unary callers.
pub async fn stream_callers(p: &ClientParams) -> Result<Vec<TonicStreamCaller>, String> {
    let channels = connect(p).await?;
    let request = DownloadRequest {
        count: p.stream_messages,
        size: p.payload.len() as u32,
    };
    Ok((0..p.concurrency)
        .map(|i| TonicStreamCaller {
            client: EchoClient::new(channels[p.conn_of(i)].clone()),
            request,
            payload: p.payload.clone(),
            upload: p.workload == Workload::Upload,
        })
        .collect())
}

/// One connection of `--idle-connections`: a channel of its own (one HTTP/2 connection,
/// hyper's default windows) that has made one echo call of `payload`. Holding the client
/// holds the connection.
pub async fn idle_connection(
    addr: SocketAddr,
    payload: &Bytes,
) -> Result<EchoClient<Channel>, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("tonic connect: {e}"))?;
    let mut client = EchoClient::new(channel);
    let request = EchoRequest {
        payload: payload.clone(),
    };
    let reply = client
        .echo(request)
        .await
        .map_err(|e| format!("tonic echo: {e}"))?;
    if reply.into_inner().payload != *payload {
        return Err("tonic echo: the reply is not the payload".to_owned());
    }
    Ok(client)
}

/// `p.connections` HTTP/2 channels, connected up front, receiving streams with the windows
/// asked for (hyper's defaults otherwise: 2 MiB per stream, 5 MiB per connection).
async fn connect(p: &ClientParams) -> Result<Vec<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{}", p.addr))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .initial_stream_window_size(p.stream_window)
        .initial_connection_window_size(p.connection_window);
    let mut channels = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("tonic connect: {e}"))?,
        );
    }
    Ok(channels)
}
