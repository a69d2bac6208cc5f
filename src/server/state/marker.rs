//! The durable "open epoch" marker of an epoch that has no accumulator yet,
//! and why epochs whose marker outlived their statistics are refused.
//!
//! Owns the write-once coordination; it must not do the write itself (the
//! caller passes it, `store` performs it) nor lock anything else.
//!
//! # Open-epoch markers and lost epochs
//!
//! An accumulator may only exist while its epoch has a durable marker (see
//! `store`), so that after a crash the daemon knows which epochs lost data.
//! When a batch is the first of its (stream, epoch),
//! [`RunState::apply`](super::RunState::apply) changes nothing and returns
//! [`Applied::NeedsMarker`](super::Applied::NeedsMarker) with the epoch's
//! [`EpochMarker`] (one per epoch, shared by every batch that asks before
//! the accumulator exists); the caller writes the marker once (concurrent
//! ranks wait for the same write) and applies again, which then creates
//! the accumulator and merges. Batches of an existing accumulator never
//! touch the marker, so the per-batch path has no disk write. Once the
//! shutdown checkpoint has frozen a run, no accumulator is created in it.
//!
//! Epochs found lost at start-up are kept per stream for the life of the
//! run: pushes and closes of them fail with DATA_LOSS (reason
//! `epoch_lost`), changing nothing, naming the start-up at or before which
//! the daemon stopped uncleanly. Refusing beats the alternative of opening
//! a fresh accumulator, whose close would report a partial epoch as if it
//! were whole; the client continues under a new epoch number. The
//! decision is recorded here, in `store` and in the README.

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
