//! Properties of the math core that must hold for any data (SPEC §2, issue 2):
//! batch-split invariance, merge associativity and commutativity, VCI
//! invariance under invertible affine maps, VCI in [0, 1], VCI = 0 for
//! collapsed data, the balanced-class identity between the probe MSE and
//! VCI, the undefined cases, the `AccumulatorParts` round trip and
//! validation, in-place folds spread over shards then merged, and the
//! parallel passes of a fold equal to the sequential ones.
//!
//! Data comes from a seeded RNG inside each case (proptest picks the seed
//! and the shapes), so shrinking cannot drift into degenerate matrices that
//! would make a rank decision ambiguous. Case counts are modest so the
//! suite stays fast in release mode.

use ndarray::{s, Array2};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use vcid::metrics::{self, EpochMetrics};
use vcid::stats::{Accumulator, AccumulatorParts, FoldScratch, Par};

/// Gaussian classes: N rows, d features, labels in [0, K) (every class used
/// when N ≥ K), class means at scale `sep`, unit noise, common `offset`.
fn gaussian_data(
    seed: u64,
    n: usize,
    d: usize,
    k: usize,
    sep: f64,
    offset: f64,
) -> (Array2<f64>, Vec<u32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let means: Vec<f64> = (0..k * d)
        .map(|_| sep * rng.sample::<f64, _>(StandardNormal))
        .collect();
    let labels: Vec<u32> = (0..n)
        .map(|i| {
            if i < k {
                i as u32
            } else {
                rng.random_range(0..k as u32)
            }
        })
        .collect();
    let x = Array2::from_shape_fn((n, d), |(i, j)| {
        let noise: f64 = StandardNormal.sample(&mut rng);
        offset + means[labels[i] as usize * d + j] + noise
    });
    (x, labels)
}

/// Folds rows `[cuts[i], cuts[i+1])` as separate batches.
fn fold(x: &Array2<f64>, labels: &[u32], k: usize, cuts: &[usize], par: Par) -> Accumulator {
    let mut acc = Accumulator::new(k, x.ncols());
    for w in cuts.windows(2) {
        if w[0] == w[1] {
            continue;
        }
        let part =
            Accumulator::from_batch(x.slice(s![w[0]..w[1], ..]), &labels[w[0]..w[1]], k, par)
                .unwrap();
        acc.merge(&part).unwrap();
    }
    acc
}

fn one_batch(x: &Array2<f64>, labels: &[u32], k: usize) -> Accumulator {
    Accumulator::from_batch(x.view(), labels, k, Par::Seq).unwrap()
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0_f64, |m, x| m.max(x.abs()))
}

/// Field-wise comparison: counts exactly, floats within `rel` of the field's
/// largest magnitude (norm-wise relative error).
fn parts_close(a: &AccumulatorParts, b: &AccumulatorParts, rel: f64) -> Result<(), String> {
    if (a.num_classes, a.feature_dim) != (b.num_classes, b.feature_dim) {
        return Err("shapes differ".into());
    }
    if a.class_counts != b.class_counts {
        return Err(format!(
            "class_counts {:?} vs {:?}",
            a.class_counts, b.class_counts
        ));
    }
    if a.unit_count != b.unit_count {
        return Err(format!(
            "unit_count {:?} vs {:?}",
            a.unit_count, b.unit_count
        ));
    }
    // Unit vectors have norm 1: their sums and spreads are judged on that
    // scale, not on the size of a spread that may itself be rounding noise.
    for (name, x, y, floor) in [
        (
            "class_means",
            &a.class_means,
            &b.class_means,
            f64::MIN_POSITIVE,
        ),
        ("scatter", &a.scatter, &b.scatter, f64::MIN_POSITIVE),
        (
            "within_trace",
            &a.within_trace,
            &b.within_trace,
            f64::MIN_POSITIVE,
        ),
        ("unit_sum", &a.unit_sum, &b.unit_sum, 1.0),
        (
            "unit_within_trace",
            &a.unit_within_trace,
            &b.unit_within_trace,
            1.0,
        ),
    ] {
        let scale = max_abs(y).max(max_abs(x)).max(floor);
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0_f64, |m, (p, q)| m.max((p - q).abs()));
        if diff > rel * scale {
            return Err(format!(
                "{name}: max difference {diff:e} at scale {scale:e}"
            ));
        }
    }
    Ok(())
}

fn metrics_of(acc: &Accumulator) -> EpochMetrics {
    metrics::compute(acc, Par::Seq).unwrap()
}

