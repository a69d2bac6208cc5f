#!/usr/bin/env python3
"""Writes the reference fixtures of the Rust tests to tests/reference/fixtures/:
for every case `<case>.features.npy` (float64 unless the case says
otherwise), `<case>.labels.npy` and `<case>.expected.json` with the metrics
of the independent two-pass numpy reference (`reference.py` beside this
file, in its strict mode: a case whose rank decisions are not clear-cut
stops the script instead of writing a fixture that could flip on rounding).

Run: .venv/bin/python tests/reference/make_fixtures.py
Deterministic: a fixed seed; re-running rewrites byte-identical files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from reference import WORST, metrics

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures"


# ---------------------------------------------------------------- cases


def gaussian_classes(rng, counts, d, sep=2.0, noise=1.0, mix=True):
    """Gaussian classes with random means and a shared random (well-conditioned) covariance."""
    K = len(counts)
    means = rng.normal(scale=sep, size=(K, d))
    A = np.eye(d)
    if mix:
        Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        A = Q * rng.uniform(0.5, 2.0, size=d)  # singular values in [0.5, 2]
    Xs, ys = [], []
    for k, n in enumerate(counts):
        Xs.append(means[k] + noise * rng.normal(size=(n, d)) @ A.T)
        ys.append(np.full(n, k))
    X = np.concatenate(Xs)
    y = np.concatenate(ys)
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


def cases(rng):
    """(name, X, y, num_classes, description) for every float64 case."""
    out = []

    X, y = gaussian_classes(rng, [100] * 6, 16)
    out.append(("balanced", X, y, 6, "well-conditioned, 6 balanced classes, d=16, N=600"))

    X, y = gaussian_classes(rng, [250, 120, 70, 40, 20], 12)
    out.append(("imbalanced", X, y, 5, "imbalanced classes 250/120/70/40/20, d=12"))

    X, y6 = gaussian_classes(rng, [50] * 6, 10)
    used = np.array([0, 1, 2, 4, 7, 9])
    out.append(("unused_classes", X, used[y6], 12, "K=12, only classes 0,1,2,4,7,9 occur"))

    X, y = gaussian_classes(rng, [100] * 4, 8)
    offset = 1e4 * (1.0 + 0.1 * rng.normal(size=8))
    out.append(("large_offset", offset + 1e-2 * X, y, 4, "common offset ~1e4, spread 1e-2"))

    X, y = gaussian_classes(rng, [6] * 4, 40, sep=3.0)
    out.append(("d_gt_n", X, y, 4, "d=40 > N=24: rank-deficient total covariance, small_sample"))

    X, y = gaussian_classes(rng, [25] * 12, 5)
    out.append(("k_gt_d", X, y, 12, "K=12 > d=5: between-class covariance of full rank d"))

    X, y = gaussian_classes(rng, [60, 60, 60, 20], 6)
    zero = rng.random(len(y)) < 0.15
    X[zero] = 0.0
    X[y == 3] = 0.0  # class 3 consists of zero rows only: no unit vectors
    out.append(("zero_rows", X, y, 4, "15% all-zero rows; class 3 entirely zero rows"))

    # Collapsed: every row equals its class mean. Means live in the first 3
    # coordinates (affinely independent, dyadic values) and the other 3
    # coordinates are exactly 0, so the zero eigenvalues are exact.
    means = np.array(
        [[1.5, -0.25, 2.0], [-2.0, 0.75, 0.5], [0.25, 1.0, -1.5], [0.5, -2.5, 0.125]]
    )
    Xc = np.zeros((32, 6))
    yc = np.tile(np.arange(4), 8)
    Xc[:, :3] = means[yc]
    perm = rng.permutation(32)
    out.append(("collapsed", Xc[perm], yc[perm], 4, "every row equals its class mean: VCI = 0"))

    X, _ = gaussian_classes(rng, [20], 4)
    out.append(("single_class", X, np.full(20, 1), 3, "one class observed out of K=3: undefined"))

    out.append(("one_sample", np.array([[0.5, -1.0, 2.0]]), np.array([0]), 2, "N=1: undefined"))

    # All class means equal, exactly in any summation order: 4 classes of the
    # same 4 integer rows, interleaved, so p_k = 1/4 and every sum is exact.
    base = np.array([[1.0, 2.0, -1.0], [3.0, -2.0, 0.0], [-1.0, 0.0, 4.0], [1.0, 4.0, 1.0]])
    Xe = np.repeat(base, 4, axis=0)
    ye = np.tile(np.arange(4), 4)
    out.append(("equal_means", Xe, ye, 4, "4 classes with identical class means: rank(Sigma_B) = 0"))

    X, y = gaussian_classes(rng, [70, 30], 5)
    out.append(("two_classes", X, y, 2, "K=2: a single pair, equiangularity 0"))

    return out


def write_npy(path: Path, arr: np.ndarray, version=None):
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, version=version, allow_pickle=False)


def main():
    rng = np.random.default_rng(20230614)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*"):
        old.unlink()
    index = []
    for name, X, y, K, desc in cases(rng):
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        ref = metrics(X, y, K, strict=True)
        write_npy(OUT / f"{name}.features.npy", X)
        write_npy(OUT / f"{name}.labels.npy", y)
        expected = {"case": name, "description": desc, "num_classes": K, "expected": ref}
        (OUT / f"{name}.expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        index.append(name)
        worst = max(WORST, default=(0.0, "-"))
        WORST.clear()
        print(f"{name:15s} worst dropped/tol={worst[0]:.3f} ({worst[1]})")
        print(f"{name:15s} N={X.shape[0]:4d} d={X.shape[1]:3d} K={K:2d} vci={ref['vci']!s:22s} "
              f"ranks={ref['rank_total']}/{ref['rank_between']} undefined={ref['undefined']}")

    # Input-format variants: numpy writes these itself, vcid must read them.
    # float32 features (expected computed from the float32 values widened to
    # float64), uint8 labels in format 2.0, int16 labels in format 3.0.
    X, y = gaussian_classes(rng, [40] * 5, 7)
    X32 = X.astype(np.float32)
    ref = metrics(X32.astype(np.float64), y.astype(np.int64), 5, strict=True)
    write_npy(OUT / "float32.features.npy", X32, version=(2, 0))
    write_npy(OUT / "float32.labels.npy", y.astype(np.uint8), version=(2, 0))
    write_npy(OUT / "float32.labels_i2_v3.npy", y.astype("<i2"), version=(3, 0))
    write_npy(OUT / "float32.labels_u4.npy", y.astype("<u4"))
    write_npy(OUT / "float32.labels_i1.npy", y.astype("|i1"))
    expected = {
        "case": "float32",
        "description": "float32 features (format 2.0), uint8 labels; variants i2 (3.0), u4, i1",
        "num_classes": 5,
        "expected": ref,
    }
    (OUT / "float32.expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    index.append("float32")
    print(f"{'float32':15s} vci={ref['vci']}")

    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.glob("*"))
    print(f"wrote {len(index)} cases, {total} bytes, to {os.path.relpath(OUT)}")
    if total > 2_000_000:
        sys.exit("fixtures exceed 2 MB")


if __name__ == "__main__":
    main()
