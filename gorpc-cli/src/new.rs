//! `gorpc new`: scaffolds a Cargo project with a server and a client of the services in a
//! .proto file, built by gorpc-build. Without a .proto file it writes a starter one (a
//! `Greeter` with a unary and a server-streaming method) and scaffolds from it the same way.
//!
//! The server implements every method of every service with a stub answering default
//! messages, for each of the four kinds: unary, server streaming (one response),
//! client streaming (reads all requests, then one response) and bidirectional (one
//! response per request). It also answers HTTP/1.1 with JSON on its port. The client calls
//! each method of the first service with a default request (for a client stream: one
//! request) and prints what comes back. Both log through tracing, filtered by `RUST_LOG`.
//! The binaries are `NAME-server` and `NAME-client`, so that projects sharing a target
//! directory keep theirs apart. README.md says how to run them and how to call the server
//! with `gorpc call` and curl.
//!
//! The project is a workspace of its own; `gorpc new` still refuses to create it inside
//! another Cargo workspace unless given `--in-workspace`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Args;
use prost_build::{Method, Module, Service, ServiceGenerator};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::call::protox_error;
use crate::Failure;

/// Versions of the scaffold's registry dependencies: the workspace's own (checked by a test).
const PROST_VERSION: &str = "0.14";
const PROST_TYPES_VERSION: &str = "0.14";
const TOKIO_VERSION: &str = "1.45";
const FUTURES_VERSION: &str = "0.3.31";
/// gorpc-cli's own dependency on the same line (checked by a test), so `cargo fetch` of this
/// workspace downloads it.
const TRACING_SUBSCRIBER_VERSION: &str = "0.3.23";

/// Where the scaffold's server listens, and its client calls, when given no address.
const DEFAULT_ADDR: &str = "127.0.0.1:50051";

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Name of the new crate; also the name of the directory created.
    #[arg(value_name = "NAME")]
    name: String,
    /// The .proto file with the services (copied into the project, with its imports).
    /// Default: a starter .proto, its package and file named after NAME, with a service
    /// `Greeter` of a unary and a server-streaming method.
    #[arg(long, value_name = "FILE")]
    proto: Option<PathBuf>,
    /// Directory to create the project in.
    #[arg(long, value_name = "PARENT", default_value = ".")]
    dir: PathBuf,
    /// Create the project even inside another Cargo workspace (it is a workspace of its
    /// own either way).
    #[arg(long)]
    in_workspace: bool,
    /// The gorpc-rs checkout the project depends on by path. Default: the one this tool
    /// was built from.
    #[arg(long, value_name = "PATH")]
    gorpc_path: Option<PathBuf>,
}

pub fn run(args: NewArgs) -> Result<(), Failure> {
    check_crate_name(&args.name)?;
    let root = args.dir.join(&args.name);
    if root.exists() {
        return Err(Failure::usage(format!(
            "{} already exists; refusing to overwrite it",
            root.display()
        )));
    }
    if !args.in_workspace {
        if let Some(manifest) = enclosing_workspace(&args.dir)? {
            return Err(Failure::usage(format!(
                "{} would be inside the Cargo workspace of {}; pass --in-workspace to create \
                 it there anyway (as a workspace of its own, nested in that one), or choose \
                 another --dir",
                std::path::absolute(&root).unwrap_or(root).display(),
                manifest.display()
            )));
        }
    }
    let gorpc_path = gorpc_path(args.gorpc_path.as_deref())?;
    // The starter proto goes through the same path as a given one: a file, parsed, then
    // copied into the project (so its directory lives until the project is written).
    let (proto, starter) = match args.proto {
        Some(proto) => (proto, None),
        None => {
            let dir = tempfile::tempdir()
                .map_err(|e| Failure::other(format!("cannot create a temporary directory: {e}")))?;
            let package = starter_package(&args.name);
            let path = dir.path().join(format!("{package}.proto"));
            fs::write(&path, starter_proto(&package))
                .map_err(|e| Failure::other(format!("{}: {e}", path.display())))?;
            (path, Some(dir))
        }
    };
    let plan = Plan::new(&args.name, &proto)?;

    fs::create_dir_all(&args.dir)
        .map_err(|e| Failure::other(format!("{}: {e}", args.dir.display())))?;
    fs::create_dir(&root).map_err(|e| Failure::other(format!("{}: {e}", root.display())))?;
    if let Err(e) = plan.write(&root, &gorpc_path) {
        // Only remove what this run created.
        let _ = fs::remove_dir_all(&root);
        return Err(Failure::other(e));
    }
    println!(
        "created {} ({} service{}: {}){}",
        root.display(),
        plan.services.len(),
        if plan.services.len() == 1 { "" } else { "s" },
        plan.services
            .iter()
            .map(|s| s.proto_path())
            .collect::<Vec<_>>()
            .join(", "),
        if starter.is_some() {
            format!(" from a starter proto/{}", plan.proto_name)
        } else {
            String::new()
        }
    );
    let name = &plan.name;
    println!("  cd {}", root.display());
    println!("  cargo run --bin {name}-server    # listens on {DEFAULT_ADDR}, also to HTTP/JSON");
    println!("  cargo run --bin {name}-client    # in another terminal: calls it");
    println!("README.md shows how to call it with `gorpc call` and with curl.");
    Ok(())
}