/// A random orthogonal matrix (Gram–Schmidt on Gaussian columns).
fn orthogonal(rng: &mut StdRng, d: usize) -> Array2<f64> {
    let mut q = Array2::<f64>::zeros((d, d));
    let mut j = 0;
    while j < d {
        let mut v: Vec<f64> = (0..d).map(|_| rng.sample(StandardNormal)).collect();
        for _ in 0..2 {
            for p in 0..j {
                let dot: f64 = (0..d).map(|i| q[(i, p)] * v[i]).sum();
                (0..d).for_each(|i| v[i] -= dot * q[(i, p)]);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-3 {
            continue;
        }
        (0..d).for_each(|i| q[(i, j)] = v[i] / norm);
        j += 1;
    }
    q
}

/// `A = Q₁ diag(s) Q₂` with singular values in [0.5, 2]: condition ≤ 4.
fn well_conditioned(rng: &mut StdRng, d: usize) -> Array2<f64> {
    let q1 = orthogonal(rng, d);
    let q2 = orthogonal(rng, d);
    let s: Vec<f64> = (0..d).map(|_| rng.random_range(0.5..2.0)).collect();
    let scaled = Array2::from_shape_fn((d, d), |(i, j)| q1[(i, j)] * s[j]);
    scaled.dot(&q2)
}

/// Norm-wise relative tolerance for two groupings of the same rows: 1e-12,
/// plus what a common offset costs. With unit spread around an offset c,
/// every input is only known to ulp(c) ≈ ε·c, so residuals (and the second
/// moments built from them) can differ by a few ε·c between groupings:
/// ~2e-12 relative at c = 1e4 before any accumulation.
fn tolerance(offset: f64) -> f64 {
    1e-12 + 32.0 * f64::EPSILON * offset.abs()
}

fn cuts_from(n: usize, raw: &[usize]) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.iter().map(|c| c % (n + 1)).collect();
    cuts.push(0);
    cuts.push(n);
    cuts.sort_unstable();
    cuts
}

/// 48 cases per property unless PROPTEST_CASES asks for more (e.g. a soak
/// run: `PROPTEST_CASES=5000 cargo test --release --test math_properties`).
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 48;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    /// Any partition of a stream into batches gives the statistics of one
    /// batch to ~1e-12 (norm-wise relative), with and without a 1e4 offset,
    /// with sequential and parallel kernels.
    #[test]
    fn batch_split_invariance(
        seed in any::<u64>(),
        n in 1usize..80,
        d in 1usize..9,
        k in 2usize..6,
        offset in prop_oneof![Just(0.0), Just(1e4), Just(-3.5)],
        raw_cuts in prop::collection::vec(0usize..1000, 0..12),
        parallel in any::<bool>(),
    ) {
        let (x, y) = gaussian_data(seed, n, d, k, 2.0, offset);
        let reference = one_batch(&x, &y, k).to_parts();
        let par = if parallel { Par::rayon(0) } else { Par::Seq };
        let split = fold(&x, &y, k, &cuts_from(n, &raw_cuts), par).to_parts();
        prop_assert_eq!(reference.class_counts.iter().sum::<u64>(), n as u64);
        if let Err(e) = parts_close(&split, &reference, tolerance(offset)) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// Batches folded in place into 1..=8 shards (each batch into a shard
    /// picked at random, as a sharded daemon hands a batch to whichever
    /// shard is free), the shards then merged: the statistics of one batch
    /// to ~1e-12, including classes absent from most batches (K up to 40).
    #[test]
    fn sharded_folds_merge_to_one_accumulator(
        seed in any::<u64>(),
        n in 1usize..120,
        d in 1usize..9,
        k in 2usize..40,
        offset in prop_oneof![Just(0.0), Just(1e4), Just(-3.5)],
        raw_cuts in prop::collection::vec(0usize..1000, 0..16),
        shards in 1usize..=8,
        parallel in any::<bool>(),
    ) {
        let (x, y) = gaussian_data(seed, n, d, k, 2.0, offset);
        let reference = one_batch(&x, &y, k).to_parts();
        let par = if parallel { Par::rayon(0) } else { Par::Seq };
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5a4d);
        let mut parts: Vec<Accumulator> = (0..shards).map(|_| Accumulator::new(k, d)).collect();
        // One scratch for every shard: what one folding thread would keep.
        let mut scratch = FoldScratch::new();
        for w in cuts_from(n, &raw_cuts).windows(2).filter(|w| w[0] < w[1]) {
            let shard = &mut parts[rng.random_range(0..shards)];
            shard
                .fold_batch_with(x.slice(s![w[0]..w[1], ..]), &y[w[0]..w[1]], &mut scratch, par)
                .unwrap();
        }
        let mut merged = Accumulator::new(k, d);
        for shard in &parts {
            merged.merge(shard).unwrap();
        }
        prop_assert_eq!(merged.samples(), n as u64);
        if let Err(e) = parts_close(&merged.to_parts(), &reference, tolerance(offset)) {
            return Err(TestCaseError::fail(format!("{shards} shards: {e}")));
        }
    }

    /// The per-class and per-row passes of a fold split over 2..=5 threads
    /// (`Par::Rayon(n)`) give the class statistics of the sequential fold
    /// bit for bit, and its scatter to rounding (the product's blocking may
    /// differ): singleton classes (K up to 300), zero rows, several batches
    /// through one scratch.
    #[test]
    fn parallel_fold_passes_equal_the_sequential_fold(
        seed in any::<u64>(),
        n in 1usize..300,
        d in 1usize..40,
        k in 2usize..300,
        offset in prop_oneof![Just(0.0), Just(1e4)],
        raw_cuts in prop::collection::vec(0usize..1000, 0..6),
        threads in 2usize..=5,
        zero_rows in prop::collection::vec(0usize..300, 0..4),
    ) {
        let (mut x, y) = gaussian_data(seed, n, d, k, 2.0, offset);
        for &row in zero_rows.iter().filter(|&&r| r < n) {
            x.row_mut(row).fill(0.0);
        }
        let mut folded = Vec::new();
        for par in [Par::Seq, Par::rayon(threads)] {
            let mut acc = Accumulator::new(k, d);
            let mut scratch = FoldScratch::new();
            for w in cuts_from(n, &raw_cuts).windows(2).filter(|w| w[0] < w[1]) {
                acc.fold_batch_with(x.slice(s![w[0]..w[1], ..]), &y[w[0]..w[1]], &mut scratch, par)
                    .unwrap();
            }
            folded.push(acc.to_parts());
        }
        let (seq, par) = (&folded[0], &folded[1]);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(&seq.class_counts, &par.class_counts);
        prop_assert_eq!(&seq.unit_count, &par.unit_count);
        for (name, a, b) in [
            ("class_means", &seq.class_means, &par.class_means),
            ("within_trace", &seq.within_trace, &par.within_trace),
            ("unit_sum", &seq.unit_sum, &par.unit_sum),
            ("unit_within_trace", &seq.unit_within_trace, &par.unit_within_trace),
        ] {
            prop_assert_eq!(bits(a), bits(b), "{} differs with {} threads", name, threads);
        }
        if let Err(e) = parts_close(par, seq, 1e-13) {
            return Err(TestCaseError::fail(format!("{threads} threads: {e}")));
        }
    }

    /// (A+B)+C = A+(B+C) and A+B = B+A, to rounding.
    #[test]
    fn merge_is_associative_and_commutative(
        seed in any::<u64>(),
        sizes in (1usize..30, 1usize..30, 1usize..30),
        d in 1usize..7,
        k in 2usize..5,
        offset in prop_oneof![Just(0.0), Just(1e4)],
    ) {
        let n = sizes.0 + sizes.1 + sizes.2;
        let (x, y) = gaussian_data(seed, n, d, k, 1.0, offset);
        let cut1 = sizes.0;
        let cut2 = sizes.0 + sizes.1;
        let a = fold(&x, &y, k, &[0, cut1], Par::Seq);
        let b = fold(&x, &y, k, &[cut1, cut2], Par::Seq);
        let c = fold(&x, &y, k, &[cut2, n], Par::Seq);

        let mut ab_c = a.clone();
        ab_c.merge(&b).unwrap();
        ab_c.merge(&c).unwrap();
        let mut bc = b.clone();
        bc.merge(&c).unwrap();
        let mut a_bc = a.clone();
        a_bc.merge(&bc).unwrap();
        if let Err(e) = parts_close(&ab_c.to_parts(), &a_bc.to_parts(), tolerance(offset)) {
            return Err(TestCaseError::fail(format!("associativity: {e}")));
        }

        let mut ab = a.clone();
        ab.merge(&b).unwrap();
        let mut ba = b.clone();
        ba.merge(&a).unwrap();
        if let Err(e) = parts_close(&ab.to_parts(), &ba.to_parts(), tolerance(offset)) {
            return Err(TestCaseError::fail(format!("commutativity: {e}")));
        }
        // Merging an empty accumulator is the identity, exactly.
        let mut with_empty = ab.clone();
        with_empty.merge(&Accumulator::new(k, d)).unwrap();
        prop_assert_eq!(with_empty.to_parts(), ab.to_parts());
    }

    /// VCI (and the probe MSE and both ranks) do not change under
    /// h ↦ A h + b for a random well-conditioned invertible A.
    #[test]
    fn vci_is_affine_invariant(
        seed in any::<u64>(),
        d in 1usize..7,
        k in 2usize..6,
        extra in 0usize..60,
        shift in -100.0f64..100.0,
    ) {
        let n = 3 * d + k + 2 + extra;
        let (x, y) = gaussian_data(seed, n, d, k, 1.5, 0.0);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let a = well_conditioned(&mut rng, d);
        let b: Vec<f64> = (0..d).map(|_| shift * rng.random_range(-1.0..1.0)).collect();
        let mut mapped = x.dot(&a.t());
        for mut row in mapped.rows_mut() {
            row.iter_mut().zip(&b).for_each(|(v, s)| *v += s);
        }
        let before = metrics_of(&one_batch(&x, &y, k));
        let after = metrics_of(&one_batch(&mapped, &y, k));
        prop_assert_eq!(before.rank_total, after.rank_total);
        prop_assert_eq!(before.rank_between, after.rank_between);
        let (v0, v1) = (before.vci.unwrap(), after.vci.unwrap());
        prop_assert!((v0 - v1).abs() <= 1e-9, "vci {} vs {}", v0, v1);
        let (m0, m1) = (before.linear_probe_mse.unwrap(), after.linear_probe_mse.unwrap());
        prop_assert!((m0 - m1).abs() <= 1e-9, "probe {} vs {}", m0, m1);
    }

    /// VCI ∈ [0, 1] whatever the data: tiny or huge samples, separated or
    /// overlapping classes, offsets, duplicated rows, fewer rows than features.
    #[test]
    fn vci_is_in_the_unit_interval(
        seed in any::<u64>(),
        n in 2usize..60,
        d in 1usize..12,
        k in 2usize..8,
        sep in prop_oneof![Just(0.0), Just(1e-3), Just(1.0), Just(100.0)],
        offset in prop_oneof![Just(0.0), Just(1e4)],
        duplicate in any::<bool>(),
    ) {
        let (mut x, y) = gaussian_data(seed, n, d, k, sep, offset);
        if duplicate {
            let first = x.row(0).to_owned();
            x.row_mut(n - 1).assign(&first);
        }
        let m = metrics_of(&one_batch(&x, &y, k));
        if let Some(v) = m.vci {
            prop_assert!((0.0..=1.0).contains(&v), "vci = {}", v);
        } else {
            prop_assert!(m.notes.contains_key("vci"));
        }
        if let Some(p) = m.linear_probe_mse {
            prop_assert!((0.0..=1.0).contains(&p), "probe = {}", p);
        }
        if m.small_sample {
            prop_assert!(m.samples as usize <= d + m.classes_observed);
        }
    }

    /// Every row equal to its class mean: VCI = 0 (to rounding), and with
    /// any batching.
    #[test]
    fn vci_is_zero_for_collapsed_data(
        seed in any::<u64>(),
        d in 1usize..10,
        k in 2usize..7,
        per_class in 1usize..6,
        raw_cuts in prop::collection::vec(0usize..100, 0..5),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        // Well-conditioned class means: e_1..e_d, then -1 (a simplex with
        // e_1..e_d when K = d + 1), then random points, all rotated by a
        // random orthogonal matrix and scaled. Random means alone can be
        // nearly affinely dependent, which only measures the conditioning.
        let q = orthogonal(&mut rng, d);
        let scale = rng.random_range(0.5..5.0);
        let mut means = vec![0.0; k * d];
        for c in 0..k {
            let point: Vec<f64> = match c {
                c if c < d => (0..d).map(|i| if i == c { 1.0 } else { 0.0 }).collect(),
                c if c == d => vec![-1.0; d],
                _ => (0..d).map(|_| rng.random_range(-1.0..1.0)).collect(),
            };
            for i in 0..d {
                means[c * d + i] = scale * (0..d).map(|j| q[(i, j)] * point[j]).sum::<f64>();
            }
        }
        let n = k * per_class;
        let y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
        let x = Array2::from_shape_fn((n, d), |(i, j)| means[y[i] as usize * d + j]);
        let acc = fold(&x, &y, k, &cuts_from(n, &raw_cuts), Par::Seq);
        let m = metrics_of(&acc);
        let v = m.vci.unwrap();
        prop_assert!(v.abs() <= 1e-12, "vci = {:e}", v);
        prop_assert!(m.nc1.unwrap().abs() <= 1e-9, "nc1 = {:e}", m.nc1.unwrap());
    }

    /// Balanced classes with rank(Σ_B) = K − 1: linear_probe_mse = (1 − 1/K)·VCI.
    #[test]
    fn balanced_probe_identity(
        seed in any::<u64>(),
        k in 2usize..6,
        per_class in 2usize..25,
        extra_d in 0usize..5,
    ) {
        let d = k - 1 + extra_d;
        let n = k * per_class;
        let (x, _) = gaussian_data(seed, n, d, k, 1.0, 0.0);
        // Balanced labels in a scrambled but exact order.
        let y: Vec<u32> = (0..n).map(|i| ((i * 7 + seed as usize % 5) % k) as u32).collect();
        let m = metrics_of(&one_batch(&x, &y, k));
        prop_assume!(m.rank_between == k - 1);
        let v = m.vci.unwrap();
        let p = m.linear_probe_mse.unwrap();
        let want = (1.0 - 1.0 / k as f64) * v;
        prop_assert!((p - want).abs() <= 1e-12, "probe {} vs (1-1/K) vci {}", p, want);
    }

    /// to_parts → from_parts is lossless, and the metrics are identical.
    #[test]
    fn parts_round_trip(
        seed in any::<u64>(),
        n in 1usize..40,
        d in 1usize..6,
        k in 2usize..8,
    ) {
        let (x, y) = gaussian_data(seed, n, d, k, 1.0, 0.0);
        let acc = fold(&x, &y, k, &cuts_from(n, &[n / 3, n / 2]), Par::Seq);
        let parts = acc.to_parts();
        let back = Accumulator::from_parts(parts.clone()).unwrap();
        prop_assert_eq!(back.to_parts(), parts);
        prop_assert_eq!(back.samples(), n as u64);
        prop_assert_eq!(metrics_of(&back), metrics_of(&acc));
    }
}

