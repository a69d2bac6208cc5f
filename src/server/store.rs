//! Durable state in one redb database, `<data-dir>/vcid.redb`.
//!
//! Owns the on-disk layout; it must not hold in-memory state or decide
//! anything about the API. Values are protobuf (prost) encodings, compact
//! and forward-compatible:
//!
//! | table | key | value |
//! |---|---|---|
//! | `runs` | run_id | `vcid.v1.Run` (the registry entry; `rows_ingested` as of the last checkpoint or close) |
//! | `epoch_results` | (run_id, split, layer, epoch) | `vcid.v1.EpochResult` |
//! | `checkpoints` | run_id | [`RunCheckpoint`]: open accumulators as `StatsBlock`s plus the duplicate filter |
//! | `open_epochs` | (run_id, split, layer, epoch) | unix ms when the epoch was opened (its marker) |
//! | `lost_epochs` | (run_id, split, layer, epoch) | unix ms of the start-up that found it lost |
//! | `meta` | name | bytes (`schema_version` = 1) |
//!
//! Every write is one transaction committed with redb's default
//! `Durability::Immediate` (fsync before `commit` returns), so a run or
//! epoch result acknowledged to a client survives `kill -9`. Open
//! accumulators are only written by the graceful-shutdown checkpoint, and
//! start-up consumes (deletes) the checkpoints it restored: a later crash
//! then loses the open epochs, never resurrects stale ones.
//!
//! # Open-epoch markers (README "Errors": `DATA_LOSS`; decided here)
//!
//! So that a crash cannot make a later close silently report a partial
//! epoch, every open epoch has a durable marker in `open_epochs`: written
//! once, when its accumulator is created and before any batch of it is
//! acknowledged ([`Store::open_epoch`]), removed in the transaction that
//! stores its result ([`Store::put_result`]) or deletes its run. The
//! shutdown checkpoint rewrites the markers to exactly the epochs it saved
//! plus those being closed ([`Store::write_checkpoints`]). At start-up
//! ([`Store::finish_restore`]) a marker whose epoch was restored from a
//! checkpoint stays; every other marker names an epoch whose statistics
//! died with the process, and moves to `lost_epochs`, where it stays until
//! the run is deleted (the daemon refuses that epoch with DATA_LOSS
//! forever). A marker is written before the batch's admission is final, so
//! an epoch whose first batch was refused (e.g. the memory budget) may be
//! reported lost after a crash although it held no data: conservative, and
//! a graceful shutdown clears such markers. Adding these two tables keeps
//! `schema_version` 1: an older database simply has no markers yet.
//!
//! All methods block (disk I/O); async callers use `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::proto::{EpochResult, Run, StatsBlock};

use super::clock::now_unix_ms;

const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
const RESULTS: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("epoch_results");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
const OPEN_EPOCHS: TableDefinition<(&str, &str, &str, u64), i64> =
    TableDefinition::new("open_epochs");
