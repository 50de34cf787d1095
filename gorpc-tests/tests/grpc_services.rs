//! gRPC's standard services as gorpc serves them, called over the binary protocol on every
//! runtime pairing: health (`grpc.health.v1.Health`: Check, Watch, List) and server
//! reflection (`grpc.reflection.v1` and `v1alpha`), beside generated services. Also checks
//! that the descriptors gorpc embeds for them are those of its .proto files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use gorpc::client::ResponseStream;
use gorpc::grpc::health::{
    self, Health, HealthCheckRequest, HealthCheckResponse, HealthListRequest, HealthListResponse,
    HealthReporter, ServingStatus,
};
use gorpc::grpc::reflection::server_reflection_request::MessageRequest;
use gorpc::grpc::reflection::server_reflection_response::MessageResponse;
use gorpc::grpc::reflection::{
    self, ErrorResponse, ExtensionRequest, Reflection, ServerReflectionRequest,
    ServerReflectionResponse,
};
use gorpc::stream::{RequestStream, ResponseSink};
use gorpc::{
    CallOptions, Client, Code, Protobuf, Request, Response, Router, Runtime, Server, ServerHandle,
    Status,
};
use gorpc_tests::{client_config, loopback, on_every_runtime, within, SECOND};
use prost::Message as _;
use prost_types::{FileDescriptorProto, FileDescriptorSet};

// Generated code: not every generated item is used.

/// Generated from the examples' proto/helloworld.proto by build.rs.
#[allow(dead_code)]
mod helloworld {
    include!(concat!(env!("OUT_DIR"), "/helloworld.rs"));
}

/// Generated from the examples' proto/route_guide.proto by build.rs.
#[allow(dead_code)]
mod routeguide {
    include!(concat!(env!("OUT_DIR"), "/routeguide.rs"));
}

/// Generated from proto/reflected/ by build.rs: a file importing another, which imports
/// well-known files.
#[allow(dead_code)]
mod reflected {
    include!(concat!(env!("OUT_DIR"), "/test.reflected.rs"));
}

const GREETER: &str = "helloworld.Greeter";

fn not_here() -> Status {
    Status::new(Code::Unimplemented, "only described, never called")
}

/// The generated services, hosted to be described; none is called.
struct Described;

impl helloworld::Greeter for Described {
    async fn say_hello(
        &self,
        _: Request<helloworld::HelloRequest>,
    ) -> Result<Response<helloworld::HelloReply>, Status> {
        Err(not_here())
    }

    async fn say_hello_to_all(
        &self,
        _: Request<helloworld::HelloAllRequest>,
    ) -> Result<Response<helloworld::HelloAllReply>, Status> {
        Err(not_here())
    }
}

impl routeguide::RouteGuide for Described {
    async fn get_feature(
        &self,
        _: Request<routeguide::Point>,
    ) -> Result<Response<routeguide::Feature>, Status> {
        Err(not_here())
    }

    async fn list_features(
        &self,
        _: Request<routeguide::Rectangle>,
        _: ResponseSink<routeguide::Feature>,
    ) -> Result<(), Status> {
        Err(not_here())
    }

    async fn record_route(
        &self,
        _: Request<RequestStream<routeguide::Point>>,
    ) -> Result<Response<routeguide::RouteSummary>, Status> {
        Err(not_here())
    }

    async fn route_chat(
        &self,
        _: Request<RequestStream<routeguide::RouteNote>>,
        _: ResponseSink<routeguide::RouteNote>,
    ) -> Result<(), Status> {
        Err(not_here())
    }
}

impl reflected::Stock for Described {
    async fn get(&self, _: Request<reflected::Item>) -> Result<Response<reflected::Level>, Status> {
        Err(not_here())
    }
}

// ---- health ----

/// A server hosting a standalone health service that knows `GREETER`, and a client of it.
async fn health_server<S: Runtime, C: Runtime>(
    server_rt: &S,
    client_rt: &C,
) -> (ServerHandle<S>, Client, HealthReporter) {
    let health = Health::standalone([GREETER]);
    let reporter = health.reporter();
    let server = Server::new(server_rt.clone(), Router::new().add_service(health))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    (server, client, reporter)
}

fn health_request(service: &str) -> Request<HealthCheckRequest> {
    Request::new(HealthCheckRequest {
        service: service.into(),
    })
}

