from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_FLOAT32: _ClassVar[Encoding]
    ENCODING_FLOAT16: _ClassVar[Encoding]
    ENCODING_BFLOAT16: _ClassVar[Encoding]
ENCODING_FLOAT32: Encoding
ENCODING_FLOAT16: Encoding
ENCODING_BFLOAT16: Encoding

class CreateRunRequest(_message.Message):
    __slots__ = ("run_id", "num_classes", "feature_dim", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    num_classes: int
    feature_dim: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "num_classes", "feature_dim", "metadata", "created_unix_ms", "rows_ingested", "open_epochs", "closed_epochs", "finished", "finished_unix_ms")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROWS_INGESTED_FIELD_NUMBER: _ClassVar[int]
    OPEN_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    num_classes: int
    feature_dim: int
    metadata: _containers.ScalarMap[str, str]
    created_unix_ms: int
    rows_ingested: int
    open_epochs: _containers.RepeatedCompositeFieldContainer[OpenEpoch]
    closed_epochs: int
    finished: bool
    finished_unix_ms: int
    def __init__(self, run_id: _Optional[str] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_unix_ms: _Optional[int] = ..., rows_ingested: _Optional[int] = ..., open_epochs: _Optional[_Iterable[_Union[OpenEpoch, _Mapping]]] = ..., closed_epochs: _Optional[int] = ..., finished: bool = ..., finished_unix_ms: _Optional[int] = ...) -> None: ...

class OpenEpoch(_message.Message):
    __slots__ = ("split", "layer", "epoch", "samples", "durable_samples", "durable_unix_ms")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DURABLE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    split: str
    layer: str
    epoch: int
    samples: int
    durable_samples: int
    durable_unix_ms: int
    def __init__(self, split: _Optional[str] = ..., layer: _Optional[str] = ..., epoch: _Optional[int] = ..., samples: _Optional[int] = ..., durable_samples: _Optional[int] = ..., durable_unix_ms: _Optional[int] = ...) -> None: ...