const LOST_EPOCHS: TableDefinition<(&str, &str, &str, u64), i64> =
    TableDefinition::new("lost_epochs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Version of the layout above, stored under `meta/schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

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

/// The in-memory state of one run that is not in the other tables: its open
/// accumulators and its duplicate filter.
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

    fn from_tuple((run_id, split, layer, epoch): (&str, &str, &str, u64)) -> EpochKey {
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
    pub runs: Vec<Run>,
    /// In key order: run, split, layer, epoch.
    pub results: Vec<EpochResult>,
    pub checkpoints: Vec<(String, RunCheckpoint)>,
}

/// What [`Store::finish_restore`] found about epochs without data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LostEpochs {
    /// Marked open by the previous process but not in its checkpoint: lost
    /// now, stamped with this start-up's time.
    pub new: Vec<EpochKey>,
    /// Every lost epoch of a stored run (including `new`), with the unix
    /// ms of the start-up that found it, in key order.
    pub all: Vec<(EpochKey, i64)>,
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
        let db = Database::create(&path).map_err(|e| StoreError::Db {
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
            txn.open_table(RESULTS).map_err(|e| self.db_err(e))?;
            txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            txn.open_table(LOST_EPOCHS).map_err(|e| self.db_err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| self.db_err(e))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_string().as_bytes())
                        .map_err(|e| self.db_err(e))?;
                }
                Some(v) if v == SCHEMA_VERSION.to_string() => {}
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
        for entry in runs.iter().map_err(|e| self.db_err(e))? {
            let (_, value) = entry.map_err(|e| self.db_err(e))?;
            out.runs
                .push(Run::decode(value.value()).map_err(|e| self.decode_err("runs", e))?);
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
        Ok(out)
    }

    /// Durably inserts or replaces a run record.
    pub fn put_run(&self, run: &Run) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            runs.insert(run.run_id.as_str(), run.encode_to_vec().as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Durably removes a run, its epoch results and its checkpoint.
    pub fn delete_run(&self, run_id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            runs.remove(run_id).map_err(|e| self.db_err(e))?;
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
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Durably records that `key`'s epoch is open (its marker; see the
    /// module doc). Returns `false`, writing nothing, when the run is no
    /// longer stored, so a deleted run never regains a marker.
    pub fn open_epoch(&self, key: &EpochKey, opened_unix_ms: i64) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            let exists = runs
                .get(key.run_id.as_str())
                .map_err(|e| self.db_err(e))?
                .is_some();
            if !exists {
                return Ok(false);
            }
            let mut markers = txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            markers
                .insert(key.as_tuple(), opened_unix_ms)
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Durably appends an epoch result, removes the epoch's open marker and
    /// refreshes its run record (for `rows_ingested`). Returns `false`, writing nothing, when the run is no
    /// longer stored (deleted concurrently): the check and the write are one
    /// transaction, so a deleted run never regains results.
    pub fn put_result(&self, run: &Run, result: &EpochResult) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            let exists = runs
                .get(run.run_id.as_str())
                .map_err(|e| self.db_err(e))?
                .is_some();
            if !exists {
                return Ok(false);
            }
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
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Replaces all checkpoints with `checkpoints`, refreshes the given
    /// run records and rewrites the open markers to exactly the
    /// checkpointed epochs plus `closing` (epochs whose close may still
    /// store a result; if it does not, their data is lost and start-up must
    /// say so), in one durable transaction. Markers of runs not given are
    /// kept (such a run gets no checkpoint either).
    pub fn write_checkpoints(
        &self,
        checkpoints: &[(Run, RunCheckpoint)],
        closing: &[EpochKey],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            table.retain(|_, _| false).map_err(|e| self.db_err(e))?;
            let mut markers = txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            let given: std::collections::HashSet<&str> = checkpoints
                .iter()
                .map(|(run, _)| run.run_id.as_str())
                .collect();
            markers
                .retain(|key, _| !given.contains(key.0))
                .map_err(|e| self.db_err(e))?;
            let now = now_unix_ms();
            for key in closing {
                markers
                    .insert(key.as_tuple(), now)
                    .map_err(|e| self.db_err(e))?;
            }
            let mut runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            for (run, checkpoint) in checkpoints {
                let exists = runs
                    .get(run.run_id.as_str())
                    .map_err(|e| self.db_err(e))?
                    .is_some();
                if !exists {
                    continue;
                }
                runs.insert(run.run_id.as_str(), run.encode_to_vec().as_slice())
                    .map_err(|e| self.db_err(e))?;
                for block in &checkpoint.epochs {
                    markers
                        .insert(
                            (
                                run.run_id.as_str(),
                                block.split.as_str(),
                                block.layer.as_str(),
                                block.epoch,
                            ),
                            now,
                        )
                        .map_err(|e| self.db_err(e))?;
                }
                if !checkpoint.epochs.is_empty() || !checkpoint.writers.is_empty() {
                    table
                        .insert(run.run_id.as_str(), checkpoint.encode_to_vec().as_slice())
                        .map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Completes start-up in one durable transaction: deletes all
    /// checkpoints (they were restored), keeps the markers of the epochs in
    /// `restored` (open again; a missing one is added), moves every other
    /// marker of a stored run to `lost_epochs` stamped `now_unix_ms`, drops
    /// markers of runs no longer stored, and returns the lost epochs.
    pub fn finish_restore(
        &self,
        restored: &[EpochKey],
        now_unix_ms: i64,
    ) -> Result<LostEpochs, StoreError> {
        let restored: std::collections::HashSet<&EpochKey> = restored.iter().collect();
        let mut out = LostEpochs::default();
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            table.retain(|_, _| false).map_err(|e| self.db_err(e))?;
            let runs = txn.open_table(RUNS).map_err(|e| self.db_err(e))?;
            let mut markers = txn.open_table(OPEN_EPOCHS).map_err(|e| self.db_err(e))?;
            let mut stale = Vec::new();
            for entry in markers.iter().map_err(|e| self.db_err(e))? {
                let (key, _) = entry.map_err(|e| self.db_err(e))?;
                let key = EpochKey::from_tuple(key.value());
                if !restored.contains(&key) {
                    stale.push(key);
                }
            }
            let mut lost = txn.open_table(LOST_EPOCHS).map_err(|e| self.db_err(e))?;
            for key in stale {
                markers.remove(key.as_tuple()).map_err(|e| self.db_err(e))?;
                let run_exists = runs
                    .get(key.run_id.as_str())
                    .map_err(|e| self.db_err(e))?
                    .is_some();
                if run_exists {
                    lost.insert(key.as_tuple(), now_unix_ms)
                        .map_err(|e| self.db_err(e))?;
                    out.new.push(key);
                }
            }
            for key in &restored {
                markers
                    .insert(key.as_tuple(), now_unix_ms)
                    .map_err(|e| self.db_err(e))?;
            }
            for entry in lost.iter().map_err(|e| self.db_err(e))? {
                let (key, at) = entry.map_err(|e| self.db_err(e))?;
                out.all
                    .push((EpochKey::from_tuple(key.value()), at.value()));
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = Run {
            run_id: "a".into(),
            num_classes: 3,
            feature_dim: 2,
            ..Default::default()
        };
        store.put_run(&run).unwrap();
        let result = EpochResult {
            run_id: "a".into(),
            split: "train".into(),
            layer: "penultimate".into(),
            epoch: 4,
            vci: Some(0.5),
            ..Default::default()
        };
        assert!(store.put_result(&run, &result).unwrap());
        let ghost = Run {
            run_id: "ghost".into(),
            ..Default::default()
        };
        assert!(!store.put_result(&ghost, &result).unwrap());
        let checkpoint = RunCheckpoint {
            epochs: vec![StatsBlock {
                epoch: 5,
                ..Default::default()
            }],
            writers: vec![WriterCheckpoint {
                writer_id: "w".into(),
                ranges: vec![0, 9],
            }],
        };
        store
            .write_checkpoints(&[(run.clone(), checkpoint.clone())], &[])
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let restored = store.load().unwrap();
        assert_eq!(restored.runs, vec![run]);
        assert_eq!(restored.results, vec![result]);
        assert_eq!(restored.checkpoints, vec![("a".to_owned(), checkpoint)]);
        store.finish_restore(&[], 1).unwrap();
        assert!(store.load().unwrap().checkpoints.is_empty());
        store.delete_run("a").unwrap();
        let restored = store.load().unwrap();
        assert!(restored.runs.is_empty() && restored.results.is_empty());
        assert!(restored.checkpoints.is_empty());
    }

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

    #[test]
    fn open_markers_become_lost_unless_closed_or_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_run(&run("a")).unwrap();
        store.put_run(&run("b")).unwrap();
        // Epochs 1, 2, 3 of run a and 1 of run b are opened; a marker for a
        // run that is not stored is refused.
        for k in [key("a", 1), key("a", 2), key("a", 3), key("b", 1)] {
            assert!(store.open_epoch(&k, 10).unwrap());
        }
        assert!(!store.open_epoch(&key("ghost", 1), 10).unwrap());
        // Epoch 1 of a closes: its marker goes with the stored result.
        let result = EpochResult {
            run_id: "a".into(),
            split: "train".into(),
            layer: "penultimate".into(),
            epoch: 1,
            ..Default::default()
        };
        assert!(store.put_result(&run("a"), &result).unwrap());
        drop(store);

        // "Crash": epochs 2 and 3 of a were only open; a checkpoint saved 3.
        let store = Store::open(dir.path()).unwrap();
        let lost = store.finish_restore(&[key("a", 3)], 1234).unwrap();
        assert_eq!(lost.new, vec![key("a", 2), key("b", 1)]);
        assert_eq!(lost.all, vec![(key("a", 2), 1234), (key("b", 1), 1234)]);
        drop(store);

        // Lost stays lost across restarts (with its first start-up time);
        // the restored epoch 3 is open again and is lost only after the
        // next unclean stop.
        let store = Store::open(dir.path()).unwrap();
        let lost = store.finish_restore(&[], 5678).unwrap();
        assert_eq!(lost.new, vec![key("a", 3)]);
        assert_eq!(
            lost.all,
            vec![
                (key("a", 2), 1234),
                (key("a", 3), 5678),
                (key("b", 1), 1234)
            ]
        );

        // A graceful checkpoint keeps exactly the saved and closing epochs
        // of the runs it covers: the stray marker of a 7 is dropped.
        assert!(store.open_epoch(&key("a", 6), 10).unwrap());
        assert!(store.open_epoch(&key("a", 7), 10).unwrap());
        assert!(store.open_epoch(&key("b", 8), 10).unwrap());
        let checkpoint = RunCheckpoint {
            epochs: vec![StatsBlock {
                run_id: "a".into(),
                split: "train".into(),
                layer: "penultimate".into(),
                epoch: 6,
                ..Default::default()
            }],
            writers: Vec::new(),
        };
        store
            .write_checkpoints(
                &[(run("a"), checkpoint), (run("b"), RunCheckpoint::default())],
                &[key("b", 8)],
            )
            .unwrap();
        let lost = store.finish_restore(&[key("a", 6)], 9999).unwrap();
        assert_eq!(lost.new, vec![key("b", 8)], "the close never landed");

        // Deleting a run removes its markers and lost epochs.
        store.delete_run("a").unwrap();
        store.delete_run("b").unwrap();
        let lost = store.finish_restore(&[], 1).unwrap();
        assert_eq!(lost, LostEpochs::default());
    }
}