async fn check(client: &Client, service: &str) -> Result<ServingStatus, Status> {
    let rsp: Response<HealthCheckResponse> = client
        .unary(health::CHECK, Protobuf, health_request(service))
        .await?;
    Ok(rsp.message.status())
}

async fn list(client: &Client) -> HashMap<String, ServingStatus> {
    let rsp: Response<HealthListResponse> = client
        .unary(health::LIST, Protobuf, Request::new(HealthListRequest {}))
        .await
        .unwrap();
    let statuses = rsp.message.statuses.into_iter();
    statuses.map(|(name, s)| (name, s.status())).collect()
}

async fn watch(client: &Client, service: &str) -> ResponseStream<HealthCheckResponse> {
    client
        .server_stream(
            health::WATCH,
            Protobuf,
            &health_request(service).message,
            CallOptions::default(),
        )
        .await
        .unwrap()
}

async fn next_status(watch: &mut ResponseStream<HealthCheckResponse>) -> ServingStatus {
    let message = watch.next().await.expect("a Watch call does not end");
    message.expect("no error").status()
}

/// Check answers the server's status for "", a known service's own status, NOT_FOUND for
/// others; while the server is not serving, every known service reads NOT_SERVING, and its
/// own status again afterwards. List answers them all.
async fn health_check<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, reporter) = health_server(&server_rt, &client_rt).await;
    within(&client_rt, 30 * SECOND, "health checks", async {
        assert_eq!(check(&client, "").await, Ok(ServingStatus::Serving));
        assert_eq!(check(&client, GREETER).await, Ok(ServingStatus::Serving));
        let unknown = check(&client, "nowhere.Nothing").await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound, "{unknown}");

        reporter.set_status(GREETER, ServingStatus::NotServing);
        assert_eq!(check(&client, GREETER).await, Ok(ServingStatus::NotServing));
        assert_eq!(check(&client, "").await, Ok(ServingStatus::Serving));
        assert_eq!(
            list(&client).await,
            HashMap::from([
                (String::new(), ServingStatus::Serving),
                (GREETER.to_owned(), ServingStatus::NotServing),
            ])
        );

        reporter.set_status(GREETER, ServingStatus::Serving);
        reporter.set_serving(false);
        assert_eq!(check(&client, "").await, Ok(ServingStatus::NotServing));
        assert_eq!(check(&client, GREETER).await, Ok(ServingStatus::NotServing));
        let unknown = check(&client, "nowhere.Nothing").await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
        assert!(list(&client)
            .await
            .values()
            .all(|s| *s == ServingStatus::NotServing));

        reporter.set_serving(true);
        assert_eq!(check(&client, "").await, Ok(ServingStatus::Serving));
        assert_eq!(check(&client, GREETER).await, Ok(ServingStatus::Serving));
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// Watch sends the status at once, then each change and only changes: of the server's
/// serving state and of the service's own status. An unknown service reads
/// SERVICE_UNKNOWN until it gets a status, and the call goes on. Watch calls end when the
/// client drops them: the server then shuts down gracefully.
async fn health_watch<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client, reporter) = health_server(&server_rt, &client_rt).await;
    within(&client_rt, 30 * SECOND, "health watches", async {
        let mut greeter = watch(&client, GREETER).await;
        let mut overall = watch(&client, "").await;
        let mut later = watch(&client, "later.Service").await;
        assert_eq!(next_status(&mut greeter).await, ServingStatus::Serving);
        assert_eq!(next_status(&mut overall).await, ServingStatus::Serving);
        assert_eq!(next_status(&mut later).await, ServingStatus::ServiceUnknown);

        reporter.set_serving(false);
        assert_eq!(next_status(&mut greeter).await, ServingStatus::NotServing);
        assert_eq!(next_status(&mut overall).await, ServingStatus::NotServing);
        // Changes that still read NOT_SERVING send nothing: the next message is SERVING.
        reporter.set_status(GREETER, ServingStatus::NotServing);
        reporter.set_status(GREETER, ServingStatus::Serving);
        reporter.set_serving(true);
        assert_eq!(next_status(&mut greeter).await, ServingStatus::Serving);
        assert_eq!(next_status(&mut overall).await, ServingStatus::Serving);

        reporter.set_status(GREETER, ServingStatus::NotServing);
        assert_eq!(next_status(&mut greeter).await, ServingStatus::NotServing);

        // The unknown service saw none of that (still unknown), then gets a status.
        reporter.set_status("later.Service", ServingStatus::Serving);
        assert_eq!(next_status(&mut later).await, ServingStatus::Serving);
    })
    .await;
    // Dropping the streams cancels the calls, so nothing is left to drain.
    drop(client);
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

