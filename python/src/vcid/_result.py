"""Plain result types returned by the Monitor (``EpochResult``,
``PushSummary``, ``RunInfo``) and their conversion from the wire messages.
Must not hold any logic beyond that conversion."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .v1 import vcid_pb2 as pb

_OPTIONAL_METRICS = (
    "vci", "linear_probe_mse", "nc1", "cdnv", "class_separation", "equinorm",
    "equiangularity", "effective_rank", "vci_delta",
)


@dataclass(frozen=True)
class EpochResult:
    """The metrics of one closed (run, split, layer, epoch); SPEC §2.7.

    A metric is ``None`` when it is undefined for this epoch, and
    ``notes[name]`` says why (e.g. fewer than two classes observed).
    """

    run_id: str
    split: str
    layer: str
    epoch: int
    samples: int
    classes_observed: int
    feature_dim: int
    vci: Optional[float]
    linear_probe_mse: Optional[float]
    nc1: Optional[float]
    cdnv: Optional[float]
    class_separation: Optional[float]
    equinorm: Optional[float]
    equiangularity: Optional[float]
    effective_rank: Optional[float]
    vci_delta: Optional[float]
    rank_total: int
    rank_between: int
    small_sample: bool
    notes: Dict[str, str] = field(default_factory=dict)
    close_seconds: float = 0.0
    closed_unix_ms: int = 0

    @property
    def closed_at(self) -> _dt.datetime:
        """The close timestamp as an aware UTC datetime."""
        return _dt.datetime.fromtimestamp(self.closed_unix_ms / 1000, tz=_dt.timezone.utc)

    @classmethod
    def from_proto(cls, msg: pb.EpochResult) -> "EpochResult":
        metrics = {
            name: (getattr(msg, name) if msg.HasField(name) else None)
            for name in _OPTIONAL_METRICS
        }
        return cls(
            run_id=msg.run_id, split=msg.split, layer=msg.layer, epoch=msg.epoch,
            samples=msg.samples, classes_observed=msg.classes_observed,
            feature_dim=msg.feature_dim, rank_total=msg.rank_total,
            rank_between=msg.rank_between, small_sample=msg.small_sample,
            notes=dict(msg.notes), close_seconds=msg.close_seconds,
            closed_unix_ms=msg.closed_unix_ms, **metrics,
        )


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
    split: str
    layer: str
    epoch: int
    samples: int


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
            open_epochs=[OpenEpoch(o.split, o.layer, o.epoch, o.samples)
                         for o in msg.open_epochs],
            closed_epochs=msg.closed_epochs,
            finished=msg.finished, finished_unix_ms=msg.finished_unix_ms,
        )
