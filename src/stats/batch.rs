//! The statistics of one batch, computed in reusable buffers.
//!
//! Owns [`FoldScratch`] and the passes over a batch. The rows are grouped
//! by class (a counting sort of the row indices) and each class present
//! is worked through on its own while its rows are still in cache: class
//! sums and counts (which double as the finiteness check) with the row
//! norms in the same pass; residuals about the provisional class mean
//! with the unit-vector sums in one more; the unit vectors' spread about
//! their class direction. Class means and within-class traces use the
//! corrected two-pass algorithm (exact to rounding even with a large
//! common offset). A class with a single row in the batch (most of them
//! when K is large) skips these: one read-only pass checks the row and
//! takes its norm, and its slot stands for the row itself
//! ([`SingleRows`]), which the merge reads once. A last pass writes the
//! batch centred on its own mean, column by column ([`operand_stride`]
//! values apart), as the operand of the scatter's triangular product.
//! Class statistics are kept only for the classes present in the batch,
//! one compact row ("slot") each, so a batch costs O(rows · d) whatever K
//! is.
//! Every loop over a row is a `simd` kernel (the machine's vector width).
//! With `Par::Rayon(n)` the classes are split into n groups of about equal
//! rows and the centring pass into n ranges of rows, run in parallel;
//! every class's and every row's arithmetic is the same whatever the
//! split, so the result is bit for bit that of `Par::Seq`.
//!
//! Must not: touch an accumulator (`Accumulator` merges the result), or
//! allocate once its buffers have grown to the largest batch seen.

use faer::MatRef;

