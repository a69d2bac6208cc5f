//! Per-class statistics and their Chan merge: counts, means, within-class
//! traces, unit-vector sums, counts and spreads.
//!
//! Owns [`ClassStats`], used twice: as an accumulator's dense K-row table,
//! and as one batch's compact table with a row ("slot") per class present
//! in the batch. [`ClassStats::merge_slots`] folds a compact table into a
//! dense one touching only the classes it holds, so merging a batch costs
//! O(classes in the batch · d), not O(K · d). A slot that stands for a
//! single row of the batch ([`SingleRows`]) is merged from that row in one
//! pass, with the bits the slot's own copy of it would give.
//!
//! Must not: know about the scatter or validation, or see a batch beyond
//! the single rows it is handed.

use super::batch::SingleRows;
use super::simd::{self, add_assign, add_scaled, move_mean, squared_difference, Value};

/// Per-class statistics; rows of the `· × d` tables are contiguous slices.
#[derive(Clone, Debug, Default)]
pub(super) struct ClassStats {
    pub(super) feature_dim: usize,
    pub(super) counts: Vec<u64>,
    pub(super) means: Vec<f64>,
    pub(super) within_trace: Vec<f64>,
    pub(super) unit_sum: Vec<f64>,
    pub(super) unit_count: Vec<u64>,
    pub(super) unit_within_trace: Vec<f64>,
}

impl ClassStats {
    pub(super) fn new(rows: usize, feature_dim: usize) -> Self {
        let mut stats = Self::default();
        stats.reset(rows, feature_dim);
        stats
    }

    /// Zero statistics for `rows` classes, reusing the buffers.
    pub(super) fn reset(&mut self, rows: usize, feature_dim: usize) {
        fn zeros<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
            v.clear();
            v.resize(len, T::default());
        }
        self.feature_dim = feature_dim;
        zeros(&mut self.counts, rows);
        zeros(&mut self.means, rows * feature_dim);
        zeros(&mut self.within_trace, rows);
        zeros(&mut self.unit_sum, rows * feature_dim);
        zeros(&mut self.unit_count, rows);
        zeros(&mut self.unit_within_trace, rows);
    }

    /// Statistics for `rows` classes whose every value the caller
    /// overwrites: the buffers get their lengths, and nothing is zeroed.
    pub(super) fn reset_for_overwrite(&mut self, rows: usize, feature_dim: usize) {
        self.feature_dim = feature_dim;
        for table in [&mut self.means, &mut self.unit_sum] {
            table.resize(rows * feature_dim, 0.0);
        }
        for scalars in [&mut self.within_trace, &mut self.unit_within_trace] {
            scalars.resize(rows, 0.0);
        }
        for counts in [&mut self.counts, &mut self.unit_count] {
            counts.resize(rows, 0);
        }
    }

    /// Row `class` of a `· × d` table.
    pub(super) fn row<'a>(&self, table: &'a [f64], class: usize) -> &'a [f64] {
        &table[class * self.feature_dim..(class + 1) * self.feature_dim]
    }

    pub(super) fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `Σ_k n_k μ_k / N` in class order (zeros when empty).
    pub(super) fn global_mean(&self) -> Vec<f64> {
        let mut mean = vec![0.0; self.feature_dim];
        let total = self.samples();
        if total == 0 {
            return mean;
        }
        for (k, &n) in self.counts.iter().enumerate() {
            if n > 0 {
                add_scaled(&mut mean, self.row(&self.means, k), n as f64 / total as f64);
            }
        }
        mean
    }

    /// Chan merge of every class of `other` (same shape) into `self`.
    pub(super) fn merge(&mut self, other: &ClassStats) {
        let mut rows = self.rows_mut();
        for k in 0..other.counts.len() {
            rows.merge_class(k, other, k);
        }
    }

    /// Chan merge of a compact table: its slot `s` holds class `classes[s]`
    /// (ascending). With `threads > 1` the slots are split into that many
    /// groups merged in parallel (each class is one independent row, so the
    /// result does not depend on the split).
    /// The slots in `single` stand for one batch row each: their rows of
    /// `other.means` and `other.unit_sum` are not read.
    pub(super) fn merge_slots<T: Value>(
        &mut self,
        classes: &[u32],
        other: &ClassStats,
        single: SingleRows<'_, T>,
        threads: usize,
    ) {
        self.rows_mut()
            .merge_slots(classes, 0, other, single, threads.max(1));
    }

    /// The statistics of every class as disjoint mutable slices.
    pub(super) fn rows_mut(&mut self) -> RowsMut<'_> {
        RowsMut {
            first: 0,
            dim: self.feature_dim,
            counts: &mut self.counts,
            means: &mut self.means,
            within_trace: &mut self.within_trace,
            unit_sum: &mut self.unit_sum,
            unit_count: &mut self.unit_count,
            unit_within_trace: &mut self.unit_within_trace,
        }
    }
}

/// The statistics of the consecutive classes (or slots) `first..` of a
/// [`ClassStats`], borrowed so that disjoint ranges can be written from
/// different threads.
pub(super) struct RowsMut<'a> {
    /// Class of the first row.
    pub(super) first: usize,
    pub(super) dim: usize,
    pub(super) counts: &'a mut [u64],
    pub(super) means: &'a mut [f64],
    pub(super) within_trace: &'a mut [f64],
    pub(super) unit_sum: &'a mut [f64],
    pub(super) unit_count: &'a mut [u64],
    pub(super) unit_within_trace: &'a mut [f64],
}

impl<'a> RowsMut<'a> {
    pub(super) fn len(&self) -> usize {
        self.counts.len()
    }

