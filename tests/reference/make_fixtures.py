#!/usr/bin/env python3
"""Independent two-pass numpy reference for vcid's math core (SPEC §2).

Writes small fixtures to tests/reference/fixtures/: for every case
`<case>.features.npy` (float64 unless the case says otherwise),
`<case>.labels.npy` and `<case>.expected.json` with the metrics computed here
from the direct textbook definitions:

    Sigma_T = (X - mu)^T (X - mu) / N            (two-pass, centred first)
    Sigma_B = sum_k p_k (mu_k - mu)(mu_k - mu)^T  (sample-weighted)
    Sigma_W = Sigma_T - Sigma_B
    pinv / rank via eigh with tolerance lambda_max * m * eps (SPEC §2.3)

Nothing here shares code or algorithms with the Rust core: no streaming, no
Chan merge, no Gram-matrix shortcut for rank(Sigma_B) (that shortcut is only
used as a cross-check). Means and second moments are accumulated in
np.longdouble (80-bit on x86) so the reference is more accurate than the f64
code it checks.

Every rank decision is checked for a safety margin: a kept eigenvalue must
be well above the tolerance and a dropped one well below, otherwise the case
would be ambiguous and the script stops instead of writing a fixture that
could flip on rounding.

Run: /work/main/.venv/bin/python tests/reference/make_fixtures.py
Deterministic: a fixed seed; re-running rewrites byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

EPS = np.finfo(np.float64).eps
HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures"
# A kept eigenvalue must exceed the tolerance by KEEP_MARGIN and a dropped one
# must stay below tolerance / DROP_MARGIN. Rounding noise of an exactly
# rank-deficient matrix is about eps * lambda_max while the tolerance is
# m * eps * lambda_max, so DROP_MARGIN cannot be much larger than m.
KEEP_MARGIN = 1e6
DROP_MARGIN = 4.0


WORST: list = []  # (largest dropped eigenvalue / tolerance, matrix) per decision


class Ambiguous(Exception):
    pass


def psd_eig(S: np.ndarray, m: int, what: str):
    """Eigen-decomposition of a symmetric PSD matrix with the §2.3 rule.

    Returns (kept eigenvalues, kept eigenvectors, tolerance)."""
    lam, V = np.linalg.eigh(S)
    lam_max = lam.max() if lam.size else 0.0
    if lam_max <= 0.0:
        return lam[:0], V[:, :0], 0.0
    tol = lam_max * m * EPS
    keep = lam > tol
    kept, dropped = lam[keep], lam[~keep]
    if kept.size and kept.min() < tol * KEEP_MARGIN:
        raise Ambiguous(f"{what}: smallest kept eigenvalue {kept.min():.3e} within x{KEEP_MARGIN} of tol {tol:.3e}")
    if dropped.size and np.abs(dropped).max() > tol / DROP_MARGIN:
        raise Ambiguous(
            f"{what}: largest dropped |eigenvalue| {np.abs(dropped).max():.3e} within x{DROP_MARGIN} of tol {tol:.3e}"
        )
    if dropped.size:
        WORST.append((np.abs(dropped).max() / tol, what))
    return kept, V[:, keep], tol


def pinv_psd(S: np.ndarray, m: int, what: str) -> tuple[np.ndarray, int]:
    kept, Vr, _ = psd_eig(S, m, what)
    return (Vr / kept) @ Vr.T, int(kept.size)


def reference(X: np.ndarray, y: np.ndarray, K: int) -> dict:
    """All SPEC §2 metrics from the direct definitions."""
    N, d = X.shape
    ld = np.longdouble
    counts = np.bincount(y, minlength=K).astype(np.int64)
    observed = np.flatnonzero(counts)
    k_obs = int(observed.size)
    out: dict = {
        "samples": int(N),
        "classes_observed": k_obs,
        "feature_dim": int(d),
        "small_sample": bool(N <= d + k_obs),
    }
    undefined: dict[str, str] = {}

    if N == 0:
        raise ValueError("empty case")
    Xl = X.astype(ld)
    mu_l = Xl.sum(axis=0) / ld(N)
    Xc_l = Xl - mu_l  # two-pass: centre first
    # Class means about the global mean, in extended precision.
    cm_l = np.zeros((K, d), dtype=ld)
    for k in observed:
        cm_l[k] = Xc_l[y == k].sum(axis=0) / ld(counts[k])
    ST = ((Xc_l.T @ Xc_l) / ld(N)).astype(np.float64)
    p = counts.astype(np.float64) / N
    D = cm_l[observed].astype(np.float64)  # (mu_k - mu), observed classes
    if k_obs == 1:
        # mu_k - mu is exactly 0 for a single class; the extended-precision
        # rounding residue must not count as a between-class direction.
        D[:] = 0.0
    po = p[observed]
    SB = (D.T * po) @ D
    SW = ST - SB

    # Sigma_T eigen-decomposition: rank_total, VCI, probe, effective rank.
    lamT, VT, _ = psd_eig(ST, d, "Sigma_T")
    rank_total = int(lamT.size)
    # rank(Sigma_B) from the d x d matrix itself (m = d) ...
    lamB, VB, _ = psd_eig(SB, d, "Sigma_B")
    rank_between = int(lamB.size)
    # ... cross-checked with the K_obs x K_obs Gram route of §2.3 (m = max(d, K_obs)).
    M = D * np.sqrt(po)[:, None]
    if k_obs:
        lamG, _, _ = psd_eig(M @ M.T, max(d, k_obs), "Gram(Sigma_B)")
        assert lamG.size == rank_between, (lamG.size, rank_between)
    out["rank_total"] = rank_total
    out["rank_between"] = rank_between

    def undef(name: str, why: str):
        undefined[name] = why
        out[name] = None

    basic_why = None
    if N < 2:
        basic_why = "fewer than 2 samples"
    elif k_obs < 2:
        basic_why = "fewer than 2 classes observed"

    # Tr(Sigma_T^+ Sigma_B) and the probe term via the kept eigenpairs.
    if rank_total:
        Z = (D @ VT) / np.sqrt(lamT)  # rows: Lambda^{-1/2} V^T (mu_k - mu)
        quad = (Z**2).sum(axis=1)  # (mu_k - mu)^T Sigma_T^+ (mu_k - mu)
    else:
        quad = np.zeros(k_obs)
    tr_tb = float((po * quad).sum())
    # Independent second route for the trace (explicit pinv; reference only).
    if rank_total:
        STp, _ = pinv_psd(ST, d, "Sigma_T")
        assert abs(np.trace(STp @ SB) - tr_tb) <= 1e-10 * max(1.0, abs(tr_tb))

    if basic_why:
        undef("vci", basic_why)
    elif rank_between == 0:
        undef("vci", "rank of between-class covariance is 0")
    else:
        out["vci"] = 1.0 - tr_tb / rank_between

    # Defined for any N >= 1: with one class (or one sample) the best affine
    # probe predicts the constant one-hot vector exactly, so the MSE is 0.
    out["linear_probe_mse"] = float(1.0 - (po**2).sum() - (po**2 * quad).sum())

    if basic_why:
        undef("nc1", basic_why)
    elif rank_between == 0:
        undef("nc1", "rank of between-class covariance is 0")
    else:
        SBp, _ = pinv_psd(SB, d, "Sigma_B")
        out["nc1"] = float(np.trace(SW @ SBp) / k_obs)

    # CDNV: pairs of observed classes, V_k from the rows (two-pass).
    if basic_why:
        undef("cdnv", basic_why)
    else:
        V = {}
        for k in observed:
            R = Xc_l[y == k] - cm_l[k]
            V[k] = float((R * R).sum() / ld(counts[k]))
        terms = []
        zero_pair = False
        for a in range(k_obs):
            for b in range(a + 1, k_obs):
                ka, kb = observed[a], observed[b]
                diff = cm_l[ka] - cm_l[kb]
                dist2 = float((diff * diff).sum())
                if dist2 == 0.0:
                    zero_pair = True
                    break
                terms.append((V[ka] + V[kb]) / (2.0 * dist2))
        if zero_pair:
            undef("cdnv", "two class means coincide")
        else:
            out["cdnv"] = float(np.mean(terms))

    # Class separation from unit vectors of non-zero rows (cosine R^2).
    # Computed without cancellation: for unit vectors 1 - cos = |u_i - u_j|^2 / 2,
    # so d_within_k = 1 - |ubar_k|^2 = sum_ij |u_i - u_j|^2 / (2 c_k^2), and
    # d_total = d_within + mean_k |ubar_k - ubar|^2 (exact identity). The
    # naive 1 - |ubar|^2 loses every digit when all rows share a large offset
    # (all unit vectors nearly parallel, d ~ 1e-12).
    norms = np.sqrt((Xl * Xl).sum(axis=1))
    nz = norms > 0
    c = np.zeros(K, dtype=np.int64)
    ubar = {}
    wk = {}
    for k in range(K):
        sel = (y == k) & nz
        c[k] = int(sel.sum())
        if c[k]:
            Uk = Xl[sel] / norms[sel][:, None]
            ubar[k] = Uk.sum(axis=0) / ld(c[k])
            diffs = Uk[:, None, :] - Uk[None, :, :]
            pair = (diffs * diffs).sum(axis=2)
            wk[k] = pair.sum() / (2 * ld(c[k]) ** 2)
    kp = np.flatnonzero(c)
    if kp.size == 0:
        undef("class_separation", "no non-zero feature rows")
    else:
        dw = sum(wk[k] for k in kp) / ld(kp.size)
        uall = sum(ubar[k] for k in kp) / ld(kp.size)
        db = sum(((ubar[k] - uall) ** 2).sum() for k in kp) / ld(kp.size)
        dt = dw + db
        # Naive route, as a cross-check where it is well-conditioned.
        naive_dt = 1.0 - float((uall * uall).sum())
        if naive_dt > 1e-3:
            assert abs(float(dt) - naive_dt) < 1e-12, (float(dt), naive_dt)
        if dt <= 1e-12:
            undef("class_separation", "total cosine distance is 0")
        else:
            out["class_separation"] = float(1.0 - dw / dt)

    # NC2: norms and angles of the centred class means.
    cnorm = np.sqrt((D * D).sum(axis=1))
    if basic_why:
        undef("equinorm", basic_why)
        undef("equiangularity", basic_why)
    elif cnorm.mean() == 0.0 or rank_between == 0:
        undef("equinorm", "all class means coincide")
        undef("equiangularity", "all class means coincide")
    else:
        out["equinorm"] = float(cnorm.std(ddof=0) / cnorm.mean())
        if (cnorm == 0).any():
            undef("equiangularity", "a class mean equals the global mean")
        else:
            Dn = D / cnorm[:, None]
            G = Dn @ Dn.T
            iu = np.triu_indices(k_obs, 1)
            out["equiangularity"] = float(G[iu].std(ddof=0))

    if rank_total == 0:
        undef("effective_rank", "total covariance is 0")
    else:
        s = np.sqrt(lamT)
        q = s / s.sum()
        out["effective_rank"] = float(np.exp(-(q * np.log(q)).sum()))

    out["undefined"] = sorted(undefined)
    return out


# ---------------------------------------------------------------- cases


def clustered(rng, counts, d, sep=2.0, noise=1.0, mix=True):
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

    X, y = clustered(rng, [100] * 6, 16)
    out.append(("balanced", X, y, 6, "well-conditioned, 6 balanced classes, d=16, N=600"))

    X, y = clustered(rng, [250, 120, 70, 40, 20], 12)
    out.append(("imbalanced", X, y, 5, "imbalanced classes 250/120/70/40/20, d=12"))

    X, y6 = clustered(rng, [50] * 6, 10)
    used = np.array([0, 1, 2, 4, 7, 9])
    out.append(("unused_classes", X, used[y6], 12, "K=12, only classes 0,1,2,4,7,9 occur"))

    X, y = clustered(rng, [100] * 4, 8)
    offset = 1e4 * (1.0 + 0.1 * rng.normal(size=8))
    out.append(("large_offset", offset + 1e-2 * X, y, 4, "common offset ~1e4, spread 1e-2"))

    X, y = clustered(rng, [6] * 4, 40, sep=3.0)
    out.append(("d_gt_n", X, y, 4, "d=40 > N=24: rank-deficient total covariance, small_sample"))

    X, y = clustered(rng, [25] * 12, 5)
    out.append(("k_gt_d", X, y, 12, "K=12 > d=5: between-class covariance of full rank d"))

    X, y = clustered(rng, [60, 60, 60, 20], 6)
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

    X, _ = clustered(rng, [20], 4)
    out.append(("single_class", X, np.full(20, 1), 3, "one class observed out of K=3: undefined"))

    out.append(("one_sample", np.array([[0.5, -1.0, 2.0]]), np.array([0]), 2, "N=1: undefined"))

    # All class means equal, exactly in any summation order: 4 classes of the
    # same 4 integer rows, interleaved, so p_k = 1/4 and every sum is exact.
    base = np.array([[1.0, 2.0, -1.0], [3.0, -2.0, 0.0], [-1.0, 0.0, 4.0], [1.0, 4.0, 1.0]])
    Xe = np.repeat(base, 4, axis=0)
    ye = np.tile(np.arange(4), 4)
    out.append(("equal_means", Xe, ye, 4, "4 classes with identical class means: rank(Sigma_B) = 0"))

    X, y = clustered(rng, [70, 30], 5)
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
        ref = reference(X, y, K)
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
    X, y = clustered(rng, [40] * 5, 7)
    X32 = X.astype(np.float32)
    ref = reference(X32.astype(np.float64), y.astype(np.int64), 5)
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