use super::classes::{ClassStats, RowsMut};
use super::simd::{
    self, add_assign_checked, add_scaled, checked_sums, difference, residual_pass,
    residual_unit_pass, shift_mean, squared_difference, Value,
};
use super::{Par, StatsError};

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
    /// The row indices grouped by slot, in row order within a slot: slot
    /// `s` holds `order[start[s]..start[s + 1]]`.
    order: Vec<u32>,
    /// Where each slot's rows begin in `order` (one more entry, `rows`).
    start: Vec<usize>,
    /// The Euclidean norm of row `order[p]`, at `p`.
    norms: Vec<f64>,
    /// One row per slot.
    pub(super) classes: ClassStats,
    /// Σ (h − provisional class mean) of the slot being worked on, for the
    /// mean correction: d values per thread.
    residual: Vec<f64>,
    /// The batch mean μ_b.
    pub(super) mean: Vec<f64>,
    /// Column-major d × (rows + 1) with column stride
    /// [`operand_stride`]`(d)`: the centred rows, then room for the Chan
    /// correction column (see [`FoldScratch::scatter_operand`]).
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
        4 * (self.slot_of.capacity() + self.present.capacity() + self.order.capacity())
            + 8 * (self.start.capacity()
                + self.norms.capacity()
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
    pub(super) fn compute<T: Value>(
        &mut self,
        rows: &[T],
        dim: usize,
        labels: &[u32],
        num_classes: usize,
        par: Par,
    ) -> Result<(), StatsError> {
        let n = labels.len();
        let threads = par.degree().max(1);
        self.group_rows(labels, num_classes);
        // Every table row, norm and column is overwritten below: grow
        // only, never clear.
        self.classes.reset_for_overwrite(self.present.len(), dim);
        for (buffer, len) in [
            (&mut self.norms, n),
            (&mut self.residual, threads * dim),
            (&mut self.centred, operand_stride(dim) * (n + 1)),
        ] {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
        }
        self.mean.clear();
        self.mean.resize(dim, 0.0);
        self.shape = (n, dim);
        if self.passes(rows, threads) {
            return Ok(());
        }
        let (row, column, value) = rows
            .iter()
            .position(|v| !v.wide().is_finite())
            .map(|i| (i / dim, i % dim, rows[i].wide()))
            .unwrap_or((0, 0, f64::NAN));
        Err(StatsError::NonFinite { row, column, value })
    }

    /// Slots for the classes present, in ascending class order, and the
    /// row indices grouped by slot (a stable counting sort). O(rows +
    /// classes present · log); `slot_of` is all `NO_SLOT` again afterwards.
    fn group_rows(&mut self, labels: &[u32], num_classes: usize) {
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
        // start[s + 1] counts slot s; the prefix sums make it each slot's
        // end, which the placement below moves back to its beginning.
        self.start.clear();
        self.start.resize(self.present.len() + 1, 0);
        for &label in labels {
            self.start[self.slot_of[label as usize] as usize + 1] += 1;
        }
        for s in 1..self.start.len() {
            self.start[s] += self.start[s - 1];
        }
        self.order.clear();
        self.order.resize(labels.len(), 0);
        for (row, &label) in labels.iter().enumerate() {
            let next = &mut self.start[self.slot_of[label as usize] as usize];
            self.order[*next] = row as u32;
            *next += 1;
        }
        // Now start[s] is where slot s + 1 begins.
        self.start.rotate_right(1);
        self.start[0] = 0;
        for &class in &self.present {
            self.slot_of[class as usize] = NO_SLOT;
        }
    }

    /// The passes over the rows; false if a value is not finite (the
    /// buffers then hold garbage, which the next `compute` overwrites).
    fn passes<T: Value>(&mut self, rows: &[T], threads: usize) -> bool {
        let (n, dim) = self.shape;
        let groups = SlotGroup {
            rows,
            order: &self.order,
            start: &self.start,
            norms: &mut self.norms[..n],
            residual: &mut self.residual[..threads * dim],
            stats: self.classes.rows_mut(),
        };
        if groups.run(threads).is_nan() {
            return false;
        }
        self.batch_mean(rows);
        centre(
            &mut self.centred[..n * operand_stride(dim)],
            rows,
            &self.mean,
            threads,
        );
        true
    }

    /// μ_b = Σ_s n_s·μ_s / n over the slots, in slot order (a single-row
    /// slot's mean is its row).
    fn batch_mean<T: Value>(&mut self, rows: &[T]) {
        let (n, dim) = self.shape;
        let single = SingleRows {
            rows,
            dim,
            order: &self.order,
            start: &self.start,
            norms: &self.norms,
        };
        self.mean.fill(0.0);
        for (slot, &count) in self.classes.counts.iter().enumerate() {
            let weight = count as f64 / n as f64;
            match single.get(slot) {
                Some((h, _)) => add_scaled(&mut self.mean, h, weight),
                None => add_scaled(
                    &mut self.mean,
                    &self.classes.means[slot * dim..(slot + 1) * dim],
                    weight,
                ),
            }
        }
    }

    /// The slots of the last batch that stand for one row of `rows` (the
    /// rows passed to [`compute`](Self::compute)).
    pub(super) fn single_rows<'a, T: Value>(&'a self, rows: &'a [T]) -> SingleRows<'a, T> {
        SingleRows {
            rows,
            dim: self.shape.1,
            order: &self.order,
            start: &self.start,
            norms: &self.norms,
        }
    }

    /// The operand `C` of the scatter update `M2 += C·Cᵀ`: the centred rows
    /// of the last batch as the columns of a d × rows matrix, followed, when
    /// `chan = Some((w, μ_a))`, by the column `√w·(μ_b − μ_a)`, so that one
    /// product adds the batch scatter and the Chan correction `w·δδᵀ`.
    pub(super) fn scatter_operand(&mut self, chan: Option<(f64, &[f64])>) -> MatRef<'_, f64> {
        let (n, dim) = self.shape;
        let stride = operand_stride(dim);
        let mut columns = n;
        if let Some((weight, mean_a)) = chan {
            let root = weight.sqrt();
            let column = &mut self.centred[n * stride..n * stride + dim];
            for ((c, &b), &a) in column.iter_mut().zip(&self.mean).zip(mean_a) {
                *c = root * (b - a);
            }
            columns += 1;
        }
        MatRef::from_column_major_slice_with_stride(
            &self.centred[..columns * stride],
            dim,
            columns,
            stride,
        )
    }
}

/// Consecutive slots of a batch, with the parts of the outputs they own.
struct SlotGroup<'a, T> {
    /// The whole batch, row-major.
    rows: &'a [T],
    /// The whole grouped order.
    order: &'a [u32],
    /// `start` of these slots and of the one after them.
    start: &'a [usize],
    /// The norms at `start[0]..`.
    norms: &'a mut [f64],
    /// d values per thread that works on these slots.
    residual: &'a mut [f64],
    /// These slots' rows of the batch's compact table.
    stats: RowsMut<'a>,
}

