//! Exact, single-pass, mergeable class statistics (`docs/metrics.md`, "The
//! statistics behind them").
//!
//! Owns [`Accumulator`]: per-class counts and means, the total scatter about
//! the global mean, per-class within-class traces, unit-vector sums and the
//! within-class trace of the unit vectors (see below). A batch is folded in
//! place ([`Accumulator::fold_batch_with`], or
//! [`Accumulator::fold_values_with`] for rows of any [`Value`] type, such
//! as float32 bytes read where they were received): its statistics about its own
//! means are computed in a reusable [`FoldScratch`] (`batch`), and merged
//! with the parallel formula of Chan, Golub & LeVeque: the batch's scatter
//! and the correction `δδᵀ·n_a·n_b/n` enter the accumulator's scatter as one
//! triangular product, and only the classes present in the batch are
//! touched (`classes`). [`Accumulator::merge`] combines whole accumulators
//! (ranks, connections, shards of one stream) with the same formula, so how
//! a stream was split into batches or shards changes the result only by
//! rounding.
//!
//! Pure computation in f64 (inputs are widened exactly where read): no
//! I/O, no locking, no knowledge of runs or
//! epochs. It must never use the naive `Σx² − N·x̄²` form, which loses every
//! digit when features share a large offset.
//!
//! One statistic beyond the usual set: `unit_within_trace_k = Σ_{i∈k} ‖u_i − ū_k‖²`
//! (u_i = h_i/‖h_i‖, ū_k = unit_sum_k/unit_count_k), merged by the same Chan
//! formula as `within_trace`. In exact arithmetic it equals
//! `unit_count_k − ‖unit_sum_k‖²/unit_count_k`, which is what the
//! textbook class-separation formula uses; computed that way it cancels
//! catastrophically when a class's directions nearly coincide (a large common
//! offset makes every cosine distance ~1e-12), so it is kept explicitly.
//! Statistics that arrive without it (an older or minimal client) get it
//! derived from the unit sums.
//!
//! Storage: the scatter lives in a column-major `d × d` faer matrix of which
//! only the lower triangle (diagonal included) is maintained; class means and
//! unit sums are row-major `K × d` vectors so one class is one contiguous
//! slice. For storage the triangle can be packed column by column
//! ([`Accumulator::packed_scatter`], [`unpack_scatter`]), and
//! [`Accumulator::merged_packed`] merges accumulators straight into that
//! form (the daemon's checkpoints) with the merge formula, never building
//! a d × d matrix.

mod batch;
mod classes;
pub mod reduce;
pub(crate) mod simd;

use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{Accum, Mat};
use ndarray::ArrayView2;

pub use batch::{operand_stride, FoldScratch};
pub use faer::Par;
pub use simd::Value;

use classes::ClassStats;

/// Most samples one accumulator may hold: 2⁵³, so every count is exact as
/// an f64 (the merge weights `n_a·n_b/n` are computed in f64) and no total
/// can wrap a u64.
pub const MAX_SAMPLES: u64 = 1 << 53;
/// Largest feature magnitude statistics from outside may describe:
/// `f32::MAX`, the largest value a `FeatureBatch` can carry. Checked as
/// `|class_means| ≤` it and, per dimension, the Bhatia–Davis bound of
/// values within `±MAX_ABS_FEATURE`: `scatter[i][i] ≤ N·(M² − μ_i²)` and
/// `within_trace_k ≤ n_k·(d·M² − ‖μ_k‖²)`. Both are kept by the Chan merge
/// (the merged statistics satisfy them whenever the parts do), so a
/// checkpoint of accepted blocks passes again at restore, and every value
/// stays below `2⁵³·M²` ≈ 1e93, whose squares are finite.
pub const MAX_ABS_FEATURE: f64 = f32::MAX as f64;
/// A scatter S of statistics from outside must be positive semi-definite
/// within this relative tolerance: `S + PSD_TOLERANCE·tr(S)·I` must have a
/// Cholesky factorisation, i.e. (up to rounding) no eigenvalue of S is below
/// `−PSD_TOLERANCE·tr(S)`. Scatters computed in f64 miss by rounding
/// (~1e-16·tr), far inside it.
pub const PSD_TOLERANCE: f64 = 1e-9;

/// Most rows one triangular product of a fold takes: faer's product of a
/// d × k operand with itself runs at its best rate for k up to about 300
/// and slows down beyond (BENCHMARKS.md: at d = 1,024, 2,048-row blocks
/// took 1.5× the time of 256-row ones), so larger batches are folded in
/// blocks of this many rows (the result differs only by rounding).
const FOLD_BLOCK_ROWS: usize = 256;

/// Why statistics could not be built or combined. Every message names the
/// field, what was expected and what was received.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    /// A batch with no rows.
    #[error("rows: expected at least 1 row, received 0")]
    EmptyBatch,
    /// The feature matrix has no columns.
    #[error("feature_dim: expected at least 1, received 0")]
    NoFeatures,
    /// Label count differs from the number of feature rows.
    #[error("labels: expected {expected} labels (one per row), received {received}")]
    LabelCount { expected: usize, received: usize },
    /// A label outside `[0, num_classes)`.
    #[error("labels[{row}]: expected a class in [0, {num_classes}), received {label}")]
    LabelOutOfRange {
        row: usize,
        label: u32,
        num_classes: usize,
    },
    /// NaN or ±Inf in the features.
    #[error("features[{row}][{column}]: expected a finite number, received {value}")]
    NonFinite {
        row: usize,
        column: usize,
        value: f64,
    },
    /// Two accumulators of different shapes.
    #[error("{field}: expected {expected} to merge, received {received}")]
    ShapeMismatch {
        field: &'static str,
        expected: usize,
        received: usize,
    },
    /// A field of [`AccumulatorParts`] that does not describe valid statistics.
    #[error("{field}: expected {expected}, received {received}")]
    InvalidPart {
        field: &'static str,
        expected: String,
        received: String,
    },
}

/// The statistics of `docs/metrics.md` in plain row-major vectors; mirrors the wire's
/// `StatsBlock` field for field.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccumulatorParts {
    pub num_classes: usize,
    pub feature_dim: usize,
    /// `n_k`, length K.
    pub class_counts: Vec<u64>,
    /// `mean_k`, K × d row-major.
    pub class_means: Vec<f64>,
    /// M2 about the global mean, d × d row-major, full symmetric matrix.
    pub scatter: Vec<f64>,
    /// `Σ_{i∈k} ‖h_i − μ_k‖²`, length K.
    pub within_trace: Vec<f64>,
    /// `Σ_{i∈k} h_i/‖h_i‖` over non-zero rows, K × d row-major.
    pub unit_sum: Vec<f64>,
    /// Rows that entered `unit_sum`, length K.
    pub unit_count: Vec<u64>,
    /// `Σ_{i∈k} ‖u_i − ū_k‖²` over the rows of `unit_sum`, length K. Empty
    /// means "not provided": it is then derived from `unit_sum` and
    /// `unit_count` (exact in exact arithmetic, less accurate in floating
    /// point; see the module docs).
    #[serde(default)]
    pub unit_within_trace: Vec<f64>,
}