/// Cargo's rules for package names, plus what would not work as the crate's identifier in
/// the generated binaries.
fn check_crate_name(name: &str) -> Result<(), Failure> {
    let bad = |why: &str| Failure::usage(format!("`{name}` is not a valid crate name: {why}"));
    let first = name.chars().next().ok_or_else(|| bad("it is empty"))?;
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(bad("it must start with a letter or `_`"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(bad(&format!(
            "`{c}` is not allowed (use letters, digits, `-` and `_`)"
        )));
    }
    let ident = name.replace('-', "_");
    if ident == "_" || RESERVED.contains(&ident.as_str()) {
        return Err(bad("it is a Rust keyword or a reserved name"));
    }
    if DEPENDENCIES.contains(&ident.as_str()) {
        return Err(bad("the project depends on a crate of that name"));
    }
    Ok(())
}

const RESERVED: &[&str] = &[
    "abstract",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
    "alloc",
    "core",
    "std",
    "test",
    "proc_macro",
];

const DEPENDENCIES: &[&str] = &[
    "gorpc",
    "gorpc_tokio",
    "gorpc_build",
    "gorpc_proto",
    "gorpc_macros",
    "prost",
    "prost_types",
    "tokio",
    "futures",
];

/// The gorpc-rs checkout to depend on, as an absolute path.
fn gorpc_path(given: Option<&Path>) -> Result<PathBuf, Failure> {
    let path = match given {
        Some(path) => std::path::absolute(path)
            .map_err(|e| Failure::usage(format!("--gorpc-path {}: {e}", path.display())))?,
        // This crate lives in the repository's root.
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("gorpc-cli has a parent directory")
            .to_owned(),
    };
    for krate in ["gorpc", "gorpc-tokio", "gorpc-build"] {
        if !path.join(krate).join("Cargo.toml").is_file() {
            return Err(Failure::usage(format!(
                "{} is not a gorpc-rs checkout (no {krate}/Cargo.toml); pass --gorpc-path",
                path.display()
            )));
        }
    }
    Ok(path)
}

/// The Cargo.toml of the workspace `dir` lies in, if any: the nearest one up from it with a
/// `workspace` table, as Cargo finds a package's workspace root.
fn enclosing_workspace(dir: &Path) -> Result<Option<PathBuf>, Failure> {
    let dir = std::path::absolute(dir)
        .map_err(|e| Failure::usage(format!("--dir {}: {e}", dir.display())))?;
    // The part of it that exists yet (the root always does), links resolved as Cargo sees them.
    let existing = dir
        .ancestors()
        .find(|a| a.is_dir())
        .unwrap_or(dir.as_path());
    let existing = existing
        .canonicalize()
        .map_err(|e| Failure::usage(format!("--dir {}: {e}", existing.display())))?;
    for ancestor in existing.ancestors() {
        let manifest = ancestor.join("Cargo.toml");
        // A missing or unreadable manifest is no workspace Cargo could use either.
        if let Ok(text) = fs::read_to_string(&manifest) {
            if declares_workspace(&text) {
                return Ok(Some(manifest));
            }
        }
    }
    Ok(None)
}

/// Whether a Cargo.toml has a `workspace` table (`[workspace]`, or only `[workspace.*]`).
fn declares_workspace(manifest: &str) -> bool {
    match manifest.parse::<toml::Table>() {
        Ok(table) => table.contains_key("workspace"),
        // Cargo refuses to build with it; what matters is whether it meant a workspace.
        Err(_) => manifest.lines().any(|line| {
            let line = line.trim();
            line == "[workspace]" || line.starts_with("[workspace.")
        }),
    }
}

/// The starter proto's package: the crate's name as a lowercase identifier (`my-app` is
/// `my_app`), the style protobuf packages follow.
fn starter_package(name: &str) -> String {
    name.replace('-', "_").to_ascii_lowercase()
}

/// The .proto file `gorpc new` writes when given none.
fn starter_proto(package: &str) -> String {
    format!(
        r#"// The project's service, written by `gorpc new` as a start: change it, and the next
// build regenerates the Rust code (build.rs); then fill in the handlers in
// src/bin/server.rs.
syntax = "proto3";

package {package};

// Greets people by name.
service Greeter {{
  // Answers with a greeting.
  rpc SayHello (HelloRequest) returns (HelloReply);

  // Answers with a stream of greetings.
  rpc SayHelloStream (HelloRequest) returns (stream HelloReply);
}}

message HelloRequest {{
  // Who to greet.
  string name = 1;
}}

message HelloReply {{
  string message = 1;
}}
"#
    )
}

/// What to write: the .proto files, and what prost-build and gorpc-build will generate from
/// them (the same code the project's build.rs generates).
struct Plan {
    crate_ident: String,
    name: String,
    /// The main .proto file's name relative to proto/.
    proto_name: String,
    /// (name relative to proto/, source path) of the main file and its imports.
    proto_files: Vec<(String, PathBuf)>,
    /// Generated file names ("helloworld.rs", "_.rs" for no package).
    generated: Vec<String>,
    services: Vec<Service>,
    uses_well_known_types: bool,
    /// The messages, for the example requests of README.md.
    pool: DescriptorPool,
}

impl Plan {
    fn new(name: &str, proto: &Path) -> Result<Plan, Failure> {
        if !proto.is_file() {
            return Err(Failure::usage(format!(
                "{}: no such .proto file",
                proto.display()
            )));
        }
        let include = match proto.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut compiler = protox::Compiler::new([&include])
            .map_err(|e| Failure::usage(format!("{}: {e}", proto.display())))?;
        compiler
            .include_imports(true)
            .include_source_info(true)
            .open_file(proto)
            .map_err(|e| Failure::usage(protox_error(proto, &e)))?;
        let mut proto_files = Vec::new();
        let mut proto_name = None;
        let mut uses_well_known_types = false;
        for file in compiler.files() {
            match file.path() {
                Some(path) => proto_files.push((file.name().to_owned(), path.to_owned())),
                // Built into protox: google/protobuf/*.proto.
                None => uses_well_known_types = true,
            }
            if !file.is_import() {
                proto_name = Some(file.name().to_owned());
            }
        }
        let proto_name = proto_name.expect("the opened file is not an import");
        let pool = compiler.descriptor_pool();

        // Run prost-build as gorpc-build will, recording the services it hands to
        // generators, so the scaffold names exactly the types and methods that get generated.
        let out = tempfile::tempdir()
            .map_err(|e| Failure::other(format!("cannot create a temporary directory: {e}")))?;
        let services = Arc::new(Mutex::new(Vec::new()));
        let mut config = prost_build::Config::new();
        config.out_dir(out.path());
        config.service_generator(Box::new(Recorder(services.clone())));
        config
            .compile_fds(compiler.file_descriptor_set())
            .map_err(|e| Failure::other(format!("prost-build: {e}")))?;
        let services = std::mem::take(&mut *services.lock().expect("recorder panicked"));
        let mut generated = Vec::new();
        for entry in fs::read_dir(out.path())
            .map_err(|e| Failure::other(format!("{}: {e}", out.path().display())))?
        {
            let entry = entry.map_err(|e| Failure::other(e.to_string()))?;
            if let Some(file) = entry.file_name().to_str() {
                if file.ends_with(".rs") {
                    generated.push(file.to_owned());
                }
            }
        }
        generated.sort();

        if services.is_empty() {
            return Err(Failure::usage(format!(
                "{} declares no service; gorpc new needs at least one",
                proto.display()
            )));
        }
        for service in &services {
            if service.methods.is_empty() {
                return Err(Failure::usage(format!(
                    "service {} has no methods",
                    service.proto_path()
                )));
            }
        }
        Ok(Plan {
            crate_ident: name.replace('-', "_"),
            name: name.to_owned(),
            proto_name,
            proto_files,
            generated,
            services,
            uses_well_known_types,
            pool,
        })
    }

    fn write(&self, root: &Path, gorpc_path: &Path) -> Result<(), String> {
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
        };
        for (name, source) in &self.proto_files {
            let text =
                fs::read_to_string(source).map_err(|e| format!("{}: {e}", source.display()))?;
            write(&format!("proto/{name}"), &text)?;
        }
        write("Cargo.toml", &self.cargo_toml(gorpc_path))?;
        write(".gitignore", "/target\n")?;
        write("build.rs", &self.build_rs())?;
        write("src/lib.rs", &self.lib_rs())?;
        write("src/bin/server.rs", &self.server_rs())?;
        write("src/bin/client.rs", &self.client_rs())?;
        write("README.md", &self.readme(gorpc_path))?;
        rustfmt(root);
        Ok(())
    }

    fn cargo_toml(&self, gorpc: &Path) -> String {
        let dep = |krate: &str| toml_string(&gorpc.join(krate).display().to_string());
        let mut text = format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

# A project of its own, even when created inside another Cargo workspace.
[workspace]

# Named after the project, so that projects sharing a target directory keep their binaries.
[[bin]]
name = "{name}-server"
path = "src/bin/server.rs"

[[bin]]
name = "{name}-client"
path = "src/bin/client.rs"

[dependencies]
gorpc = {{ path = {gorpc} }}
gorpc-tokio = {{ path = {gorpc_tokio}, features = ["grpc"] }}
prost = {{ version = "{PROST_VERSION}", features = ["derive"] }}
tokio = {{ version = "{TOKIO_VERSION}", features = ["rt-multi-thread", "macros", "signal"] }}
{tracing_subscriber}
"#,
            name = self.name,
            gorpc = dep("gorpc"),
            gorpc_tokio = dep("gorpc-tokio"),
            tracing_subscriber = tracing_subscriber_dependency(),
        );
        if self.uses_well_known_types {
            let _ = writeln!(text, "prost-types = \"{PROST_TYPES_VERSION}\"");
        }
        if self.has_kind(|kind| kind != Kind::Unary) {
            let _ = writeln!(
                text,
                "futures = {{ version = \"{FUTURES_VERSION}\", default-features = false, \
                 features = [\"std\", \"async-await\"] }}"
            );
        }
        let _ = write!(
            text,
            "\n[build-dependencies]\ngorpc-build = {{ path = {} }}\n",
            dep("gorpc-build")
        );
        text
    }

    fn build_rs(&self) -> String {
        format!(
            "//! Generates the messages, service traits, servers and clients of proto/{proto}.\n\
             \n\
             fn main() -> std::io::Result<()> {{\n    \
                 gorpc_build::compile_protos(&[{path:?}], &[\"proto\"])\n\
             }}\n",
            proto = self.proto_name,
            path = format!("proto/{}", self.proto_name),
        )
    }

    fn lib_rs(&self) -> String {
        // The generated files, by module path: "a.b.rs" is module a::b, "_.rs" the root.
        #[derive(Default)]
        struct Node {
            file: Option<String>,
            children: BTreeMap<String, Node>,
        }
        fn emit(out: &mut String, node: &Node, depth: usize) {
            let indent = "    ".repeat(depth);
            if let Some(file) = &node.file {
                let _ = writeln!(
                    out,
                    "{indent}include!(concat!(env!(\"OUT_DIR\"), \"/{file}\"));"
                );
            }
            for (name, child) in &node.children {
                let _ = writeln!(out, "{indent}pub mod {name} {{");
                emit(out, child, depth + 1);
                let _ = writeln!(out, "{indent}}}");
            }
        }
        let mut root = Node::default();
        for file in &self.generated {
            let stem = file.trim_end_matches(".rs");
            let mut node = &mut root;
            if stem != "_" {
                for part in stem.split('.') {
                    node = node.children.entry(part.to_owned()).or_default();
                }
            }
            node.file = Some(file.clone());
        }
        let mut out = format!(
            "//! The messages, service traits, servers and clients generated from proto/{} by\n\
             //! gorpc-build (see build.rs).\n\n",
            self.proto_name
        );
        emit(&mut out, &root, 0);
        out
    }

    /// `crate::package::Name` for a type path relative to `service`'s package module, as
    /// prost-build writes it (`Name`, `super::other::Name`, `::prost_types::Empty`).
    fn type_path(&self, service: &Service, relative: &str) -> String {
        // Absolute (`::prost_types::Timestamp`) or a Rust type (`()` for Empty).
        if relative.starts_with("::") || relative.starts_with('(') {
            return relative.to_owned();
        }
        let mut parts: Vec<String> = Module::from_protobuf_package_name(&service.package)
            .parts()
            .map(str::to_owned)
            .collect();
        let mut rest = relative;
        while let Some(tail) = rest.strip_prefix("super::") {
            parts.pop();
            rest = tail;
        }
        let mut path = self.crate_ident.clone();
        for part in parts {
            path.push_str("::");
            path.push_str(&part);
        }
        path.push_str("::");
        path.push_str(rest);
        path
    }

    /// The path of one of `service`'s generated items (`Greeter`, `GreeterServer`, ...).
    fn service_item(&self, service: &Service, suffix: &str) -> String {
        self.type_path(service, &format!("{}{suffix}", service.name))
    }

    /// Whether any method of any service is of a kind `wanted` accepts.
    fn has_kind(&self, wanted: impl Fn(Kind) -> bool) -> bool {
        self.services
            .iter()
            .flat_map(|s| &s.methods)
            .any(|m| wanted(Kind::of(m)))
    }

    fn server_rs(&self) -> String {
        // Only what the stubs use, so that the scaffold builds without warnings.
        let reads_stream =
            self.has_kind(|kind| matches!(kind, Kind::ClientStreaming | Kind::Bidirectional));
        let mut uses = Vec::new();
        if reads_stream {
            uses.push("use futures::StreamExt;".to_owned());
        }
        let mut stream_items = Vec::new();
        if reads_stream {
            stream_items.push("RequestStream");
        }
        if self.has_kind(|kind| matches!(kind, Kind::ServerStreaming | Kind::Bidirectional)) {
            stream_items.push("ResponseSink");
        }
        if !stream_items.is_empty() {
            uses.push(format!(
                "use gorpc_tokio::stream::{{{}}};",
                stream_items.join(", ")
            ));
        }
        let mut items = vec!["Request"];
        if self.has_kind(|kind| matches!(kind, Kind::Unary | Kind::ClientStreaming)) {
            items.push("Response");
        }
        items.extend(["Router", "Status"]);
        uses.push(format!("use gorpc_tokio::{{{}}};", items.join(", ")));
        uses.push(LOGGING_USE.to_owned());

        let mut out = format!(
            "//! Serves every service of proto/{proto}, over gorpc and, on the same port,\n\
             //! HTTP/1.1 with JSON bodies (see README.md).\n\
             //!\n\
             //! cargo run --bin {name}-server -- [ADDR]      (default {DEFAULT_ADDR})\n\
             \n\
             use std::io::IsTerminal as _;\n\
             use std::net::SocketAddr;\n\
             use std::sync::Arc;\n\
             use std::time::Duration;\n\
             \n\
             {uses}\n\
             \n\
             /// Implements the services; fill in the method bodies.\n\
             #[derive(Debug, Default)]\n\
             struct Handlers;\n",
            proto = self.proto_name,
            name = self.name,
            uses = uses.join("\n"),
        );
        for service in &self.services {
            let _ = writeln!(
                out,
                "\nimpl {} for Handlers {{",
                self.service_item(service, "")
            );
            for (i, method) in service.methods.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                self.server_method(&mut out, service, method);
            }
            out.push_str("}\n");
        }
        let _ = write!(
            out,
            "\n#[tokio::main]\n\
             async fn main() -> Result<(), Box<dyn std::error::Error>> {{\n\
                 {LOGGING}    \
                 let addr: SocketAddr = std::env::args()\n        \
                     .nth(1)\n        \
                     .unwrap_or_else(|| \"{DEFAULT_ADDR}\".into())\n        \
                     .parse()?;\n    \
                 let handlers = Arc::new(Handlers);\n    \
                 let router = Router::new()",
        );
        for service in &self.services {
            let _ = write!(
                out,
                "\n        .add_service({}::from_arc(Arc::clone(&handlers)))",
                self.service_item(service, "Server")
            );
        }
        out.push_str(
            ";\n    \
                 // http(): also answers HTTP/1.1 requests on the same port, JSON included.\n    \
                 let server = gorpc_tokio::server(router)\n        \
                     .http()\n        \
                     .bind(addr)\n        \
                     .await?;\n    \
                 println!(\"listening on {}\", server.local_addr());\n    \
                 tokio::signal::ctrl_c().await?;\n    \
                 server.shutdown(Duration::from_secs(5)).await;\n    \
                 Ok(())\n\
             }\n",
        );
        out
    }

    /// The handler stub of one method, shaped like gorpc-build's trait method of its kind.
    fn server_method(&self, out: &mut String, service: &Service, method: &Method) {
        let name = &method.name;
        let input = self.type_path(service, &method.input_type);
        let output = self.type_path(service, &method.output_type);
        let path = method_path(service, &method.proto_name);
        let _ = match Kind::of(method) {
            Kind::Unary => writeln!(
                out,
                "    async fn {name}(\n        &self,\n        _request: Request<{input}>,\n    \
                 ) -> Result<Response<{output}>, Status> {{\n        \
                     // TODO: implement {path}.\n        \
                     Ok(Response::new(Default::default()))\n    \
                 }}"
            ),
            Kind::ServerStreaming => writeln!(
                out,
                "    async fn {name}(\n        &self,\n        _request: Request<{input}>,\n        \
                     mut sink: ResponseSink<{output}>,\n    \
                 ) -> Result<(), Status> {{\n        \
                     // TODO: implement {path}.\n        \
                     // Send each response; the stream ends when this returns.\n        \
                     sink.send(&Default::default()).await?;\n        \
                     Ok(())\n    \
                 }}"
            ),
            Kind::ClientStreaming => writeln!(
                out,
                "    async fn {name}(\n        &self,\n        \
                     request: Request<RequestStream<{input}>>,\n    \
                 ) -> Result<Response<{output}>, Status> {{\n        \
                     // TODO: implement {path}.\n        \
                     // Handle each request as it comes, and answer once the stream ended.\n        \
                     let mut requests = request.message;\n        \
                     let mut count = 0;\n        \
                     while let Some(message) = requests.next().await {{\n            \
                         let _message = message?;\n            \
                         count += 1;\n        \
                     }}\n        \
                     let _ = count;\n        \
                     Ok(Response::new(Default::default()))\n    \
                 }}"
            ),
            Kind::Bidirectional => writeln!(
                out,
                "    async fn {name}(\n        &self,\n        \
                     request: Request<RequestStream<{input}>>,\n        \
                     mut sink: ResponseSink<{output}>,\n    \
                 ) -> Result<(), Status> {{\n        \
                     // TODO: implement {path}.\n        \
                     // Send the responses to each request; the stream ends when this returns.\n        \
                     let mut requests = request.message;\n        \
                     while let Some(message) = requests.next().await {{\n            \
                         let _message = message?;\n            \
                         sink.send(&Default::default()).await?;\n        \
                     }}\n        \
                     Ok(())\n    \
                 }}"
            ),
        };
    }

    fn client_rs(&self) -> String {
        let service = &self.services[0];
        let mut calls = String::new();
        for method in &service.methods {
            self.client_call(&mut calls, service, method);
        }
        let kinds: Vec<Kind> = service.methods.iter().map(Kind::of).collect();
        let mut uses = String::new();
        if kinds
            .iter()
            .any(|kind| matches!(kind, Kind::ServerStreaming | Kind::Bidirectional))
        {
            uses.push_str("use futures::StreamExt;\n");
        }
        if kinds
            .iter()
            .any(|kind| matches!(kind, Kind::ClientStreaming | Kind::Bidirectional))
        {
            uses.push_str("use gorpc_tokio::CallOptions;\n");
        }
        uses.push_str(LOGGING_USE);
        uses.push('\n');
        format!(
            "//! Calls each method of {service_path} with default requests and prints what comes\n\
             //! back.\n\
             //!\n\
             //! cargo run --bin {name}-client -- [ADDR]      (default {DEFAULT_ADDR})\n\
             \n\
             use std::io::IsTerminal as _;\n\
             use std::net::SocketAddr;\n\
             use std::time::Duration;\n\
             \n\
             {uses}\
             \n\
             #[tokio::main]\n\
             async fn main() -> Result<(), Box<dyn std::error::Error>> {{\n\
                 {LOGGING}    \
                 let addr: SocketAddr = std::env::args()\n        \
                     .nth(1)\n        \
                     .unwrap_or_else(|| \"{DEFAULT_ADDR}\".into())\n        \
                     .parse()?;\n    \
                 // Every call gets a 10 s deadline unless its request sets one.\n    \
                 let client = {client}::new(gorpc_tokio::connect(addr).await?)\n        \
                     .with_timeout(Duration::from_secs(10));\n\
                 {calls}    \
                 Ok(())\n\
             }}\n",
            service_path = service.proto_path(),
            name = self.name,
            client = self.service_item(service, "Client"),
        )
    }

    /// The client's call of one method, shaped like gorpc-build's client method of its kind.
    fn client_call(&self, out: &mut String, service: &Service, method: &Method) {
        let path = method_path(service, &method.proto_name);
        let input = self.type_path(service, &method.input_type);
        let name = &method.name;
        let proto_name = &method.proto_name;
        let _ = match Kind::of(method) {
            Kind::Unary => write!(
                out,
                "\n    // {path}: one request, one response.\n    \
                 let request: {input} = Default::default();\n    \
                 let reply = client.{name}(request).await?;\n    \
                 println!(\"{proto_name} -> {{:?}}\", reply.message);\n"
            ),
            Kind::ServerStreaming => write!(
                out,
                "\n    // {path}: one request, a stream of responses.\n    \
                 let request: {input} = Default::default();\n    \
                 let mut replies = client.{name}(request).await?;\n    \
                 while let Some(reply) = replies.next().await {{\n        \
                     println!(\"{proto_name} -> {{:?}}\", reply?);\n    \
                 }}\n"
            ),
            Kind::ClientStreaming => write!(
                out,
                "\n    // {path}: a stream of requests (here one), one response.\n    \
                 let mut call = client.{name}(CallOptions::default()).await?;\n    \
                 let request: {input} = Default::default();\n    \
                 call.send(&request).await?;\n    \
                 let reply = call.finish().await?;\n    \
                 println!(\"{proto_name} -> {{:?}}\", reply.message);\n"
            ),
            Kind::Bidirectional => write!(
                out,
                "\n    // {path}: a stream of requests (here one), a stream of responses.\n    \
                 let mut call = client.{name}(CallOptions::default()).await?;\n    \
                 let request: {input} = Default::default();\n    \
                 call.sender.send(&request).await?;\n    \
                 call.sender.close_send().await?;\n    \
                 while let Some(reply) = call.responses.next().await {{\n        \
                     println!(\"{proto_name} -> {{:?}}\", reply?);\n    \
                 }}\n"
            ),
        };
    }

    /// README.md: what the project is, how to run it, and how to call it with `gorpc call`
    /// and with curl: commands that work from the project's directory as they are.
    fn readme(&self, gorpc: &Path) -> String {
        let name = &self.name;
        let proto = format!("proto/{}", self.proto_name);
        let first = self.services[0].proto_path();
        let services = self
            .services
            .iter()
            .map(|s| format!("`{}`", s.proto_path()))
            .collect::<Vec<_>>()
            .join(", ");
        let install = shell_word(&gorpc.join("gorpc-cli").display().to_string());
        let mut out = format!(
            "# {name}\n\
             \n\
             A gorpc service, {services}, declared in `{proto}`; created by `gorpc new`.\n\
             \n\
             - `{proto}`: the services and their messages. Each build generates their Rust \
             code with gorpc-build (`build.rs`): the messages, and for each service a trait, a \
             server and a client, which `src/lib.rs` includes.\n\
             - `src/bin/server.rs`, the binary `{name}-server`: implements every method with a \
             stub answering default messages. Fill in the `TODO`s.\n\
             - `src/bin/client.rs`, the binary `{name}-client`: calls each method of `{first}` \
             and prints what comes back.\n\
             \n\
             ## Run it\n\
             \n\
             ```sh\n\
             cargo run --bin {name}-server\n\
             ```\n\
             \n\
             The server listens on {DEFAULT_ADDR}, for gorpc and, on the same port, HTTP. In \
             another terminal:\n\
             \n\
             ```sh\n\
             cargo run --bin {name}-client\n\
             ```\n\
             \n\
             Both take another address after `--`: `cargo run --bin {name}-server -- \
             127.0.0.1:50052`. They log to stderr; `RUST_LOG` picks what (default `info`), \
             e.g. `RUST_LOG=debug cargo run --bin {name}-server`.\n\
             \n\
             ## Call it with `gorpc call`\n\
             \n\
             `gorpc call` sends requests written in JSON (protobuf's JSON mapping), typed by \
             the .proto file, and prints each response as JSON as it arrives. Install it from \
             the gorpc-rs checkout this project depends on:\n\
             \n\
             ```sh\n\
             cargo install --path {install}\n\
             ```\n\
             \n\
             Then, in this directory, while the server runs:\n\
             \n\
             ```sh\n"
        );
        let mut client_streams = false;
        for service in &self.services {
            for method in &service.methods {
                let kind = Kind::of(method);
                let sample = self.sample_request(method);
                let data = match kind {
                    Kind::Unary | Kind::ServerStreaming => sample,
                    Kind::ClientStreaming | Kind::Bidirectional => {
                        client_streams = true;
                        format!("{sample} {sample}")
                    }
                };
                let _ = writeln!(
                    out,
                    "gorpc call {DEFAULT_ADDR} {} --proto {} --data {}",
                    method_path(service, &method.proto_name),
                    shell_word(&proto),
                    shell_word(&data)
                );
            }
        }
        out.push_str("```\n\n");
        if client_streams {
            out.push_str(
                "The requests of a client stream are the JSON values of `--data` one after \
                 another.\n",
            );
        }
        out.push_str(
            "Each request above has every field at its default value: change them. \
             `gorpc call --help` tells the rest.\n\
             \n\
             ## Call it with curl\n\
             \n",
        );
        let unary: Vec<(&Service, &Method)> = self
            .services
            .iter()
            .flat_map(|s| s.methods.iter().map(move |m| (s, m)))
            .filter(|(_, m)| Kind::of(m) == Kind::Unary)
            .collect();
        if unary.is_empty() {
            out.push_str(
                "The server also answers HTTP/1.1 on its port, but for unary methods only (one \
                 request, one response), and this project has none.\n",
            );
            return out;
        }
        out.push_str(
            "The server also answers HTTP/1.1 on its port, for unary methods (one request, one \
             response): POST the request as JSON to the method's path, with the JSON content \
             type, and the response comes back as JSON.\n\
             \n\
             ```sh\n",
        );
        for (service, method) in unary {
            let _ = writeln!(
                out,
                "curl -X POST http://{DEFAULT_ADDR}{} -H 'content-type: application/json' -d {}",
                method_path(service, &method.proto_name),
                shell_word(&self.sample_request(method))
            );
        }
        out.push_str(
            "```\n\
             \n\
             The call's status is in the `x-gorpc-status` response header (0 for OK) and its \
             message in `x-gorpc-message`; `curl -i` shows them.\n",
        );
        out
    }

    /// A request for `method` in protobuf's JSON mapping, with every field that has no
    /// presence at its default value: the shape of the message, to fill in.
    fn sample_request(&self, method: &Method) -> String {
        let name = method.input_proto_type.trim_start_matches('.');
        let Some(desc) = self.pool.get_message_by_name(name) else {
            return "{}".to_owned();
        };
        let mut out = Vec::new();
        let options = SerializeOptions::new().skip_default_fields(false);
        match DynamicMessage::new(desc)
            .serialize_with_options(&mut serde_json::Serializer::new(&mut out), &options)
        {
            Ok(()) => String::from_utf8(out).unwrap_or_else(|_| "{}".to_owned()),
            Err(_) => "{}".to_owned(),
        }
    }
}

