//! The daemon's request logic, independent of gRPC: create/delete runs,
//! ingest batches and stats blocks, close epochs, read history, subscribe to
//! results, restore at start-up, checkpoint open epochs (periodically, on
//! request and at shutdown) and tell writers how far they are durable.
//!
//! Ties [`State`] (memory), [`Store`] (disk), [`Telemetry`] and the math
//! core together. CPU work (decoding, a batch's statistics, an epoch's
//! metrics) and disk I/O run on tokio's blocking pool (`spawn_blocking`), so
//! the async runtime keeps serving other streams and runs meanwhile; locks
//! are only taken inside [`State`]'s short critical sections. It must not
//! know about tonic requests, HTTP or signals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prost::Message;
use tokio::sync::broadcast;

use crate::metrics::{self, registry, EpochMetrics};
use crate::proto::{
    CheckpointReply, CheckpointRequest, CloseEpochRequest, CreateRunRequest, EpochResult,
    FeatureBatch, GetHistoryRequest, History, Run, StatsBlock,
};
use crate::stats::{Accumulator, Par};

use super::clock::{now_unix_ms, utc_timestamp};
use super::config::Limits;
use super::decode::{self, StreamKey, WireRows};
use super::error::ServerError;
use super::export::Telemetry;
use super::state::{
    Applied, Contribution, EpochMarker, RestoredEpoch, RunInfo, RunState, SeqSet, State,
};
use super::store::{EpochCheckpoint, EpochKey, Store, WriterCheckpoint};

/// How many results a `Watch` subscriber may fall behind before it is cut
/// off (it can re-read `GetHistory`).
const WATCH_CAPACITY: usize = 1024;

/// A validated batch (still in its wire encoding), not yet applied (see
/// [`Daemon::prepare_batch`]).
#[derive(Debug)]
pub struct PreparedBatch {
    run: Arc<RunState>,
    key: StreamKey,
    epoch: u64,
    dedup: Option<(String, u64)>,
    /// `None`: already known to be a duplicate.
    input: Option<Input>,
}

impl PreparedBatch {
    /// `(run_id, writer_id)` of a batch with an idempotence key.
    pub fn writer(&self) -> Option<(&str, &str)> {
        self.dedup
            .as_ref()
            .map(|(w, _)| (self.run.info.run_id.as_str(), w.as_str()))
    }
}

/// What a batch brings, owned until it is folded.
#[derive(Debug)]
enum Input {
    /// Rows `rows × d` in their wire encoding and their labels, checked.
    Rows(WireRows, Vec<u32>),
    /// A `PushStats` block, validated.
    Stats(Accumulator),
}

/// A batch on its way into one epoch's shards.
#[derive(Debug)]
struct ApplyJob {
    run: Arc<RunState>,
    key: StreamKey,
    epoch: u64,
    input: Input,
    dedup: Option<(String, u64)>,
}

