//! Compiles the protos with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Istio's certificate service, with tonic's usual codec.
    let ca = "proto/istio/v1/auth/ca.proto";
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile([ca], ["proto"])?)?;
    // meshward's own services: one long-lived distribution stream per proxy,
    // so per-stream buffers are sized for its small messages (`codec.rs`).
    let control = "proto/meshward/v1/control.proto";
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::SmallBuffers")
        .compile_fds(protox::compile([control], ["proto"])?)?;
    for file in [ca, control] {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
