//! One run's state: its streams with their open epoch accumulators,
//! closing and closed epochs (the history), lost epochs and the writers'
//! duplicate filters, with the locks that guard them.
//!
//! Owns the run's locking discipline and an epoch's life (open → closing →
//! closed, or deleted / frozen); it must not do I/O, decode wire bytes or
//! compute metrics (callers do those outside every lock). Sequence
//! bookkeeping is [`super::dedup`]'s, memory accounting [`super::budget`]'s.
//!
//! # Concurrency
//!
//! * Each run has one `Mutex<RunInner>` for its stream table and duplicate
//!   filter, held for map look-ups only (O(log n)), never for statistics.
//! * Each open (stream, epoch) has an [`EpochSlot`]: a few accumulator
//!   shards, each with its own mutex, and a phase `RwLock`. A batch is
//!   folded in place into a free shard (`try_lock` in shard order; when all
//!   are busy a new shard is added if the shard limit and the memory budget
//!   allow it, otherwise the batch waits for one), holding the phase lock
//!   shared for the whole fold. Concurrent streams of one epoch (several
//!   data-parallel ranks) therefore fold in parallel into different shards;
//!   batches of different epochs, streams or runs never share a lock.
//!   Close, checkpoint and delete take the phase lock exclusively, which
//!   waits for the folds in flight; then the shards are merged with the
//!   Chan formula ([`take_combined`] for a close, [`combined_packed`] for a
//!   checkpoint: the same bits). Every fold, and everything that takes a slot's
//!   locks, runs on the blocking pool, never on a runtime thread.
//! * A checkpoint snapshot takes the phase lock exclusively like a close,
//!   combines the shards and copies the [`Book`], so the statistics and the
//!   writers' sequences it writes always agree.
//! * Lock order: phase → shard list → shard → book. A slot lock may be taken
//!   before the run lock, never the reverse (no code acquires the phase,
//!   shard list or a shard while holding `RunInner`). The book is a leaf:
//!   nothing is acquired while it is held and it is never held during CPU
//!   work, so it may be taken under any lock (`begin_close` reads its
//!   missing writers under the run lock).
//!
//! A batch is applied in three steps: (1) under the run lock, skip
//! duplicates, reject a sequence beyond the writer's gap limit and closed
//! epochs, claim the `(writer_id, sequence)` key as in flight and find or
//! create the slot (reserving its first shard's memory); (2) under the
//! slot's phase lock (shared) and one shard's lock, check the slot is still
//! open and its writer's dirty marker written, fold, and note the sequence
//! in the slot's [`Book`] (what the next checkpoint of this epoch holds);
//! (3) under the run lock, record the key as applied (or
//! release the claim on failure), so a batch counts as applied exactly when
//! its rows are in a shard. A close moves the slot from `open` to `closing`
//! under the run lock and then marks it `Closing` under the phase lock, so a
//! fold either lands before the close combines the shards or is rejected
//! with FAILED_PRECONDITION: never half-applied, never lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use crate::proto::{EpochResult, OpenEpoch};
use crate::server::clock::utc_timestamp;
use crate::server::decode::{StreamKey, WireRows};
use crate::server::error::ServerError;
use crate::stats::{Accumulator, AccumulatorParts, FoldScratch, Par};

use super::budget::Budget;
use super::dedup::{SeqSet, WriterState};
use super::lock;
use super::marker::EpochMarker;

/// The immutable description of a run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RunInfo {
    pub(crate) run_id: String,
    /// Drawn at `CreateRun`: a run deleted and created again under the
    /// same id has another uid (`store`'s "Run identity").
    pub(crate) uid: u64,
    pub(crate) num_classes: u32,
    pub(crate) feature_dim: u32,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) created_unix_ms: i64,
}

impl RunInfo {
    /// Bytes one open accumulator of this run reserves from the budget
    /// (`u64::MAX` when the shape is too large to exist).
    pub(crate) fn accumulator_bytes(&self) -> u64 {
        Accumulator::estimated_bytes(self.num_classes.into(), self.feature_dim.into())
            .unwrap_or(u64::MAX)
    }
}

/// Where an epoch slot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Closing,
    /// The run was deleted.
    Deleted,
    /// Frozen for the shutdown checkpoint; no more merges.
    Frozen,
}

/// One accumulator of an open epoch with the scratch its folds reuse, so a
/// batch allocates nothing of size d × d, nor of size d × rows once the
/// scratch has grown to the batches' size. The scratch a shard keeps
/// between folds is reserved from the accumulator [`Budget`] like the
/// accumulator itself (`scratch_reserved` of the slot's `reserved`); when
/// the budget has no room for what a batch grew, the scratch is freed
/// after that fold (while a batch folds, its scratch is charged to its
/// message's in-flight bytes, `server::deadline`).
#[derive(Debug)]
struct Shard {
    acc: Accumulator,
    /// The fold's working memory.
    scratch: FoldScratch,
    /// A 16-bit batch's rows widened to f64 (`rows × d`, row-major);
    /// float32 rows are folded where they lie.
    rows: Vec<f64>,
    /// Bytes of `scratch` and `rows` reserved from the budget.
    scratch_reserved: u64,
}

impl Shard {
    /// Bytes held by the buffers a fold reuses.
    fn scratch_bytes(&self) -> u64 {
        (self.scratch.memory_bytes() + 8 * self.rows.capacity()) as u64
    }

    /// After a fold: reserves what the buffers grew from `budget` (adding
    /// it to the slot's `reserved`), or, when the budget has no room,
    /// frees the buffers and returns their whole reservation.
    fn keep_or_free_buffers(&mut self, budget: &Budget, reserved: &AtomicU64) {
        let held = self.scratch_bytes();
        if held <= self.scratch_reserved {
            return;
        }
        let more = held - self.scratch_reserved;
        if budget.try_reserve(more).is_ok() {
            reserved.fetch_add(more, Ordering::AcqRel);
            self.scratch_reserved = held;
        } else {
            self.scratch = FoldScratch::new();
            self.rows = Vec::new();
            budget.release(self.scratch_reserved);
            reserved.fetch_sub(self.scratch_reserved, Ordering::AcqRel);
            self.scratch_reserved = 0;
        }
    }
}

type ShardCell = Arc<Mutex<Shard>>;

fn new_shard(acc: Accumulator) -> ShardCell {
    Arc::new(Mutex::new(Shard {
        acc,
        scratch: FoldScratch::new(),
        rows: Vec::new(),
        scratch_reserved: 0,
    }))
}

/// What a batch brings to an epoch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Contribution<'a> {
    /// Rows in their wire encoding (labels and values already checked),
    /// folded in place: float32 as received, 16-bit encodings widened into
    /// the shard's buffer first.
    Rows {
        features: &'a WireRows,
        labels: &'a [u32],
    },
    /// Statistics from outside (`PushStats`), merged.
    Stats(&'a Accumulator),
}

impl Contribution<'_> {
    fn samples(&self) -> u64 {
        match self {
            Contribution::Rows { features, .. } => features.rows() as u64,
            Contribution::Stats(acc) => acc.samples(),
        }
    }

    /// Folds into `shard` with the triangular product's parallelism
    /// `par`; on error the shard's statistics are unchanged. Then
    /// [`Shard::keep_or_free_buffers`].
    fn fold_into(
        &self,
        shard: &mut Shard,
        par: Par,
        budget: &Budget,
        reserved: &AtomicU64,
    ) -> Result<(), ServerError> {
        match *self {
            Contribution::Rows { features, labels } => {
                let Shard {
                    acc, scratch, rows, ..
                } = shard;
                let folded = match features.float32() {
                    Some(values) => acc
                        .fold_values_with(values, labels, scratch, par)
                        .map_err(ServerError::from),
                    None => features
                        .widen_into(rows)
                        .and_then(|view| Ok(acc.fold_batch_with(view, labels, scratch, par)?)),
                };
                shard.keep_or_free_buffers(budget, reserved);
                folded?;
            }
            Contribution::Stats(stats) => shard.acc.merge(stats)?,
        }
        Ok(())
    }
}

