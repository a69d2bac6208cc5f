"""Independent two-pass numpy reference for vcid's math (SPEC §2), the one
used by every test: `make_fixtures.py` writes the fixtures of the Rust tests
from it, and the Python tests (`python/tests`, via their conftest) compare
the daemon and `vcid.LocalAccumulator` with it.

Every quantity comes from its textbook definition on the whole sample at
once:

    Sigma_T = (X - mu)^T (X - mu) / N            (two-pass, centred first)
    Sigma_B = sum_k p_k (mu_k - mu)(mu_k - mu)^T  (sample-weighted)
    Sigma_W = Sigma_T - Sigma_B
    pinv / rank via eigh with tolerance lambda_max * m * eps (SPEC §2.3)

Nothing here shares code or algorithms with the Rust core or the Python
package: no streaming, no Chan merge, no Gram-matrix shortcut for
rank(Sigma_B) (that shortcut is only used as a cross-check). Means and
second moments are accumulated in np.longdouble (80-bit on x86) so the
reference is more accurate than the f64 code it checks.

With `strict=True` (the fixtures) every rank decision is checked for a
safety margin: a kept eigenvalue must be well above the tolerance and a
dropped one well below, otherwise `Ambiguous` is raised instead of writing a
fixture that could flip on rounding.
"""

from __future__ import annotations

import numpy as np

EPS = np.finfo(np.float64).eps
# A kept eigenvalue must exceed the tolerance by KEEP_MARGIN and a dropped one
# must stay below tolerance / DROP_MARGIN. Rounding noise of an exactly
# rank-deficient matrix is about eps * lambda_max while the tolerance is
# m * eps * lambda_max, so DROP_MARGIN cannot be much larger than m.
KEEP_MARGIN = 1e6
DROP_MARGIN = 4.0

WORST: list = []  # (largest dropped eigenvalue / tolerance, matrix) per strict decision


class Ambiguous(Exception):
    pass


def psd_eig(S: np.ndarray, m: int, what: str, strict: bool = False):
    """Eigen-decomposition of a symmetric PSD matrix with the §2.3 rule.

    Returns (kept eigenvalues, kept eigenvectors, tolerance)."""
    lam, V = np.linalg.eigh(S)
    lam_max = lam.max() if lam.size else 0.0
    if lam_max <= 0.0:
        return lam[:0], V[:, :0], 0.0
    tol = lam_max * m * EPS
    keep = lam > tol
    kept, dropped = lam[keep], lam[~keep]
    if strict:
        if kept.size and kept.min() < tol * KEEP_MARGIN:
            raise Ambiguous(f"{what}: smallest kept eigenvalue {kept.min():.3e} within "
                            f"x{KEEP_MARGIN} of tol {tol:.3e}")
        if dropped.size and np.abs(dropped).max() > tol / DROP_MARGIN:
            raise Ambiguous(f"{what}: largest dropped |eigenvalue| {np.abs(dropped).max():.3e} "
                            f"within x{DROP_MARGIN} of tol {tol:.3e}")
        if dropped.size:
            WORST.append((np.abs(dropped).max() / tol, what))
    return kept, V[:, keep], tol


def pinv_psd(S: np.ndarray, m: int, what: str, strict: bool = False) -> tuple[np.ndarray, int]:
    kept, Vr, _ = psd_eig(S, m, what, strict)
    return (Vr / kept) @ Vr.T, int(kept.size)


def unit_vectors(rows: np.ndarray) -> np.ndarray:
    """The rows with a non-zero norm, each divided by its norm (in the
    rows' own precision)."""
    norms = np.sqrt((rows * rows).sum(axis=1))
    keep = norms > 0
    return rows[keep] / norms[keep][:, None]


def _class_separation(Xl: np.ndarray, y: np.ndarray, K: int):
    """R² with cosine distance (Kornblith et al. 2021) over the classes with
    a non-zero row; returns (value, None) or (None, why it is undefined).

    Computed without cancellation: for unit vectors 1 - cos = |u_i - u_j|^2 / 2,
    so d_within_k = 1 - |ubar_k|^2 = sum_ij |u_i - u_j|^2 / (2 c_k^2), and
    d_total = d_within + mean_k |ubar_k - ubar|^2 (exact identity). The
    naive 1 - |ubar|^2 loses every digit when all rows share a large offset
    (all unit vectors nearly parallel, d ~ 1e-12)."""
    ld = np.longdouble
    ubar = {}
    wk = {}
    for k in range(K):
        Uk = unit_vectors(Xl[y == k])
        if len(Uk):
            ubar[k] = Uk.sum(axis=0) / ld(len(Uk))
            diffs = Uk[:, None, :] - Uk[None, :, :]
            pair = (diffs * diffs).sum(axis=2)
            wk[k] = pair.sum() / (2 * ld(len(Uk)) ** 2)
    if not ubar:
        return None, "no non-zero feature rows"
    dw = sum(wk.values()) / ld(len(ubar))
    uall = sum(ubar.values()) / ld(len(ubar))
    db = sum(((u - uall) ** 2).sum() for u in ubar.values()) / ld(len(ubar))
    dt = dw + db
    # Naive route, as a cross-check where it is well-conditioned.
    naive_dt = 1.0 - float((uall * uall).sum())
    if naive_dt > 1e-3:
        assert abs(float(dt) - naive_dt) < 1e-12, (float(dt), naive_dt)
    if dt <= 1e-12:
        return None, "total cosine distance is 0"
    return float(1.0 - dw / dt), None


