//! Compiles `proto/arbiter/v1/*.proto` (the gRPC API) and
//! `proto/arbiter/log/v1/log.proto` (the Raft log format, messages only)
//! and Envoy's rate limit service (`proto/envoy`, server side only) and
//! OTLP's trace export (`proto/otlp`) with a
//! vendored `protoc`, so a fresh machine needs no system protobuf
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
        "proto/arbiter/v1/semaphores.proto",
        "proto/arbiter/v1/breakers.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("arbiter_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    let envoy = [
        "proto/envoy/service/ratelimit/v3/rls.proto",
        "proto/envoy/extensions/common/ratelimit/v3/ratelimit.proto",
        "proto/envoy/type/v3/ratelimit_unit.proto",
        "proto/envoy/config/core/v3/base.proto",
    ];
    for p in &envoy {
        println!("cargo:rerun-if-changed={p}");
    }
    // The client too: the tests and the CLI speak to the service.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("envoy_descriptor.bin"))
        .compile_protos(&envoy, &["proto"])?;
    // OTLP trace export: the client for `--otlp-endpoint`, the server for
    // the tests' collector.
    let otlp = "proto/otlp/trace_service.proto";
    println!("cargo:rerun-if-changed={otlp}");
    tonic_prost_build::configure().compile_protos(&[otlp], &["proto"])?;
    let log = "proto/arbiter/log/v1/log.proto";
    println!("cargo:rerun-if-changed={log}");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&[log], &["proto"])?;
    Ok(())
}
