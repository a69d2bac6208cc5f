//! Neural-collapse metrics of one closed epoch (`docs/metrics.md`).
//!
//! Owns [`compute`], which turns an [`Accumulator`] into [`EpochMetrics`]:
//! VCI and the linear-probe MSE from one symmetric eigendecomposition of
//! Σ_T = V Λ Vᵀ, plus NC1, CDNV, class separation, equinorm,
//! equiangularity and effective rank. A metric that is undefined for the
//! data is `None` and `notes` says why; nothing here returns NaN.
//!
//! Pure computation: no I/O, no clocks, no history (so `vci_delta`, which
//! needs the previous epoch, is the caller's: see [`vci_delta`]).
//!
//! How the work is laid out, for d features and K observed classes (the
//! columns of `M = [√p_k (μ_k − μ)]`, d × K):
//! - The eigenvalues of `Σ_T = M2/N` decide its kept spectrum (the
//!   tolerance of `docs/metrics.md`, a contiguous tail since eigenvalues
//!   come ascending). When every eigenvalue is kept (the usual case with
//!   N > d), Σ_T† = Σ_T⁻¹ is applied through a Cholesky factor `L`, and
//!   the eigenvectors are never computed; otherwise through the kept
//!   eigenpairs `V_r, Λ_r` (`TotalFactor`).
//! - `Z = Λ_r^{-1/2} V_rᵀ M` (or `L⁻¹ M`) gives `Tr(Σ_T† Σ_B) = ‖Z‖²_F`
//!   (VCI) and its column norms give the linear-probe MSE. No inverse is
//!   ever formed.
//! - `Σ_B` is handled through `G = MᵀM` (K × K) when K ≤ d, else directly
//!   (d × d); its kept eigenpairs give rank(Σ_B) and, for NC1,
//!   `Tr(Σ_W Σ_B†) = Σ_j u_jᵀ Σ_T u_j / β_j − rank(Σ_B)`, where `u_j` are the
//!   eigenvectors of Σ_B with eigenvalues `β_j` (Σ_W = Σ_T − Σ_B).
//! - The Gram matrix `H = CᵀC` of the centred class means gives CDNV's
//!   pairwise distances and the cosines of equiangularity.
//! - Σ_T's side (its eigenvalues; its Cholesky factor, `X M` and `Z`) and
//!   Σ_B's side (`H`, `G` and G's eigenpairs) share nothing until NC1:
//!   with `Par::Rayon` they run side by side (as do Σ_T's eigenvalues and
//!   its Cholesky factor), so that the sequential stretches of each
//!   overlap the other's parallel products.
//!
//! Statistics conventions (`docs/metrics.md`, "Conventions"): `std` in
//! equinorm and equiangularity is the population standard deviation (divide
//! by the count, not count − 1). VCI, NC1 and the probe MSE are clamped into their
//! mathematical ranges ([0, 1], ≥ 0, ≥ 0) to remove rounding residue only.

use std::collections::BTreeMap;

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use faer::linalg::triangular_solve::solve_lower_triangular_in_place;

use crate::linalg::{cholesky_lower, nonzero_threshold, EigenError, SymmetricEigen};
use crate::stats::Accumulator;

pub mod registry;

/// A close could not produce metrics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    /// The eigensolver failed on Σ_T or Σ_B.
    #[error("computing the metrics failed: {0}")]
    Eigen(#[from] EigenError),
}

