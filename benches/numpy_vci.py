#!/usr/bin/env python3
"""Baseline for benches/compute_vs_numpy.sh: VCI only, in numpy float64.

What a competent numpy user would write (issue 2's baseline): load the .npy
files, widen to float64, centre, X.T @ X (numpy dispatches the transposed
self-product to BLAS syrk), class means, eigh, VCI. No companion metrics.

Usage: numpy_vci.py X.npy y.npy  -> prints the VCI
"""

import sys

import numpy as np


def main(features: str, labels: str) -> None:
    X = np.load(features).astype(np.float64)
    y = np.load(labels)
    n, d = X.shape
    mu = X.mean(axis=0)
    X -= mu  # centre in place (no second copy)
    St = (X.T @ X) / n
    k = int(y.max()) + 1
    counts = np.bincount(y, minlength=k)
    obs = np.flatnonzero(counts)
    # Centred class means. A boolean mask per class is faster here than
    # np.add.at (measured: 0.10 s vs 0.68 s at 65,536 x 1,024, 100 classes).
    means = np.stack([X[y == c].mean(axis=0) for c in obs])
    p = counts[obs] / n
    M = means * np.sqrt(p)[:, None]  # rows sqrt(p_k)(mu_k - mu)
    lam, V = np.linalg.eigh(St)
    eps = np.finfo(np.float64).eps
    keep = lam > lam.max() * d * eps
    Z = (M @ V[:, keep]) / np.sqrt(lam[keep])
    trace = float((Z * Z).sum())
    g = np.linalg.eigvalsh(M @ M.T)
    rank_b = int((g > g.max() * max(d, len(obs)) * eps).sum())
    print(1.0 - trace / rank_b)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