def class_separation(x: np.ndarray, y: np.ndarray) -> float:
    """§2.6 class_separation of (x, y) by its definition (pairwise cosine
    distances of the normalised rows, not unit sums)."""
    y = np.asarray(y)
    value, why = _class_separation(np.asarray(x).astype(np.longdouble), y, int(y.max()) + 1)
    assert value is not None, why
    return value


def metrics(X: np.ndarray, y: np.ndarray, K: int, strict: bool = False) -> dict:
    """All SPEC §2 metrics from the direct definitions, with the counts and
    ranks of §2.7; an undefined metric is None and named in "undefined"."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
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
    lamT, VT, _ = psd_eig(ST, d, "Sigma_T", strict)
    rank_total = int(lamT.size)
    # rank(Sigma_B) from the d x d matrix itself (m = d) ...
    lamB, VB, _ = psd_eig(SB, d, "Sigma_B", strict)
    rank_between = int(lamB.size)
    # ... cross-checked with the K_obs x K_obs Gram route of §2.3 (m = max(d, K_obs)).
    M = D * np.sqrt(po)[:, None]
    if k_obs:
        lamG, _, _ = psd_eig(M @ M.T, max(d, k_obs), "Gram(Sigma_B)", strict)
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
        STp, _ = pinv_psd(ST, d, "Sigma_T", strict)
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
        SBp, _ = pinv_psd(SB, d, "Sigma_B", strict)
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

    separation, why = _class_separation(Xl, y, K)
    if separation is None:
        undef("class_separation", why)
    else:
        out["class_separation"] = separation

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


def sufficient_statistics(x: np.ndarray, y: np.ndarray, k: int) -> dict:
    """§2.1 by definition (two passes over the data, float64), plus the
    daemon's ``unit_within_trace``: Σ_{i∈k} ‖u_i − ū_k‖² over the normalised
    rows (a second pass about their mean, never c − ‖Σu‖²/c)."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    counts = np.array([(y == c).sum() for c in range(k)], dtype=np.int64)
    means = np.zeros((k, d))
    within = np.zeros(k)
    unit_sum = np.zeros((k, d))
    unit_count = np.zeros(k, dtype=np.int64)
    unit_within = np.zeros(k)
    for c in range(k):
        xc = x[y == c]
        if len(xc) == 0:
            continue
        means[c] = xc.mean(axis=0)
        within[c] = ((xc - means[c]) ** 2).sum()
        units = unit_vectors(xc)
        if len(units):
            unit_sum[c] = units.sum(axis=0)
            unit_count[c] = len(units)
            unit_within[c] = ((units - units.mean(axis=0)) ** 2).sum()
    centred = x - x.mean(axis=0)
    scatter = centred.T @ centred
    return dict(class_counts=counts, class_means=means, scatter=scatter,
                within_trace=within, unit_sum=unit_sum, unit_count=unit_count,
                unit_within_trace=unit_within)


# ---------------------------------------------------------------- bfloat16


def bfloat16_round(values) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even), returning the
    bit patterns. Written as "pick the nearer of the two neighbours in
    float64", independently of the package's integer-carry implementation."""
    f = np.asarray(values, dtype=np.float32).ravel()
    bits = f.view(np.uint32)
    out = np.empty(f.shape, dtype=np.uint16)
    for i, (v, b) in enumerate(zip(f.tolist(), bits.tolist())):
        if v != v:
            out[i] = 0x7FC0
            continue
        if abs(v) == float("inf"):
            out[i] = b >> 16
            continue
        lower = b >> 16  # truncation towards zero (sign-magnitude)
        lower_abs = abs(float(np.uint32(lower << 16).view(np.float32)))
        exp_field = (lower >> 7) & 0xFF
        ulp = 2.0 ** (-133) if exp_field == 0 else 2.0 ** (exp_field - 127 - 7)
        below = abs(v) - lower_abs
        above = lower_abs + ulp - abs(v)
        if below < above or (below == above and lower % 2 == 0):
            out[i] = lower
        else:
            out[i] = lower + 1
    return out.reshape(np.shape(values))


def bfloat16_values(bits) -> np.ndarray:
    b = np.asarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------- test data


def clustered(rng: np.random.Generator, n: int, d: int, k: int, spread: float = 1.0,
              offset: float = 0.0):
    """Class-clustered float data: class means far apart, Gaussian noise."""
    y = rng.integers(0, k, size=n)
    centres = rng.normal(size=(k, d)) * 3.0
    x = centres[y] + rng.normal(size=(n, d)) * spread + offset
    return x, y
