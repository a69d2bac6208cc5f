//! Compiles `proto/vcid/v1/vcid.proto` with `protox` (a pure-Rust protobuf
//! compiler), so building vcid needs no system `protoc`. Also writes the
//! encoded file descriptor set that the gRPC reflection service serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/vcid/v1/vcid.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("vcid_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Zero-copy: the features of a received batch stay a slice of the
        // receive buffer, and a client clones a batch without copying.
        .bytes(".vcid.v1.FeatureBatch.features")
        // ... of a buffer each stream recycles (`proto::codec`).
        .codec_path("crate::proto::codec::Codec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
