"""``LocalAccumulator`` and ``compute``: the exact class statistics and the
metrics of features in this process, computed by the vcid crate itself (the
``vcid._native`` extension: the daemon's ``stats`` and ``metrics`` code).

Owns the Python face of the statistics: argument conversion (numpy arrays,
tensors, anything with ``__array__``), the checks of types and shapes, the
numpy views of the statistics and the wire form. Must not implement any
formula or any validity check of statistics: both live in the Rust crate
(``Accumulator::from_parts`` is the one check that ``PushStats`` applies
too). Must not talk to the daemon; ``Monitor.push_stats`` sends an
accumulator.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from . import _native
from ._arrays import check_features, check_labels, to_numpy
from ._errors import ArgumentError
from ._result import EpochResult
from .v1 import vcid_pb2 as pb


def _check_shape_args(num_classes: Any, feature_dim: Any) -> tuple[int, int]:
    for name, value, lo in (("num_classes", num_classes, 2), ("feature_dim", feature_dim, 1)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ArgumentError(
                name, f"expected an integer >= {lo}, received {type(value).__name__} {value!r}"
            )
        if not lo <= int(value) < 2**32:
            raise ArgumentError(name, f"expected an integer in [{lo}, 2**32), received {value}")
    return int(num_classes), int(feature_dim)


def _float64(features: Any, feature_dim: Optional[int]) -> np.ndarray:
    """A checked 2-D batch as C-contiguous float64 (values as given: unlike
    ``Monitor.push`` nothing is rounded to a wire encoding); ``feature_dim``
    None takes the columns of ``features``."""
    f = to_numpy(features, "features")
    if feature_dim is None:
        if f.array.ndim != 2:
            raise ArgumentError("features", f"expected a 2-D array (rows, feature_dim), "
                                            f"received shape {tuple(f.array.shape)}")
        feature_dim = f.array.shape[1]
    f = check_features(f, feature_dim)
    return np.ascontiguousarray(f.as_float(), dtype=np.float64)


def compute(features: Any, labels: Any, num_classes: Optional[int] = None) -> EpochResult:
    """The metrics of ``features`` (rows × d) with their class ``labels``,
    computed in this process (no daemon): the numbers ``vcid compute`` gives
    for the same arrays saved as ``.npy``, and the daemon for one epoch of
    them.

    ``features`` may be a numpy array, a torch tensor (any device, any float
    dtype) or anything with ``__array__``; ``labels`` integers in ``[0,
    num_classes)``. ``num_classes`` defaults to the largest label + 1. The
    result's ``run_id``, ``split`` and ``layer`` are empty and ``vci_delta``
    is None (there is no previous epoch).
    """
    x = _float64(features, None)
    if num_classes is None:
        raw = to_numpy(labels, "labels").array
        if raw.ndim == 1 and raw.size and raw.dtype.kind in "iu":
            num_classes = max(int(raw.max()) + 1, 1)
        else:
            num_classes = 1  # check_labels below names the problem
    elif isinstance(num_classes, (bool, np.bool_)) or not isinstance(
            num_classes, (int, np.integer)) or not 1 <= int(num_classes) < 2**32:
        raise ArgumentError("num_classes", f"expected an integer in [1, 2**32) or None, "
                                           f"received {num_classes!r}")
    y = check_labels(labels, x.shape[0], int(num_classes))
    return EpochResult.from_metrics_json(_native.compute(x, y, int(num_classes)))


class LocalAccumulator:
    """Exact single-pass class statistics of a stream of (features, labels),
    kept by the vcid crate's ``Accumulator`` (the daemon's own code).

    The statistics, in float64, as fresh numpy arrays: ``class_counts`` (K,
    uint64), ``class_means`` (K×d), ``scatter`` (d×d, the symmetric M2 =
    Σ (h−μ)(h−μ)ᵀ about the global mean), ``within_trace`` (K, Σ_{i∈k}
    ‖h_i−μ_k‖²), ``unit_sum`` (K×d, Σ u_i over rows with ‖h_i‖ > 0, u_i =
    h_i/‖h_i‖), ``unit_count`` (K, c_k) and ``unit_within_trace`` (K,
    Σ_{i∈k} ‖u_i − ū_k‖² with ū_k = unit_sum_k / c_k). Every batch is reduced
    about its own means and folded in with the Chan-Golub-LeVeque parallel
    formula, so neither the batch order nor the grouping (batches, ranks)
    changes the result beyond rounding, and a large common offset of the
    features costs no digits (docs/metrics.md#the-statistics-behind-them).

    ``metrics()`` gives the epoch's metrics without a daemon;
    ``Monitor.push_stats`` sends the statistics to one.
    """

    __slots__ = ("_acc",)

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        k, d = _check_shape_args(num_classes, feature_dim)
        self._acc = _native.Accumulator(k, d)

    @classmethod
    def _wrap(cls, acc: Any) -> "LocalAccumulator":
        out = cls.__new__(cls)
        out._acc = acc
        return out

    # -- shape and statistics ---------------------------------------------

    @property
    def num_classes(self) -> int:
        return self._acc.num_classes

    @property
    def feature_dim(self) -> int:
        return self._acc.feature_dim

    @property
    def samples(self) -> int:
        """N, the number of rows folded in."""
        return self._acc.samples

    @property
    def class_counts(self) -> np.ndarray:
        return self._acc.class_counts()

    @property
    def class_means(self) -> np.ndarray:
        return self._acc.class_means()

    @property
    def scatter(self) -> np.ndarray:
        return self._acc.scatter()

    @property
    def within_trace(self) -> np.ndarray:
        return self._acc.within_trace()

    @property
    def unit_sum(self) -> np.ndarray:
        return self._acc.unit_sum()

    @property
    def unit_count(self) -> np.ndarray:
        return self._acc.unit_count()

    @property
    def unit_within_trace(self) -> np.ndarray:
        """Σ_{i∈k} ‖u_i − ū_k‖² per class (K), the spread of the unit vectors
        about their class mean direction; 0 for classes with c_k = 0."""
        return self._acc.unit_within_trace()

    @property
    def global_mean(self) -> np.ndarray:
        """μ = Σ_k n_k μ_k / N (zeros while empty)."""
        return self._acc.global_mean()

    def __repr__(self) -> str:
        return (
            f"LocalAccumulator(num_classes={self.num_classes}, "
            f"feature_dim={self.feature_dim}, samples={self.samples})"
        )

    # -- folding data in ---------------------------------------------------

    def update(self, features: Any, labels: Any) -> "LocalAccumulator":
        """Fold in one batch (same inputs and checks as ``Monitor.push``);
        returns ``self``. The values are used as given, in float64: unlike
        ``push`` nothing is rounded to a wire encoding."""
        x = _float64(features, self.feature_dim)
        y = check_labels(labels, x.shape[0], self.num_classes)
        self._acc.fold(x, y)
        return self

    def merge(self, other: "LocalAccumulator") -> "LocalAccumulator":
        """Fold in another accumulator (exact Chan merge); returns ``self``."""
        if not isinstance(other, LocalAccumulator):
            raise ArgumentError(
                "other", f"expected a LocalAccumulator, received {type(other).__name__}"
            )
        if (other.num_classes, other.feature_dim) != (self.num_classes, self.feature_dim):
            raise ArgumentError(
                "other", f"expected num_classes={self.num_classes}, feature_dim="
                f"{self.feature_dim}, received num_classes={other.num_classes}, "
                f"feature_dim={other.feature_dim}"
            )
        self._acc.merge(other._acc)
        return self

    def copy(self) -> "LocalAccumulator":
        return LocalAccumulator._wrap(self._acc.copy())

    def __reduce__(self) -> tuple:
        """Pickled as its statistics (for ``all_gather_object``,
        multiprocessing, ``copy.deepcopy``), rebuilt through ``from_stats``."""
        return (LocalAccumulator.from_stats,
                (self.class_counts, self.class_means, self.scatter, self.within_trace,
                 self.unit_sum, self.unit_count, self.unit_within_trace))

    def metrics(self) -> EpochResult:
        """The metrics of the statistics so far (what the daemon returns when
        it closes an epoch holding them; ``run_id``, ``split`` and ``layer``
        are empty and ``vci_delta`` is None)."""
        return EpochResult.from_metrics_json(self._acc.metrics())

    # -- building from parts, data-parallel reduction ----------------------

    @classmethod
    def from_stats(
        cls,
        class_counts: Any,
        class_means: Any,
        scatter: Any,
        within_trace: Any,
        unit_sum: Any,
        unit_count: Any,
        unit_within_trace: Any = None,
    ) -> "LocalAccumulator":
        """An accumulator from the statistics (e.g. combined elsewhere).

        The statistics are checked by the same function the daemon applies to
        ``PushStats`` (``Accumulator::from_parts``, see the README's math-core notes): finite values, counts
        that are non-negative whole numbers, a symmetric ``scatter`` (to
        1e-12 of its largest diagonal entry; the two triangles are then
        averaged) with a non-negative diagonal, non-negative traces,
        ``unit_count`` ≤ ``class_counts``, ``0 ≤ unit_within_trace_k ≤
        unit_count_k``, and zero statistics for empty classes (zero unit
        sums and traces for classes without unit vectors). A failure raises
        ``vcid.ArgumentError`` naming the field.

        ``unit_within_trace`` may be omitted; it is then derived as
        c_k − ‖unit_sum_k‖²/c_k (what the daemon does with a block that lacks
        it), which loses digits when a class's directions nearly coincide, so
        ``class_separation`` is then less accurate. Combine it with the Chan
        correction instead (see ``all_reduce``) whenever you can.
        """
        counts = _as_counts(class_counts, "class_counts")
        k = counts.shape[0]
        means = np.asarray(class_means, dtype=np.float64)
        if means.ndim != 2 or means.shape[0] != k:
            raise ArgumentError(
                "class_means", f"expected shape ({k}, feature_dim), received {means.shape}"
            )
        d = means.shape[1]
        uwt = (np.zeros(0) if unit_within_trace is None
               else _as_float(unit_within_trace, "unit_within_trace", (k,)))
        return cls._wrap(_native.Accumulator.from_parts(
            k, d, counts, means.ravel(),
            _as_float(scatter, "scatter", (d, d)).ravel(),
            _as_float(within_trace, "within_trace", (k,)),
            _as_float(unit_sum, "unit_sum", (k, d)).ravel(),
            _as_counts(unit_count, "unit_count", k),
            uwt,
        ))

    def all_reduce(self, sum_fn: Callable[[np.ndarray], np.ndarray]) -> "LocalAccumulator":
        """Combine the accumulators of all data-parallel ranks, exactly.

        ``sum_fn(v)`` must return the element-wise sum of the float64 vector
        ``v`` over all ranks (e.g. a wrapper of ``torch.distributed.all_reduce``)
        and is called twice on every rank. Round 1 sums the class counts, the
        count-weighted class sums n_k·μ_k, the unit counts c_k and the unit
        sums, which give the global class means μ_k and mean directions
        ū_k = unit_sum_k / c_k. Round 2 sums each rank's second moments after
        the Chan correction towards those global values: S_r + n_r·δ_rδ_rᵀ
        with δ_r = μ_r − μ; W_rk + n_rk·‖μ_rk − μ_k‖²; and
        T_rk + c_rk·‖ū_rk − ū_k‖² for the unit-vector traces. The rounds and
        the corrections are computed by the vcid crate; only ``sum_fn`` runs
        here. Every rank returns the same combined accumulator, checked like
        ``from_stats``.
        """
        round1 = self._acc.reduce_round1()
        total1 = _summed(sum_fn, round1)
        total2 = _summed(sum_fn, self._acc.reduce_round2(total1))
        return LocalAccumulator._wrap(_native.Accumulator.reduce_combine(
            self.num_classes, self.feature_dim, total1, total2))

    def to_proto(self, run_id: str, split: str, layer: str, epoch: int,
                 writer_id: str = "", sequence: int = 0) -> pb.StatsBlock:
        """The wire form (``vcid.v1.StatsBlock``, ``unit_within_trace``
        included)."""
        return pb.StatsBlock(
            run_id=run_id, split=split, layer=layer, epoch=epoch,
            class_counts=self.class_counts.tolist(),
            class_means=self.class_means.ravel().tolist(),
            scatter=self.scatter.ravel().tolist(),
            within_trace=self.within_trace.tolist(),
            unit_sum=self.unit_sum.ravel().tolist(),
            unit_count=self.unit_count.tolist(),
            unit_within_trace=self.unit_within_trace.tolist(),
            writer_id=writer_id, sequence=sequence,
        )


def _summed(sum_fn: Callable[[np.ndarray], np.ndarray], v: np.ndarray) -> np.ndarray:
    total = np.ascontiguousarray(sum_fn(v.copy()), dtype=np.float64)
    if total.shape != v.shape:
        raise ArgumentError(
            "sum_fn", f"expected a vector of shape {v.shape}, received {total.shape}"
        )
    return total


def _as_counts(value: Any, name: str, k: int | None = None) -> np.ndarray:
    """Counts as uint64: integral values of any numeric dtype."""
    arr = np.asarray(value)
    if arr.ndim != 1 or (k is not None and arr.shape[0] != k):
        raise ArgumentError(name, f"expected shape ({k if k is not None else 'K'},), "
                                  f"received {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.rint(arr)):
            raise ArgumentError(name, f"expected integral counts, received {arr}")
    elif arr.dtype.kind not in "iu":
        raise ArgumentError(name, f"expected integer counts, received dtype {arr.dtype}")
    if np.any(arr < 0):
        raise ArgumentError(name, f"expected non-negative counts, received {arr}")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _as_float(value: Any, name: str, shape: tuple) -> np.ndarray:
    arr = np.ascontiguousarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ArgumentError(name, f"expected shape {shape}, received {arr.shape}")
    return arr

