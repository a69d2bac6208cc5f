//! In-memory daemon state: the registry of runs, each run's streams with
//! their open epoch accumulators, closing and closed epochs (the history),
//! the per-writer duplicate filter, the accumulator memory budget and the
//! in-flight budget of request messages.
//!
//! Owns the locking discipline and the limits enforced on runs
//! (`--max-accumulator-bytes`, `--max-sequence-gaps-per-writer`); it must
//! not do I/O, decode wire bytes or compute metrics (callers do those
//! outside every lock).
//!
//! | module | owns |
//! |---|---|
//! | [`run`] | one run: streams, epoch slots, an epoch's life; the run and slot locks and their order (`# Concurrency`) |
//! | [`dedup`] | the per-writer duplicate filter and its admission rule |
//! | [`budget`] | the memory budgets: open accumulators and their shards, request messages in flight |
//! | [`marker`] | the durable open-epoch marker handshake and lost epochs |
//!
//! `State::runs` is an `RwLock` held only to look up, insert or remove a
//! run (never across an await or any computation, never while a run or
//! slot lock is held); everything else locks per run or per epoch (see
//! [`run`]).

mod budget;
mod dedup;
mod marker;
mod run;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::config::Limits;
use super::error::ServerError;

pub(crate) use budget::{Budget, Inflight, InflightPermit};
pub(crate) use dedup::SeqSet;
pub(crate) use marker::EpochMarker;
pub(crate) use run::{Applied, Contribution, RestoredEpoch, RunInfo, RunState};

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (every critical section leaves the data consistent before it can panic:
/// merges leave the accumulator unchanged on error).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The registry of runs, with the budget and limits every run is held to.
#[derive(Debug)]
pub(crate) struct State {
    runs: RwLock<BTreeMap<String, Arc<RunState>>>,
    /// The memory budget of all open accumulators.
    pub(crate) budget: Arc<Budget>,
    /// The budget of request messages in flight (`--max-inflight-bytes`).
    pub(crate) inflight: Arc<Inflight>,
    /// `--max-sequence-gaps-per-writer`, given to every run.
    max_sequence_gaps_per_writer: u64,
    /// Shards per open epoch: `--max-shards-per-epoch`, at most the cores.
    max_shards_per_epoch: usize,
}

impl State {
    /// An empty registry enforcing `limits`.
    pub(crate) fn new(limits: &Limits) -> State {
        State {
            runs: RwLock::new(BTreeMap::new()),
            budget: Arc::new(Budget::new(limits.max_accumulator_bytes)),
            inflight: Arc::new(Inflight::new(limits.max_inflight_bytes)),
            max_sequence_gaps_per_writer: limits.max_sequence_gaps_per_writer,
            max_shards_per_epoch: limits.shards_per_epoch(),
        }
    }

    /// A run held to this state's limits, not yet registered.
    pub(crate) fn new_run(&self, info: RunInfo, rows_ingested: u64) -> Arc<RunState> {
        Arc::new(RunState::new(
            info,
            rows_ingested,
            Arc::clone(&self.budget),
            self.max_sequence_gaps_per_writer,
            self.max_shards_per_epoch,
        ))
    }

    /// The run named `run_id`, or NOT_FOUND (INVALID_ARGUMENT for a name
    /// no run can have, e.g. an empty one).
    pub(crate) fn get(&self, run_id: &str) -> Result<Arc<RunState>, ServerError> {
        super::decode::check_run_id(run_id)?;
        self.runs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(run_id)
            .cloned()
            .ok_or_else(|| ServerError::RunNotFound(run_id.to_owned()))
    }

    /// The run, if registered.
    pub(crate) fn find(&self, run_id: &str) -> Option<Arc<RunState>> {
        self.get(run_id).ok()
    }

    /// Registers a run (replacing none: callers check first).
    pub(crate) fn insert(&self, run: Arc<RunState>) {
        self.runs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(run.info.run_id.clone(), run);
    }

    /// Unregisters a run and frees its accumulators.
    pub(crate) fn remove(&self, run_id: &str) -> Option<Arc<RunState>> {
        let run = self
            .runs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(run_id)?;
        run.mark_deleted();
        Some(run)
    }

    /// All runs ordered by id.
    pub(crate) fn list(&self) -> Vec<Arc<RunState>> {
        self.runs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}