/// An open epoch's delivery bookkeeping for periodic checkpoints. Folds
/// update it while they hold the slot's phase lock shared (after their
/// fold); a snapshot reads it with the phase lock exclusive, so the
/// statistics and the writers' sequences of a snapshot always agree.
#[derive(Debug, Default)]
struct Book {
    /// The sequences of each writer merged into this epoch (`""`: batches
    /// without a writer_id never enter it), checkpointed with the
    /// statistics so a restored epoch and its duplicate filter agree.
    writers: BTreeMap<String, SeqSet>,
    /// Bumped by every fold.
    version: u64,
    /// `version` as of the last durable checkpoint.
    durable_version: u64,
    /// Counts snapshots; the dirty-writer markers written since the last
    /// snapshot carry it (see [`super::marker`]).
    generation: u64,
    /// Writers whose dirty marker for this generation is durable (or being
    /// written).
    marked_writers: HashMap<String, EpochMarker>,
    /// Writers whose batches applied after the last checkpoint died with
    /// the previous process and that have not resent since, with the last
    /// sequence of theirs the checkpoint holds.
    missing: BTreeMap<String, Option<u64>>,
}

impl Book {
    /// What `writer` must wait for before its next fold into this epoch:
    /// its dirty marker of the current generation, unless already written.
    /// Allocates only when the writer is new to this generation.
    fn pending_marker(&mut self, writer: &str) -> Option<Applied> {
        if self
            .marked_writers
            .get(writer)
            .is_some_and(EpochMarker::is_written)
        {
            return None;
        }
        let generation = self.generation;
        let marker = self.marked_writers.entry(writer.to_owned()).or_default();
        Some(Applied::NeedsWriterMarker {
            marker: marker.clone(),
            writer: writer.to_owned(),
            generation,
        })
    }

    /// Notes a fold, and the `(writer_id, sequence)` it carried.
    fn folded(&mut self, dedup: Option<&(String, u64)>) {
        self.version += 1;
        if let Some((writer, seq)) = dedup {
            match self.writers.get_mut(writer) {
                Some(set) => set.insert(*seq),
                None => self.writers.entry(writer.clone()).or_default().insert(*seq),
            }
            // It resends what the previous process lost.
            self.missing.remove(writer);
        }
    }
}

/// An open epoch as read back from disk at start-up.
#[derive(Debug)]
pub(crate) struct RestoredEpoch {
    pub(crate) acc: Accumulator,
    pub(crate) writers: BTreeMap<String, SeqSet>,
    /// Above every generation stored for this epoch.
    pub(crate) generation: u64,
    pub(crate) missing: BTreeMap<String, Option<u64>>,
    pub(crate) durable_unix_ms: i64,
    /// Not yet in the current checkpoint format: the next round writes it.
    pub(crate) rewrite: bool,
}

/// A copy of one changed open epoch taken for a checkpoint round, with
/// the writers' sequences it holds.
#[derive(Debug)]
pub(crate) struct EpochSnapshot {
    pub(crate) key: StreamKey,
    pub(crate) epoch: u64,
    /// The combined statistics, the scatter packed
    /// (`Accumulator::merged_packed`), until the checkpoint that writes
    /// them takes them (so a round holds each epoch's statistics once).
    pub(crate) packed: Option<(AccumulatorParts, Vec<f64>)>,
    /// Samples in `packed`.
    pub(crate) samples: u64,
    pub(crate) writers: Vec<(String, SeqSet)>,
    /// Dirty-writer markers below it are covered by this snapshot.
    pub(crate) generation: u64,
    /// Writers still missing since an unclean stop: their markers stay.
    pub(crate) missing: Vec<String>,
    version: u64,
    slot: Arc<EpochSlot>,
}

/// One open (stream, epoch): its accumulator shards and its phase.
#[derive(Debug)]
struct EpochSlot {
    /// Shared by every fold for its whole duration; exclusive for a change
    /// of phase (which therefore waits for the folds in flight).
    phase: RwLock<Phase>,
    /// At least one shard while open; grows up to the run's shard limit.
    shards: Mutex<Vec<ShardCell>>,
    /// Bytes reserved from the [`Budget`]: one accumulator per shard and
    /// the scratch the shards keep.
    reserved: AtomicU64,
    /// Rows folded in, rows in the last durable checkpoint and its unix
    /// ms (0: none): read by `GetRun` on a runtime thread, which must not
    /// take a lock a fold or snapshot holds.
    samples: AtomicU64,
    durable_samples: AtomicU64,
    durable_unix_ms: AtomicI64,
    /// Spreads batches that wait for a busy shard over the shards.
    waits: AtomicUsize,
    /// Delivery bookkeeping (see [`Book`]).
    book: Mutex<Book>,
}

impl EpochSlot {
    fn new(acc: Accumulator, reserved: u64) -> EpochSlot {
        EpochSlot {
            phase: RwLock::new(Phase::Open),
            samples: AtomicU64::new(acc.samples()),
            durable_samples: AtomicU64::new(0),
            durable_unix_ms: AtomicI64::new(0),
            shards: Mutex::new(vec![new_shard(acc)]),
            reserved: AtomicU64::new(reserved),
            waits: AtomicUsize::new(0),
            book: Mutex::new(Book::default()),
        }
    }

    /// The epoch's [`combined_packed`] statistics and writers as of now, when they
    /// changed since the last durable checkpoint: the one place a
    /// checkpoint copies an epoch. Takes the phase lock exclusively (waits
    /// for the folds in flight: ingest of this epoch pauses for the merge
    /// of its shards, other epochs not at all). Starts a new generation of
    /// dirty-writer markers.
    fn snapshot(self: &Arc<Self>, key: StreamKey, epoch: u64) -> Option<EpochSnapshot> {
        let phase = self.phase_mut();
        if !matches!(*phase, Phase::Open | Phase::Frozen) {
            return None;
        }
        let unchanged = {
            let g = lock(&self.book);
            g.version == g.durable_version
        };
        if unchanged {
            return None;
        }
        let packed = match combined_packed(&lock(&self.shards)) {
            Ok(packed) => packed,
            Err(err) => {
                tracing::error!(%err, epoch, "an open epoch's shards do not combine; not checkpointed");
                return None;
            }
        };
        let mut g = lock(&self.book);
        g.generation += 1;
        g.marked_writers.clear();
        Some(EpochSnapshot {
            key,
            epoch,
            samples: packed.0.class_counts.iter().sum(),
            packed: Some(packed),
            writers: g
                .writers
                .iter()
                .map(|(w, set)| (w.clone(), set.clone()))
                .collect(),
            generation: g.generation,
            missing: g.missing.keys().cloned().collect(),
            version: g.version,
            slot: Arc::clone(self),
        })
    }

    /// `(samples, durable_samples, durable_unix_ms)`, lock-free.
    fn progress(&self) -> (u64, u64, i64) {
        (
            self.samples(),
            self.durable_samples.load(Ordering::Relaxed),
            self.durable_unix_ms.load(Ordering::Relaxed),
        )
    }

    fn phase(&self) -> RwLockReadGuard<'_, Phase> {
        self.phase
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The phase, exclusively: waits for every fold in flight.
    fn phase_mut(&self) -> RwLockWriteGuard<'_, Phase> {
        self.phase
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Folds `batch` into a shard (the caller holds the phase lock shared):
    /// the first free one; else a new one when fewer than `max_shards`
    /// exist and the budget has room for one more accumulator; else waits
    /// for a busy one. While the epoch has one shard (one stream at a
    /// time), the fold's product uses every core; with several shards each
    /// fold uses one and the shards run in parallel.
    fn fold(
        &self,
        batch: Contribution<'_>,
        info: &RunInfo,
        max_shards: usize,
        budget: &Budget,
    ) -> Result<(), ServerError> {
        let shards: Vec<ShardCell> = lock(&self.shards).clone();
        let par = if shards.len() == 1 {
            Par::rayon(0)
        } else {
            Par::Seq
        };
        for cell in &shards {
            let guard = match cell.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut shard) = guard {
                return batch.fold_into(&mut shard, par, budget, &self.reserved);
            }
        }
        if let Some(cell) = self.add_shard(info, max_shards, budget, &shards) {
            return batch.fold_into(&mut lock(&cell), Par::Seq, budget, &self.reserved);
        }
        let i = self.waits.fetch_add(1, Ordering::Relaxed) % shards.len().max(1);
        match shards.get(i) {
            Some(cell) => batch.fold_into(&mut lock(cell), par, budget, &self.reserved),
            None => Err(ServerError::Internal("an open epoch without shards".into())),
        }
    }

    /// A new empty shard of `info`'s shape, if the list is still `seen`
    /// (no one added one meanwhile), below `max_shards`, and the budget
    /// reserves its bytes.
    fn add_shard(
        &self,
        info: &RunInfo,
        max_shards: usize,
        budget: &Budget,
        seen: &[ShardCell],
    ) -> Option<ShardCell> {
        let mut shards = lock(&self.shards);
        if shards.len() != seen.len() || shards.len() >= max_shards {
            return None;
        }
        let per_shard = info.accumulator_bytes();
        budget.try_reserve(per_shard).ok()?;
        self.reserved.fetch_add(per_shard, Ordering::AcqRel);
        let cell = new_shard(Accumulator::new(
            info.num_classes as usize,
            info.feature_dim as usize,
        ));
        shards.push(Arc::clone(&cell));
        Some(cell)
    }

    /// Number of shards now.
    #[cfg(test)]
    fn shard_count(&self) -> usize {
        lock(&self.shards).len()
    }
}