/// Everything an epoch result holds that can be computed from the epoch's
/// statistics alone (`docs/metrics.md`, "The epoch result"). Serialises
/// with the metric names, metrics first (the JSON of
/// `vcid compute`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EpochMetrics {
    /// Variability Collapse Index, in [0, 1]; 0 is complete collapse.
    pub vci: Option<f64>,
    /// MSE of the best affine probe from features to one-hot labels.
    pub linear_probe_mse: Option<f64>,
    /// Tr(Σ_W Σ_B†) / K_obs (Papyan et al.).
    pub nc1: Option<f64>,
    /// Class-distance normalized variance (Galanti et al.), mean over pairs.
    pub cdnv: Option<f64>,
    /// R² class separation with cosine distance (Kornblith et al.).
    pub class_separation: Option<f64>,
    /// std / mean of the centred class-mean norms (NC2).
    pub equinorm: Option<f64>,
    /// std of the pairwise cosines of centred class means (NC2).
    pub equiangularity: Option<f64>,
    /// exp(entropy) of the normalised singular values of the centred features.
    pub effective_rank: Option<f64>,
    /// N.
    pub samples: u64,
    /// K_obs, classes with at least one sample.
    pub classes_observed: usize,
    /// d.
    pub feature_dim: usize,
    /// rank(Σ_T) under the tolerance of `docs/metrics.md`.
    pub rank_total: usize,
    /// rank(Σ_B) under the tolerance of `docs/metrics.md`.
    pub rank_between: usize,
    /// N ≤ d + K_obs: an affine probe can fit the sample exactly.
    pub small_sample: bool,
    /// Metric name → why it is undefined.
    pub notes: BTreeMap<String, String>,
}

/// VCI of this epoch minus VCI of the previous closed epoch of the same
/// stream; absent when either is.
pub fn vci_delta(current: Option<f64>, previous: Option<f64>) -> Option<f64> {
    Some(current? - previous?)
}

/// Computes every metric of one epoch (`docs/metrics.md`) from `acc`, with
/// the given parallelism for the dense kernels.
pub fn compute(acc: &Accumulator, par: Par) -> Result<EpochMetrics, MetricsError> {
    let samples = acc.samples();
    let dim = acc.feature_dim();
    let observed: Vec<usize> = (0..acc.num_classes())
        .filter(|&k| acc.class_counts()[k] > 0)
        .collect();
    let k_obs = observed.len();
    let mut metrics = EpochMetrics {
        samples,
        classes_observed: k_obs,
        feature_dim: dim,
        vci: None,
        linear_probe_mse: None,
        nc1: None,
        cdnv: None,
        class_separation: None,
        equinorm: None,
        equiangularity: None,
        effective_rank: None,
        rank_total: 0,
        rank_between: 0,
        small_sample: samples <= (dim + k_obs) as u64,
        notes: BTreeMap::new(),
    };
    if samples == 0 {
        for metric in registry::epoch_metrics() {
            metrics.note(metric.name, "the epoch has no samples");
        }
        return Ok(metrics);
    }

    let n = samples as f64;
    let weights: Vec<f64> = observed
        .iter()
        .map(|&k| acc.class_counts()[k] as f64 / n)
        .collect();
    let mean = acc.global_mean();
    let centred_means = Mat::from_fn(dim, k_obs, |i, j| acc.class_mean(observed[j])[i] - mean[i]);
    let m = Mat::from_fn(dim, k_obs, |i, j| weights[j].sqrt() * centred_means[(i, j)]);

    // The two sides side by side (see the module docs): the bulge chasing
    // and QL of Σ_T's eigenvalues and faer's tridiagonal solver on G are
    // sequential, and overlap the other side's products (BENCHMARKS.md,
    // "The close's two sides side by side").
    let scatter = acc.scatter_lower();
    let total_lower = || {
        Mat::from_fn(
            dim,
            dim,
            |i, j| if i >= j { scatter[(i, j)] / n } else { 0.0 },
        )
    };
    let (total, between) = join(
        par,
        || TotalSide::new(total_lower, &m, par),
        || -> Result<_, EigenError> {
            let gram = gram_of_centred_means(&centred_means, par);
            let between = BetweenEigen::new(&m, &gram, &weights, par)?;
            Ok((gram, between))
        },
    );
    let TotalSide {
        lambda,
        factor,
        xm,
        whitened_squares,
    } = total?;
    let (gram, between) = between?;
    metrics.rank_total = lambda.len();
    metrics.rank_between = between.values.len();

    metrics.effective_rank = effective_rank(&lambda);
    if metrics.effective_rank.is_none() {
        metrics.note(
            "effective_rank",
            "Σ_T is zero: every sample is the same vector",
        );
    }

    let trace_pinv_total_between: f64 = whitened_squares.iter().sum();
    let sum_p_squared: f64 = weights.iter().map(|p| p * p).sum();
    let explained: f64 = weights
        .iter()
        .zip(&whitened_squares)
        .map(|(p, z2)| p * z2)
        .sum();
    metrics.linear_probe_mse = Some((1.0 - sum_p_squared - explained).max(0.0));

    let vci_undefined = if samples < 2 {
        Some("fewer than 2 samples")
    } else if k_obs < 2 {
        Some("fewer than 2 classes observed")
    } else if between.values.is_empty() {
        Some("rank(Σ_B) = 0: every class mean equals the global mean")
    } else {
        None
    };
    if let Some(reason) = vci_undefined {
        metrics.note("vci", reason);
        metrics.note("nc1", reason);
    } else {
        let rank_b = between.values.len() as f64;
        metrics.vci = Some((1.0 - trace_pinv_total_between / rank_b).clamp(0.0, 1.0));
        // P = X U_B: u_jᵀ Σ_T u_j = Σ_i w_i P_ij² (see `TotalFactor`).
        let p = between.project(&factor, xm.as_ref(), par);
        let mut trace = 0.0;
        for (j, &beta) in between.values.iter().enumerate() {
            trace += factor.quadratic(&lambda, p.col_as_slice(j)) / beta;
        }
        metrics.nc1 = Some(((trace - rank_b) / k_obs as f64).max(0.0));
    }

    class_mean_geometry(acc, &observed, &gram, &mut metrics);
    class_separation(acc, &mut metrics);
    Ok(metrics)
}

