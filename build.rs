//! Generates the gRPC API's Rust code from `proto/clastor/v1/lock.proto`
//! (feature `grpc`; needs `protoc`, Debian's protobuf-compiler). The server
//! side serves it; the client side is what the tests (and Rust users who
//! want plain tonic) talk to it with.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_protos(&["proto/clastor/v1/lock.proto"], &["proto"])?;
    Ok(())
}
