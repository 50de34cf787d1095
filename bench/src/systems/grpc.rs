//! gorpc's gRPC, each side against tonic's other side.
//!
//! gorpc-grpc-server: gorpc's server on tokio with HTTP on (`Server::http`), so it answers
//! gRPC over HTTP/2 on its port, called by the tonic row's own client code. Its handlers are
//! the gorpc system's, on the same method paths, but in protobuf over bench.proto's messages
//! (prost, the code build.rs generates for tonic): that is what tonic's client sends and
//! expects, and it makes the server decode and encode each message as tonic's does.
//!
//! gorpc-grpc-client: gorpc's gRPC client (`Client::grpc`, one HTTP/2 connection per
//! client) on tokio, calling the tonic row's server with the same protobuf messages; one
//! client per connection, shared round robin by the callers as tonic's channels are.

use std::net::SocketAddr;
use std::sync::Arc;

use ::gorpc::client::ConnectionConfig;
use ::gorpc::stream::{RequestStream, ResponseSink};
use ::gorpc::{
    CallOptions, Client, ClientConfig, Code, Protobuf, Request, Response, Router, Runtime, Server,
    Status,
};
use bytes::Bytes;
use futures::StreamExt;

use super::tonic::pb::{
    Chunk, DownloadRequest, EchoReply, EchoRequest, HelloReply, HelloRequest, UploadReply,
};
use super::{
    greeting, make_payload, ClientParams, UploadTally, Workload, DOWNLOAD_METHOD, ECHO_METHOD,
    HELLO_METHOD, HELLO_NAME, UPLOAD_METHOD,
};
use crate::loadgen::{Caller, StreamCaller, StreamTally};

/// Binds 127.0.0.1:0 and serves `workload`'s method in protobuf, gRPC on, in the background
/// of `rt`.
pub async fn serve<R: Runtime>(rt: R, workload: Workload) -> std::io::Result<SocketAddr> {
    let router = match workload {
        Workload::Echo => Router::new().unary(ECHO_METHOD, Protobuf, echo),
        Workload::Hello => Router::new().unary(HELLO_METHOD, Protobuf, say_hello),
        Workload::Stream => Router::new().server_stream(DOWNLOAD_METHOD, Protobuf, download),
        Workload::Upload => Router::new().client_stream(UPLOAD_METHOD, Protobuf, upload),
        Workload::Http => {
            return Err(std::io::Error::other(
                "gorpc-grpc-server does not run the http workload",
            ))
        }
    };
    // No cap on connections, as the gorpc rows' servers (see `super::gorpc::serve`).
    let server = Server::new(rt, router)
        .max_connections(usize::MAX)
        .http()
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    // Dropping the handle leaves the server running.
    Ok(server.local_addr())
}

async fn echo(req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
    Ok(Response::new(EchoReply {
        payload: req.message.payload,
    }))
}

async fn say_hello(req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
    Ok(Response::new(HelloReply {
        message: greeting(&req.message.name),
    }))
}

/// The stream workload's handler: the order's count of chunks, each the same payload, each
/// send waiting for the client's HTTP/2 credit.
async fn download(
    req: Request<DownloadRequest>,
    mut sink: ResponseSink<Chunk>,
) -> Result<(), Status> {
    let order = req.message;
    let chunk = Chunk {
        payload: make_payload(order.size as usize),
    };
    for _ in 0..order.count {
        sink.send(&chunk).await?;
    }
    Ok(())
}

/// The upload workload's handler: counts what the client sends.
async fn upload(req: Request<RequestStream<Chunk>>) -> Result<Response<UploadReply>, Status> {
    let mut chunks = req.message;
    let mut reply = UploadReply { count: 0, bytes: 0 };
    while let Some(chunk) = chunks.next().await {
        reply.count += 1;
        reply.bytes += chunk?.payload.len() as u64;
    }
    Ok(Response::new(reply))
}

pub enum GrpcCaller {
    Echo { client: Client, payload: Bytes },
    Hello { client: Client, expected: String },
}

impl Caller for GrpcCaller {
    async fn call(&mut self) -> bool {
        match self {
            GrpcCaller::Echo { client, payload } => {
                let request = Request::new(EchoRequest {
                    payload: payload.clone(),
                });
                match client
                    .unary::<_, EchoRequest, EchoReply>(ECHO_METHOD, Protobuf, request)
                    .await
                {
                    Ok(rsp) => rsp.message.payload == *payload,
                    Err(_) => false,
                }
            }
            GrpcCaller::Hello { client, expected } => {
                let request = Request::new(HelloRequest {
                    name: HELLO_NAME.to_owned(),
                });
                match client
                    .unary::<_, HelloRequest, HelloReply>(HELLO_METHOD, Protobuf, request)
                    .await
                {
                    Ok(rsp) => rsp.message.message == *expected,
                    Err(_) => false,
                }
            }
        }
    }
}

