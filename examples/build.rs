fn main() -> Result<(), Box<dyn std::error::Error>> {
    gorpc_build::compile_protos(
        &["proto/helloworld.proto", "proto/route_guide.proto"],
        &["proto"],
    )?;

    // tonic's clients and servers of the same services, for the interop tests
    // (tests/grpc_tonic.rs), which include them from $OUT_DIR/tonic. The messages are
    // gorpc-build's above (extern_path), so both sides speak the very same types.
    println!("cargo:rerun-if-changed=proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("tonic");
    std::fs::create_dir_all(&out_dir)?;
    let fds = protox::compile(["helloworld.proto", "route_guide.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .out_dir(&out_dir)
        .extern_path(".helloworld", "::gorpc_examples::helloworld")
        .extern_path(".routeguide", "::gorpc_examples::routeguide")
        .compile_fds(fds)?;
    Ok(())
}