/// `(a(), b())`: side by side on rayon's pool under `Par::Rayon`, one
/// after the other under `Par::Seq`.
fn join<A: Send, B: Send>(
    par: Par,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    match par {
        Par::Seq => (a(), b()),
        Par::Rayon(_) => rayon::join(a, b),
    }
}

/// The lower triangle of `H = CᵀC`, the Gram matrix of the centred class
/// means `C` (d × K_obs).
fn gram_of_centred_means(centred_means: &Mat<f64>, par: Par) -> Mat<f64> {
    let k_obs = centred_means.ncols();
    let mut gram = Mat::<f64>::zeros(k_obs, k_obs);
    triangular_matmul(
        gram.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        centred_means.transpose(),
        BlockStructure::Rectangular,
        centred_means.as_ref(),
        BlockStructure::Rectangular,
        1.0,
        par,
    );
    gram
}

impl EpochMetrics {
    fn note(&mut self, metric: &str, reason: &str) {
        self.notes.insert(metric.to_owned(), reason.to_owned());
    }
}

/// The kept eigenpairs of Σ_B, computed the cheaper way.
struct BetweenEigen {
    /// Kept eigenvalues β_j of Σ_B.
    values: Vec<f64>,
    /// How to reach the eigenvectors u_j.
    vectors: BetweenVectors,
}

enum BetweenVectors {
    /// Eigenvectors w_j of G = MᵀM (K × r); u_j = M w_j / √β_j.
    Gram(Mat<f64>),
    /// Eigenvectors u_j of Σ_B = M Mᵀ themselves (d × r).
    Direct(Mat<f64>),
}

