//! The daemon's two memory budgets, each shared by every run and stream:
//! open accumulators (`--max-accumulator-bytes`, [`Budget`]) and request
//! messages in flight (`--max-inflight-bytes`, [`Inflight`]).
//!
//! Owns the accounting, the RESOURCE_EXHAUSTED refusal of an accumulator
//! and the wait for in-flight room; it must not lock anything or know
//! about streams and epochs (runs reserve and release through [`Budget`],
//! the request body wrapper `server::deadline` through [`Inflight`]).
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
//! never fit. The buffers a shard's folds reuse (the fold's scratch, and
//! the rows of 16-bit batches widened to f64) are reserved here too once a
//! fold has grown them, and freed after that fold instead when the budget
//! has no room (while a batch folds, its message's in-flight bytes cover
//! them).
//!
//! # In-flight budget
//!
//! Every request message is charged to [`Inflight`] from the moment its
//! 5-byte gRPC prefix declares its length until its handler is done with
//! it (a batch applied or refused), before any of its payload is passed
//! on: the charge covers the received bytes, the decoded message and what
//! decoding and folding it allocate (`server::deadline` computes it per
//! method). While the budget is full, the body wrapper stops reading that
//! stream, so HTTP/2 flow control holds the client back; a message whose
//! charge exceeds the whole budget is refused with RESOURCE_EXHAUSTED.
//! Waiters are woken together and whoever fits first proceeds (no FIFO), so
//! a small request (GetRun, a 1-row batch) is not queued behind a large
//! one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

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

/// The budget of bytes held for request messages in flight.
#[derive(Debug)]
pub(crate) struct Inflight {
    bytes: Budget,
    /// Wakes every waiter when bytes are returned.
    freed: Notify,
}

impl Inflight {
    /// A budget of `limit` bytes, none held.
    pub(crate) fn new(limit: u64) -> Inflight {
        Inflight {
            bytes: Budget::new(limit),
            freed: Notify::new(),
        }
    }

    /// The configured limit in bytes.
    pub(crate) fn limit(&self) -> u64 {
        self.bytes.limit()
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> u64 {
        self.bytes.used()
    }

    /// Waits until `bytes` fit, then holds them until the permit is
    /// dropped. Callers refuse a charge above [`Inflight::limit`] first (it
    /// would wait forever).
    pub(crate) async fn acquire(self: Arc<Self>, bytes: u64) -> InflightPermit {
        loop {
            // Registered before the attempt, so a release in between wakes it.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.bytes.try_reserve(bytes).is_ok() {
                break;
            }
            freed.await;
        }
        InflightPermit {
            budget: self,
            bytes,
        }
    }
}

/// Bytes of one request message held in the [`Inflight`] budget; returned
/// when dropped.
#[derive(Debug)]
pub(crate) struct InflightPermit {
    budget: Arc<Inflight>,
    bytes: u64,
}

impl InflightPermit {
    /// Moves `bytes` of this permit (at most all of them) into a permit
    /// of their own.
    pub(crate) fn split(&mut self, bytes: u64) -> InflightPermit {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        InflightPermit {
            budget: Arc::clone(&self.budget),
            bytes,
        }
    }

    /// Takes over the bytes of `other` (a permit of the same budget).
    pub(crate) fn absorb(&mut self, mut other: InflightPermit) {
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for InflightPermit {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.bytes.release(self.bytes);
            self.budget.freed.notify_waiters();
        }
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

    #[tokio::test]
    async fn inflight_waits_for_room_and_lets_small_charges_pass() {
        let budget = Arc::new(Inflight::new(100));
        let big = Arc::clone(&budget).acquire(80).await;
        assert_eq!(budget.used(), 80);
        // 30 more do not fit: waits until the 80 are returned.
        let mut waiting = tokio::spawn(Arc::clone(&budget).acquire(30));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        // A small charge passes the waiting one.
        let small = Arc::clone(&budget).acquire(20).await;
        assert_eq!(budget.used(), 100);
        drop(big);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), &mut waiting)
            .await
            .expect("woken when bytes were returned")
            .unwrap();
        assert_eq!(budget.used(), 50);
        drop((small, second));
        assert_eq!(budget.used(), 0);
    }
}
