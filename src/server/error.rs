//! The daemon's one error type, [`ServerError`], and its one mapping to a
//! gRPC status (`impl From<ServerError> for tonic::Status`): code, message
//! and the structured `google.rpc` details (README "Errors").
//!
//! Every variant's message names the field, the expected value and the
//! received value, and the variant carries them as data, from which the
//! details are built: `BadRequest` (the field) for INVALID_ARGUMENT,
//! `ResourceInfo` (the run) for NOT_FOUND and ALREADY_EXISTS, `QuotaFailure`
//! (the limit) for RESOURCE_EXHAUSTED. Nothing else in the server builds a
//! `tonic::Status` from scratch; handlers return `ServerError` and convert.
//! The `reason` labels of `vcid_batches_rejected_total` are the one
//! [`Reason`] table.

use tonic_types::{BadRequest, ErrorDetail, QuotaFailure, QuotaViolation, ResourceInfo, StatusExt};

use crate::metrics::MetricsError;
use crate::stats::StatsError;

use super::store::StoreError;

/// Why a request (or the daemon) failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No run with that id (NOT_FOUND).
    #[error("run_id: expected an existing run, received {} (no such run)", shown(.0))]
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

    /// Close of an epoch restored after an unclean stop while some writers
    /// whose batches after its last checkpoint died with the process have
    /// not resent them (DATA_LOSS; see `state::marker`).
    #[error(
        "epoch: expected every writer whose batches of epoch {epoch} of stream {stream} died \
         with an earlier daemon process to have resent them, received nothing yet from: \
         {writers}. The epoch stays open: resend those batches (a live vcid client does when \
         it reconnects) and close again, or push the epoch's data again under a new epoch \
         number"
    )]
    WritersMissing {
        stream: String,
        epoch: u64,
        writers: String,
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

    /// A message whose in-flight charge exceeds the whole
    /// `--max-inflight-bytes` budget (RESOURCE_EXHAUSTED): it could never
    /// be received.
    #[error(
        "message size: a message of {len} bytes holds up to {charge} bytes while it is received, \
         decoded and applied; expected at most {limit} bytes (--max-inflight-bytes)"
    )]
    InflightTooLarge { len: u64, charge: u64, limit: u64 },

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

    /// The run was deleted while one of its epochs was being closed
    /// (NOT_FOUND): the result was discarded, and a run created since
    /// under the same id is another run, left untouched.
    #[error(
        "run_id: expected the run {} in which epoch {epoch} of stream {stream} was being \
         closed, received a run deleted during the close; its result was discarded (a run \
         created since under that id is another run and was not touched)",
        shown(.run_id)
    )]
    RunDeletedDuringClose {
        run_id: String,
        stream: String,
        epoch: u64,
    },

    /// Closing an epoch failed after it was taken out of the open set (its
    /// metrics or its storage): it was given back whole (code: the
    /// source's).
    #[error(
        "{source}; epoch {epoch} of stream {stream} stays open with its {samples} samples \
         and can be closed again"
    )]
    CloseFailed {
        stream: String,
        epoch: u64,
        samples: u64,
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
    #[error(transparent)]
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

/// Longest name echoed whole into an error message.
const SHOWN_MAX: usize = 64;

/// `value` quoted for an error message; longer than 64 bytes, its start and
/// its length (`"abc…" (10000 bytes)`), so an error never grows with what a
/// client sent (a long echo would exceed clients' metadata limits and hide
/// the real error).
pub(crate) fn shown(value: &str) -> String {
    if value.len() <= SHOWN_MAX {
        return format!("{value:?}");
    }
    let mut end = SHOWN_MAX - 16;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
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

    /// The gRPC status code of this error (README "Errors").
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ServerError::RunNotFound(_) | ServerError::RunDeletedDuringClose { .. } => {
                Code::NotFound
            }
            ServerError::Invalid { .. } | ServerError::Stats(_) => Code::InvalidArgument,
            ServerError::RunConflict { .. } => Code::AlreadyExists,
            ServerError::EpochClosed { .. }
            | ServerError::NoOpenEpoch { .. }
            | ServerError::SequenceGaps { .. }
            | ServerError::RunFinished { .. }
            | ServerError::OpenEpochsAtFinish { .. } => Code::FailedPrecondition,
            ServerError::BudgetExceeded { .. }
            | ServerError::TooManyRows { .. }
            | ServerError::MessageTooLarge { .. }
            | ServerError::InflightTooLarge { .. } => Code::ResourceExhausted,
            ServerError::EpochLost { .. } | ServerError::WritersMissing { .. } => Code::DataLoss,
            ServerError::Unauthenticated(_) => Code::Unauthenticated,
            ServerError::PushAborted { source, .. } | ServerError::CloseFailed { source, .. } => {
                source.code()
            }
            ServerError::ShuttingDown(_) => Code::Unavailable,
            ServerError::WatchLagged(_) => Code::Aborted,
            ServerError::Metrics(_)
            | ServerError::Store(_)
            | ServerError::Io { .. }
            | ServerError::Internal(_) => Code::Internal,
        }
    }

    /// The `reason` label under which `vcid_batches_rejected_total` counts
    /// this error; `None` for errors no batch can get (a refused token,
    /// answered by the auth interceptor before any handler, and a
    /// `CreateRun` conflict).
    pub fn reason(&self) -> Option<Reason> {
        Some(match self {
            ServerError::RunNotFound(_) | ServerError::RunDeletedDuringClose { .. } => {
                Reason::UnknownRun
            }
            ServerError::Invalid { .. } | ServerError::Stats(_) => Reason::InvalidArgument,
            ServerError::RunConflict { .. } | ServerError::Unauthenticated(_) => return None,
            ServerError::EpochClosed { .. } | ServerError::NoOpenEpoch { .. } => {
                Reason::EpochClosed
            }
            ServerError::SequenceGaps { .. } => Reason::SequenceGaps,
            ServerError::RunFinished { .. } | ServerError::OpenEpochsAtFinish { .. } => {
                Reason::RunFinished
            }
            ServerError::EpochLost { .. } | ServerError::WritersMissing { .. } => Reason::EpochLost,
            ServerError::BudgetExceeded { .. } => Reason::MemoryBudget,
            ServerError::TooManyRows { .. }
            | ServerError::MessageTooLarge { .. }
            | ServerError::InflightTooLarge { .. } => Reason::TooLarge,
            ServerError::PushAborted { source, .. } | ServerError::CloseFailed { source, .. } => {
                return source.reason()
            }
            ServerError::ShuttingDown(_) => Reason::ShuttingDown,
            ServerError::WatchLagged(_)
            | ServerError::Metrics(_)
            | ServerError::Store(_)
            | ServerError::Io { .. }
            | ServerError::Internal(_) => Reason::Internal,
        })
    }

    /// tonic refuses a message above `--max-message-bytes` with OUT_OF_RANGE
    /// ("... message length too large ...") before any handler sees it; the
    /// API answers RESOURCE_EXHAUSTED with the limit. This is the one place
    /// that recognises tonic's status (a unary refusal is remapped on its
    /// way out, a streamed one in `Push`).
    pub fn from_oversized(status: &tonic::Status, max: usize) -> Option<ServerError> {
        (status.code() == tonic::Code::OutOfRange && status.message().contains("too large")).then(
            || ServerError::MessageTooLarge {
                max,
                detail: status.message().to_owned(),
            },
        )
    }

    /// The structured detail of this error (README "Errors"), if it has one.
    fn detail(&self) -> Option<ErrorDetail> {
        let quota = |subject: String, description: String, setting: &str, limit: u64| {
            QuotaFailure::new(vec![QuotaViolation {
                quota_id: setting.to_owned(),
                quota_value: i64::try_from(limit).unwrap_or(i64::MAX),
                ..QuotaViolation::new(subject, description)
            }])
            .into()
        };
        match self {
            ServerError::RunNotFound(run_id) => {
                Some(ResourceInfo::new("run", run_id, "", "no such run").into())
            }
            ServerError::RunDeletedDuringClose { run_id, .. } => Some(
                ResourceInfo::new("run", run_id, "", "deleted while an epoch was being closed")
                    .into(),
            ),
            ServerError::RunConflict {
                run_id,
                expected_k,
                expected_d,
                ..
            } => Some(
                ResourceInfo::new(
                    "run",
                    run_id,
                    "",
                    format!("exists with num_classes={expected_k}, feature_dim={expected_d}"),
                )
                .into(),
            ),
            ServerError::Invalid {
                field,
                expected,
                received,
            } => Some(
                BadRequest::with_violation(field, format!("expected {expected}, received {received}"))
                    .into(),
            ),
            ServerError::Stats(err) => {
                let field = stats_field(err);
                let text = err.to_string();
                let description = text.strip_prefix(&format!("{field}: ")).unwrap_or(&text);
                Some(BadRequest::with_violation(field, description).into())
            }
            ServerError::BudgetExceeded {
                run_id,
                needed,
                in_use,
                budget,
                ..
            } => Some(quota(
                format!("run:{run_id}"),
                format!(
                    "an accumulator needs {needed} bytes; {in_use} of the {budget}-byte budget are in use"
                ),
                "max_accumulator_bytes",
                *budget,
            )),
            ServerError::TooManyRows { rows, max } => Some(quota(
                "rows".into(),
                format!("{rows} rows in one batch, at most {max} allowed"),
                "max_batch_rows",
                u64::from(*max),
            )),
            ServerError::MessageTooLarge { max, .. } => Some(quota(
                "message".into(),
                format!("a message above {max} bytes"),
                "max_message_bytes",
                *max as u64,
            )),
            ServerError::InflightTooLarge { len, charge, limit } => Some(quota(
                "message".into(),
                format!("a message of {len} bytes holds up to {charge} bytes in flight"),
                "max_inflight_bytes",
                *limit,
            )),
            ServerError::PushAborted { source, .. } | ServerError::CloseFailed { source, .. } => {
                source.detail()
            }
            ServerError::RunFinished {
                run_id,
                finished_at,
            } => Some(
                ResourceInfo::new("run", run_id, "", format!("finished at {finished_at}")).into(),
            ),
            ServerError::EpochClosed { .. }
            | ServerError::OpenEpochsAtFinish { .. }
            | ServerError::NoOpenEpoch { .. }
            | ServerError::EpochLost { .. }
            | ServerError::WritersMissing { .. }
            | ServerError::SequenceGaps { .. }
            | ServerError::Unauthenticated(_)
            | ServerError::ShuttingDown(_)
            | ServerError::WatchLagged(_)
            | ServerError::Metrics(_)
            | ServerError::Store(_)
            | ServerError::Io { .. }
            | ServerError::Internal(_) => None,
        }
    }
}