class FeatureBatch(_message.Message):
    __slots__ = ("run_id", "split", "layer", "epoch", "rows", "features", "encoding", "labels", "writer_id", "sequence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    split: str
    layer: str
    epoch: int
    rows: int
    features: bytes
    encoding: Encoding
    labels: _containers.RepeatedScalarFieldContainer[int]
    writer_id: str
    sequence: int
    def __init__(self, run_id: _Optional[str] = ..., split: _Optional[str] = ..., layer: _Optional[str] = ..., epoch: _Optional[int] = ..., rows: _Optional[int] = ..., features: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., labels: _Optional[_Iterable[int]] = ..., writer_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class PushSummary(_message.Message):
    __slots__ = ("batches_applied", "rows_applied", "duplicates", "durable_through", "incarnation")
    BATCHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    ROWS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DURABLE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    batches_applied: int
    rows_applied: int
    duplicates: int
    durable_through: int
    incarnation: int
    def __init__(self, batches_applied: _Optional[int] = ..., rows_applied: _Optional[int] = ..., duplicates: _Optional[int] = ..., durable_through: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("run_id", "writer_id", "force")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    writer_id: str
    force: bool
    def __init__(self, run_id: _Optional[str] = ..., writer_id: _Optional[str] = ..., force: bool = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("durable_through", "incarnation", "epochs_written")
    DURABLE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    durable_through: int
    incarnation: int
    epochs_written: int
    def __init__(self, durable_through: _Optional[int] = ..., incarnation: _Optional[int] = ..., epochs_written: _Optional[int] = ...) -> None: ...

class StatsBlock(_message.Message):
    __slots__ = ("run_id", "split", "layer", "epoch", "class_counts", "class_means", "scatter", "within_trace", "unit_sum", "unit_count", "writer_id", "sequence", "unit_within_trace")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_MEANS_FIELD_NUMBER: _ClassVar[int]
    SCATTER_FIELD_NUMBER: _ClassVar[int]
    WITHIN_TRACE_FIELD_NUMBER: _ClassVar[int]
    UNIT_SUM_FIELD_NUMBER: _ClassVar[int]
    UNIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UNIT_WITHIN_TRACE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    split: str
    layer: str
    epoch: int
    class_counts: _containers.RepeatedScalarFieldContainer[int]
    class_means: _containers.RepeatedScalarFieldContainer[float]
    scatter: _containers.RepeatedScalarFieldContainer[float]
    within_trace: _containers.RepeatedScalarFieldContainer[float]
    unit_sum: _containers.RepeatedScalarFieldContainer[float]
    unit_count: _containers.RepeatedScalarFieldContainer[int]
    writer_id: str
    sequence: int
    unit_within_trace: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, run_id: _Optional[str] = ..., split: _Optional[str] = ..., layer: _Optional[str] = ..., epoch: _Optional[int] = ..., class_counts: _Optional[_Iterable[int]] = ..., class_means: _Optional[_Iterable[float]] = ..., scatter: _Optional[_Iterable[float]] = ..., within_trace: _Optional[_Iterable[float]] = ..., unit_sum: _Optional[_Iterable[float]] = ..., unit_count: _Optional[_Iterable[int]] = ..., writer_id: _Optional[str] = ..., sequence: _Optional[int] = ..., unit_within_trace: _Optional[_Iterable[float]] = ...) -> None: ...

class CloseEpochRequest(_message.Message):
    __slots__ = ("run_id", "split", "layer", "epoch")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    split: str
    layer: str
    epoch: int
    def __init__(self, run_id: _Optional[str] = ..., split: _Optional[str] = ..., layer: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class EpochResult(_message.Message):
    __slots__ = ("run_id", "split", "layer", "epoch", "samples", "classes_observed", "feature_dim", "vci", "linear_probe_mse", "nc1", "cdnv", "class_separation", "equinorm", "equiangularity", "effective_rank", "vci_delta", "rank_total", "rank_between", "small_sample", "notes", "close_seconds", "closed_unix_ms")
    class NotesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_OBSERVED_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    VCI_FIELD_NUMBER: _ClassVar[int]
    LINEAR_PROBE_MSE_FIELD_NUMBER: _ClassVar[int]
    NC1_FIELD_NUMBER: _ClassVar[int]
    CDNV_FIELD_NUMBER: _ClassVar[int]
    CLASS_SEPARATION_FIELD_NUMBER: _ClassVar[int]
    EQUINORM_FIELD_NUMBER: _ClassVar[int]
    EQUIANGULARITY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RANK_FIELD_NUMBER: _ClassVar[int]
    VCI_DELTA_FIELD_NUMBER: _ClassVar[int]
    RANK_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RANK_BETWEEN_FIELD_NUMBER: _ClassVar[int]
    SMALL_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    CLOSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    split: str
    layer: str
    epoch: int
    samples: int
    classes_observed: int
    feature_dim: int
    vci: float
    linear_probe_mse: float
    nc1: float
    cdnv: float
    class_separation: float
    equinorm: float
    equiangularity: float
    effective_rank: float
    vci_delta: float
    rank_total: int
    rank_between: int
    small_sample: bool
    notes: _containers.ScalarMap[str, str]
    close_seconds: float
    closed_unix_ms: int
    def __init__(self, run_id: _Optional[str] = ..., split: _Optional[str] = ..., layer: _Optional[str] = ..., epoch: _Optional[int] = ..., samples: _Optional[int] = ..., classes_observed: _Optional[int] = ..., feature_dim: _Optional[int] = ..., vci: _Optional[float] = ..., linear_probe_mse: _Optional[float] = ..., nc1: _Optional[float] = ..., cdnv: _Optional[float] = ..., class_separation: _Optional[float] = ..., equinorm: _Optional[float] = ..., equiangularity: _Optional[float] = ..., effective_rank: _Optional[float] = ..., vci_delta: _Optional[float] = ..., rank_total: _Optional[int] = ..., rank_between: _Optional[int] = ..., small_sample: bool = ..., notes: _Optional[_Mapping[str, str]] = ..., close_seconds: _Optional[float] = ..., closed_unix_ms: _Optional[int] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("run_id", "split", "layer")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    split: str
    layer: str
    def __init__(self, run_id: _Optional[str] = ..., split: _Optional[str] = ..., layer: _Optional[str] = ...) -> None: ...

class History(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EpochResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EpochResult, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("run_id", "split", "layer")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    split: str
    layer: str
    def __init__(self, run_id: _Optional[str] = ..., split: _Optional[str] = ..., layer: _Optional[str] = ...) -> None: ...
