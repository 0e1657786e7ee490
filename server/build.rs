// Generates the etcd v3 API (client and server) from server/proto with a vendored protoc,
// so a fresh machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let protos = [
        "proto/etcd/kv.proto",
        "proto/etcd/auth.proto",
        "proto/etcd/lease.proto",
        "proto/etcd/rpc.proto",
        "proto/etcd/v3lock.proto",
        "proto/etcd/v3election.proto",
        "proto/oxcd/internal.proto",
    ];
    // The descriptors also serve the JSON gateway (/v3/...), which maps JSON to messages by them.
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .build_client(true)
        .build_server(true)
        // prost's codec, answering a too deeply nested Txn as etcd does (pb.rs).
        .codec_path("crate::pb::codec::EtcdCodec")
        .compile_protos(&protos, &["proto/etcd", "proto/oxcd"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
