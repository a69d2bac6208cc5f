//! In-memory daemon state: the registry of runs, each run's streams with
//! their open epoch accumulators, closing and closed epochs (the history),
//! the per-writer duplicate filter, and the accumulator memory budget.
//!
//! Owns the locking discipline; it must not do I/O, decode wire bytes or
//! compute metrics (callers do those outside every lock).
//!
//! # Concurrency
//!
//! * `State::runs` is an `RwLock` held only to look up, insert or remove a
//!   run (never across an await or any computation).
//! * Each run has one `Mutex<RunInner>` for its stream table and duplicate
//!   filter, held for map look-ups only (O(log n)), never for statistics.
//! * Each open (stream, epoch) has its own [`EpochSlot`] mutex; only the
//!   O(d²) `Accumulator::merge` runs under it. Batches of different epochs,
//!   streams or runs therefore merge in parallel; batches of the same epoch
//!   (several data-parallel ranks) serialise only the merge.
//! * Lock order: a slot lock may be taken before the run lock, never the
//!   reverse (no code acquires a slot while holding `RunInner`).
//!
//! A batch is applied in three steps: (1) under the run lock, reject closed
//! epochs, claim the `(writer_id, sequence)` key as in flight and find or
//! create the slot (reserving its memory); (2) under the slot lock, check the
//! slot is still open and merge; (3) under the run lock, record the key as
//! applied (or release the claim on failure). A close moves the slot from
//! `open` to `closing` under the run lock and then marks it `Closing` under
//! the slot lock, so a merge either lands before the close takes the
//! accumulator or is rejected with FAILED_PRECONDITION: never half-applied,
//! never lost.
//!
//! # Duplicate filter
//!
//! Per run and `writer_id`, a [`SeqSet`] of applied sequence numbers stored
//! as disjoint inclusive intervals, so a writer numbering its batches
//! 0, 1, 2, … (from any start) costs one interval; each gap costs one more.
//! At most [`MAX_INTERVALS_PER_WRITER`] intervals are kept: beyond that the
//! two lowest intervals are joined, i.e. the oldest gap is treated as
//! applied (a batch that arrives more than ~1000 gaps late is reported as a
//! duplicate instead of being applied twice). Claims of batches still being
//! merged are kept separately (`in_flight`), so a concurrent retry of the
//! same batch is counted as a duplicate rather than merged twice.
//!
//! # Memory budget
//!
//! Creating an open accumulator reserves `Accumulator::estimated_bytes(K, d)`
//! from one global [`Budget`]; closing the epoch or deleting the run releases
//! it. A reservation beyond `--max-accumulator-bytes` fails with
//! RESOURCE_EXHAUSTED before anything is created. Transient per-batch
//! statistics are not counted (they are bounded by the message size limit).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::proto::{EpochResult, OpenEpoch};
use crate::stats::Accumulator;

use super::decode::StreamKey;
use super::error::ServerError;

/// Most intervals one writer's [`SeqSet`] keeps (16 bytes each).
pub const MAX_INTERVALS_PER_WRITER: usize = 1024;

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (every critical section leaves the data consistent before it can panic:
/// merges leave the accumulator unchanged on error).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applied sequence numbers of one writer, as disjoint, non-adjacent
/// inclusive intervals `start -> end`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSet {
    ranges: BTreeMap<u64, u64>,
}

