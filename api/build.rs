//! Generates the gRPC code from `proto/` with a vendored `protoc`, so no system protoc is needed.
//! (The control plane's side of `Discovery` is written by hand: `src/shared.rs`.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded: nothing reads the environment concurrently.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure().compile_protos(
        &["proto/discovery.proto", "proto/identity.proto"],
        &["proto"],
    )?;
    Ok(())
}