// ---- reflection ----

/// Every service the reflection test server hosts, sorted.
const HOSTED: [&str; 6] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "helloworld.Greeter",
    "routeguide.RouteGuide",
    "test.reflected.Stock",
];

/// The well-known files reflected/common.proto imports.
const WELL_KNOWN: [&str; 2] = [
    "google/protobuf/descriptor.proto",
    "google/protobuf/timestamp.proto",
];

/// A server hosting generated services, health and reflection (built from the router), a
/// msgpack method (neither listed nor described), and a client of it.
async fn reflection_server<S: Runtime, C: Runtime>(
    server_rt: &S,
    client_rt: &C,
) -> (ServerHandle<S>, Client) {
    let router = Router::new()
        .add_service(helloworld::GreeterServer::new(Described))
        .add_service(routeguide::RouteGuideServer::new(Described))
        .add_service(reflected::StockServer::new(Described))
        .add_service(Health::standalone([GREETER]))
        .msgpack("/plain.Echo/Echo", |s: String| async move { Ok(s) });
    let reflection = Reflection::of(&router);
    let server = Server::new(server_rt.clone(), router.add_service(reflection))
        .bind(loopback())
        .await
        .unwrap();
    let client = Client::connect(client_rt.clone(), server.local_addr(), client_config())
        .await
        .unwrap();
    (server, client)
}

fn ask(request: MessageRequest) -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }
}

/// Sends `requests` on one `ServerReflectionInfo` call of `method`, each once the answer
/// to the one before came back (one response per request), then finishes; the call ends
/// OK.
async fn reflect(
    client: &Client,
    method: &'static str,
    requests: &[ServerReflectionRequest],
) -> Vec<ServerReflectionResponse> {
    let (mut sender, mut responses) = client
        .bidi::<_, ServerReflectionRequest, ServerReflectionResponse>(
            method,
            Protobuf,
            CallOptions::default(),
        )
        .await
        .unwrap()
        .into_parts();
    let mut answers = Vec::new();
    for request in requests {
        sender.send(request).await.unwrap();
        let answer = responses.next().await.expect("an answer").unwrap();
        assert_eq!(answer.original_request.as_ref(), Some(request));
        answers.push(answer);
    }
    sender.close_send().await.unwrap();
    assert!(responses.next().await.is_none(), "the call ends OK");
    answers
}

fn error_code(answer: &ServerReflectionResponse) -> Option<i32> {
    match &answer.message_response {
        Some(MessageResponse::ErrorResponse(ErrorResponse { error_code, .. })) => Some(*error_code),
        _ => None,
    }
}

/// The files of a file answer, decoded.
fn files(answer: &ServerReflectionResponse) -> Vec<FileDescriptorProto> {
    let Some(MessageResponse::FileDescriptorResponse(files)) = &answer.message_response else {
        panic!("not a file answer: {answer:?}");
    };
    let decode = |bytes: &bytes::Bytes| FileDescriptorProto::decode(bytes.clone()).unwrap();
    files.file_descriptor_proto.iter().map(decode).collect()
}

/// Checks a file answer: `first` comes first, the files are `all` in any order, each once,
/// and together they make a valid pool (every import is among them) that declares `symbol`.
fn assert_files(answer: &ServerReflectionResponse, first: &str, all: &[&str], symbol: &str) {
    let files = files(answer);
    assert_eq!(files[0].name(), first);
    let mut names: Vec<&str> = files.iter().map(|f| f.name()).collect();
    names.sort_unstable();
    let mut expected = all.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected, "the file and everything it imports, once");
    let pool =
        prost_reflect::DescriptorPool::from_file_descriptor_set(FileDescriptorSet { file: files })
            .expect("the files are complete");
    let declared = pool.get_service_by_name(symbol).is_some()
        || pool.get_message_by_name(symbol).is_some()
        || pool.get_enum_by_name(symbol).is_some()
        || pool
            .services()
            .any(|s| s.methods().any(|m| m.full_name() == symbol))
        || pool
            .all_messages()
            .any(|m| m.fields().any(|f| f.full_name() == symbol))
        || pool
            .all_enums()
            .any(|e| e.values().any(|v| v.full_name() == symbol));
    assert!(declared, "{symbol} is declared in {first}");
}

