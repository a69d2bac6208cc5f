//! The daemon's request logic, independent of gRPC: create/delete runs,
//! ingest batches and stats blocks, close epochs, read history, subscribe to
//! results, restore at start-up and checkpoint at shutdown.
//!
//! Ties [`State`] (memory), [`Store`] (disk), [`Telemetry`] and the math
//! core together. CPU work (decoding, a batch's statistics, an epoch's
//! metrics) and disk I/O run on tokio's blocking pool (`spawn_blocking`), so
//! the async runtime keeps serving other streams and runs meanwhile; locks
//! are only taken inside [`State`]'s short critical sections. It must not
//! know about tonic requests, HTTP or signals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use tokio::sync::broadcast;

use crate::metrics::{self, registry, EpochMetrics};
use crate::proto::{
    CloseEpochRequest, CreateRunRequest, EpochResult, FeatureBatch, GetHistoryRequest, History,
    Run, StatsBlock,
};
use crate::stats::{Accumulator, Par};

use super::clock::{now_unix_ms, utc_timestamp};
use super::config::Limits;
use super::decode::{self, StreamKey};
use super::error::ServerError;
use super::export::Telemetry;
use super::state::{Applied, EpochMarker, RunInfo, RunState, SeqSet, State};
use super::store::{EpochKey, RunCheckpoint, Store, WriterCheckpoint};

/// How many results a `Watch` subscriber may fall behind before it is cut
/// off (it can re-read `GetHistory`).
const WATCH_CAPACITY: usize = 1024;

/// A validated batch with its statistics, not yet applied (see
/// [`Daemon::prepare_batch`]).
#[derive(Debug)]
pub struct PreparedBatch {
    run: Arc<RunState>,
    key: StreamKey,
    epoch: u64,
    dedup: Option<(String, u64)>,
    /// `None`: already known to be a duplicate.
    acc: Option<Accumulator>,
}

/// A batch's statistics on their way into one epoch's accumulator.
#[derive(Debug)]
struct ApplyJob {
    run: Arc<RunState>,
    key: StreamKey,
    epoch: u64,
    acc: Accumulator,
    dedup: Option<(String, u64)>,
}

impl ApplyJob {
    /// One attempt of [`RunState::apply`] (blocking: the O(d²) merge).
    fn apply(&self) -> Result<Applied, ServerError> {
        self.run
            .apply(&self.key, self.epoch, &self.acc, self.dedup.as_ref())
    }

    fn epoch_key(&self) -> EpochKey {
        EpochKey {
            run_id: self.run.info.run_id.clone(),
            split: self.key.split.clone(),
            layer: self.key.layer.clone(),
            epoch: self.epoch,
        }
    }
}

/// What `Watch` subscribers (and the web view's event stream) receive.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// A new epoch result.
    Result(Arc<EpochResult>),
    /// A run was created or finished (its state after the change).
    RunChanged(Arc<Run>),
    /// The run was deleted: its watchers end.
    RunDeleted(String),
}

/// Outcome of one ingested batch or stats block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Merged, with this many rows (samples).
    Applied(u64),
    /// Skipped: its `(writer_id, sequence)` was applied before.
    Duplicate,
}

/// The daemon core shared by the gRPC service, the HTTP exporter and the
/// shutdown path.
#[derive(Debug)]
pub struct Daemon {
    state: Arc<State>,
    store: Store,
    limits: Limits,
    telemetry: Telemetry,
    events: broadcast::Sender<WatchEvent>,
    /// Serialises CreateRun/DeleteRun so the check-then-write is atomic.
    admin: tokio::sync::Mutex<()>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Internal(format!("worker task failed: {e}")))
}

/// The proto result of a close: every metric of the registry, `vci_delta`
/// from the stream's previous closed epoch (`None`: there is none).
fn epoch_result(
    run_id: &str,
    key: &StreamKey,
    epoch: u64,
    m: EpochMetrics,
    previous_vci: Option<Option<f64>>,
) -> EpochResult {
    let mut result = EpochResult {
        run_id: run_id.to_owned(),
        split: key.split.clone(),
        layer: key.layer.clone(),
        epoch,
        samples: m.samples,
        classes_observed: u32::try_from(m.classes_observed).unwrap_or(u32::MAX),
        feature_dim: u32::try_from(m.feature_dim).unwrap_or(u32::MAX),
        rank_total: u32::try_from(m.rank_total).unwrap_or(u32::MAX),
        rank_between: u32::try_from(m.rank_between).unwrap_or(u32::MAX),
        small_sample: m.small_sample,
        ..EpochResult::default()
    };
    for metric in registry::epoch_metrics() {
        (metric.set)(&mut result, metric.of_epoch(&m));
    }
    result.vci_delta = match previous_vci {
        None => {
            result.notes.insert(
                "vci_delta".into(),
                "no earlier closed epoch in this stream".into(),
            );
            None
        }
        Some(previous) => {
            let delta = metrics::vci_delta(m.vci, previous);
            if delta.is_none() {
                result.notes.insert(
                    "vci_delta".into(),
                    "vci is undefined in this epoch or the previous closed one".into(),
                );
            }
            delta
        }
    };
    result.notes.extend(m.notes);
    result
}

