//! `gorpc call`: a call of any kind with its requests given as JSON, typed by a .proto
//! file or by the server's reflection; responses are printed as JSON as they arrive.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::Args;
use futures::StreamExt as _;
use gorpc_tokio::client::RawStreamReceiver;
use gorpc_tokio::proto::StreamKind;
use gorpc_tokio::{CallOptions, Client};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};

use crate::reflect::{reflect, Lookup};
use crate::remote::{self, status_failure, Remote, RemoteArgs};
use crate::Failure;

#[derive(Debug, Args)]
pub struct CallArgs {
    /// Server address, HOST:PORT.
    #[arg(value_name = "ADDR")]
    addr: String,
    /// Method path, /package.Service/Method.
    #[arg(value_name = "METHOD")]
    method: String,
    /// The .proto file that declares the service. Without it, the server's reflection
    /// service describes the method (mounted on gorpc servers by `Server::reflection()`).
    #[arg(long, value_name = "FILE")]
    proto: Option<PathBuf>,
    /// Directory to resolve --proto's imports in (repeatable); the .proto file's own
    /// directory is searched last.
    #[arg(short = 'I', long = "include", value_name = "DIR", requires = "proto")]
    include: Vec<PathBuf>,
    /// The request message as JSON (protobuf JSON mapping); for a client-streaming or
    /// bidirectional method, the messages one after another (`{..} {..}`, none for an
    /// empty stream). @FILE reads it from a file, @- from stdin (read to its end before
    /// the call starts).
    #[arg(short, long, value_name = "JSON", default_value = "{}")]
    data: String,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print fields that hold their default value too.
    #[arg(long)]
    emit_defaults: bool,
}

pub fn run(args: CallArgs) -> Result<(), Failure> {
    let path = MethodPath::parse(&args.method)?;
    let data = read_data(&args.data)?;
    // With a .proto file, the requests are checked before anything is sent.
    let local = match &args.proto {
        Some(proto) => {
            let pool = load_pool(proto, &args.include)?;
            Some(Prepared::new(&pool, &path, &data, Origin::File(proto))?)
        }
        None => None,
    };
    let remote = Remote::new(&args.addr, &args.remote)?;
    let emit_defaults = args.emit_defaults;
    remote::block_on(async move {
        let client = remote.connect().await?;
        let prepared = match local {
            Some(prepared) => prepared,
            None => {
                let reflection = reflect(&client, remote.options(), Some(&path.service)).await?;
                let origin = Origin::Server(&reflection.services);
                match reflection.lookup {
                    Some(Lookup::Found(pool)) => Prepared::new(&pool, &path, &data, origin)?,
                    _ => return Err(origin.unknown_service(&path.service, None)),
                }
            }
        };
        let printer = Printer {
            desc: prepared.method.output(),
            options: SerializeOptions::new().skip_default_fields(!emit_defaults),
        };
        prepared
            .invoke(&client, path.full, remote.options(), printer)
            .await
    })
}

/// `/package.Service/Method`, split.
struct MethodPath {
    full: String,
    service: String,
    method: String,
}

impl MethodPath {
    fn parse(path: &str) -> Result<Self, Failure> {
        let malformed = || {
            Failure::usage(format!(
                "method path `{path}`: expected /package.Service/Method"
            ))
        };
        let rest = path.strip_prefix('/').ok_or_else(malformed)?;
        let (service, method) = rest.rsplit_once('/').ok_or_else(malformed)?;
        if service.is_empty() || method.is_empty() {
            return Err(malformed());
        }
        Ok(MethodPath {
            full: path.to_owned(),
            service: service.to_owned(),
            method: method.to_owned(),
        })
    }
}

/// Where the descriptors came from, for the messages of unknown names.
enum Origin<'a> {
    File(&'a Path),
    /// The server's reflection, with the services it lists.
    Server(&'a [String]),
}

impl Origin<'_> {
    fn unknown_service(&self, service: &str, pool: Option<&DescriptorPool>) -> Failure {
        match self {
            Origin::File(proto) => {
                let known: Vec<String> = pool
                    .into_iter()
                    .flat_map(|pool| pool.services())
                    .map(|s| s.full_name().to_owned())
                    .collect();
                Failure::usage(format!(
                    "unknown service `{service}` in {} (it declares: {})",
                    proto.display(),
                    list(&known)
                ))
            }
            Origin::Server(services) => Failure::usage(format!(
                "unknown service `{service}`: the server's reflection does not describe it \
                 (it lists: {})",
                list(services)
            )),
        }
    }
}

