//! Durable state in one redb database, `<data-dir>/vcid.redb`.
//!
//! Owns the on-disk layout; it must not hold in-memory state or decide
//! anything about the API. Values are protobuf (prost) encodings, compact
//! and forward-compatible:
//!
//! | table | key | value |
//! |---|---|---|
//! | `runs` | run_id | `vcid.v1.Run` (the registry entry; `rows_ingested` as of the last checkpoint or close) |
//! | `run_uids` | run_id | u64: the run's uid, drawn at `CreateRun` (see "Run identity"); absent for runs created by earlier versions, whose uid is 0 |
//! | `epoch_results` | (run_id, split, layer, epoch) | `vcid.v1.EpochResult` |
//! | `epoch_checkpoint_pieces` | (run_id, split, layer, epoch, piece) | one piece of an [`EpochCheckpoint`]: an open epoch's statistics, its writers' sequences, generation (see "Checkpoints in pieces") |
//! | `epoch_checkpoints` | (run_id, split, layer, epoch) | [`EpochCheckpoint`] of schema 1, whole: read, never written |
//! | `open_epochs` | (run_id, split, layer, epoch) | unix ms when the epoch was opened (its marker) |
//! | `dirty_writers` | (run_id, split, layer, epoch, writer_id) | generation: the writer applied batches to the epoch that its checkpoint may not hold |
//! | `closed_writers` | (run_id, writer_id) | [`WriterCheckpoint`]: the writer's sequences in closed epochs |
//! | `lost_epochs` | (run_id, split, layer, epoch) | unix ms of the start-up that found it lost (written by earlier versions) |
//! | `checkpoints` | run_id | [`RunCheckpoint`]: the whole-run shutdown checkpoint of earlier versions (read once, then rewritten) |
//! | `meta` | name | bytes (`schema_version` = 2) |
//!
//! Every write is one transaction committed with redb's default
//! `Durability::Immediate` (fsync before `commit` returns), so a run, an
//! epoch result or a checkpoint acknowledged to a client survives `kill
//! -9`, and a crash during a write leaves the previous committed state.
//!
//! # Open epochs across a crash (decided here and in `state::marker`)
//!
//! Every open epoch has a durable marker in `open_epochs`, written once
//! before any batch of it is acknowledged ([`Store::open_epoch`]) and
//! removed in the transaction that stores its result
//! ([`Store::put_result`]) or deletes its run. A checkpoint round
//! ([`Store::write_round`]) writes the changed open epochs, each with the
//! sequences of every writer it holds, in one transaction. Before a
//! writer's first batch of an epoch after each checkpoint snapshot is
//! applied, a dirty-writer marker names it ([`Store::mark_writer`]); the
//! round that makes that snapshot durable removes the markers it covers.
//! At start-up every marked epoch is restored: from its checkpoint (or
//! empty), and the dirty writers left are exactly those whose batches
//! after the checkpoint died with the process. The daemon refuses to close
//! the epoch (DATA_LOSS) until each of them has resent. Adding tables
//! keeps the schema version: an older database has none of them yet.
//!
//! # Checkpoints in pieces
//!
//! A checkpoint is stored as consecutive pieces of about 1 MiB
//! ([`PIECE_BYTES`]), each an `EpochCheckpoint` message (small fields
//! first, then slices of the large vectors), that merge back into it in
//! key order. redb keeps a value whole in one page, reads a page whole to
//! change it, and holds a transaction's dirty pages in memory when they
//! are larger than its write buffer: one 50 MB value (d = 2048, K = 1000)
//! cost about 130 MB of memory above the checkpoint itself to replace.
//! Pieces go through its bounded cache ([`CACHE_BYTES`]) instead.
//!
//! # Schema versions
//!
//! Version 2 stores a checkpoint in pieces (above), with its scatter as
//! its packed lower triangle ([`EpochCheckpoint::scatter_lower`]), half the
//! bytes of the full matrix that version 1 stored, whole, in
//! `epoch_checkpoints`. This version opens a version-1 database, reads its
//! checkpoints as they are (replacing each at its next round) and marks it
//! version 2; versions before it refuse a version-2 database
//! (`schema_version: expected 1, received 2`) rather than miss its
//! checkpoints.
//!
//! # Run identity
//!
//! A run deleted and created again under the same id is a different run:
//! `CreateRun` draws a random non-zero uid, stored in `run_uids` with the
//! record. Every write made on behalf of a run after its creation (an
//! epoch's open marker, a dirty-writer marker, a checkpoint, a result, the
//! record's refresh) names the uid it started under and checks it in the
//! same transaction: when the run under that id is gone or has another
//! uid, nothing is written and the caller is told (`false`). So a close,
//! a checkpoint round or a batch still in flight for a deleted run can
//! never write into the run that replaced it, before or after a restart.
//! Databases of earlier versions have no `run_uids` table: it is created
//! empty, their runs keep uid 0 until deleted, and a run created since
//! gets a fresh uid.
//!
//! All methods block (disk I/O); async callers use `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::proto::{EpochResult, Run, StatsBlock};
use crate::stats::{unpack_scatter, AccumulatorParts, StatsError};

use super::state::SeqSet;

/// redb's page cache (its default is 1 GiB). The daemon reads the store at
/// start-up and writes it afterwards (its history is served from memory),
/// so a cache that kept every checkpointed page would only grow the
/// daemon's memory by up to its size.
const CACHE_BYTES: usize = 32 << 20;

const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
const RUN_UIDS: TableDefinition<&str, u64> = TableDefinition::new("run_uids");
const RESULTS: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("epoch_results");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
const OPEN_EPOCHS: TableDefinition<(&str, &str, &str, u64), i64> =
    TableDefinition::new("open_epochs");
const LOST_EPOCHS: TableDefinition<(&str, &str, &str, u64), i64> =
    TableDefinition::new("lost_epochs");
