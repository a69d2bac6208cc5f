"""Independent numpy reference for the tests: SPEC §2 written out directly
from its definitions, two-pass, in float64, on the whole sample at once.

Nothing here is shared with the package: no Chan merge, no single pass, no
Gram-matrix tricks; every quantity is computed the obvious (slow) way so that
agreement with the daemon and with ``LocalAccumulator`` means something.
"""

from __future__ import annotations

import itertools

import numpy as np

EPS = np.finfo(np.float64).eps


def sufficient_statistics(x: np.ndarray, y: np.ndarray, k: int) -> dict:
    """§2.1 by definition (two passes over the data), plus the daemon's
    ``unit_within_trace``: Σ_{i∈k} ‖u_i − ū_k‖² over the normalised rows
    (a second pass about their mean, never c − ‖Σu‖²/c)."""
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
        for row in xc:
            norm = np.linalg.norm(row)
            if norm > 0:
                unit_sum[c] += row / norm
                unit_count[c] += 1
        units = unit_vectors(xc)
        if len(units):
            unit_within[c] = ((units - units.mean(axis=0)) ** 2).sum()
    centred = x - x.mean(axis=0)
    scatter = centred.T @ centred
    return dict(class_counts=counts, class_means=means, scatter=scatter,
                within_trace=within, unit_sum=unit_sum, unit_count=unit_count,
                unit_within_trace=unit_within)


def unit_vectors(rows: np.ndarray) -> np.ndarray:
    """The rows with a non-zero norm, each divided by its norm."""
    norms = np.linalg.norm(rows, axis=1)
    keep = norms > 0
    return rows[keep] / norms[keep][:, None]


def mean_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of 1 − cos(h_i, h_j) over all pairs i ∈ a, j ∈ b of unit vectors,
    as ‖u_i − u_j‖²/2 from the differences themselves (no Gram matrix, so
    nearly parallel vectors keep their digits)."""
    total = 0.0
    for start in range(0, len(a), 64):
        diff = a[start:start + 64, None, :] - b[None, :, :]
        total += np.einsum("ijk,ijk->", diff, diff) / 2.0
    return total / (len(a) * len(b))


def class_separation(x: np.ndarray, y: np.ndarray) -> float:
    """R² with cosine distance (Kornblith et al. 2021) by its definition,
    over the classes with a non-zero row: d̄_within is the mean over classes
    of the mean cosine distance between two rows of the class, d̄_total the
    mean over all pairs of classes (k, l), k = l included, of the mean cosine
    distance between a row of k and a row of l; R² = 1 − d̄_within/d̄_total.
    Equal to SPEC §2.6's formula in exact arithmetic (1 − cos = ‖u_i − u_j‖²/2
    for unit vectors), but independent of the unit sums."""
    units = [unit_vectors(np.asarray(x, dtype=np.float64)[y == c]) for c in np.unique(y)]
    units = [u for u in units if len(u)]
    within = np.mean([mean_cosine_distance(u, u) for u in units])
    total = np.mean([mean_cosine_distance(a, b) for a in units for b in units])
    return 1.0 - within / total


def _kept_eigen(s: np.ndarray, m: int):
    """Eigenpairs of symmetric PSD ``s`` above the §2.3 tolerance λ_max·m·ε."""
    w, v = np.linalg.eigh(s)
    lam_max = max(w.max(), 0.0)
    keep = w > lam_max * m * EPS
    return w[keep], v[:, keep]


def pinv(s: np.ndarray, m: int | None = None) -> np.ndarray:
    w, v = _kept_eigen(s, s.shape[0] if m is None else m)
    return (v / w) @ v.T


def rank(s: np.ndarray, m: int | None = None) -> int:
    return len(_kept_eigen(s, s.shape[0] if m is None else m)[0])


def metrics(x: np.ndarray, y: np.ndarray, k: int) -> dict:
    """§2.2–2.6 by definition."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    classes = [c for c in range(k) if (y == c).any()]
    k_obs = len(classes)
    p = np.array([(y == c).mean() for c in classes])
    mu = x.mean(axis=0)
    mu_k = np.array([x[y == c].mean(axis=0) for c in classes])
    centred = x - mu
    sigma_t = centred.T @ centred / n
    sigma_b = sum(pk * np.outer(m - mu, m - mu) for pk, m in zip(p, mu_k))
    sigma_w = sigma_t - sigma_b
    st_pinv = pinv(sigma_t)
    rank_b = rank(sigma_b, max(d, k_obs))
    out = dict(samples=n, classes_observed=k_obs, feature_dim=d,
               rank_total=rank(sigma_t), rank_between=rank_b,
               small_sample=n <= d + k_obs)
    out["vci"] = 1.0 - np.trace(st_pinv @ sigma_b) / rank_b
    out["linear_probe_mse"] = (1.0 - (p ** 2).sum()
                               - sum(pk ** 2 * (m - mu) @ st_pinv @ (m - mu)
                                     for pk, m in zip(p, mu_k)))
    out["nc1"] = np.trace(sigma_w @ pinv(sigma_b)) / k_obs
    var_k = [((x[y == c] - m) ** 2).sum(axis=1).mean() for c, m in zip(classes, mu_k)]
    out["cdnv"] = np.mean([
        (var_k[a] + var_k[b]) / (2 * ((mu_k[a] - mu_k[b]) ** 2).sum())
        for a, b in itertools.combinations(range(k_obs), 2)
    ])
    out["class_separation"] = class_separation(x, y)
    norms = np.linalg.norm(mu_k - mu, axis=1)
    out["equinorm"] = norms.std() / norms.mean()  # population std (ddof=0)
    cos = [
        (mu_k[a] - mu) @ (mu_k[b] - mu) / (norms[a] * norms[b])
        for a, b in itertools.combinations(range(k_obs), 2)
    ]
    out["equiangularity"] = np.std(cos)
    lam, _ = _kept_eigen(sigma_t, d)
    sig = np.sqrt(lam)
    q = sig / sig.sum()
    out["effective_rank"] = float(np.exp(-(q * np.log(q)).sum()))
    return out


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


def clustered(rng: np.random.Generator, n: int, d: int, k: int, spread: float = 1.0,
              offset: float = 0.0):
    """Class-clustered float data: class means far apart, Gaussian noise."""
    y = rng.integers(0, k, size=n)
    centres = rng.normal(size=(k, d)) * 3.0
    x = centres[y] + rng.normal(size=(n, d)) * spread + offset
    return x, y
