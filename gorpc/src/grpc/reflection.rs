//! `grpc.reflection.v1.ServerReflection` and its older twin
//! `grpc.reflection.v1alpha.ServerReflection`: what lets grpcurl and similar tools list a
//! server's services and describe their messages without the .proto files
//! (<https://github.com/grpc/grpc/blob/master/doc/server-reflection.md>).
//!
//! [`Reflection`] answers from encoded `FileDescriptorSet`s, such as the
//! `FILE_DESCRIPTOR_SET` gorpc-build generates for each package:
//!
//! ```no_run
//! # fn hosted() -> gorpc::Router { gorpc::Router::new() }
//! use gorpc::grpc::reflection::Reflection;
//!
//! let router = hosted(); // the generated servers, added with `Router::add_service`
//! let reflection = Reflection::of(&router);
//! let router = router.add_service(reflection);
//! ```
//!
//! Both versions share one message layout, so one set of types serves both. Each request
//! of the stream gets one response, an `error_response` when it cannot be answered (the
//! stream goes on). File answers carry the file asked for first, then every file it
//! imports, directly or not, each time (which clients handle whether or not they saw them
//! before in the stream).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use gorpc_proto::{Code, Status, StreamKind};
use prost::Message as _;
use prost_reflect::{DescriptorPool, FileDescriptor};

use crate::codec::Protobuf;
use crate::service::{
    bidi_call, unimplemented, MethodSchema, NamedService, Request, ServerReply, ServerRequest,
    Service,
};
use crate::stream::{RequestStream, ResponseSink};

/// The method path of `ServerReflectionInfo` in `grpc.reflection.v1`.
pub const V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
/// The method path of `ServerReflectionInfo` in `grpc.reflection.v1alpha`.
pub const V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// The encoded `google.protobuf.FileDescriptorSet` of grpc/reflection/v1/reflection.proto
/// and grpc/reflection/v1alpha/reflection.proto (as in gorpc's proto/ directory, without
/// source info).
pub static FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("../../proto/reflection.bin");

/// A request of `ServerReflectionInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReflectionRequest {
    /// The host the client asked for, echoed back as `valid_host`.
    #[prost(string, tag = "1")]
    pub host: String,
    /// What is asked.
    #[prost(
        oneof = "server_reflection_request::MessageRequest",
        tags = "3, 4, 5, 6, 7"
    )]
    pub message_request: Option<server_reflection_request::MessageRequest>,
}

/// The oneof of [`ServerReflectionRequest`].
pub mod server_reflection_request {
    /// What a [`ServerReflectionRequest`](super::ServerReflectionRequest) asks.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum MessageRequest {
        /// The file of this name (e.g. "helloworld.proto"), with its imports.
        #[prost(string, tag = "3")]
        FileByFilename(String),
        /// The file declaring this fully qualified symbol (a service, a method, a message,
        /// a field, an enum, an enum value or an extension), with its imports.
        #[prost(string, tag = "4")]
        FileContainingSymbol(String),
        /// The file declaring this extension, with its imports.
        #[prost(message, tag = "5")]
        FileContainingExtension(super::ExtensionRequest),
        /// The field numbers of every known extension of this message type.
        #[prost(string, tag = "6")]
        AllExtensionNumbersOfType(String),
        /// The services the server hosts (the content is not looked at).
        #[prost(string, tag = "7")]
        ListServices(String),
    }
}

/// An extension, by the message it extends and its field number.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtensionRequest {
    /// The extended message's full name.
    #[prost(string, tag = "1")]
    pub containing_type: String,
    /// The extension's field number.
    #[prost(int32, tag = "2")]
    pub extension_number: i32,
}

/// A response of `ServerReflectionInfo`: one per request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReflectionResponse {
    /// The request's `host`.
    #[prost(string, tag = "1")]
    pub valid_host: String,
    /// The request answered.
    #[prost(message, optional, tag = "2")]
    pub original_request: Option<ServerReflectionRequest>,
    /// The answer.
    #[prost(
        oneof = "server_reflection_response::MessageResponse",
        tags = "4, 5, 6, 7"
    )]
    pub message_response: Option<server_reflection_response::MessageResponse>,
}