impl SeqSet {
    /// Whether `seq` was recorded.
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| seq <= end)
    }

    /// Records `seq`, joining adjacent intervals; keeps at most
    /// [`MAX_INTERVALS_PER_WRITER`] intervals by filling the oldest gap.
    pub fn insert(&mut self, seq: u64) {
        if self.contains(seq) {
            return;
        }
        let (mut start, mut end) = (seq, seq);
        if let Some((&prev_start, &prev_end)) = self.ranges.range(..seq).next_back() {
            if prev_end.checked_add(1) == Some(seq) {
                start = prev_start;
            }
        }
        if let Some(next) = seq.checked_add(1) {
            if let Some(next_end) = self.ranges.remove(&next) {
                end = next_end;
            }
        }
        self.ranges.insert(start, end);
        while self.ranges.len() > MAX_INTERVALS_PER_WRITER {
            let Some((first_start, _)) = self.ranges.pop_first() else {
                break;
            };
            let Some((_, second_end)) = self.ranges.pop_first() else {
                break;
            };
            self.ranges.insert(first_start, second_end);
        }
    }

    /// Number of intervals held.
    pub fn intervals(&self) -> usize {
        self.ranges.len()
    }

    /// `[start0, end0, start1, end1, …]` for a checkpoint.
    pub fn to_flat(&self) -> Vec<u64> {
        self.ranges.iter().flat_map(|(&s, &e)| [s, e]).collect()
    }

    /// Rebuilds from [`SeqSet::to_flat`] output (malformed pairs are
    /// skipped: the checkpoint was written by this code).
    pub fn from_flat(flat: &[u64]) -> SeqSet {
        let mut set = SeqSet::default();
        for pair in flat.chunks_exact(2) {
            if pair[0] <= pair[1] {
                set.ranges.insert(pair[0], pair[1]);
            }
        }
        set
    }
}

/// The global memory budget of open accumulators.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The configured limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, or returns the bytes in use when that would exceed
    /// the limit.
    pub fn try_reserve(&self, bytes: u64) -> Result<(), u64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .map(|_| ())
    }

    /// Reserves without checking (restoring a checkpoint must not lose data
    /// because the limit was lowered).
    pub fn force_reserve(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// Bytes of one accumulator of this shape, computed without overflow.
pub fn accumulator_bytes(num_classes: u32, feature_dim: u32) -> u128 {
    let (k, d) = (u128::from(num_classes), u128::from(feature_dim));
    8 * (d * d + 2 * k * d + 3 * k)
}

/// The immutable description of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    pub run_id: String,
    pub num_classes: u32,
    pub feature_dim: u32,
    pub metadata: BTreeMap<String, String>,
    pub created_unix_ms: i64,
}

/// Where an epoch slot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Closing,
    /// The run was deleted.
    Deleted,
    /// Written to the shutdown checkpoint; no more merges.
    Frozen,
}

#[derive(Debug)]
struct SlotInner {
    acc: Option<Accumulator>,
    phase: Phase,
}

/// One open (stream, epoch) accumulator with its own lock.
#[derive(Debug)]
pub struct EpochSlot {
    inner: Mutex<SlotInner>,
    /// Bytes reserved from the [`Budget`] for this slot.
    reserved: u64,
}

impl EpochSlot {
    fn new(acc: Accumulator, reserved: u64) -> EpochSlot {
        EpochSlot {
            inner: Mutex::new(SlotInner {
                acc: Some(acc),
                phase: Phase::Open,
            }),
            reserved,
        }
    }

    fn samples(&self) -> u64 {
        lock(&self.inner)
            .acc
            .as_ref()
            .map_or(0, Accumulator::samples)
    }
}

#[derive(Debug, Default)]
struct StreamState {
    open: BTreeMap<u64, Arc<EpochSlot>>,
    closing: BTreeSet<u64>,
    history: BTreeMap<u64, Arc<EpochResult>>,
}

#[derive(Debug, Default)]
struct WriterState {
    applied: SeqSet,
    in_flight: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct RunInner {
    streams: BTreeMap<StreamKey, StreamState>,
    writers: HashMap<String, WriterState>,
}

/// What happened to a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Merged; carries the batch's samples.
    Merged(u64),
    /// Its `(writer_id, sequence)` was applied before: skipped.
    Duplicate,
}

/// An epoch taken out of `open` by [`RunState::begin_close`].
#[derive(Debug)]
pub struct Closing {
    pub key: StreamKey,
    pub epoch: u64,
    slot: Arc<EpochSlot>,
    /// The accumulator to compute metrics from (given back on abort).
    pub acc: Accumulator,
    /// VCI of the closest lower closed epoch of the stream: `None` when
    /// there is none, `Some(None)` when its VCI was undefined.
    pub previous_vci: Option<Option<f64>>,
}