/// The epoch's combined statistics for a checkpoint, the scatter packed:
/// its shards merged in shard order with the Chan–Golub–LeVeque formula
/// (`Accumulator::merged_packed`, the formula of `Accumulator::merge`), so
/// a checkpoint restores the very bits a close ([`take_combined`]) would
/// have computed from, without a d × d copy. The caller holds the slot's
/// phase lock exclusively (no fold in flight).
fn combined_packed(shards: &[ShardCell]) -> Result<(AccumulatorParts, Vec<f64>), ServerError> {
    let guards: Vec<_> = shards.iter().map(|cell| lock(cell)).collect();
    Ok(
        Accumulator::merged_packed(guards.iter().map(|shard| &shard.acc))
            .ok_or_else(|| ServerError::Internal("an open epoch without shards".into()))??,
    )
}

/// The epoch's combined statistics for a close, which drops the shards
/// (the merge of [`combined_packed`], in full): their accumulators
/// are moved into the total instead of copied (no fold or snapshot holds a
/// shard while the phase lock is exclusive). On an error `shards` holds
/// the same statistics as before: the partial total, then the shards not
/// yet merged.
fn take_combined(shards: &mut Vec<ShardCell>) -> Result<Accumulator, ServerError> {
    let into_acc = |cell: ShardCell| match Arc::try_unwrap(cell) {
        Ok(shard) => {
            shard
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .acc
        }
        Err(cell) => lock(&cell).acc.clone(),
    };
    let mut cells = std::mem::take(shards).into_iter();
    let first = cells
        .next()
        .ok_or_else(|| ServerError::Internal("an open epoch without shards".into()))?;
    let mut total = into_acc(first);
    while let Some(cell) = cells.next() {
        let merged = total.merge(&lock(&cell).acc);
        if let Err(err) = merged {
            shards.push(new_shard(total));
            shards.push(cell);
            shards.extend(cells);
            return Err(err.into());
        }
    }
    Ok(total)
}

#[derive(Debug, Default)]
struct StreamState {
    open: BTreeMap<u64, Arc<EpochSlot>>,
    closing: BTreeSet<u64>,
    history: BTreeMap<u64, Arc<EpochResult>>,
    /// Markers of epochs without an accumulator yet (being written, or
    /// written for a first batch that was then refused).
    marked: BTreeMap<u64, EpochMarker>,
    /// Epochs that lost their data, with the unix ms of the start-up that
    /// found them.
    lost: BTreeMap<u64, i64>,
}

#[derive(Debug, Default)]
struct RunInner {
    streams: BTreeMap<StreamKey, StreamState>,
    writers: HashMap<String, WriterState>,
    /// Per writer, the applied sequences that are durable (in a checkpoint
    /// or a stored result).
    durable: HashMap<String, SeqSet>,
    /// Set by the shutdown checkpoint: no new accumulators.
    frozen: bool,
    /// Unix ms when `FinishRun` marked the run finished: no more pushes or
    /// closes.
    finished: Option<i64>,
}

impl RunInner {
    /// Every open slot with its stream and epoch, ordered by stream and
    /// epoch (to be locked after the run lock is released).
    fn open_slots(&self) -> Vec<(StreamKey, u64, Arc<EpochSlot>)> {
        self.streams
            .iter()
            .flat_map(|(key, s)| {
                s.open
                    .iter()
                    .map(move |(&epoch, slot)| (key.clone(), epoch, Arc::clone(slot)))
            })
            .collect()
    }
}

/// What happened to a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Merged; carries the batch's samples.
    Merged(u64),
    /// Its `(writer_id, sequence)` was applied before: skipped.
    Duplicate,
    /// Nothing happened: the batch opens its epoch, whose marker must be
    /// durable first (write it, then apply again).
    NeedsMarker(EpochMarker),
    /// Nothing happened: the batch is its writer's first in this epoch
    /// since the epoch's last checkpoint snapshot, so the writer's dirty
    /// marker (`writer`, `generation`) must be durable first.
    NeedsWriterMarker {
        marker: EpochMarker,
        writer: String,
        generation: u64,
    },
}

/// An epoch taken out of `open` by [`RunState::begin_close`].
#[derive(Debug)]
pub(crate) struct Closing {
    pub(crate) key: StreamKey,
    pub(crate) epoch: u64,
    slot: Arc<EpochSlot>,
    /// The accumulator to compute metrics from (given back on abort).
    pub(crate) acc: Accumulator,
    /// The writers' sequences in it (durable with the result).
    pub(crate) writers: Vec<(String, SeqSet)>,
    /// VCI of the closest lower closed epoch of the stream: `None` when
    /// there is none, `Some(None)` when its VCI was undefined.
    pub(crate) previous_vci: Option<Option<f64>>,
}

/// How a missing writer is named in the DATA_LOSS message.
fn missing_writer(writer: &str, after: Option<u64>) -> String {
    let who = if writer.is_empty() {
        "batches without a writer_id (they cannot be resent idempotently)".to_owned()
    } else {
        format!("writer_id {writer:?}")
    };
    match after {
        Some(seq) => format!("{who} after sequence {seq}"),
        None => format!("{who} (none of its batches is durable)"),
    }
}

/// One run: its description, counters, streams and duplicate filter, and
/// the daemon-wide limits it is held to (made by [`super::State::new_run`]).
#[derive(Debug)]
pub(crate) struct RunState {
    pub(crate) info: RunInfo,
    rows_ingested: AtomicU64,
    deleted: AtomicBool,
    inner: Mutex<RunInner>,
    /// The daemon's budget, shared by all runs.
    budget: Arc<Budget>,
    /// `--max-sequence-gaps-per-writer`.
    max_gaps: u64,
    /// Most accumulator shards of one open epoch (at least 1).
    max_shards: usize,
}

impl RunState {
    pub(super) fn new(
        info: RunInfo,
        rows_ingested: u64,
        budget: Arc<Budget>,
        max_gaps: u64,
        max_shards: usize,
    ) -> RunState {
        RunState {
            info,
            rows_ingested: AtomicU64::new(rows_ingested),
            deleted: AtomicBool::new(false),
            inner: Mutex::new(RunInner::default()),
            budget,
            max_gaps,
            max_shards: max_shards.max(1),
        }
    }