impl<T: Value> SlotGroup<'_, T> {
    /// Works through every slot, in `threads` groups of about equal rows
    /// run in parallel; returns NaN if a value is not finite (else 0).
    fn run(mut self, threads: usize) -> f64 {
        let slots = self.stats.len();
        if threads > 1 && slots > 1 {
            let (begin, end) = (self.start[0], self.start[slots]);
            let middle = begin + (end - begin) / 2;
            let at = self.start[1..slots]
                .partition_point(|&p| p < middle)
                .clamp(0, slots - 2)
                + 1;
            let left = threads / 2;
            let dim = self.stats.dim;
            let (stats_a, stats_b) = self.stats.split_at(at);
            let (norms_a, norms_b) = self.norms.split_at_mut(self.start[at] - begin);
            let (residual_a, residual_b) = self.residual.split_at_mut(left * dim);
            let a = SlotGroup {
                rows: self.rows,
                order: self.order,
                start: &self.start[..=at],
                norms: norms_a,
                residual: residual_a,
                stats: stats_a,
            };
            let b = SlotGroup {
                rows: self.rows,
                order: self.order,
                start: &self.start[at..],
                norms: norms_b,
                residual: residual_b,
                stats: stats_b,
            };
            let (poison_a, poison_b) = rayon::join(|| a.run(left), || b.run(threads - left));
            return poison_a + poison_b;
        }
        let mut poison = 0.0;
        for slot in 0..slots {
            poison += self.slot(slot);
        }
        poison
    }

    /// The statistics of one slot from its rows; returns NaN if a value is
    /// not finite.
    fn slot(&mut self, slot: usize) -> f64 {
        let dim = self.stats.dim;
        let base = self.start[0];
        let positions = self.start[slot] - base..self.start[slot + 1] - base;
        let order = &self.order[self.start[slot]..self.start[slot + 1]];
        let rows = self.rows;
        let row = |i: u32| &rows[i as usize * dim..(i as usize + 1) * dim];
        if let [i] = *order {
            return self.single_row_slot(slot, row(i), positions.start);
        }
        let norms = &mut self.norms[positions];
        let residual = &mut self.residual[..dim];
        let mean = &mut self.stats.means[slot * dim..(slot + 1) * dim];
        let unit = &mut self.stats.unit_sum[slot * dim..(slot + 1) * dim];
        let count = order.len();

        // 1. Class sum (which also catches NaN and ±Inf) and row norms.
        mean.fill(0.0);
        let mut poison = 0.0;
        for (&i, norm) in order.iter().zip(norms.iter_mut()) {
            let (bad, squares) = add_assign_checked(mean, row(i));
            poison += bad;
            *norm = simd::norm_from_squares(squares, row(i));
        }
        if poison.is_nan() {
            return poison;
        }
        let inv = 1.0 / count as f64;
        mean.iter_mut().for_each(|m| *m *= inv);

        // 2. Residuals about the provisional mean, within trace, unit-vector
        //    sum. A class with one row has its mean exactly (h·1): no
        //    residual.
        unit.fill(0.0);
        if count > 1 {
            residual.fill(0.0);
        }
        let (mut within, mut unit_count) = (0.0, 0_u64);
        for (&i, &norm) in order.iter().zip(norms.iter()) {
            let h = row(i);
            match (count > 1, norm > 0.0) {
                (true, true) => within += residual_unit_pass(residual, unit, h, mean, 1.0 / norm),
                (true, false) => within += residual_pass(residual, h, mean),
                (false, true) => add_scaled(unit, h, 1.0 / norm),
                (false, false) => {}
            }
            unit_count += u64::from(norm > 0.0);
        }

        // 3. Mean correction: μ = μ₀ + Σ(h − μ₀)/n, and
        //    Σ‖h − μ‖² = Σ‖h − μ₀‖² − n‖μ − μ₀‖² (exact identity).
        if count > 1 {
            let shift_squared = shift_mean(mean, residual, inv);
            within = (within - count as f64 * shift_squared).max(0.0);
        }

        // 4. Spread of the unit vectors about their class direction; one
        //    unit vector is its own mean direction (spread exactly 0).
        let mut unit_within = 0.0;
        if unit_count > 1 {
            let inv_count = 1.0 / unit_count as f64;
            for (&i, &norm) in order.iter().zip(norms.iter()) {
                if norm > 0.0 {
                    unit_within += squared_difference(row(i), 1.0 / norm, unit, inv_count);
                }
            }
        }
        self.stats.counts[slot] = count as u64;
        self.stats.within_trace[slot] = within;
        self.stats.unit_count[slot] = unit_count;
        self.stats.unit_within_trace[slot] = unit_within;
        0.0
    }

    /// [`slot`](Self::slot) for a class with one row `h` in the batch (most
    /// classes of a batch when K is large): the finiteness check and the
    /// row's norm only. Its mean (`h`) and unit sum (`h/‖h‖`) are not
    /// written: the merge reads the row itself ([`SingleRows`]); both
    /// spreads are 0.
    fn single_row_slot(&mut self, slot: usize, h: &[T], position: usize) -> f64 {
        let (poison, squares) = checked_sums(h);
        if poison.is_nan() {
            return poison;
        }
        let n = simd::norm_from_squares(squares, h);
        self.norms[position] = n;
        self.stats.counts[slot] = 1;
        self.stats.within_trace[slot] = 0.0;
        self.stats.unit_count[slot] = u64::from(n > 0.0);
        self.stats.unit_within_trace[slot] = 0.0;
        0.0
    }
}

