//! The gRPC `vcid.v1.VciMonitor` service: translates requests into
//! [`Daemon`] calls and `ServerError`s into statuses (through the one
//! `From<ServerError> for Status`).
//!
//! Owns streaming behaviour. A `Push` stream is a small in-order pipeline
//! holding up to [`PUSH_PIPELINE_DEPTH`] received batches: the oldest is
//! applied (widened to f64 and folded) in a task of its own, strictly in
//! arrival order, while the stream goes on being read and the next batch
//! is prepared (validated: no state touched) on the blocking pool. A fold
//! starts as soon as the previous one has ended and its batch is prepared:
//! it never waits for the stream to be read.
//! Each received batch keeps its message's in-flight bytes (the
//! `deadline::Permits` of the request, one per message in order) until it
//! is applied or refused; `PushStats` and `CreateRun` keep theirs until
//! they answer, so `--max-inflight-bytes` counts a message until the daemon
//! is done with it, not only while tonic buffers it. The
//! first bad batch ends the stream with a message saying how many batches
//! before it were applied; batches after it were only prepared and are
//! dropped. On shutdown `Push` stops reading, applies the batches already
//! received and ends with UNAVAILABLE saying how many were applied; `Watch`
//! ends too. It must not hold request logic of its own (that is
//! `daemon`'s).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::vci_monitor_server::VciMonitor;
use crate::proto::{
    CheckpointReply, CheckpointRequest, CloseEpochRequest, CreateRunRequest, DeleteRunRequest,
    DeleteRunResponse, EpochResult, FeatureBatch, FinishRunRequest, GetHistoryRequest,
    GetRunRequest, History, ListRunsRequest, ListRunsResponse, PushSummary, Run, StatsBlock,
    WatchRequest,
};

use super::daemon::{Daemon, Ingested, PreparedBatch, WatchEvent};
use super::deadline::Permits;
use super::decode;
use super::error::ServerError;
use super::shutting_down;
use super::state::InflightPermit;

/// A batch being prepared on the blocking pool.
type Prepared = JoinHandle<Result<PreparedBatch, ServerError>>;
/// A prepared batch being applied.
type Applying = JoinHandle<Result<Ingested, ServerError>>;

/// The service object handed to tonic.
#[derive(Clone, Debug)]
pub struct VciService {
    daemon: Arc<Daemon>,
    /// Becomes `true` when the daemon starts shutting down.
    shutdown: watch::Receiver<bool>,
}

impl VciService {
    pub fn new(daemon: Arc<Daemon>, shutdown: watch::Receiver<bool>) -> VciService {
        VciService { daemon, shutdown }
    }
}

/// Batches one `Push` stream holds: the one being applied and the next,
/// received and prepared meanwhile.
const PUSH_PIPELINE_DEPTH: usize = 2;

/// Why a `Push` stream stopped reading before its end.
enum Stop {
    Shutdown,
    Stream(Status),
}

impl VciService {
    /// The error ending a `Push` stream at batch `index`; counts it. The
    /// batches after it were only prepared: they are dropped.
    fn abort_push(
        &self,
        index: u64,
        summary: &PushSummary,
        pending: &mut VecDeque<(Prepared, Option<InflightPermit>)>,
        source: ServerError,
    ) -> Status {
        for (handle, _) in pending.drain(..) {
            handle.abort();
        }
        self.daemon.telemetry().reject(&source);
        ServerError::PushAborted {
            index,
            applied: index,
            duplicates: summary.duplicates,
            source: Box::new(source),
        }
        .into()
    }
}