/// A call ready to go: its method and its requests, encoded.
struct Prepared {
    method: MethodDescriptor,
    /// `None` for a unary method.
    kind: Option<StreamKind>,
    bodies: Vec<Bytes>,
}

impl Prepared {
    /// Finds the method in `pool` and parses the requests of `data` as its input.
    fn new(
        pool: &DescriptorPool,
        path: &MethodPath,
        data: &str,
        origin: Origin<'_>,
    ) -> Result<Self, Failure> {
        let method = find_method(pool, path, &origin)?;
        let kind = stream_kind(&method);
        let requests = parse_requests(method.input(), data)?;
        let takes_one = matches!(kind, None | Some(StreamKind::ServerStreaming));
        if takes_one && requests.len() != 1 {
            return Err(Failure::usage(format!(
                "--data holds {} messages; {} takes exactly one",
                requests.len(),
                path.full
            )));
        }
        let bodies = requests
            .iter()
            .map(|r| Bytes::from(r.encode_to_vec()))
            .collect();
        Ok(Prepared {
            method,
            kind,
            bodies,
        })
    }

    /// Makes the call, printing each response as it comes.
    async fn invoke(
        self,
        client: &Client,
        path: String,
        options: CallOptions,
        printer: Printer,
    ) -> Result<(), Failure> {
        let Prepared { kind, bodies, .. } = self;
        let protobuf = gorpc_proto::codec::PROTOBUF;
        let Some(kind) = kind else {
            let body = bodies.into_iter().next().expect("one request, checked");
            let raw = client
                .call_raw(path, protobuf, body, options)
                .await
                .map_err(status_failure)?;
            check_codec(raw.codec)?;
            return printer.print(raw.body);
        };
        let first = match kind {
            StreamKind::ServerStreaming => bodies[0].clone(),
            _ => Bytes::new(),
        };
        let (sender, receiver) = client
            .stream_raw(path, protobuf, kind, first, options)
            .await
            .map_err(status_failure)?;
        // A server stream's one request went with the call; a send fails once the call
        // ended, and the receiver then has the reason.
        let sender = sender.filter(|_| kind.client_streams());
        let send_all = async move {
            if let Some(mut sender) = sender {
                for body in bodies {
                    if sender.send(body).await.is_err() {
                        return;
                    }
                }
                let _ = sender.close_send().await;
            }
        };
        match kind {
            StreamKind::ClientStreaming => {
                send_all.await;
                let raw = receiver.response().await.map_err(status_failure)?;
                check_codec(raw.codec)?;
                printer.print(raw.body)
            }
            _ => {
                let ((), printed) = futures::join!(send_all, printer.print_all(receiver));
                printed
            }
        }
    }
}

/// The method's stream kind; `None` for a unary method.
fn stream_kind(method: &MethodDescriptor) -> Option<StreamKind> {
    match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => None,
        (false, true) => Some(StreamKind::ServerStreaming),
        (true, false) => Some(StreamKind::ClientStreaming),
        (true, true) => Some(StreamKind::Bidirectional),
    }
}

fn check_codec(codec: u8) -> Result<(), Failure> {
    if codec == gorpc_proto::codec::PROTOBUF {
        return Ok(());
    }
    Err(Failure::other(format!(
        "the server answered in codec {codec}, expected protobuf ({})",
        gorpc_proto::codec::PROTOBUF
    )))
}

/// Prints responses as pretty JSON, one after another on stdout.
struct Printer {
    desc: MessageDescriptor,
    options: SerializeOptions,
}

impl Printer {
    fn print(&self, body: Bytes) -> Result<(), Failure> {
        let reply = DynamicMessage::decode(self.desc.clone(), body).map_err(|e| {
            Failure::other(format!(
                "cannot decode the reply as {}: {e}",
                self.desc.full_name()
            ))
        })?;
        let mut out = Vec::new();
        let mut serializer = serde_json::Serializer::pretty(&mut out);
        reply
            .serialize_with_options(&mut serializer, &self.options)
            .map_err(|e| Failure::other(format!("cannot print the reply as JSON: {e}")))?;
        println!("{}", String::from_utf8_lossy(&out));
        Ok(())
    }