/// The oneof of [`ServerReflectionResponse`].
pub mod server_reflection_response {
    /// The answer of a [`ServerReflectionResponse`](super::ServerReflectionResponse).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum MessageResponse {
        /// Files, for `file_by_filename`, `file_containing_symbol` and
        /// `file_containing_extension`.
        #[prost(message, tag = "4")]
        FileDescriptorResponse(super::FileDescriptorResponse),
        /// Extension numbers, for `all_extension_numbers_of_type`.
        #[prost(message, tag = "5")]
        AllExtensionNumbersResponse(super::ExtensionNumberResponse),
        /// Services, for `list_services`.
        #[prost(message, tag = "6")]
        ListServicesResponse(super::ListServiceResponse),
        /// Why the request could not be answered.
        #[prost(message, tag = "7")]
        ErrorResponse(super::ErrorResponse),
    }
}

/// Files, each an encoded `google.protobuf.FileDescriptorProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileDescriptorResponse {
    /// The file asked for first, then the files it imports, directly or not.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub file_descriptor_proto: Vec<Bytes>,
}

/// The extension numbers of a message type.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtensionNumberResponse {
    /// The message type's full name.
    #[prost(string, tag = "1")]
    pub base_type_name: String,
    /// The field numbers of its known extensions.
    #[prost(int32, repeated, tag = "2")]
    pub extension_number: Vec<i32>,
}

/// The services a server hosts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListServiceResponse {
    /// One per service.
    #[prost(message, repeated, tag = "1")]
    pub service: Vec<ServiceResponse>,
}

/// One hosted service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceResponse {
    /// Its full name, e.g. "helloworld.Greeter".
    #[prost(string, tag = "1")]
    pub name: String,
}

/// Why a request could not be answered.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorResponse {
    /// A gRPC status code, e.g. 5 for `NOT_FOUND`.
    #[prost(int32, tag = "1")]
    pub error_code: i32,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// An encoded `FileDescriptorSet` with its files left encoded, as they were found.
#[derive(Clone, PartialEq, prost::Message)]
struct EncodedSet {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    file: Vec<Bytes>,
}

/// The name of an encoded `FileDescriptorProto`; the rest of the file is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct FileName {
    #[prost(string, tag = "1")]
    name: String,
}

/// What a [`Reflection`] answers from.
#[derive(Clone, Debug, Default)]
struct Index {
    /// Every file registered, to look symbols up in.
    pool: DescriptorPool,
    /// The same files, encoded as they were found, by name.
    files: HashMap<String, Bytes>,
    /// The services listed, by full name.
    services: BTreeSet<String>,
    /// The descriptor sets added, by address and length: a router's methods share theirs.
    added: HashSet<(usize, usize)>,
}

impl Index {
    /// Adds the files of `set` and returns their names. Files already known by name are
    /// kept as they were.
    fn add(&mut self, set: &'static [u8]) -> Vec<String> {
        let encoded = EncodedSet::decode(Bytes::from_static(set))
            .unwrap_or_else(|e| panic!("a descriptor set to reflect does not decode: {e}"));
        let named: Vec<(String, Bytes)> = encoded
            .file
            .into_iter()
            .map(|file| {
                let name = FileName::decode(file.clone())
                    .unwrap_or_else(|e| panic!("a file descriptor to reflect does not decode: {e}"))
                    .name;
                (name, file)
            })
            .collect();
        if self.added.insert((set.as_ptr() as usize, set.len())) {
            self.pool
                .decode_file_descriptor_set(set)
                .unwrap_or_else(|e| panic!("a descriptor set to reflect is not valid: {e}"));
            for (name, file) in &named {
                self.files
                    .entry(name.clone())
                    .or_insert_with(|| file.clone());
            }
        }
        named.into_iter().map(|(name, _)| name).collect()
    }

    /// Lists every service declared in the files named.
    fn list_declared(&mut self, files: &[String]) {
        for name in files {
            if let Some(file) = self.pool.get_file_by_name(name) {
                let declared = file.services().map(|s| s.full_name().to_owned());
                self.services.extend(declared);
            }
        }
    }

