"""``LocalAccumulator``: the SPEC §2.1 sufficient statistics (plus the
unit-vector within trace the daemon keeps beyond §2.1) computed in the client
process, exact in float64, mergeable across batches and ranks.

Owns the batch statistics and the Chan-Golub-LeVeque merge (the same
formulas as the daemon's ``stats`` module). Must not talk to the daemon;
``Monitor.push_stats`` sends an accumulator.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._arrays import check_features, check_labels
from ._errors import ArgumentError
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


class LocalAccumulator:
    """Exact single-pass class statistics of a stream of (features, labels).

    Kept in float64 (SPEC §2.1): ``class_counts`` (K, int64), ``class_means``
    (K×d), ``scatter`` (d×d, the full symmetric M2 = Σ (h−μ)(h−μ)ᵀ about the
    global mean), ``within_trace`` (K, Σ_{i∈k} ‖h_i−μ_k‖²), ``unit_sum`` (K×d,
    Σ u_i over rows with ‖h_i‖ > 0, u_i = h_i/‖h_i‖) and ``unit_count`` (K,
    c_k); beyond §2.1, ``unit_within_trace`` (K, Σ_{i∈k} ‖u_i − ū_k‖² with
    ū_k = unit_sum_k / c_k over the same rows). Every batch is reduced about
    its own means and folded in with the Chan-Golub-LeVeque parallel formula,
    so neither the batch order nor the grouping (batches, ranks) changes the
    result beyond rounding, and a large common offset of the features costs no
    digits.

    ``unit_within_trace`` equals c_k − ‖unit_sum_k‖²/c_k in exact arithmetic,
    but computed that way it cancels catastrophically when a class's feature
    directions nearly coincide (a large common offset), which is why it is
    kept explicitly; the daemon's ``class_separation`` uses it.

    Properties return copies; mutate only through ``update`` and ``merge``.
    """

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        k, d = _check_shape_args(num_classes, feature_dim)
        self._k = k
        self._d = d
        self._counts = np.zeros(k, dtype=np.int64)
        self._means = np.zeros((k, d))
        self._scatter = np.zeros((d, d))
        self._within = np.zeros(k)
        self._unit_sum = np.zeros((k, d))
        self._unit_count = np.zeros(k, dtype=np.int64)
        self._unit_within = np.zeros(k)

    # -- shape and statistics ---------------------------------------------

    @property
    def num_classes(self) -> int:
        return self._k

    @property
    def feature_dim(self) -> int:
        return self._d

    @property
    def samples(self) -> int:
        """N, the number of rows folded in."""
        return int(self._counts.sum())

    @property
    def class_counts(self) -> np.ndarray:
        return self._counts.copy()

    @property
    def class_means(self) -> np.ndarray:
        return self._means.copy()

    @property
    def scatter(self) -> np.ndarray:
        return self._scatter.copy()

    @property
    def within_trace(self) -> np.ndarray:
        return self._within.copy()

    @property
    def unit_sum(self) -> np.ndarray:
        return self._unit_sum.copy()

    @property
    def unit_count(self) -> np.ndarray:
        return self._unit_count.copy()

    @property
    def unit_within_trace(self) -> np.ndarray:
        """Σ_{i∈k} ‖u_i − ū_k‖² per class (K), the spread of the unit vectors
        about their class mean direction; 0 for classes with c_k = 0."""
        return self._unit_within.copy()

    @property
    def global_mean(self) -> np.ndarray:
        """μ = Σ_k n_k μ_k / N (zeros while empty)."""
        n = self.samples
        if n == 0:
            return np.zeros(self._d)
        return (self._counts.astype(np.float64) @ self._means) / n

    def __repr__(self) -> str:
        return (
            f"LocalAccumulator(num_classes={self._k}, feature_dim={self._d}, "
            f"samples={self.samples})"
        )

    # -- folding data in ---------------------------------------------------

    def update(self, features: Any, labels: Any) -> "LocalAccumulator":
        """Fold in one batch (same inputs and checks as ``Monitor.push``).

        The values are used as given, in float64: unlike ``push`` nothing is
        rounded to a wire encoding.
        """
        f = check_features(features, self._d)
        rows = f.array.shape[0]
        y = check_labels(labels, rows, self._k)
        x = np.asarray(f.as_float(), dtype=np.float64)
        self.merge(_batch_statistics(x, y, self._k))
        return self

    def merge(self, other: "LocalAccumulator") -> "LocalAccumulator":
        """Fold in another accumulator (exact Chan merge); returns ``self``."""
        if not isinstance(other, LocalAccumulator):
            raise ArgumentError(
                "other", f"expected a LocalAccumulator, received {type(other).__name__}"
            )
        if (other._k, other._d) != (self._k, self._d):
            raise ArgumentError(
                "other", f"expected num_classes={self._k}, feature_dim={self._d}, received "
                f"num_classes={other._k}, feature_dim={other._d}"
            )
        na_k, nb_k = self._counts, other._counts
        n_a, n_b = int(na_k.sum()), int(nb_k.sum())
        if n_b == 0:
            return self
        if n_a == 0:
            self._assign(other)
            return self
        n = n_a + n_b
        # Global part: M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n, δ = μ_b − μ_a.
        delta = other.global_mean - self.global_mean
        scatter = self._scatter + other._scatter + np.outer(delta, delta) * (n_a * n_b / n)
        # Per class: the same formula on the class means and within traces.
        n_k = na_k + nb_k
        safe = np.maximum(n_k, 1).astype(np.float64)
        fa = na_k.astype(np.float64)
        fb = nb_k.astype(np.float64)
        dk = other._means - self._means
        means = self._means + dk * (fb / safe)[:, None]
        within = self._within + other._within + np.einsum("ij,ij->i", dk, dk) * (fa * fb / safe)
        empty = n_k == 0
        means[empty] = 0.0
        within[empty] = 0.0
        self._scatter = scatter
        self._means = means
        self._within = within
        self._counts = n_k
        # Unit vectors: the same formula on the mean directions ū = s/c and
        # the unit-vector traces (the factor c_a·c_b/c is 0 when either side
        # has no unit vectors of the class).
        ca_k, cb_k = self._unit_count, other._unit_count
        c_k = ca_k + cb_k
        ca = ca_k.astype(np.float64)
        cb = cb_k.astype(np.float64)
        du = (other._unit_sum / np.maximum(cb, 1.0)[:, None]
              - self._unit_sum / np.maximum(ca, 1.0)[:, None])
        self._unit_within = (self._unit_within + other._unit_within
                             + np.einsum("ij,ij->i", du, du) * (ca * cb / np.maximum(ca + cb, 1.0)))
        self._unit_sum = self._unit_sum + other._unit_sum
        self._unit_count = c_k
        return self

    def _assign(self, other: "LocalAccumulator") -> None:
        self._counts = other._counts.copy()
        self._means = other._means.copy()
        self._scatter = other._scatter.copy()
        self._within = other._within.copy()
        self._unit_sum = other._unit_sum.copy()
        self._unit_count = other._unit_count.copy()
        self._unit_within = other._unit_within.copy()

    def copy(self) -> "LocalAccumulator":
        out = LocalAccumulator(self._k, self._d)
        out._assign(self)
        return out

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

        Checks shapes, finiteness, non-negative integral counts, symmetry of
        ``scatter`` (to 1e-12 relative; it is then made exactly symmetric),
        ``unit_count`` ≤ ``class_counts``, ``0 ≤ unit_within_trace_k ≤
        unit_count_k``, and that empty classes carry zero statistics (and
        classes without unit vectors zero unit sums and traces).

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
        acc = cls(k, d)
        sc = _as_float(scatter, "scatter", (d, d))
        asym = np.abs(sc - sc.T).max() if d else 0.0
        if asym > 1e-12 * max(1.0, np.abs(sc).max()):
            raise ArgumentError(
                "scatter", f"expected a symmetric {d}x{d} matrix, received one with "
                f"max |S - Sᵀ| = {asym}"
            )
        acc._counts = counts
        acc._means = _as_float(means, "class_means", (k, d))
        acc._scatter = np.triu(sc) + np.triu(sc, 1).T
        acc._within = _as_float(within_trace, "within_trace", (k,))
        acc._unit_sum = _as_float(unit_sum, "unit_sum", (k, d))
        acc._unit_count = _as_counts(unit_count, "unit_count", k)
        empty = counts == 0
        for name, arr in (("class_means", acc._means), ("within_trace", acc._within),
                          ("unit_sum", acc._unit_sum), ("unit_count", acc._unit_count)):
            if np.any(arr[empty] != 0):
                k0 = int(np.flatnonzero(empty & np.any(
                    (arr != 0).reshape(k, -1), axis=1))[0])
                raise ArgumentError(
                    name, f"expected zeros for class {k0}, which has class_counts 0, "
                    f"received non-zero values"
                )
        if np.any(acc._unit_count > counts):
            k0 = int(np.flatnonzero(acc._unit_count > counts)[0])
            raise ArgumentError(
                "unit_count", f"expected at most class_counts[{k0}]={int(counts[k0])}, "
                f"received {int(acc._unit_count[k0])}"
            )
        for name, values, what in (("within_trace", acc._within, "non-negative values"),
                                   ("scatter", np.diag(acc._scatter), "a non-negative diagonal")):
            if np.any(values < 0):
                raise ArgumentError(
                    name, f"expected {what}, received a minimum of {float(values.min())}")
        no_units = acc._unit_count == 0
        if np.any(acc._unit_sum[no_units] != 0):
            k0 = int(np.flatnonzero(no_units & np.any(acc._unit_sum != 0, axis=1))[0])
            raise ArgumentError(
                "unit_sum", f"expected zeros for class {k0}, which has unit_count 0, "
                f"received non-zero values"
            )
        if unit_within_trace is None:
            acc._unit_within = _derived_unit_within(acc._unit_sum, acc._unit_count)
        else:
            acc._unit_within = _as_float(unit_within_trace, "unit_within_trace", (k,))
        if np.any(acc._unit_within[no_units] != 0):
            k0 = int(np.flatnonzero(no_units & (acc._unit_within != 0))[0])
            raise ArgumentError(
                "unit_within_trace", f"expected 0 for class {k0}, which has unit_count 0, "
                f"received {float(acc._unit_within[k0])!r}"
            )
        c = acc._unit_count.astype(np.float64)
        # Unit vectors spread at most c_k about their mean (c − ‖s‖²/c ≤ c);
        # the slack admits the rounding of a sum of c values near 1.
        bad = (acc._unit_within < 0) | (acc._unit_within > c * (1.0 + 1e-12))
        if np.any(bad):
            k0 = int(np.flatnonzero(bad)[0])
            raise ArgumentError(
                "unit_within_trace", f"expected a value in [0, unit_count[{k0}]="
                f"{int(acc._unit_count[k0])}] for class {k0}, received "
                f"{float(acc._unit_within[k0])!r}"
            )
        return acc

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
        T_rk + c_rk·‖ū_rk − ū_k‖² for the unit-vector traces. Every rank
        returns the same combined accumulator.
        """
        k, d = self._k, self._d
        counts = self._counts.astype(np.float64)
        unit_counts = self._unit_count.astype(np.float64)
        round1 = np.concatenate([
            counts, (self._means * counts[:, None]).ravel(),
            unit_counts, self._unit_sum.ravel(),
        ])
        total1 = np.asarray(sum_fn(round1), dtype=np.float64)
        if total1.shape != round1.shape:
            raise ArgumentError(
                "sum_fn", f"expected a vector of shape {round1.shape}, received {total1.shape}"
            )
        n_k = np.rint(total1[:k]).astype(np.int64)
        o = k
        sums = total1[o: o + k * d].reshape(k, d)
        o += k * d
        c_k = np.rint(total1[o: o + k]).astype(np.int64)
        o += k
        unit_sum = total1[o: o + k * d].reshape(k, d).copy()
        means = np.where(n_k[:, None] > 0, sums / np.maximum(n_k, 1)[:, None], 0.0)
        n = int(n_k.sum())
        mu = (n_k.astype(np.float64) @ means) / n if n else np.zeros(d)
        n_r = self.samples
        delta = self.global_mean - mu if n_r else np.zeros(d)
        scatter_r = self._scatter + np.outer(delta, delta) * n_r
        dk = self._means - means
        within_r = self._within + np.einsum("ij,ij->i", dk, dk) * counts
        within_r[self._counts == 0] = 0.0
        du = (self._unit_sum / np.maximum(unit_counts, 1.0)[:, None]
              - unit_sum / np.maximum(c_k, 1).astype(np.float64)[:, None])
        unit_within_r = self._unit_within + np.einsum("ij,ij->i", du, du) * unit_counts
        unit_within_r[self._unit_count == 0] = 0.0
        round2 = np.concatenate([scatter_r.ravel(), within_r, unit_within_r])
        total2 = np.asarray(sum_fn(round2), dtype=np.float64)
        if total2.shape != round2.shape:
            raise ArgumentError(
                "sum_fn", f"expected a vector of shape {round2.shape}, received {total2.shape}"
            )
        out = LocalAccumulator(k, d)
        out._counts = n_k
        out._means = means
        s = total2[: d * d].reshape(d, d)
        out._scatter = np.triu(s) + np.triu(s, 1).T
        o = d * d
        out._within = total2[o: o + k].copy()
        o += k
        out._unit_within = total2[o: o + k].copy()
        out._unit_sum = unit_sum
        out._unit_count = c_k
        return out

    def to_proto(self, run_id: str, split: str, layer: str, epoch: int,
                 writer_id: str = "", sequence: int = 0) -> pb.StatsBlock:
        """The wire form (``vcid.v1.StatsBlock``, ``unit_within_trace``
        included)."""
        return pb.StatsBlock(
            run_id=run_id, split=split, layer=layer, epoch=epoch,
            class_counts=self._counts.tolist(),
            class_means=self._means.ravel().tolist(),
            scatter=self._scatter.ravel().tolist(),
            within_trace=self._within.tolist(),
            unit_sum=self._unit_sum.ravel().tolist(),
            unit_count=self._unit_count.tolist(),
            unit_within_trace=self._unit_within.tolist(),
            writer_id=writer_id, sequence=sequence,
        )


