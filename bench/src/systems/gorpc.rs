//! gorpc-rs, on any of its runtimes (gorpc-tokio and gorpc-smol share this module).
//!
//! Echo: a raw-codec route answering with the request body. Hello: the codegen-free msgpack
//! style with serde structs, as the Go gorpc benchmark does it. Stream: a typed
//! server-streaming route over the raw codec, sending through its `ResponseSink` as a handler
//! would, each send waiting for the client's flow-control credit. Upload: a typed
//! client-streaming route over the raw codec, reading its `RequestStream` as a handler would.
//! Http: the echo route on a server with HTTP on (`Server::http`), called over HTTP/1.1 by
//! gorpc's HTTP client (`Client::http`), one client per caller.

use std::net::SocketAddr;
use std::sync::Arc;

use ::gorpc::client::{ConnectionConfig, PoolConfig};
use ::gorpc::stream::{RequestStream, ResponseSink};
use ::gorpc::{
    CallOptions, Client, ClientConfig, Code, Raw, Request, Response, Router, Runtime, Server,
    ServerReply, ServerRequest, Status,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    greeting, make_payload, ClientParams, DownloadOrder, UploadTally, Workload, DOWNLOAD_METHOD,
    ECHO_METHOD, HELLO_METHOD, HELLO_NAME, UPLOAD_METHOD,
};
use crate::loadgen::{Caller, StreamCaller, StreamTally};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HelloRequest {
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HelloReply {
    pub message: String,
}

/// Binds 127.0.0.1:0 and serves in the background of `rt`.
pub async fn serve<R: Runtime>(rt: R, workload: Workload) -> std::io::Result<SocketAddr> {
    let router = match workload {
        Workload::Echo | Workload::Http => Router::new()
            .route(ECHO_METHOD, |req: ServerRequest| async move {
                ServerReply::ok(req.body)
            }),
        Workload::Hello => Router::new().msgpack(HELLO_METHOD, |req: HelloRequest| async move {
            Ok::<_, Status>(HelloReply {
                message: greeting(&req.name),
            })
        }),
        Workload::Stream => Router::new().server_stream(DOWNLOAD_METHOD, Raw, download),
        Workload::Upload => Router::new().client_stream(UPLOAD_METHOD, Raw, upload),
    };
    // No cap on connections (the default refuses beyond 10,000), as tonic, tarpc and raw
    // have none: `--idle-connections` holds as many as the open-file limit allows.
    let mut server = Server::new(rt, router).max_connections(usize::MAX);
    if workload == Workload::Http {
        server = server.http();
    }
    let server = server.bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    // Dropping the handle leaves the server running.
    Ok(server.local_addr())
}

/// The stream workload's handler: the order's count of messages, each the same payload.
async fn download(req: Request<Bytes>, mut sink: ResponseSink<Bytes>) -> Result<(), Status> {
    let order = DownloadOrder::decode(&req.message)
        .ok_or_else(|| Status::new(Code::InvalidArgument, "a download order is 8 bytes"))?;
    let message = make_payload(order.size as usize);
    for _ in 0..order.count {
        sink.send(&message).await?;
    }
    Ok(())
}

/// The upload workload's handler: counts what the client sends.
async fn upload(req: Request<RequestStream<Bytes>>) -> Result<Response<Bytes>, Status> {
    let mut messages = req.message;
    let mut tally = UploadTally { count: 0, bytes: 0 };
    while let Some(message) = messages.next().await {
        tally.count += 1;
        tally.bytes += message?.len() as u64;
    }
    Ok(Response::new(tally.encode()))
}

pub enum GorpcCaller {
    Echo {
        client: Client,
        body: Bytes,
    },
    Hello {
        client: Client,
        request: HelloRequest,
        expected: String,
    },
}

impl Caller for GorpcCaller {
    async fn call(&mut self) -> bool {
        match self {
            GorpcCaller::Echo { client, body } => {
                match client
                    .call_raw(ECHO_METHOD, 0, body.clone(), CallOptions::default())
                    .await
                {
                    Ok(rsp) => rsp.body == *body,
                    Err(_) => false,
                }
            }
            GorpcCaller::Hello {
                client,
                request,
                expected,
            } => match client
                .call::<HelloRequest, HelloReply>(HELLO_METHOD, request)
                .await
            {
                Ok(rsp) => rsp.message == *expected,
                Err(_) => false,
            },
        }
    }
}

/// One client with a pool of `connections` connections; callers share it (the pool spreads
/// calls over the connections round robin). The http workload instead gives every caller
/// its own HTTP client (see [`http_callers`]).
pub async fn callers<R: Runtime>(rt: R, p: &ClientParams) -> Result<Vec<GorpcCaller>, String> {
    if p.workload == Workload::Http {
        return Ok(http_callers(rt, p));
    }
    let client = connect(rt, p).await?;
    Ok((0..p.concurrency)
        .map(|_| match p.workload {
            Workload::Echo => GorpcCaller::Echo {
                client: client.clone(),
                body: p.payload.clone(),
            },
            Workload::Hello => GorpcCaller::Hello {
                client: client.clone(),
                request: HelloRequest {
                    name: HELLO_NAME.to_owned(),
                },
                expected: greeting(HELLO_NAME),
            },
            Workload::Stream | Workload::Upload => {
                unreachable!("stream callers come from stream_callers")
            }
            Workload::Http => unreachable!("returned above"),
        })
        .collect())
}

/// The http workload's callers: one `Client::http` each, so each caller has its own
/// kept-alive connection (opened by its first call, in the warm-up) and `--connections`
/// does not apply. An HTTP/1.1 connection carries one call at a time, and one
/// `Client::http` keeps at most 16 idle connections: callers sharing one client could see
/// connections closed after their call and new ones opened whenever more than 16 were idle
/// at once, and the run would then measure connection setup. In this closed loop a shared
/// client was seen to keep its 64 connections anyway (each caller puts its connection back
/// and takes it again in the same poll), but a client per caller keeps them open whatever
/// the scheduling.
fn http_callers<R: Runtime>(rt: R, p: &ClientParams) -> Vec<GorpcCaller> {
    (0..p.concurrency)
        .map(|_| GorpcCaller::Echo {
            client: Client::http(rt.clone(), p.addr, ClientConfig::default()),
            body: p.payload.clone(),
        })
        .collect()
}

/// One stream task of the stream workload (downloads) or the upload workload.
pub struct GorpcStreamCaller {
    client: Client,
    order: DownloadOrder,
    /// Every message of the stream.
    payload: Bytes,
    upload: bool,
}

impl StreamCaller for GorpcStreamCaller {
    async fn stream(&mut self, tally: &Arc<StreamTally>) -> bool {
        if self.upload {
            self.upload(tally).await
        } else {
            self.download(tally).await
        }
    }
}

impl GorpcStreamCaller {
    async fn upload(&self, tally: &StreamTally) -> bool {
        let mut upload = match self
            .client
            .client_stream::<_, Bytes, Bytes>(UPLOAD_METHOD, Raw, CallOptions::default())
            .await
        {
            Ok(upload) => upload,
            Err(_) => return false,
        };
        for _ in 0..self.order.count {
            if upload.send(&self.payload).await.is_err() {
                return false;
            }
            if !tally.message() {
                return true;
            }
        }
        let expected = UploadTally::of(self.order.count, self.payload.len());
        match upload.finish().await {
            Ok(rsp) => UploadTally::decode(&rsp.message) == Some(expected),
            Err(_) => false,
        }
    }

    async fn download(&self, tally: &StreamTally) -> bool {
        let request = self.order.encode();
        let mut messages = match self
            .client
            .server_stream::<_, Bytes, Bytes>(DOWNLOAD_METHOD, Raw, &request, Default::default())
            .await
        {
            Ok(messages) => messages,
            Err(_) => return false,
        };
        let mut taken = 0u32;
        while let Some(item) = messages.next().await {
            match item {
                Ok(message) if message == self.payload => {
                    taken += 1;
                    if !tally.message() {
                        return true;
                    }
                }
                _ => return false,
            }
        }
        taken == self.order.count
    }
}

/// One client with a pool of `connections` connections; the stream tasks share it.
pub async fn stream_callers<R: Runtime>(
    rt: R,
    p: &ClientParams,
) -> Result<Vec<GorpcStreamCaller>, String> {
    let client = connect(rt, p).await?;
    let order = DownloadOrder {
        count: p.stream_messages,
        size: p.payload.len() as u32,
    };
    Ok((0..p.concurrency)
        .map(|_| GorpcStreamCaller {
            client: client.clone(),
            order,
            payload: p.payload.clone(),
            upload: p.workload == Workload::Upload,
        })
        .collect())
}

/// One connection of `--idle-connections`: a client of its own (a pool of one connection,
/// connected before the call) that has made one echo call of `payload`. Holding the client
/// holds the connection.
pub async fn idle_connection<R: Runtime>(
    rt: R,
    addr: SocketAddr,
    payload: &Bytes,
) -> Result<Client, String> {
    let client = Client::connect(rt, addr, ClientConfig::default())
        .await
        .map_err(|s| format!("gorpc connect: {s:?}"))?;
    let rsp = client
        .call_raw(ECHO_METHOD, 0, payload.clone(), CallOptions::default())
        .await
        .map_err(|s| format!("gorpc echo: {s:?}"))?;
    if rsp.body != *payload {
        return Err("gorpc echo: the reply is not the payload".to_owned());
    }
    Ok(client)
}

/// A client whose pool holds `p.connections` connections, receiving streams with the
/// windows asked for (gorpc's defaults otherwise: 64 KiB per call, 1 MiB per connection).
async fn connect<R: Runtime>(rt: R, p: &ClientParams) -> Result<Client, String> {
    let mut connection = ConnectionConfig::default();
    if let Some(window) = p.stream_window {
        connection.conn.stream_window = window;
    }
    if let Some(window) = p.connection_window {
        connection.conn.connection_window = window;
    }
    let config = ClientConfig {
        pool: PoolConfig {
            size: p.connections,
            connection,
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    Client::connect(rt, p.addr, config)
        .await
        .map_err(|s| format!("gorpc connect: {s:?}"))
}