    pub(crate) fn rows_ingested(&self) -> u64 {
        self.rows_ingested.load(Ordering::Relaxed)
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    fn stream_name(&self, key: &StreamKey) -> String {
        key.display(&self.info.run_id)
    }

    fn lost_error(&self, key: &StreamKey, epoch: u64, found_unix_ms: i64) -> ServerError {
        ServerError::EpochLost {
            stream: self.stream_name(key),
            epoch,
            stopped_before: utc_timestamp(found_unix_ms),
        }
    }

    fn finished_error(&self, finished_unix_ms: i64) -> ServerError {
        ServerError::RunFinished {
            run_id: self.info.run_id.clone(),
            finished_at: utc_timestamp(finished_unix_ms),
        }
    }

    /// When `FinishRun` marked the run finished, if it did.
    pub(crate) fn finished_unix_ms(&self) -> Option<i64> {
        lock(&self.inner).finished
    }

    /// Marks the run finished at `unix_ms`; `Ok(false)` when it already was.
    /// Refused while an epoch is open or being closed, so a finished run
    /// never changes again; later pushes and closes fail in
    /// [`RunState::apply`] and [`RunState::begin_close`].
    pub(crate) fn finish(&self, unix_ms: i64) -> Result<bool, ServerError> {
        let mut inner = lock(&self.inner);
        if inner.finished.is_some() {
            return Ok(false);
        }
        let open: Vec<String> = inner
            .streams
            .iter()
            .flat_map(|(key, s)| {
                s.open
                    .keys()
                    .chain(s.closing.iter())
                    .map(move |epoch| format!("{}/{} epoch {epoch}", key.split, key.layer))
            })
            .collect();
        if !open.is_empty() {
            return Err(ServerError::OpenEpochsAtFinish {
                run_id: self.info.run_id.clone(),
                open: open.join(", "),
            });
        }
        inner.finished = Some(unix_ms);
        Ok(true)
    }

    /// Restores the finished mark (start-up), or clears it when `None`
    /// (undoing [`RunState::finish`] whose durable write failed).
    pub(crate) fn set_finished(&self, unix_ms: Option<i64>) {
        lock(&self.inner).finished = unix_ms;
    }

    /// Whether `(writer_id, sequence)` was already applied (a cheap check
    /// before computing a batch's statistics; [`RunState::apply`] decides).
    pub(crate) fn is_duplicate(&self, dedup: Option<&(String, u64)>) -> bool {
        let Some((writer, seq)) = dedup else {
            return false;
        };
        let inner = lock(&self.inner);
        inner
            .writers
            .get(writer)
            .is_some_and(|w| w.is_duplicate(*seq))
    }

    /// Folds a batch into a shard of the open epoch `(key, epoch)`
    /// (blocking: the O(rows·d²) fold), creating the epoch if needed once
    /// its marker is durable ([`Applied::NeedsMarker`] until then). Whole or
    /// nothing: a batch whose sequence would give its writer more gaps than
    /// the limit, or whose epoch was lost, is rejected before anything is
    /// claimed, created or folded.
    pub(crate) fn apply(
        &self,
        key: &StreamKey,
        epoch: u64,
        batch: Contribution<'_>,
        dedup: Option<&(String, u64)>,
    ) -> Result<Applied, ServerError> {
        // Step 1: admission under the run lock.
        let slot = {
            let mut inner = lock(&self.inner);
            if self.is_deleted() {
                return Err(ServerError::RunNotFound(self.info.run_id.clone()));
            }
            if let Some(at) = inner.finished {
                return Err(self.finished_error(at));
            }
            if let Some((writer, seq)) = dedup {
                if let Some(w) = inner.writers.get(writer) {
                    if w.is_duplicate(*seq) {
                        return Ok(Applied::Duplicate);
                    }
                    w.admit(*seq, self.max_gaps)
                        .map_err(|gaps| ServerError::SequenceGaps {
                            run_id: self.info.run_id.clone(),
                            writer_id: writer.clone(),
                            sequence: *seq,
                            gaps,
                            limit: self.max_gaps,
                        })?;
                }
            }
            let frozen = inner.frozen;
            let stream = inner.streams.entry(key.clone()).or_default();
            if let Some(&found) = stream.lost.get(&epoch) {
                return Err(self.lost_error(key, epoch, found));
            }
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
                    if frozen {
                        return Err(ServerError::ShuttingDown(
                            "open accumulators were checkpointed".into(),
                        ));
                    }
                    let needed = self.info.accumulator_bytes();
                    let marker = stream.marked.entry(epoch).or_default();
                    if !marker.is_written() {
                        // Refuse a batch the budget cannot take before a
                        // marker is written for it (try_reserve decides).
                        let in_use = self.budget.used();
                        if in_use.saturating_add(needed) > self.budget.limit() {
                            return Err(self.budget.refusal(&self.info, needed, in_use));
                        }
                        return Ok(Applied::NeedsMarker(marker.clone()));
                    }
                    self.budget
                        .try_reserve(needed)
                        .map_err(|in_use| self.budget.refusal(&self.info, needed, in_use))?;
                    // The accumulator now stands for the durable marker.
                    stream.marked.remove(&epoch);
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
                inner.writers.entry(writer.clone()).or_default().claim(*seq);
            }
            slot
        };

        // Step 2: the fold, under the slot's locks only. A writer's first
        // batch since the epoch's last snapshot waits for its dirty marker.
        let folded = {
            let phase = slot.phase();
            match *phase {
                Phase::Open => {
                    let writer = dedup.map_or("", |(w, _)| w.as_str());
                    let wait = lock(&slot.book).pending_marker(writer);
                    match wait {
                        Some(wait) => Ok(Some(wait)),
                        None => slot
                            .fold(batch, &self.info, self.max_shards, &self.budget)
                            .map(|()| {
                                lock(&slot.book).folded(dedup);
                                None
                            }),
                    }
                }
                Phase::Closing => Err(ServerError::EpochClosed {
                    stream: self.stream_name(key),
                    epoch,
                    state: "being closed",
                }),
                Phase::Deleted => Err(ServerError::RunNotFound(self.info.run_id.clone())),
                Phase::Frozen => Err(ServerError::ShuttingDown(
                    "open accumulators were checkpointed".into(),
                )),
            }
        };

        // Step 3: settle the claim.
        if let Some((writer, seq)) = dedup {
            let mut inner = lock(&self.inner);
            if let Some(w) = inner.writers.get_mut(writer) {
                w.settle(*seq, matches!(folded, Ok(None)));
            }
        }
        if let Some(wait) = folded? {
            return Ok(wait);
        }
        let samples = batch.samples();
        slot.samples.fetch_add(samples, Ordering::Relaxed);
        self.rows_ingested.fetch_add(samples, Ordering::Relaxed);
        Ok(Applied::Merged(samples))
    }