    /// Rows `..at` and `at..` (relative to `first`).
    pub(super) fn split_at(self, at: usize) -> (RowsMut<'a>, RowsMut<'a>) {
        let d = self.dim;
        let (counts_a, counts_b) = self.counts.split_at_mut(at);
        let (means_a, means_b) = self.means.split_at_mut(at * d);
        let (within_a, within_b) = self.within_trace.split_at_mut(at);
        let (sum_a, sum_b) = self.unit_sum.split_at_mut(at * d);
        let (count_a, count_b) = self.unit_count.split_at_mut(at);
        let (spread_a, spread_b) = self.unit_within_trace.split_at_mut(at);
        let first = RowsMut {
            first: self.first,
            dim: d,
            counts: counts_a,
            means: means_a,
            within_trace: within_a,
            unit_sum: sum_a,
            unit_count: count_a,
            unit_within_trace: spread_a,
        };
        let second = RowsMut {
            first: self.first + at,
            dim: d,
            counts: counts_b,
            means: means_b,
            within_trace: within_b,
            unit_sum: sum_b,
            unit_count: count_b,
            unit_within_trace: spread_b,
        };
        (first, second)
    }

    /// [`ClassStats::merge_slots`] of the slots `slot0..slot0 + classes.len()`
    /// of `other`, whose classes all lie in these rows.
    fn merge_slots<T: Value>(
        mut self,
        classes: &[u32],
        slot0: usize,
        other: &ClassStats,
        single: SingleRows<'_, T>,
        threads: usize,
    ) {
        if threads > 1 && classes.len() > 1 {
            let half = classes.len() / 2;
            let at = classes[half] as usize - self.first;
            let (mine_a, mine_b) = self.split_at(at);
            let left = threads / 2;
            rayon::join(
                || mine_a.merge_slots(&classes[..half], slot0, other, single, left),
                || {
                    let rest = &classes[half..];
                    mine_b.merge_slots(rest, slot0 + half, other, single, threads - left)
                },
            );
            return;
        }
        for (i, &class) in classes.iter().enumerate() {
            let (k, slot) = (class as usize - self.first, slot0 + i);
            match single.get(slot) {
                Some((h, norm)) => self.merge_row(k, h, norm),
                None => self.merge_class(k, other, slot),
            }
        }
    }

    /// [`merge_class`](Self::merge_class) of a slot that is one row `h`
    /// (norm `norm`): the same bits, in one pass over the class's rows
    /// ([`simd::merge_row`]) and without the slot's copies of `h` and
    /// `h/‖h‖`. Such a slot has a within trace and a unit spread of 0.
    fn merge_row<T: Value>(&mut self, k: usize, h: &[T], norm: f64) {
        let na = self.counts[k];
        let n = na + 1;
        let mine = k * self.dim..(k + 1) * self.dim;
        let (ca, cb) = (self.unit_count[k], u64::from(norm > 0.0));
        let a = if cb > 0 { 1.0 / norm } else { 0.0 };
        let b = if ca > 0 { 1.0 / ca as f64 } else { 0.0 };
        if na == 0 {
            // A step of 1 from zeros makes the mean the row (its copy).
            self.means[mine.clone()].fill(0.0);
        }
        let (delta_squared, unit_delta_squared) = simd::merge_row(
            &mut self.means[mine.clone()],
            &mut self.unit_sum[mine],
            h,
            1.0 / n as f64,
            a,
            b,
        );
        if na == 0 {
            self.within_trace[k] = 0.0;
        } else {
            self.within_trace[k] += delta_squared * (na as f64 / n as f64);
        }
        self.counts[k] = n;
        if ca > 0 && cb > 0 {
            self.unit_within_trace[k] += unit_delta_squared * (ca as f64 / (ca + cb) as f64);
        }
        self.unit_count[k] += cb;
    }

    /// Chan merge of row `slot` of `other` into row `k`: counts add, the
    /// mean moves by δ·n_b/n, the within trace gains `W_b + ‖δ‖²·n_a·n_b/n`;
    /// the same for the unit vectors' mean direction and spread.
    fn merge_class(&mut self, k: usize, other: &ClassStats, slot: usize) {
        let nb = other.counts[slot];
        if nb == 0 {
            return;
        }
        let na = self.counts[k];
        let n = na + nb;
        let dim = self.dim;
        let mine = k * dim..(k + 1) * dim;
        let theirs = slot * dim..(slot + 1) * dim;
        if na == 0 {
            self.means[mine.clone()].copy_from_slice(&other.means[theirs.clone()]);
            self.within_trace[k] = other.within_trace[slot];
        } else {
            let delta_squared = move_mean(
                &mut self.means[mine.clone()],
                &other.means[theirs.clone()],
                nb as f64 / n as f64,
            );
            self.within_trace[k] +=
                other.within_trace[slot] + delta_squared * (na as f64 * nb as f64 / n as f64);
        }
        self.counts[k] = n;

        let (ca, cb) = (self.unit_count[k], other.unit_count[slot]);
        if ca > 0 && cb > 0 {
            let delta_squared = squared_difference(
                &other.unit_sum[theirs.clone()],
                1.0 / cb as f64,
                &self.unit_sum[mine.clone()],
                1.0 / ca as f64,
            );
            self.unit_within_trace[k] += delta_squared * (ca as f64 * cb as f64 / (ca + cb) as f64);
        }
        self.unit_within_trace[k] += other.unit_within_trace[slot];
        add_assign(&mut self.unit_sum[mine], &other.unit_sum[theirs]);
        self.unit_count[k] += cb;
    }
}