/// N < 2, a single observed class, and all class means equal: VCI and NC1
/// undefined, with a note, and no NaN anywhere.
#[test]
fn undefined_cases_are_reported_not_nan() {
    fn check(m: &EpochMetrics, case: &str) {
        assert!(m.vci.is_none(), "{case}: vci = {:?}", m.vci);
        assert!(m.nc1.is_none(), "{case}: nc1 = {:?}", m.nc1);
        for name in ["vci", "nc1"] {
            assert!(
                m.notes.contains_key(name),
                "{case}: no note for {name}: {:?}",
                m.notes
            );
        }
        for v in [
            m.linear_probe_mse,
            m.cdnv,
            m.class_separation,
            m.equinorm,
            m.equiangularity,
            m.effective_rank,
        ]
        .into_iter()
        .flatten()
        {
            assert!(v.is_finite(), "{case}: {m:?}");
        }
    }
    // No samples at all.
    let m = metrics_of(&Accumulator::new(3, 4));
    check(&m, "empty");
    assert_eq!((m.samples, m.rank_total, m.rank_between), (0, 0, 0));

    // N = 1.
    let x = Array2::from_shape_vec((1, 3), vec![0.5, -1.0, 2.0]).unwrap();
    let m = metrics_of(&one_batch(&x, &[1], 3));
    check(&m, "one sample");
    assert_eq!(m.rank_total, 0);
    assert!(m.effective_rank.is_none() && m.notes.contains_key("effective_rank"));

    // One class observed out of 4.
    let (x, _) = gaussian_data(7, 30, 5, 1, 1.0, 0.0);
    let m = metrics_of(&one_batch(&x, &[2; 30], 4));
    check(&m, "single class");
    assert_eq!((m.classes_observed, m.rank_between), (1, 0));
    assert!(m.effective_rank.is_some());

    // Four classes made of the same four integer rows: means equal exactly
    // in any summation order, so rank(Σ_B) = 0 although Σ_W ≠ 0.
    let base = [
        [1.0, 2.0, -1.0],
        [3.0, -2.0, 0.0],
        [-1.0, 0.0, 4.0],
        [1.0, 4.0, 1.0],
    ];
    let x = Array2::from_shape_fn((16, 3), |(i, j)| base[i / 4][j]);
    let y: Vec<u32> = (0..16).map(|i| (i % 4) as u32).collect();
    for cuts in [vec![0, 16], vec![0, 4, 8, 12, 16], vec![0, 8, 16]] {
        let m = metrics_of(&fold(&x, &y, 4, &cuts, Par::Seq));
        check(&m, "equal means");
        assert_eq!((m.rank_between, m.rank_total), (0, 3));
    }
}

