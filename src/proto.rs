//! The generated `vcid.v1` wire types, gRPC client and server traits.
//!
//! Generated at build time from `proto/vcid/v1/vcid.proto` (see `build.rs`);
//! nothing here is written by hand. Conversions between these types and the
//! math core's types live in the server, not here.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("vcid.v1");

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vcid_descriptor.bin"));