/// The request field a [`StatsError`] is about, as its message names it.
fn stats_field(err: &StatsError) -> String {
    match err {
        StatsError::EmptyBatch => "rows".into(),
        StatsError::NoFeatures => "feature_dim".into(),
        StatsError::LabelCount { .. } => "labels".into(),
        StatsError::LabelOutOfRange { row, .. } => format!("labels[{row}]"),
        StatsError::NonFinite { row, column, .. } => format!("features[{row}][{column}]"),
        StatsError::ShapeMismatch { field, .. } | StatsError::InvalidPart { field, .. } => {
            (*field).to_owned()
        }
    }
}

/// Declares [`Reason`] and its [`Reason::ALL`] from one list of
/// `variant => label` rows, so the list of labels cannot drift from the
/// enum.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $label:literal,)+) => {
        /// The `reason` label of `vcid_batches_rejected_total`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[$doc])* $variant,)+
        }

        impl Reason {
            /// Every reason, so each counter is exported from zero (rates
            /// work from the first rejection).
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)+];

            /// The label value.
            pub fn label(self) -> &'static str {
                match self {
                    $(Reason::$variant => $label,)+
                }
            }
        }
    };
}

reasons! {
    /// No such run (NOT_FOUND).
    UnknownRun => "unknown_run",
    /// A bad field (INVALID_ARGUMENT).
    InvalidArgument => "invalid_argument",
    /// An epoch closed, being closed or never opened (FAILED_PRECONDITION).
    EpochClosed => "epoch_closed",
    /// Too many gaps in a writer's sequence numbers (FAILED_PRECONDITION).
    SequenceGaps => "sequence_gaps",
    /// A push or an epoch of a run marked finished (FAILED_PRECONDITION).
    RunFinished => "run_finished",
    /// An epoch whose statistics died with the daemon (DATA_LOSS).
    EpochLost => "epoch_lost",
    /// The accumulator memory budget (RESOURCE_EXHAUSTED).
    MemoryBudget => "memory_budget",
    /// A message or batch above its limit (RESOURCE_EXHAUSTED).
    TooLarge => "too_large",
    /// The daemon is stopping (UNAVAILABLE).
    ShuttingDown => "shutting_down",
    /// Anything else.
    Internal => "internal",
}

