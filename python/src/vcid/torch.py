"""``vcid.torch``: PyTorch integration, imported only on request
(``import vcid.torch``; ``import vcid`` never imports torch).

Owns three things:

- ``FeatureHook``: a forward hook that pushes a module's output with the
  current batch's labels through ``Monitor.push`` (raw features; the daemon
  does the statistics).
- ``TorchAccumulator``: the sufficient statistics (as ``LocalAccumulator``)
  kept as float64 tensors on the features' device, updated without any host
  synchronisation or copy, merged exactly, and combined across
  ``torch.distributed`` ranks; ``Monitor.push_stats`` sends it.
- ``AccumulatingHook``: a forward hook that feeds a ``TorchAccumulator`` and,
  at ``close_epoch``, all-reduces it across ranks and pushes the combined
  statistics once (one ``PushStats`` per epoch instead of every batch).

Must not: change a module's output or its autograd graph, or talk to the
daemon other than through a ``Monitor``.

Raw pushes or device accumulation? A raw push costs the training process
O(rows·d) per batch (copy, encode, send) and the daemon O(rows·d²); device
accumulation costs the training process the O(rows·d²) itself (cheap on an
accelerator, not on a CPU) and sends one d×d block per epoch. See the
package README for measured numbers.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import torch

from ._accumulator import LocalAccumulator, _check_shape_args
from ._errors import ArgumentError
from ._monitor import DEFAULT_LAYER, DEFAULT_SPLIT, Monitor
from ._result import EpochResult

_F64 = torch.float64


class _LabelledHook:
    """Forward-hook bookkeeping shared by the hooks: the labels of the
    current batch (per thread) and the hook handle."""

    def __init__(self, module: Any) -> None:
        self._local = threading.local()
        self._handle = module.register_forward_hook(self._hook)

    def set_labels(self, labels: Optional[Any]) -> None:
        """Labels of the next forward pass(es) in this thread; None stops
        recording."""
        self._local.labels = labels

    @contextlib.contextmanager
    def labels(self, labels: Any) -> Iterator[Any]:
        """Record the outputs of forward passes inside the block with
        ``labels``."""
        previous = getattr(self._local, "labels", None)
        self._local.labels = labels
        try:
            yield self
        finally:
            self._local.labels = previous

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        labels = getattr(self._local, "labels", None)
        if labels is None:
            return
        if isinstance(output, (tuple, list)):
            output = output[0]
        self._record(output.detach().reshape(output.shape[0], -1), labels)

    def _record(self, features: Any, labels: Any) -> None:
        raise NotImplementedError


class FeatureHook(_LabelledHook):
    """A forward hook on ``module`` that pushes its output, flattened to
    (batch, features), with the labels set for the current batch.

        import vcid, vcid.torch
        with vcid.Monitor(run="r", num_classes=10, feature_dim=512) as mon:
            hook = vcid.torch.FeatureHook(mon, model.avgpool)
            for epoch in range(epochs):
                for x, y in loader:
                    with hook.labels(y):        # outputs seen inside are pushed with y
                        loss = criterion(model(x), y)
                    ...
                mon.close_epoch()               # and the hook moves on to the next epoch
            hook.remove()

    The output is detached and copied by ``Monitor.push`` (the autograd graph
    is untouched). Tuple outputs use their first element. Forward passes
    outside a ``labels`` context (or after ``set_labels(None)``) are not
    pushed, so evaluation passes are not mixed into training statistics
    unless asked for. Labels are per thread. ``epoch`` None (the default)
    pushes into the Monitor's current epoch of the hook's stream.
    """

    def __init__(
        self,
        monitor: Monitor,
        module: Any,
        epoch: Optional[int] = None,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
    ) -> None:
        self.monitor = monitor
        self.epoch = epoch
        self.split = split
        self.layer = layer
        super().__init__(module)

    def _record(self, features: Any, labels: Any) -> None:
        self.monitor.push(features, labels, epoch=self.epoch, split=self.split,
                          layer=self.layer)


class TorchAccumulator:
    """Exact class statistics of a stream of (features, labels), kept as
    float64 tensors on the features' device.

    Holds what ``vcid.LocalAccumulator`` holds (the sufficient statistics plus
    ``unit_within_trace``), with the same attribute names, as tensors:
    ``class_counts`` (K, int64), ``class_means`` (K×d), ``scatter`` (d×d,
    M2 about the global mean, full symmetric), ``within_trace`` (K),
    ``unit_sum`` (K×d), ``unit_count`` (K, int64), ``unit_within_trace`` (K).

    ``update`` never synchronises with the host or copies to it: no
    ``.item()``, no ``.cpu()``, no Python branch on tensor values. A batch is
    reduced about its own class means (two-pass) and its own mean, and
    folded in with the Chan–Golub–LeVeque formula, as ``LocalAccumulator``
    and the daemon do; its scatter and the Chan correction enter ``scatter``
    as one matrix product. Per-class work is bounded by the rows of the
    batch, not by K: when K exceeds the batch's rows, the classes present
    get a compact slot each (the row of their first occurrence), and only
    their rows of the K-row tables are read and updated.

    Because values are never inspected on the host, a batch with a NaN or
    infinite feature (or values so large that their sum overflows), or a
    label outside ``[0, num_classes)``, cannot raise in ``update``: it is
    left out of the statistics (on the device) and counted, and
    ``to_local`` (hence ``Monitor.push_stats``) and ``all_reduce`` then
    raise ``vcid.ArgumentError`` (a ``ValueError``) saying how many batches
    were left out. Shapes, dtypes and devices are checked in ``update``
    itself.

    ``device=None`` adopts the device of the first batch.
    """

    def __init__(self, num_classes: int, feature_dim: int, device: Any = None) -> None:
        self._k, self._d = _check_shape_args(num_classes, feature_dim)
        self._device: Optional[torch.device] = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        k, d = self._k, self._d
        self._device = device

        def zeros(*shape: int, dtype: torch.dtype = _F64) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self._counts = zeros(k, dtype=torch.int64)
        self._means = zeros(k, d)
        self._scatter = zeros(d, d)
        self._within = zeros(k)
        self._unit_sum = zeros(k, d)
        self._unit_count = zeros(k, dtype=torch.int64)
        self._unit_within = zeros(k)
        # The running global mean (Chan-updated, O(d) per batch), the sample
        # count, and how many batches were left out as invalid.
        self._mean = zeros(d)
        self._n = zeros((), dtype=torch.int64)
        self._rejected = zeros((), dtype=torch.int64)

    # -- shape and statistics ---------------------------------------------

    @property
    def num_classes(self) -> int:
        return self._k

    @property
    def feature_dim(self) -> int:
        return self._d

    @property
    def device(self) -> Optional[torch.device]:
        """Where the statistics live (None until the first batch when no
        device was given)."""
        return self._device

    def _tensor(self, name: str) -> torch.Tensor:
        if self._device is None:
            self._allocate(torch.device("cpu"))
        return getattr(self, name).clone()

    @property
    def samples(self) -> int:
        """N, the number of rows folded in (synchronises with the device)."""
        return int(self._tensor("_n"))

    @property
    def rejected_batches(self) -> int:
        """Batches left out for NaN/inf features or out-of-range labels
        (synchronises with the device)."""
        return int(self._tensor("_rejected"))

    @property
    def class_counts(self) -> torch.Tensor:
        return self._tensor("_counts")

    @property
    def class_means(self) -> torch.Tensor:
        return self._tensor("_means")

    @property
    def scatter(self) -> torch.Tensor:
        return self._tensor("_scatter")

    @property
    def within_trace(self) -> torch.Tensor:
        return self._tensor("_within")

    @property
    def unit_sum(self) -> torch.Tensor:
        return self._tensor("_unit_sum")

    @property
    def unit_count(self) -> torch.Tensor:
        return self._tensor("_unit_count")

    @property
    def unit_within_trace(self) -> torch.Tensor:
        return self._tensor("_unit_within")

    def __repr__(self) -> str:
        return (f"TorchAccumulator(num_classes={self._k}, feature_dim={self._d}, "
                f"device={self._device})")

    # -- folding data in ---------------------------------------------------

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> "TorchAccumulator":
        """Fold in one batch: ``features`` (rows × feature_dim, or rows ×
        anything that flattens to feature_dim; any floating dtype) with
        ``labels`` (rows, any integer dtype). Both must be tensors on the
        accumulator's device (labels may also be on the CPU; they are then
        copied asynchronously). Returns ``self``."""
        x, y = self._check_batch(features, labels)
        k, n = self._k, x.shape[0]
        dev = x.device
        # An invalid batch is zeroed and weighted 0, decided on the device.
        # (A sum that overflows also rejects the batch: its scatter would.)
        ok = torch.isfinite(x.sum()) & ((y >= 0) & (y < k)).all()
        x = torch.where(ok, x, 0.0)
        y = torch.where(ok, y, 0)
        self._rejected += (~ok).to(torch.int64)

        # Per-class tables of this batch: one row per class when K <= rows;
        # otherwise one row per batch row, each row pointing at the first row
        # of its class, so the work never grows with K. (The choice depends
        # on shapes only, never on values.)
        if k <= n:
            slot, classes, slots = y, torch.arange(k, device=dev), k
        else:
            first = torch.full((k,), n, dtype=torch.int64, device=dev)
            first.scatter_reduce_(0, y, torch.arange(n, device=dev), reduce="amin")
            slot, classes, slots = first[y], y, n

        def per_slot(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((slots,) + values.shape[1:], dtype=values.dtype, device=dev)
            return out.index_add_(0, slot, values)

        def row_squares(v: torch.Tensor) -> torch.Tensor:
            return torch.einsum("ij,ij->i", v, v)

        # Two-pass class means and within-class traces.
        count_b = per_slot(ok.to(torch.int64).expand(n))
        mean_b = per_slot(x) / count_b.clamp(min=1).to(_F64)[:, None]
        within_b = per_slot(row_squares(x - mean_b[slot]))
        # Unit vectors u = h/‖h‖ over non-zero rows, and their spread about
        # the class's mean direction (second pass).
        norms = torch.linalg.vector_norm(x, dim=1)
        has_unit = norms > 0
        unit = x / torch.where(has_unit, norms, 1.0)[:, None]
        ucount_b = per_slot(has_unit.to(torch.int64))
        usum_b = per_slot(unit)
        direction_b = usum_b / ucount_b.clamp(min=1).to(_F64)[:, None]
        uwithin_b = per_slot(row_squares(unit - direction_b[slot]) * has_unit)

        # Scatter: the batch centred on its own mean, plus the Chan
        # correction √w·δ as one more row, in one product.
        n_b = ok.to(torch.int64) * n
        n_total = self._n + n_b
        mu_b = (count_b.to(_F64) @ mean_b) / n_b.clamp(min=1).to(_F64)
        delta = mu_b - self._mean
        weight = (self._n * n_b).to(_F64) / n_total.clamp(min=1).to(_F64)
        centred = torch.empty((n + 1, self._d), dtype=_F64, device=dev)
        torch.sub(x, mu_b, out=centred[:n])
        centred[n] = weight.sqrt() * delta
        self._scatter.addmm_(centred.T, centred)
        self._mean += delta * (n_b.to(_F64) / n_total.clamp(min=1).to(_F64))
        self._n = n_total

        # Chan merge of the classes present (a slot that holds no rows has
        # count 0 and adds 0).
        self._merge_rows(classes, count_b, mean_b, within_b, ucount_b, usum_b, uwithin_b)
        return self

    def _check_batch(self, features: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(features, torch.Tensor):
            raise ArgumentError("features", f"expected a torch.Tensor, received "
                                f"{type(features).__name__}")
        if features.ndim < 2 or features.shape[0] == 0:
            raise ArgumentError("features", f"expected shape (rows >= 1, {self._d}), received "
                                f"{tuple(features.shape)}")
        if not (features.is_floating_point()):
            raise ArgumentError("features", f"expected a floating-point tensor, received "
                                f"{features.dtype}")
        n = features.shape[0]
        x = features.detach().reshape(n, -1)
        if x.shape[1] != self._d:
            raise ArgumentError("features", f"expected {self._d} values per row (feature_dim), "
                                f"received shape {tuple(features.shape)}")
        if self._device is None:
            self._allocate(x.device)
        if x.device != self._device:
            raise ArgumentError("features", f"expected a tensor on {self._device} (the "
                                f"accumulator's device), received one on {x.device}")
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ArgumentError("labels", f"expected an integer tensor, received {labels.dtype}")
        if tuple(labels.shape) != (n,):
            raise ArgumentError("labels", f"expected shape ({n},) (one per row), received "
                                f"{tuple(labels.shape)}")
        y = labels.detach().to(self._device, torch.int64, non_blocking=True)
        return x.to(_F64), y

    def _merge_rows(self, classes: torch.Tensor, count_b: torch.Tensor, mean_b: torch.Tensor,
                    within_b: torch.Tensor, ucount_b: torch.Tensor, usum_b: torch.Tensor,
                    uwithin_b: torch.Tensor) -> None:
        """Chan merge of per-class statistics given row-wise: row i holds
        class ``classes[i]`` (rows with count 0 change nothing)."""
        na = self._counts[classes]
        n = na + count_b
        dk = mean_b - self._means[classes]
        step = count_b.to(_F64) / n.clamp(min=1).to(_F64)
        chan = (na * count_b).to(_F64) / n.clamp(min=1).to(_F64)
        self._within.index_add_(0, classes, within_b + (dk * dk).sum(1) * chan)
        self._means.index_add_(0, classes, dk * step[:, None])
        self._counts.index_add_(0, classes, count_b)
        ca = self._unit_count[classes]
        c = ca + ucount_b
        du = (usum_b / ucount_b.clamp(min=1).to(_F64)[:, None]
              - self._unit_sum[classes] / ca.clamp(min=1).to(_F64)[:, None])
        uchan = (ca * ucount_b).to(_F64) / c.clamp(min=1).to(_F64)
        self._unit_within.index_add_(0, classes, uwithin_b + (du * du).sum(1) * uchan)
        self._unit_sum.index_add_(0, classes, usum_b)
        self._unit_count.index_add_(0, classes, ucount_b)

    def merge(self, other: "TorchAccumulator") -> "TorchAccumulator":
        """Fold in another accumulator (exact Chan merge; its tensors are
        moved to this device); returns ``self``."""
        if not isinstance(other, TorchAccumulator):
            raise ArgumentError("other", f"expected a TorchAccumulator, received "
                                f"{type(other).__name__}")
        if (other._k, other._d) != (self._k, self._d):
            raise ArgumentError(
                "other", f"expected num_classes={self._k}, feature_dim={self._d}, received "
                f"num_classes={other._k}, feature_dim={other._d}")
        if other._device is None:
            return self
        if self._device is None:
            self._allocate(other._device)
        dev = self._device

        def theirs(name: str) -> torch.Tensor:
            return getattr(other, name).to(dev)

        n_b = theirs("_n")
        n_total = self._n + n_b
        delta = theirs("_mean") - self._mean
        weight = (self._n * n_b).to(_F64) / n_total.clamp(min=1).to(_F64)
        self._scatter += theirs("_scatter") + torch.outer(delta, delta) * weight
        self._mean += delta * (n_b.to(_F64) / n_total.clamp(min=1).to(_F64))
        self._n = n_total
        self._rejected += theirs("_rejected")
        self._merge_rows(torch.arange(self._k, device=dev), theirs("_counts"),
                         theirs("_means"), theirs("_within"), theirs("_unit_count"),
                         theirs("_unit_sum"), theirs("_unit_within"))
        return self

    # -- across ranks, and to the daemon ----------------------------------

    def all_reduce(self, group: Any = None) -> "TorchAccumulator":
        """Combine the accumulators of all ranks of ``group`` exactly, with
        two ``torch.distributed.all_reduce`` (SUM) calls on the device, the
        scheme of ``LocalAccumulator.all_reduce``: round 1 sums the class
        counts, count-weighted class means, unit counts and unit sums, which
        give the global class means and mean directions; round 2 sums each
        rank's second moments after the Chan correction towards those (the
        scatter about the global mean, within traces, unit spreads). Every
        rank must call it; every rank gets the same combined accumulator
        (a new one). Raises ``vcid.ArgumentError`` if any rank left batches out."""
        import torch.distributed as dist

        if self._device is None:
            self._allocate(torch.device("cpu"))
        k, d = self._k, self._d
        counts = self._counts.to(_F64)
        ucounts = self._unit_count.to(_F64)
        round1 = torch.cat([
            counts, (self._means * counts[:, None]).reshape(-1), ucounts,
            self._unit_sum.reshape(-1), self._rejected.to(_F64)[None],
        ])
        dist.all_reduce(round1, op=dist.ReduceOp.SUM, group=group)
        rejected = int(round1[-1])
        if rejected:
            raise _rejected_error(rejected)
        n_k = round1[:k].round().to(torch.int64)
        o = k
        sums = round1[o:o + k * d].reshape(k, d)
        o += k * d
        c_k = round1[o:o + k].round().to(torch.int64)
        o += k
        unit_sum = round1[o:o + k * d].reshape(k, d).clone()
        means = sums / n_k.clamp(min=1).to(_F64)[:, None]
        n = n_k.sum()
        mu = (n_k.to(_F64) @ means) / n.clamp(min=1).to(_F64)
        delta = self._mean - mu
        scatter_r = self._scatter + torch.outer(delta, delta) * self._n.to(_F64)
        dk = self._means - means
        within_r = self._within + (dk * dk).sum(1) * counts
        du = (self._unit_sum / ucounts.clamp(min=1)[:, None]
              - unit_sum / c_k.clamp(min=1).to(_F64)[:, None])
        uwithin_r = self._unit_within + (du * du).sum(1) * ucounts
        round2 = torch.cat([scatter_r.reshape(-1), within_r, uwithin_r])
        dist.all_reduce(round2, op=dist.ReduceOp.SUM, group=group)
        out = TorchAccumulator(k, d, device=self._device)
        out._counts = n_k
        out._means = means
        out._scatter = round2[:d * d].reshape(d, d).clone()
        out._within = round2[d * d:d * d + k].clone()
        out._unit_within = round2[d * d + k:].clone()
        out._unit_sum = unit_sum
        out._unit_count = c_k
        out._mean = mu
        out._n = n
        return out

    def to_local(self) -> LocalAccumulator:
        """The statistics as a ``vcid.LocalAccumulator`` (copied to the host:
        one synchronisation), validated by ``LocalAccumulator.from_stats``.
        ``Monitor.push_stats`` calls it. Raises ``vcid.ArgumentError`` if batches
        were left out (see the class docs)."""
        rejected = self.rejected_batches
        if rejected:
            raise _rejected_error(rejected)

        def host(name: str) -> Any:
            return self._tensor(name).cpu().numpy()

        return LocalAccumulator.from_stats(
            class_counts=host("_counts"), class_means=host("_means"),
            scatter=host("_scatter"), within_trace=host("_within"),
            unit_sum=host("_unit_sum"), unit_count=host("_unit_count"),
            unit_within_trace=host("_unit_within"),
        )


def _rejected_error(batches: int) -> ArgumentError:
    return ArgumentError(
        "features/labels", f"expected finite features and labels in [0, num_classes) in "
        f"every batch, received {batches} batch(es) that were not (they were left out of "
        f"the statistics; check the data, or build a new accumulator)")


class AccumulatingHook(_LabelledHook):
    """A forward hook on ``module`` that folds its output, flattened to
    (batch, features), into a ``TorchAccumulator`` on the output's device,
    and pushes the combined statistics once per epoch.

        hook = vcid.torch.AccumulatingHook(mon if rank == 0 else None, model.avgpool,
                                           num_classes=1000, feature_dim=2048)
        for epoch in range(epochs):
            for x, y in loader:
                with hook.labels(y):
                    loss = criterion(model(x), y)
                ...
            result = hook.close_epoch()     # on every rank; the result on rank 0

    ``close_epoch`` is collective when ``torch.distributed`` is initialised:
    every rank of ``group`` must call it. It all-reduces the epoch's
    statistics across the ranks (exact, see ``TorchAccumulator.all_reduce``);
    the rank that holds a Monitor pushes them (``push_stats``) and closes the
    daemon's epoch, returning its ``EpochResult``; the others return None.
    Give the Monitor to exactly one rank. ``num_classes`` and
    ``feature_dim`` default to the Monitor's. ``epoch`` None (the default)
    pushes into and closes the Monitor's current epoch of the hook's stream.
    """

    def __init__(
        self,
        monitor: Optional[Monitor],
        module: Any,
        num_classes: Optional[int] = None,
        feature_dim: Optional[int] = None,
        epoch: Optional[int] = None,
        split: str = DEFAULT_SPLIT,
        layer: str = DEFAULT_LAYER,
        group: Any = None,
    ) -> None:
        if monitor is None and (num_classes is None or feature_dim is None):
            raise ArgumentError("num_classes/feature_dim", "expected both when monitor is None, "
                                f"received num_classes={num_classes}, feature_dim={feature_dim}")
        self.monitor = monitor
        self.num_classes = monitor.num_classes if num_classes is None else num_classes
        self.feature_dim = monitor.feature_dim if feature_dim is None else feature_dim
        self.epoch = epoch
        self.split = split
        self.layer = layer
        self.group = group
        self.accumulator = TorchAccumulator(self.num_classes, self.feature_dim)
        super().__init__(module)

    def _record(self, features: Any, labels: Any) -> None:
        self.accumulator.update(features, labels)

    def close_epoch(self) -> Optional[EpochResult]:
        """All-reduce this epoch's statistics across ranks (if
        ``torch.distributed`` is initialised), push them and close the epoch
        on the rank with the Monitor, and start a fresh accumulator."""
        acc, self.accumulator = self.accumulator, TorchAccumulator(
            self.num_classes, self.feature_dim, device=self.accumulator.device)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            acc = acc.all_reduce(self.group)
        if self.monitor is None:
            return None
        self.monitor.push_stats(acc, epoch=self.epoch, split=self.split, layer=self.layer)
        return self.monitor.close_epoch(self.epoch, split=self.split, layer=self.layer)
