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
//! A batch is applied in three steps: (1) under the run lock, skip
//! duplicates, reject a sequence beyond the writer's gap limit and closed
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
//! exactly as disjoint inclusive intervals, so a writer numbering its
//! batches 0, 1, 2, … (from any start) costs one interval; each gap between
//! the numbers it sent costs one more. The filter never forgets: a batch
//! whose sequence was applied is a duplicate, any other batch is merged.
//! Memory is bounded instead by admission: a batch whose sequence is not
//! next to an applied one (it would open a new gap) is rejected, before
//! anything is claimed or merged, when the writer already has
//! `--max-sequence-gaps-per-writer` gaps. A sequence that extends an
//! interval or fills a remembered gap is always admitted, so a late batch
//! is either applied or refused with an error, never dropped silently.
//!
//! Claims of batches still being merged are kept separately (`in_flight`),
//! so a concurrent retry of the same batch is counted as a duplicate rather
//! than merged twice. Such a claim may still fail (its epoch closed
//! meanwhile) and be released, so admission counts the worst case: every
//! in-flight sequence that is not next to an applied one is counted as a
//! gap of its own. Because applied sets only grow while claims settle,
//! `intervals(applied) + isolated(in_flight)` never rises except through an
//! admission that checked it, and the applied set stays within the limit
//! whatever the outcome of the concurrent merges. A checkpoint restores the
//! intervals as they were, even beyond a since-lowered limit (then only
//! sequences next to applied ones are admitted until gaps are filled).
//!
//! The rejection is FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: no shared
//! resource is short and waiting does not help; what refuses the batch is
//! that writer's own history of sequence numbers, which only the client can
//! change (resend the missing sequences, send in increasing order, or use a
//! new `writer_id`). gRPC clients treat RESOURCE_EXHAUSTED as retryable with
//! back-off, which here would repeat the same refusal.
//!
//! # Open-epoch markers and lost epochs
//!
//! An accumulator may only exist while its epoch has a durable marker (see
//! `store`), so that after a crash the daemon knows which epochs lost data.
//! When a batch is the first of its (stream, epoch), [`RunState::apply`]
//! changes nothing and returns [`Applied::NeedsMarker`] with the epoch's
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
//! were whole; the client continues under a new epoch number. SPEC §5 is
//! silent on this; the decision is recorded here and in `store`.
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

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (every critical section leaves the data consistent before it can panic:
/// merges leave the accumulator unchanged on error).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applied sequence numbers of one writer, as disjoint, non-adjacent
/// inclusive intervals `start -> end`. Exact: it never forgets a number
/// (bounding it is [`RunState::apply`]'s admission check).
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

    /// Whether recording `seq` would add an interval: it is neither
    /// recorded nor next to a recorded number.
    pub fn is_isolated(&self, seq: u64) -> bool {
        !self.contains(seq)
            && seq.checked_sub(1).is_none_or(|prev| !self.contains(prev))
            && seq.checked_add(1).is_none_or(|next| !self.contains(next))
    }

    /// Records `seq`, joining adjacent intervals (adds at most one).
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
    }

    /// Number of intervals held.
    pub fn intervals(&self) -> usize {
        self.ranges.len()
    }

    /// Gaps between the recorded numbers (intervals − 1; 0 when empty).
    pub fn gaps(&self) -> usize {
        self.ranges.len().saturating_sub(1)
    }

    /// `[start0, end0, start1, end1, …]` for a checkpoint.
    pub fn to_flat(&self) -> Vec<u64> {
        self.ranges.iter().flat_map(|(&s, &e)| [s, e]).collect()
    }

    /// Rebuilds from [`SeqSet::to_flat`] output. Reversed pairs are skipped
    /// and overlapping or adjacent ones joined, so the gap count stays
    /// exact even for a hand-edited checkpoint; nothing is dropped for
    /// exceeding the limit (admission handles that).
    pub fn from_flat(flat: &[u64]) -> SeqSet {
        let mut pairs: Vec<(u64, u64)> = flat
            .chunks_exact(2)
            .map(|pair| (pair[0], pair[1]))
            .filter(|(start, end)| start <= end)
            .collect();
        pairs.sort_unstable();
        let mut set = SeqSet::default();
        let mut current: Option<(u64, u64)> = None;
        for (start, end) in pairs {
            current = match current {
                Some((s, e)) if start <= e.saturating_add(1) => Some((s, e.max(end))),
                Some((s, e)) => {
                    set.ranges.insert(s, e);
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((s, e)) = current {
            set.ranges.insert(s, e);
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

/// The durable open marker of one epoch that has no accumulator yet:
/// written at most once by whichever batch gets there first, awaited by
/// every other batch of that epoch (see "Open-epoch markers").
#[derive(Clone, Debug, Default)]
pub struct EpochMarker(Arc<tokio::sync::OnceCell<()>>);

impl EpochMarker {
    /// Whether the marker is known to be durable.
    pub fn is_written(&self) -> bool {
        self.0.initialized()
    }

    /// Runs `write` unless the marker is written; concurrent callers wait
    /// for the one write in progress, and after a failed write the next
    /// caller tries again.
    pub async fn write_once<F, Fut, E>(&self, write: F) -> Result<(), E>
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

/// `unix_ms` as an RFC 3339 UTC timestamp with second precision, e.g.
/// `2023-11-14T22:13:20Z` (civil-from-days, proleptic Gregorian).
pub fn utc_timestamp(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
    /// Markers of epochs without an accumulator yet (being written, or
    /// written for a first batch that was then refused).
    marked: BTreeMap<u64, EpochMarker>,
    /// Epochs that lost their data, with the unix ms of the start-up that
    /// found them.
    lost: BTreeMap<u64, i64>,
}

#[derive(Debug, Default)]
struct WriterState {
    applied: SeqSet,
    /// Claimed, being merged; disjoint from `applied`.
    in_flight: BTreeSet<u64>,
}

impl WriterState {
    fn is_duplicate(&self, seq: u64) -> bool {
        self.applied.contains(seq) || self.in_flight.contains(&seq)
    }

    /// Admission of `seq` against `max_gaps` (see "Duplicate filter" in the
    /// module doc). `Err` carries the gaps the writer has in the worst case
    /// before `seq`: applied intervals plus isolated in-flight claims, − 1.
    fn admit(&self, seq: u64, max_gaps: u64) -> Result<(), u64> {
        if !self.applied.is_isolated(seq) {
            // Extends an interval or fills a gap: never adds one.
            return Ok(());
        }
        let pending = self
            .in_flight
            .iter()
            .filter(|&&claimed| self.applied.is_isolated(claimed))
            .count();
        let worst_intervals = (self.applied.intervals() + pending) as u64;
        // With `seq`, the worst case has `worst_intervals + 1` intervals,
        // i.e. `worst_intervals` gaps.
        if worst_intervals > max_gaps {
            Err(worst_intervals.saturating_sub(1))
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, Default)]
struct RunInner {
    streams: BTreeMap<StreamKey, StreamState>,
    writers: HashMap<String, WriterState>,
    /// Set by the shutdown checkpoint: no new accumulators.
    frozen: bool,
    /// Unix ms when `FinishRun` marked the run finished: no more pushes or
    /// closes.
    finished: Option<i64>,
}

/// What happened to a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Merged; carries the batch's samples.
    Merged(u64),
    /// Its `(writer_id, sequence)` was applied before: skipped.
    Duplicate,
    /// Nothing happened: the batch opens its epoch, whose marker must be
    /// durable first (write it, then apply again).
    NeedsMarker(EpochMarker),
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

/// A run as frozen for the shutdown checkpoint.
#[derive(Debug, Default)]
pub struct FrozenRun {
    /// Open accumulators `(stream, epoch, statistics)`.
    pub open: Vec<(StreamKey, u64, Accumulator)>,
    /// Epochs being closed (their result may or may not get stored).
    pub closing: Vec<(StreamKey, u64)>,
    /// The writers' duplicate filters.
    pub writers: Vec<(String, SeqSet)>,
}

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
    pub fn finished_unix_ms(&self) -> Option<i64> {
        lock(&self.inner).finished
    }

    /// Marks the run finished at `unix_ms`; `Ok(false)` when it already was.
    /// Refused while an epoch is open or being closed, so a finished run
    /// never changes again; later pushes and closes fail in
    /// [`RunState::apply`] and [`RunState::begin_close`].
    pub fn finish(&self, unix_ms: i64) -> Result<bool, ServerError> {
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
    pub fn set_finished(&self, unix_ms: Option<i64>) {
        lock(&self.inner).finished = unix_ms;
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
            .is_some_and(|w| w.is_duplicate(*seq))
    }

    /// Merges a batch's statistics into the open accumulator of
    /// `(key, epoch)`, creating it if needed once the epoch's marker is
    /// durable ([`Applied::NeedsMarker`] until then). Whole or nothing: a
    /// batch whose sequence would give its writer more than `max_gaps` gaps,
    /// or whose epoch was lost, is rejected before anything is claimed,
    /// created or merged.
    pub fn apply(
        &self,
        key: &StreamKey,
        epoch: u64,
        batch: &Accumulator,
        dedup: Option<&(String, u64)>,
        budget: &Budget,
        max_gaps: u64,
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
                    w.admit(*seq, max_gaps)
                        .map_err(|gaps| ServerError::SequenceGaps {
                            run_id: self.info.run_id.clone(),
                            writer_id: writer.clone(),
                            sequence: *seq,
                            gaps,
                            limit: max_gaps,
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
                    let needed = u64::try_from(accumulator_bytes(
                        self.info.num_classes,
                        self.info.feature_dim,
                    ))
                    .unwrap_or(u64::MAX);
                    let marker = stream.marked.entry(epoch).or_default();
                    if !marker.is_written() {
                        // Refuse a batch the budget cannot take before a
                        // marker is written for it (try_reserve decides).
                        let in_use = budget.used();
                        if in_use.saturating_add(needed) > budget.limit() {
                            return Err(self.budget_error(needed, in_use, budget));
                        }
                        return Ok(Applied::NeedsMarker(marker.clone()));
                    }
                    budget
                        .try_reserve(needed)
                        .map_err(|in_use| self.budget_error(needed, in_use, budget))?;
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
    /// epochs being closed and the duplicate filter, for the shutdown
    /// checkpoint. Later merges and new accumulators fail with UNAVAILABLE,
    /// so nothing is acknowledged that the checkpoint misses.
    pub fn freeze_for_checkpoint(&self) -> FrozenRun {
        let (slots, closing, writers) = {
            let mut inner = lock(&self.inner);
            inner.frozen = true;
            let closing = inner
                .streams
                .iter()
                .flat_map(|(key, s)| s.closing.iter().map(move |&epoch| (key.clone(), epoch)))
                .collect();
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
            (slots, closing, writers)
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
        FrozenRun {
            open: epochs,
            closing,
            writers,
        }
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

    /// Remembers an epoch that lost its data (found at start-up at
    /// `found_unix_ms`): pushes and closes of it are refused from now on.
    pub fn restore_lost(&self, key: StreamKey, epoch: u64, found_unix_ms: i64) {
        let mut inner = lock(&self.inner);
        inner
            .streams
            .entry(key)
            .or_default()
            .lost
            .insert(epoch, found_unix_ms);
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
    fn seqset_is_exact_and_never_forgets() {
        let mut s = SeqSet::default();
        assert_eq!((s.intervals(), s.gaps()), (0, 0));
        for seq in [5, 7, 6, 1, 2, 3] {
            s.insert(seq);
        }
        assert_eq!(s.to_flat(), vec![1, 3, 5, 7]);
        assert_eq!(s.gaps(), 1);
        assert!(s.contains(2) && s.contains(6) && !s.contains(4) && !s.contains(0));
        // 4 and 0 border an interval; 9 and 10 do not; 6 is recorded.
        assert!(!s.is_isolated(4) && !s.is_isolated(0) && !s.is_isolated(8));
        assert!(s.is_isolated(10) && s.is_isolated(u64::MAX) && !s.is_isolated(6));
        s.insert(4);
        assert_eq!(s.to_flat(), vec![1, 7]);
        s.insert(u64::MAX);
        assert!(s.contains(u64::MAX) && !s.is_isolated(u64::MAX - 1));
        assert_eq!(SeqSet::from_flat(&s.to_flat()), s);

        // Far beyond the default limit every number is still remembered
        // exactly: bounding is admission's job, not forgetting.
        let n = 3000u64;
        let mut sparse = SeqSet::default();
        for i in 0..n {
            sparse.insert(i * 2);
        }
        assert_eq!(sparse.intervals(), n as usize);
        assert!(sparse.contains(0) && !sparse.contains(1) && sparse.contains(2 * (n - 1)));
        assert_eq!(SeqSet::from_flat(&sparse.to_flat()), sparse);
    }

    #[test]
    fn seqset_from_flat_normalises() {
        // Overlapping, adjacent, unsorted and reversed pairs.
        let s = SeqSet::from_flat(&[10, 12, 1, 3, 4, 5, 11, 20, 9, 2, 30, 30, 7]);
        assert_eq!(s.to_flat(), vec![1, 5, 10, 20, 30, 30]);
        assert_eq!(s.gaps(), 2);
        assert_eq!(SeqSet::from_flat(&[]), SeqSet::default());
    }

    #[test]
    fn admission_counts_in_flight_claims_at_their_worst() {
        let mut w = WriterState::default();
        w.applied.insert(0);
        w.in_flight.insert(5);
        // {0} plus a pending 5 is one gap; 10 would make two.
        assert_eq!(w.admit(10, 1), Err(1));
        assert_eq!(w.admit(10, 2), Ok(()));
        // Next to an applied number: never a new gap, even at the limit.
        assert_eq!(w.admit(1, 0), Ok(()));

        // A pending claim that would bridge {0} and {2} may still fail, so
        // it does not make room: 4 is refused until 1 has landed.
        let mut w = WriterState::default();
        w.applied.insert(0);
        w.applied.insert(2);
        w.in_flight.insert(1);
        assert_eq!(w.admit(4, 1), Err(1));
        w.in_flight.remove(&1);
        w.applied.insert(1);
        assert_eq!(w.admit(4, 1), Ok(()));
    }

    fn tiny_run() -> RunState {
        RunState::new(
            RunInfo {
                run_id: "r".into(),
                num_classes: 2,
                feature_dim: 1,
                metadata: BTreeMap::new(),
                created_unix_ms: 0,
            },
            0,
        )
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
        budget: &Budget,
        max_gaps: u64,
    ) -> Result<Applied, ServerError> {
        loop {
            match run.apply(key, epoch, batch, dedup, budget, max_gaps)? {
                Applied::NeedsMarker(marker) => futures::executor::block_on(
                    marker.write_once(|| async { Ok::<(), ServerError>(()) }),
                )?,
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
        let run = tiny_run();
        let budget = Budget::new(1 << 20);
        let key = StreamKey {
            split: "train".into(),
            layer: "penultimate".into(),
        };
        let batch = one_row(1.5, 1);
        let apply = |seq: u64| {
            apply_marked(
                &run,
                &key,
                0,
                &batch,
                Some(&("w".to_owned(), seq)),
                &budget,
                limit,
            )
        };
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
            apply_marked(
                &run,
                &key,
                0,
                &batch,
                Some(&("v".to_owned(), 7)),
                &budget,
                limit
            )
            .unwrap(),
            Applied::Merged(1)
        );
        assert_eq!(samples_of(&run), limit + 5);
    }

    #[test]
    fn a_restored_filter_beyond_a_lowered_limit_is_kept_and_bounded() {
        let run = tiny_run();
        let budget = Budget::new(1 << 20);
        let key = StreamKey {
            split: "train".into(),
            layer: "penultimate".into(),
        };
        // Checkpointed with 3 gaps; restarted with a limit of 1.
        run.restore_writer("w".into(), SeqSet::from_flat(&[0, 0, 2, 2, 4, 4, 6, 6]));
        let batch = one_row(0.5, 0);
        let apply = |seq: u64| {
            apply_marked(
                &run,
                &key,
                0,
                &batch,
                Some(&("w".to_owned(), seq)),
                &budget,
                1,
            )
        };
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
    fn budget_refuses_beyond_limit() {
        let b = Budget::new(100);
        assert!(b.try_reserve(60).is_ok());
        assert_eq!(b.try_reserve(50), Err(60));
        b.release(60);
        assert!(b.try_reserve(100).is_ok());
        assert_eq!(b.used(), 100);
    }

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(utc_timestamp(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn a_new_epoch_waits_for_one_marker_and_a_lost_epoch_is_refused() {
        let run = tiny_run();
        let budget = Budget::new(1 << 20);
        let key = StreamKey {
            split: "train".into(),
            layer: "penultimate".into(),
        };
        let batch = one_row(2.0, 0);
        // Two ranks open epoch 0 at once: both are told to wait for the
        // same marker, and nothing is created or counted before it exists.
        let first = run.apply(&key, 0, &batch, None, &budget, 8).unwrap();
        let second = run.apply(&key, 0, &batch, None, &budget, 8).unwrap();
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
        for _ in 0..2 {
            assert_eq!(
                run.apply(&key, 0, &batch, None, &budget, 8).unwrap(),
                Applied::Merged(1)
            );
        }
        assert_eq!(samples_of(&run), 2);

        // A lost epoch refuses pushes and closes and changes nothing.
        run.restore_lost(key.clone(), 3, 1_700_000_000_000);
        let used = budget.used();
        for err in [
            run.apply(&key, 3, &batch, None, &budget, 8).unwrap_err(),
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
        let frozen = run.freeze_for_checkpoint();
        assert_eq!(frozen.open.len(), 1);
        assert!(matches!(
            run.apply(&key, 4, &batch, None, &budget, 8),
            Err(ServerError::ShuttingDown(_))
        ));
    }
}
