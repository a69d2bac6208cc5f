"""Turning user inputs (numpy arrays, torch tensors, anything with
``__array__``) into validated, encoded feature batches.

Owns every local check of a batch (shape, dtype, label range, finiteness)
and the wire encodings (float32, float16, bfloat16 with round-to-nearest-even).
Must not send anything or import torch: torch tensors are recognised by duck
typing, and torch itself is only touched through ``sys.modules`` when the
caller already imported it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import ArgumentError
from .v1 import vcid_pb2 as pb

#: encoding name -> (wire enum, bytes per value)
ENCODINGS = {
    "float32": (pb.ENCODING_FLOAT32, 4),
    "float16": (pb.ENCODING_FLOAT16, 2),
    "bfloat16": (pb.ENCODING_BFLOAT16, 2),
}


def check_encoding(encoding: Any) -> str:
    if encoding not in ENCODINGS:
        raise ArgumentError(
            "encoding", f"expected one of {sorted(ENCODINGS)}, received {encoding!r}"
        )
    return encoding


def check_epoch(epoch: Any) -> int:
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)):
        raise ArgumentError(
            "epoch", f"expected a non-negative integer, received {type(epoch).__name__} {epoch!r}"
        )
    epoch = int(epoch)
    if epoch < 0 or epoch >= 2**64:
        raise ArgumentError("epoch",
                            f"expected a non-negative integer below 2**64, received {epoch}")
    return epoch


# --------------------------------------------------------------------------
# bfloat16


def float32_to_bfloat16_bits(values: Any) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) like torch.

    Returns the bfloat16 bit patterns as uint16. Values are first converted to
    float32 (as torch does for float64 input). NaN becomes the canonical quiet
    NaN 0x7FC0 (torch's choice) instead of being rounded into infinity;
    finite values beyond the bfloat16 range round to ±inf, as in torch.
    """
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    # Adding 0x7FFF + lsb carries into bit 16 exactly when the discarded low
    # half is above one half ulp, or equal to it with an odd kept part.
    with np.errstate(over="ignore"):
        rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_bits_to_float32(bits: Any) -> np.ndarray:
    """Exact widening of bfloat16 bit patterns (uint16) to float32."""
    b = np.ascontiguousarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_encoding(values: Any, encoding: str) -> np.ndarray:
    """The float64 values the daemon will see after ``encoding`` (for references)."""
    check_encoding(encoding)
    a = np.asarray(values)
    if encoding == "float32":
        return a.astype(np.float32).astype(np.float64)
    if encoding == "float16":
        return a.astype(np.float16).astype(np.float64)
    return bfloat16_bits_to_float32(float32_to_bfloat16_bits(a)).astype(np.float64)


# --------------------------------------------------------------------------
# inputs


@dataclass
class Features:
    """A 2-D batch of features as given: either a numeric numpy array or
    bfloat16 bit patterns (uint16) that came from a bfloat16 tensor/array."""

    array: np.ndarray
    is_bfloat16_bits: bool = False

    def as_float(self) -> np.ndarray:
        """The values as a floating numpy array (bfloat16 widened exactly)."""
        if self.is_bfloat16_bits:
            return bfloat16_bits_to_float32(self.array)
        return self.array


def _is_torch_like(obj: Any) -> bool:
    return callable(getattr(obj, "detach", None)) and callable(getattr(obj, "cpu", None))


def _torch_to_numpy(obj: Any, argument: str) -> Features:
    t = obj.detach().cpu()
    if str(getattr(t, "dtype", "")) == "torch.bfloat16":
        torch = sys.modules.get("torch")
        if torch is not None:
            # Reinterpret the 16-bit patterns: no rounding, no float32 copy.
            bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
            return Features(bits, is_bfloat16_bits=True)
        t = t.float()
    numpy_fn = getattr(t, "numpy", None)
    if not callable(numpy_fn):
        raise ArgumentError(
            argument, f"expected a numpy array, an object with __array__ or a tensor with "
            f".detach().cpu().numpy(), received {type(obj).__name__} whose .detach().cpu() "
            f"has no .numpy()"
        )
    return Features(np.asarray(numpy_fn()))


def to_numpy(obj: Any, argument: str) -> Features:
    """Convert a numpy array, a tensor-like or anything with ``__array__``."""
    if isinstance(obj, np.ndarray):
        arr = obj
    elif _is_torch_like(obj):
        return _with_bf16_dtype(_torch_to_numpy(obj, argument))
    else:
        try:
            arr = np.asarray(obj)
        except (ValueError, TypeError) as exc:
            raise ArgumentError(
                argument, f"expected a numpy array, an object with __array__ or a tensor "
                f"with .detach().cpu().numpy(), received {type(obj).__name__} ({exc})"
            ) from None
    return _with_bf16_dtype(Features(arr))