/// A run's open accumulators `(stream, epoch, statistics)` and its writers'
/// duplicate filters, as frozen for the shutdown checkpoint.
pub type FrozenRun = (Vec<(StreamKey, u64, Accumulator)>, Vec<(String, SeqSet)>);

/// One run: its description, counters, streams and duplicate filter.
#[derive(Debug)]
pub struct RunState {
    pub info: RunInfo,
    rows_ingested: AtomicU64,
    deleted: AtomicBool,
    inner: Mutex<RunInner>,
}

impl RunState {
    pub fn new(info: RunInfo, rows_ingested: u64) -> RunState {
        RunState {
            info,
            rows_ingested: AtomicU64::new(rows_ingested),
            deleted: AtomicBool::new(false),
            inner: Mutex::new(RunInner::default()),
        }
    }

    pub fn rows_ingested(&self) -> u64 {
        self.rows_ingested.load(Ordering::Relaxed)
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    fn stream_name(&self, key: &StreamKey) -> String {
        key.display(&self.info.run_id)
    }

    fn budget_error(&self, needed: u64, in_use: u64, budget: &Budget) -> ServerError {
        ServerError::BudgetExceeded {
            run_id: self.info.run_id.clone(),
            num_classes: self.info.num_classes,
            feature_dim: self.info.feature_dim,
            needed,
            in_use,
            available: budget.limit().saturating_sub(in_use),
            budget: budget.limit(),
        }
    }

    /// Whether `(writer_id, sequence)` was already applied (a cheap check
    /// before computing a batch's statistics; [`RunState::apply`] decides).
    pub fn is_duplicate(&self, dedup: Option<&(String, u64)>) -> bool {
        let Some((writer, seq)) = dedup else {
            return false;
        };
        let inner = lock(&self.inner);
        inner
            .writers
            .get(writer)
            .is_some_and(|w| w.applied.contains(*seq) || w.in_flight.contains(seq))
    }

    /// Merges a batch's statistics into the open accumulator of
    /// `(key, epoch)`, creating it if needed. Whole or nothing.
    pub fn apply(
        &self,
        key: &StreamKey,
        epoch: u64,
        batch: &Accumulator,
        dedup: Option<&(String, u64)>,
        budget: &Budget,
    ) -> Result<Applied, ServerError> {
        // Step 1: admission under the run lock.
        let slot = {
            let mut inner = lock(&self.inner);
            if self.is_deleted() {
                return Err(ServerError::RunNotFound(self.info.run_id.clone()));
            }
            if let Some((writer, seq)) = dedup {
                if let Some(w) = inner.writers.get(writer) {
                    if w.applied.contains(*seq) || w.in_flight.contains(seq) {
                        return Ok(Applied::Duplicate);
                    }
                }
            }
            let stream = inner.streams.entry(key.clone()).or_default();
            if stream.history.contains_key(&epoch) {
                return Err(ServerError::EpochClosed {
                    stream: self.stream_name(key),
                    epoch,
                    state: "already closed",
                });
            }
            if stream.closing.contains(&epoch) {
                return Err(ServerError::EpochClosed {
                    stream: self.stream_name(key),
                    epoch,
                    state: "being closed",
                });
            }
            let slot = match stream.open.get(&epoch) {
                Some(slot) => Arc::clone(slot),
                None => {
                    let needed = u64::try_from(accumulator_bytes(
                        self.info.num_classes,
                        self.info.feature_dim,
                    ))
                    .unwrap_or(u64::MAX);
                    budget
                        .try_reserve(needed)
                        .map_err(|in_use| self.budget_error(needed, in_use, budget))?;
                    let acc = Accumulator::new(
                        self.info.num_classes as usize,
                        self.info.feature_dim as usize,
                    );
                    let slot = Arc::new(EpochSlot::new(acc, needed));
                    stream.open.insert(epoch, Arc::clone(&slot));
                    slot
                }
            };
            if let Some((writer, seq)) = dedup {
                inner
                    .writers
                    .entry(writer.clone())
                    .or_default()
                    .in_flight
                    .insert(*seq);
            }
            slot
        };

        // Step 2: the merge, under the slot lock only.
        let merged = {
            let mut guard = lock(&slot.inner);
            let SlotInner { acc, phase } = &mut *guard;
            match (phase, acc) {
                (Phase::Open, Some(acc)) => acc.merge(batch).map_err(ServerError::from),
                (Phase::Closing, _) => Err(ServerError::EpochClosed {
                    stream: self.stream_name(key),
                    epoch,
                    state: "being closed",
                }),
                (Phase::Deleted, _) => Err(ServerError::RunNotFound(self.info.run_id.clone())),
                _ => Err(ServerError::ShuttingDown(
                    "open accumulators were checkpointed".into(),
                )),
            }
        };

        // Step 3: settle the claim.
        if let Some((writer, seq)) = dedup {
            let mut inner = lock(&self.inner);
            if let Some(w) = inner.writers.get_mut(writer) {
                w.in_flight.remove(seq);
                if merged.is_ok() {
                    w.applied.insert(*seq);
                }
            }
        }
        merged?;
        let samples = batch.samples();
        self.rows_ingested.fetch_add(samples, Ordering::Relaxed);
        Ok(Applied::Merged(samples))
    }

    /// Takes `(key, epoch)` out of the open set for closing.
    pub fn begin_close(&self, key: &StreamKey, epoch: u64) -> Result<Closing, ServerError> {
        let (slot, previous_vci) = {
            let mut inner = lock(&self.inner);
            if self.is_deleted() {
                return Err(ServerError::RunNotFound(self.info.run_id.clone()));
            }
            let name = self.stream_name(key);
            let Some(stream) = inner.streams.get_mut(key) else {
                return Err(ServerError::NoOpenEpoch {
                    stream: name,
                    epoch,
                    open: "none".into(),
                });
            };
            if stream.history.contains_key(&epoch) {
                return Err(ServerError::EpochClosed {
                    stream: name,
                    epoch,
                    state: "already closed",
                });
            }
            if stream.closing.contains(&epoch) {
                return Err(ServerError::EpochClosed {
                    stream: name,
                    epoch,
                    state: "being closed",
                });
            }
            let Some(slot) = stream.open.remove(&epoch) else {
                let open: Vec<String> = stream.open.keys().map(u64::to_string).collect();
                return Err(ServerError::NoOpenEpoch {
                    stream: name,
                    epoch,
                    open: if open.is_empty() {
                        "none".into()
                    } else {
                        open.join(", ")
                    },
                });
            };
            stream.closing.insert(epoch);
            let previous_vci = stream
                .history
                .range(..epoch)
                .next_back()
                .map(|(_, r)| r.vci);
            (slot, previous_vci)
        };
        let acc = {
            let mut guard = lock(&slot.inner);
            guard.phase = Phase::Closing;
            guard.acc.take()
        };
        match acc {
            Some(acc) => Ok(Closing {
                key: key.clone(),
                epoch,
                slot,
                acc,
                previous_vci,
            }),
            None => {
                // Deleted or checkpointed between the two locks.
                let mut inner = lock(&self.inner);
                if let Some(stream) = inner.streams.get_mut(key) {
                    stream.closing.remove(&epoch);
                }
                Err(if self.is_deleted() {
                    ServerError::RunNotFound(self.info.run_id.clone())
                } else {
                    ServerError::ShuttingDown("open accumulators were checkpointed".into())
                })
            }
        }
    }

    /// Puts a closing epoch back into the open set (its metrics or its
    /// storage failed), so no data is lost; frees it instead when the run
    /// was deleted meanwhile. Takes the slot lock, then the run lock (the
    /// allowed order), so a concurrent delete is seen consistently.
    pub fn abort_close(&self, closing: Closing, budget: &Budget) {
        let Closing {
            key,
            epoch,
            slot,
            acc,
            ..
        } = closing;
        let mut guard = lock(&slot.inner);
        let mut inner = lock(&self.inner);
        if self.is_deleted() {
            guard.phase = Phase::Deleted;
            guard.acc = None;
            budget.release(slot.reserved);
            return;
        }
        guard.acc = Some(acc);
        guard.phase = Phase::Open;
        let stream = inner.streams.entry(key).or_default();
        stream.closing.remove(&epoch);
        stream.open.insert(epoch, Arc::clone(&slot));
    }

    /// Records the durable result of a closing epoch and frees its memory.
    pub fn finish_close(&self, closing: Closing, result: Arc<EpochResult>, budget: &Budget) {
        {
            let mut inner = lock(&self.inner);
            let stream = inner.streams.entry(closing.key.clone()).or_default();
            stream.closing.remove(&closing.epoch);
            stream.history.insert(closing.epoch, result);
        }
        let reserved = closing.slot.reserved;
        drop(closing);
        budget.release(reserved);
    }

    /// Marks the run deleted and frees every open accumulator.
    pub fn mark_deleted(&self, budget: &Budget) {
        let slots: Vec<Arc<EpochSlot>> = {
            let mut inner = lock(&self.inner);
            self.deleted.store(true, Ordering::Release);
            let slots = inner
                .streams
                .values_mut()
                .flat_map(|s| std::mem::take(&mut s.open).into_values())
                .collect();
            inner.streams.clear();
            inner.writers.clear();
            slots
        };
        for slot in slots {
            let mut guard = lock(&slot.inner);
            guard.phase = Phase::Deleted;
            guard.acc = None;
            budget.release(slot.reserved);
        }
    }

    /// Freezes every open accumulator and returns copies of them with the
    /// duplicate filter, for the shutdown checkpoint. Later merges fail with
    /// UNAVAILABLE, so nothing is acknowledged that the checkpoint misses.
    pub fn freeze_for_checkpoint(&self) -> FrozenRun {
        let (slots, writers) = {
            let inner = lock(&self.inner);
            let slots: Vec<(StreamKey, u64, Arc<EpochSlot>)> = inner
                .streams
                .iter()
                .flat_map(|(key, s)| {
                    s.open
                        .iter()
                        .map(move |(&epoch, slot)| (key.clone(), epoch, Arc::clone(slot)))
                })
                .collect();
            let writers = inner
                .writers
                .iter()
                .map(|(w, state)| (w.clone(), state.applied.clone()))
                .collect();
            (slots, writers)
        };
        let mut epochs = Vec::new();
        for (key, epoch, slot) in slots {
            let mut guard = lock(&slot.inner);
            if guard.phase == Phase::Open {
                guard.phase = Phase::Frozen;
                if let Some(acc) = guard.acc.as_ref() {
                    epochs.push((key, epoch, acc.clone()));
                }
            }
        }
        (epochs, writers)
    }

    /// Restores an open accumulator from a checkpoint.
    pub fn restore_open(&self, key: StreamKey, epoch: u64, acc: Accumulator, budget: &Budget) {
        let reserved = u64::try_from(accumulator_bytes(
            self.info.num_classes,
            self.info.feature_dim,
        ))
        .unwrap_or(u64::MAX);
        budget.force_reserve(reserved);
        let mut inner = lock(&self.inner);
        let stream = inner.streams.entry(key).or_default();
        if let Some(old) = stream
            .open
            .insert(epoch, Arc::new(EpochSlot::new(acc, reserved)))
        {
            budget.release(old.reserved);
        }
    }

    /// Restores a closed epoch's result.
    pub fn restore_result(&self, key: StreamKey, result: Arc<EpochResult>) {
        let mut inner = lock(&self.inner);
        inner
            .streams
            .entry(key)
            .or_default()
            .history
            .insert(result.epoch, result);
    }

    /// Restores a writer's duplicate filter.
    pub fn restore_writer(&self, writer_id: String, applied: SeqSet) {
        let mut inner = lock(&self.inner);
        inner.writers.entry(writer_id).or_default().applied = applied;
    }

    /// Open epochs with their sample counts, ordered by split, layer, epoch.
    pub fn open_epochs(&self) -> Vec<OpenEpoch> {
        let slots: Vec<(StreamKey, u64, Arc<EpochSlot>)> = {
            let inner = lock(&self.inner);
            inner
                .streams
                .iter()
                .flat_map(|(key, s)| {
                    s.open
                        .iter()
                        .map(move |(&epoch, slot)| (key.clone(), epoch, Arc::clone(slot)))
                })
                .collect()
        };
        slots
            .into_iter()
            .map(|(key, epoch, slot)| OpenEpoch {
                split: key.split,
                layer: key.layer,
                epoch,
                samples: slot.samples(),
            })
            .collect()
    }

    /// Number of closed epochs over all streams.
    pub fn closed_epochs(&self) -> u64 {
        let inner = lock(&self.inner);
        inner.streams.values().map(|s| s.history.len() as u64).sum()
    }

    /// Closed results ordered by split, layer, epoch, optionally filtered.
    pub fn history(&self, split: Option<&str>, layer: Option<&str>) -> Vec<Arc<EpochResult>> {
        let inner = lock(&self.inner);
        inner
            .streams
            .iter()
            .filter(|(key, _)| split.is_none_or(|s| s == key.split))
            .filter(|(key, _)| layer.is_none_or(|l| l == key.layer))
            .flat_map(|(_, s)| s.history.values().cloned())
            .collect()
    }

    /// The result of the highest closed epoch of every stream.
    pub fn latest_results(&self) -> Vec<Arc<EpochResult>> {
        let inner = lock(&self.inner);
        inner
            .streams
            .values()
            .filter_map(|s| s.history.values().next_back().cloned())
            .collect()
    }
}

/// The registry of runs plus the memory budget.
#[derive(Debug)]
pub struct State {
    runs: RwLock<BTreeMap<String, Arc<RunState>>>,
    pub budget: Budget,
}

impl State {
    pub fn new(max_accumulator_bytes: u64) -> State {
        State {
            runs: RwLock::new(BTreeMap::new()),
            budget: Budget::new(max_accumulator_bytes),
        }
    }