    fn answer(&self, request: ServerReflectionRequest) -> ServerReflectionResponse {
        use server_reflection_request::MessageRequest;
        use server_reflection_response::MessageResponse;
        let answer = match &request.message_request {
            Some(MessageRequest::ListServices(_)) => {
                Ok(MessageResponse::ListServicesResponse(ListServiceResponse {
                    service: self
                        .services
                        .iter()
                        .map(|name| ServiceResponse { name: name.clone() })
                        .collect(),
                }))
            }
            Some(MessageRequest::FileByFilename(name)) => self
                .pool
                .get_file_by_name(name)
                .ok_or_else(|| not_found(format!("no file named {name:?}")))
                .map(|file| self.with_imports(file)),
            Some(MessageRequest::FileContainingSymbol(symbol)) => self
                .file_declaring(symbol)
                .ok_or_else(|| not_found(format!("no symbol named {symbol:?}")))
                .map(|file| self.with_imports(file)),
            Some(MessageRequest::FileContainingExtension(extension)) => self
                .pool
                .get_message_by_name(&extension.containing_type)
                .and_then(|message| {
                    let number = u32::try_from(extension.extension_number).ok()?;
                    message.get_extension(number)
                })
                .ok_or_else(|| {
                    not_found(format!(
                        "no extension {} of {:?}",
                        extension.extension_number, extension.containing_type
                    ))
                })
                .map(|extension| self.with_imports(extension.parent_file())),
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => self
                .pool
                .get_message_by_name(name)
                .ok_or_else(|| not_found(format!("no message type named {name:?}")))
                .map(|message| {
                    MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                        base_type_name: message.full_name().to_owned(),
                        extension_number: message.extensions().map(|e| e.number() as i32).collect(),
                    })
                }),
            None => Err(ErrorResponse {
                error_code: Code::InvalidArgument as i32,
                error_message: "the request asks nothing (no message_request)".into(),
            }),
        };
        ServerReflectionResponse {
            valid_host: request.host.clone(),
            message_response: Some(answer.unwrap_or_else(MessageResponse::ErrorResponse)),
            original_request: Some(request),
        }
    }

    /// The file declaring `symbol`, a fully qualified name.
    fn file_declaring(&self, symbol: &str) -> Option<FileDescriptor> {
        let pool = &self.pool;
        if let Some(service) = pool.get_service_by_name(symbol) {
            return Some(service.parent_file());
        }
        if let Some(message) = pool.get_message_by_name(symbol) {
            return Some(message.parent_file());
        }
        if let Some(enumeration) = pool.get_enum_by_name(symbol) {
            return Some(enumeration.parent_file());
        }
        if let Some(extension) = pool.get_extension_by_name(symbol) {
            return Some(extension.parent_file());
        }
        // A member: a method of a service, a field or oneof of a message.
        let (parent, name) = symbol.rsplit_once('.')?;
        if let Some(service) = pool.get_service_by_name(parent) {
            return service
                .methods()
                .any(|m| m.name() == name)
                .then(|| service.parent_file());
        }
        if let Some(message) = pool.get_message_by_name(parent) {
            let declared = message.get_field_by_name(name).is_some()
                || message.oneofs().any(|o| o.name() == name);
            return declared.then(|| message.parent_file());
        }
        // An enum value, named beside its enum.
        pool.all_enums()
            .find(|e| e.values().any(|v| v.full_name() == symbol))
            .map(|e| e.parent_file())
    }

    /// `file`, then every file it imports, directly or not, each once.
    fn with_imports(&self, file: FileDescriptor) -> server_reflection_response::MessageResponse {
        let mut seen = HashSet::new();
        let mut pending = VecDeque::from([file]);
        let mut files = Vec::new();
        while let Some(file) = pending.pop_front() {
            if !seen.insert(file.name().to_owned()) {
                continue;
            }
            if let Some(encoded) = self.files.get(file.name()) {
                files.push(encoded.clone());
            }
            pending.extend(file.dependencies());
        }
        server_reflection_response::MessageResponse::FileDescriptorResponse(
            FileDescriptorResponse {
                file_descriptor_proto: files,
            },
        )
    }
}

fn not_found(message: String) -> ErrorResponse {
    ErrorResponse {
        error_code: Code::NotFound as i32,
        error_message: message,
    }
}

/// `ServerReflectionInfo`: one response per request, until the client finishes.
async fn serve(
    index: Arc<Index>,
    request: Request<RequestStream<ServerReflectionRequest>>,
    mut sink: ResponseSink<ServerReflectionResponse>,
) -> Result<(), Status> {
    let mut requests = request.message;
    while let Some(request) = requests.next().await {
        sink.send(&index.answer(request?)).await?;
    }
    Ok(())
}

