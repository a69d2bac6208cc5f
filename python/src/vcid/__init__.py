"""vcid: watch the Variability Collapse Index (Xu & Liu, ICML 2023) and its
companion neural-collapse metrics of a layer while a model trains.

    import vcid
    with vcid.Monitor(run="resnet18-cifar10", num_classes=10, feature_dim=512) as mon:
        for epoch in range(epochs):
            for x, y in loader:
                mon.push(model.features(x), y)
            print(mon.close_epoch().vci)

With no address the Monitor uses ``$VCID_ADDR`` or ``127.0.0.1:50051`` and
starts a local daemon there if none runs. ``vcid.compute(features, labels)``
gives the same metrics for arrays in memory, ``vcid.Client`` reads the
history of runs, and the ``vcid`` command (``python -m vcid``) is the
daemon and its command line.

This module only re-exports the public names. ``vcid.torch`` (a forward hook)
is imported on request only, so importing ``vcid`` never imports torch.
"""

from ._accumulator import LocalAccumulator, compute
from ._arrays import bfloat16_bits_to_float32, float32_to_bfloat16_bits, round_to_encoding
from ._client import Client
from ._errors import ArgumentError, OpenEpochWarning, QueueFullError, VcidError
from ._monitor import DEFAULT_LAYER, DEFAULT_SPLIT, Monitor
from ._result import EpochResult, OpenEpoch, PushSummary, RunInfo

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "Client",
    "DEFAULT_LAYER",
    "DEFAULT_SPLIT",
    "EpochResult",
    "LocalAccumulator",
    "Monitor",
    "OpenEpoch",
    "OpenEpochWarning",
    "PushSummary",
    "QueueFullError",
    "RunInfo",
    "VcidError",
    "bfloat16_bits_to_float32",
    "compute",
    "float32_to_bfloat16_bits",
    "round_to_encoding",
]
