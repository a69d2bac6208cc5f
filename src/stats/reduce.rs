//! Combining the accumulators of data-parallel ranks through a collective
//! that can only sum vectors element-wise (`torch.distributed.all_reduce`,
//! `MPI_Allreduce`), in two rounds, so that every rank ends with the
//! statistics of all the data.
//!
//! Round 1 sums what adds up directly: the class counts `n_k`, the
//! count-weighted class sums `n_k·μ_k`, the unit counts `c_k` and the unit
//! sums; they give the global class means `μ_k`, the global mean `μ` and the
//! mean directions `ū_k = unit_sum_k / c_k`. Round 2 sums each rank's second
//! moments after the Chan correction towards those global values (the
//! parallel-axis identity): `S_r + n_r·δ_rδ_rᵀ` with `δ_r = μ_r − μ`,
//! `W_rk + n_rk·‖μ_rk − μ_k‖²` and `T_rk + c_rk·‖ū_rk − ū_k‖²` for the
//! unit-vector traces. The result is checked by [`Accumulator::from_parts`]
//! like any statistics from outside.
//!
//! Pure computation on the public parts of [`Accumulator`]; the caller does
//! the communication. Must not implement any other formula of `stats`.

use super::{Accumulator, AccumulatorParts, StatsError};

/// Round 1 of a rank: `[n_k (K), n_k·μ_k (K×d), c_k (K), unit_sum (K×d)]`.
pub fn round1(acc: &Accumulator) -> Vec<f64> {
    let (k, d) = (acc.num_classes(), acc.feature_dim());
    let mut out = Vec::with_capacity(2 * k + 2 * k * d);
    out.extend(acc.class_counts().iter().map(|&n| n as f64));
    for (class, &n) in acc.class_counts().iter().enumerate() {
        out.extend(acc.class_mean(class).iter().map(|m| m * n as f64));
    }
    out.extend(acc.unit_count().iter().map(|&c| c as f64));
    for class in 0..k {
        out.extend_from_slice(acc.unit_sum(class));
    }
    out
}

/// Round 2 of a rank, given the sum of every rank's [`round1`]:
/// `[Chan-corrected scatter (d×d), within traces (K), unit traces (K)]`.
pub fn round2(acc: &Accumulator, total1: &[f64]) -> Result<Vec<f64>, StatsError> {
    let (k, d) = (acc.num_classes(), acc.feature_dim());
    let global = Round1::parse(k, d, total1)?;
    let mu = global.mean();
    let mine = acc.to_parts();
    let n_r = acc.samples() as f64;
    let delta: Vec<f64> = if acc.samples() == 0 {
        vec![0.0; d]
    } else {
        acc.global_mean()
            .iter()
            .zip(&mu)
            .map(|(a, b)| a - b)
            .collect()
    };
    let mut out = Vec::with_capacity(d * d + 2 * k);
    for i in 0..d {
        for j in 0..d {
            // n·(δ_i·δ_j) is the same number for (i, j) and (j, i), so a
            // symmetric scatter stays exactly symmetric.
            out.push(mine.scatter[i * d + j] + n_r * (delta[i] * delta[j]));
        }
    }
    for class in 0..k {
        let n = mine.class_counts[class];
        out.push(if n == 0 {
            0.0
        } else {
            let row = class * d..(class + 1) * d;
            mine.within_trace[class]
                + n as f64 * squared_distance(&mine.class_means[row.clone()], &global.means[row])
        });
    }
    for class in 0..k {
        let c = mine.unit_count[class];
        out.push(if c == 0 {
            0.0
        } else {
            let row = class * d..(class + 1) * d;
            let (c_r, c_all) = (c as f64, global.unit_count[class].max(1) as f64);
            let spread: f64 = mine.unit_sum[row.clone()]
                .iter()
                .zip(&global.unit_sum[row])
                .map(|(s, t)| (s / c_r - t / c_all).powi(2))
                .sum();
            mine.unit_within_trace[class] + c_r * spread
        });
    }
    Ok(out)
}

/// The combined accumulator from the sums of every rank's [`round1`] and
/// [`round2`], validated like any statistics from outside.
pub fn combine(
    num_classes: usize,
    feature_dim: usize,
    total1: &[f64],
    total2: &[f64],
) -> Result<Accumulator, StatsError> {
    let (k, d) = (num_classes, feature_dim);
    let global = Round1::parse(k, d, total1)?;
    if total2.len() != d * d + 2 * k {
        return Err(sum_error(
            "round 2",
            format!("{} values", d * d + 2 * k),
            format!("{} values", total2.len()),
        ));
    }
    Accumulator::from_parts(AccumulatorParts {
        num_classes: k,
        feature_dim: d,
        class_counts: global.counts,
        class_means: global.means,
        scatter: total2[..d * d].to_vec(),
        within_trace: total2[d * d..d * d + k].to_vec(),
        unit_sum: global.unit_sum,
        unit_count: global.unit_count,
        unit_within_trace: total2[d * d + k..].to_vec(),
    })
}