impl Daemon {
    /// Opens the store under `data_dir` and restores runs, histories and
    /// checkpoints (consuming the checkpoints). Blocking.
    pub fn open(data_dir: &std::path::Path, limits: Limits) -> Result<Daemon, ServerError> {
        let store = Store::open(data_dir)?;
        let state = Arc::new(State::new(&limits));
        let telemetry = Telemetry::new(Arc::clone(&state))?;
        let restored = store.load()?;
        for run in restored.runs {
            let info = RunInfo {
                run_id: run.run_id.clone(),
                num_classes: run.num_classes,
                feature_dim: run.feature_dim,
                metadata: run.metadata.into_iter().collect(),
                created_unix_ms: run.created_unix_ms,
            };
            let restored = state.new_run(info, run.rows_ingested);
            if run.finished {
                restored.set_finished(Some(run.finished_unix_ms));
            }
            state.insert(restored);
        }
        for result in restored.results {
            let Some(run) = state.find(&result.run_id) else {
                continue;
            };
            let key = StreamKey {
                split: result.split.clone(),
                layer: result.layer.clone(),
            };
            run.restore_result(key, Arc::new(result));
        }
        let mut restored_epochs = Vec::new();
        for (run_id, checkpoint) in &restored.checkpoints {
            let Some(run) = state.find(run_id) else {
                continue;
            };
            for block in &checkpoint.epochs {
                let key = StreamKey {
                    split: block.split.clone(),
                    layer: block.layer.clone(),
                };
                let parts = block
                    .clone()
                    .into_parts(run.info.num_classes, run.info.feature_dim);
                match Accumulator::from_parts(parts) {
                    Ok(acc) => {
                        restored_epochs.push(EpochKey {
                            run_id: run_id.clone(),
                            split: key.split.clone(),
                            layer: key.layer.clone(),
                            epoch: block.epoch,
                        });
                        run.restore_open(key, block.epoch, acc);
                    }
                    Err(err) => tracing::error!(
                        run = %run_id, epoch = block.epoch, %err,
                        "checkpointed accumulator is invalid; dropped"
                    ),
                }
            }
            for writer in &checkpoint.writers {
                run.restore_writer(writer.writer_id.clone(), SeqSet::from_flat(&writer.ranges));
            }
        }
        // Epochs marked open but not restored died with the previous
        // process: refuse them from now on (see `state`, "Open-epoch
        // markers").
        let started = now_unix_ms();
        let lost = store.finish_restore(&restored_epochs, started)?;
        for (key, found) in &lost.all {
            if let Some(run) = state.find(&key.run_id) {
                let stream = StreamKey {
                    split: key.split.clone(),
                    layer: key.layer.clone(),
                };
                run.restore_lost(stream, key.epoch, *found);
            }
        }
        if !lost.new.is_empty() {
            let names: Vec<String> = lost
                .new
                .iter()
                .map(|k| format!("{}/{}/{} epoch {}", k.run_id, k.split, k.layer, k.epoch))
                .collect();
            tracing::warn!(
                epochs = %names.join(", "),
                stopped_before = %utc_timestamp(started),
                "open epochs lost their statistics: the daemon stopped uncleanly (no shutdown \
                 checkpoint); pushes and closes of them are refused with DATA_LOSS"
            );
        }
        tracing::info!(
            path = %store.path().display(),
            runs = state.list().len(),
            open_epochs = restored_epochs.len(),
            lost_epochs = lost.all.len(),
            "state restored"
        );
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        Ok(Daemon {
            state,
            store,
            limits,
            telemetry,
            events,
            admin: tokio::sync::Mutex::new(()),
        })
    }

    /// The metrics registry (for `/metrics`).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A run as the API shows it: the stored form plus its open epochs and
    /// closed-epoch count.
    fn run_proto(&self, run: &RunState) -> Run {
        Run {
            open_epochs: run.open_epochs(),
            closed_epochs: run.closed_epochs(),
            ..Self::run_record(run)
        }
    }

