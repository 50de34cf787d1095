//! gRPC server reflection from the client's side: the descriptors `gorpc call` uses when it
//! has no .proto file, and the `list` and `describe` commands.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use clap::Args;
use futures::StreamExt as _;
use gorpc_tokio::grpc::reflection::{
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    ErrorResponse, FileDescriptorResponse, ServerReflectionRequest, ServerReflectionResponse, V1,
    V1ALPHA,
};
use gorpc_tokio::{CallOptions, Client, Code, Protobuf, Status};
use prost::Message as _;
use prost_reflect::prost_types::FileDescriptorProto;
use prost_reflect::{
    Cardinality, DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, ServiceDescriptor, Syntax,
};

use crate::remote::{self, status_failure, Remote, RemoteArgs};
use crate::Failure;

/// What a server without reflection makes the commands say.
const NO_REFLECTION: &str = "the server has no reflection service (UNIMPLEMENTED): pass \
     --proto FILE, or mount reflection on the server (`Server::reflection()`)";

/// What a server's reflection says: the services it lists, and the files declaring the
/// symbol asked for.
pub struct Reflection {
    /// The services the server lists, in its order.
    pub services: Vec<String>,
    /// What it says of the symbol, if one was asked for.
    pub lookup: Option<Lookup>,
}

/// What the server says of a symbol.
pub enum Lookup {
    /// The files that declare it, and every file they import.
    Found(DescriptorPool),
    /// It does not know the symbol; the server's words.
    Unknown(String),
}

/// Asks the server's reflection service (`grpc.reflection.v1`, else `v1alpha`) which
/// services it lists and, given a `symbol` (a fully qualified name: a service, a method, a
/// message...), for the files that declare it with every file they import, as a pool.
/// Imports the server's answer lacks are asked for by name; the well-known types need not
/// be. A server without reflection (UNIMPLEMENTED in both versions) is a usage error: the
/// caller must pass the .proto file.
pub async fn reflect(
    client: &Client,
    options: CallOptions,
    symbol: Option<&str>,
) -> Result<Reflection, Failure> {
    // The services first, alone: a gorpc server answers a method it does not serve over
    // gRPC only once the request ended, and sees several messages there as a wrong request
    // rather than an unknown method (see `ask`).
    let list = vec![MessageRequest::ListServices(String::new())];
    let mut answered = None;
    for path in [V1, V1ALPHA] {
        match ask(client, path, &options, list.clone()).await {
            Ok(answers) => {
                answered = Some((path, answers));
                break;
            }
            Err(status) if status.code() == Code::Unimplemented => continue,
            Err(status) => return Err(status_failure(status)),
        }
    }
    let Some((path, answers)) = answered else {
        return Err(Failure::usage(NO_REFLECTION));
    };
    let services = match answers.into_iter().next() {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        Some(MessageResponse::ErrorResponse(e)) => return Err(error_failure(e)),
        _ => return Err(unexpected("list_services")),
    };
    let Some(symbol) = symbol else {
        return Ok(Reflection {
            services,
            lookup: None,
        });
    };
    let request = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    let answers = ask(client, path, &options, request)
        .await
        .map_err(status_failure)?;
    let mut files = BTreeMap::new();
    match answers.into_iter().next() {
        Some(MessageResponse::FileDescriptorResponse(found)) => add_files(&mut files, found)?,
        Some(MessageResponse::ErrorResponse(e)) if e.error_code == Code::NotFound as i32 => {
            return Ok(Reflection {
                services,
                lookup: Some(Lookup::Unknown(e.error_message)),
            })
        }
        Some(MessageResponse::ErrorResponse(e)) => return Err(error_failure(e)),
        _ => return Err(unexpected("file_containing_symbol")),
    }
    // Starts with the well-known types (google/protobuf/*.proto).
    let mut pool = DescriptorPool::global();
    let mut asked = BTreeSet::new();
    loop {
        // Every import not yet had nor asked for, with a file that imports it.
        let mut missing = BTreeMap::new();
        for file in files.values() {
            for import in &file.dependency {
                if !files.contains_key(import) && !asked.contains(import) {
                    missing
                        .entry(import.clone())
                        .or_insert_with(|| file.name().to_owned());
                }
            }
        }
        if missing.is_empty() {
            break;
        }
        let requests = missing
            .keys()
            .map(|name| MessageRequest::FileByFilename(name.clone()))
            .collect();
        let answers = ask(client, path, &options, requests)
            .await
            .map_err(status_failure)?;
        for ((import, importer), answer) in missing.into_iter().zip(answers) {
            match answer {
                MessageResponse::FileDescriptorResponse(found) => add_files(&mut files, found)?,
                MessageResponse::ErrorResponse(_) if pool.get_file_by_name(&import).is_some() => {}
                MessageResponse::ErrorResponse(e) => {
                    return Err(Failure::other(format!(
                        "the server's reflection does not describe {import}, which {importer} \
                         imports: {}",
                        e.error_message
                    )))
                }
                _ => return Err(unexpected("file_by_filename")),
            }
            asked.insert(import);
        }
    }
    pool.add_file_descriptor_protos(files.into_values())
        .map_err(|e| Failure::other(format!("the server's descriptors are not valid: {e}")))?;
    Ok(Reflection {
        services,
        lookup: Some(Lookup::Found(pool)),
    })
}