impl BetweenEigen {
    fn new(m: &Mat<f64>, gram: &Mat<f64>, weights: &[f64], par: Par) -> Result<Self, EigenError> {
        let (dim, k_obs) = (m.nrows(), m.ncols());
        if k_obs == 0 {
            return Ok(Self {
                values: Vec::new(),
                vectors: BetweenVectors::Gram(Mat::zeros(0, 0)),
            });
        }
        if k_obs <= dim {
            // G_kl = √(p_k p_l) (μ_k − μ)·(μ_l − μ), from the Gram of centred means.
            let g = Mat::from_fn(k_obs, k_obs, |i, j| {
                if i >= j {
                    (weights[i] * weights[j]).sqrt() * gram[(i, j)]
                } else {
                    0.0
                }
            });
            let eigen = SymmetricEigen::of_lower(g.as_ref(), par)?;
            let kept = eigen.kept(dim.max(k_obs));
            let first = kept.first().copied().unwrap_or(k_obs);
            Ok(Self {
                values: eigen.values[first..].to_vec(),
                vectors: BetweenVectors::Gram(
                    eigen.vectors.subcols(first, k_obs - first).to_owned(),
                ),
            })
        } else {
            let mut between = Mat::<f64>::zeros(dim, dim);
            triangular_matmul(
                between.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Replace,
                m.as_ref(),
                BlockStructure::Rectangular,
                m.transpose(),
                BlockStructure::Rectangular,
                1.0,
                par,
            );
            let eigen = SymmetricEigen::of_lower(between.as_ref(), par)?;
            let kept = eigen.kept(dim);
            let first = kept.first().copied().unwrap_or(dim);
            Ok(Self {
                values: eigen.values[first..].to_vec(),
                vectors: BetweenVectors::Direct(
                    eigen.vectors.subcols(first, dim - first).to_owned(),
                ),
            })
        }
    }

    /// `X U_B` (rows of X × r_B), given `X M`.
    fn project(&self, factor: &TotalFactor, xm: MatRef<'_, f64>, par: Par) -> Mat<f64> {
        match &self.vectors {
            BetweenVectors::Gram(w) => {
                let mut p = Mat::<f64>::zeros(xm.nrows(), w.ncols());
                matmul(p.as_mut(), Accum::Replace, xm, w.as_ref(), 1.0, par);
                for (j, &beta) in self.values.iter().enumerate() {
                    let scale = 1.0 / beta.sqrt();
                    p.col_as_slice_mut(j).iter_mut().for_each(|x| *x *= scale);
                }
                p
            }
            BetweenVectors::Direct(u) => factor.apply(u.as_ref(), par),
        }
    }
}

/// Σ_T's side of a close: its kept eigenvalues, the factor that applies
/// it, and the columns of M through that factor.
struct TotalSide {
    /// The kept eigenvalues of Σ_T, ascending (the tolerance of
    /// `docs/metrics.md`).
    lambda: Vec<f64>,
    factor: TotalFactor,
    /// `X M` (see [`TotalFactor`]; rank(Σ_T) × K_obs).
    xm: Mat<f64>,
    /// `m_jᵀ Σ_T† m_j` for each column `m_j` of M.
    whitened_squares: Vec<f64>,
}

impl TotalSide {
    /// `total()` builds Σ_T's lower triangle; `m` is M (d × K_obs).
    ///
    /// Σ_T's eigenvalues are computed without vectors and, beside them,
    /// its Cholesky factor and M through it, on the bet that every
    /// eigenvalue is kept (the usual case with N > d; a matrix with no
    /// Cholesky factor is not numerically positive definite). When an
    /// eigenvalue is dropped, the kept eigenpairs are computed instead.
    fn new(
        total: impl Fn() -> Mat<f64> + Sync,
        m: &Mat<f64>,
        par: Par,
    ) -> Result<Self, EigenError> {
        let (values, cholesky) = join(
            par,
            || SymmetricEigen::values_of_lower(total(), par),
            || {
                cholesky_lower(total(), par).map(|l| {
                    let factor = TotalFactor::Cholesky(l);
                    let (xm, whitened_squares) = factor.products(&[], m, par);
                    (factor, xm, whitened_squares)
                })
            },
        );
        let values = values?;
        if let Some((factor, xm, whitened_squares)) = cholesky {
            let threshold = nonzero_threshold(&values, m.nrows());
            if values.iter().all(|&v| v > threshold) {
                return Ok(Self {
                    lambda: values,
                    factor,
                    xm,
                    whitened_squares,
                });
            }
        }
        let (lambda, factor) = TotalFactor::eigen(total().as_ref(), par)?;
        let (xm, whitened_squares) = factor.products(&lambda, m, par);
        Ok(Self {
            lambda,
            factor,
            xm,
            whitened_squares,
        })
    }
}