impl From<ServerError> for tonic::Status {
    fn from(err: ServerError) -> Self {
        let code = err.code();
        match err.detail() {
            Some(detail) => tonic::Status::with_error_details_vec(code, err.to_string(), [detail]),
            None => tonic::Status::new(code, err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_messages_start_with_their_field() {
        let errors = [
            StatsError::EmptyBatch,
            StatsError::NoFeatures,
            StatsError::LabelCount {
                expected: 3,
                received: 2,
            },
            StatsError::LabelOutOfRange {
                row: 4,
                label: 9,
                num_classes: 3,
            },
            StatsError::NonFinite {
                row: 1,
                column: 2,
                value: f64::NAN,
            },
            StatsError::ShapeMismatch {
                field: "feature_dim",
                expected: 2,
                received: 3,
            },
            StatsError::InvalidPart {
                field: "scatter",
                expected: "4 values".into(),
                received: "3".into(),
            },
        ];
        for err in errors {
            let field = stats_field(&err);
            let status = tonic::Status::from(ServerError::Stats(err.clone()));
            assert!(
                status.message().starts_with(&format!("{field}: expected ")),
                "{field} / {}",
                status.message()
            );
            let violations = status.get_details_bad_request().unwrap().field_violations;
            assert_eq!(violations.len(), 1);
            assert_eq!(violations[0].field, field);
            assert!(
                violations[0].description.starts_with("expected "),
                "{err:?}: {}",
                violations[0].description
            );
        }
    }

    #[test]
    fn metrics_errors_are_not_prefixed_twice() {
        let err = ServerError::from(MetricsError::Eigen(crate::linalg::EigenError { order: 3 }));
        let text = err.to_string();
        assert_eq!(
            text.matches("computing the metrics failed").count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn a_failed_close_says_once_why_and_that_the_epoch_stays_open() {
        let source = MetricsError::Eigen(crate::linalg::EigenError { order: 3 });
        let err = ServerError::CloseFailed {
            stream: "r/train/penultimate".into(),
            epoch: 3,
            samples: 100,
            source: Box::new(source.into()),
        };
        assert_eq!(err.code(), tonic::Code::Internal);
        let text = err.to_string();
        assert_eq!(
            text.matches("computing the metrics failed").count(),
            1,
            "{text}"
        );
        assert!(
            text.ends_with(
                "; epoch 3 of stream r/train/penultimate stays open with its 100 samples and \
                 can be closed again"
            ),
            "{text}"
        );
    }

    #[test]
    fn oversized_is_recognised_only_for_tonics_refusal() {
        let refusal = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        );
        let err = ServerError::from_oversized(&refusal, 4096).expect("recognised");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.to_string().contains("found 5000 bytes"), "{err}");
        let other = tonic::Status::out_of_range("epoch out of range");
        assert!(ServerError::from_oversized(&other, 4096).is_none());
        let large = tonic::Status::invalid_argument("too large");
        assert!(ServerError::from_oversized(&large, 4096).is_none());
    }
}