impl ApplyJob {
    /// One attempt of [`RunState::apply`] (blocking: the O(rows·d²) fold
    /// or the O(d²) merge).
    fn apply(&self) -> Result<Applied, ServerError> {
        let batch = match &self.input {
            Input::Rows(features, labels) => Contribution::Rows { features, labels },
            Input::Stats(acc) => Contribution::Stats(acc),
        };
        self.run
            .apply(&self.key, self.epoch, batch, self.dedup.as_ref())
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
/// Results and deletions name the run's uid: a subscriber of a run never
/// sees an event of an earlier run of the same id (see
/// [`Daemon::subscribe`]).
#[derive(Clone, Debug)]
pub enum WatchEvent {
    /// A new epoch result of the run of `uid`.
    Result { uid: u64, result: Arc<EpochResult> },
    /// A run was created or finished (its state after the change).
    RunChanged(Arc<Run>),
    /// The run of `uid` was deleted: its watchers end.
    RunDeleted { run_id: String, uid: u64 },
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
    /// Serialises checkpoint rounds (taken on the blocking pool only).
    round: Mutex<()>,
    /// Held shared by every close in flight; the shutdown checkpoint takes
    /// it exclusively, so it waits for them (see [`Daemon::close_epoch`]).
    closes: Arc<tokio::sync::RwLock<()>>,
    /// Changes on every start (see `PushSummary.incarnation`).
    incarnation: u64,
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
        let mut restored = store.load()?;
        for (run, uid) in std::mem::take(&mut restored.runs) {
            let info = RunInfo {
                run_id: run.run_id.clone(),
                uid,
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
        for result in std::mem::take(&mut restored.results) {
            let Some(run) = state.find(&result.run_id) else {
                continue;
            };
            let key = StreamKey {
                split: result.split.clone(),
                layer: result.layer.clone(),
            };
            run.restore_result(key, Arc::new(result));
        }
        let open = restore_open_epochs(&state, restored);
        let started = now_unix_ms();
        let (events, _) = broadcast::channel(WATCH_CAPACITY);
        let daemon = Daemon {
            state,
            store,
            limits,
            telemetry,
            events,
            admin: tokio::sync::Mutex::new(()),
            round: Mutex::new(()),
            closes: Arc::new(tokio::sync::RwLock::new(())),
            incarnation: rand::random(),
        };
        if open.rewrite {
            // Epochs of a legacy whole-run checkpoint: store them in the
            // current format now (the round clears the legacy table).
            daemon.checkpoint_round()?;
        }
        if !open.missing.is_empty() {
            tracing::warn!(
                writers = %open.missing.join("; "),
                stopped_before = %utc_timestamp(started),
                "batches applied after the last checkpoint of these open epochs died with an \
                 unclean stop of the daemon (kill -9, crash or power loss: the last stop, or an \
                 earlier one whose writers have not resent yet; a graceful stop loses nothing); \
                 each epoch continues and closes once those writers have resent (live vcid \
                 clients do when they reconnect)"
            );
        }
        tracing::info!(
            path = %daemon.store.path().display(),
            runs = daemon.state.list().len(),
            open_epochs = open.epochs,
            lost_epochs = open.lost,
            "state restored"
        );
        Ok(daemon)
    }

    /// Identifies this daemon process (see `PushSummary.incarnation`).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The durable acknowledgement of `writer_id` in `run_id` (see
    /// `PushSummary.durable_through`).
    pub fn durable_through(&self, run_id: &str, writer_id: &str) -> Option<u64> {
        self.state.find(run_id)?.durable_through(writer_id)
    }

    /// The metrics registry (for `/metrics`).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The in-flight budget of request messages (`--max-inflight-bytes`).
    pub(crate) fn inflight(&self) -> Arc<super::state::Inflight> {
        Arc::clone(&self.state.inflight)
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
            // Non-zero: 0 is the uid of runs stored by earlier versions.
            uid: rand::random::<u64>().max(1),
            num_classes: req.num_classes,
            feature_dim: req.feature_dim,
            metadata: req.metadata.into_iter().collect::<BTreeMap<_, _>>(),
            created_unix_ms: now_unix_ms(),
        };
        self.state.budget.check_fits(&info)?;
        let run = self.state.new_run(info, 0);
        let record = Self::run_record(&run);
        let store = self.store.clone();
        let uid = run.info.uid;
        blocking(move || store.create_run(&record, uid)).await??;
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
        let uid = run.info.uid;
        let stored = match blocking(move || store.update_run(&record, uid)).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(ServerError::RunNotFound(run_id.to_owned())),
            Ok(Err(err)) => Err(err.into()),
            Err(err) => Err(err),
        };
        if let Err(err) = stored {
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
        let uid = self.state.get(run_id)?.info.uid;
        let store = self.store.clone();
        let id = run_id.to_owned();
        blocking(move || store.delete_run(&id)).await??;
        // Waits for folds in flight: on the blocking pool.
        let state = Arc::clone(&self.state);
        let id = run_id.to_owned();
        blocking(move || state.remove(&id)).await?;
        let _ = self.events.send(WatchEvent::RunDeleted {
            run_id: run_id.to_owned(),
            uid,
        });
        tracing::info!(run = %run_id, "run deleted");
        Ok(())
    }

    /// The lock-free half of ingesting a batch: validation (names, shape,
    /// labels, finiteness of the encoded values), on the blocking pool.
    /// Changes nothing, so several batches of one stream may be prepared
    /// concurrently and then applied in order.
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
                input: None,
            });
        }
        let (k, d) = (run.info.num_classes, run.info.feature_dim);
        let max_rows = self.limits.max_batch_rows;
        let decoded = blocking(move || {
            let decoded = decode::decode_batch(batch, d, max_rows)?;
            Accumulator::check_labels(&decoded.labels, k as usize)?;
            decoded.features.check_finite()?;
            Ok::<_, ServerError>(decoded)
        })
        .await??;
        Ok(PreparedBatch {
            run,
            key: decoded.key,
            epoch: decoded.epoch,
            dedup: decoded.dedup,
            input: Some(Input::Rows(decoded.features, decoded.labels)),
        })
    }

    /// The serialised half: the fold into a shard of the epoch (on the
    /// blocking pool), with the duplicate, sequence-gap, closed-epoch and
    /// budget checks (batches of one stream arrive here in order, so a
    /// sequence prepared before its predecessor landed is judged after it).
    pub async fn apply_prepared(&self, prepared: PreparedBatch) -> Result<Ingested, ServerError> {
        let PreparedBatch {
            run,
            key,
            epoch,
            dedup,
            input,
        } = prepared;
        let Some(input) = input else {
            return Ok(Ingested::Duplicate);
        };
        let job = ApplyJob {
            run,
            key,
            epoch,
            input,
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
        // A written epoch marker lets the next attempt create the
        // accumulator and a written writer marker lets it merge, so two
        // retries suffice unless a checkpoint snapshot starts a new marker
        // generation in between; the bound only guards against a logic error.
        for _ in 0..8 {
            let marker = match outcome {
                Applied::Merged(rows) => return Ok(Ingested::Applied(rows)),
                Applied::Duplicate => return Ok(Ingested::Duplicate),
                Applied::NeedsMarker(marker) => {
                    self.write_marker(&job, &marker).await?;
                    marker
                }
                Applied::NeedsWriterMarker {
                    marker,
                    writer,
                    generation,
                } => {
                    self.write_writer_marker(&job, &marker, writer, generation)
                        .await?;
                    marker
                }
            };
            drop(marker);
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
        let uid = job.run.info.uid;
        marker
            .write_once(|| async move {
                let run_id = key.run_id.clone();
                let written =
                    blocking(move || store.open_epoch(&key, uid, now_unix_ms())).await??;
                if written {
                    Ok(())
                } else {
                    Err(ServerError::RunNotFound(run_id))
                }
            })
            .await
    }

    /// Durably writes a writer's dirty marker of this generation unless it
    /// is already written.
    async fn write_writer_marker(
        &self,
        job: &ApplyJob,
        marker: &EpochMarker,
        writer: String,
        generation: u64,
    ) -> Result<(), ServerError> {
        let store = self.store.clone();
        let key = job.epoch_key();
        let uid = job.run.info.uid;
        marker
            .write_once(|| async move {
                let run_id = key.run_id.clone();
                let written =
                    blocking(move || store.mark_writer(&key, uid, &writer, generation)).await??;
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
                input: Input::Stats(Accumulator::from_parts(parts)?),
                dedup,
            };
            Ok::<_, ServerError>((job.apply(), job))
        })
        .await??;
        self.settle(job, outcome?).await
    }

    /// `CloseEpoch`: metrics on the blocking pool, result durable before it
    /// returns; on any failure the epoch stays open with all its data.
    ///
    /// The close runs in a task of its own, to its end even when the caller
    /// goes away (a client deadline or cancellation, the end of the
    /// shutdown grace): an epoch taken out of the open set is always stored
    /// or given back, never stranded half-closed. The shutdown checkpoint
    /// waits for the closes in flight (`closes`), so it holds every epoch
    /// that a failing close gave back.
    pub async fn close_epoch(
        self: &Arc<Self>,
        req: CloseEpochRequest,
    ) -> Result<EpochResult, ServerError> {
        let in_flight = Arc::clone(&self.closes).read_owned().await;
        let daemon = Arc::clone(self);
        tokio::spawn(async move {
            let closed = daemon.close(req).await;
            drop(in_flight);
            closed
        })
        .await
        .map_err(|e| ServerError::Internal(format!("close task failed: {e}")))?
    }

    /// The body of [`Daemon::close_epoch`].
    async fn close(&self, req: CloseEpochRequest) -> Result<EpochResult, ServerError> {
        let started = Instant::now();
        let run = self.state.get(&req.run_id)?;
        let key = decode::stream_key(&req.split, &req.layer)?;
        let (computed, closing) = {
            let (run, key, epoch) = (Arc::clone(&run), key.clone(), req.epoch);
            blocking(move || {
                let closing = run.begin_close(&key, epoch)?;
                let computed = metrics::compute(&closing.acc, Par::rayon(0));
                Ok::<_, ServerError>((computed, closing))
            })
            .await??
        };
        // A failure gives the epoch back (or frees it, when its run was
        // deleted meanwhile) and says so.
        let deleted = || ServerError::RunDeletedDuringClose {
            run_id: run.info.run_id.clone(),
            stream: key.display(&run.info.run_id),
            epoch: req.epoch,
        };
        let failed = |closing, source: ServerError| match run.abort_close(closing) {
            Some(samples) => ServerError::CloseFailed {
                stream: key.display(&run.info.run_id),
                epoch: req.epoch,
                samples,
                source: Box::new(source),
            },
            None => deleted(),
        };
        let metrics = match computed {
            Ok(m) => m,
            Err(err) => return Err(failed(closing, err.into())),
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
        let writers = writer_checkpoints(&closing.writers);
        let uid = run.info.uid;
        let stored = blocking(move || store.put_result(&record, uid, &to_store, &writers)).await;
        match stored {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // The run was deleted (and maybe created again) during the
                // close: the result belongs to no run.
                run.abort_close(closing);
                return Err(deleted());
            }
            Ok(Err(err)) => return Err(failed(closing, err.into())),
            Err(err) => return Err(failed(closing, err)),
        }
        let shared = Arc::new(result.clone());
        run.finish_close(closing, Arc::clone(&shared));
        let _ = self.events.send(WatchEvent::Result {
            uid,
            result: shared,
        });
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

    /// A receiver of every future result and deletion (callers filter),
    /// with the uid of the run `run_id` names now: events of another uid
    /// are of an earlier run of that id. Fails with NOT_FOUND for an
    /// unknown run.
    pub fn subscribe(
        &self,
        run_id: &str,
    ) -> Result<(broadcast::Receiver<WatchEvent>, u64), ServerError> {
        // Subscribe first so a result produced right after the check is
        // not missed.
        let rx = self.events.subscribe();
        let uid = self.state.get(run_id)?.info.uid;
        Ok((rx, uid))
    }

    /// Whether `run_id` names the run of `uid` now (a subscriber of every
    /// run drops the events of runs deleted since).
    pub fn is_current(&self, run_id: &str, uid: u64) -> bool {
        self.state
            .find(run_id)
            .is_some_and(|run| run.info.uid == uid)
    }

    /// One checkpoint round: snapshots every open epoch that changed since
    /// its last checkpoint (one slot lock at a time), writes them with
    /// their writers' sequences in one durable transaction outside every
    /// lock, then records them as durable. Rounds are serialised. Blocking:
    /// call it on the blocking pool. Returns the epochs written.
    pub fn checkpoint_round(&self) -> Result<usize, ServerError> {
        let _round = self
            .round
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = now_unix_ms();
        let mut records = Vec::new();
        let mut epochs = Vec::new();
        let mut taken = Vec::new();
        for run in self.state.list() {
            let mut snapshots = run.snapshot_changed();
            if snapshots.is_empty() {
                continue;
            }
            records.push((Self::run_record(&run), run.info.uid));
            for snap in &mut snapshots {
                let Some(packed) = snap.packed.take() else {
                    continue;
                };
                let key = EpochKey {
                    run_id: run.info.run_id.clone(),
                    split: snap.key.split.clone(),
                    layer: snap.key.layer.clone(),
                    epoch: snap.epoch,
                };
                let checkpoint = EpochCheckpoint::new(
                    &key,
                    packed,
                    writer_checkpoints(&snap.writers),
                    snap.generation,
                    now,
                );
                epochs.push((key, run.info.uid, checkpoint, snap.missing.clone()));
            }
            taken.push((run, snapshots));
        }
        if epochs.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let written = self.store.write_round(&records, epochs)?;
        for (run, snapshots) in &taken {
            run.mark_durable(snapshots, now);
        }
        tracing::debug!(
            epochs = written,
            seconds = started.elapsed().as_secs_f64(),
            "checkpoint written"
        );
        Ok(written)
    }

    /// `Checkpoint`: a round first when `force`, then the writer's durable
    /// acknowledgement.
    pub async fn checkpoint(
        self: &Arc<Self>,
        req: CheckpointRequest,
    ) -> Result<CheckpointReply, ServerError> {
        let run = self.state.get(&req.run_id)?;
        decode::dedup_key(&req.writer_id, 0)?;
        let epochs_written = if req.force {
            let daemon = Arc::clone(self);
            blocking(move || daemon.checkpoint_round()).await?? as u64
        } else {
            0
        };
        Ok(CheckpointReply {
            durable_through: run.durable_through(&req.writer_id),
            incarnation: self.incarnation,
            epochs_written,
        })
    }

    /// The shutdown checkpoint: freezes every open accumulator (later
    /// merges and closes fail with UNAVAILABLE), waits for the closes in
    /// flight (each stores its result or gives its epoch back, frozen) and
    /// writes the changed epochs.
    pub async fn checkpoint_for_shutdown(self: &Arc<Self>) -> Result<usize, ServerError> {
        let daemon = Arc::clone(self);
        blocking(move || {
            for run in daemon.state.list() {
                run.freeze();
            }
        })
        .await?;
        let closes = match self.closes.try_write() {
            Ok(closes) => closes,
            Err(_) => {
                tracing::info!("shutting down: waiting for the epoch closes in flight");
                self.closes.write().await
            }
        };
        let daemon = Arc::clone(self);
        let written = blocking(move || daemon.checkpoint_round()).await?;
        drop(closes);
        written
    }
}

fn writer_checkpoints(writers: &[(String, SeqSet)]) -> Vec<WriterCheckpoint> {
    writers
        .iter()
        .map(|(writer_id, set)| WriterCheckpoint {
            writer_id: writer_id.clone(),
            ranges: set.to_flat(),
        })
        .collect()
}

/// What [`restore_open_epochs`] found.
struct OpenRestored {
    epochs: usize,
    lost: usize,
    /// Some epoch came from a legacy whole-run checkpoint.
    rewrite: bool,
    /// `run/split/layer epoch E: writer …` of every missing writer.
    missing: Vec<String>,
}

/// Restores the duplicate filter of closed epochs, every open epoch (from
/// its checkpoint, a legacy whole-run checkpoint, or empty) with the
/// writers whose later batches died with the previous process, and the
/// epochs earlier versions found lost.
fn restore_open_epochs(state: &State, restored: super::store::Restored) -> OpenRestored {
    for (run_id, writer) in &restored.closed_writers {
        if let Some(run) = state.find(run_id) {
            run.restore_writer(&writer.writer_id, &SeqSet::from_flat(&writer.ranges));
        }
    }
    let mut legacy: HashMap<EpochKey, StatsBlock> = HashMap::new();
    for (run_id, checkpoint) in restored.checkpoints {
        let Some(run) = state.find(&run_id) else {
            continue;
        };
        for writer in &checkpoint.writers {
            run.restore_writer(&writer.writer_id, &SeqSet::from_flat(&writer.ranges));
        }
        for block in checkpoint.epochs {
            let key = EpochKey {
                run_id: run_id.clone(),
                split: block.split.clone(),
                layer: block.layer.clone(),
                epoch: block.epoch,
            };
            legacy.insert(key, block);
        }
    }
    let mut dirty: HashMap<EpochKey, Vec<(String, u64)>> = HashMap::new();
    for (key, writer, generation) in restored.dirty {
        dirty.entry(key).or_default().push((writer, generation));
    }
    let lost: HashSet<&EpochKey> = restored.lost.iter().map(|(k, _)| k).collect();
    let mut out = OpenRestored {
        epochs: 0,
        lost: restored.lost.len(),
        rewrite: false,
        missing: Vec::new(),
    };
    for (key, checkpoint) in restored.open {
        let Some(run) = state.find(&key.run_id) else {
            continue;
        };
        if lost.contains(&key) {
            continue;
        }
        let (k, d) = (run.info.num_classes, run.info.feature_dim);
        let (parts, writers, generation, unix_ms, rewrite) = match checkpoint {
            Some(mut c) => (
                c.take_parts(k, d),
                c.writers,
                c.generation,
                c.unix_ms,
                false,
            ),
            None => {
                let block = legacy.remove(&key);
                let rewrite = block.is_some();
                let parts = block.map(|b| Ok(b.into_parts(k, d)));
                (parts, Vec::new(), 0, 0, rewrite)
            }
        };
        let acc = match parts.map(|p| p.and_then(Accumulator::from_parts)) {
            Some(Ok(acc)) => acc,
            None => Accumulator::new(k as usize, d as usize),
            Some(Err(err)) => {
                tracing::error!(
                    run = %key.run_id, epoch = key.epoch, %err,
                    "checkpointed accumulator is invalid; the epoch restarts empty"
                );
                Accumulator::new(k as usize, d as usize)
            }
        };
        let writers: BTreeMap<String, SeqSet> = writers
            .into_iter()
            .map(|w| (w.writer_id, SeqSet::from_flat(&w.ranges)))
            .collect();
        let marks = dirty.remove(&key).unwrap_or_default();
        let missing: BTreeMap<String, Option<u64>> = marks
            .iter()
            .map(|(w, _)| (w.clone(), writers.get(w).and_then(SeqSet::max)))
            .collect();
        for (w, after) in &missing {
            out.missing.push(format!(
                "{}/{}/{} epoch {}: writer {w:?} after sequence {after:?}",
                key.run_id, key.split, key.layer, key.epoch
            ));
        }
        let generation = marks
            .iter()
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(0)
            .max(generation)
            + 1;
        out.rewrite |= rewrite;
        out.epochs += 1;
        run.restore_open(
            StreamKey {
                split: key.split.clone(),
                layer: key.layer.clone(),
            },
            key.epoch,
            RestoredEpoch {
                acc,
                writers,
                generation,
                missing,
                durable_unix_ms: unix_ms,
                rewrite,
            },
        );
    }
    for (key, found) in &restored.lost {
        if let Some(run) = state.find(&key.run_id) {
            let stream = StreamKey {
                split: key.split.clone(),
                layer: key.layer.clone(),
            };
            run.restore_lost(stream, key.epoch, *found);
        }
    }
    out
}