/// The reflection service, in both versions: mount it with
/// [`Router::add_service`](crate::Router::add_service).
///
/// It always describes itself and `grpc.health.v1.Health`, and lists itself; what else
/// it lists and describes comes from [`of`](Self::of) and [`register`](Self::register).
#[derive(Clone)]
pub struct Reflection {
    index: Arc<Index>,
}

impl std::fmt::Debug for Reflection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reflection")
            .field("services", &self.index.services)
            .finish_non_exhaustive()
    }
}

impl Default for Reflection {
    fn default() -> Self {
        Reflection::new()
    }
}

impl Reflection {
    /// A reflection service that knows only itself and the health service, and lists
    /// only itself.
    pub fn new() -> Self {
        let mut index = Index::default();
        index.add(super::health::FILE_DESCRIPTOR_SET);
        let own = index.add(FILE_DESCRIPTOR_SET);
        index.list_declared(&own);
        Reflection {
            index: Arc::new(index),
        }
    }

    /// A reflection service describing every method `service` answers with protobuf
    /// descriptors ([`MethodSchema::Protobuf`], as generated servers and [`Health`]
    /// report them), and listing their services beside itself. Methods without
    /// descriptors (msgpack, raw) are neither listed nor described.
    ///
    /// # Panics
    ///
    /// If a method's descriptors do not decode, as [`register`](Self::register).
    ///
    /// [`Health`]: super::health::Health
    pub fn of(service: &(impl Service + ?Sized)) -> Self {
        let mut reflection = Reflection::new();
        let index = Arc::make_mut(&mut reflection.index);
        for method in service.method_paths() {
            let method = method.as_str();
            let Some(MethodSchema::Protobuf { descriptors, .. }) = service.schema(method) else {
                continue;
            };
            index.add(descriptors);
            let service = method
                .trim_start_matches('/')
                .rsplit_once('/')
                .map_or("", |(service, _)| service);
            if index.pool.get_service_by_name(service).is_some() {
                index.services.insert(service.to_owned());
            }
        }
        reflection
    }

    /// Adds the files of `descriptor_set`, an encoded `google.protobuf.FileDescriptorSet`
    /// (such as a generated `FILE_DESCRIPTOR_SET`), and lists every service they declare.
    /// A file already known by name is kept as first registered.
    ///
    /// # Panics
    ///
    /// If the set does not decode, or a file in it names types that neither the set nor
    /// the files registered before declare: descriptors are fixed at build time, so this
    /// is a bug to see at startup.
    pub fn register(mut self, descriptor_set: &'static [u8]) -> Self {
        let index = Arc::make_mut(&mut self.index);
        let files = index.add(descriptor_set);
        index.list_declared(&files);
        self
    }

    /// The services `list_services` names, by full name, sorted.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.index.services.iter().map(String::as_str)
    }
}

/// The request and response messages of one version, in [`FILE_DESCRIPTOR_SET`].
fn schema(input: &'static str, output: &'static str) -> MethodSchema {
    MethodSchema::Protobuf {
        descriptors: FILE_DESCRIPTOR_SET,
        input,
        output,
    }
}

impl Service for Reflection {
    fn method_paths(&self) -> Vec<String> {
        [V1, V1ALPHA].map(String::from).to_vec()
    }

    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        match request.method() {
            V1 | V1ALPHA => {
                let index = self.index.clone();
                bidi_call(request, Protobuf, move |request, sink| {
                    serve(index, request, sink)
                })
            }
            _ => unimplemented(&request),
        }
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        match method {
            V1 => Some(schema(
                "grpc.reflection.v1.ServerReflectionRequest",
                "grpc.reflection.v1.ServerReflectionResponse",
            )),
            V1ALPHA => Some(schema(
                "grpc.reflection.v1alpha.ServerReflectionRequest",
                "grpc.reflection.v1alpha.ServerReflectionResponse",
            )),
            _ => None,
        }
    }

    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        matches!(method, V1 | V1ALPHA).then_some(StreamKind::Bidirectional)
    }
}

impl NamedService for Reflection {
    const METHODS: &'static [&'static str] = &[V1, V1ALPHA];
}
