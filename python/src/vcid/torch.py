"""``vcid.torch``: push a module's output from a forward hook.

Imported only on request (``import vcid.torch``). It needs nothing from torch
but a module's ``register_forward_hook`` and the output tensor's ``detach`` /
``reshape``, so it does not import torch itself. Owns the hook's bookkeeping
(current labels, epoch, split); the Monitor does the validation, the copy to
CPU and the sending. Must not change the module's output.

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

Forward passes outside a ``labels`` context (or after ``set_labels(None)``)
are not pushed, so evaluation passes are not mixed into training statistics
unless asked for.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

from ._monitor import DEFAULT_LAYER, DEFAULT_SPLIT, Monitor


class FeatureHook:
    """A forward hook on ``module`` that pushes its output, flattened to
    (batch, features), with the labels set for the current batch.

    The output is detached and copied by ``Monitor.push`` (the autograd graph
    is untouched). Tuple outputs use their first element. Labels set with
    ``labels``/``set_labels`` are per thread. ``epoch`` None (the default)
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
        self._local = threading.local()
        self._handle = module.register_forward_hook(self._hook)

    def set_labels(self, labels: Optional[Any]) -> None:
        """Labels of the next forward pass(es) in this thread; None stops pushing."""
        self._local.labels = labels

    @contextlib.contextmanager
    def labels(self, labels: Any) -> Iterator["FeatureHook"]:
        """Push the outputs of forward passes inside the block with ``labels``."""
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
        feats = output.detach().reshape(output.shape[0], -1)
        self.monitor.push(feats, labels, epoch=self.epoch, split=self.split, layer=self.layer)
