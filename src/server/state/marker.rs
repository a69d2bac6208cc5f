//! The durable markers that must precede ingest: the "open epoch" marker of
//! an epoch that has no accumulator yet, and the "dirty writer" marker of a
//! writer's first batch of an epoch since the epoch's last checkpoint
//! snapshot; and why they make a crash detectable.
//!
//! Owns the write-once coordination; it must not do the write itself (the
//! caller passes it, `store` performs it) nor lock anything else.
//!
//! # Open epochs and dirty writers across a crash
//!
//! An accumulator may only exist while its epoch has a durable marker (see
//! `store`), so that after a crash the daemon knows which epochs were open.
//! When a batch is the first of its (stream, epoch),
//! [`RunState::apply`](super::RunState::apply) changes nothing and returns
//! [`Applied::NeedsMarker`](super::Applied::NeedsMarker) with the epoch's
//! [`EpochMarker`] (one per epoch, shared by every batch that asks before
//! the accumulator exists); the caller writes the marker once (concurrent
//! ranks wait for the same write) and applies again, which then creates
//! the accumulator. Likewise, a writer's first batch of an epoch after each
//! checkpoint snapshot returns
//! [`Applied::NeedsWriterMarker`](super::Applied::NeedsWriterMarker): the
//! marker names the writer (`""` for batches without a `writer_id`) and the
//! snapshot generation; the checkpoint round that makes a later snapshot
//! durable removes it. Other batches never touch the disk.
//!
//! At start-up every marked epoch is restored (from its checkpoint, or
//! empty) and continues; the dirty-writer markers left are exactly the
//! writers whose batches after the checkpoint died with the process. Until
//! each of them has applied a batch again (a client resends everything it
//! was not told was durable), closing the epoch fails with DATA_LOSS naming
//! them and their last durable sequence: a close never reports a silently
//! partial epoch. Batches without a writer_id cannot be resent, so such an
//! epoch never closes. Epochs that earlier versions declared lost (table
//! `lost_epochs`) stay refused with DATA_LOSS (reason `epoch_lost`).

use std::sync::Arc;

/// The durable open marker of one epoch that has no accumulator yet:
/// written at most once by whichever batch gets there first, awaited by
/// every other batch of that epoch (see the module doc).
#[derive(Clone, Debug, Default)]
pub(crate) struct EpochMarker(Arc<tokio::sync::OnceCell<()>>);

impl EpochMarker {
    /// Whether the marker is known to be durable.
    pub(crate) fn is_written(&self) -> bool {
        self.0.initialized()
    }

    /// Runs `write` unless the marker is written; concurrent callers wait
    /// for the one write in progress, and after a failed write the next
    /// caller tries again.
    pub(crate) async fn write_once<F, Fut, E>(&self, write: F) -> Result<(), E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        self.0.get_or_try_init(write).await.map(|_| ())
    }
}

impl PartialEq for EpochMarker {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for EpochMarker {}
