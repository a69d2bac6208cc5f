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
//! - `Σ_T = M2/N` is decomposed once; only the kept eigenpairs (the
//!   tolerance of `docs/metrics.md`, a contiguous tail since eigenvalues
//!   come ascending) are used after.
//! - `Z = Λ_r^{-1/2} V_rᵀ M` gives `Tr(Σ_T† Σ_B) = ‖Z‖²_F` (VCI) and its
//!   column norms give the linear-probe MSE. No inverse is ever formed.
//! - `Σ_B` is handled through `G = MᵀM` (K × K) when K ≤ d, else directly
//!   (d × d); its kept eigenpairs give rank(Σ_B) and, for NC1,
//!   `Tr(Σ_W Σ_B†) = Σ_j u_jᵀ Σ_T u_j / β_j − rank(Σ_B)`, where `u_j` are the
//!   eigenvectors of Σ_B with eigenvalues `β_j` (Σ_W = Σ_T − Σ_B).
//! - The Gram matrix `H = CᵀC` of the centred class means gives CDNV's
//!   pairwise distances and the cosines of equiangularity.
//!
//! Statistics conventions (`docs/metrics.md`, "Conventions"): `std` in
//! equinorm and equiangularity is the population standard deviation (divide
//! by the count, not count − 1). VCI, NC1 and the probe MSE are clamped into their
//! mathematical ranges ([0, 1], ≥ 0, ≥ 0) to remove rounding residue only.

use std::collections::BTreeMap;

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use crate::linalg::{EigenError, SymmetricEigen};
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

    // Σ_T and its kept eigenpairs.
    let scatter = acc.scatter_lower();
    let total = Mat::from_fn(
        dim,
        dim,
        |i, j| if i >= j { scatter[(i, j)] / n } else { 0.0 },
    );
    let total_eigen = SymmetricEigen::of_lower(total.as_ref(), par)?;
    drop(total);
    let kept_total = total_eigen.kept(dim);
    metrics.rank_total = kept_total.len();
    let first_kept = kept_total.first().copied().unwrap_or(dim);
    let lambda = &total_eigen.values[first_kept..];
    let v_kept = total_eigen
        .vectors
        .as_ref()
        .subcols(first_kept, dim - first_kept);

    metrics.effective_rank = effective_rank(lambda);
    if metrics.effective_rank.is_none() {
        metrics.note(
            "effective_rank",
            "Σ_T is zero: every sample is the same vector",
        );
    }

    // Z = Λ_r^{-1/2} V_rᵀ M.
    let mut z = Mat::<f64>::zeros(lambda.len(), k_obs);
    matmul(
        z.as_mut(),
        Accum::Replace,
        v_kept.transpose(),
        m.as_ref(),
        1.0,
        par,
    );
    let y_kept = z.clone();
    for (i, &l) in lambda.iter().enumerate() {
        let scale = 1.0 / l.sqrt();
        for j in 0..k_obs {
            z[(i, j)] *= scale;
        }
    }
    let z_column_squares: Vec<f64> = (0..k_obs)
        .map(|j| z.col_as_slice(j).iter().map(|v| v * v).sum())
        .collect();
    let trace_pinv_total_between: f64 = z_column_squares.iter().sum();

    let sum_p_squared: f64 = weights.iter().map(|p| p * p).sum();
    let explained: f64 = weights
        .iter()
        .zip(&z_column_squares)
        .map(|(p, z2)| p * z2)
        .sum();
    metrics.linear_probe_mse = Some((1.0 - sum_p_squared - explained).max(0.0));

    // Σ_B: rank and eigenpairs, through the smaller of G = MᵀM and M Mᵀ.
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
    let between = BetweenEigen::new(&m, &gram, &weights, par)?;
    metrics.rank_between = between.values.len();

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
        // P = V_rᵀ U_B: u_jᵀ Σ_T u_j = Σ_i λ_i P_ij².
        let p = between.project(v_kept, y_kept.as_ref(), par);
        let mut trace = 0.0;
        for (j, &beta) in between.values.iter().enumerate() {
            let quadratic: f64 = lambda
                .iter()
                .zip(p.col_as_slice(j))
                .map(|(l, x)| l * x * x)
                .sum();
            trace += quadratic / beta;
        }
        metrics.nc1 = Some(((trace - rank_b) / k_obs as f64).max(0.0));
    }

    class_mean_geometry(acc, &observed, &gram, &mut metrics);
    class_separation(acc, &mut metrics);
    Ok(metrics)
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

    /// `V_rᵀ U_B` (r_T × r_B), given `V_r` and `Y_r = V_rᵀ M`.
    fn project(&self, v_kept: MatRef<'_, f64>, y_kept: MatRef<'_, f64>, par: Par) -> Mat<f64> {
        match &self.vectors {
            BetweenVectors::Gram(w) => {
                let mut p = Mat::<f64>::zeros(y_kept.nrows(), w.ncols());
                matmul(p.as_mut(), Accum::Replace, y_kept, w.as_ref(), 1.0, par);
                for (j, &beta) in self.values.iter().enumerate() {
                    let scale = 1.0 / beta.sqrt();
                    p.col_as_slice_mut(j).iter_mut().for_each(|x| *x *= scale);
                }
                p
            }
            BetweenVectors::Direct(u) => {
                let mut p = Mat::<f64>::zeros(v_kept.ncols(), u.ncols());
                matmul(
                    p.as_mut(),
                    Accum::Replace,
                    v_kept.transpose(),
                    u.as_ref(),
                    1.0,
                    par,
                );
                p
            }
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