/// Asks `requests` on one reflection stream of `path`, sent while the answers come and
/// followed by the stream's end: the server answers each in turn, then ends too. Ending
/// the stream matters: over gRPC, a gorpc server without reflection reads a call of a
/// method it does not serve to its end before it says UNIMPLEMENTED.
async fn ask(
    client: &Client,
    path: &'static str,
    options: &CallOptions,
    requests: Vec<MessageRequest>,
) -> Result<Vec<MessageResponse>, Status> {
    let expected = requests.len();
    let (mut sender, mut responses) = client
        .bidi::<_, ServerReflectionRequest, ServerReflectionResponse>(
            path,
            Protobuf,
            options.clone(),
        )
        .await?
        .into_parts();
    let send_all = async move {
        for request in requests {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            };
            // A failed send means the call ended: the responses end with its status.
            if sender.send(&request).await.is_err() {
                return;
            }
        }
        let _ = sender.close_send().await;
    };
    let receive_all = async move {
        let mut answers = Vec::with_capacity(expected);
        while let Some(response) = responses.next().await {
            let answer = response?.message_response.ok_or_else(|| {
                Status::new(Code::Internal, "a reflection answer with no content")
            })?;
            answers.push(answer);
        }
        Ok::<_, Status>(answers)
    };
    let ((), answers) = futures::join!(send_all, receive_all);
    let answers = answers?;
    if answers.len() != expected {
        return Err(Status::new(
            Code::Internal,
            format!(
                "the reflection service answered {} of {expected} requests",
                answers.len()
            ),
        ));
    }
    Ok(answers)
}

/// A reflection answer's error, as a status from the server.
fn error_failure(e: ErrorResponse) -> Failure {
    status_failure(Status::new(
        Code::from_u32(e.error_code as u32),
        e.error_message,
    ))
}

fn unexpected(request: &str) -> Failure {
    Failure::other(format!(
        "the server's reflection answered {request} with something else"
    ))
}