/// One gRPC client per connection, connected up front; caller `i` uses client
/// `i % connections`.
pub async fn callers<R: Runtime>(rt: R, p: &ClientParams) -> Result<Vec<GrpcCaller>, String> {
    let clients = connect(rt, p).await?;
    Ok((0..p.concurrency)
        .map(|i| {
            let client = clients[p.conn_of(i)].clone();
            match p.workload {
                Workload::Echo => GrpcCaller::Echo {
                    client,
                    payload: p.payload.clone(),
                },
                Workload::Hello => GrpcCaller::Hello {
                    client,
                    expected: greeting(HELLO_NAME),
                },
                Workload::Stream | Workload::Upload => {
                    unreachable!("stream callers come from stream_callers")
                }
                Workload::Http => unreachable!("gorpc-grpc-client does not run the http workload"),
            }
        })
        .collect())
}

/// One stream task of the stream workload (downloads) or the upload workload.
pub struct GrpcStreamCaller {
    client: Client,
    request: DownloadRequest,
    /// Every message of the stream.
    chunk: Chunk,
    upload: bool,
}

impl StreamCaller for GrpcStreamCaller {
    async fn stream(&mut self, tally: &Arc<StreamTally>) -> bool {
        if self.upload {
            self.upload(tally).await
        } else {
            self.download(tally).await
        }
    }
}

impl GrpcStreamCaller {
    async fn upload(&self, tally: &StreamTally) -> bool {
        let mut upload = match self
            .client
            .client_stream::<_, Chunk, UploadReply>(UPLOAD_METHOD, Protobuf, CallOptions::default())
            .await
        {
            Ok(upload) => upload,
            Err(_) => return false,
        };
        for _ in 0..self.request.count {
            if upload.send(&self.chunk).await.is_err() {
                return false;
            }
            if !tally.message() {
                return true;
            }
        }
        let expected = UploadTally::of(self.request.count, self.chunk.payload.len());
        match upload.finish().await {
            Ok(rsp) => {
                let reply = rsp.message;
                let taken = UploadTally {
                    count: reply.count,
                    bytes: reply.bytes,
                };
                taken == expected
            }
            Err(_) => false,
        }
    }

    async fn download(&self, tally: &StreamTally) -> bool {
        let mut chunks = match self
            .client
            .server_stream::<_, DownloadRequest, Chunk>(
                DOWNLOAD_METHOD,
                Protobuf,
                &self.request,
                CallOptions::default(),
            )
            .await
        {
            Ok(chunks) => chunks,
            Err(_) => return false,
        };
        let mut taken = 0u32;
        while let Some(item) = chunks.next().await {
            match item {
                Ok(chunk) if chunk.payload == self.chunk.payload => {
                    taken += 1;
                    if !tally.message() {
                        return true;
                    }
                }
                _ => return false,
            }
        }
        taken == self.request.count
    }
}

/// The stream tasks, spread over the clients like the unary callers.
pub async fn stream_callers<R: Runtime>(
    rt: R,
    p: &ClientParams,
) -> Result<Vec<GrpcStreamCaller>, String> {
    let clients = connect(rt, p).await?;
    let request = DownloadRequest {
        count: p.stream_messages,
        size: p.payload.len() as u32,
    };
    Ok((0..p.concurrency)
        .map(|i| GrpcStreamCaller {
            client: clients[p.conn_of(i)].clone(),
            request,
            chunk: Chunk {
                payload: p.payload.clone(),
            },
            upload: p.workload == Workload::Upload,
        })
        .collect())
}

/// `p.connections` gRPC clients, each its own HTTP/2 connection, receiving streams with the
/// windows asked for (gorpc's defaults otherwise: 1 MiB per stream, 4 MiB per connection).
/// `Client::grpc` connects on first use: each client is connected here by a call that
/// tonic's server refuses, so that the measured window starts on open connections as
/// tonic's does.
async fn connect<R: Runtime>(rt: R, p: &ClientParams) -> Result<Vec<Client>, String> {
    let mut connection = ConnectionConfig::default();
    if let Some(window) = p.stream_window {
        connection.conn.stream_window = window;
    }
    if let Some(window) = p.connection_window {
        connection.conn.connection_window = window;
    }
    let mut config = ClientConfig::default();
    config.pool.connection = connection;
    let mut clients = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let client = Client::grpc(rt.clone(), p.addr, config.clone());
        match client
            .call_raw(
                "/bench.Echo/Connect",
                ::gorpc::proto::codec::PROTOBUF,
                Bytes::new(),
                CallOptions::default(),
            )
            .await
        {
            Err(status) if status.code() == Code::Unimplemented => {}
            Err(status) => return Err(format!("gorpc gRPC connect: {status:?}")),
            Ok(_) => return Err("tonic answered a method it does not have".to_owned()),
        }
        clients.push(client);
    }
    Ok(clients)
}
