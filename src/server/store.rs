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
//! | `meta` | name | bytes (`schema_version` = 1) |
//!
//! Every write is one transaction committed with redb's default
//! `Durability::Immediate` (fsync before `commit` returns), so a run or
//! epoch result acknowledged to a client survives `kill -9`. Open
//! accumulators are only written by the graceful-shutdown checkpoint, and
//! start-up consumes (deletes) the checkpoints it restored: a later crash
//! then loses the open epochs, never resurrects stale ones.
//!
//! All methods block (disk I/O); async callers use `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::proto::{EpochResult, Run, StatsBlock};

const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
const RESULTS: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("epoch_results");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
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

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub struct Restored {
    pub runs: Vec<Run>,
    /// In key order: run, split, layer, epoch.
    pub results: Vec<EpochResult>,
    pub checkpoints: Vec<(String, RunCheckpoint)>,
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
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Durably appends an epoch result and refreshes its run record (for
    /// `rows_ingested`). Returns `false`, writing nothing, when the run is no
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
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }

    /// Replaces all checkpoints with `checkpoints` and refreshes the given
    /// run records, in one durable transaction.
    pub fn write_checkpoints(
        &self,
        checkpoints: &[(Run, RunCheckpoint)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            table.retain(|_, _| false).map_err(|e| self.db_err(e))?;
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
                if !checkpoint.epochs.is_empty() || !checkpoint.writers.is_empty() {
                    table
                        .insert(run.run_id.as_str(), checkpoint.encode_to_vec().as_slice())
                        .map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Durably deletes all checkpoints (after start-up restored them).
    pub fn clear_checkpoints(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(CHECKPOINTS).map_err(|e| self.db_err(e))?;
            table.retain(|_, _| false).map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
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
            .write_checkpoints(&[(run.clone(), checkpoint.clone())])
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let restored = store.load().unwrap();
        assert_eq!(restored.runs, vec![run]);
        assert_eq!(restored.results, vec![result]);
        assert_eq!(restored.checkpoints, vec![("a".to_owned(), checkpoint)]);
        store.clear_checkpoints().unwrap();
        store.delete_run("a").unwrap();
        let restored = store.load().unwrap();
        assert!(restored.runs.is_empty() && restored.results.is_empty());
        assert!(restored.checkpoints.is_empty());
    }
}
