//! Synthetic features whose classes collapse epoch by epoch, with a known
//! population VCI: the data of `vcid demo` and of the ingest load generator
//! (`examples/ingest_load.rs`), and a source for trying a dashboard or an
//! alert rule without a model.
//!
//! Owns the data model only: class means on a scaled simplex (equiangular,
//! equal norms, plus a common offset like post-ReLU features have) and
//! isotropic within-class noise whose scale shrinks geometrically over the
//! epochs, faster for `train` than for `val`. It must not talk to the
//! server; callers encode and send what it produces.
//!
//! With noise scale σ and between-class eigenvalue λ = r²/(K−1) (r = the
//! distance of each class mean from the global mean), the population VCI is
//! σ²/(λ + σ²), so the schedule below walks VCI from about 0.8 down to about
//! 0.01 on train and about 0.2 on val.

use crate::proto::{Encoding, FeatureBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// The two splits the demo pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Collapses almost completely by the last epoch.
    Train,
    /// Collapses less (a generalisation gap).
    Val,
}

impl Split {
    /// The split name sent on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// Distance of every class mean from the global mean; λ = r²/(K−1) = 1 for
/// K = 10, so the noise scales below read directly as "noise vs. signal".
const MEAN_RADIUS: f64 = 3.0;
/// Added to every coordinate, as post-ReLU features sit far from zero; VCI
/// must not care (affine invariance) and the server's Welford/Chan update
/// must not lose digits to it.
const COMMON_OFFSET: f64 = 4.0;
/// Noise scale (relative to λ^{1/2}) at the first epoch, for both splits.
const NOISE_START: f64 = 2.0;
/// Train noise scale at the last epoch.
const TRAIN_NOISE_END: f64 = 0.1;
/// The part of the val noise that never goes away.
const VAL_NOISE_FLOOR: f64 = 0.5;

/// A K-class Gaussian mixture in R^d with a collapsing schedule.
#[derive(Clone, Debug)]
pub struct Synthetic {
    num_classes: usize,
    dim: usize,
    epochs: u64,
    /// K × d row-major class means (offset included).
    means: Vec<f64>,
    seed: u64,
}

impl Synthetic {
    /// Means from `seed`; the noise schedule spans `epochs` epochs
    /// (epochs ≥ 1, num_classes ≥ 2, dim ≥ 1).
    pub fn new(num_classes: usize, dim: usize, epochs: u64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let k = num_classes;
        // Orthonormal directions u_1..u_K by Gram–Schmidt on Gaussian
        // vectors (only min(K, d) of them can be independent).
        let mut basis: Vec<Vec<f64>> = Vec::with_capacity(k);
        for _ in 0..k {
            let mut v: Vec<f64> = (0..dim).map(|_| rng.sample(StandardNormal)).collect();
            for u in &basis {
                let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-8 && basis.len() < dim {
                v.iter_mut().for_each(|a| *a /= norm);
            } else {
                // d < K: no room for another orthogonal direction; a random
                // unit vector still separates the classes.
                let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
                v.iter_mut().for_each(|a| *a /= norm);
            }
            basis.push(v);
        }
        // Simplex: μ_k = r·√(K/(K−1))·(u_k − ū), so ‖μ_k − μ‖ = r and the
        // pairwise angles are all arccos(−1/(K−1)) when d ≥ K.
        let mut mean_u = vec![0.0; dim];
        for u in &basis {
            mean_u
                .iter_mut()
                .zip(u)
                .for_each(|(m, x)| *m += x / k as f64);
        }
        let scale = MEAN_RADIUS * (k as f64 / (k as f64 - 1.0)).sqrt();
        let mut means = Vec::with_capacity(k * dim);
        for u in &basis {
            means.extend(
                u.iter()
                    .zip(&mean_u)
                    .map(|(x, m)| COMMON_OFFSET + scale * (x - m)),
            );
        }
        Self {
            num_classes,
            dim,
            epochs: epochs.max(1),
            means,
            seed,
        }
    }

    /// K.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// d.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Within-class noise standard deviation of `split` at `epoch`.
    pub fn noise(&self, split: Split, epoch: u64) -> f64 {
        // Geometric decay from NOISE_START to TRAIN_NOISE_END over the run.
        let steps = (self.epochs - 1).max(1) as f64;
        let t = (epoch.min(self.epochs - 1)) as f64 / steps;
        let train = NOISE_START * (TRAIN_NOISE_END / NOISE_START).powf(t);
        match split {
            Split::Train => train,
            Split::Val => (train * train + VAL_NOISE_FLOOR * VAL_NOISE_FLOOR).sqrt(),
        }
    }

    /// The population VCI the schedule aims at (balanced classes, d ≥ K):
    /// σ²/(λ + σ²) with λ = r²/(K−1).
    pub fn expected_vci(&self, split: Split, epoch: u64) -> f64 {
        let lambda = MEAN_RADIUS * MEAN_RADIUS / (self.num_classes as f64 - 1.0);
        let s2 = self.noise(split, epoch).powi(2);
        s2 / (lambda + s2)
    }

    /// [`Synthetic::batch_f32`] as the `FeatureBatch` of run `run_id` that
    /// carries it: `rows` float32 rows of `split` at `epoch`, default layer,
    /// no idempotence key (set `writer_id` and `sequence` with struct
    /// update syntax).
    pub fn feature_batch(
        &self,
        run_id: &str,
        split: Split,
        epoch: u64,
        part: u64,
        rows: u32,
    ) -> FeatureBatch {
        let (features, labels) = self.batch_f32(split, epoch, part, rows as usize);
        FeatureBatch {
            run_id: run_id.to_owned(),
            split: split.name().to_owned(),
            layer: String::new(),
            epoch,
            rows,
            features: features.into(),
            encoding: Encoding::Float32 as i32,
            labels,
            writer_id: String::new(),
            sequence: 0,
        }
    }

    /// One batch of `rows` samples of `split` at `epoch`: features encoded
    /// as little-endian float32, row-major, and labels drawn uniformly.
    /// `part` makes different batches of the same epoch differ while the
    /// whole run stays reproducible from the seed.
    pub fn batch_f32(
        &self,
        split: Split,
        epoch: u64,
        part: u64,
        rows: usize,
    ) -> (Vec<u8>, Vec<u32>) {
        let split_tag = match split {
            Split::Train => 1u64,
            Split::Val => 2u64,
        };
        let stream_seed = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(split_tag << 56)
            .wrapping_add(epoch << 32)
            .wrapping_add(part);
        let mut rng = StdRng::seed_from_u64(stream_seed);
        let sigma = self.noise(split, epoch);
        let mut bytes = Vec::with_capacity(rows * self.dim * 4);
        let mut labels = Vec::with_capacity(rows);
        for _ in 0..rows {
            let label = rng.random_range(0..self.num_classes);
            labels.push(label as u32);
            let mean = &self.means[label * self.dim..(label + 1) * self.dim];
            for &m in mean {
                let z: f64 = rng.sample(StandardNormal);
                bytes.extend_from_slice(&((m + sigma * z) as f32).to_le_bytes());
            }
        }
        (bytes, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_collapses_train_more_than_val() {
        let s = Synthetic::new(10, 64, 12, 7);
        assert!((s.noise(Split::Train, 0) - NOISE_START).abs() < 1e-12);
        assert!((s.noise(Split::Train, 11) - TRAIN_NOISE_END).abs() < 1e-12);
        for e in 1..12 {
            assert!(s.expected_vci(Split::Train, e) < s.expected_vci(Split::Train, e - 1));
            assert!(s.expected_vci(Split::Val, e) > s.expected_vci(Split::Train, e));
        }
    }

    #[test]
    fn means_form_a_simplex_of_the_chosen_radius() {
        let (k, d) = (10, 32);
        let s = Synthetic::new(k, d, 5, 3);
        let mut mu = vec![0.0; d];
        for mean in s.means.chunks(d) {
            mu.iter_mut()
                .zip(mean)
                .for_each(|(m, x)| *m += x / k as f64);
        }
        for c in 0..k {
            let r: f64 = (0..d)
                .map(|j| (s.means[c * d + j] - mu[j]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((r - MEAN_RADIUS).abs() < 1e-9, "class {c}: radius {r}");
        }
    }

    #[test]
    fn batches_are_reproducible_and_well_formed() {
        let s = Synthetic::new(4, 8, 3, 11);
        let (a, la) = s.batch_f32(Split::Val, 1, 2, 5);
        let (b, lb) = s.batch_f32(Split::Val, 1, 2, 5);
        let (c, _) = s.batch_f32(Split::Val, 1, 3, 5);
        assert_eq!(a.len(), 5 * 8 * 4);
        assert_eq!((a.clone(), la.clone()), (b, lb));
        assert_ne!(a, c);
        assert!(la.iter().all(|&l| l < 4));
    }
}