/// Schema 1's checkpoints, one value each: read, and removed once
/// replaced, never written.
const EPOCH_CHECKPOINTS: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("epoch_checkpoints");
/// Checkpoints in pieces (see "Checkpoints in pieces"); the last key
/// element is the piece's index.
const CHECKPOINT_PIECES: TableDefinition<(&str, &str, &str, u64, u32), &[u8]> =
    TableDefinition::new("epoch_checkpoint_pieces");
type PiecesTable<'txn> =
    redb::Table<'txn, (&'static str, &'static str, &'static str, u64, u32), &'static [u8]>;
type SingleTable<'txn> =
    redb::Table<'txn, (&'static str, &'static str, &'static str, u64), &'static [u8]>;

/// Bytes of one checkpoint piece, about: with its key and redb's leaf
/// header it fits a 1 MiB page.
const PIECE_BYTES: usize = (1 << 20) - 4096;
const DIRTY_WRITERS: TableDefinition<(&str, &str, &str, u64, &str), u64> =
    TableDefinition::new("dirty_writers");
const CLOSED_WRITERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("closed_writers");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Version of the layout above, stored under `meta/schema_version` (see
/// "Schema versions").
pub const SCHEMA_VERSION: u32 = 2;

/// The earlier version this one opens and upgrades.
const UPGRADES_FROM: u32 = 1;

/// A failure of the database or of decoding what it holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path}: table {table}: stored value does not decode: {source}")]
    Decode {
        path: PathBuf,
        table: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("database {path}: schema_version: expected {SCHEMA_VERSION}, received {found}")]
    Schema { path: PathBuf, found: String },
}

/// One writer's applied sequence numbers, as inclusive `[start, end]` pairs
/// flattened into `ranges` (see `state::SeqSet`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriterCheckpoint {
    #[prost(string, tag = "1")]
    pub writer_id: String,
    #[prost(uint64, repeated, tag = "2")]
    pub ranges: Vec<u64>,
}

/// One open epoch as a checkpoint round wrote it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EpochCheckpoint {
    /// The statistics, with an empty `scatter` when `scatter_lower` holds
    /// it (schema 2); the full matrix in schema 1.
    #[prost(message, optional, tag = "1")]
    pub stats: Option<StatsBlock>,
    /// The sequences of each writer merged into `stats`.
    #[prost(message, repeated, tag = "2")]
    pub writers: Vec<WriterCheckpoint>,
    /// Dirty-writer markers of a lower generation are covered by it.
    #[prost(uint64, tag = "3")]
    pub generation: u64,
    #[prost(int64, tag = "4")]
    pub unix_ms: i64,
    /// The scatter's lower triangle, packed column by column
    /// ([`crate::stats::Accumulator::packed_scatter`]); empty in schema 1.
    #[prost(double, repeated, tag = "5")]
    pub scatter_lower: Vec<f64>,
}

impl EpochCheckpoint {
    /// The checkpoint of `key` holding statistics whose scatter is packed
    /// (`Accumulator::merged_packed`: `parts.scatter` empty).
    pub fn new(
        key: &EpochKey,
        (parts, scatter_lower): (AccumulatorParts, Vec<f64>),
        writers: Vec<WriterCheckpoint>,
        generation: u64,
        unix_ms: i64,
    ) -> EpochCheckpoint {
        EpochCheckpoint {
            stats: Some(StatsBlock {
                run_id: key.run_id.clone(),
                split: key.split.clone(),
                layer: key.layer.clone(),
                epoch: key.epoch,
                ..StatsBlock::from(parts)
            }),
            writers,
            generation,
            unix_ms,
            scatter_lower,
        }
    }

    /// Encodes the checkpoint as consecutive pieces for `put`, each an
    /// `EpochCheckpoint` message of about [`PIECE_BYTES`] at most: first
    /// the small fields, then the class means, the unit sums and the
    /// scatter in slices. Decoding concatenated messages merges them
    /// (repeated fields append, absent ones keep their value), so merging
    /// the pieces in order with [`Message::merge`] gives the checkpoint
    /// back. One piece is encoded at a time, and each large vector is
    /// freed once its pieces are put.
    fn into_pieces<E>(mut self, mut put: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        /// Values per piece, with room for the tags and lengths.
        const VALUES: usize = PIECE_BYTES / 8 - 8;
        type Field = fn(&mut EpochCheckpoint) -> &mut Vec<f64>;
        const LARGE: [Field; 4] = [
            |c| &mut c.stats.get_or_insert_with(StatsBlock::default).class_means,
            |c| &mut c.stats.get_or_insert_with(StatsBlock::default).unit_sum,
            |c| &mut c.stats.get_or_insert_with(StatsBlock::default).scatter,
            |c| &mut c.scatter_lower,
        ];
        let had_stats = self.stats.is_some();
        let large = LARGE.map(|field| std::mem::take(field(&mut self)));
        if !had_stats {
            self.stats = None;
        }
        put(&self.encode_to_vec())?;
        for (field, values) in LARGE.into_iter().zip(large) {
            for slice in values.chunks(VALUES) {
                let mut piece = EpochCheckpoint::default();
                *field(&mut piece) = slice.to_vec();
                put(&piece.encode_to_vec())?;
            }
        }
        Ok(())
    }

    /// The statistics for a run of `num_classes` classes in `feature_dim`
    /// dimensions (unvalidated, as [`StatsBlock::into_parts`]), the full
    /// scatter unpacked; `None` for a checkpoint without statistics.
    /// Takes them, leaving the writers and generation.
    pub fn take_parts(
        &mut self,
        num_classes: u32,
        feature_dim: u32,
    ) -> Option<Result<AccumulatorParts, StatsError>> {
        let block = self.stats.take()?;
        let packed = std::mem::take(&mut self.scatter_lower);
        let mut parts = block.into_parts(num_classes, feature_dim);
        if packed.is_empty() {
            return Some(Ok(parts));
        }
        if !parts.scatter.is_empty() {
            return Some(Err(StatsError::InvalidPart {
                field: "scatter",
                expected: "empty beside scatter_lower".into(),
                received: format!("{} values", parts.scatter.len()),
            }));
        }
        Some(unpack_scatter(&packed, parts.feature_dim).map(|full| {
            parts.scatter = full;
            parts
        }))
    }
}