/// Σ_T as a map `X` with `Σ_T = Xᵀ diag(w) X` on the space of its kept
/// eigenvalues, so that `aᵀ Σ_T a = Σ_i w_i (X a)_i²` and the metrics
/// never form Σ_T† or Σ_T.
enum TotalFactor {
    /// The eigenvectors, of which columns `first..` are the kept ones
    /// `V_r` (d × r): `X = V_rᵀ`, `w = λ` (kept).
    Eigen(Mat<f64>, usize),
    /// When Σ_T keeps every eigenvalue (it is then invertible, Σ_T† =
    /// Σ_T⁻¹): its Cholesky factor `L` (lower, zeros above), `X = Lᵀ`,
    /// `w = 1`. The same numbers as the eigenvectors up to rounding,
    /// without computing them (about half the time of a close at d = 2048).
    Cholesky(Mat<f64>),
}

impl TotalFactor {
    /// The kept eigenpairs of the matrix whose lower triangle is `lower`.
    fn eigen(lower: MatRef<'_, f64>, par: Par) -> Result<(Vec<f64>, Self), EigenError> {
        let dim = lower.nrows();
        let eigen = SymmetricEigen::of_lower(lower, par)?;
        let first = eigen.kept(dim).first().copied().unwrap_or(dim);
        let lambda = eigen.values[first..].to_vec();
        Ok((lambda, Self::Eigen(eigen.vectors, first)))
    }

    /// `X a` for the columns of `a` (d × c).
    fn apply(&self, a: MatRef<'_, f64>, par: Par) -> Mat<f64> {
        match self {
            Self::Eigen(vectors, first) => {
                let v = vectors.subcols(*first, vectors.ncols() - first);
                let mut out = Mat::<f64>::zeros(v.ncols(), a.ncols());
                matmul(out.as_mut(), Accum::Replace, v.transpose(), a, 1.0, par);
                out
            }
            Self::Cholesky(l) => {
                let mut out = Mat::<f64>::zeros(l.nrows(), a.ncols());
                triangular_matmul(
                    out.as_mut(),
                    BlockStructure::Rectangular,
                    Accum::Replace,
                    l.transpose(),
                    BlockStructure::TriangularUpper,
                    a,
                    BlockStructure::Rectangular,
                    1.0,
                    par,
                );
                out
            }
        }
    }

    /// `X a` and `a_jᵀ Σ_T† a_j` for the columns of `a` (d × c), the
    /// latter as `‖z_j‖²` with `Z = Λ_r^{-1/2} X a` or `L⁻¹ a` (no inverse
    /// is formed). `lambda` holds the kept eigenvalues (unused with the
    /// Cholesky factor).
    fn products(&self, lambda: &[f64], a: &Mat<f64>, par: Par) -> (Mat<f64>, Vec<f64>) {
        let xa = self.apply(a.as_ref(), par);
        let z = match self {
            Self::Eigen(..) => {
                let mut z = xa.clone();
                for (i, &l) in lambda.iter().enumerate() {
                    let scale = 1.0 / l.sqrt();
                    for j in 0..z.ncols() {
                        z[(i, j)] *= scale;
                    }
                }
                z
            }
            Self::Cholesky(l) => {
                let mut z = a.clone();
                solve_lower_triangular_in_place(l.as_ref(), z.as_mut(), par);
                z
            }
        };
        let squares = (0..z.ncols())
            .map(|j| z.col_as_slice(j).iter().map(|v| v * v).sum())
            .collect();
        (xa, squares)
    }

    /// `aᵀ Σ_T a = Σ_i w_i (X a)_i²`, given `X a`.
    fn quadratic(&self, lambda: &[f64], xa: &[f64]) -> f64 {
        match self {
            Self::Eigen(..) => lambda.iter().zip(xa).map(|(l, x)| l * x * x).sum(),
            Self::Cholesky(_) => xa.iter().map(|x| x * x).sum(),
        }
    }
}

