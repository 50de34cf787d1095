//! `gorpc`: calls gorpc and gRPC services (like grpcurl), typed by .proto files or by the
//! server's reflection, lists and describes what a server serves, and scaffolds new gorpc
//! projects, from a .proto file or a starter one.
//!
//! `gorpc call` calls a method of any kind: unary, server streaming, client streaming or
//! bidirectional. `--data` holds the request as JSON, or for a client stream the requests,
//! JSON values one after another; each response is printed as JSON as it arrives. Without
//! `--proto`, the server's reflection service (`Server::reflection()`) describes the method.
//! `--transport grpc` calls over gRPC instead of gorpc's binary protocol: any gRPC server.
//!
//! ```text
//! gorpc call 127.0.0.1:50051 /helloworld.Greeter/SayHello --proto helloworld.proto --data '{"name":"x"}'
//! gorpc call 127.0.0.1:50051 /helloworld.Greeter/SayHello --data '{"name":"x"}'
//! gorpc call 127.0.0.1:50051 /routeguide.RouteGuide/RecordRoute --transport grpc --data '{"latitude":1} {"latitude":2}'
//! gorpc list 127.0.0.1:50051
//! gorpc describe 127.0.0.1:50051 routeguide.RouteGuide
//! gorpc new my-service
//! gorpc new my-service --proto helloworld.proto
//! ```
//!
//! Exit codes: 0 success, 1 other failures (I/O, an undecodable reply), 2 usage or input
//! errors (a server without reflection when no .proto is given included), 3 connection
//! failure, 4 the server answered with a non-OK status.

mod call;
mod new;
mod reflect;
mod remote;

use std::fmt;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code of failures that fit no other class (I/O errors, an undecodable reply).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of usage and input errors (also clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the server cannot be reached.
pub const EXIT_CONNECT: u8 = 3;
/// Exit code when the server answers with a non-OK status.
pub const EXIT_STATUS: u8 = 4;

/// A failure: the message printed after `error: ` on stderr, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit_code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl fmt::Display) -> Self {
        Failure {
            exit_code: EXIT_USAGE,
            message: message.to_string(),
        }
    }

    pub fn other(message: impl fmt::Display) -> Self {
        Failure {
            exit_code: EXIT_FAILURE,
            message: message.to_string(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "gorpc",
    version,
    about = "Call gorpc and gRPC services, typed by .proto files or the server's reflection, \
             and scaffold new gorpc projects",
    after_help = "Exit codes: 0 success, 1 other failure, 2 usage or input error, \
                  3 connection failure, 4 non-OK status from the server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Call a method of any kind with JSON requests and print the JSON responses.
    ///
    /// Unary, server streaming, client streaming and bidirectional methods alike: --data
    /// holds the request, or for a client-streaming or bidirectional method the requests,
    /// JSON values one after another, sent in order (for a bidirectional method, while its
    /// responses come). Each response is printed as JSON as it arrives. A non-OK status fails
    /// the call (exit code 4), after any responses that came before it.
    ///
    /// Without --proto, the server's reflection service describes the method's service
    /// (gorpc servers mount it with `Server::reflection()`); a server without one fails the
    /// call with exit code 2. --transport grpc calls any gRPC server, or a gorpc server
    /// with HTTP on (`Server::http()`); reflection goes over the same transport.
    Call(call::CallArgs),
    /// List the services a server's reflection service lists, one a line.
    List(reflect::ListArgs),
    /// Describe a service, method, message, enum or field as the server's reflection
    /// declares it, in .proto style.
    Describe(reflect::DescribeArgs),
    /// Scaffold a runnable Cargo project (server and client) from a .proto file, or from a
    /// starter one.
    ///
    /// Without --proto, writes a starter .proto (a `Greeter` service with a unary and a
    /// server-streaming method) and scaffolds from it. The server has a handler stub
    /// for every method of every service, of any kind (unary, server streaming, client
    /// streaming, bidirectional), answering default messages, and also answers HTTP/1.1 with
    /// JSON on its port; the client calls each method of the first service and prints what
    /// comes back. The binaries are NAME-server and NAME-client; README.md says how to run
    /// them and how to call the server with `gorpc call` and curl. Refuses to create the
    /// project inside another Cargo workspace without --in-workspace.
    New(new::NewArgs),
}

/// gorpc's own warnings (a connection that failed, a peer that was ejected) go to stderr;
/// `RUST_LOG` widens or narrows them. Results always go to stdout, so logs never mix with
/// output that scripts read.
fn init_logging() {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Call(args) => call::run(args),
        Command::List(args) => reflect::list(args),
        Command::Describe(args) => reflect::describe(args),
        Command::New(args) => new::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.exit_code)
        }
    }
}