    /// Prints each message of a response stream as it comes; an error status that ends
    /// the stream is the failure, after the messages before it.
    async fn print_all(&self, mut receiver: RawStreamReceiver) -> Result<(), Failure> {
        while let Some(item) = receiver.next().await {
            self.print(item.map_err(status_failure)?)?;
        }
        Ok(())
    }
}

/// Parses `proto` (and its imports) with protox.
fn load_pool(proto: &Path, include: &[PathBuf]) -> Result<DescriptorPool, Failure> {
    if !proto.is_file() {
        return Err(Failure::usage(format!(
            "{}: no such .proto file",
            proto.display()
        )));
    }
    let mut includes = include.to_vec();
    let own_dir = match proto.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    if !includes.contains(&own_dir) {
        includes.push(own_dir);
    }
    let mut compiler = protox::Compiler::new(&includes)
        .map_err(|e| Failure::usage(format!("{}: {e}", proto.display())))?;
    compiler
        .include_imports(true)
        .open_file(proto)
        .map_err(|e| Failure::usage(protox_error(proto, &e)))?;
    Ok(compiler.descriptor_pool())
}

/// A protox error with the file, line and column it points at, when it has them.
pub fn protox_error(proto: &Path, error: &protox::Error) -> String {
    use miette::Diagnostic as _;
    let file = error
        .file()
        .map(str::to_owned)
        .unwrap_or_else(|| proto.display().to_string());
    let position = error
        .labels()
        .and_then(|mut labels| labels.next())
        .zip(error.source_code())
        .and_then(|(label, source)| source.read_span(label.inner(), 0, 0).ok())
        .map(|span| format!(":{}:{}", span.line() + 1, span.column() + 1))
        .unwrap_or_default();
    format!("{file}{position}: {error}")
}

/// Finds `/package.Service/Method` in the pool.
fn find_method(
    pool: &DescriptorPool,
    path: &MethodPath,
    origin: &Origin<'_>,
) -> Result<MethodDescriptor, Failure> {
    let service_name = &path.service;
    let method_name = &path.method;
    let service = pool
        .get_service_by_name(service_name)
        .ok_or_else(|| origin.unknown_service(service_name, Some(pool)))?;
    let method = service
        .methods()
        .find(|m| m.name() == method_name)
        .ok_or_else(|| {
            let known: Vec<String> = service.methods().map(|m| m.name().to_owned()).collect();
            Failure::usage(format!(
                "unknown method `{method_name}` in service `{service_name}` (it has: {})",
                list(&known)
            ))
        })?;
    Ok(method)
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The --data argument, or the file or stdin it names with `@`.
fn read_data(data: &str) -> Result<String, Failure> {
    match data.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Failure::usage(format!("--data @-: cannot read stdin: {e}")))?;
            Ok(text)
        }
        Some(file) => std::fs::read_to_string(file)
            .map_err(|e| Failure::usage(format!("--data @{file}: {e}"))),
        None => Ok(data.to_owned()),
    }
}

/// Parses JSON values, one after another, into messages of type `desc`, refusing unknown
/// fields.
fn parse_requests(desc: MessageDescriptor, json: &str) -> Result<Vec<DynamicMessage>, Failure> {
    let bad = |n: usize, at: Option<String>, e: serde_json::Error| {
        let at = at
            .map(|path| format!("field `{path}`: "))
            .unwrap_or_default();
        let which = if n == 0 {
            String::new()
        } else {
            format!(" (message {})", n + 1)
        };
        Failure::usage(format!(
            "--data is not a valid {} request{which}: {at}{e}",
            desc.full_name()
        ))
    };
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let mut messages = Vec::new();
    let values = serde_json::Deserializer::from_str(json).into_iter::<serde_json::Value>();
    for (n, value) in values.enumerate() {
        let value = value.map_err(|e| bad(n, None, e))?;
        // Tracks where in the JSON an error happened, so a type error names its field.
        let mut track = serde_path_to_error::Track::new();
        let message = DynamicMessage::deserialize_with_options(
            desc.clone(),
            serde_path_to_error::Deserializer::new(value, &mut track),
            &options,
        )
        .map_err(|e| {
            let path = track.path().to_string();
            bad(n, (path != "." && path != "?").then_some(path), e)
        })?;
        messages.push(message);
    }
    Ok(messages)
}