def _derived_unit_within(unit_sum: np.ndarray, unit_count: np.ndarray) -> np.ndarray:
    """c_k − ‖s_k‖²/c_k (clamped at 0; 0 where c_k = 0): the unit-vector trace
    that the unit sums alone imply, with their cancellation."""
    c = unit_count.astype(np.float64)
    squared = np.einsum("ij,ij->i", unit_sum, unit_sum)
    return np.where(c > 0, np.maximum(c - squared / np.maximum(c, 1.0), 0.0), 0.0)


def _as_counts(value: Any, name: str, k: int | None = None) -> np.ndarray:
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
    return arr.astype(np.int64)


def _as_float(value: Any, name: str, shape: tuple) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != shape:
        raise ArgumentError(name, f"expected shape {shape}, received {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ArgumentError(name, "expected finite values, received NaN or ±inf")
    return arr


def _batch_statistics(x: np.ndarray, y: np.ndarray, k: int) -> LocalAccumulator:
    """The statistics of one batch, each about the batch's own means."""
    n, d = x.shape
    order = np.argsort(y, kind="stable")
    ys = y[order]
    xs = x[order]
    classes, starts, counts = np.unique(ys, return_index=True, return_counts=True)
    sums = np.add.reduceat(xs, starts, axis=0)
    means = sums / counts[:, None]
    centred = xs - np.repeat(means, counts, axis=0)
    within = np.add.reduceat(np.einsum("ij,ij->i", centred, centred), starts)
    norms = _row_norms(xs)
    ok = norms > 0
    unit = np.where(ok[:, None], xs / np.where(ok, norms, 1.0)[:, None], 0.0)
    unit_sum = np.add.reduceat(unit, starts, axis=0)
    unit_count = np.add.reduceat(ok.astype(np.int64), starts)
    # Second pass over the unit vectors, about their class mean direction:
    # never c − ‖Σu‖²/c, which cancels when the directions nearly coincide.
    directions = unit_sum / np.maximum(unit_count, 1)[:, None]
    spread = np.where(ok[:, None], unit - np.repeat(directions, counts, axis=0), 0.0)
    unit_within = np.add.reduceat(np.einsum("ij,ij->i", spread, spread), starts)
    xc = x - x.mean(axis=0)
    s = xc.T @ xc
    acc = LocalAccumulator(k, d)
    acc._counts[classes] = counts
    acc._means[classes] = means
    acc._within[classes] = within
    acc._unit_sum[classes] = unit_sum
    acc._unit_count[classes] = unit_count
    acc._unit_within[classes] = unit_within
    acc._scatter = np.triu(s) + np.triu(s, 1).T
    return acc


def _row_norms(x: np.ndarray) -> np.ndarray:
    """‖x_i‖₂ per row; rows whose plain sum of squares over- or underflows are
    rescaled by their largest magnitude first (as the daemon does)."""
    squared = np.einsum("ij,ij->i", x, x)
    norms = np.sqrt(squared)
    risky = ~(np.isfinite(squared) & (squared >= np.finfo(np.float64).tiny))
    if np.any(risky):
        rows = x[risky]
        scale = np.abs(rows).max(axis=1)
        safe = np.where(scale > 0, scale, 1.0)
        scaled = rows / safe[:, None]
        rescaled = scale * np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
        norms[risky] = np.where(scale > 0, rescaled, 0.0)
    return norms