    /// The stored form of a run (no volatile fields).
    fn run_record(run: &RunState) -> Run {
        let finished = run.finished_unix_ms();
        Run {
            finished: finished.is_some(),
            finished_unix_ms: finished.unwrap_or(0),
            run_id: run.info.run_id.clone(),
            num_classes: run.info.num_classes,
            feature_dim: run.info.feature_dim,
            metadata: run.info.metadata.clone().into_iter().collect(),
            created_unix_ms: run.info.created_unix_ms,
            rows_ingested: run.rows_ingested(),
            open_epochs: Vec::new(),
            closed_epochs: 0,
        }
    }

    /// `CreateRun`: durable before it returns; idempotent for the same shape.
    pub async fn create_run(&self, req: CreateRunRequest) -> Result<Run, ServerError> {
        decode::check_run_id(&req.run_id)?;
        if req.num_classes < 2 {
            return Err(ServerError::invalid(
                "num_classes",
                "at least 2",
                req.num_classes.to_string(),
            ));
        }
        if req.feature_dim < 1 {
            return Err(ServerError::invalid("feature_dim", "at least 1", "0"));
        }
        decode::check_metadata(req.metadata.iter(), &self.limits)?;
        let _admin = self.admin.lock().await;
        if let Some(existing) = self.state.find(&req.run_id) {
            let info = &existing.info;
            if info.num_classes != req.num_classes || info.feature_dim != req.feature_dim {
                return Err(ServerError::RunConflict {
                    run_id: req.run_id,
                    expected_k: info.num_classes,
                    expected_d: info.feature_dim,
                    received_k: req.num_classes,
                    received_d: req.feature_dim,
                });
            }
            return Ok(self.run_proto(&existing));
        }
        let info = RunInfo {
            run_id: req.run_id,
            num_classes: req.num_classes,
            feature_dim: req.feature_dim,
            metadata: req.metadata.into_iter().collect::<BTreeMap<_, _>>(),
            created_unix_ms: now_unix_ms(),
        };
        self.state.budget.check_fits(&info)?;
        let run = self.state.new_run(info, 0);
        let record = Self::run_record(&run);
        let store = self.store.clone();
        blocking(move || store.put_run(&record)).await??;
        self.state.insert(Arc::clone(&run));
        tracing::info!(run = %run.info.run_id, k = run.info.num_classes, d = run.info.feature_dim, "run created");
        let created = self.run_proto(&run);
        let _ = self
            .events
            .send(WatchEvent::RunChanged(Arc::new(created.clone())));
        Ok(created)
    }

    /// `FinishRun`: durable before it returns; a no-op for a finished run.
    pub async fn finish_run(&self, run_id: &str) -> Result<Run, ServerError> {
        let _admin = self.admin.lock().await;
        let run = self.state.get(run_id)?;
        if !run.finish(now_unix_ms())? {
            return Ok(self.run_proto(&run));
        }
        let record = Self::run_record(&run);
        let store = self.store.clone();
        if let Err(err) = blocking(move || store.put_run(&record))
            .await
            .and_then(|stored| stored.map_err(ServerError::from))
        {
            run.set_finished(None);
            return Err(err);
        }
        tracing::info!(run = %run_id, "run finished");
        let finished = self.run_proto(&run);
        let _ = self
            .events
            .send(WatchEvent::RunChanged(Arc::new(finished.clone())));
        Ok(finished)
    }

    /// `GetRun`.
    pub fn get_run(&self, run_id: &str) -> Result<Run, ServerError> {
        let run = self.state.get(run_id)?;
        Ok(self.run_proto(&run))
    }

    /// `ListRuns`, ordered by id.
    pub fn list_runs(&self) -> Vec<Run> {
        self.state
            .list()
            .iter()
            .map(|r| self.run_proto(r))
            .collect()
    }

    /// `DeleteRun`: durable before it returns; ends the run's watchers.
    pub async fn delete_run(&self, run_id: &str) -> Result<(), ServerError> {
        let _admin = self.admin.lock().await;
        self.state.get(run_id)?;
        let store = self.store.clone();
        let id = run_id.to_owned();
        blocking(move || store.delete_run(&id)).await??;
        self.state.remove(run_id);
        let _ = self.events.send(WatchEvent::RunDeleted(run_id.to_owned()));
        tracing::info!(run = %run_id, "run deleted");
        Ok(())
    }