/// What the binaries use to log, beside `std::io::IsTerminal` (colours on a terminal only).
const LOGGING_USE: &str = "use tracing_subscriber::filter::{EnvFilter, LevelFilter};";

/// The first lines of the binaries' `main`: logs go to stderr, filtered by RUST_LOG.
const LOGGING: &str = "    \
    // Logs go to stderr; RUST_LOG picks which (default: info), e.g. RUST_LOG=debug.\n    \
    tracing_subscriber::fmt()\n        \
        .with_env_filter(\n            \
            EnvFilter::builder()\n                \
                .with_default_directive(LevelFilter::INFO.into())\n                \
                .from_env_lossy(),\n        \
        )\n        \
        .with_writer(std::io::stderr)\n        \
        .with_ansi(std::io::stderr().is_terminal())\n        \
        .init();\n";

/// The four shapes of an rpc, from its `stream` keywords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStreaming,
    ClientStreaming,
    Bidirectional,
}

impl Kind {
    fn of(method: &Method) -> Kind {
        match (method.client_streaming, method.server_streaming) {
            (false, false) => Kind::Unary,
            (false, true) => Kind::ServerStreaming,
            (true, false) => Kind::ClientStreaming,
            (true, true) => Kind::Bidirectional,
        }
    }
}

trait ProtoPath {
    fn proto_path(&self) -> String;
}

