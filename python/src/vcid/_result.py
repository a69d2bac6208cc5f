"""Plain result types returned by the Monitor (``EpochResult``,
``PushSummary``, ``RunInfo``) and their conversion from the wire messages.
Must not hold any logic beyond that conversion."""

from __future__ import annotations

import collections.abc as _abc
import dataclasses as _dc
import datetime as _dt
import json as _json
from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .v1 import vcid_pb2 as pb


def _is_metric(f: FieldDescriptor) -> bool:
    """The metrics are the ``optional double`` fields (absent = undefined)."""
    return f.has_presence and f.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE


def _plain(msg: Message, f: FieldDescriptor) -> Any:
    """A field's value as a plain Python value: None for an absent field with
    presence, a dict for a map, a list for a repeated field."""
    if f.has_presence and not msg.HasField(f.name):
        return None
    value = getattr(msg, f.name)
    if isinstance(value, _abc.Mapping):
        return dict(value)
    if isinstance(value, _abc.Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return value


def _dataclass_field(f: FieldDescriptor) -> Tuple[str, Any, Any]:
    """(name, type, default) of the message field: its default is the
    message's, the metrics are typed Optional[float]."""
    default = _plain(pb.EpochResult(), f)
    if _is_metric(f):
        return f.name, Optional[float], field(default=None)
    if isinstance(default, (dict, list)):
        return f.name, type(default), field(default_factory=type(default))
    return f.name, Any if default is None else type(default), field(default=default)


#: The metric names, in wire order: the ``optional double`` fields of the
#: ``EpochResult`` message.
METRICS: Tuple[str, ...] = tuple(
    f.name for f in pb.EpochResult.DESCRIPTOR.fields if _is_metric(f))

# Every field of the message, in wire order.
_EpochResultFields = make_dataclass(
    "_EpochResultFields", [_dataclass_field(f) for f in pb.EpochResult.DESCRIPTOR.fields],
    frozen=True)


@dataclass(frozen=True)
class EpochResult(_EpochResultFields):  # type: ignore[misc,valid-type]
    """The metrics of one closed (run, split, layer, epoch).

    Its fields are those of the wire message ``vcid.v1.EpochResult``, in the
    same order and under the same names (so a field added to the proto
    appears here by itself): ``run_id``, ``split``, ``layer``, ``epoch``,
    ``samples``, ``classes_observed``, ``feature_dim``, the metrics
    (``METRICS``: ``vci``, ``linear_probe_mse``, ``nc1``, ``cdnv``, ...),
    ``rank_total``, ``rank_between``, ``small_sample``, ``notes``,
    ``close_seconds`` and ``closed_unix_ms``.

    A metric is ``None`` when it is undefined for this epoch, and
    ``notes[name]`` says why (e.g. fewer than two classes observed).
    """

    METRICS: ClassVar[Tuple[str, ...]] = METRICS

    @property
    def closed_at(self) -> _dt.datetime:
        """The close timestamp as an aware UTC datetime."""
        return _dt.datetime.fromtimestamp(self.closed_unix_ms / 1000, tz=_dt.timezone.utc)

    @classmethod
    def from_proto(cls, msg: pb.EpochResult) -> "EpochResult":
        return cls(**{f.name: _plain(msg, f) for f in msg.DESCRIPTOR.fields})

    @classmethod
    def from_metrics_json(cls, document: str) -> "EpochResult":
        """A result from the JSON of ``vcid compute --format json`` (the
        metrics, counts, ranks, ``small_sample`` and ``notes``); the fields
        it lacks keep their defaults."""
        values = _json.loads(document)
        names = {f.name for f in _dc.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> Dict[str, Any]:
        """Every field as a plain ``dict`` (``notes`` copied), e.g. for
        ``wandb.log``, ``json.dumps`` or a pandas row; undefined metrics are
        None."""
        return _dc.asdict(self)


@dataclass(frozen=True)
class PushSummary:
    """What the daemon confirmed: batches and rows applied, and how many
    batches it skipped as already applied (resends after a reconnect)."""

    batches_applied: int = 0
    rows_applied: int = 0
    duplicates: int = 0

    def __add__(self, other: "PushSummary") -> "PushSummary":
        return PushSummary(
            self.batches_applied + other.batches_applied,
            self.rows_applied + other.rows_applied,
            self.duplicates + other.duplicates,
        )

    @classmethod
    def from_proto(cls, msg: pb.PushSummary) -> "PushSummary":
        return cls(msg.batches_applied, msg.rows_applied, msg.duplicates)


@dataclass(frozen=True)
class OpenEpoch:
    """An epoch still accumulating: its samples, and how many of them the
    daemon's last checkpoint of it holds (``durable_samples``, written at
    ``durable_unix_ms``; 0 before its first checkpoint)."""

    split: str
    layer: str
    epoch: int
    samples: int
    durable_samples: int = 0
    durable_unix_ms: int = 0


@dataclass(frozen=True)
class RunInfo:
    """A run as the daemon knows it (``GetRun``)."""

    run_id: str
    num_classes: int
    feature_dim: int
    metadata: Dict[str, str]
    created_unix_ms: int
    rows_ingested: int
    open_epochs: List[OpenEpoch]
    closed_epochs: int
    finished: bool = False
    finished_unix_ms: int = 0

    @classmethod
    def from_proto(cls, msg: pb.Run) -> "RunInfo":
        return cls(
            run_id=msg.run_id, num_classes=msg.num_classes, feature_dim=msg.feature_dim,
            metadata=dict(msg.metadata), created_unix_ms=msg.created_unix_ms,
            rows_ingested=msg.rows_ingested,
            open_epochs=[OpenEpoch(o.split, o.layer, o.epoch, o.samples, o.durable_samples,
                                   o.durable_unix_ms) for o in msg.open_epochs],
            closed_epochs=msg.closed_epochs,
            finished=msg.finished, finished_unix_ms=msg.finished_unix_ms,
        )
