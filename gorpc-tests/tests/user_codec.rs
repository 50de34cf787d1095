//! A codec defined outside gorpc, with its own id, used end to end.

use bytes::{BufMut, Bytes, BytesMut};
use gorpc::{
    Client, ClientConfig, Code, Codec, Decoder, Encoder, MsgPack, Request, Response, Router,
    Runtime, Server, Status,
};
use gorpc_tests::on_every_runtime;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// JSON through serde_json, under a user-range codec id.
#[derive(Clone, Copy, Debug)]
struct Json;

const JSON_ID: u8 = 200;

impl<T: Serialize> Encoder<T> for Json {
    fn id(&self) -> u8 {
        JSON_ID
    }

    fn name(&self) -> &'static str {
        "json"
    }

    fn encode(&self, message: &T, buf: &mut BytesMut) -> Result<(), Status> {
        serde_json::to_writer(buf.writer(), message)
            .map_err(|e| Status::new(Code::Internal, e.to_string()))
    }
}

impl<T: DeserializeOwned> Decoder<T> for Json {
    fn id(&self) -> u8 {
        JSON_ID
    }

    fn name(&self) -> &'static str {
        "json"
    }

    fn decode(&self, body: Bytes) -> Result<T, Status> {
        serde_json::from_slice(&body)
            .map_err(|e| Status::new(Code::InvalidArgument, format!("json: {e}")))
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Point {
    x: i32,
    y: i32,
}

// Types that travel one way, so each has only the serde half its side needs: the caller
// serializes its query and deserializes the answer, the handler the other way round.

/// The caller's request.
#[derive(Serialize)]
struct Query {
    x: i32,
    y: i32,
}

/// The caller's view of the answer.
#[derive(Deserialize, Debug, PartialEq)]
struct Answer {
    manhattan: i32,
}

/// The handler's view of the request.
#[derive(Deserialize)]
struct QueryIn {
    x: i32,
    y: i32,
}

/// The handler's answer.
#[derive(Serialize)]
struct AnswerOut {
    manhattan: i32,
}

fn norm(q: QueryIn) -> AnswerOut {
    AnswerOut {
        manhattan: q.x.abs() + q.y.abs(),
    }
}

async fn user_defined_codec_end_to_end<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let router = Router::new()
        .unary("/geo.Geo/Mirror", Json, |req: Request<Point>| async move {
            Ok(Response::new(Point {
                x: -req.message.x,
                y: -req.message.y,
            }))
        })
        .msgpack("/geo.Geo/Norm", |q: QueryIn| async move { Ok(norm(q)) })
        .unary(
            "/geo.Geo/NormJson",
            Json,
            |req: Request<QueryIn>| async move { Ok(Response::new(norm(req.message))) },
        )
        .route("/geo.Geo/Raw", |req: gorpc::ServerRequest| async move {
            // Shows what arrived on the wire: the codec id and the JSON text.
            gorpc::ServerReply::ok(Bytes::from(format!(
                "{} {}",
                req.codec,
                String::from_utf8_lossy(&req.body)
            )))
        });
    let server = Server::new(server_rt, router)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::connect(client_rt, server.local_addr(), ClientConfig::default())
        .await
        .unwrap();

    // Both halves for one type make a `Codec`, as routes and calls of one type ask.
    fn is_codec<C: Codec<Point>>(codec: C) -> C {
        codec
    }
    let rsp: Response<Point> = client
        .unary(
            "/geo.Geo/Mirror",
            is_codec(Json),
            Request::new(Point { x: 3, y: -4 }),
        )
        .await
        .unwrap();
    assert_eq!(rsp.message, Point { x: -3, y: 4 });

    // A request type that only serializes and a response type that only deserializes, in
    // msgpack and in the user's codec.
    let answer: Answer = client
        .call("/geo.Geo/Norm", &Query { x: 3, y: -4 })
        .await
        .unwrap();
    assert_eq!(answer, Answer { manhattan: 7 });
    let rsp: Response<Answer> = client
        .unary(
            "/geo.Geo/NormJson",
            Json,
            Request::new(Query { x: -1, y: 5 }),
        )
        .await
        .unwrap();
    assert_eq!(rsp.message, Answer { manhattan: 6 });
    let rsp: Response<Answer> = client
        .unary("/geo.Geo/Norm", MsgPack, Request::new(Query { x: 2, y: 2 }))
        .await
        .unwrap();
    assert_eq!(rsp.message, Answer { manhattan: 4 });

    let raw = client
        .call_raw(
            "/geo.Geo/Raw",
            JSON_ID,
            Encoder::<Point>::encode_to_bytes(&Json, &Point { x: 1, y: 2 }).unwrap(),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(raw.body, Bytes::from_static(br#"200 {"x":1,"y":2}"#));

    // The same method called in msgpack is refused by name, not misread.
    let err = client
        .call::<_, Point>("/geo.Geo/Mirror", &Point { x: 1, y: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("expects json bodies, got codec 2 (msgpack)"),
        "{err}"
    );

    // Bad JSON is the handler's decode error, and the connection carries on.
    let err = client
        .call_raw(
            "/geo.Geo/Mirror",
            JSON_ID,
            Bytes::from_static(b"{nope"),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("json: "), "{err}");
    server.abort().await;
}

on_every_runtime!(user_defined_codec_end_to_end);
