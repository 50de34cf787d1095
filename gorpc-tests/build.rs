//! Generates the protobuf service the HTTP tests call (proto/greeter.proto).

fn main() -> std::io::Result<()> {
    gorpc_build::compile_protos(&["proto/greeter.proto"], &["proto"])
}