/// RankMe-style effective rank from the kept eigenvalues of Σ_T.
fn effective_rank(kept_eigenvalues: &[f64]) -> Option<f64> {
    let sigma: Vec<f64> = kept_eigenvalues.iter().map(|l| l.sqrt()).collect();
    let total: f64 = sigma.iter().sum();
    if sigma.is_empty() || total <= 0.0 {
        return None;
    }
    let entropy: f64 = sigma
        .iter()
        .map(|s| s / total)
        .filter(|&q| q > 0.0)
        .map(|q| -q * q.ln())
        .sum();
    Some(entropy.exp())
}

/// CDNV, equinorm and equiangularity from the lower triangle of the Gram
/// matrix `H` of the centred class means (observed classes only).
fn class_mean_geometry(
    acc: &Accumulator,
    observed: &[usize],
    gram: &Mat<f64>,
    metrics: &mut EpochMetrics,
) {
    let k_obs = observed.len();
    if k_obs < 2 {
        for name in ["cdnv", "equinorm", "equiangularity"] {
            metrics.note(name, "fewer than 2 classes observed");
        }
        return;
    }
    let norms: Vec<f64> = (0..k_obs).map(|j| gram[(j, j)].max(0.0).sqrt()).collect();

    let mean_norm = norms.iter().sum::<f64>() / k_obs as f64;
    if mean_norm > 0.0 {
        metrics.equinorm = Some(population_std(&norms) / mean_norm);
    } else {
        metrics.note("equinorm", "every class mean equals the global mean");
    }

    let variance: Vec<f64> = observed
        .iter()
        .map(|&k| acc.within_trace()[k] / acc.class_counts()[k] as f64)
        .collect();
    let mut cdnv_sum = 0.0;
    let mut cosines = Vec::with_capacity(k_obs * (k_obs - 1) / 2);
    let mut coinciding = None;
    for l in 0..k_obs {
        for k in 0..l {
            let distance_squared = gram[(k, k)] + gram[(l, l)] - 2.0 * gram[(l, k)];
            if distance_squared > 0.0 {
                cdnv_sum += (variance[k] + variance[l]) / (2.0 * distance_squared);
            } else {
                coinciding.get_or_insert((observed[k], observed[l]));
            }
            if norms[k] > 0.0 && norms[l] > 0.0 {
                cosines.push(gram[(l, k)] / (norms[k] * norms[l]));
            }
        }
    }
    match coinciding {
        None => metrics.cdnv = Some(cdnv_sum / (k_obs * (k_obs - 1) / 2) as f64),
        Some((a, b)) => metrics.note(
            "cdnv",
            &format!("classes {a} and {b} have the same mean, so their distance is 0"),
        ),
    }
    if cosines.len() == k_obs * (k_obs - 1) / 2 {
        metrics.equiangularity = Some(population_std(&cosines));
    } else {
        metrics.note(
            "equiangularity",
            "a class mean equals the global mean, so its angle is undefined",
        );
    }
}