    /// Takes `(key, epoch)` out of the open set for closing, with its
    /// [`take_combined`] statistics (blocking: waits for the folds in flight and
    /// merges the shards, whose memory beyond one accumulator is released).
    pub(crate) fn begin_close(&self, key: &StreamKey, epoch: u64) -> Result<Closing, ServerError> {
        let (slot, previous_vci) = {
            let mut inner = lock(&self.inner);
            if self.is_deleted() {
                return Err(ServerError::RunNotFound(self.info.run_id.clone()));
            }
            if let Some(at) = inner.finished {
                return Err(self.finished_error(at));
            }
            let name = self.stream_name(key);
            let Some(stream) = inner.streams.get_mut(key) else {
                return Err(ServerError::NoOpenEpoch {
                    stream: name,
                    epoch,
                    open: "none".into(),
                });
            };
            if let Some(&found) = stream.lost.get(&epoch) {
                return Err(self.lost_error(key, epoch, found));
            }
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
            let missing = stream.open.get(&epoch).map(|slot| {
                lock(&slot.book)
                    .missing
                    .iter()
                    .map(|(w, after)| missing_writer(w, *after))
                    .collect::<Vec<_>>()
            });
            if let Some(missing) = missing.filter(|m| !m.is_empty()) {
                return Err(ServerError::WritersMissing {
                    stream: name,
                    epoch,
                    writers: missing.join(", "),
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
            let mut phase = slot.phase_mut();
            if *phase == Phase::Open {
                *phase = Phase::Closing;
                let acc = take_combined(&mut lock(&slot.shards));
                if acc.is_ok() {
                    // The combined accumulator stands for the shards.
                    let per_shard = self.info.accumulator_bytes();
                    let extra = slot
                        .reserved
                        .swap(per_shard, Ordering::AcqRel)
                        .saturating_sub(per_shard);
                    self.budget.release(extra);
                } else {
                    *phase = Phase::Open;
                }
                let writers: Vec<(String, SeqSet)> = lock(&slot.book)
                    .writers
                    .iter()
                    .map(|(w, set)| (w.clone(), set.clone()))
                    .collect();
                Some(acc.map(|acc| (acc, writers)))
            } else {
                None
            }
        };
        match acc {
            Some(Err(err)) => {
                let mut inner = lock(&self.inner);
                let stream = inner.streams.entry(key.clone()).or_default();
                stream.closing.remove(&epoch);
                stream.open.insert(epoch, slot);
                Err(err)
            }
            Some(Ok((acc, writers))) => Ok(Closing {
                key: key.clone(),
                epoch,
                slot,
                acc,
                writers,
                previous_vci,
            }),
            None => {
                // Deleted, or frozen for the shutdown checkpoint, between
                // the two locks: a frozen epoch goes back with its data
                // for the checkpoint to write.
                let mut inner = lock(&self.inner);
                if self.is_deleted() {
                    return Err(ServerError::RunNotFound(self.info.run_id.clone()));
                }
                let stream = inner.streams.entry(key.clone()).or_default();
                stream.closing.remove(&epoch);
                stream.open.insert(epoch, slot);
                Err(ServerError::ShuttingDown(
                    "open accumulators were checkpointed".into(),
                ))
            }
        }
    }

    /// Puts a closing epoch back into the open set exactly as it was (its
    /// metrics or its storage failed), so no data is lost and it can be
    /// closed again: one shard holding the combined statistics, the one
    /// accumulator it still reserves, its samples and writers; frozen
    /// when the shutdown checkpoint froze the run meanwhile (that
    /// checkpoint waits for closes in flight, so it writes the epoch).
    /// Frees it instead when the run was deleted meanwhile. Takes the slot
    /// lock, then the run lock (the allowed order), so a concurrent delete
    /// or freeze is seen consistently. Returns the samples given back,
    /// `None` when the run was deleted.
    pub(crate) fn abort_close(&self, closing: Closing) -> Option<u64> {
        let Closing {
            key,
            epoch,
            slot,
            acc,
            ..
        } = closing;
        let mut phase = slot.phase_mut();
        let mut inner = lock(&self.inner);
        if self.is_deleted() {
            *phase = Phase::Deleted;
            self.budget.release(slot.reserved.swap(0, Ordering::AcqRel));
            return None;
        }
        *lock(&slot.shards) = vec![new_shard(acc)];
        *phase = if inner.frozen {
            Phase::Frozen
        } else {
            Phase::Open
        };
        let stream = inner.streams.entry(key).or_default();
        stream.closing.remove(&epoch);
        stream.open.insert(epoch, Arc::clone(&slot));
        Some(slot.samples())
    }

    /// Records the durable result of a closing epoch and frees its memory.
    pub(crate) fn finish_close(&self, closing: Closing, result: Arc<EpochResult>) {
        {
            let mut inner = lock(&self.inner);
            let stream = inner.streams.entry(closing.key.clone()).or_default();
            stream.closing.remove(&closing.epoch);
            stream.history.insert(closing.epoch, result);
            for (w, set) in &closing.writers {
                inner.durable.entry(w.clone()).or_default().union(set);
            }
        }
        let reserved = closing.slot.reserved.swap(0, Ordering::AcqRel);
        drop(closing);
        self.budget.release(reserved);
    }

    /// Marks the run deleted and frees every open accumulator.
    pub(super) fn mark_deleted(&self) {
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
            inner.durable.clear();
            slots
        };
        for slot in slots {
            *slot.phase_mut() = Phase::Deleted;
            lock(&slot.shards).clear();
            self.budget.release(slot.reserved.swap(0, Ordering::AcqRel));
        }
    }

    /// Freezes every open accumulator for the shutdown checkpoint: later
    /// merges and new accumulators fail with UNAVAILABLE, so nothing is
    /// acknowledged that the final [`RunState::snapshot_changed`] misses.
    pub(crate) fn freeze(&self) {
        let slots = {
            let mut inner = lock(&self.inner);
            inner.frozen = true;
            inner.open_slots()
        };
        for (_, _, slot) in slots {
            let mut phase = slot.phase_mut();
            if *phase == Phase::Open {
                *phase = Phase::Frozen;
            }
        }
    }

    /// Copies of the open epochs that changed since their last durable
    /// checkpoint (see `EpochSlot::snapshot`), one slot lock at a time.
    pub(crate) fn snapshot_changed(&self) -> Vec<EpochSnapshot> {
        let slots = lock(&self.inner).open_slots();
        slots
            .into_iter()
            .filter_map(|(key, epoch, slot)| slot.snapshot(key, epoch))
            .collect()
    }

    /// Records that `snapshots` (of this run) are durable as of `unix_ms`.
    pub(crate) fn mark_durable(&self, snapshots: &[EpochSnapshot], unix_ms: i64) {
        for snap in snapshots {
            let mut g = lock(&snap.slot.book);
            g.durable_version = g.durable_version.max(snap.version);
            snap.slot
                .durable_samples
                .store(snap.samples, Ordering::Relaxed);
            snap.slot.durable_unix_ms.store(unix_ms, Ordering::Relaxed);
        }
        let mut inner = lock(&self.inner);
        for snap in snapshots {
            for (w, set) in &snap.writers {
                inner.durable.entry(w.clone()).or_default().union(set);
            }
        }
    }

    /// The durable acknowledgement of `writer` (see
    /// [`SeqSet::durable_through`]).
    pub(crate) fn durable_through(&self, writer: &str) -> Option<u64> {
        let inner = lock(&self.inner);
        let applied = inner.writers.get(writer)?.applied();
        match inner.durable.get(writer) {
            Some(durable) => applied.durable_through(durable),
            None => applied.durable_through(&SeqSet::default()),
        }
    }

    /// Restores an open epoch from disk; its writers' sequences join the
    /// duplicate filter as durable.
    pub(crate) fn restore_open(&self, key: StreamKey, epoch: u64, restored: RestoredEpoch) {
        let reserved = self.info.accumulator_bytes();
        self.budget.force_reserve(reserved);
        let samples = restored.acc.samples();
        let slot = EpochSlot::new(restored.acc, reserved);
        let durable = if restored.rewrite { 0 } else { samples };
        slot.durable_samples.store(durable, Ordering::Relaxed);
        slot.durable_unix_ms
            .store(restored.durable_unix_ms, Ordering::Relaxed);
        {
            let mut g = lock(&slot.book);
            g.version = u64::from(restored.rewrite);
            g.generation = restored.generation;
            g.missing = restored.missing;
            g.writers = restored.writers;
        }
        let writers: Vec<(String, SeqSet)> = lock(&slot.book)
            .writers
            .iter()
            .map(|(w, set)| (w.clone(), set.clone()))
            .collect();
        let mut inner = lock(&self.inner);
        for (w, set) in &writers {
            inner.writers.entry(w.clone()).or_default().restore(set);
            inner.durable.entry(w.clone()).or_default().union(set);
        }
        let stream = inner.streams.entry(key).or_default();
        if let Some(old) = stream.open.insert(epoch, Arc::new(slot)) {
            self.budget.release(old.reserved.load(Ordering::Acquire));
        }
    }

    /// Restores a closed epoch's result.
    pub(crate) fn restore_result(&self, key: StreamKey, result: Arc<EpochResult>) {
        let mut inner = lock(&self.inner);
        inner
            .streams
            .entry(key)
            .or_default()
            .history
            .insert(result.epoch, result);
    }

    /// Remembers an epoch that lost its data (found at start-up at
    /// `found_unix_ms`): pushes and closes of it are refused from now on.
    pub(crate) fn restore_lost(&self, key: StreamKey, epoch: u64, found_unix_ms: i64) {
        let mut inner = lock(&self.inner);
        inner
            .streams
            .entry(key)
            .or_default()
            .lost
            .insert(epoch, found_unix_ms);
    }

    /// Adds durable sequences of a writer (of closed epochs, or a legacy
    /// whole-run checkpoint) to the duplicate filter.
    pub(crate) fn restore_writer(&self, writer_id: &str, applied: &SeqSet) {
        let mut inner = lock(&self.inner);
        inner
            .writers
            .entry(writer_id.to_owned())
            .or_default()
            .restore(applied);
        inner
            .durable
            .entry(writer_id.to_owned())
            .or_default()
            .union(applied);
    }

    /// Open epochs with their sample counts, ordered by split, layer, epoch.
    pub(crate) fn open_epochs(&self) -> Vec<OpenEpoch> {
        let slots = lock(&self.inner).open_slots();
        slots
            .into_iter()
            .map(|(key, epoch, slot)| {
                let (samples, durable_samples, durable_unix_ms) = slot.progress();
                OpenEpoch {
                    split: key.split,
                    layer: key.layer,
                    epoch,
                    samples,
                    durable_samples,
                    durable_unix_ms,
                }
            })
            .collect()
    }

    /// Number of closed epochs over all streams.
    pub(crate) fn closed_epochs(&self) -> u64 {
        let inner = lock(&self.inner);
        inner.streams.values().map(|s| s.history.len() as u64).sum()
    }

    /// Closed results ordered by split, layer, epoch, optionally filtered.
    pub(crate) fn history(
        &self,
        split: Option<&str>,
        layer: Option<&str>,
    ) -> Vec<Arc<EpochResult>> {
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
    pub(crate) fn latest_results(&self) -> Vec<Arc<EpochResult>> {
        let inner = lock(&self.inner);
        inner
            .streams
            .values()
            .filter_map(|s| s.history.values().next_back().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Encoding;

    /// A run of K = 2, d = 1 with a 1 MiB budget (returned to inspect it).
    fn tiny_run(max_gaps: u64) -> (RunState, Arc<Budget>) {
        let budget = Arc::new(Budget::new(1 << 20));
        let info = RunInfo {
            run_id: "r".into(),
            uid: 1,
            num_classes: 2,
            feature_dim: 1,
            metadata: BTreeMap::new(),
            created_unix_ms: 0,
        };
        (
            RunState::new(info, 0, Arc::clone(&budget), max_gaps, 1),
            budget,
        )
    }

    fn train() -> StreamKey {
        StreamKey {
            split: "train".into(),
            layer: "penultimate".into(),
        }
    }

    fn one_row(value: f64, label: u32) -> Accumulator {
        let x = ndarray::Array2::from_elem((1, 1), value);
        Accumulator::from_batch(x.view(), &[label], 2, crate::stats::Par::Seq).unwrap()
    }

    /// [`RunState::apply`], writing the epoch marker when asked (as the
    /// daemon does, minus the disk).
    fn apply_marked(
        run: &RunState,
        key: &StreamKey,
        epoch: u64,
        batch: &Accumulator,
        dedup: Option<&(String, u64)>,
    ) -> Result<Applied, ServerError> {
        loop {
            match run.apply(key, epoch, Contribution::Stats(batch), dedup)? {
                Applied::NeedsMarker(marker) | Applied::NeedsWriterMarker { marker, .. } => {
                    futures::executor::block_on(
                        marker.write_once(|| async { Ok::<(), ServerError>(()) }),
                    )?
                }
                other => return Ok(other),
            }
        }
    }

    fn samples_of(run: &RunState) -> u64 {
        run.open_epochs().iter().map(|o| o.samples).sum()
    }

    #[test]
    fn a_new_gap_beyond_the_default_limit_is_rejected_and_changes_nothing() {
        let limit = crate::server::config::DEFAULT_MAX_SEQUENCE_GAPS_PER_WRITER;
        let (run, budget) = tiny_run(limit);
        let key = train();
        let batch = one_row(1.5, 1);
        let apply = |seq: u64| apply_marked(&run, &key, 0, &batch, Some(&("w".to_owned(), seq)));
        // Even sequences 0, 2, …, 2·limit: exactly `limit` gaps.
        for i in 0..=limit {
            assert_eq!(apply(2 * i).unwrap(), Applied::Merged(1));
        }
        let used = budget.used();
        let next = 2 * limit + 2;
        match apply(next) {
            Err(ServerError::SequenceGaps {
                writer_id,
                sequence,
                gaps,
                limit: l,
                ..
            }) => assert_eq!(
                (writer_id.as_str(), sequence, gaps, l),
                ("w", next, limit, limit)
            ),
            other => panic!("expected SequenceGaps, got {other:?}"),
        }
        // Nothing changed: samples, rows, budget, and no claim left behind
        // (the same sequence is refused again, not called a duplicate).
        assert_eq!(samples_of(&run), limit + 1);
        assert_eq!(run.rows_ingested(), limit + 1);
        assert_eq!(budget.used(), used);
        assert!(!run.is_duplicate(Some(&("w".to_owned(), next))));
        assert!(matches!(apply(next), Err(ServerError::SequenceGaps { .. })));
        // At the limit, duplicates are still recognised...
        assert_eq!(apply(0).unwrap(), Applied::Duplicate);
        // ...a late batch filling a remembered gap is applied...
        assert_eq!(apply(1).unwrap(), Applied::Merged(1));
        assert_eq!(apply(2 * limit + 1).unwrap(), Applied::Merged(1));
        // ...which makes room for the refused one; other writers are
        // unaffected throughout.
        assert_eq!(apply(next).unwrap(), Applied::Merged(1));
        assert_eq!(
            apply_marked(&run, &key, 0, &batch, Some(&("v".to_owned(), 7))).unwrap(),
            Applied::Merged(1)
        );
        assert_eq!(samples_of(&run), limit + 5);
    }

    #[test]
    fn a_restored_filter_beyond_a_lowered_limit_is_kept_and_bounded() {
        // Checkpointed with 3 gaps; restarted with a limit of 1.
        let (run, _) = tiny_run(1);
        let key = train();
        run.restore_writer("w", &SeqSet::from_flat(&[0, 0, 2, 2, 4, 4, 6, 6]));
        let batch = one_row(0.5, 0);
        let apply = |seq: u64| apply_marked(&run, &key, 0, &batch, Some(&("w".to_owned(), seq)));
        assert_eq!(apply(4).unwrap(), Applied::Duplicate);
        assert!(matches!(
            apply(9),
            Err(ServerError::SequenceGaps {
                gaps: 3,
                limit: 1,
                ..
            })
        ));
        assert_eq!(apply(7).unwrap(), Applied::Merged(1));
        assert_eq!(apply(3).unwrap(), Applied::Merged(1));
        assert_eq!(samples_of(&run), 2);
    }

    #[test]
    fn a_new_epoch_waits_for_one_marker_and_a_lost_epoch_is_refused() {
        let (run, budget) = tiny_run(8);
        let key = train();
        let batch = one_row(2.0, 0);
        // Two ranks open epoch 0 at once: both are told to wait for the
        // same marker, and nothing is created or counted before it exists.
        let first = run
            .apply(&key, 0, Contribution::Stats(&batch), None)
            .unwrap();
        let second = run
            .apply(&key, 0, Contribution::Stats(&batch), None)
            .unwrap();
        let Applied::NeedsMarker(marker) = first else {
            panic!("expected NeedsMarker, got {first:?}");
        };
        assert_eq!(second, Applied::NeedsMarker(marker.clone()));
        assert!(run.open_epochs().is_empty());
        assert_eq!((budget.used(), run.rows_ingested()), (0, 0));
        // One write; the second caller finds it done.
        let writes = AtomicU64::new(0);
        for _ in 0..2 {
            futures::executor::block_on(marker.write_once(|| async {
                writes.fetch_add(1, Ordering::Relaxed);
                Ok::<(), ServerError>(())
            }))
            .unwrap();
        }
        assert_eq!(writes.load(Ordering::Relaxed), 1);
        // The writer (here: batches without a writer_id) needs its dirty
        // marker before its first merge since the epoch's last snapshot.
        let Applied::NeedsWriterMarker {
            marker, generation, ..
        } = run
            .apply(&key, 0, Contribution::Stats(&batch), None)
            .unwrap()
        else {
            panic!("expected NeedsWriterMarker");
        };
        assert_eq!(generation, 0);
        futures::executor::block_on(marker.write_once(|| async { Ok::<(), ServerError>(()) }))
            .unwrap();
        for _ in 0..2 {
            assert_eq!(
                run.apply(&key, 0, Contribution::Stats(&batch), None)
                    .unwrap(),
                Applied::Merged(1)
            );
        }
        assert_eq!(samples_of(&run), 2);

        // A lost epoch refuses pushes and closes and changes nothing.
        run.restore_lost(key.clone(), 3, 1_700_000_000_000);
        let used = budget.used();
        for err in [
            run.apply(&key, 3, Contribution::Stats(&batch), None)
                .unwrap_err(),
            run.begin_close(&key, 3).unwrap_err(),
        ] {
            assert_eq!(err.code(), tonic::Code::DataLoss);
            let text = err.to_string();
            assert!(
                text.starts_with("epoch: ")
                    && text.contains("epoch 3 of stream r/train/penultimate")
                    && text.contains("2023-11-14T22:13:20Z")
                    && text.contains("new epoch number"),
                "{text}"
            );
        }
        assert_eq!((samples_of(&run), budget.used()), (2, used));
        assert_eq!(run.open_epochs().len(), 1);

        // After the shutdown checkpoint froze the run, no epoch is opened.
        run.freeze();
        assert_eq!(run.snapshot_changed().len(), 1);
        assert!(matches!(
            run.apply(&key, 4, Contribution::Stats(&batch), None),
            Err(ServerError::ShuttingDown(_))
        ));
    }

    // ---------------------------------------------------------- shards

    /// A run of K = 3, d = 4 allowing `max_shards` shards, with a budget of
    /// `budget_accumulators` accumulators.
    fn shard_run(max_shards: usize, budget_accumulators: f64) -> (RunState, Arc<Budget>) {
        let info = RunInfo {
            run_id: "s".into(),
            uid: 1,
            num_classes: 3,
            feature_dim: 4,
            metadata: BTreeMap::new(),
            created_unix_ms: 0,
        };
        let bytes = (info.accumulator_bytes() as f64 * budget_accumulators) as u64;
        let budget = Arc::new(Budget::new(bytes));
        (
            RunState::new(info, 0, Arc::clone(&budget), 64, max_shards),
            budget,
        )
    }

    fn open_slot(run: &RunState, key: &StreamKey, epoch: u64) -> Arc<EpochSlot> {
        Arc::clone(&lock(&run.inner).streams[key].open[&epoch])
    }

    /// `x` as float32 wire rows; every value must be exact in f32 (so
    /// references folded from `x` see the same numbers).
    fn wire(x: &ndarray::Array2<f64>) -> WireRows {
        wire_as(x, Encoding::Float32)
    }

    /// `x` as wire rows of `encoding` (float32 or bfloat16); every value
    /// must be exact in it.
    fn wire_as(x: &ndarray::Array2<f64>, encoding: Encoding) -> WireRows {
        let mut bytes = Vec::new();
        for &v in x {
            let single = v as f32;
            assert_eq!(f64::from(single), v, "not exact in f32");
            match encoding {
                Encoding::Float32 => bytes.extend(single.to_le_bytes()),
                Encoding::Bfloat16 => {
                    let high = (single.to_bits() >> 16) as u16;
                    assert_eq!(single.to_bits() & 0xffff, 0, "not exact in bfloat16");
                    bytes.extend(high.to_le_bytes());
                }
                Encoding::Float16 => panic!("float16 wire rows are not needed here"),
            }
        }
        WireRows::new(bytes.into(), encoding, x.nrows(), x.ncols()).unwrap()
    }

    fn rows<'a>(features: &'a WireRows, labels: &'a [u32]) -> Contribution<'a> {
        Contribution::Rows { features, labels }
    }

    /// Applies `batch` from another thread while this one holds every
    /// shard but `target` (`target` = the shard count: all of them, so a
    /// new shard is made if allowed), so the batch lands in `target`.
    fn apply_into(run: &RunState, key: &StreamKey, batch: Contribution<'_>, target: usize) {
        let slot = open_slot(run, key, 0);
        let cells = lock(&slot.shards).clone();
        let held: Vec<_> = cells
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != target)
            .map(|(_, cell)| lock(cell))
            .collect();
        std::thread::scope(|scope| {
            let applied = scope
                .spawn(|| run.apply(key, 0, batch, None))
                .join()
                .unwrap();
            assert!(matches!(applied, Ok(Applied::Merged(_))), "{applied:?}");
        });
        drop(held);
    }

    fn assert_parts_close(a: &Accumulator, b: &Accumulator, rel: f64) {
        let (a, b) = (a.to_parts(), b.to_parts());
        assert_eq!(a.class_counts, b.class_counts);
        assert_eq!(a.unit_count, b.unit_count);
        for (name, x, y) in [
            ("class_means", &a.class_means, &b.class_means),
            ("scatter", &a.scatter, &b.scatter),
            ("within_trace", &a.within_trace, &b.within_trace),
            ("unit_sum", &a.unit_sum, &b.unit_sum),
            (
                "unit_within_trace",
                &a.unit_within_trace,
                &b.unit_within_trace,
            ),
        ] {
            let scale = y.iter().fold(1e-300_f64, |m, v| m.max(v.abs()));
            for (u, v) in x.iter().zip(y.iter()) {
                assert!((u - v).abs() <= rel * scale, "{name}: {u} vs {v}");
            }
        }
    }

    /// Float32 rows are folded where they lie; bfloat16 rows are widened
    /// into the shard's buffer first, which the budget counts too.
    #[test]
    fn a_shard_keeps_its_scratch_within_the_budget_and_frees_what_does_not_fit() {
        for encoding in [Encoding::Float32, Encoding::Bfloat16] {
            shard_scratch_within_budget(encoding);
        }
    }

    fn shard_scratch_within_budget(encoding: Encoding) {
        let info = RunInfo {
            run_id: "scratch".into(),
            uid: 1,
            num_classes: 3,
            feature_dim: 64,
            metadata: BTreeMap::new(),
            created_unix_ms: 0,
        };
        // Multiples of 1/4 below 64: exact in bfloat16.
        let batch = |n: usize| {
            let x = ndarray::Array2::from_shape_fn((n, 64), |(i, j)| (i + 2 * j) as f64 * 0.25);
            let y: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
            (wire_as(&x, encoding), x, y)
        };
        // The buffers a 1-row and a 100-row batch grow, measured outside
        // (an epoch's only shard folds with every core): the fold's scratch,
        // and for bfloat16 the rows widened to f64.
        let grown = |n: usize| {
            let (_, x, y) = batch(n);
            let mut scratch = FoldScratch::new();
            let mut acc = Accumulator::new(3, 64);
            acc.fold_batch_with(x.view(), &y, &mut scratch, Par::rayon(0))
                .unwrap();
            let widened = if encoding == Encoding::Float32 {
                0
            } else {
                8 * x.len()
            };
            (scratch.memory_bytes() + widened) as u64
        };
        let (small, large) = (grown(1), grown(100));
        assert!(small < large);
        let acc_bytes = info.accumulator_bytes();
        let scratch = |run: &RunState| {
            let slot = open_slot(run, &train(), 0);
            let cells = lock(&slot.shards).clone();
            let bytes = lock(&cells[0]).scratch_bytes();
            (bytes, slot.reserved.load(Ordering::Acquire))
        };
        // Room for the small buffers only: the large ones are freed after
        // their fold and their reservation returned.
        let budget = Arc::new(Budget::new(acc_bytes + small));
        let run = RunState::new(info.clone(), 0, Arc::clone(&budget), 64, 1);
        let (features, _, y) = batch(1);
        apply_marked_wire(&run, &train(), &features, &y);
        assert_eq!(scratch(&run), (small, acc_bytes + small), "{encoding:?}");
        assert_eq!(budget.used(), acc_bytes + small);
        let (features, _, y) = batch(100);
        apply_marked_wire(&run, &train(), &features, &y);
        assert_eq!(scratch(&run), (0, acc_bytes), "{encoding:?}");
        assert_eq!(budget.used(), acc_bytes);
        assert_eq!(run.rows_ingested(), 101);

        // With room, the large buffers are kept and reserved, and the close
        // returns every byte.
        let budget = Arc::new(Budget::new(8 * acc_bytes));
        let run = RunState::new(info, 0, Arc::clone(&budget), 64, 1);
        for n in [1, 100, 1] {
            let (features, _, y) = batch(n);
            apply_marked_wire(&run, &train(), &features, &y);
        }
        assert_eq!(scratch(&run), (large, acc_bytes + large), "{encoding:?}");
        assert_eq!(budget.used(), acc_bytes + large);
        let closing = run.begin_close(&train(), 0).unwrap();
        assert_eq!(budget.used(), acc_bytes);
        run.finish_close(closing, Arc::new(EpochResult::default()));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn shards_are_made_under_contention_only_within_the_budget() {
        let (run, budget) = shard_run(4, 2.5);
        let per = run.info.accumulator_bytes();
        let key = train();
        let x = ndarray::Array2::from_shape_fn((6, 4), |(i, j)| (i * 4 + j) as f64 * 0.5 + 1.0);
        let y = [0, 1, 2, 0, 1, 2];
        // A lone stream uses one shard however many batches it sends.
        for _ in 0..3 {
            apply_marked_rows(&run, &key, &x, &y);
        }
        let slot = open_slot(&run, &key, 0);
        assert_eq!((slot.shard_count(), budget.used()), (1, per));
        // A batch finding the shard busy gets a second one, reserved.
        apply_into(&run, &key, rows(&wire(&x), &y), 1);
        assert_eq!((slot.shard_count(), budget.used()), (2, 2 * per));
        // Both busy and no room for a third: the batch waits for one.
        let cells = lock(&slot.shards).clone();
        let held: Vec<_> = cells.iter().map(|cell| lock(cell)).collect();
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| run.apply(&key, 0, rows(&wire(&x), &y), None));
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(!waiting.is_finished());
            assert_eq!((slot.shard_count(), budget.used()), (2, 2 * per));
            drop(held);
            assert_eq!(waiting.join().unwrap().unwrap(), Applied::Merged(6));
        });
        assert_eq!(samples_of(&run), 30);
        // Closing merges the shards into one accumulator's worth, and
        // finishing frees it.
        let closing = run.begin_close(&key, 0).unwrap();
        assert_eq!((closing.acc.samples(), budget.used()), (30, per));
        run.finish_close(closing, Arc::new(EpochResult::default()));
        assert_eq!(budget.used(), 0);
    }

    /// A close that fails (its metrics or its storage) gives the epoch
    /// back exactly: the same statistics, samples and writers, one
    /// accumulator of budget (the extra shards' memory was returned once
    /// by `begin_close`, nothing is returned or reserved twice), closable
    /// again; frozen when the shutdown checkpoint froze the run meanwhile,
    /// so that checkpoint still writes it; freed when the run was deleted.
    #[test]
    fn a_failed_close_gives_the_epoch_back_exactly_and_counts_its_budget_once() {
        let (run, budget) = shard_run(4, 2.5);
        let per = run.info.accumulator_bytes();
        let key = train();
        let x = ndarray::Array2::from_shape_fn((6, 4), |(i, j)| (i * 4 + j) as f64 * 0.5 + 1.0);
        let y = [0, 1, 2, 0, 1, 2];
        apply_marked_rows(&run, &key, &x, &y);
        apply_into(&run, &key, rows(&wire(&x), &y), 1);
        assert_eq!(budget.used(), 2 * per);
        let before = run.open_epochs();

        let closing = run.begin_close(&key, 0).unwrap();
        let parts = closing.acc.to_parts();
        assert_eq!(budget.used(), per);
        assert!(run.open_epochs().is_empty());
        assert_eq!(run.abort_close(closing), Some(12));
        assert_eq!(run.open_epochs(), before);
        assert_eq!(budget.used(), per);
        assert_eq!(open_slot(&run, &key, 0).shard_count(), 1);
        // Closable again, from the very same statistics; more batches land.
        let again = run.begin_close(&key, 0).unwrap();
        assert_eq!(again.acc.to_parts(), parts);
        assert_eq!(run.abort_close(again), Some(12));
        apply_marked_rows(&run, &key, &x, &y);
        assert_eq!(samples_of(&run), 18);

        // Frozen for the shutdown checkpoint while closing: back frozen,
        // still in the checkpoint, no merges; a close begun after the
        // freeze leaves the epoch in place too.
        let closing = run.begin_close(&key, 0).unwrap();
        run.freeze();
        assert_eq!(run.abort_close(closing), Some(18));
        assert!(matches!(
            run.begin_close(&key, 0),
            Err(ServerError::ShuttingDown(_))
        ));
        assert_eq!(samples_of(&run), 18);
        assert!(matches!(
            run.apply(&key, 0, rows(&wire(&x), &y), None),
            Err(ServerError::ShuttingDown(_))
        ));
        let snapshots = run.snapshot_changed();
        assert_eq!(snapshots.len(), 1);
        assert_eq!(snapshots[0].samples, 18);
        assert_eq!(budget.used(), per);

        // Deleted while closing: the abort frees it.
        let (run, budget) = shard_run(4, 2.5);
        apply_marked_rows(&run, &key, &x, &y);
        let closing = run.begin_close(&key, 0).unwrap();
        run.mark_deleted();
        assert_eq!(budget.used(), per);
        assert_eq!(run.abort_close(closing), None);
        assert_eq!(budget.used(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// However batches are spread over 1..=4 shards, the combined
        /// statistics equal one accumulator folding every batch (to 1e-12);
        /// the shutdown checkpoint holds exactly what a close computes
        /// from, and restoring it gives the same bits back.
        #[test]
        fn shards_combine_to_the_single_accumulator_and_restore_exactly(
            shards in 1usize..=4,
            offset in -1e3f64..1e3,
            batches in proptest::collection::vec(
                (1usize..9, proptest::collection::vec(-10.0f64..10.0, 32), 0usize..4),
                1..12,
            ),
        ) {
            let key = train();
            let mut reference = Accumulator::new(3, 4);
            // Room for 4 shards and the fold scratch each keeps.
            let runs = [shard_run(shards, 16.0).0, shard_run(shards, 16.0).0];
            for (i, (n, values, target)) in batches.iter().enumerate() {
                let x = ndarray::Array2::from_shape_fn((*n, 4), |(r, c)| {
                    f64::from((values[r * 4 + c] + offset) as f32)
                });
                let y: Vec<u32> = (0..*n).map(|r| ((r + i) % 3) as u32).collect();
                reference.fold_batch(x.view(), &y, Par::Seq).unwrap();
                for run in &runs {
                    if i == 0 {
                        apply_marked_rows(run, &key, &x, &y);
                    } else {
                        // An existing shard, or (target = count) a new one
                        // while fewer than `shards` exist.
                        let count = open_slot(run, &key, 0).shard_count();
                        let target = (*target).min(count).min(shards - 1);
                        apply_into(run, &key, rows(&wire(&x), &y), target);
                    }
                }
            }
            let count = open_slot(&runs[0], &key, 0).shard_count();
            proptest::prop_assert!(count <= shards);
            let closed = runs[0].begin_close(&key, 0).unwrap().acc;
            runs[1].freeze();
            let (parts, packed) = runs[1].snapshot_changed().remove(0).packed.unwrap();
            let frozen = AccumulatorParts {
                scatter: crate::stats::unpack_scatter(&packed, parts.feature_dim).unwrap(),
                ..parts
            };
            assert_parts_close(&closed, &reference, 1e-12);
            proptest::prop_assert_eq!(&closed.to_parts(), &frozen);
            let (restored, _) = shard_run(shards, 16.0);
            let acc = Accumulator::from_parts(frozen.clone()).unwrap();
            restored.restore_open(key.clone(), 0, RestoredEpoch {
                acc,
                writers: BTreeMap::new(),
                generation: 0,
                missing: BTreeMap::new(),
                durable_unix_ms: 0,
                rewrite: false,
            });
            let reopened = restored.begin_close(&key, 0).unwrap().acc;
            proptest::prop_assert_eq!(reopened.to_parts(), frozen);
        }
    }

    fn apply_marked_rows(run: &RunState, key: &StreamKey, x: &ndarray::Array2<f64>, y: &[u32]) {
        apply_marked_wire(run, key, &wire(x), y);
    }

    /// Applies `features` to epoch 0, writing the markers it asks for.
    fn apply_marked_wire(run: &RunState, key: &StreamKey, features: &WireRows, y: &[u32]) {
        loop {
            match run.apply(key, 0, rows(features, y), None).unwrap() {
                Applied::NeedsMarker(m) | Applied::NeedsWriterMarker { marker: m, .. } => {
                    futures::executor::block_on(
                        m.write_once(|| async { Ok::<(), ServerError>(()) }),
                    )
                    .unwrap()
                }
                _ => return,
            }
        }
    }
}