/// The outcome of a batch task.
fn joined<T>(
    outcome: Result<Result<T, ServerError>, tokio::task::JoinError>,
) -> Result<T, ServerError> {
    outcome.unwrap_or_else(|err| Err(ServerError::Internal(format!("batch task failed: {err}"))))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<EpochResult, Status>> + Send + 'static>>;

struct WatchState {
    rx: broadcast::Receiver<WatchEvent>,
    shutdown: watch::Receiver<bool>,
    run_id: String,
    /// The uid of the run watched: events of an earlier run of the same
    /// id are not for this subscriber.
    uid: u64,
    split: Option<String>,
    layer: Option<String>,
    done: bool,
}

async fn next_watch_item(mut st: WatchState) -> Option<(Result<EpochResult, Status>, WatchState)> {
    if st.done {
        return None;
    }
    loop {
        let event = tokio::select! {
            _ = shutting_down(&mut st.shutdown) => {
                st.done = true;
                let err = ServerError::ShuttingDown("Watch ended; resubscribe after restart".into());
                return Some((Err(err.into()), st));
            }
            event = st.rx.recv() => event,
        };
        match event {
            Ok(WatchEvent::Result { uid, result }) => {
                let wanted = uid == st.uid
                    && result.run_id == st.run_id
                    && st.split.as_ref().is_none_or(|s| *s == result.split)
                    && st.layer.as_ref().is_none_or(|l| *l == result.layer);
                if wanted {
                    return Some((Ok((*result).clone()), st));
                }
            }
            Ok(WatchEvent::RunDeleted { run_id, uid }) if uid == st.uid && run_id == st.run_id => {
                return None
            }
            Ok(WatchEvent::RunDeleted { .. } | WatchEvent::RunChanged(_)) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                st.done = true;
                return Some((Err(ServerError::WatchLagged(missed).into()), st));
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

#[tonic::async_trait]
impl VciMonitor for VciService {
    async fn create_run(
        &self,
        request: Request<CreateRunRequest>,
    ) -> Result<Response<Run>, Status> {
        // The message's in-flight bytes, held until its metadata is stored.
        let _permit = Permits::of(request.extensions()).pop();
        Ok(Response::new(
            self.daemon.create_run(request.into_inner()).await?,
        ))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        Ok(Response::new(
            self.daemon.get_run(&request.into_inner().run_id)?,
        ))
    }

    async fn list_runs(
        &self,
        _request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Ok(Response::new(ListRunsResponse {
            runs: self.daemon.list_runs(),
        }))
    }

    async fn delete_run(
        &self,
        request: Request<DeleteRunRequest>,
    ) -> Result<Response<DeleteRunResponse>, Status> {
        self.daemon.delete_run(&request.into_inner().run_id).await?;
        Ok(Response::new(DeleteRunResponse {}))
    }

    async fn finish_run(
        &self,
        request: Request<FinishRunRequest>,
    ) -> Result<Response<Run>, Status> {
        Ok(Response::new(
            self.daemon.finish_run(&request.into_inner().run_id).await?,
        ))
    }

    async fn push(
        &self,
        request: Request<Streaming<FeatureBatch>>,
    ) -> Result<Response<PushSummary>, Status> {
        let permits = Permits::of(request.extensions());
        let mut stream = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        let max = self.daemon.limits().max_message_bytes;
        let mut summary = PushSummary {
            incarnation: self.daemon.incarnation(),
            ..PushSummary::default()
        };
        // (run_id, writer_id) of the last batch with an idempotence key.
        let mut writer: Option<(String, String)> = None;
        // Batches of this stream applied or skipped so far, in order.
        let mut index: u64 = 0;
        // Batches received and being prepared (validation) on the
        // blocking pool, each with its message's in-flight bytes (returned
        // once it is applied or refused); applied strictly in arrival order.
        let mut pending: VecDeque<(Prepared, Option<InflightPermit>)> = VecDeque::new();
        // The batch being applied (its own task, so the stream is read
        // and the next batches prepared during its fold).
        let mut applying: Option<(Applying, Option<InflightPermit>)> = None;
        let mut reading = true;
        let mut stop: Option<Stop> = None;
        loop {
            if pending.is_empty() && applying.is_none() && !reading {
                break;
            }
            tokio::select! {
                biased;
                _ = shutting_down(&mut shutdown), if reading => {
                    // Stop reading; the batches already received still finish.
                    reading = false;
                    stop = Some(Stop::Shutdown);
                }
                outcome = async {
                    match applying.as_mut() {
                        Some((handle, _)) => handle.await,
                        None => std::future::pending().await,
                    }
                }, if applying.is_some() => {
                    applying = None;
                    match joined(outcome) {
                        Ok(Ingested::Applied(rows)) => {
                            summary.batches_applied += 1;
                            summary.rows_applied += rows;
                        }
                        Ok(Ingested::Duplicate) => summary.duplicates += 1,
                        Err(source) => {
                            return Err(self.abort_push(index, &summary, &mut pending, source));
                        }
                    }
                    index += 1;
                }
                // The next fold starts as soon as the previous one ends and
                // its batch is prepared: folds are the stream's critical path.
                prepared = async {
                    match pending.front_mut() {
                        Some((handle, _)) => handle.await,
                        None => std::future::pending().await,
                    }
                }, if applying.is_none() && !pending.is_empty() => {
                    let permit = pending.pop_front().and_then(|(_, permit)| permit);
                    let prepared = match joined(prepared) {
                        Ok(prepared) => prepared,
                        Err(source) => {
                            return Err(self.abort_push(index, &summary, &mut pending, source));
                        }
                    };
                    if let Some((run, w)) = prepared.writer() {
                        if writer.as_ref().is_none_or(|(r, x)| r != run || x != w) {
                            writer = Some((run.to_owned(), w.to_owned()));
                        }
                    }
                    let daemon = Arc::clone(&self.daemon);
                    let handle = tokio::spawn(async move { daemon.apply_prepared(prepared).await });
                    applying = Some((handle, permit));
                }
                next = stream.message(), if reading && pending.len() + usize::from(applying.is_some()) < PUSH_PIPELINE_DEPTH => {
                    match next {
                        Ok(Some(batch)) => {
                            let permit = permits.pop();
                            let daemon = Arc::clone(&self.daemon);
                            let handle = tokio::spawn(async move {
                                daemon.prepare_batch(batch).await
                            });
                            pending.push_back((handle, permit));
                        }
                        Ok(None) => reading = false,
                        Err(status) => {
                            reading = false;
                            stop = Some(Stop::Stream(status));
                        }
                    }
                }
            }
        }
        if let Some((run, w)) = &writer {
            summary.durable_through = self.daemon.durable_through(run, w);
        }
        match stop {
            None => Ok(Response::new(summary)),
            Some(Stop::Shutdown) => Err(ServerError::ShuttingDown(format!(
                "Push stream stopped after {index} batches, all applied ({} rows, {} duplicates)",
                summary.rows_applied, summary.duplicates
            ))
            .into()),
            Some(Stop::Stream(status)) => match ServerError::from_oversized(&status, max) {
                Some(err) => Err(self.abort_push(index, &summary, &mut pending, err)),
                None => Err(status),
            },
        }
    }

    async fn push_stats(
        &self,
        request: Request<StatsBlock>,
    ) -> Result<Response<PushSummary>, Status> {
        // The block's in-flight bytes, held until it is merged or refused.
        let _permit = Permits::of(request.extensions()).pop();
        let block = request.into_inner();
        let (run_id, writer_id) = (block.run_id.clone(), block.writer_id.clone());
        let summary = |batches_applied, rows_applied, duplicates| PushSummary {
            batches_applied,
            rows_applied,
            duplicates,
            durable_through: if writer_id.is_empty() {
                None
            } else {
                self.daemon.durable_through(&run_id, &writer_id)
            },
            incarnation: self.daemon.incarnation(),
        };
        match self.daemon.push_stats(block).await {
            Ok(Ingested::Applied(rows)) => Ok(Response::new(summary(1, rows, 0))),
            Ok(Ingested::Duplicate) => Ok(Response::new(summary(0, 0, 1))),
            Err(err) => {
                self.daemon.telemetry().reject(&err);
                Err(err.into())
            }
        }
    }

    async fn checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointReply>, Status> {
        Ok(Response::new(
            self.daemon.checkpoint(request.into_inner()).await?,
        ))
    }

    async fn close_epoch(
        &self,
        request: Request<CloseEpochRequest>,
    ) -> Result<Response<EpochResult>, Status> {
        Ok(Response::new(
            self.daemon.close_epoch(request.into_inner()).await?,
        ))
    }

    async fn get_history(
        &self,
        request: Request<GetHistoryRequest>,
    ) -> Result<Response<History>, Status> {
        Ok(Response::new(self.daemon.history(&request.into_inner())?))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let split = decode::name_filter("split", &req.split)?;
        let layer = decode::name_filter("layer", &req.layer)?;
        let (rx, uid) = self.daemon.subscribe(&req.run_id)?;
        let state = WatchState {
            rx,
            shutdown: self.shutdown.clone(),
            run_id: req.run_id,
            uid,
            split,
            layer,
            done: false,
        };
        let stream = futures::stream::unfold(state, next_watch_item);
        Ok(Response::new(Box::pin(stream)))
    }
}