/// Exact streaming statistics of one (stream, epoch): see the module docs.
#[derive(Clone, Debug)]
pub struct Accumulator {
    classes: ClassStats,
    /// Lower triangle of M2 = Σ (h − μ)(h − μ)ᵀ; the upper triangle is stale.
    scatter: Mat<f64>,
    /// The running global mean μ, moved by the Chan update with every fold
    /// and merge (O(d), where `Σ_k n_k μ_k / N` would cost O(K·d) per batch).
    /// Equal to [`Accumulator::global_mean`] up to rounding; only the
    /// scatter's Chan correction reads it.
    mean: Vec<f64>,
}

impl Accumulator {
    /// An empty accumulator for `num_classes` classes of `feature_dim`-long
    /// features.
    pub fn new(num_classes: usize, feature_dim: usize) -> Self {
        Self {
            classes: ClassStats::new(num_classes, feature_dim),
            scatter: Mat::zeros(feature_dim, feature_dim),
            mean: vec![0.0; feature_dim],
        }
    }

    /// The statistics of one batch: row `i` of `features` has label
    /// `labels[i]`. Validates everything before computing anything. Equal
    /// to folding the batch into [`Accumulator::new`].
    pub fn from_batch(
        features: ArrayView2<'_, f64>,
        labels: &[u32],
        num_classes: usize,
        par: Par,
    ) -> Result<Self, StatsError> {
        validate_batch(features.dim(), labels, num_classes)?;
        let mut acc = Self::new(num_classes, features.ncols());
        acc.fold_batch_with(features, labels, &mut FoldScratch::new(), par)?;
        Ok(acc)
    }