/// The whole-run shutdown checkpoint of earlier versions: open
/// accumulators and the duplicate filter.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RunCheckpoint {
    #[prost(message, repeated, tag = "1")]
    pub epochs: Vec<StatsBlock>,
    #[prost(message, repeated, tag = "2")]
    pub writers: Vec<WriterCheckpoint>,
}

/// One (run, split, layer, epoch), the key of the marker tables.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EpochKey {
    pub run_id: String,
    pub split: String,
    pub layer: String,
    pub epoch: u64,
}

impl EpochKey {
    fn as_tuple(&self) -> (&str, &str, &str, u64) {
        (&self.run_id, &self.split, &self.layer, self.epoch)
    }

    pub fn from_tuple((run_id, split, layer, epoch): (&str, &str, &str, u64)) -> EpochKey {
        EpochKey {
            run_id: run_id.to_owned(),
            split: split.to_owned(),
            layer: layer.to_owned(),
            epoch,
        }
    }
}

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub struct Restored {
    /// Every run with its uid.
    pub runs: Vec<(Run, u64)>,
    /// In key order: run, split, layer, epoch.
    pub results: Vec<EpochResult>,
    /// Legacy whole-run checkpoints.
    pub checkpoints: Vec<(String, RunCheckpoint)>,
    /// Epochs marked open, with their checkpoint if any.
    pub open: Vec<(EpochKey, Option<EpochCheckpoint>)>,
    /// Dirty-writer markers: `(epoch, writer_id, generation)`.
    pub dirty: Vec<(EpochKey, String, u64)>,
    /// Per run, the writers' sequences in closed epochs.
    pub closed_writers: Vec<(String, WriterCheckpoint)>,
    /// Epochs found lost by earlier versions, with the unix ms of the
    /// start-up that found them.
    pub lost: Vec<(EpochKey, i64)>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/vcid.redb` and its tables.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("vcid.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| StoreError::Db {
                path: path.clone(),
                source: e.into(),
            })?;
        let store = Store {
            db: Arc::new(db),
            path: Arc::new(path),
        };
        store.init()?;
        Ok(store)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: (*self.path).clone(),
            source: e.into(),
        }
    }

    fn decode_err(&self, table: &'static str, source: prost::DecodeError) -> StoreError {
        StoreError::Decode {
            path: (*self.path).clone(),
            table,
            source,
        }
    }

    /// Creates the tables and checks the schema version.
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            txn.open_table(RUN_UIDS).map_err(|e| self.db_err(e))?;
            txn.open_table(RESULTS).map_err(|e| self.db_err(e))?;
            txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            txn.open_table(LOST_EPOCHS).map_err(|e| self.db_err(e))?;
            txn.open_table(EPOCH_CHECKPOINTS)
                .map_err(|e| self.db_err(e))?;
            txn.open_table(CHECKPOINT_PIECES)
                .map_err(|e| self.db_err(e))?;
            txn.open_table(DIRTY_WRITERS).map_err(|e| self.db_err(e))?;
            txn.open_table(CLOSED_WRITERS).map_err(|e| self.db_err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| self.db_err(e))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match found {
                Some(v) if v == SCHEMA_VERSION.to_string() => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())
                        .map_err(|e| self.db_err(e))?;
                }
                Some(v) if v == UPGRADES_FROM.to_string() => {
                    tracing::info!(
                        path = %self.path.display(),
                        "database schema_version {UPGRADES_FROM} upgraded to {SCHEMA_VERSION}"
                    );
                    meta.insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())
                        .map_err(|e| self.db_err(e))?;
                }
                Some(found) => {
                    return Err(StoreError::Schema {
                        path: (*self.path).clone(),
                        found,
                    })
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Reads every run, epoch result and checkpoint.
    pub fn load(&self) -> Result<Restored, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let mut out = Restored::default();
        let runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
        let uids = txn.open_table(RUN_UIDS).map_err(|e| self.db_err(e))?;
        for entry in runs.iter().map_err(|e| self.db_err(e))? {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            let run = Run::decode(value.value()).map_err(|e| self.decode_err("runs", e))?;
            let uid = uids
                .get(key.value())
                .map_err(|e| self.db_err(e))?
                .map_or(0, |v| v.value());
            out.runs.push((run, uid));
        }
        let results = txn.open_table(RESULTS).map_err(|e| self.db_err(e))?;
        for entry in results.iter().map_err(|e| self.db_err(e))? {
            let (_, value) = entry.map_err(|e| self.db_err(e))?;
            out.results.push(
                EpochResult::decode(value.value())
                    .map_err(|e| self.decode_err("epoch_results", e))?,
            );
        }
        let checkpoints = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
        for entry in checkpoints.iter().map_err(|e| self.db_err(e))? {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            let checkpoint = RunCheckpoint::decode(value.value())
                .map_err(|e| self.decode_err("checkpoints", e))?;
            out.checkpoints.push((key.value().to_owned(), checkpoint));
        }
        let single = txn
            .open_table(EPOCH_CHECKPOINTS)
            .map_err(|e| self.db_err(e))?;
        let pieces = txn
            .open_table(CHECKPOINT_PIECES)
            .map_err(|e| self.db_err(e))?;
        let markers = txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
        for entry in markers.iter().map_err(|e| self.db_err(e))? {
            let (key, _) = entry.map_err(|e| self.db_err(e))?;
            let key = EpochKey::from_tuple(key.value());
            let (r, s, l, e) = key.as_tuple();
            let mut checkpoint: Option<EpochCheckpoint> = None;
            for piece in pieces
                .range((r, s, l, e, 0)..=(r, s, l, e, u32::MAX))
                .map_err(|e| self.db_err(e))?
            {
                let (_, value) = piece.map_err(|e| self.db_err(e))?;
                checkpoint
                    .get_or_insert_with(EpochCheckpoint::default)
                    .merge(value.value())
                    .map_err(|e| self.decode_err("epoch_checkpoint_pieces", e))?;
            }
            if checkpoint.is_none() {
                checkpoint = single
                    .get(key.as_tuple())
                    .map_err(|e| self.db_err(e))?
                    .map(|v| EpochCheckpoint::decode(v.value()))
                    .transpose()
                    .map_err(|e| self.decode_err("epoch_checkpoints", e))?;
            }
            out.open.push((key, checkpoint));
        }
        let dirty = txn.open_table(DIRTY_WRITERS).map_err(|e| self.db_err(e))?;
        for entry in dirty.iter().map_err(|e| self.db_err(e))? {
            let (key, generation) = entry.map_err(|e| self.db_err(e))?;
            let (run_id, split, layer, epoch, writer) = key.value();
            out.dirty.push((
                EpochKey::from_tuple((run_id, split, layer, epoch)),
                writer.to_owned(),
                generation.value(),
            ));
        }
        let closed = txn.open_table(CLOSED_WRITERS).map_err(|e| self.db_err(e))?;
        for entry in closed.iter().map_err(|e| self.db_err(e))? {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            let writer = WriterCheckpoint::decode(value.value())
                .map_err(|e| self.decode_err("closed_writers", e))?;
            out.closed_writers.push((key.value().0.to_owned(), writer));
        }
        let lost = txn.open_table(LOST_EPOCHS).map_err(|e| self.db_err(e))?;
        for entry in lost.iter().map_err(|e| self.db_err(e))? {
            let (key, at) = entry.map_err(|e| self.db_err(e))?;
            out.lost
                .push((EpochKey::from_tuple(key.value()), at.value()));
        }
        Ok(out)
    }

    /// A write transaction for the run of `uid`, or `None` when the run
    /// stored under `run_id` is no longer that one (see "Run identity").
    fn begin_write_for(
        &self,
        run_id: &str,
        uid: u64,
    ) -> Result<Option<redb::WriteTransaction>, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        Ok(self.is_current(&txn, run_id, uid)?.then_some(txn))
    }

    /// Whether the run stored under `run_id` is the one of `uid` (see
    /// "Run identity"), read inside a write transaction.
    fn is_current(
        &self,
        txn: &redb::WriteTransaction,
        run_id: &str,
        uid: u64,
    ) -> Result<bool, StoreError> {
        let runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
        if runs.get(run_id).map_err(|e| self.db_err(e))?.is_none() {
            return Ok(false);
        }
        let uids = txn.open_table(RUN_UIDS).map_err(|e| self.db_err(e))?;
        let stored = uids
            .get(run_id)
            .map_err(|e| self.db_err(e))?
            .map_or(0, |v| v.value());
        Ok(stored == uid)
    }

    /// Durably stores a new run record with its uid.
    pub fn create_run(&self, run: &Run, uid: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            runs.insert(run.run_id.as_str(), run.encode_to_vec().as_slice())
                .map_err(|e| self.db_err(e))?;
            let mut uids = txn.open_table(RUN_UIDS).map_err(|e| self.db_err(e))?;
            uids.insert(run.run_id.as_str(), uid)
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Durably replaces the record of the run of `uid`. Returns `false`,
    /// writing nothing, when that run is no longer stored.
    pub fn update_run(&self, run: &Run, uid: u64) -> Result<bool, StoreError> {
        let Some(txn) = self.begin_write_for(&run.run_id, uid)? else {
            return Ok(false);
        };
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            runs.insert(run.run_id.as_str(), run.encode_to_vec().as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Durably removes a run, its epoch results and its checkpoint.
    pub fn delete_run(&self, run_id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            runs.remove(run_id).map_err(|e| self.db_err(e))?;
            let mut uids = txn.open_table(RUN_UIDS).map_err(|e| self.db_err(e))?;
            uids.remove(run_id).map_err(|e| self.db_err(e))?;
            let mut results = txn.open_table(RESULTS).map_err(|e| self.db_err(e))?;
            // Deleting is rare; a scan keeps the key encoding out of range
            // arithmetic.
            results
                .retain(|key, _| key.0 != run_id)
                .map_err(|e| self.db_err(e))?;
            let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            checkpoints.remove(run_id).map_err(|e| self.db_err(e))?;
            for table in [OPEN_EPOCHS, LOST_EPOCHS] {
                let mut markers = txn.open_table(table).map_err(|e| self.db_err(e))?;
                markers
                    .retain(|key, _| key.0 != run_id)
                    .map_err(|e| self.db_err(e))?;
            }
            let mut epochs = txn
                .open_table(EPOCH_CHECKPOINTS)
                .map_err(|e| self.db_err(e))?;
            epochs
                .retain(|key, _| key.0 != run_id)
                .map_err(|e| self.db_err(e))?;
            let mut pieces = txn
                .open_table(CHECKPOINT_PIECES)
                .map_err(|e| self.db_err(e))?;
            self.remove_pieces_of_run(&mut pieces, run_id)?;
            let mut dirty = txn.open_table(DIRTY_WRITERS).map_err(|e| self.db_err(e))?;
            dirty
                .retain(|key, _| key.0 != run_id)
                .map_err(|e| self.db_err(e))?;
            let mut closed = txn.open_table(CLOSED_WRITERS).map_err(|e| self.db_err(e))?;
            closed
                .retain(|key, _| key.0 != run_id)
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Durably records that `key`'s epoch is open (its marker; see the
    /// module doc). Returns `false`, writing nothing, when the run of `uid`
    /// is no longer stored, so a deleted run never regains a marker (nor
    /// gives one to the run that replaced it).
    pub fn open_epoch(
        &self,
        key: &EpochKey,
        uid: u64,
        opened_unix_ms: i64,
    ) -> Result<bool, StoreError> {
        let Some(txn) = self.begin_write_for(&key.run_id, uid)? else {
            return Ok(false);
        };
        {
            let mut markers = txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            markers
                .insert(key.as_tuple(), opened_unix_ms)
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Durably appends an epoch result, removes the epoch's open marker and
    /// refreshes its run record (for `rows_ingested`). Returns `false`,
    /// writing nothing, when the run of `uid` is no longer stored (deleted,
    /// perhaps created again, concurrently): the check and the write are
    /// one transaction, so a deleted run never regains results and never
    /// writes into its successor.
    pub fn put_result(
        &self,
        run: &Run,
        uid: u64,
        result: &EpochResult,
        writers: &[WriterCheckpoint],
    ) -> Result<bool, StoreError> {
        let Some(txn) = self.begin_write_for(&run.run_id, uid)? else {
            return Ok(false);
        };
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            runs.insert(run.run_id.as_str(), run.encode_to_vec().as_slice())
                .map_err(|e| self.db_err(e))?;
            let mut results = txn.open_table(RESULTS).map_err(|e| self.db_err(e))?;
            let key = (
                result.run_id.as_str(),
                result.split.as_str(),
                result.layer.as_str(),
                result.epoch,
            );
            results
                .insert(key, result.encode_to_vec().as_slice())
                .map_err(|e| self.db_err(e))?;
            // The epoch is no longer open: its data is the result now.
            let mut markers = txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            markers.remove(key).map_err(|e| self.db_err(e))?;
            let mut single = txn
                .open_table(EPOCH_CHECKPOINTS)
                .map_err(|e| self.db_err(e))?;
            let mut pieces = txn
                .open_table(CHECKPOINT_PIECES)
                .map_err(|e| self.db_err(e))?;
            self.remove_checkpoint(&mut pieces, &mut single, key, 0)?;
            let mut dirty = txn.open_table(DIRTY_WRITERS).map_err(|e| self.db_err(e))?;
            dirty
                .retain(|k, _| (k.0, k.1, k.2, k.3) != key)
                .map_err(|e| self.db_err(e))?;
            // Its writers' sequences are durable in the result from now on.
            let mut closed = txn.open_table(CLOSED_WRITERS).map_err(|e| self.db_err(e))?;
            for writer in writers {
                let at = (run.run_id.as_str(), writer.writer_id.as_str());
                let mut ranges = match closed.get(at).map_err(|e| self.db_err(e))? {
                    Some(v) => {
                        WriterCheckpoint::decode(v.value())
                            .map_err(|e| self.decode_err("closed_writers", e))?
                            .ranges
                    }
                    None => Vec::new(),
                };
                ranges.extend_from_slice(&writer.ranges);
                let merged = WriterCheckpoint {
                    writer_id: writer.writer_id.clone(),
                    ranges: SeqSet::from_flat(&ranges).to_flat(),
                };
                closed
                    .insert(at, merged.encode_to_vec().as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Durably records that `writer` (`""`: batches without a writer_id)
    /// is about to apply batches to `key`'s epoch that its checkpoint of
    /// generation `generation` will not hold (see the module doc). Returns
    /// `false`, writing nothing, when the run of `uid` is no longer stored.
    pub fn mark_writer(
        &self,
        key: &EpochKey,
        uid: u64,
        writer: &str,
        generation: u64,
    ) -> Result<bool, StoreError> {
        let Some(txn) = self.begin_write_for(&key.run_id, uid)? else {
            return Ok(false);
        };
        {
            let mut dirty = txn.open_table(DIRTY_WRITERS).map_err(|e| self.db_err(e))?;
            let at = (
                key.run_id.as_str(),
                key.split.as_str(),
                key.layer.as_str(),
                key.epoch,
                writer,
            );
            let stored = dirty
                .get(at)
                .map_err(|e| self.db_err(e))?
                .map(|v| v.value());
            dirty
                .insert(at, stored.unwrap_or(0).max(generation))
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Removes `key`'s checkpoint pieces from index `from` on, and its
    /// schema-1 value.
    fn remove_checkpoint(
        &self,
        pieces: &mut PiecesTable<'_>,
        single: &mut SingleTable<'_>,
        (r, s, l, e): (&str, &str, &str, u64),
        from: u32,
    ) -> Result<(), StoreError> {
        pieces
            .retain_in((r, s, l, e, from)..=(r, s, l, e, u32::MAX), |_, _| false)
            .map_err(|e| self.db_err(e))?;
        single.remove((r, s, l, e)).map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Removes every checkpoint piece of `run_id`: one key range, up to
    /// the first key of the next possible run id, `run_id` + NUL (a scan of
    /// the whole table would read every other run's checkpoints).
    fn remove_pieces_of_run(
        &self,
        pieces: &mut PiecesTable<'_>,
        run_id: &str,
    ) -> Result<(), StoreError> {
        let next = format!("{run_id}\0");
        pieces
            .retain_in(
                (run_id, "", "", 0, 0)..(next.as_str(), "", "", 0, 0),
                |_, _| false,
            )
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// One checkpoint round in one durable transaction: refreshes the
    /// given run records (each with its uid), writes each epoch's
    /// checkpoint (skipping epochs whose run of that uid is not among
    /// `runs` or no longer stored, and epochs whose result is stored
    /// meanwhile), removes the
    /// dirty-writer markers each checkpoint covers (generation below its
    /// own, writer not in its `keep` list) and the legacy whole-run
    /// checkpoints. Returns the number of epochs written.
    pub fn write_round(
        &self,
        runs: &[(Run, u64)],
        epochs: Vec<(EpochKey, u64, EpochCheckpoint, Vec<String>)>,
    ) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let mut written = 0;
        let mut current = std::collections::HashSet::new();
        for (run, uid) in runs {
            if self.is_current(&txn, &run.run_id, *uid)? {
                current.insert((run.run_id.as_str(), *uid));
            }
        }
        {
            let mut legacy = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            legacy.retain(|_, _| false).map_err(|e| self.db_err(e))?;
            let mut run_table = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            for (run, uid) in runs {
                if current.contains(&(run.run_id.as_str(), *uid)) {
                    run_table
                        .insert(run.run_id.as_str(), run.encode_to_vec().as_slice())
                        .map_err(|e| self.db_err(e))?;
                }
            }
            let results = txn.open_table(RESULTS).map_err(|e| self.db_err(e))?;
            let mut single = txn
                .open_table(EPOCH_CHECKPOINTS)
                .map_err(|e| self.db_err(e))?;
            let mut pieces = txn
                .open_table(CHECKPOINT_PIECES)
                .map_err(|e| self.db_err(e))?;
            let mut covered = std::collections::HashMap::new();
            for (key, uid, checkpoint, keep) in epochs {
                let closed = results
                    .get(key.as_tuple())
                    .map_err(|e| self.db_err(e))?
                    .is_some();
                if !current.contains(&(key.run_id.as_str(), uid)) || closed {
                    continue;
                }
                // Written one epoch at a time, one piece at a time, each
                // checkpoint freed as it is written: the round never holds
                // a second copy of any of them.
                let generation = checkpoint.generation;
                let (r, s, l, e) = key.as_tuple();
                let mut next = 0u32;
                checkpoint.into_pieces(|piece| {
                    pieces
                        .insert((r, s, l, e, next), piece)
                        .map_err(|e| self.db_err(e))?;
                    next += 1;
                    Ok::<_, StoreError>(())
                })?;
                // What a longer earlier checkpoint left, or schema 1's.
                self.remove_checkpoint(&mut pieces, &mut single, key.as_tuple(), next)?;
                covered.insert(key, (generation, keep));
                written += 1;
            }
            if !covered.is_empty() {
                let mut dirty = txn.open_table(DIRTY_WRITERS).map_err(|e| self.db_err(e))?;
                dirty
                    .retain(|(run_id, split, layer, epoch, writer), generation| {
                        let key = EpochKey::from_tuple((run_id, split, layer, epoch));
                        !covered.get(&key).is_some_and(|(covers, keep)| {
                            generation < *covers && !keep.iter().any(|w| w == writer)
                        })
                    })
                    .map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Accumulator;
    use redb::ReadableTableMetadata;

    /// `acc`'s statistics as a checkpoint round takes them.
    fn packed(acc: &Accumulator) -> (AccumulatorParts, Vec<f64>) {
        Accumulator::merged_packed([acc]).unwrap().unwrap()
    }

    /// The uid of the runs of these tests.
    const U: u64 = 7;

    fn key(run: &str, epoch: u64) -> EpochKey {
        EpochKey {
            run_id: run.into(),
            split: "train".into(),
            layer: "penultimate".into(),
            epoch,
        }
    }

    fn run(id: &str) -> Run {
        Run {
            run_id: id.into(),
            num_classes: 2,
            feature_dim: 1,
            ..Default::default()
        }
    }

    fn result(run: &str, epoch: u64) -> EpochResult {
        EpochResult {
            run_id: run.into(),
            split: "train".into(),
            layer: "penultimate".into(),
            epoch,
            vci: Some(0.5),
            ..Default::default()
        }
    }

    fn checkpoint(epoch: u64, generation: u64, ranges: Vec<u64>) -> EpochCheckpoint {
        EpochCheckpoint {
            stats: Some(StatsBlock {
                epoch,
                class_counts: vec![3, 4],
                ..Default::default()
            }),
            writers: vec![WriterCheckpoint {
                writer_id: "w".into(),
                ranges,
            }],
            generation,
            unix_ms: 77,
            scatter_lower: Vec::new(),
        }
    }

    fn dirty(store: &Store) -> Vec<(u64, String, u64)> {
        let mut out: Vec<_> = store
            .load()
            .unwrap()
            .dirty
            .into_iter()
            .map(|(k, w, g)| (k.epoch, w, g))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn round_trips_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_run(&run("a"), U).unwrap();
        assert!(store.open_epoch(&key("a", 4), U, 10).unwrap());
        assert!(store.open_epoch(&key("a", 5), U, 10).unwrap());
        assert_eq!(
            store
                .write_round(
                    &[(run("a"), U)],
                    vec![(key("a", 5), U, checkpoint(5, 1, vec![1, 9]), vec![])]
                )
                .unwrap(),
            1
        );
        let w = |ranges: Vec<u64>| WriterCheckpoint {
            writer_id: "w".into(),
            ranges,
        };
        assert!(store
            .put_result(&run("a"), U, &result("a", 4), &[w(vec![10, 12])])
            .unwrap());
        assert!(store
            .put_result(&run("a"), U, &result("a", 3), &[w(vec![13, 20])])
            .unwrap());
        assert!(!store
            .put_result(&run("ghost"), U, &result("ghost", 4), &[])
            .unwrap());
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let restored = store.load().unwrap();
        assert_eq!(restored.runs, vec![(run("a"), U)]);
        assert_eq!(restored.results, vec![result("a", 3), result("a", 4)]);
        // Epoch 4 closed: only 5 is open, with its checkpoint; the closed
        // epochs' sequences are merged into one interval.
        assert_eq!(
            restored.open,
            vec![(key("a", 5), Some(checkpoint(5, 1, vec![1, 9])))]
        );
        assert_eq!(
            restored.closed_writers,
            vec![("a".to_owned(), w(vec![10, 20]))]
        );
        // A round never writes the checkpoint of a closed epoch.
        assert_eq!(
            store
                .write_round(
                    &[(run("a"), U)],
                    vec![(key("a", 4), U, checkpoint(4, 2, vec![]), vec![])]
                )
                .unwrap(),
            0
        );
        store.delete_run("a").unwrap();
        let restored = store.load().unwrap();
        assert!(restored.runs.is_empty() && restored.results.is_empty());
        assert!(restored.open.is_empty() && restored.closed_writers.is_empty());
    }

    /// A K = 2, d = 3 accumulator with distinct scatter entries.
    fn accumulator() -> Accumulator {
        let features = ndarray::Array2::from_shape_fn((4, 3), |(i, j)| {
            (i * i) as f64 + 0.5 * j as f64 - (i * j) as f64
        });
        Accumulator::from_batch(features.view(), &[0, 1, 1, 0], 2, crate::stats::Par::Seq).unwrap()
    }

    fn set_schema_version(store: &Store, version: &str) {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", version.as_bytes())
            .unwrap();
        txn.commit().unwrap();
    }

    fn schema_version(store: &Store) -> String {
        let txn = store.db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let version = meta.get("schema_version").unwrap().unwrap();
        String::from_utf8(version.value().to_vec()).unwrap()
    }

    #[test]
    fn a_checkpoint_stores_the_scatter_packed_and_restores_it_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(schema_version(&store), "2");
        store.create_run(&run("a"), U).unwrap();
        assert!(store.open_epoch(&key("a", 1), U, 10).unwrap());
        let acc = accumulator();
        let checkpoint = EpochCheckpoint::new(&key("a", 1), packed(&acc), vec![], 3, 77);
        let stats = checkpoint.stats.as_ref().unwrap();
        assert!(stats.scatter.is_empty());
        assert_eq!(checkpoint.scatter_lower, acc.packed_scatter());
        // Three values fewer than the full 3 × 3 matrix, 8 bytes each.
        let full = EpochCheckpoint {
            scatter_lower: Vec::new(),
            stats: Some(StatsBlock {
                scatter: acc.to_parts().scatter,
                ..stats.clone()
            }),
            ..checkpoint.clone()
        };
        assert_eq!(full.encoded_len() - checkpoint.encoded_len(), 3 * 8);
        store
            .write_round(
                &[(run("a"), U)],
                vec![(key("a", 1), U, checkpoint.clone(), vec![])],
            )
            .unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let (restored_key, restored) = store.load().unwrap().open.pop().unwrap();
        let mut restored = restored.unwrap();
        assert_eq!((restored_key, &restored), (key("a", 1), &checkpoint));
        let parts = restored.take_parts(2, 3).unwrap().unwrap();
        assert_eq!(parts, acc.to_parts());
        assert_eq!(
            Accumulator::from_parts(parts).unwrap().to_parts(),
            acc.to_parts()
        );
        assert_eq!((restored.generation, restored.unix_ms), (3, 77));

        // Both forms at once contradict each other.
        let mut both = full.clone();
        both.scatter_lower = acc.packed_scatter();
        let err = both.take_parts(2, 3).unwrap().unwrap_err().to_string();
        assert_eq!(
            err,
            "scatter: expected empty beside scatter_lower, received 9 values"
        );
    }

    #[test]
    fn a_schema_1_database_is_upgraded_and_its_full_checkpoints_restore() {
        let dir = tempfile::tempdir().unwrap();
        let acc = accumulator();
        {
            // A version-1 database: the checkpoint whole in
            // `epoch_checkpoints`, its full scatter in its statistics.
            let store = Store::open(dir.path()).unwrap();
            store.create_run(&run("a"), U).unwrap();
            assert!(store.open_epoch(&key("a", 1), U, 10).unwrap());
            let v1 = EpochCheckpoint {
                stats: Some(StatsBlock::from(acc.to_parts())),
                ..checkpoint(1, 2, vec![1, 4])
            };
            let txn = store.db.begin_write().unwrap();
            txn.open_table(EPOCH_CHECKPOINTS)
                .unwrap()
                .insert(key("a", 1).as_tuple(), v1.encode_to_vec().as_slice())
                .unwrap();
            txn.commit().unwrap();
            set_schema_version(&store, "1");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(schema_version(&store), "2");
        let (_, restored) = store.load().unwrap().open.pop().unwrap();
        let mut restored = restored.unwrap();
        assert!(restored.scatter_lower.is_empty());
        assert_eq!(restored.take_parts(2, 3).unwrap().unwrap(), acc.to_parts());
        assert_eq!(restored.writers, checkpoint(1, 2, vec![1, 4]).writers);

        // The next round replaces it with pieces.
        let again = EpochCheckpoint::new(&key("a", 1), packed(&acc), vec![], 3, 78);
        store
            .write_round(
                &[(run("a"), U)],
                vec![(key("a", 1), U, again.clone(), vec![])],
            )
            .unwrap();
        assert_eq!(store.load().unwrap().open, vec![(key("a", 1), Some(again))]);
        assert!(is_empty(&store, EPOCH_CHECKPOINTS));
    }

    fn is_empty<K: redb::Key + 'static, V: redb::Value + 'static>(
        store: &Store,
        table: TableDefinition<K, V>,
    ) -> bool {
        let txn = store.db.begin_read().unwrap();
        txn.open_table(table).unwrap().is_empty().unwrap()
    }

    /// The piece indices stored for `key`.
    fn pieces(store: &Store, key: &EpochKey) -> Vec<u32> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(CHECKPOINT_PIECES).unwrap();
        let (r, s, l, e) = key.as_tuple();
        table
            .range((r, s, l, e, 0)..=(r, s, l, e, u32::MAX))
            .unwrap()
            .map(|entry| {
                let (k, v) = entry.unwrap();
                assert!(v.value().len() <= PIECE_BYTES, "{}", v.value().len());
                k.value().4
            })
            .collect()
    }

    #[test]
    fn large_checkpoints_are_stored_in_pieces_that_are_replaced_and_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // d = 1024, K = 2: the packed scatter alone, 4 MiB, needs 5
        // pieces; the head and the class tables (2 × 8 KiB) one each.
        let (k, d) = (2, 1024);
        let features = ndarray::Array2::from_shape_fn((6, d), |(i, j)| {
            ((i * 31 + j * 7) % 13) as f64 - 0.1 * i as f64
        });
        let acc = Accumulator::from_batch(
            features.view(),
            &[0, 1, 0, 1, 1, 0],
            k,
            crate::stats::Par::Seq,
        )
        .unwrap();
        let big =
            |generation| EpochCheckpoint::new(&key("a", 1), packed(&acc), vec![], generation, 77);
        for id in ["a", "ab"] {
            store.create_run(&run(id), U).unwrap();
            assert!(store.open_epoch(&key(id, 1), U, 10).unwrap());
        }
        store
            .write_round(
                &[(run("a"), U), (run("ab"), U)],
                vec![
                    (key("a", 1), U, big(1), vec![]),
                    (key("ab", 1), U, checkpoint(1, 1, vec![1, 2]), vec![]),
                ],
            )
            .unwrap();
        assert_eq!(pieces(&store, &key("a", 1)), (0..8).collect::<Vec<_>>());
        let restored = store.load().unwrap().open;
        assert_eq!(restored[0], (key("a", 1), Some(big(1))));
        let parts = restored[0]
            .1
            .clone()
            .unwrap()
            .take_parts(2, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(parts, acc.to_parts());

        // A smaller checkpoint of the same epoch (no class tables or
        // scatter: its head only) leaves no piece behind.
        store
            .write_round(
                &[(run("a"), U)],
                vec![(key("a", 1), U, checkpoint(1, 2, vec![1, 5]), vec![])],
            )
            .unwrap();
        assert_eq!(pieces(&store, &key("a", 1)), vec![0]);
        assert_eq!(
            store.load().unwrap().open[0],
            (key("a", 1), Some(checkpoint(1, 2, vec![1, 5])))
        );

        // Deleting run a removes its pieces only, not those of run ab (whose
        // id it prefixes); closing ab's epoch removes ab's.
        store
            .write_round(&[(run("a"), U)], vec![(key("a", 1), U, big(3), vec![])])
            .unwrap();
        store.delete_run("a").unwrap();
        assert!(pieces(&store, &key("a", 1)).is_empty());
        assert_eq!(pieces(&store, &key("ab", 1)), vec![0]);
        assert!(store
            .put_result(&run("ab"), U, &result("ab", 1), &[])
            .unwrap());
        assert!(pieces(&store, &key("ab", 1)).is_empty());
        assert!(is_empty(&store, CHECKPOINT_PIECES));
    }

    #[test]
    fn a_database_of_an_unknown_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        set_schema_version(&Store::open(dir.path()).unwrap(), "3");
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.ends_with("vcid.redb: schema_version: expected 2, received 3"),
            "{err}"
        );
        let db = Database::open(dir.path().join("vcid.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("schema_version").unwrap().unwrap().value(), b"3");
    }

    #[test]
    fn a_round_removes_exactly_the_dirty_markers_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_run(&run("a"), U).unwrap();
        assert!(!store.mark_writer(&key("ghost", 1), U, "w", 0).unwrap());
        for w in ["w", "v", ""] {
            assert!(store.mark_writer(&key("a", 1), U, w, 0).unwrap());
        }
        assert!(store.mark_writer(&key("a", 2), U, "w", 0).unwrap());
        // Snapshot 1 of epoch 1 is taken; "w" then applies more and marks
        // generation 1 before the round commits: that marker stays.
        assert!(store.mark_writer(&key("a", 1), U, "w", 1).unwrap());
        // A lower generation never lowers a stored marker.
        assert!(store.mark_writer(&key("a", 1), U, "w", 0).unwrap());
        store
            .write_round(
                &[(run("a"), U)],
                vec![(key("a", 1), U, checkpoint(1, 1, vec![]), vec![])],
            )
            .unwrap();
        assert_eq!(dirty(&store), vec![(1, "w".into(), 1), (2, "w".into(), 0)]);
        // A writer still missing since an unclean stop keeps its marker.
        store
            .write_round(
                &[(run("a"), U)],
                vec![(key("a", 1), U, checkpoint(1, 2, vec![]), vec!["w".into()])],
            )
            .unwrap();
        assert_eq!(dirty(&store), vec![(1, "w".into(), 1), (2, "w".into(), 0)]);
        // Closing epoch 2 removes its markers with its open marker.
        assert!(store
            .put_result(&run("a"), U, &result("a", 2), &[])
            .unwrap());
        assert_eq!(dirty(&store), vec![(1, "w".into(), 1)]);
    }

    #[test]
    fn writes_of_a_deleted_run_never_reach_the_run_created_under_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (old, new) = (U, U + 1);
        store.create_run(&run("a"), old).unwrap();
        assert!(store.open_epoch(&key("a", 0), old, 10).unwrap());
        store.delete_run("a").unwrap();
        let mut replacement = run("a");
        replacement.num_classes = 5;
        store.create_run(&replacement, new).unwrap();
        // Everything written on behalf of the old run is refused whole.
        assert!(!store.open_epoch(&key("a", 1), old, 10).unwrap());
        assert!(!store.mark_writer(&key("a", 1), old, "w", 0).unwrap());
        assert!(!store
            .put_result(&run("a"), old, &result("a", 0), &[])
            .unwrap());
        assert!(!store.update_run(&run("a"), old).unwrap());
        assert_eq!(
            store
                .write_round(
                    &[(run("a"), old)],
                    vec![(key("a", 0), old, checkpoint(0, 1, vec![1, 2]), vec![])]
                )
                .unwrap(),
            0
        );
        let restored = store.load().unwrap();
        assert_eq!(restored.runs, vec![(replacement.clone(), new)]);
        assert!(restored.results.is_empty() && restored.open.is_empty());
        assert!(restored.dirty.is_empty() && restored.closed_writers.is_empty());
        // The new run's own writes go through.
        assert!(store.open_epoch(&key("a", 1), new, 10).unwrap());
        assert!(store.update_run(&replacement, new).unwrap());
    }

    #[test]
    fn runs_stored_without_a_uid_are_uid_0() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_run(&run("old"), U).unwrap();
        // A database of an earlier version: the record without its uid.
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(RUN_UIDS).unwrap().remove("old").unwrap();
            txn.commit().unwrap();
        }
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().runs, vec![(run("old"), 0)]);
        assert!(!store.open_epoch(&key("old", 0), U, 10).unwrap());
        assert!(store.open_epoch(&key("old", 0), 0, 10).unwrap());
    }
}