/// R² class separation with cosine distance (`docs/metrics.md`), over the
/// K' classes with a non-zero row. With ū_k the mean unit vector of class k and ū their
/// average, the textbook d̄_within = (1/K') Σ_k (1 − ‖ū_k‖²) is computed as
/// (1/K') Σ_k unit_within_trace_k / c_k, and d̄_total = 1 − ‖ū‖² as
/// d̄_within + (1/K') Σ_k ‖ū_k − ū‖² (the same quantities in exact
/// arithmetic, without the cancellation of `1 − ‖·‖²` when every direction
/// nearly coincides). Then R² = 1 − d̄_within / d̄_total.
fn class_separation(acc: &Accumulator, metrics: &mut EpochMetrics) {
    let with_units: Vec<usize> = (0..acc.num_classes())
        .filter(|&k| acc.unit_count()[k] > 0)
        .collect();
    if with_units.is_empty() {
        metrics.note(
            "class_separation",
            "no sample has a non-zero feature vector",
        );
        return;
    }
    let classes = with_units.len() as f64;
    let class_directions: Vec<Vec<f64>> = with_units
        .iter()
        .map(|&k| {
            let count = acc.unit_count()[k] as f64;
            acc.unit_sum(k).iter().map(|u| u / count).collect()
        })
        .collect();
    let mut mean_direction = vec![0.0; acc.feature_dim()];
    for direction in &class_directions {
        for (m, &u) in mean_direction.iter_mut().zip(direction) {
            *m += u / classes;
        }
    }
    let within = with_units
        .iter()
        .map(|&k| acc.unit_within_trace()[k] / acc.unit_count()[k] as f64)
        .sum::<f64>()
        / classes;
    let between = class_directions
        .iter()
        .map(|direction| {
            direction
                .iter()
                .zip(&mean_direction)
                .map(|(u, m)| (u - m) * (u - m))
                .sum::<f64>()
        })
        .sum::<f64>()
        / classes;
    let total = within + between;
    if total > 0.0 {
        metrics.class_separation = Some(between / total);
    } else {
        metrics.note(
            "class_separation",
            "every non-zero sample points the same way, so the total cosine distance is 0",
        );
    }
}

fn population_std(values: &[f64]) -> f64 {
    let count = values.len() as f64;
    let mean = values.iter().sum::<f64>() / count;
    (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Cholesky factor and the kept eigenpairs of a full-rank Σ_T give
    /// the same `a_jᵀ Σ_T⁻¹ a_j` and `a_jᵀ Σ_T a_j` as an explicit solve
    /// and product, so the close may use either.
    #[test]
    fn cholesky_and_eigenpairs_apply_the_same_total() {
        let d = 7;
        let root = Mat::from_fn(d, d, |i, j| {
            ((i * 7 + j * 3) % 5) as f64 - 2.0 + if i == j { 4.0 } else { 0.0 }
        });
        let mut total = Mat::<f64>::zeros(d, d);
        matmul(
            total.as_mut(),
            Accum::Replace,
            root.as_ref(),
            root.transpose(),
            1.0,
            Par::Seq,
        );
        let lower = Mat::from_fn(d, d, |i, j| if i >= j { total[(i, j)] } else { 0.0 });
        let a = Mat::from_fn(d, 3, |i, j| (i as f64 - 3.0) * (j as f64 + 0.5));
        let TotalSide {
            lambda,
            factor: cholesky,
            ..
        } = TotalSide::new(|| lower.clone(), &a, Par::Seq).unwrap();
        assert!(matches!(cholesky, TotalFactor::Cholesky(_)));
        let (lambda_eigen, eigen) = TotalFactor::eigen(lower.as_ref(), Par::Seq).unwrap();
        assert!(matches!(eigen, TotalFactor::Eigen(..)));
        assert_eq!(lambda.len(), d);
        for (x, y) in lambda.iter().zip(&lambda_eigen) {
            assert!((x - y).abs() < 1e-12 * lambda[d - 1], "{x} vs {y}");
        }
        // Independent reference: Σ_T⁻¹ a by faer's LU solve.
        let inverse_a = faer::linalg::solvers::Solve::solve(&total.partial_piv_lu(), &a);
        for factor in [&cholesky, &eigen] {
            let (xa, whitened_squares) = factor.products(&lambda, &a, Par::Seq);
            for j in 0..3 {
                let col = a.col(j);
                let inverse_form: f64 = (0..d).map(|i| col[i] * inverse_a[(i, j)]).sum();
                let whitened = whitened_squares[j];
                assert!((whitened - inverse_form).abs() < 1e-10 * inverse_form.abs());
                let direct: f64 = (0..d)
                    .flat_map(|i| (0..d).map(move |k| (i, k)))
                    .map(|(i, k)| col[i] * total[(i, k)] * col[k])
                    .sum();
                let quadratic = factor.quadratic(&lambda, xa.col_as_slice(j));
                assert!((quadratic - direct).abs() < 1e-10 * direct.abs());
            }
        }
    }
}
