//! Compiles `proto/arbiter/v1/*.proto` (the gRPC API) and
//! `proto/arbiter/log/v1/log.proto` (the Raft log format, messages only)
//! with a vendored `protoc`, so a fresh machine needs no system protobuf
//! compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, and prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/arbiter/v1/rate_limiter.proto",
        "proto/arbiter/v1/leases.proto",
        "proto/arbiter/v1/idempotency.proto",
        "proto/arbiter/v1/cluster.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("arbiter_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    let log = "proto/arbiter/log/v1/log.proto";
    println!("cargo:rerun-if-changed={log}");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&[log], &["proto"])?;
    Ok(())
}
