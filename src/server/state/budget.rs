//! The memory budget of open accumulators: one per daemon, shared by every
//! run, bounded by `--max-accumulator-bytes`.
//!
//! Owns the accounting and the RESOURCE_EXHAUSTED refusal; it must not
//! lock anything or know about streams and epochs (runs reserve and release
//! through it).
//!
//! # Memory budget
//!
//! Opening an epoch reserves [`RunInfo::accumulator_bytes`]
//! (`Accumulator::estimated_bytes`, 8·(d² + 2Kd + 4K)) from the one
//! [`Budget`] for its first accumulator shard; every further shard (made
//! only while batches of the epoch arrive concurrently, up to
//! `--max-shards-per-epoch`) reserves as much again, and is not made when
//! the budget has no room (the batch then waits for an existing shard).
//! Closing the epoch releases all but one accumulator's worth as soon as
//! the shards are combined, and the rest when the result is stored;
//! deleting the run releases everything. Opening an epoch beyond
//! `--max-accumulator-bytes` fails with RESOURCE_EXHAUSTED before anything
//! is created, and `CreateRun` refuses a run whose single accumulator could
//! never fit. Per-batch memory (a decoded batch, a shard's fold scratch,
//! both O(rows·d)) is not counted: it is bounded by the message size limit.

use std::sync::atomic::{AtomicU64, Ordering};

use super::run::RunInfo;
use crate::server::error::ServerError;

/// The memory budget of all open accumulators together.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes, none reserved.
    pub(crate) fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The configured limit in bytes.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, or returns the bytes in use when that would exceed
    /// the limit.
    pub(crate) fn try_reserve(&self, bytes: u64) -> Result<(), u64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .map(|_| ())
    }

    /// Reserves without checking (restoring a checkpoint must not lose data
    /// because the limit was lowered).
    pub(crate) fn force_reserve(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Returns `bytes` reserved before.
    pub(crate) fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// The refusal of an accumulator of `run` that needs `needed` bytes
    /// while `in_use` are reserved.
    pub(crate) fn refusal(&self, run: &RunInfo, needed: u64, in_use: u64) -> ServerError {
        ServerError::BudgetExceeded {
            run_id: run.run_id.clone(),
            num_classes: run.num_classes,
            feature_dim: run.feature_dim,
            needed,
            in_use,
            available: self.limit.saturating_sub(in_use),
            budget: self.limit,
        }
    }

    /// Refuses a run whose single accumulator exceeds the whole budget
    /// (it could never open an epoch).
    pub(crate) fn check_fits(&self, run: &RunInfo) -> Result<(), ServerError> {
        let needed = run.accumulator_bytes();
        if needed > self.limit {
            return Err(self.refusal(run, needed, self.used()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_beyond_limit() {
        let b = Budget::new(100);
        assert!(b.try_reserve(60).is_ok());
        assert_eq!(b.try_reserve(50), Err(60));
        b.release(60);
        assert!(b.try_reserve(100).is_ok());
        assert_eq!(b.used(), 100);
    }
}
