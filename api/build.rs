//! Generates the gRPC code from `proto/` with a vendored `protoc`, so no system protoc is needed,
//! and the control plane's side of `Discovery` by hand (`discovery::shared`): the same service
//! and messages on the wire, but destination answers and inbound policies go out already
//! encoded, so one encoding serves every stream that watches the same answer.

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

    use tonic_build::manual::{Builder, Method, Service};
    let method = |name: &str, route: &str, input: &str, output: &str, codec: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::discovery::{input}"))
            .output_type(output)
            .codec_path(codec)
            .server_streaming()
            .build()
    };
    let shared = "crate::encoded::EncodedCodec";
    let discovery = Service::builder()
        .name("Discovery")
        .package("strait.discovery.v1")
        .method(method(
            "watch",
            "Watch",
            "WatchRequest",
            "crate::encoded::Encoded<crate::discovery::DestinationUpdate>",
            shared,
        ))
        .method(method(
            "watch_inbound",
            "WatchInbound",
            "InboundRequest",
            "crate::encoded::Encoded<crate::discovery::InboundPolicy>",
            shared,
        ))
        .method(method(
            "watch_trust_anchors",
            "WatchTrustAnchors",
            "TrustAnchorsRequest",
            "crate::discovery::TrustAnchors",
            "tonic_prost::ProstCodec",
        ))
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[discovery]);
    Ok(())
}
