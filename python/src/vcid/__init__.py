"""vcid: stream a layer's features from a training loop to the vcid daemon
and read the Variability Collapse Index (Xu & Liu, ICML 2023) per epoch.

    import vcid
    with vcid.Monitor("127.0.0.1:50051", run="resnet18-cifar10", num_classes=10,
                      feature_dim=512) as mon:
        for epoch in range(epochs):
            for x, y in loader:
                mon.push(model.features(x), y, epoch=epoch)
            print(mon.close_epoch(epoch).vci)

This module only re-exports the public names. ``vcid.torch`` (a forward hook)
is imported on request only, so importing ``vcid`` never imports torch.
"""

from ._accumulator import LocalAccumulator
from ._arrays import bfloat16_bits_to_float32, float32_to_bfloat16_bits, round_to_encoding
from ._errors import ArgumentError, QueueFullError, VcidError
from ._monitor import DEFAULT_LAYER, DEFAULT_SPLIT, Monitor
from ._result import EpochResult, OpenEpoch, PushSummary, RunInfo

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "DEFAULT_LAYER",
    "DEFAULT_SPLIT",
    "EpochResult",
    "LocalAccumulator",
    "Monitor",
    "OpenEpoch",
    "PushSummary",
    "QueueFullError",
    "RunInfo",
    "VcidError",
    "bfloat16_bits_to_float32",
    "float32_to_bfloat16_bits",
    "round_to_encoding",
]
