//! Generates the test workload's gRPC code with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Build scripts are single-threaded: nothing reads the environment concurrently.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/echo.proto"], &["proto"])?;
    Ok(())
}