fn sample_parts() -> AccumulatorParts {
    let (x, y) = gaussian_data(11, 20, 3, 3, 1.0, 0.0);
    let mut parts = one_batch(&x, &y, 4).to_parts();
    assert_eq!(
        parts.class_counts[3], 0,
        "class 3 must be empty for the test"
    );
    parts.num_classes = 4;
    parts
}

/// from_parts refuses every kind of broken field and names it.
#[test]
fn from_parts_rejects_each_bad_field() {
    type Corrupt = fn(&mut AccumulatorParts);
    let cases: Vec<(&str, Corrupt)> = vec![
        ("num_classes", |p| p.num_classes = 0),
        ("feature_dim", |p| p.feature_dim = 0),
        ("class_counts", |p| {
            p.class_counts.pop();
        }),
        ("class_means", |p| {
            p.class_means.push(0.0);
        }),
        ("scatter", |p| {
            p.scatter.pop();
        }),
        ("within_trace", |p| {
            p.within_trace.push(1.0);
        }),
        ("unit_sum", |p| {
            p.unit_sum.pop();
        }),
        ("unit_count", |p| {
            p.unit_count.push(0);
        }),
        ("class_means", |p| p.class_means[1] = f64::NAN),
        ("scatter", |p| p.scatter[4] = f64::INFINITY),
        ("within_trace", |p| p.within_trace[0] = f64::NEG_INFINITY),
        ("unit_sum", |p| p.unit_sum[2] = f64::NAN),
        ("within_trace", |p| p.within_trace[1] = -1.0),
        ("unit_count", |p| p.unit_count[0] = p.class_counts[0] + 1),
        ("class_means", |p| p.class_means[3 * 3] = 1.0), // empty class 3 with a mean
        ("scatter", |p| p.scatter[0] = -1.0),            // negative diagonal
        ("scatter", |p| p.scatter[1] += 1.0),            // not symmetric
        ("scatter", |p| {
            // No samples but a non-zero scatter.
            p.class_counts.iter_mut().for_each(|c| *c = 0);
            p.unit_count.iter_mut().for_each(|c| *c = 0);
            p.class_means.iter_mut().for_each(|v| *v = 0.0);
            p.within_trace.iter_mut().for_each(|v| *v = 0.0);
            p.unit_sum.iter_mut().for_each(|v| *v = 0.0);
            p.unit_within_trace.iter_mut().for_each(|v| *v = 0.0);
        }),
        ("unit_within_trace", |p| {
            p.unit_within_trace.push(0.0);
        }),
        ("unit_within_trace", |p| p.unit_within_trace[0] = f64::NAN),
        ("unit_within_trace", |p| p.unit_within_trace[1] = -1e-3),
        ("unit_within_trace", |p| {
            // Unit vectors cannot spread more than their count.
            p.unit_within_trace[2] = p.unit_count[2] as f64 + 1.0;
        }),
        ("unit_sum", |p| p.unit_sum[3 * 3] = 0.5), // empty class 3 with a unit sum
    ];
    let good = sample_parts();
    assert!(Accumulator::from_parts(good.clone()).is_ok());
    for (i, (field, corrupt)) in cases.into_iter().enumerate() {
        let mut bad = good.clone();
        corrupt(&mut bad);
        match Accumulator::from_parts(bad) {
            Ok(_) => panic!("case {i} ({field}) was accepted"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with(field),
                    "case {i}: expected the message to name {field}: {msg}"
                );
                assert!(msg.contains("expected"), "case {i}: {msg}");
            }
        }
    }
}

/// Merging accumulators of different shapes is refused and changes nothing.
#[test]
fn merge_refuses_other_shapes() {
    let (x, y) = gaussian_data(3, 10, 4, 3, 1.0, 0.0);
    let mut a = one_batch(&x, &y, 3);
    let before = a.to_parts();
    assert!(a
        .merge(&Accumulator::new(3, 5))
        .unwrap_err()
        .to_string()
        .starts_with("feature_dim"));
    assert!(a
        .merge(&Accumulator::new(4, 4))
        .unwrap_err()
        .to_string()
        .starts_with("num_classes"));
    assert_eq!(a.to_parts(), before);
}
