//! The generated `vcid.v1` wire types, gRPC client and server traits, plus
//! the one conversion between a `StatsBlock` and the math core's
//! [`AccumulatorParts`] (the daemon's `PushStats` and checkpoints use it, and
//! so can a Rust client that aggregates statistics itself).
//!
//! Generated at build time from `proto/vcid/v1/vcid.proto` (see `build.rs`);
//! nothing else here is written by hand but [`codec`] (how the generated
//! client and server decode a message's bytes), and no other conversion
//! between these types and the math core's belongs here (the server owns
//! them).

#![allow(clippy::all, missing_docs)]

use crate::stats::AccumulatorParts;

pub mod codec;

tonic::include_proto!("vcid.v1");

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vcid_descriptor.bin"));

impl From<AccumulatorParts> for StatsBlock {
    /// The statistics of one epoch; `run_id`, `split`, `layer`, `epoch`,
    /// `writer_id` and `sequence` are left empty for the caller to set.
    fn from(parts: AccumulatorParts) -> StatsBlock {
        StatsBlock {
            class_counts: parts.class_counts,
            class_means: parts.class_means,
            scatter: parts.scatter,
            within_trace: parts.within_trace,
            unit_sum: parts.unit_sum,
            unit_count: parts.unit_count,
            unit_within_trace: parts.unit_within_trace,
            ..StatsBlock::default()
        }
    }
}

impl StatsBlock {
    /// The statistics of this block for a run of `num_classes` classes in
    /// `feature_dim` dimensions, unvalidated (`Accumulator::from_parts`
    /// checks them); the inverse of `From<AccumulatorParts>`.
    pub fn into_parts(self, num_classes: u32, feature_dim: u32) -> AccumulatorParts {
        AccumulatorParts {
            num_classes: num_classes as usize,
            feature_dim: feature_dim as usize,
            class_counts: self.class_counts,
            class_means: self.class_means,
            scatter: self.scatter,
            within_trace: self.within_trace,
            unit_sum: self.unit_sum,
            unit_count: self.unit_count,
            unit_within_trace: self.unit_within_trace,
        }
    }
}
