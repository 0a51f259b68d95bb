//! Compiles the `.proto` files under `proto/` into Rust.
//!
//! Parsing is done by `protox` (pure Rust), so no system `protoc` is needed;
//! the resulting descriptor set is handed to `tonic-prost-build`, which emits
//! prost messages plus tonic clients and servers into `OUT_DIR`.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
    "meridian/v1/raft.proto",
    "meridian/v1/record.proto",
    "meridian/v1/internal.proto",
    "meridian/v1/mirror.proto",
    "meridian/v1/region.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let files: Vec<PathBuf> = PROTO_FILES.iter().map(|f| root.join(f)).collect();
    let fds = protox::compile(&files, [&root])?;

    // serde for etcd's packages, in grpc-gateway's JSON (proto field names as written, 64-bit
    // integers as strings, bytes in base64, enums by name): etcd's JSON gateway on the client port.
    let descriptors = prost::Message::encode_to_vec(&fds);
    pbjson_build::Builder::new().register_descriptors(&descriptors)?.preserve_proto_field_names().build(&[
        ".etcdserverpb",
        ".mvccpb",
        ".authpb",
        ".v3lockpb",
        ".v3electionpb",
    ])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
