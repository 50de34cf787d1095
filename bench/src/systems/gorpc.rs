//! gorpc-rs, on any of its runtimes (gorpc-tokio and gorpc-smol share this module).
//!
//! Echo: a raw-codec route answering with the request body. Hello: the codegen-free msgpack
//! style with serde structs, as the Go gorpc benchmark does it.

use std::net::SocketAddr;

use ::gorpc::client::PoolConfig;
use ::gorpc::{
    CallOptions, Client, ClientConfig, Router, Runtime, Server, ServerReply, ServerRequest, Status,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{greeting, ClientParams, Workload, ECHO_METHOD, HELLO_METHOD, HELLO_NAME};
use crate::loadgen::Caller;

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
        Workload::Echo => Router::new().route(ECHO_METHOD, |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        }),
        Workload::Hello => Router::new().msgpack(HELLO_METHOD, |req: HelloRequest| async move {
            Ok::<_, Status>(HelloReply {
                message: greeting(&req.name),
            })
        }),
    };
    let server = Server::new(rt, router)
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?;
    // Dropping the handle leaves the server running.
    Ok(server.local_addr())
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
/// calls over the connections round robin).
pub async fn callers<R: Runtime>(rt: R, p: &ClientParams) -> Result<Vec<GorpcCaller>, String> {
    let config = ClientConfig {
        pool: PoolConfig {
            size: p.connections,
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    let client = Client::connect(rt, p.addr, config)
        .await
        .map_err(|s| format!("gorpc connect: {s:?}"))?;
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
        })
        .collect())
}
