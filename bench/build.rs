//! Generates the tonic service from proto/bench.proto with no protoc: protox parses the file
//! into a FileDescriptorSet, and tonic-prost-build generates code from that.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/bench.proto");
    let fds = protox::compile(["bench.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`, so an echo costs tonic no extra copy.
        .bytes(".bench")
        .compile_fds(fds)?;
    Ok(())
}