/// The slots of a batch's compact table that stand for a single row (see
/// [`SlotGroup::single_row_slot`]): their table rows of means and unit
/// sums are not written, and the merge reads the batch row instead.
#[derive(Clone, Copy)]
pub(super) struct SingleRows<'a, T> {
    rows: &'a [T],
    dim: usize,
    order: &'a [u32],
    start: &'a [usize],
    norms: &'a [f64],
}

impl<'a, T> SingleRows<'a, T> {
    /// The row of `slot` and its norm, if the slot has exactly one row.
    pub(super) fn get(&self, slot: usize) -> Option<(&'a [T], f64)> {
        let (begin, end) = (self.start[slot], self.start[slot + 1]);
        (end - begin == 1).then(|| {
            let i = self.order[begin] as usize;
            (
                &self.rows[i * self.dim..(i + 1) * self.dim],
                self.norms[begin],
            )
        })
    }
}

/// The column stride, in values, of the d × rows operand of a fold's
/// triangular product (and of the benchmarks' baselines, which use it to
/// measure the same product). From d = 64 on: `dim` rounded up to whole
/// 64-byte cache lines, plus one line when that is an even number of
/// lines. With an odd number of lines between columns, consecutive columns
/// start in different sets of the L1 cache; with 16 KiB between them
/// (d = 2048 unpadded) every column starts in the same set, and faer's
/// product of the operand with its transpose ran 1.6× slower on an Intel
/// Xeon (BENCHMARKS.md, "The product's operand, one cache line apart").
/// Below d = 64, `dim` itself: a line of padding would be a large share of
/// each column (the fold's buffer is charged at 2× a float32 batch,
/// `server::deadline`), for a product too small to gain from it.
///
/// `dim ≤ operand_stride(dim) ≤ dim + 15`; from d = 64 on, a multiple of 8
/// with `operand_stride(dim) / 8` odd.
pub fn operand_stride(dim: usize) -> usize {
    if dim < PADDED_FROM {
        return dim;
    }
    let stride = dim.next_multiple_of(8);
    if (stride / 8).is_multiple_of(2) {
        stride + 8
    } else {
        stride
    }
}

/// The smallest d whose operand columns [`operand_stride`] pads.
const PADDED_FROM: usize = 64;

/// Column `i` of `centred` (its first d values of every
/// [`operand_stride`]) = row `i` of `rows` − `mean`, in `threads` ranges of
/// rows run in parallel.
fn centre<T: Value>(centred: &mut [f64], rows: &[T], mean: &[f64], threads: usize) {
    let dim = mean.len();
    let stride = operand_stride(dim);
    let n = rows.len() / dim;
    if threads > 1 && n > 1 {
        let half = n / 2;
        let left = threads / 2;
        let (centred_a, centred_b) = centred.split_at_mut(half * stride);
        let (rows_a, rows_b) = rows.split_at(half * dim);
        rayon::join(
            || centre(centred_a, rows_a, mean, left),
            || centre(centred_b, rows_b, mean, threads - left),
        );
        return;
    }
    for (column, row) in centred.chunks_exact_mut(stride).zip(rows.chunks_exact(dim)) {
        difference(&mut column[..dim], row, mean);
    }
}