    /// The run named `run_id`, or NOT_FOUND.
    pub fn get(&self, run_id: &str) -> Result<Arc<RunState>, ServerError> {
        self.runs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(run_id)
            .cloned()
            .ok_or_else(|| ServerError::RunNotFound(run_id.to_owned()))
    }

    /// The run, if registered.
    pub fn find(&self, run_id: &str) -> Option<Arc<RunState>> {
        self.get(run_id).ok()
    }

    /// Registers a run (replacing none: callers check first).
    pub fn insert(&self, run: Arc<RunState>) {
        self.runs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(run.info.run_id.clone(), run);
    }

    /// Unregisters a run and frees its accumulators.
    pub fn remove(&self, run_id: &str) -> Option<Arc<RunState>> {
        let run = self
            .runs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(run_id)?;
        run.mark_deleted(&self.budget);
        Some(run)
    }

    /// All runs ordered by id.
    pub fn list(&self) -> Vec<Arc<RunState>> {
        self.runs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqset_joins_and_bounds() {
        let mut s = SeqSet::default();
        for seq in [5, 7, 6, 1, 2, 3] {
            s.insert(seq);
        }
        assert_eq!(s.to_flat(), vec![1, 3, 5, 7]);
        assert!(s.contains(2) && s.contains(6) && !s.contains(4) && !s.contains(0));
        s.insert(4);
        assert_eq!(s.to_flat(), vec![1, 7]);
        s.insert(u64::MAX);
        assert!(s.contains(u64::MAX));
        assert_eq!(SeqSet::from_flat(&s.to_flat()), s);

        let mut sparse = SeqSet::default();
        for i in 0..(MAX_INTERVALS_PER_WRITER as u64 + 10) {
            sparse.insert(i * 2);
        }
        assert_eq!(sparse.intervals(), MAX_INTERVALS_PER_WRITER);
        // The oldest gaps were filled; the newest are still exact.
        assert!(sparse.contains(1));
        let last = (MAX_INTERVALS_PER_WRITER as u64 + 9) * 2;
        assert!(sparse.contains(last) && !sparse.contains(last - 1));
    }

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