    /// Refuses the first label outside `[0, num_classes)`, with the error
    /// [`Accumulator::fold_batch_with`] gives (for a caller that checks a
    /// batch's values itself, before decoding them).
    pub fn check_labels(labels: &[u32], num_classes: usize) -> Result<(), StatsError> {
        match labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            Some((row, &label)) => Err(StatsError::LabelOutOfRange {
                row,
                label,
                num_classes,
            }),
            None => Ok(()),
        }
    }

    /// [`Accumulator::fold_batch_with`] with scratch buffers of its own
    /// (allocated for this one call).
    pub fn fold_batch(
        &mut self,
        features: ArrayView2<'_, f64>,
        labels: &[u32],
        par: Par,
    ) -> Result<(), StatsError> {
        self.fold_batch_with(features, labels, &mut FoldScratch::new(), par)
    }

    /// Folds one batch into `self` in place: row `i` of `features` has label
    /// `labels[i]`. The fast path: the batch is centred on its own mean in
    /// `scratch` (reused from batch to batch, so nothing of size d × d or
    /// d × rows is allocated once it has grown), its scatter and the Chan
    /// correction are added to `self`'s scatter by one lower-triangular
    /// product, and only the classes present in the batch are merged. A
    /// batch of more than 256 rows is folded in blocks of 256 (one product
    /// each, where the product is fastest), after a check of every value;
    /// the bits are those of folding the blocks one call at a time. `par`
    /// applies to the product, the batch's per-class and per-row passes and
    /// the class merge; the passes' results do not depend on it. Equal, up
    /// to rounding, to merging [`Accumulator::from_batch`] of the batch. On
    /// any error `self` is left unchanged.
    pub fn fold_batch_with(
        &mut self,
        features: ArrayView2<'_, f64>,
        labels: &[u32],
        scratch: &mut FoldScratch,
        par: Par,
    ) -> Result<(), StatsError> {
        if features.ncols() != self.feature_dim() {
            return Err(StatsError::ShapeMismatch {
                field: "feature_dim",
                expected: self.feature_dim(),
                received: features.ncols(),
            });
        }
        // Row-major values as one slice (a copy only for an unusual layout),
        // so every per-row pass runs over plain slices.
        let copied: Vec<f64>;
        let values = match features.as_slice() {
            Some(values) => values,
            None => {
                copied = features.iter().copied().collect();
                &copied
            }
        };
        self.fold_values_with(values, labels, scratch, par)
    }

    /// [`Accumulator::fold_batch_with`] of rows given as one row-major slice
    /// of `feature_dim` values per row (one row per label), in any [`Value`]
    /// type: `[u8; 4]` reads little-endian float32 bytes where they lie (a
    /// received buffer), with no widened copy of the batch. The result is
    /// bit for bit that of the same values widened to f64.
    pub fn fold_values_with<T: Value>(
        &mut self,
        values: &[T],
        labels: &[u32],
        scratch: &mut FoldScratch,
        par: Par,
    ) -> Result<(), StatsError> {
        let dim = self.feature_dim();
        if dim == 0 {
            return Err(StatsError::NoFeatures);
        }
        if !values.len().is_multiple_of(dim) {
            return Err(invalid(
                "features",
                format!("whole rows of feature_dim = {dim} values"),
                format!("{} values", values.len()),
            ));
        }
        let rows = values.len() / dim;
        validate_batch((rows, dim), labels, self.num_classes())?;
        if rows <= FOLD_BLOCK_ROWS {
            return self.fold_block(values, labels, scratch, par);
        }
        // The blocks are folded one after the other: every value is checked
        // first, so that an error still leaves `self` unchanged.
        if simd::checked_sums(values).0.is_nan() {
            if let Some(i) = values.iter().position(|v| !v.wide().is_finite()) {
                return Err(StatsError::NonFinite {
                    row: i / dim,
                    column: i % dim,
                    value: values[i].wide(),
                });
            }
        }
        let blocks = values
            .chunks(FOLD_BLOCK_ROWS * dim)
            .zip(labels.chunks(FOLD_BLOCK_ROWS));
        for (block, block_labels) in blocks {
            self.fold_block(block, block_labels, scratch, par)?;
        }
        Ok(())
    }

    /// One block of [`Accumulator::fold_values_with`]: its statistics, then one
    /// triangular product and the merge of the classes present.
    fn fold_block<T: Value>(
        &mut self,
        values: &[T],
        labels: &[u32],
        scratch: &mut FoldScratch,
        par: Par,
    ) -> Result<(), StatsError> {
        scratch.compute(values, self.feature_dim(), labels, self.num_classes(), par)?;

        let (n_a, n_b) = (self.samples(), labels.len() as u64);
        let n = n_a + n_b;
        let chan = (n_a > 0).then(|| (n_a as f64 * n_b as f64 / n as f64, self.mean.as_slice()));
        let operand = scratch.scatter_operand(chan);
        matmul(
            self.scatter.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            operand,
            BlockStructure::Rectangular,
            operand.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        simd::move_mean(&mut self.mean, &scratch.mean, n_b as f64 / n as f64);
        let single = scratch.single_rows(values);
        self.classes
            .merge_slots(&scratch.present, &scratch.classes, single, par.degree());
        Ok(())
    }

    /// Folds `other` into `self` with the Chan–Golub–LeVeque formula:
    /// `M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n`, and likewise per class for the
    /// means and within-class traces. Combines ranks, connections, or the
    /// shards one stream was folded into. On a shape mismatch `self` is left
    /// unchanged.
    pub fn merge(&mut self, other: &Accumulator) -> Result<(), StatsError> {
        merge_into(&mut self.mean, &mut self.classes, &mut self.scatter, other)
    }

    /// The statistics of `accs` merged ([`Accumulator::merge`], in order:
    /// the same bits), with an empty `parts.scatter` and the scatter packed
    /// beside it ([`Accumulator::packed_scatter`]), without a d × d copy:
    /// memory peaks at the class tables and d·(d+1)/2 values. Errors as
    /// `merge` on a shape mismatch; `None` for no accumulators.
    pub fn merged_packed<'a>(
        accs: impl IntoIterator<Item = &'a Accumulator>,
    ) -> Option<Result<(AccumulatorParts, Vec<f64>), StatsError>> {
        let mut accs = accs.into_iter();
        let first = accs.next()?;
        let d = first.feature_dim();
        let (mut mean, mut classes) = (first.mean.clone(), first.classes.clone());
        let mut packed = first.packed_scatter();
        let mut columns = Packed {
            values: &mut packed,
            d,
        };
        for acc in accs {
            if let Err(err) = merge_into(&mut mean, &mut classes, &mut columns, acc) {
                return Some(Err(err));
            }
        }
        Some(Ok((parts(Vec::new(), classes), packed)))
    }

    /// K, the number of classes this accumulator was made for.
    pub fn num_classes(&self) -> usize {
        self.classes.counts.len()
    }

    /// d, the feature dimension.
    pub fn feature_dim(&self) -> usize {
        self.classes.feature_dim
    }

    /// N, the number of samples folded in.
    pub fn samples(&self) -> u64 {
        self.classes.samples()
    }

    /// `n_k` for every class.
    pub fn class_counts(&self) -> &[u64] {
        &self.classes.counts
    }

    /// Class mean `μ_k` (all zeros for a class with no samples).
    pub fn class_mean(&self, class: usize) -> &[f64] {
        self.classes.row(&self.classes.means, class)
    }

    /// `Σ_{i∈k} ‖h_i − μ_k‖²`.
    pub fn within_trace(&self) -> &[f64] {
        &self.classes.within_trace
    }

    /// `Σ_{i∈k} h_i/‖h_i‖` for one class.
    pub fn unit_sum(&self, class: usize) -> &[f64] {
        self.classes.row(&self.classes.unit_sum, class)
    }

    /// Rows per class that entered the unit sums.
    pub fn unit_count(&self) -> &[u64] {
        &self.classes.unit_count
    }

    /// `Σ_{i∈k} ‖u_i − ū_k‖²` per class (see the module docs).
    pub fn unit_within_trace(&self) -> &[f64] {
        &self.classes.unit_within_trace
    }

    /// M2 with only its lower triangle (diagonal included) meaningful.
    pub fn scatter_lower(&self) -> faer::MatRef<'_, f64> {
        self.scatter.as_ref()
    }

    /// The global mean μ = Σ_k n_k μ_k / N (zeros when empty).
    pub fn global_mean(&self) -> Vec<f64> {
        self.classes.global_mean()
    }

    /// Bytes of the statistics an accumulator of `num_classes` classes in
    /// `feature_dim` dimensions holds: 8·(d² + 2Kd + 4K), i.e. the d × d
    /// scatter (allocated square, though only its lower triangle is used),
    /// per class the mean and the sum of unit vectors (d values each) and
    /// four scalars (count, within-class trace, unit count, unit
    /// within-trace), each 8 bytes. `None` when that exceeds `u64` (no such
    /// accumulator can exist). The one formula for this size: the daemon's
    /// memory budget and `vcid compute`'s memory check both use it.
    pub fn estimated_bytes(num_classes: u64, feature_dim: u64) -> Option<u64> {
        let (k, d) = (num_classes, feature_dim);
        let per_class = d.checked_mul(2)?.checked_add(4)?;
        d.checked_mul(d)?
            .checked_add(k.checked_mul(per_class)?)?
            .checked_mul(8)
    }

    /// The statistics as plain vectors (the scatter as a full symmetric
    /// matrix), e.g. for the wire or a checkpoint.
    pub fn to_parts(&self) -> AccumulatorParts {
        parts(self.full_scatter(), self.classes.clone())
    }

    /// The scatter's lower triangle (diagonal included) packed column by
    /// column: `M2[j][j], M2[j+1][j], …, M2[d−1][j]` for j = 0, …, d − 1,
    /// d·(d+1)/2 values, half the bytes of the full matrix of
    /// [`Accumulator::to_parts`] (the form the daemon's checkpoints store).
    /// [`unpack_scatter`] is its inverse.
    pub fn packed_scatter(&self) -> Vec<f64> {
        let d = self.feature_dim();
        let mut packed = Vec::with_capacity(d * (d + 1) / 2);
        for j in 0..d {
            packed.extend_from_slice(&self.scatter.col_as_slice(j)[j..]);
        }
        packed
    }

    /// The scatter as a full row-major d × d matrix (both triangles).
    fn full_scatter(&self) -> Vec<f64> {
        let d = self.feature_dim();
        let mut scatter = vec![0.0; d * d];
        for j in 0..d {
            for i in j..d {
                let value = self.scatter[(i, j)];
                scatter[i * d + j] = value;
                scatter[j * d + i] = value;
            }
        }
        scatter
    }

    /// Rebuilds an accumulator from parts computed elsewhere, after checking
    /// that they describe valid statistics: lengths, finiteness, a total
    /// count of at most [`MAX_SAMPLES`], magnitudes that features within
    /// [`MAX_ABS_FEATURE`] can have, a symmetric positive semi-definite scatter
    /// (within [`PSD_TOLERANCE`]), non-negative traces, unit counts within
    /// class counts, and nothing recorded for empty classes. An empty
    /// `unit_within_trace` is derived from the unit sums.
    pub fn from_parts(mut parts: AccumulatorParts) -> Result<Self, StatsError> {
        if parts.unit_within_trace.is_empty() {
            parts.unit_within_trace = derived_unit_within_trace(&parts);
        }
        validate_parts(&parts)?;
        let AccumulatorParts {
            num_classes: _,
            feature_dim: d,
            class_counts,
            class_means,
            scatter,
            within_trace,
            unit_sum,
            unit_count,
            unit_within_trace,
        } = parts;
        // Average the two triangles: a client's gemm may leave them a few
        // ulps apart.
        let scatter = Mat::from_fn(d, d, |i, j| 0.5 * (scatter[i * d + j] + scatter[j * d + i]));
        let classes = ClassStats {
            feature_dim: d,
            counts: class_counts,
            means: class_means,
            within_trace,
            unit_sum,
            unit_count,
            unit_within_trace,
        };
        Ok(Self {
            mean: classes.global_mean(),
            classes,
            scatter,
        })
    }
}

/// A scatter's lower triangle (diagonal included) by columns: the d × d
/// matrix of an accumulator, or the packed form
/// ([`Accumulator::packed_scatter`]). The one merge formula
/// ([`merge_into`]) writes both.
trait LowerColumns {
    /// Rows j, …, d − 1 of column j.
    fn lower_col_mut(&mut self, j: usize) -> &mut [f64];
}

impl LowerColumns for Mat<f64> {
    fn lower_col_mut(&mut self, j: usize) -> &mut [f64] {
        &mut self.col_as_slice_mut(j)[j..]
    }
}

/// A packed d × d triangle: column j starts after the d − c values of
/// every column c < j, at j·d − j·(j − 1)/2.
struct Packed<'a> {
    values: &'a mut [f64],
    d: usize,
}