impl ProtoPath for Service {
    /// `package.Service`.
    fn proto_path(&self) -> String {
        if self.package.is_empty() {
            self.proto_name.clone()
        } else {
            format!("{}.{}", self.package, self.proto_name)
        }
    }
}

fn method_path(service: &Service, method: &str) -> String {
    format!("/{}/{method}", service.proto_path())
}

/// Hands each service prost-build generates to the scaffold instead of generating code.
struct Recorder(Arc<Mutex<Vec<Service>>>);

impl ServiceGenerator for Recorder {
    fn generate(&mut self, service: Service, buf: &mut String) {
        // Something, so that a package with services but no messages still gets its file,
        // as it does when gorpc-build generates the service code.
        buf.push_str("// service\n");
        self.0.lock().expect("recorder lock").push(service);
    }
}

/// The scaffold's line for tracing-subscriber, which gorpc-cli's Cargo.toml repeats.
fn tracing_subscriber_dependency() -> String {
    format!(
        "tracing-subscriber = {{ version = \"{TRACING_SUBSCRIBER_VERSION}\", \
         features = [\"env-filter\", \"fmt\"] }}"
    )
}

/// `s` as one word for a POSIX shell: as it is when that is safe, else in single quotes.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%=,".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Formats the generated Rust files if rustfmt is installed; the scaffold builds either way.
fn rustfmt(root: &Path) {
    let files = [
        "build.rs",
        "src/lib.rs",
        "src/bin/server.rs",
        "src/bin/client.rs",
    ];
    let _ = std::process::Command::new("rustfmt")
        .args(["--edition", "2021"])
        .args(files.iter().map(|f| root.join(f)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scaffold asks for the same versions as this workspace.
    #[test]
    fn versions_match_the_workspace() {
        let manifest = include_str!("../../Cargo.toml");
        let deps = manifest
            .split("[workspace.dependencies]")
            .nth(1)
            .expect("workspace dependencies");
        for (krate, version) in [
            ("prost", PROST_VERSION),
            ("prost-types", PROST_TYPES_VERSION),
            ("tokio", TOKIO_VERSION),
            ("futures", FUTURES_VERSION),
        ] {
            let line = deps
                .lines()
                .find(|l| l.starts_with(&format!("{krate} =")))
                .unwrap_or_else(|| panic!("{krate} in [workspace.dependencies]"));
            assert!(
                line.contains(&format!("\"{version}\"")),
                "{krate}: workspace says `{line}`, the scaffold {version}"
            );
        }
    }

    /// The scaffold's tracing-subscriber is gorpc-cli's own dependency, features and all, so
    /// that `cargo fetch` here downloads what the scaffold's offline builds need.
    #[test]
    fn tracing_subscriber_is_fetched_for_the_scaffold() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("[dev-dependencies]").next())
            .expect("dependencies");
        let wanted = tracing_subscriber_dependency();
        assert!(
            deps.lines().any(|line| line == wanted),
            "gorpc-cli's [dependencies] need the line `{wanted}`"
        );
    }

    #[test]
    fn crate_names() {
        for ok in ["hello", "my-service", "my_service2", "_x"] {
            assert!(check_crate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "2fast",
            "a b",
            "a.b",
            "fn",
            "std",
            "gorpc",
            "tokio",
            "gorpc-tokio",
            "_",
        ] {
            assert!(check_crate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn workspace_manifests() {
        for yes in [
            "[workspace]\nmembers = [\"a\"]\n",
            "[package]\nname = \"x\"\n\n[workspace]\n",
            "[workspace.package]\nedition = \"2021\"\n",
            "workspace = { members = [] }\n",
            // Not TOML, but meant as a workspace.
            "[workspace]\nmembers = [\n",
        ] {
            assert!(declares_workspace(yes), "{yes}");
        }
        for no in [
            "[package]\nname = \"x\"\n",
            "[package]\nname = \"x\"\nworkspace = \"..\"\n",
            "[dependencies]\nworkspace = \"1\"\n",
            "# [workspace]\n[package]\nname = \"x\"\n",
            "",
        ] {
            assert!(!declares_workspace(no), "{no}");
        }
    }

    /// The starter proto parses for any crate name, with the service and methods it
    /// promises.
    #[test]
    fn starter_protos() {
        for name in [
            "demo", "my-app", "MyApp", "_x", "message", "service", "syntax",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let package = starter_package(name);
            let path = dir.path().join(format!("{package}.proto"));
            fs::write(&path, starter_proto(&package)).unwrap();
            let plan = Plan::new(name, &path).unwrap_or_else(|e| panic!("{name}: {}", e.message));
            assert_eq!(plan.proto_name, format!("{package}.proto"));
            assert_eq!(plan.services.len(), 1);
            let service = &plan.services[0];
            assert_eq!(service.proto_path(), format!("{package}.Greeter"));
            let kinds: Vec<(&str, Kind)> = service
                .methods
                .iter()
                .map(|m| (m.proto_name.as_str(), Kind::of(m)))
                .collect();
            assert_eq!(
                kinds,
                [
                    ("SayHello", Kind::Unary),
                    ("SayHelloStream", Kind::ServerStreaming)
                ]
            );
            assert_eq!(plan.sample_request(&service.methods[0]), r#"{"name":""}"#);
        }
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("proto/a.proto"), "proto/a.proto");
        assert_eq!(shell_word(r#"{"a":""}"#), r#"'{"a":""}'"#);
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn toml_strings() {
        assert_eq!(toml_string(r#"C:\a "b""#), r#""C:\\a \"b\"""#);
    }
}
