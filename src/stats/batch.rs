//! The statistics of one batch, computed in reusable buffers.
//!
//! Owns [`FoldScratch`] and the per-row passes over a batch: class sums and
//! counts (which double as the finiteness check); residuals about the
//! provisional class means, row norms and unit-vector sums; the unit
//! vectors' spread about their class direction; and the batch centred on
//! its own mean, written column by column as the operand of the scatter's
//! triangular product. Class means and within-class traces use the
//! corrected two-pass algorithm (exact to rounding even with a large common
//! offset). Class statistics are kept only for the classes present in the
//! batch, one compact row ("slot") each, so a batch costs O(rows · d)
//! whatever K is. Every loop over a row is a `simd` kernel (the machine's
//! vector width).
//!
//! Must not: touch an accumulator (`Accumulator` merges the result), or
//! allocate once its buffers have grown to the largest batch seen.

use faer::MatRef;

use super::classes::ClassStats;
use super::simd::{self, add_assign_checked, add_scaled, difference, residual_pass};
use super::StatsError;

/// Marks a class without a slot in `FoldScratch::slot_of`.
const NO_SLOT: u32 = u32::MAX;

/// Reusable working memory for
/// [`Accumulator::fold_batch_with`](super::Accumulator::fold_batch_with):
/// the batch centred on its own mean (d × rows f64), the statistics of the
/// classes present in the batch, and per-row bookkeeping. Keep one per thread that folds batches; it grows to the
/// largest batch and class count it has seen and then allocates nothing.
#[derive(Debug, Default)]
pub struct FoldScratch {
    /// Class → slot while slots are assigned; all `NO_SLOT` otherwise.
    slot_of: Vec<u32>,
    /// The classes present in the batch, ascending: slot `s` is class
    /// `present[s]`.
    pub(super) present: Vec<u32>,
    /// Each row's slot.
    row_slot: Vec<u32>,
    /// Each row's Euclidean norm.
    norms: Vec<f64>,
    /// One row per slot.
    pub(super) classes: ClassStats,
    /// Σ (h − provisional class mean) per slot, for the mean correction.
    residual: Vec<f64>,
    /// The batch mean μ_b.
    pub(super) mean: Vec<f64>,
    /// Column-major d × (rows + 1): the centred rows, then room for the
    /// Chan correction column (see [`FoldScratch::scatter_operand`]).
    centred: Vec<f64>,
    /// Rows and d of the batch last computed.
    shape: (usize, usize),
}

impl FoldScratch {
    /// Empty buffers; they grow on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held by the buffers (their capacity).
    pub fn memory_bytes(&self) -> usize {
        let c = &self.classes;
        4 * (self.slot_of.capacity() + self.present.capacity() + self.row_slot.capacity())
            + 8 * (self.norms.capacity()
                + self.residual.capacity()
                + self.mean.capacity()
                + self.centred.capacity()
                + c.counts.capacity()
                + c.means.capacity()
                + c.within_trace.capacity()
                + c.unit_sum.capacity()
                + c.unit_count.capacity()
                + c.unit_within_trace.capacity())
    }