impl LowerColumns for Packed<'_> {
    fn lower_col_mut(&mut self, j: usize) -> &mut [f64] {
        let start = j * self.d - j * j.saturating_sub(1) / 2;
        &mut self.values[start..start + self.d - j]
    }
}

/// [`Accumulator::merge`] of `other` into statistics held as a global
/// mean, class tables and a scatter's lower columns (an accumulator's, or
/// the packed sum of [`Accumulator::merged_packed`]). On an error nothing
/// is changed.
fn merge_into(
    mean: &mut [f64],
    classes: &mut ClassStats,
    scatter: &mut impl LowerColumns,
    other: &Accumulator,
) -> Result<(), StatsError> {
    let shapes = [
        ("num_classes", classes.counts.len(), other.num_classes()),
        ("feature_dim", classes.feature_dim, other.feature_dim()),
    ];
    for (field, expected, received) in shapes {
        if expected != received {
            return Err(StatsError::ShapeMismatch {
                field,
                expected,
                received,
            });
        }
    }
    let (n_a, n_b) = (classes.samples(), other.samples());
    if n_b == 0 {
        return Ok(());
    }
    let n = n_a.saturating_add(n_b);
    if n > MAX_SAMPLES {
        return Err(invalid(
            "class_counts",
            format!("at most {MAX_SAMPLES} samples in one accumulator (2^53)"),
            format!("{n_b} more samples on top of {n_a}"),
        ));
    }
    let weight = n_a as f64 * n_b as f64 / n as f64;
    let delta: Vec<f64> = other.mean.iter().zip(&*mean).map(|(b, a)| b - a).collect();
    for j in 0..classes.feature_dim {
        simd::add_with_scaled(
            scatter.lower_col_mut(j),
            &other.scatter.col_as_slice(j)[j..],
            &delta[j..],
            weight * delta[j],
        );
    }
    simd::move_mean(mean, &other.mean, n_b as f64 / n as f64);
    classes.merge(&other.classes);
    Ok(())
}

/// The full row-major d × d symmetric matrix of a scatter that
/// [`Accumulator::packed_scatter`] packed, for
/// [`AccumulatorParts::scatter`]. Errors (field `scatter_lower`) when
/// `packed` does not hold d·(d+1)/2 values.
pub fn unpack_scatter(packed: &[f64], feature_dim: usize) -> Result<Vec<f64>, StatsError> {
    let d = feature_dim;
    let expected = d.checked_mul(d + 1).map(|n| n / 2);
    if expected != Some(packed.len()) {
        return Err(invalid(
            "scatter_lower",
            format!("d·(d+1)/2 values for d = {d}"),
            format!("{} values", packed.len()),
        ));
    }
    let mut full = vec![0.0; d * d];
    let cells = (0..d).flat_map(|j| (j..d).map(move |i| (i, j)));
    for ((i, j), &value) in cells.zip(packed) {
        full[i * d + j] = value;
        full[j * d + i] = value;
    }
    Ok(full)
}

/// `c_k − ‖s_k‖²/c_k` (clamped at 0), the unit-vector trace that unit sums
/// alone imply; empty when the lengths are off (validation reports that).
fn derived_unit_within_trace(parts: &AccumulatorParts) -> Vec<f64> {
    let (k, d) = (parts.num_classes, parts.feature_dim);
    if parts.unit_sum.len() != k * d || parts.unit_count.len() != k {
        return Vec::new();
    }
    (0..k)
        .map(|class| {
            let count = parts.unit_count[class];
            if count == 0 {
                return 0.0;
            }
            let squared: f64 = parts.unit_sum[class * d..(class + 1) * d]
                .iter()
                .map(|s| s * s)
                .sum();
            (count as f64 - squared / count as f64).max(0.0)
        })
        .collect()
}

/// The shape (rows, d) of a batch and its labels. Finiteness is checked
/// by the first pass over the values (`FoldScratch`), which reads them
/// anyway.
fn validate_batch(
    (rows, dim): (usize, usize),
    labels: &[u32],
    num_classes: usize,
) -> Result<(), StatsError> {
    if rows == 0 {
        return Err(StatsError::EmptyBatch);
    }
    if dim == 0 {
        return Err(StatsError::NoFeatures);
    }
    if labels.len() != rows {
        return Err(StatsError::LabelCount {
            expected: rows,
            received: labels.len(),
        });
    }
    Accumulator::check_labels(labels, num_classes)
}

/// [`AccumulatorParts`] from a full d × d `scatter` and the class tables
/// (K rows of d: they give the shape).
fn parts(scatter: Vec<f64>, classes: ClassStats) -> AccumulatorParts {
    AccumulatorParts {
        num_classes: classes.counts.len(),
        feature_dim: classes.feature_dim,
        class_counts: classes.counts,
        class_means: classes.means,
        scatter,
        within_trace: classes.within_trace,
        unit_sum: classes.unit_sum,
        unit_count: classes.unit_count,
        unit_within_trace: classes.unit_within_trace,
    }
}

fn invalid(
    field: &'static str,
    expected: impl Into<String>,
    received: impl ToString,
) -> StatsError {
    StatsError::InvalidPart {
        field,
        expected: expected.into(),
        received: received.to_string(),
    }
}