    /// The lock-free half of ingesting a batch: validation, decoding and the
    /// batch's own statistics, on the blocking pool. Changes nothing, so
    /// several batches of one stream may be prepared concurrently and then
    /// applied in order.
    pub async fn prepare_batch(&self, batch: FeatureBatch) -> Result<PreparedBatch, ServerError> {
        self.telemetry.ingest_bytes(batch.encoded_len());
        let run = self.state.get(&batch.run_id)?;
        let dedup = decode::dedup_key(&batch.writer_id, batch.sequence)?;
        if run.is_duplicate(dedup.as_ref()) {
            return Ok(PreparedBatch {
                run,
                key: decode::stream_key(&batch.split, &batch.layer)?,
                epoch: batch.epoch,
                dedup,
                acc: None,
            });
        }
        let (k, d) = (run.info.num_classes, run.info.feature_dim);
        let max_rows = self.limits.max_batch_rows;
        let (key, epoch, dedup, acc) = blocking(move || {
            let decoded = decode::decode_batch(batch, d, max_rows)?;
            let acc = Accumulator::from_batch(
                decoded.features.view(),
                &decoded.labels,
                k as usize,
                Par::Seq,
            )?;
            Ok::<_, ServerError>((decoded.key, decoded.epoch, decoded.dedup, acc))
        })
        .await??;
        Ok(PreparedBatch {
            run,
            key,
            epoch,
            dedup,
            acc: Some(acc),
        })
    }

    /// The serialised half: the O(d²) merge under the epoch's lock (on the
    /// blocking pool), with the duplicate, sequence-gap, closed-epoch and
    /// budget checks (batches of one stream arrive here in order, so a
    /// sequence prepared before its predecessor landed is judged after it).
    pub async fn apply_prepared(&self, prepared: PreparedBatch) -> Result<Ingested, ServerError> {
        let PreparedBatch {
            run,
            key,
            epoch,
            dedup,
            acc,
        } = prepared;
        let Some(acc) = acc else {
            return Ok(Ingested::Duplicate);
        };
        let job = ApplyJob {
            run,
            key,
            epoch,
            acc,
            dedup,
        };
        let (outcome, job) = blocking(move || (job.apply(), job)).await?;
        self.settle(job, outcome?).await
    }

    /// Finishes [`ApplyJob`]: when the batch opens its epoch, durably writes
    /// the epoch's marker (once, however many batches wait for it) and
    /// applies again, so no batch of a new epoch is acknowledged before its
    /// marker is committed. Batches of an open epoch return at once.
    async fn settle(&self, mut job: ApplyJob, first: Applied) -> Result<Ingested, ServerError> {
        let mut outcome = first;
        // A written marker lets the next attempt create the accumulator, so
        // one retry suffices; the bound only guards against a logic error.
        for _ in 0..4 {
            let marker = match outcome {
                Applied::Merged(rows) => return Ok(Ingested::Applied(rows)),
                Applied::Duplicate => return Ok(Ingested::Duplicate),
                Applied::NeedsMarker(marker) => marker,
            };
            self.write_marker(&job, &marker).await?;
            let (next, back) = blocking(move || (job.apply(), job)).await?;
            job = back;
            outcome = next?;
        }
        Err(ServerError::Internal(format!(
            "the open marker of epoch {} of stream {} did not settle",
            job.epoch,
            job.key.display(&job.run.info.run_id)
        )))
    }

    /// Durably writes an epoch's open marker unless it is already written.
    async fn write_marker(&self, job: &ApplyJob, marker: &EpochMarker) -> Result<(), ServerError> {
        let store = self.store.clone();
        let key = job.epoch_key();
        marker
            .write_once(|| async move {
                let run_id = key.run_id.clone();
                let written = blocking(move || store.open_epoch(&key, now_unix_ms())).await??;
                if written {
                    Ok(())
                } else {
                    Err(ServerError::RunNotFound(run_id))
                }
            })
            .await
    }

    /// `PushStats`: a pre-aggregated accumulator, validated by the math core
    /// and merged like a batch.
    pub async fn push_stats(&self, block: StatsBlock) -> Result<Ingested, ServerError> {
        self.telemetry.ingest_bytes(block.encoded_len());
        let run = self.state.get(&block.run_id)?;
        let (k, d) = (run.info.num_classes, run.info.feature_dim);
        let decoded = decode::decode_stats(block, k, d)?;
        if run.is_duplicate(decoded.dedup.as_ref()) {
            return Ok(Ingested::Duplicate);
        }
        let decode::DecodedStats {
            key,
            epoch,
            parts,
            dedup,
        } = decoded;
        let (outcome, job) = blocking(move || {
            let job = ApplyJob {
                run,
                key,
                epoch,
                acc: Accumulator::from_parts(parts)?,
                dedup,
            };
            Ok::<_, ServerError>((job.apply(), job))
        })
        .await??;
        self.settle(job, outcome?).await
    }

