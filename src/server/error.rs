//! The daemon's one error type, [`ServerError`], and its one mapping to a
//! gRPC status (`impl From<ServerError> for tonic::Status`).
//!
//! Every variant's message names the field, the expected value and the
//! received value (SPEC §5). Nothing else in the server builds a
//! `tonic::Status` from scratch; handlers return `ServerError` and convert.

use crate::metrics::MetricsError;
use crate::stats::StatsError;

use super::store::StoreError;

/// Why a request (or the daemon) failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No run with that id (NOT_FOUND).
    #[error("run_id: expected an existing run, received {0:?} (no such run)")]
    RunNotFound(String),

    /// A field that does not follow the API's rules (INVALID_ARGUMENT).
    #[error("{field}: expected {expected}, received {received}")]
    Invalid {
        field: String,
        expected: String,
        received: String,
    },

    /// The batch's statistics could not be built (labels, NaN/Inf, a bad
    /// `StatsBlock`): INVALID_ARGUMENT.
    #[error(transparent)]
    Stats(#[from] StatsError),

    /// `CreateRun` for an existing run with another shape (ALREADY_EXISTS).
    #[error(
        "num_classes/feature_dim: expected {expected_k}/{expected_d} as run {run_id:?} already \
         has, received {received_k}/{received_d}"
    )]
    RunConflict {
        run_id: String,
        expected_k: u32,
        expected_d: u32,
        received_k: u32,
        received_d: u32,
    },

    /// Push or close for an epoch that is closed or being closed
    /// (FAILED_PRECONDITION).
    #[error(
        "epoch: expected an epoch of stream {stream} that is still open, received {epoch}, \
         which is {state}"
    )]
    EpochClosed {
        stream: String,
        epoch: u64,
        state: &'static str,
    },

    /// Push or close for a run that `FinishRun` marked finished
    /// (FAILED_PRECONDITION).
    #[error(
        "run_id: expected a run that is not finished, received {run_id:?}, which was marked \
         finished at {finished_at} (FinishRun) and takes no more pushes or closes. Nothing was \
         applied; continue under a new run"
    )]
    RunFinished { run_id: String, finished_at: String },

    /// `FinishRun` while epochs are open or being closed
    /// (FAILED_PRECONDITION).
    #[error(
        "run_id: expected a run without open epochs to finish, received {run_id:?}, which has \
         open epochs ({open}). Close them (CloseEpoch) first, or delete the run"
    )]
    OpenEpochsAtFinish { run_id: String, open: String },

    /// Close for an epoch that never received data (FAILED_PRECONDITION).
    #[error("epoch: expected an open epoch of stream {stream} (open: {open}), received {epoch}")]
    NoOpenEpoch {
        stream: String,
        epoch: u64,
        open: String,
    },

    /// Push or close for an epoch whose open statistics died with an
    /// earlier daemon process (DATA_LOSS; see `state`'s "Open-epoch
    /// markers"). `stopped_before` is the start-up that found it.
    #[error(
        "epoch: expected an epoch that still holds its statistics, received {epoch}: epoch \
         {epoch} of stream {stream} lost its open statistics when the daemon stopped uncleanly \
         at or before {stopped_before}. Nothing was applied; push the epoch's data again under \
         a new epoch number"
    )]
    EpochLost {
        stream: String,
        epoch: u64,
        stopped_before: String,
    },

    /// A batch whose `(writer_id, sequence)` would open more gaps in that
    /// writer's applied sequence numbers than `--max-sequence-gaps-per-writer`
    /// (FAILED_PRECONDITION: the writer's own history, not a transient
    /// shortage, is what refuses it; see `state`'s "Duplicate filter").
    #[error(
        "sequence: expected a sequence number next to one that writer_id {writer_id:?} of run \
         {run_id:?} already sent, as that writer already has {gaps} gaps between its sequence \
         numbers (limit {limit}, --max-sequence-gaps-per-writer); received {sequence}, which \
         would open another gap. Nothing was applied. Send each writer's sequences in \
         increasing order, resend the missing ones first, or continue with a new writer_id"
    )]
    SequenceGaps {
        run_id: String,
        writer_id: String,
        sequence: u64,
        gaps: u64,
        limit: u64,
    },

    /// Opening an accumulator would exceed `--max-accumulator-bytes`
    /// (RESOURCE_EXHAUSTED).
    #[error(
        "max_accumulator_bytes: an accumulator of run {run_id:?} (num_classes={num_classes}, \
         feature_dim={feature_dim}) needs {needed} bytes; expected at most {available} more \
         bytes, {in_use} of the {budget}-byte budget are in use"
    )]
    BudgetExceeded {
        run_id: String,
        num_classes: u32,
        feature_dim: u32,
        needed: u64,
        in_use: u64,
        available: u64,
        budget: u64,
    },

    /// A batch with more rows than `--max-batch-rows` (RESOURCE_EXHAUSTED).
    #[error("rows: expected at most {max} (--max-batch-rows), received {rows}")]
    TooManyRows { rows: u64, max: u32 },

    /// A message larger than `--max-message-bytes` (RESOURCE_EXHAUSTED).
    #[error("message size: expected at most {max} bytes (--max-message-bytes), received {detail}")]
    MessageTooLarge { max: usize, detail: String },

    /// Missing or wrong bearer token (UNAUTHENTICATED).
    #[error("authorization: expected \"Bearer <token>\" with the daemon's token, received {0}")]
    Unauthenticated(&'static str),

    /// A `Push` stream stopped at a bad batch; the batches before it stay
    /// applied. Carries the status of the underlying error.
    #[error(
        "batch {index} of this Push stream was rejected; the {applied} batches before it were \
         applied ({duplicates} of them skipped as duplicates): {source}"
    )]
    PushAborted {
        index: u64,
        applied: u64,
        duplicates: u64,
        source: Box<ServerError>,
    },

    /// The daemon is shutting down (UNAVAILABLE); retry against the
    /// restarted daemon.
    #[error("the daemon is shutting down: {0}")]
    ShuttingDown(String),

    /// A `Watch` subscriber fell too far behind (ABORTED).
    #[error(
        "watch: expected the subscriber to keep up, it missed {0} results; re-read GetHistory"
    )]
    WatchLagged(u64),

    /// The metrics of a closed epoch could not be computed (INTERNAL).
    #[error("computing the metrics failed: {0}")]
    Metrics(#[from] MetricsError),

    /// The database failed (INTERNAL).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// Binding a listener or serving failed (only from `spawn`/`serve`).
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },

    /// A bug or a panicked worker (INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServerError {
    /// Shorthand for [`ServerError::Invalid`].
    pub fn invalid(
        field: impl Into<String>,
        expected: impl Into<String>,
        received: impl Into<String>,
    ) -> Self {
        ServerError::Invalid {
            field: field.into(),
            expected: expected.into(),
            received: received.into(),
        }
    }

    /// The gRPC status code of this error (SPEC §5).
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ServerError::RunNotFound(_) => Code::NotFound,
            ServerError::Invalid { .. } | ServerError::Stats(_) => Code::InvalidArgument,
            ServerError::RunConflict { .. } => Code::AlreadyExists,
            ServerError::EpochClosed { .. }
            | ServerError::NoOpenEpoch { .. }
            | ServerError::SequenceGaps { .. }
            | ServerError::RunFinished { .. }
            | ServerError::OpenEpochsAtFinish { .. } => Code::FailedPrecondition,
            ServerError::BudgetExceeded { .. }
            | ServerError::TooManyRows { .. }
            | ServerError::MessageTooLarge { .. } => Code::ResourceExhausted,
            ServerError::EpochLost { .. } => Code::DataLoss,
            ServerError::Unauthenticated(_) => Code::Unauthenticated,
            ServerError::PushAborted { source, .. } => source.code(),
            ServerError::ShuttingDown(_) => Code::Unavailable,
            ServerError::WatchLagged(_) => Code::Aborted,
            ServerError::Metrics(_)
            | ServerError::Store(_)
            | ServerError::Io { .. }
            | ServerError::Internal(_) => Code::Internal,
        }
    }

    /// The `reason` label of `vcid_batches_rejected_total` for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ServerError::RunNotFound(_) => "unknown_run",
            ServerError::Invalid { .. } | ServerError::Stats(_) => "invalid_argument",
            ServerError::RunConflict { .. } => "already_exists",
            ServerError::EpochClosed { .. } | ServerError::NoOpenEpoch { .. } => "epoch_closed",
            ServerError::SequenceGaps { .. } => "sequence_gaps",
            ServerError::RunFinished { .. } | ServerError::OpenEpochsAtFinish { .. } => {
                "run_finished"
            }
            ServerError::EpochLost { .. } => "epoch_lost",
            ServerError::BudgetExceeded { .. } => "memory_budget",
            ServerError::TooManyRows { .. } | ServerError::MessageTooLarge { .. } => "too_large",
            ServerError::Unauthenticated(_) => "unauthenticated",
            ServerError::PushAborted { source, .. } => source.reason(),
            ServerError::ShuttingDown(_) => "shutting_down",
            ServerError::WatchLagged(_)
            | ServerError::Metrics(_)
            | ServerError::Store(_)
            | ServerError::Io { .. }
            | ServerError::Internal(_) => "internal",
        }
    }

    /// The reasons a rejected batch is counted under, so each counter
    /// starts at zero (rates work from the first rejection). Calls refused
    /// by the auth interceptor never reach a handler and are not counted.
    pub const REASONS: &'static [&'static str] = &[
        "unknown_run",
        "invalid_argument",
        "already_exists",
        "epoch_closed",
        "sequence_gaps",
        "run_finished",
        "epoch_lost",
        "memory_budget",
        "too_large",
        "shutting_down",
        "internal",
    ];
}

impl From<ServerError> for tonic::Status {
    fn from(err: ServerError) -> Self {
        tonic::Status::new(err.code(), err.to_string())
    }
}