    /// The statistics of one batch: `rows` holds `labels.len()` rows of
    /// `dim` values, row-major; every label is below `num_classes`. Fails
    /// (naming the first one) if a value is NaN or infinite.
    pub(super) fn compute(
        &mut self,
        rows: &[f64],
        dim: usize,
        labels: &[u32],
        num_classes: usize,
    ) -> Result<(), StatsError> {
        let n = labels.len();
        self.assign_slots(labels, num_classes);
        self.classes.reset(self.present.len(), dim);
        for (buffer, len) in [
            (&mut self.residual, self.present.len() * dim),
            (&mut self.norms, n),
            (&mut self.mean, dim),
        ] {
            buffer.clear();
            buffer.resize(len, 0.0);
        }
        // Every column is overwritten below: grow only, never clear.
        if self.centred.len() < dim * (n + 1) {
            self.centred.resize(dim * (n + 1), 0.0);
        }
        self.shape = (n, dim);
        if self.passes(rows) {
            return Ok(());
        }
        let (row, column, value) = rows
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| (i / dim, i % dim, rows[i]))
            .unwrap_or((0, 0, f64::NAN));
        Err(StatsError::NonFinite { row, column, value })
    }

    /// Slots for the classes present, in ascending class order, and each
    /// row's slot. O(rows + classes present · log); `slot_of` is all
    /// `NO_SLOT` again afterwards.
    fn assign_slots(&mut self, labels: &[u32], num_classes: usize) {
        if self.slot_of.len() != num_classes {
            self.slot_of.clear();
            self.slot_of.resize(num_classes, NO_SLOT);
        }
        self.present.clear();
        for &label in labels {
            let slot = &mut self.slot_of[label as usize];
            if *slot == NO_SLOT {
                *slot = 0;
                self.present.push(label);
            }
        }
        self.present.sort_unstable();
        for (slot, &class) in self.present.iter().enumerate() {
            self.slot_of[class as usize] = slot as u32;
        }
        self.row_slot.clear();
        self.row_slot
            .extend(labels.iter().map(|&l| self.slot_of[l as usize]));
        for &class in &self.present {
            self.slot_of[class as usize] = NO_SLOT;
        }
    }

    /// The passes over the rows; false if a value is not finite (the
    /// buffers then hold garbage, which the next `compute` resets).
    fn passes(&mut self, rows: &[f64]) -> bool {
        let (n, dim) = self.shape;
        let Self {
            row_slot,
            norms,
            classes,
            residual,
            mean,
            centred,
            ..
        } = self;
        let slot_range = |s: u32| s as usize * dim..(s as usize + 1) * dim;

        // 1. Class sums and counts; the sums also catch NaN and ±Inf.
        let mut poison = 0.0;
        for (row, &s) in rows.chunks_exact(dim).zip(row_slot.iter()) {
            classes.counts[s as usize] += 1;
            poison += add_assign_checked(&mut classes.means[slot_range(s)], row);
        }
        if poison.is_nan() {
            return false;
        }
        for (s, &count) in classes.counts.iter().enumerate() {
            let inv = 1.0 / count as f64;
            classes.means[s * dim..(s + 1) * dim]
                .iter_mut()
                .for_each(|m| *m *= inv);
        }

        // 2. Residuals about the provisional means, within traces, norms,
        //    unit-vector sums.
        for ((row, &s), norm) in rows
            .chunks_exact(dim)
            .zip(row_slot.iter())
            .zip(norms.iter_mut())
        {
            let slot = s as usize;
            // A class with one row has its mean exactly (h·1): no residual.
            if classes.counts[slot] > 1 {
                classes.within_trace[slot] += residual_pass(
                    &mut residual[slot_range(s)],
                    row,
                    &classes.means[slot_range(s)],
                );
            }
            *norm = simd::norm(row);
            if *norm > 0.0 {
                add_scaled(&mut classes.unit_sum[slot_range(s)], row, 1.0 / *norm);
                classes.unit_count[slot] += 1;
            }
        }

        // 3. Mean correction: μ = μ₀ + Σ(h − μ₀)/n, and
        //    Σ‖h − μ‖² = Σ‖h − μ₀‖² − n‖μ − μ₀‖² (exact identity).
        for (s, &count) in classes.counts.iter().enumerate().filter(|(_, &c)| c > 1) {
            let shift_squared = simd::shift_mean(
                &mut classes.means[s * dim..(s + 1) * dim],
                &residual[s * dim..(s + 1) * dim],
                1.0 / count as f64,
            );
            classes.within_trace[s] =
                (classes.within_trace[s] - count as f64 * shift_squared).max(0.0);
        }
        classes.global_mean_into(mean);

        // 4. Spread of the unit vectors about their class direction, and the
        //    batch centred on its own mean.
        for (((row, &s), &norm), column) in rows
            .chunks_exact(dim)
            .zip(row_slot.iter())
            .zip(norms.iter())
            .zip(centred[..n * dim].chunks_exact_mut(dim))
        {
            let slot = s as usize;
            // One unit vector is its own mean direction: spread exactly 0.
            if norm > 0.0 && classes.unit_count[slot] > 1 {
                let inv_count = 1.0 / classes.unit_count[slot] as f64;
                classes.unit_within_trace[slot] += simd::squared_difference(
                    row,
                    1.0 / norm,
                    &classes.unit_sum[slot_range(s)],
                    inv_count,
                );
            }
            difference(column, row, mean);
        }
        true
    }

    /// The operand `C` of the scatter update `M2 += C·Cᵀ`: the centred rows
    /// of the last batch as the columns of a d × rows matrix, followed, when
    /// `chan = Some((w, μ_a))`, by the column `√w·(μ_b − μ_a)`, so that one
    /// product adds the batch scatter and the Chan correction `w·δδᵀ`.
    pub(super) fn scatter_operand(&mut self, chan: Option<(f64, &[f64])>) -> MatRef<'_, f64> {
        let (n, dim) = self.shape;
        let mut columns = n;
        if let Some((weight, mean_a)) = chan {
            let root = weight.sqrt();
            let column = &mut self.centred[n * dim..(n + 1) * dim];
            for ((c, &b), &a) in column.iter_mut().zip(&self.mean).zip(mean_a) {
                *c = root * (b - a);
            }
            columns += 1;
        }
        MatRef::from_column_major_slice(&self.centred[..columns * dim], dim, columns)
    }
}
