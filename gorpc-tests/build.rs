//! Generates the protobuf services the tests call: proto/greeter.proto (tests/http.rs),
//! proto/reflected/ and the examples' helloworld and route guide (tests/grpc_services.rs).

fn main() -> std::io::Result<()> {
    gorpc_build::compile_protos(
        &["proto/greeter.proto", "proto/reflected/stock.proto"],
        &["proto"],
    )?;
    gorpc_build::compile_protos(
        &[
            "../examples/proto/helloworld.proto",
            "../examples/proto/route_guide.proto",
        ],
        &["../examples/proto"],
    )
}