    /// `CloseEpoch`: metrics on the blocking pool, result durable before it
    /// returns; on any failure the epoch stays open with all its data.
    pub async fn close_epoch(&self, req: CloseEpochRequest) -> Result<EpochResult, ServerError> {
        let started = Instant::now();
        let run = self.state.get(&req.run_id)?;
        let key = decode::stream_key(&req.split, &req.layer)?;
        let closing = run.begin_close(&key, req.epoch)?;
        let (computed, closing) = blocking(move || {
            let computed = metrics::compute(&closing.acc, Par::rayon(0));
            (computed, closing)
        })
        .await?;
        let metrics = match computed {
            Ok(m) => m,
            Err(err) => {
                run.abort_close(closing);
                return Err(err.into());
            }
        };
        let mut result = epoch_result(
            &run.info.run_id,
            &key,
            req.epoch,
            metrics,
            closing.previous_vci,
        );
        result.closed_unix_ms = now_unix_ms();
        result.close_seconds = started.elapsed().as_secs_f64();
        let record = Self::run_record(&run);
        let store = self.store.clone();
        let to_store = result.clone();
        let stored = blocking(move || store.put_result(&record, &to_store)).await;
        match stored {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                run.abort_close(closing);
                return Err(ServerError::RunNotFound(run.info.run_id.clone()));
            }
            Ok(Err(err)) => {
                run.abort_close(closing);
                return Err(err.into());
            }
            Err(err) => {
                run.abort_close(closing);
                return Err(err);
            }
        }
        let shared = Arc::new(result.clone());
        run.finish_close(closing, Arc::clone(&shared));
        let _ = self.events.send(WatchEvent::Result(shared));
        self.telemetry
            .observe_close(started.elapsed().as_secs_f64());
        tracing::info!(
            run = %run.info.run_id, split = %key.split, layer = %key.layer, epoch = req.epoch,
            samples = result.samples, vci = ?result.vci, seconds = result.close_seconds,
            "epoch closed"
        );
        Ok(result)
    }

    /// `GetHistory`: results ordered by split, layer, epoch.
    pub fn history(&self, req: &GetHistoryRequest) -> Result<History, ServerError> {
        let run = self.state.get(&req.run_id)?;
        let split = decode::name_filter("split", &req.split)?;
        let layer = decode::name_filter("layer", &req.layer)?;
        Ok(History {
            results: run
                .history(split.as_deref(), layer.as_deref())
                .iter()
                .map(|r| (**r).clone())
                .collect(),
        })
    }

    /// The result of the highest closed epoch of every stream of a run.
    pub fn latest_results(&self, run_id: &str) -> Result<Vec<Arc<EpochResult>>, ServerError> {
        Ok(self.state.get(run_id)?.latest_results())
    }

    /// A receiver of every future event of every run (callers filter);
    /// the web view's event stream.
    pub fn subscribe_all(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    /// A receiver of every future result and deletion (callers filter).
    /// Fails with NOT_FOUND for an unknown run.
    pub fn subscribe(&self, run_id: &str) -> Result<broadcast::Receiver<WatchEvent>, ServerError> {
        // Subscribe first so a result produced right after the check is
        // not missed.
        let rx = self.events.subscribe();
        self.state.get(run_id)?;
        Ok(rx)
    }

    /// Freezes and durably writes every open accumulator and duplicate
    /// filter, and rewrites the open markers to match (graceful shutdown).
    /// Blocking.
    pub fn checkpoint(&self) -> Result<usize, ServerError> {
        let mut all = Vec::new();
        let mut epochs = 0;
        let mut closing = Vec::new();
        for run in self.state.list() {
            let frozen = run.freeze_for_checkpoint();
            let (open, writers) = (frozen.open, frozen.writers);
            epochs += open.len();
            closing.extend(frozen.closing.into_iter().map(|(key, epoch)| EpochKey {
                run_id: run.info.run_id.clone(),
                split: key.split,
                layer: key.layer,
                epoch,
            }));
            let checkpoint = RunCheckpoint {
                epochs: open
                    .into_iter()
                    .map(|(key, epoch, acc)| StatsBlock {
                        run_id: run.info.run_id.clone(),
                        split: key.split,
                        layer: key.layer,
                        epoch,
                        ..StatsBlock::from(acc.to_parts())
                    })
                    .collect(),
                writers: writers
                    .into_iter()
                    .map(|(writer_id, set)| WriterCheckpoint {
                        writer_id,
                        ranges: set.to_flat(),
                    })
                    .collect(),
            };
            all.push((Self::run_record(&run), checkpoint));
        }
        self.store.write_checkpoints(&all, &closing)?;
        Ok(epochs)
    }
}