fn validate_parts(parts: &AccumulatorParts) -> Result<(), StatsError> {
    let (k, d) = (parts.num_classes, parts.feature_dim);
    if k == 0 {
        return Err(invalid("num_classes", "at least 1", k));
    }
    if d == 0 {
        return Err(invalid("feature_dim", "at least 1", d));
    }
    let lengths: [(&'static str, usize, usize); 7] = [
        ("class_counts", k, parts.class_counts.len()),
        ("class_means", k * d, parts.class_means.len()),
        ("scatter", d * d, parts.scatter.len()),
        ("within_trace", k, parts.within_trace.len()),
        ("unit_sum", k * d, parts.unit_sum.len()),
        ("unit_count", k, parts.unit_count.len()),
        ("unit_within_trace", k, parts.unit_within_trace.len()),
    ];
    for (field, expected, received) in lengths {
        if expected != received {
            return Err(invalid(
                field,
                format!("{expected} values"),
                format!("{received} values"),
            ));
        }
    }
    let float_fields: [(&'static str, &[f64]); 5] = [
        ("class_means", &parts.class_means),
        ("scatter", &parts.scatter),
        ("within_trace", &parts.within_trace),
        ("unit_sum", &parts.unit_sum),
        ("unit_within_trace", &parts.unit_within_trace),
    ];
    for (field, values) in float_fields {
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(invalid(field, format!("finite values (index {i})"), v));
        }
    }
    let samples = parts
        .class_counts
        .iter()
        .try_fold(0u64, |total, &n| total.checked_add(n))
        .filter(|&total| total <= MAX_SAMPLES)
        .ok_or_else(|| {
            let total: u128 = parts.class_counts.iter().map(|&n| u128::from(n)).sum();
            invalid(
                "class_counts",
                format!("a total of at most {MAX_SAMPLES} samples (2^53)"),
                format!("a total of {total}"),
            )
        })?;
    for class in 0..k {
        let n = parts.class_counts[class];
        let trace = parts.within_trace[class];
        if trace < 0.0 {
            return Err(invalid(
                "within_trace",
                format!("a value >= 0 for class {class}"),
                trace,
            ));
        }
        let units = parts.unit_count[class];
        if units > n {
            return Err(invalid(
                "unit_count",
                format!("at most class_counts[{class}] = {n} for class {class}"),
                units,
            ));
        }
        let unit_trace = parts.unit_within_trace[class];
        // Unit vectors spread at most c_k about their mean: Σ‖u − ū‖² = c − ‖Σu‖²/c.
        if !(0.0..=units as f64 * (1.0 + 1e-12)).contains(&unit_trace) {
            return Err(invalid(
                "unit_within_trace",
                format!("a value in [0, unit_count[{class}] = {units}] for class {class}"),
                unit_trace,
            ));
        }
        let row = class * d..(class + 1) * d;
        if units == 0 && parts.unit_sum[row.clone()].iter().any(|&v| v != 0.0) {
            return Err(invalid(
                "unit_sum",
                format!("zeros for class {class}, whose unit_count is 0"),
                "non-zero values",
            ));
        }
        if n == 0 {
            let empty = trace == 0.0 && parts.class_means[row.clone()].iter().all(|&v| v == 0.0);
            if !empty {
                return Err(invalid(
                    "class_means",
                    format!("zero mean and within_trace for class {class}, which has no samples"),
                    "non-zero values",
                ));
            }
        }
    }
    check_magnitudes(parts, samples)?;
    let scatter = &parts.scatter;
    let largest_diagonal = (0..d).map(|i| scatter[i * d + i]).fold(0.0_f64, f64::max);
    for i in 0..d {
        let diagonal = scatter[i * d + i];
        if diagonal < 0.0 {
            return Err(invalid(
                "scatter",
                format!("a diagonal >= 0 at [{i}][{i}]"),
                diagonal,
            ));
        }
    }
    if samples == 0 && largest_diagonal > 0.0 {
        return Err(invalid(
            "scatter",
            "all zeros when class_counts sum to 0",
            "non-zero values",
        ));
    }
    // |S_ij| <= max_i S_ii for a PSD matrix, so this bounds the asymmetry
    // relative to the largest entry, whatever the units of the features.
    // 1e-12 is the stricter of the two tolerances the daemon and the Python
    // client used to apply: a scatter from `to_parts` (or numpy's `x.T @ x`,
    // one syrk) is exactly symmetric, and two gemm triangles summed in
    // different orders differ by far less (README: "Statistics from outside").
    let tolerance = 1e-12 * largest_diagonal;
    for i in 0..d {
        for j in 0..i {
            let (lower, upper) = (scatter[i * d + j], scatter[j * d + i]);
            if (lower - upper).abs() > tolerance {
                return Err(invalid(
                    "scatter",
                    format!("a symmetric matrix ([{i}][{j}] = [{j}][{i}])"),
                    format!("{lower} and {upper}"),
                ));
            }
        }
    }
    check_positive_semidefinite(scatter, d)
}

/// `|class_means| ≤ MAX_ABS_FEATURE` and the Bhatia–Davis bounds of
/// [`MAX_ABS_FEATURE`] on the scatter's diagonal and the within-class
/// traces (with a relative slack of 1e-9 for rounding).
fn check_magnitudes(parts: &AccumulatorParts, samples: u64) -> Result<(), StatsError> {
    let (k, d) = (parts.num_classes, parts.feature_dim);
    if let Some((i, v)) = parts
        .class_means
        .iter()
        .enumerate()
        .find(|(_, v)| v.abs() > MAX_ABS_FEATURE)
    {
        return Err(invalid(
            "class_means",
            format!("magnitudes of at most {MAX_ABS_FEATURE:e} (index {i}, f32::MAX)"),
            v,
        ));
    }
    if samples == 0 {
        return Ok(());
    }
    let square = MAX_ABS_FEATURE * MAX_ABS_FEATURE;
    let slack = 1e-9 * square;
    let n = samples as f64;
    for i in 0..d {
        let mean: f64 = (0..k)
            .map(|c| parts.class_counts[c] as f64 * parts.class_means[c * d + i])
            .sum::<f64>()
            / n;
        let bound = n * (square - mean * mean + slack);
        let value = parts.scatter[i * d + i];
        if value > bound {
            return Err(invalid(
                "scatter",
                format!(
                    "[{i}][{i}] at most N·(M² − mean²) = {bound:e} (samples within \
                     ±{MAX_ABS_FEATURE:e}, f32::MAX)"
                ),
                value,
            ));
        }
    }
    for c in 0..k {
        let n_c = parts.class_counts[c] as f64;
        let row = &parts.class_means[c * d..(c + 1) * d];
        let norm2: f64 = row.iter().map(|v| v * v).sum();
        let bound = n_c * (d as f64 * (square + slack) - norm2);
        let value = parts.within_trace[c];
        if value > bound {
            return Err(invalid(
                "within_trace",
                format!(
                    "at most n_k·(d·M² − ‖mean_k‖²) = {bound:e} for class {c} (samples within \
                     ±{MAX_ABS_FEATURE:e}, f32::MAX)"
                ),
                value,
            ));
        }
    }
    Ok(())
}

/// The scatter (full, symmetric, row-major) is PSD within
/// [`PSD_TOLERANCE`]: one Cholesky factorisation of
/// `S + PSD_TOLERANCE·tr(S)·I` (d³/3 flops; README "Statistics from
/// outside" gives its time at d = 2048).
fn check_positive_semidefinite(scatter: &[f64], d: usize) -> Result<(), StatsError> {
    let trace: f64 = (0..d).map(|i| scatter[i * d + i]).sum();
    if trace == 0.0 {
        // Zero diagonal: a PSD matrix with it is zero, and the symmetry
        // check bounded the rest by 0.
        return match scatter.iter().position(|&v| v != 0.0) {
            None => Ok(()),
            Some(at) => Err(invalid(
                "scatter",
                "a positive semi-definite matrix (all zeros when its diagonal is zero)",
                format!("[{}][{}] = {}", at / d, at % d, scatter[at]),
            )),
        };
    }
    let shift = PSD_TOLERANCE * trace;
    let shifted = Mat::from_fn(d, d, |i, j| {
        scatter[i * d + j] + if i == j { shift } else { 0.0 }
    });
    match shifted.llt(faer::Side::Lower) {
        Ok(_) => Ok(()),
        Err(_) => Err(invalid(
            "scatter",
            format!(
                "a positive semi-definite matrix (no eigenvalue below -{PSD_TOLERANCE:e} x its \
                 trace {trace:e})"
            ),
            "a matrix with a larger negative eigenvalue (its Cholesky factorisation fails)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    fn batch(rows: &[[f64; 2]]) -> Array2<f64> {
        Array2::from_shape_fn((rows.len(), 2), |(i, j)| rows[i][j])
    }

    #[test]
    fn estimated_bytes_counts_every_statistic_held() {
        for (k, d) in [(2, 1), (4, 8), (10, 128), (1000, 3)] {
            // The wire form holds exactly the accumulator's statistics
            // (the scatter expanded to the square it is allocated as).
            let p = Accumulator::new(k, d).to_parts();
            let values = p.class_counts.len()
                + p.class_means.len()
                + p.scatter.len()
                + p.within_trace.len()
                + p.unit_sum.len()
                + p.unit_count.len()
                + p.unit_within_trace.len();
            let expected = 8 * values as u64;
            assert_eq!(
                Accumulator::estimated_bytes(k as u64, d as u64),
                Some(expected)
            );
        }
        // K = 4, d = 8: 8·(64 + 64 + 16).
        assert_eq!(Accumulator::estimated_bytes(4, 8), Some(1152));
        let huge = u64::from(u32::MAX);
        assert_eq!(Accumulator::estimated_bytes(huge, huge), None);
        assert_eq!(Accumulator::estimated_bytes(u64::MAX, 1), None);
    }

    #[test]
    fn the_operand_stride_puts_an_odd_number_of_cache_lines_between_columns() {
        for d in 1..64 {
            assert_eq!(operand_stride(d), d, "short columns are not padded");
        }
        for d in 64..=4200 {
            let stride = operand_stride(d);
            assert!(stride >= d && stride < d + 16, "d = {d}: stride {stride}");
            assert_eq!(stride % 8, 0, "d = {d}: whole lines");
            assert_eq!((stride / 8) % 2, 1, "d = {d}: an odd number of lines");
        }
        assert_eq!(operand_stride(2048), 2056);
        assert_eq!(operand_stride(100), 104);
    }

    /// Columns of the product's operand `operand_stride` apart (padded at
    /// d = 64 and 100, not at d = 3), one scratch for every shape in turn,
    /// batches of more than one block: the scatter and means of a plain
    /// two-pass computation.
    #[test]
    fn folds_with_padded_operand_columns_give_the_two_pass_statistics() {
        let mut scratch = FoldScratch::new();
        for (d, rows) in [(64, 300), (3, 40), (100, 257), (64, 5)] {
            assert_eq!(operand_stride(d) > d, d >= 64);
            let x = Array2::from_shape_fn((rows, d), |(i, j)| {
                ((i * 31 + j * 17) % 23) as f64 / 7.0 + 100.0 + 1e-3 * (i * j) as f64
            });
            let labels: Vec<u32> = (0..rows).map(|i| (i % 5) as u32).collect();
            let mut acc = Accumulator::new(5, d);
            // Two calls, so that the second batch merges with a Chan column.
            let half = rows / 2;
            for (range, tag) in [(0..half, "first"), (half..rows, "second")] {
                let part = x.slice(ndarray::s![range.clone(), ..]);
                acc.fold_batch_with(part, &labels[range], &mut scratch, Par::rayon(2))
                    .unwrap_or_else(|e| panic!("d = {d}, {tag} half: {e}"));
            }
            let mean: Vec<f64> = (0..d).map(|j| x.column(j).sum() / rows as f64).collect();
            let (scatter, global_mean) = (acc.scatter_lower(), acc.global_mean());
            for a in 0..d {
                assert!((global_mean[a] - mean[a]).abs() <= 1e-12 * mean[a].abs());
                for b in 0..=a {
                    let expected: f64 = (0..rows)
                        .map(|i| (x[(i, a)] - mean[a]) * (x[(i, b)] - mean[b]))
                        .sum();
                    let got = scatter[(a, b)];
                    assert!(
                        (got - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                        "d = {d}, scatter[{a}, {b}]: {got} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_packed_scatter_unpacks_to_the_full_matrix() {
        // d = 3 with distinct entries: the triangle's order is column by
        // column, M2[0][0], M2[1][0], M2[2][0], M2[1][1], M2[2][1], M2[2][2].
        let features = Array2::from_shape_fn((5, 3), |(i, j)| {
            ((i * 7 + j * 3) % 5) as f64 - 0.25 * j as f64
        });
        let acc = Accumulator::from_batch(features.view(), &[0, 1, 0, 1, 1], 2, Par::Seq).unwrap();
        let full = acc.to_parts().scatter;
        let packed = acc.packed_scatter();
        assert_eq!(
            packed,
            [full[0], full[3], full[6], full[4], full[7], full[8]]
        );
        assert_eq!(unpack_scatter(&packed, 3).unwrap(), full);
        let (parts, moved) = Accumulator::merged_packed([&acc]).unwrap().unwrap();
        assert_eq!(moved, packed);
        assert!(parts.scatter.is_empty());
        assert_eq!(
            AccumulatorParts {
                scatter: full,
                ..parts
            },
            acc.to_parts()
        );
        for d in [0, 1, 4] {
            let empty = Accumulator::new(2, d);
            assert_eq!(empty.packed_scatter().len(), d * (d + 1) / 2);
            assert_eq!(
                unpack_scatter(&empty.packed_scatter(), d).unwrap(),
                empty.to_parts().scatter
            );
        }
        let err = unpack_scatter(&packed[1..], 3).unwrap_err().to_string();
        assert_eq!(
            err,
            "scatter_lower: expected d·(d+1)/2 values for d = 3, received 5 values"
        );
    }

    #[test]
    fn merged_packed_gives_the_bits_of_merge() {
        let part = |seed: usize, rows: usize| {
            let x = Array2::from_shape_fn((rows, 5), |(i, j)| {
                ((i * 13 + j * 7 + seed * 5) % 11) as f64 * 0.37 - seed as f64
            });
            let y: Vec<u32> = (0..rows).map(|i| ((i + seed) % 3) as u32).collect();
            Accumulator::from_batch(x.view(), &y, 3, Par::Seq).unwrap()
        };
        let accs = [part(0, 7), part(1, 4), Accumulator::new(3, 5), part(2, 9)];
        let mut merged = accs[0].clone();
        for acc in &accs[1..] {
            merged.merge(acc).unwrap();
        }
        let (parts, packed) = Accumulator::merged_packed(&accs).unwrap().unwrap();
        assert_eq!(packed, merged.packed_scatter());
        assert_eq!(
            AccumulatorParts {
                scatter: unpack_scatter(&packed, 5).unwrap(),
                ..parts
            },
            merged.to_parts()
        );
        assert!(Accumulator::merged_packed(&[]).is_none());
        let err = Accumulator::merged_packed([&accs[0], &Accumulator::new(3, 4)])
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "feature_dim: expected 5 to merge, received 4"
        );
    }

    #[test]
    fn one_batch_matches_hand_computed_statistics() {
        let features = batch(&[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]);
        let acc = Accumulator::from_batch(features.view(), &[0, 0, 1], 2, Par::Seq).unwrap();
        assert_eq!(acc.class_counts(), &[2, 1]);
        assert_eq!(acc.class_mean(0), &[2.0, 0.0]);
        assert_eq!(acc.class_mean(1), &[0.0, 2.0]);
        assert_eq!(acc.within_trace(), &[2.0, 0.0]);
        // Global mean (4/3, 2/3); M2 about it.
        let parts = acc.to_parts();
        let expected = [
            (1.0f64 - 4.0 / 3.0).powi(2) + (3.0f64 - 4.0 / 3.0).powi(2) + (4.0f64 / 3.0).powi(2),
            (1.0 - 4.0 / 3.0) * (-2.0 / 3.0)
                + (3.0 - 4.0 / 3.0) * (-2.0 / 3.0)
                + (-4.0 / 3.0) * (4.0 / 3.0),
            2.0 * (2.0f64 / 3.0).powi(2) + (4.0f64 / 3.0).powi(2),
        ];
        assert!((parts.scatter[0] - expected[0]).abs() < 1e-12);
        assert!((parts.scatter[1] - expected[1]).abs() < 1e-12);
        assert!((parts.scatter[2] - expected[1]).abs() < 1e-12);
        assert!((parts.scatter[3] - expected[2]).abs() < 1e-12);
        assert_eq!(acc.unit_sum(0), &[2.0, 0.0]);
        assert_eq!(acc.unit_count(), &[2, 1]);
    }

    #[test]
    fn large_offset_keeps_its_digits() {
        // Mean 1e8, spread 1e-3: Σx² − N·x̄² would return noise here.
        let values = [1e8 + 1e-3, 1e8 - 1e-3, 1e8 + 2e-3, 1e8 - 2e-3];
        let a = Accumulator::from_batch(
            Array2::from_shape_fn((2, 1), |(i, _)| values[i]).view(),
            &[0, 0],
            1,
            Par::Seq,
        )
        .unwrap();
        let mut merged = a.clone();
        let b = Accumulator::from_batch(
            Array2::from_shape_fn((2, 1), |(i, _)| values[i + 2]).view(),
            &[0, 0],
            1,
            Par::Seq,
        )
        .unwrap();
        merged.merge(&b).unwrap();
        let exact = 2.0 * 1e-6 + 2.0 * 4e-6;
        let got = merged.to_parts().scatter[0];
        // The inputs themselves carry ~1.5e-8 absolute rounding each.
        assert!(
            (got - exact).abs() < 1e-15 + 4.0 * 1.5e-8 * 4e-3,
            "{got} vs {exact}"
        );
        assert!((merged.within_trace()[0] - got).abs() < 1e-18);
    }

    #[test]
    fn merge_refuses_other_shapes_and_changes_nothing() {
        let mut a = Accumulator::from_batch(array![[1.0, 2.0]].view(), &[0], 2, Par::Seq).unwrap();
        let before = a.to_parts();
        let b = Accumulator::new(3, 2);
        assert_eq!(
            a.merge(&b),
            Err(StatsError::ShapeMismatch {
                field: "num_classes",
                expected: 2,
                received: 3
            })
        );
        assert_eq!(a.to_parts(), before);
    }

    #[test]
    fn bad_batches_name_the_field() {
        let f = array![[1.0, f64::NAN]];
        let err = Accumulator::from_batch(f.view(), &[0], 2, Par::Seq).unwrap_err();
        assert_eq!(
            err.to_string(),
            "features[0][1]: expected a finite number, received NaN"
        );
        let err = Accumulator::from_batch(array![[1.0]].view(), &[5], 2, Par::Seq).unwrap_err();
        assert_eq!(
            err.to_string(),
            "labels[0]: expected a class in [0, 2), received 5"
        );
        let err = Accumulator::from_batch(array![[1.0]].view(), &[0, 1], 2, Par::Seq).unwrap_err();
        assert!(err.to_string().starts_with("labels: expected 1 labels"));
        let empty = Array2::<f64>::zeros((0, 3));
        assert_eq!(
            Accumulator::from_batch(empty.view(), &[], 2, Par::Seq).unwrap_err(),
            StatsError::EmptyBatch
        );
    }

    #[test]
    fn folding_in_place_equals_merging_batch_statistics() {
        let first = batch(&[[1.0, 0.5], [3.0, -1.0], [0.0, 2.0]]);
        let second = batch(&[[1e3, 1.0], [-2.0, 0.0]]);
        let mut merged = Accumulator::from_batch(first.view(), &[0, 1, 1], 2, Par::Seq).unwrap();
        let other = Accumulator::from_batch(second.view(), &[1, 0], 2, Par::Seq).unwrap();
        merged.merge(&other).unwrap();
        let mut folded = Accumulator::new(2, 2);
        folded
            .fold_batch(first.view(), &[0, 1, 1], Par::Seq)
            .unwrap();
        folded.fold_batch(second.view(), &[1, 0], Par::Seq).unwrap();
        let (a, b) = (merged.to_parts(), folded.to_parts());
        assert_eq!(a.class_counts, b.class_counts);
        let pairs = [
            (&a.class_means, &b.class_means),
            (&a.scatter, &b.scatter),
            (&a.within_trace, &b.within_trace),
            (&a.unit_sum, &b.unit_sum),
            (&a.unit_within_trace, &b.unit_within_trace),
        ];
        for (x, y) in pairs {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= 1e-12 * p.abs().max(1.0), "{p} vs {q}");
            }
        }

        let before = folded.to_parts();
        let wrong_width = Array2::<f64>::zeros((1, 3));
        assert_eq!(
            folded.fold_batch(wrong_width.view(), &[0], Par::Seq),
            Err(StatsError::ShapeMismatch {
                field: "feature_dim",
                expected: 2,
                received: 3
            })
        );
        assert!(folded
            .fold_batch(array![[1.0, 2.0]].view(), &[7], Par::Seq)
            .is_err());
        assert_eq!(folded.to_parts(), before);
    }

    /// Classes with one row in a batch are merged from the row itself
    /// (`classes::RowsMut::merge_row`); classes with several go through a
    /// compact slot. Merging the batch's own statistics (`from_batch`, then
    /// `merge`) goes through the general slot merge for every class, so
    /// the class tables must agree bit for bit, zero rows and −0 included.
    #[test]
    fn single_row_classes_merge_with_the_bits_of_the_general_merge() {
        let (k, d) = (40, 19);
        let value = |i: usize, j: usize| ((i * 31 + j * 7) as f64 * 0.37).sin() * 10.0;
        let rows = |n: usize, shift: usize, zero: usize| {
            Array2::from_shape_fn((n, d), |(i, j)| match i {
                _ if i == zero => 0.0,
                _ if (i + j) % 5 == 0 => -0.0,
                _ => value(i + shift, j),
            })
        };
        // Classes 0..10 seen before; class 3 only as a zero row (no unit
        // vector yet); classes 10..=38 new in the second batch.
        let first = rows(12, 0, 4);
        let mut first_labels: Vec<u32> = (0..12).map(|i| (i % 10) as u32).collect();
        first_labels[4] = 3;
        first_labels[3] = 4;
        let second = rows(36, 100, 7);
        let mut second_labels: Vec<u32> = (0..36)
            .map(|i| if i < 4 { 1 } else { (i + 3) as u32 })
            .collect();
        second_labels[5] = 3;
        let mut folded = Accumulator::from_batch(first.view(), &first_labels, k, Par::Seq).unwrap();
        let mut merged = folded.clone();
        folded
            .fold_batch(second.view(), &second_labels, Par::Seq)
            .unwrap();
        let other = Accumulator::from_batch(second.view(), &second_labels, k, Par::Seq).unwrap();
        merged.merge(&other).unwrap();
        let (a, b) = (folded.to_parts(), merged.to_parts());
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(a.class_counts, b.class_counts);
        assert_eq!(a.unit_count, b.unit_count);
        assert_eq!(bits(&a.class_means), bits(&b.class_means));
        assert_eq!(bits(&a.within_trace), bits(&b.within_trace));
        assert_eq!(bits(&a.unit_sum), bits(&b.unit_sum));
        assert_eq!(bits(&a.unit_within_trace), bits(&b.unit_within_trace));
        // The batch did exercise both paths and both kinds of class.
        let counts = &b.class_counts;
        assert!(counts.iter().filter(|&&c| c == 1).count() > 20);
        assert!(counts[1] > 2 && counts[3] == 2);
    }

    /// Float32 bytes folded where they lie give the bits of the same
    /// values widened to f64 first, in every statistic; bad input is
    /// refused with the field named and nothing changed.
    #[test]
    fn float32_bytes_fold_with_the_bits_of_widened_rows() {
        let (k, d, n) = (30, 37, 50);
        let values: Vec<f32> = (0..n * d)
            .map(|i| match i % 11 {
                0 => -0.0,
                _ if i / d == 9 => 0.0,
                _ => ((i as f32) * 0.37).sin() * 100.0 + 3.0,
            })
            .collect();
        let labels: Vec<u32> = (0..n).map(|i| ((i * 7) % k) as u32).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wire = bytes.as_chunks::<4>().0;
        let widened = Array2::from_shape_fn((n, d), |(i, j)| f64::from(values[i * d + j]));
        for par in [Par::Seq, Par::rayon(2)] {
            let mut scratch = FoldScratch::new();
            let (mut a, mut b) = (Accumulator::new(k, d), Accumulator::new(k, d));
            for half in [0..n / 2, n / 2..n] {
                let rows = half.start * d..half.end * d;
                a.fold_values_with(&wire[rows], &labels[half.clone()], &mut scratch, par)
                    .unwrap();
                let view = widened.slice(ndarray::s![half.clone(), ..]);
                b.fold_batch_with(view, &labels[half], &mut scratch, par)
                    .unwrap();
            }
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (a, b) = (a.to_parts(), b.to_parts());
            assert_eq!(a.class_counts, b.class_counts);
            assert_eq!(bits(&a.class_means), bits(&b.class_means));
            assert_eq!(bits(&a.scatter), bits(&b.scatter));
            assert_eq!(bits(&a.within_trace), bits(&b.within_trace));
            assert_eq!(bits(&a.unit_sum), bits(&b.unit_sum));
            assert_eq!(bits(&a.unit_within_trace), bits(&b.unit_within_trace));
        }

        let mut acc = Accumulator::new(k, d);
        let mut scratch = FoldScratch::new();
        let before = acc.to_parts();
        let short = acc.fold_values_with(&wire[..d + 1], &labels[..1], &mut scratch, Par::Seq);
        assert!(matches!(
            short,
            Err(StatsError::InvalidPart {
                field: "features",
                ..
            })
        ));
        let count = acc.fold_values_with(&wire[..2 * d], &labels[..3], &mut scratch, Par::Seq);
        assert_eq!(
            count,
            Err(StatsError::LabelCount {
                expected: 2,
                received: 3
            })
        );
        let mut poisoned = bytes.clone();
        poisoned[(3 * d + 5) * 4..(3 * d + 6) * 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let poisoned = poisoned.as_chunks::<4>().0;
        let err = acc.fold_values_with(poisoned, &labels, &mut scratch, Par::Seq);
        assert!(matches!(
            err,
            Err(StatsError::NonFinite {
                row: 3,
                column: 5,
                ..
            })
        ));
        assert_eq!(acc.to_parts(), before);
    }

    /// A batch of more than `FOLD_BLOCK_ROWS` rows is folded block by
    /// block: the bits of folding its blocks one call at a time. A bad
    /// value in a late block is named by its row in the whole batch and
    /// leaves the accumulator unchanged.
    #[test]
    fn large_batches_fold_in_blocks_and_fail_whole() {
        let (k, d, n) = (7, 5, 2 * FOLD_BLOCK_ROWS + 88);
        let x = Array2::from_shape_fn((n, d), |(i, j)| ((i * d + j) as f64 * 0.61).cos() * 4.0);
        let y: Vec<u32> = (0..n).map(|i| (i * 3 % k) as u32).collect();
        let mut whole = Accumulator::new(k, d);
        whole.fold_batch(x.view(), &y, Par::rayon(2)).unwrap();
        let mut blocks = Accumulator::new(k, d);
        for start in (0..n).step_by(FOLD_BLOCK_ROWS) {
            let end = (start + FOLD_BLOCK_ROWS).min(n);
            let block = x.slice(ndarray::s![start..end, ..]);
            blocks
                .fold_batch(block, &y[start..end], Par::rayon(2))
                .unwrap();
        }
        let bits = |p: AccumulatorParts| {
            let values = [p.class_means, p.scatter, p.within_trace, p.unit_sum];
            values
                .concat()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(whole.to_parts()), bits(blocks.to_parts()));

        let before = whole.to_parts();
        let mut poisoned = x.clone();
        poisoned[[n - 3, 2]] = f64::INFINITY;
        assert_eq!(
            whole.fold_batch(poisoned.view(), &y, Par::Seq),
            Err(StatsError::NonFinite {
                row: n - 3,
                column: 2,
                value: f64::INFINITY
            })
        );
        assert_eq!(whole.to_parts(), before);
    }

    #[test]
    fn one_scratch_serves_any_shape_and_survives_errors() {
        let shapes = [(3, 2, 5), (40, 4, 9), (2, 1, 1), (7, 70, 12), (3, 2, 7)];
        let mut shared = FoldScratch::new();
        for (round, &(k, d, rows)) in shapes.iter().chain(&shapes).enumerate() {
            let x = Array2::from_shape_fn((rows, d), |(i, j)| (i * 7 + j * 3 + round) as f64 - 4.0);
            let labels: Vec<u32> = (0..rows).map(|i| ((i * 5 + round) % k) as u32).collect();
            let mut fresh = Accumulator::new(k, d);
            fresh.fold_batch(x.view(), &labels, Par::Seq).unwrap();
            let mut reused = Accumulator::new(k, d);
            reused
                .fold_batch_with(x.view(), &labels, &mut shared, Par::Seq)
                .unwrap();
            assert_eq!(reused.to_parts(), fresh.to_parts(), "shape {k} {d} {rows}");

            // A non-finite value in the last row: named, nothing changed,
            // and the scratch still works for the next batch.
            let mut bad = x.clone();
            bad[(rows - 1, d - 1)] = f64::NEG_INFINITY;
            let before = reused.to_parts();
            assert_eq!(
                reused.fold_batch_with(bad.view(), &labels, &mut shared, Par::Seq),
                Err(StatsError::NonFinite {
                    row: rows - 1,
                    column: d - 1,
                    value: f64::NEG_INFINITY
                })
            );
            assert_eq!(reused.to_parts(), before);
        }
        assert!(shared.memory_bytes() >= 8 * 4 * 10);
    }

    #[test]
    fn unit_vector_trace_is_kept_and_derived_when_missing() {
        // Class 0: directions (1,0) and (0,1): mean (½,½), spread 2·½ = 1.
        let features = batch(&[[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]);
        let acc = Accumulator::from_batch(features.view(), &[0, 0, 1], 2, Par::Seq).unwrap();
        assert!((acc.unit_within_trace()[0] - 1.0).abs() < 1e-15);
        // The all-zero row of class 1 has no direction.
        assert_eq!((acc.unit_count()[1], acc.unit_within_trace()[1]), (0, 0.0));

        let mut parts = acc.to_parts();
        parts.unit_within_trace.clear();
        let derived = Accumulator::from_parts(parts).unwrap();
        assert!((derived.unit_within_trace()[0] - 1.0).abs() < 1e-15);
    }
}
