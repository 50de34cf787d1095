fn main() -> std::io::Result<()> {
    gorpc_build::compile_protos(
        &["proto/helloworld.proto", "proto/route_guide.proto"],
        &["proto"],
    )
}
