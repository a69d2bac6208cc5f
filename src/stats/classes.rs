//! Per-class statistics and their Chan merge: counts, means, within-class
//! traces, unit-vector sums, counts and spreads.
//!
//! Owns [`ClassStats`], used twice: as an accumulator's dense K-row table,
//! and as one batch's compact table with a row ("slot") per class present
//! in the batch. [`ClassStats::merge_slots`] folds a compact table into a
//! dense one touching only the classes it holds, so merging a batch costs
//! O(classes in the batch · d), not O(K · d).
//!
//! Must not: know about the scatter, batches of rows, or validation.

use super::simd::{add_assign, add_scaled, move_mean, squared_difference};

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
        self.global_mean_into(&mut mean);
        mean
    }

    /// [`ClassStats::global_mean`] written into `mean` (length d).
    pub(super) fn global_mean_into(&self, mean: &mut [f64]) {
        mean.fill(0.0);
        let total = self.samples();
        if total == 0 {
            return;
        }
        for (k, &n) in self.counts.iter().enumerate() {
            if n > 0 {
                add_scaled(mean, self.row(&self.means, k), n as f64 / total as f64);
            }
        }
    }

    /// Chan merge of every class of `other` (same shape) into `self`.
    pub(super) fn merge(&mut self, other: &ClassStats) {
        for k in 0..other.counts.len() {
            self.merge_class(k, other, k);
        }
    }

    /// Chan merge of a compact table: its slot `s` holds class `classes[s]`.
    pub(super) fn merge_slots(&mut self, classes: &[u32], other: &ClassStats) {
        for (slot, &class) in classes.iter().enumerate() {
            self.merge_class(class as usize, other, slot);
        }
    }

    /// Chan merge of row `slot` of `other` into class `k`: counts add, the
    /// mean moves by δ·n_b/n, the within trace gains `W_b + ‖δ‖²·n_a·n_b/n`;
    /// the same for the unit vectors' mean direction and spread.
    fn merge_class(&mut self, k: usize, other: &ClassStats, slot: usize) {
        let nb = other.counts[slot];
        if nb == 0 {
            return;
        }
        let na = self.counts[k];
        let n = na + nb;
        let dim = self.feature_dim;
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