/// The summed round 1, decoded.
struct Round1 {
    counts: Vec<u64>,
    means: Vec<f64>,
    unit_count: Vec<u64>,
    unit_sum: Vec<f64>,
}

impl Round1 {
    fn parse(k: usize, d: usize, total: &[f64]) -> Result<Self, StatsError> {
        if total.len() != 2 * k + 2 * k * d {
            return Err(sum_error(
                "round 1",
                format!("{} values", 2 * k + 2 * k * d),
                format!("{} values", total.len()),
            ));
        }
        let (counts, rest) = total.split_at(k);
        let (sums, rest) = rest.split_at(k * d);
        let (unit_count, unit_sum) = rest.split_at(k);
        let counts = whole_numbers(counts)?;
        let means = sums
            .chunks_exact(d)
            .zip(&counts)
            .flat_map(|(row, &n)| {
                row.iter()
                    .map(move |s| if n == 0 { 0.0 } else { s / n as f64 })
            })
            .collect();
        Ok(Round1 {
            counts,
            means,
            unit_count: whole_numbers(unit_count)?,
            unit_sum: unit_sum.to_vec(),
        })
    }

    /// μ = Σ_k n_k μ_k / N (zeros when empty).
    fn mean(&self) -> Vec<f64> {
        let d = self.means.len() / self.counts.len().max(1);
        let total: u64 = self.counts.iter().sum();
        let mut mu = vec![0.0; d];
        if total == 0 {
            return mu;
        }
        for (row, &n) in self.means.chunks_exact(d.max(1)).zip(&self.counts) {
            let weight = n as f64 / total as f64;
            for (m, &x) in mu.iter_mut().zip(row) {
                *m += weight * x;
            }
        }
        mu
    }
}

/// Summed counts: exact in f64 below 2^53, so anything but a non-negative
/// whole number means the collective did not sum what it was given.
fn whole_numbers(values: &[f64]) -> Result<Vec<u64>, StatsError> {
    values
        .iter()
        .map(|&v| {
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53) {
                Ok(v as u64)
            } else {
                Err(sum_error(
                    "round 1",
                    "counts that are non-negative whole numbers".into(),
                    v.to_string(),
                ))
            }
        })
        .collect()
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn sum_error(round: &str, expected: String, received: String) -> StatsError {
    StatsError::InvalidPart {
        field: "sum_fn",
        expected: format!("{round} summed over the ranks: {expected}"),
        received,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Par;
    use ndarray::Array2;

    fn accumulator(rows: &[[f64; 3]], labels: &[u32]) -> Accumulator {
        let x = Array2::from_shape_fn((rows.len(), 3), |(i, j)| rows[i][j] + 1e3);
        Accumulator::from_batch(x.view(), labels, 3, Par::Seq).unwrap()
    }

    fn sum(vectors: &[Vec<f64>]) -> Vec<f64> {
        let mut out = vec![0.0; vectors[0].len()];
        for v in vectors {
            for (o, x) in out.iter_mut().zip(v) {
                *o += x;
            }
        }
        out
    }

    #[test]
    fn two_rounds_equal_the_merge_of_the_ranks() {
        let a = accumulator(
            &[[1.0, 2.0, 0.5], [3.0, -1.0, 2.0], [0.0, 0.0, 1.0]],
            &[0, 1, 1],
        );
        let b = accumulator(&[[2.0, 2.0, 2.0], [-4.0, 1.0, 0.0]], &[1, 2]);
        let c = Accumulator::new(3, 3); // a rank without data
        let ranks = [a.clone(), b.clone(), c];
        let total1 = sum(&ranks.iter().map(round1).collect::<Vec<_>>());
        let round2s: Vec<_> = ranks.iter().map(|r| round2(r, &total1).unwrap()).collect();
        let combined = combine(3, 3, &total1, &sum(&round2s)).unwrap().to_parts();
        let mut merged = a;
        merged.merge(&b).unwrap();
        let merged = merged.to_parts();
        assert_eq!(combined.class_counts, merged.class_counts);
        assert_eq!(combined.unit_count, merged.unit_count);
        let pairs = [
            (&combined.class_means, &merged.class_means),
            (&combined.scatter, &merged.scatter),
            (&combined.within_trace, &merged.within_trace),
            (&combined.unit_sum, &merged.unit_sum),
            (&combined.unit_within_trace, &merged.unit_within_trace),
        ];
        for (x, y) in pairs {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= 1e-9 * p.abs().max(1.0), "{p} vs {q}");
            }
        }
    }

    #[test]
    fn a_collective_that_does_not_sum_is_refused() {
        let a = accumulator(&[[1.0, 2.0, 0.5], [3.0, -1.0, 2.0]], &[0, 1]);
        let mut total1 = round1(&a);
        total1[0] += 0.5;
        let err = round2(&a, &total1).unwrap_err().to_string();
        assert!(err.starts_with("sum_fn: expected round 1 summed"), "{err}");
        let err = round2(&a, &total1[1..]).unwrap_err().to_string();
        assert!(err.contains("received 23 values"), "{err}");
    }
}