/// Decodes the files of an answer, keeping the first of each name.
fn add_files(
    files: &mut BTreeMap<String, FileDescriptorProto>,
    found: FileDescriptorResponse,
) -> Result<(), Failure> {
    for encoded in found.file_descriptor_proto {
        let file = FileDescriptorProto::decode(encoded).map_err(|e| {
            Failure::other(format!(
                "the server's reflection sent a file descriptor that does not decode: {e}"
            ))
        })?;
        files.entry(file.name().to_owned()).or_insert(file);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Server address, HOST:PORT.
    #[arg(value_name = "ADDR")]
    addr: String,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `gorpc list`: the services the server lists, one a line.
pub fn list(args: ListArgs) -> Result<(), Failure> {
    let remote = Remote::new(&args.addr, &args.remote)?;
    remote::block_on(async move {
        let client = remote.connect().await?;
        let reflection = reflect(&client, remote.options(), None).await?;
        for service in &reflection.services {
            println!("{service}");
        }
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Server address, HOST:PORT.
    #[arg(value_name = "ADDR")]
    addr: String,
    /// A service, method, message, enum or field, by its full name (`package.Service`,
    /// `package.Service.Method` or `/package.Service/Method`, `package.Message`...).
    #[arg(value_name = "SYMBOL")]
    symbol: String,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `gorpc describe`: a symbol as the server's descriptors declare it.
pub fn describe(args: DescribeArgs) -> Result<(), Failure> {
    let symbol = symbol_name(&args.symbol);
    if symbol.is_empty() {
        return Err(Failure::usage("SYMBOL is empty"));
    }
    let remote = Remote::new(&args.addr, &args.remote)?;
    remote::block_on(async move {
        let client = remote.connect().await?;
        let reflection = reflect(&client, remote.options(), Some(&symbol)).await?;
        let pool = match reflection.lookup {
            Some(Lookup::Found(pool)) => pool,
            None => unreachable!("a symbol was asked for"),
            Some(Lookup::Unknown(why)) => {
                return Err(Failure::usage(format!(
                    "the server does not know `{symbol}`: {why}"
                )))
            }
        };
        let text = declaration(&pool, &symbol).ok_or_else(|| {
            Failure::usage(format!(
                "`{symbol}` is not a service, method, message, enum or field"
            ))
        })?;
        print!("{text}");
        Ok(())
    })
}

/// A symbol's full name: without a leading dot, and `/package.Service/Method` as
/// `package.Service.Method`.
fn symbol_name(symbol: &str) -> String {
    let symbol = symbol.trim().trim_start_matches('.');
    match symbol.strip_prefix('/') {
        Some(path) => path.replace('/', "."),
        None => symbol.to_owned(),
    }
}

/// `symbol` written out in the style of a .proto file (types by their full names).
fn declaration(pool: &DescriptorPool, symbol: &str) -> Option<String> {
    if let Some(service) = pool.get_service_by_name(symbol) {
        return Some(service_text(&service));
    }
    if let Some(message) = pool.get_message_by_name(symbol) {
        return Some(message_text(&message));
    }
    if let Some(enumeration) = pool.get_enum_by_name(symbol) {
        return Some(enum_text(&enumeration));
    }
    let (parent, name) = symbol.rsplit_once('.')?;
    if let Some(service) = pool.get_service_by_name(parent) {
        let method = service.methods().find(|m| m.name() == name)?;
        return Some(format!("{}\n", rpc_line(&method)));
    }
    let field = pool.get_message_by_name(parent)?.get_field_by_name(name)?;
    Some(format!("{}\n", field_line(&field)))
}

fn service_text(service: &ServiceDescriptor) -> String {
    let mut text = format!("service {} {{\n", service.full_name());
    for method in service.methods() {
        let _ = writeln!(text, "  {}", rpc_line(&method));
    }
    text.push_str("}\n");
    text
}

/// `rpc Name(Input) returns (stream Output);`
fn rpc_line(method: &MethodDescriptor) -> String {
    let stream = |yes: bool| if yes { "stream " } else { "" };
    format!(
        "rpc {}({}{}) returns ({}{});",
        method.name(),
        stream(method.is_client_streaming()),
        method.input().full_name(),
        stream(method.is_server_streaming()),
        method.output().full_name()
    )
}

/// The message's fields in declaration order, a oneof's together where its first field is.
fn message_text(message: &MessageDescriptor) -> String {
    let mut text = format!("message {} {{\n", message.full_name());
    let mut oneofs = HashSet::new();
    for field in message.fields() {
        match field.containing_oneof().filter(|o| !o.is_synthetic()) {
            None => {
                let _ = writeln!(text, "  {}", field_line(&field));
            }
            Some(oneof) if oneofs.insert(oneof.name().to_owned()) => {
                let _ = writeln!(text, "  oneof {} {{", oneof.name());
                for member in oneof.fields() {
                    let _ = writeln!(text, "    {}", field_line(&member));
                }
                text.push_str("  }\n");
            }
            Some(_) => {}
        }
    }
    text.push_str("}\n");
    text
}

fn enum_text(enumeration: &EnumDescriptor) -> String {
    let mut text = format!("enum {} {{\n", enumeration.full_name());
    for value in enumeration.values() {
        let _ = writeln!(text, "  {} = {};", value.name(), value.number());
    }
    text.push_str("}\n");
    text
}

/// `repeated string names = 1;`, `map<string, int32> counts = 2;`...
fn field_line(field: &FieldDescriptor) -> String {
    let kind = field.kind();
    let typed = match kind.as_message().filter(|_| field.is_map()) {
        Some(entry) => format!(
            "map<{}, {}>",
            type_name(&entry.map_entry_key_field().kind()),
            type_name(&entry.map_entry_value_field().kind())
        ),
        None => {
            let label = match field.cardinality() {
                Cardinality::Repeated => "repeated ",
                Cardinality::Required => "required ",
                Cardinality::Optional
                    if field.parent_file().syntax() == Syntax::Proto2
                        || field.field_descriptor_proto().proto3_optional() =>
                {
                    "optional "
                }
                Cardinality::Optional => "",
            };
            format!("{label}{}", type_name(&kind))
        }
    };
    format!("{typed} {} = {};", field.name(), field.number())
}

fn type_name(kind: &Kind) -> String {
    let name = match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(message) => return message.full_name().to_owned(),
        Kind::Enum(enumeration) => return enumeration.full_name().to_owned(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of one file, compiled from `source` by protox.
    fn pool(source: &str) -> DescriptorPool {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.proto"), source).unwrap();
        let mut compiler = protox::Compiler::new([dir.path()]).unwrap();
        compiler.open_file("t.proto").unwrap();
        compiler.descriptor_pool()
    }

    #[test]
    fn declarations_read_like_the_proto() {
        let pool = pool(
            r#"syntax = "proto3";
            package t;
            enum Mood { CALM = 0; ANGRY = 2; }
            message Item {
              string name = 1;
              repeated int64 sizes = 2;
              map<string, Item> children = 3;
              optional bool seen = 4;
              oneof choice { Mood mood = 5; bytes raw = 6; }
              double weight = 7;
            }
            service Shop {
              rpc Get(Item) returns (Item);
              rpc Watch(Item) returns (stream Item);
              rpc Chat(stream Item) returns (stream Item);
            }"#,
        );
        assert_eq!(
            declaration(&pool, "t.Item").unwrap(),
            "message t.Item {\n  string name = 1;\n  repeated int64 sizes = 2;\n  \
             map<string, t.Item> children = 3;\n  optional bool seen = 4;\n  oneof choice {\n    \
             t.Mood mood = 5;\n    bytes raw = 6;\n  }\n  double weight = 7;\n}\n"
        );
        assert_eq!(
            declaration(&pool, "t.Shop").unwrap(),
            "service t.Shop {\n  rpc Get(t.Item) returns (t.Item);\n  \
             rpc Watch(t.Item) returns (stream t.Item);\n  \
             rpc Chat(stream t.Item) returns (stream t.Item);\n}\n"
        );
        assert_eq!(
            declaration(&pool, "t.Mood").unwrap(),
            "enum t.Mood {\n  CALM = 0;\n  ANGRY = 2;\n}\n"
        );
        assert_eq!(
            declaration(&pool, &symbol_name("/t.Shop/Watch")).unwrap(),
            "rpc Watch(t.Item) returns (stream t.Item);\n"
        );
        assert_eq!(
            declaration(&pool, "t.Item.sizes").unwrap(),
            "repeated int64 sizes = 2;\n"
        );
        assert_eq!(declaration(&pool, "t.Nothing"), None);
        assert_eq!(declaration(&pool, "t.Shop.Nothing"), None);
    }
}