def _with_bf16_dtype(f: Features) -> Features:
    # ml_dtypes / jax bfloat16 numpy arrays: take their bit patterns directly.
    if not f.is_bfloat16_bits and f.array.dtype.name == "bfloat16":
        return Features(np.ascontiguousarray(f.array).view(np.uint16), is_bfloat16_bits=True)
    return f


def _describe(arr: np.ndarray) -> str:
    return f"shape {tuple(arr.shape)} dtype {arr.dtype}"


def check_features(obj: Any, feature_dim: int, argument: str = "features") -> Features:
    """2-D, ``feature_dim`` columns, at least one row, real numeric dtype, all
    finite. ``obj`` may also be the ``Features`` that ``to_numpy`` made."""
    f = obj if isinstance(obj, Features) else to_numpy(obj, argument)
    arr = f.array
    if arr.ndim != 2:
        raise ArgumentError(
            argument, f"expected a 2-D array of shape (rows, feature_dim={feature_dim}), "
            f"received {_describe(arr)}"
        )
    if arr.shape[1] != feature_dim:
        raise ArgumentError(
            argument, f"expected feature_dim={feature_dim} columns (the run's feature_dim), "
            f"received {arr.shape[1]} columns ({_describe(arr)})"
        )
    if arr.shape[0] == 0:
        raise ArgumentError(
            argument, f"expected at least 1 row (an empty batch carries nothing), "
            f"received {_describe(arr)}"
        )
    if not f.is_bfloat16_bits and arr.dtype.kind not in "fiu":
        raise ArgumentError(
            argument, f"expected a real floating or integer dtype, received {arr.dtype}"
        )
    _check_finite(f, argument)
    return f


def _check_finite(f: Features, argument: str, what: str = "finite values") -> None:
    arr = f.array
    if f.is_bfloat16_bits:
        bad = (arr & np.uint16(0x7F80)) == np.uint16(0x7F80)
    elif arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
    else:
        return
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        value = f.as_float()[row, col]
        raise ArgumentError(
            argument, f"expected {what}, received {value} at row {row}, column {col} "
            f"({int(bad.sum())} non-finite values in total)"
        )


def check_labels(obj: Any, rows: int, num_classes: int, argument: str = "labels") -> np.ndarray:
    """1-D integer labels, one per row, each in ``[0, num_classes)``; returns uint32."""
    arr = to_numpy(obj, argument).array
    if arr.ndim != 1:
        raise ArgumentError(
            argument, f"expected a 1-D array of {rows} integer labels, received {_describe(arr)}"
        )
    if arr.dtype.kind not in "iu":
        raise ArgumentError(
            argument, f"expected an integer dtype (class indices in [0, {num_classes})), "
            f"received dtype {arr.dtype}"
        )
    if arr.shape[0] != rows:
        raise ArgumentError(
            argument, f"expected {rows} labels (one per feature row), received {arr.shape[0]}"
        )
    if rows == 0:
        raise ArgumentError(argument, "expected at least 1 label, received an empty array")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= num_classes:
        bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
        i = int(bad[0])
        raise ArgumentError(
            argument, f"expected every label in [0, {num_classes}) (num_classes={num_classes}), "
            f"received {int(arr[i])} at row {i} ({bad.size} labels out of range)"
        )
    return arr.astype(np.uint32, copy=False)


def encode(f: Features, encoding: str, argument: str = "features") -> bytes:
    """Little-endian bytes of ``f`` in ``encoding``; errors when a finite value
    overflows the narrower encoding (it would arrive as ±inf and be rejected)."""
    if encoding == "bfloat16":
        if f.is_bfloat16_bits:
            bits = f.array
        else:
            bits = float32_to_bfloat16_bits(f.array)
            _check_finite(Features(bits, True), argument,
                          "values within the bfloat16 range (about ±3.39e38)")
        return np.ascontiguousarray(bits, dtype="<u2").tobytes()
    if encoding == "float16":
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(f.as_float(), dtype="<f2")
        _check_finite(Features(out), argument, "values within the float16 range (±65504)")
        return out.tobytes()
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(f.as_float(), dtype="<f4")
    # Only float64 (or wider) input can overflow float32; integers cannot.
    if not f.is_bfloat16_bits and f.array.dtype.kind == "f" and f.array.dtype.itemsize > 4:
        _check_finite(Features(out), argument, "values within the float32 range (±3.4e38)")
    return out.tobytes()


def feature_rows_per_message(feature_dim: int, width: int, max_bytes: int, max_rows: int) -> int:
    """Rows per FeatureBatch so that one message stays under ``max_bytes``."""
    per_row = feature_dim * width + 5  # + one varint label
    return max(1, min(max_rows, (max_bytes - 1024) // per_row))