/// Every file reflected/stock.proto needs.
fn stock_files() -> Vec<&'static str> {
    let mut all = vec!["reflected/stock.proto", "reflected/common.proto"];
    all.extend(WELL_KNOWN);
    all
}

/// list_services names every service hosted with descriptors: the generated ones, health,
/// and reflection in both versions (not the msgpack method's).
async fn reflection_lists_services<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client) = reflection_server(&server_rt, &client_rt).await;
    within(&client_rt, 30 * SECOND, "list_services", async {
        let answers = reflect(
            &client,
            reflection::V1,
            &[ask(MessageRequest::ListServices(String::new()))],
        )
        .await;
        let Some(MessageResponse::ListServicesResponse(list)) = &answers[0].message_response else {
            panic!("not a service list: {:?}", answers[0]);
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, HOSTED);
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// file_containing_symbol answers, for a service, a method, a message, an enum, an enum
/// value and a field, the file declaring it and everything it imports; an unknown symbol
/// gets NOT_FOUND, and the call goes on with the next request.
async fn reflection_finds_symbols<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client) = reflection_server(&server_rt, &client_rt).await;
    within(&client_rt, 30 * SECOND, "file_containing_symbol", async {
        let stock = stock_files();
        let cases: Vec<(&str, &str, Vec<&str>)> = vec![
            (GREETER, "helloworld.proto", vec!["helloworld.proto"]),
            (
                "routeguide.RouteGuide.RouteChat",
                "route_guide.proto",
                vec!["route_guide.proto"],
            ),
            ("test.reflected.Stock", stock[0], stock.clone()),
            ("test.reflected.Stock.Get", stock[0], stock.clone()),
            ("test.reflected.Item", stock[0], stock.clone()),
            ("test.reflected.Level", stock[1], stock[1..].to_vec()),
            ("test.reflected.Unit", stock[1], stock[1..].to_vec()),
            ("test.reflected.UNIT_PIECE", stock[1], stock[1..].to_vec()),
            (
                "test.reflected.Level.counted_at",
                stock[1],
                stock[1..].to_vec(),
            ),
            (
                "grpc.health.v1.Health",
                "grpc/health/v1/health.proto",
                vec!["grpc/health/v1/health.proto"],
            ),
            (
                "grpc.reflection.v1alpha.ServerReflectionResponse",
                "grpc/reflection/v1alpha/reflection.proto",
                vec!["grpc/reflection/v1alpha/reflection.proto"],
            ),
        ];
        let mut requests = vec![ask(MessageRequest::FileContainingSymbol(
            "nowhere.Nothing".into(),
        ))];
        for (symbol, _, _) in &cases {
            requests.push(ask(MessageRequest::FileContainingSymbol((*symbol).into())));
        }
        let answers = reflect(&client, reflection::V1, &requests).await;
        assert_eq!(error_code(&answers[0]), Some(Code::NotFound as i32));
        for ((symbol, first, all), answer) in cases.iter().zip(&answers[1..]) {
            assert_files(answer, first, all, symbol);
        }
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// The other requests: file_by_filename, file_containing_extension and
/// all_extension_numbers_of_type, with NOT_FOUND for what is not there, INVALID_ARGUMENT
/// for a request asking nothing, and the request's host echoed.
async fn reflection_answers_files_and_extensions<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (server, client) = reflection_server(&server_rt, &client_rt).await;
    within(&client_rt, 30 * SECOND, "reflection requests", async {
        let extension = |containing_type: &str, extension_number| {
            ask(MessageRequest::FileContainingExtension(ExtensionRequest {
                containing_type: containing_type.into(),
                extension_number,
            }))
        };
        let options = "google.protobuf.MessageOptions";
        let mut hosted = ask(MessageRequest::FileByFilename(
            "reflected/common.proto".into(),
        ));
        hosted.host = "stock.example:443".into();
        let requests = [
            hosted,
            ask(MessageRequest::FileByFilename("nowhere.proto".into())),
            extension(options, 50001),
            extension(options, 50002),
            extension("nowhere.Nothing", 50001),
            ask(MessageRequest::AllExtensionNumbersOfType(options.into())),
            ask(MessageRequest::AllExtensionNumbersOfType(
                "nowhere.Nothing".into(),
            )),
            ServerReflectionRequest::default(),
        ];
        let answers = reflect(&client, reflection::V1, &requests).await;
        let stock = stock_files();
        assert_files(&answers[0], stock[1], &stock[1..], "test.reflected.Level");
        assert_eq!(answers[0].valid_host, "stock.example:443");
        assert_eq!(error_code(&answers[1]), Some(Code::NotFound as i32));
        assert_files(&answers[2], stock[1], &stock[1..], "test.reflected.Level");
        assert_eq!(error_code(&answers[3]), Some(Code::NotFound as i32));
        assert_eq!(error_code(&answers[4]), Some(Code::NotFound as i32));
        let Some(MessageResponse::AllExtensionNumbersResponse(numbers)) =
            &answers[5].message_response
        else {
            panic!("not extension numbers: {:?}", answers[5]);
        };
        assert_eq!(numbers.base_type_name, options);
        assert_eq!(numbers.extension_number, [50001]);
        assert_eq!(error_code(&answers[6]), Some(Code::NotFound as i32));
        assert_eq!(error_code(&answers[7]), Some(Code::InvalidArgument as i32));
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

/// grpc.reflection.v1alpha answers exactly as v1.
async fn reflection_v1alpha_answers_the_same<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (server, client) = reflection_server(&server_rt, &client_rt).await;
    within(&client_rt, 30 * SECOND, "v1alpha", async {
        let requests = [
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "test.reflected.Item".into(),
            )),
            ask(MessageRequest::FileContainingSymbol(
                "nowhere.Nothing".into(),
            )),
            ask(MessageRequest::FileByFilename("helloworld.proto".into())),
        ];
        let v1 = reflect(&client, reflection::V1, &requests).await;
        let v1alpha = reflect(&client, reflection::V1ALPHA, &requests).await;
        assert_eq!(v1alpha, v1);
        assert_eq!(error_code(&v1alpha[2]), Some(Code::NotFound as i32));
        assert_files(
            &v1alpha[1],
            "reflected/stock.proto",
            &stock_files(),
            "test.reflected.Item",
        );
    })
    .await;
    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
}

on_every_runtime!(
    health_check,
    health_watch,
    reflection_lists_services,
    reflection_finds_symbols,
    reflection_answers_files_and_extensions,
    reflection_v1alpha_answers_the_same,
);

/// `Reflection::new` lists only itself; `Reflection::register` adds every service a
/// descriptor set declares, hosted or not.
#[test]
fn registered_sets_list_their_services() {
    let own = [HOSTED[1], HOSTED[2]];
    assert!(Reflection::new().services().eq(own));
    let registered = Reflection::new().register(helloworld::FILE_DESCRIPTOR_SET);
    assert!(registered.services().eq([own[0], own[1], GREETER]));
}

// ---- descriptors ----

/// gorpc's proto/ directory: the standard services' .proto files and their encoded
/// descriptor sets.
fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../gorpc/proto")
}

/// Compiles `files` with protox and compares the descriptors (without source info, as
/// embedded) with `committed`, the bytes gorpc embeds from `bin`. With
/// `GORPC_WRITE_DESCRIPTORS` set, writes them to `bin` instead.
fn check_descriptors(bin: &str, files: &[&str], committed: &[u8]) {
    let mut compiled = protox::compile(files, [proto_dir()]).expect("the .proto files compile");
    for file in &mut compiled.file {
        file.source_code_info = None;
    }
    let names: Vec<&str> = compiled.file.iter().map(|f| f.name()).collect();
    assert_eq!(names, files, "nothing imported");
    if std::env::var_os("GORPC_WRITE_DESCRIPTORS").is_some() {
        std::fs::write(proto_dir().join(bin), compiled.encode_to_vec()).unwrap();
        return;
    }
    let embedded = FileDescriptorSet::decode(committed).expect("the embedded set decodes");
    assert!(
        embedded == compiled,
        "gorpc/proto/{bin} differs from the .proto files; rewrite it with \
         GORPC_WRITE_DESCRIPTORS=1 cargo test -p gorpc-tests --test grpc_services descriptors"
    );
}

/// The descriptor sets gorpc embeds are those of its .proto files, so they cannot drift.
#[test]
fn embedded_descriptors_match_the_protos() {
    check_descriptors(
        "health.bin",
        &["grpc/health/v1/health.proto"],
        health::FILE_DESCRIPTOR_SET,
    );
    check_descriptors(
        "reflection.bin",
        &[
            "grpc/reflection/v1/reflection.proto",
            "grpc/reflection/v1alpha/reflection.proto",
        ],
        reflection::FILE_DESCRIPTOR_SET,
    );
}
