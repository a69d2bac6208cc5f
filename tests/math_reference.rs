//! The math core against an independent numpy reference.
//!
//! `tests/reference/make_fixtures.py` computes every SPEC §2 metric from the
//! direct two-pass definitions (extended-precision means and scatter, eigh,
//! explicit pseudo-inverses) and commits small fixtures. This test reads the
//! same `.npy` files with `vcid::npy`, streams them through the accumulator
//! in several batchings (batch statistics merged, and batches folded in
//! place into 1 to 8 shards that are merged at the end), and checks every metric within 1e-9 relative (1e-9
//! absolute near 0), the ranks, K_obs, `small_sample`, and exactly which
//! metrics are undefined.

use std::path::{Path, PathBuf};

use ndarray::{s, Array2};
use serde_json::Value;
use vcid::metrics::{self, EpochMetrics};
use vcid::npy::{self, FeatureReader};
use vcid::stats::{Accumulator, FoldScratch, Par};

const REL: f64 = 1e-9;
const ABS: f64 = 1e-9;

const METRICS: [&str; 8] = [
    "vci",
    "linear_probe_mse",
    "nc1",
    "cdnv",
    "class_separation",
    "equinorm",
    "equiangularity",
    "effective_rank",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/fixtures")
}

struct Case {
    name: String,
    features: Array2<f64>,
    labels: Vec<u32>,
    num_classes: usize,
    expected: Value,
}

fn load(name: &str) -> Case {
    let dir = fixtures();
    let mut reader = FeatureReader::open(dir.join(format!("{name}.features.npy"))).unwrap();
    let rows = reader.rows();
    let features = reader
        .read_rows(rows)
        .unwrap()
        .unwrap_or_else(|| Array2::zeros((0, reader.cols())));
    let labels = npy::read_labels(dir.join(format!("{name}.labels.npy"))).unwrap();
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.expected.json"))).unwrap(),
    )
    .unwrap();
    Case {
        name: name.to_string(),
        features,
        labels,
        num_classes: doc["num_classes"].as_u64().unwrap() as usize,
        expected: doc["expected"].clone(),
    }
}

fn case_names() -> Vec<String> {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("index.json")).unwrap())
            .unwrap();
    index
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Streams `case` through the accumulator `batch` rows at a time.
fn accumulate(case: &Case, batch: usize, par: Par) -> Accumulator {
    let mut acc = Accumulator::new(case.num_classes, case.features.ncols());
    let mut start = 0;
    while start < case.labels.len() {
        let end = (start + batch).min(case.labels.len());
        let part = Accumulator::from_batch(
            case.features.slice(s![start..end, ..]),
            &case.labels[start..end],
            case.num_classes,
            par,
        )
        .unwrap();
        acc.merge(&part).unwrap();
        start = end;
    }
    acc
}

/// Folds `case` in place `batch` rows at a time, batch `i` into shard
/// `i % shards`, then merges the shards (a sharded daemon's path).
fn accumulate_sharded(case: &Case, batch: usize, shards: usize, par: Par) -> Accumulator {
    let dim = case.features.ncols();
    let mut parts: Vec<Accumulator> = (0..shards)
        .map(|_| Accumulator::new(case.num_classes, dim))
        .collect();
    let mut scratch = FoldScratch::new();
    let n = case.labels.len();
    for (i, start) in (0..n).step_by(batch).enumerate() {
        let end = (start + batch).min(n);
        parts[i % shards]
            .fold_batch_with(
                case.features.slice(s![start..end, ..]),
                &case.labels[start..end],
                &mut scratch,
                par,
            )
            .unwrap();
    }
    let mut total = Accumulator::new(case.num_classes, dim);
    for part in &parts {
        total.merge(part).unwrap();
    }
    total
}

fn value_of(m: &EpochMetrics, name: &str) -> Option<f64> {
    match name {
        "vci" => m.vci,
        "linear_probe_mse" => m.linear_probe_mse,
        "nc1" => m.nc1,
        "cdnv" => m.cdnv,
        "class_separation" => m.class_separation,
        "equinorm" => m.equinorm,
        "equiangularity" => m.equiangularity,
        "effective_rank" => m.effective_rank,
        _ => unreachable!("unknown metric {name}"),
    }
}

/// Compares one result with the reference; returns the list of mismatches
/// (empty when everything agrees) and the largest scaled error seen.
fn compare(case: &Case, m: &EpochMetrics, skip: &[&str]) -> (Vec<String>, f64) {
    let e = &case.expected;
    let mut problems = Vec::new();
    let mut worst: f64 = 0.0;
    for (field, got) in [
        ("samples", m.samples),
        ("classes_observed", m.classes_observed as u64),
        ("feature_dim", m.feature_dim as u64),
        ("rank_total", m.rank_total as u64),
        ("rank_between", m.rank_between as u64),
    ] {
        let want = e[field].as_u64().unwrap();
        if got != want {
            problems.push(format!("{field}: expected {want}, got {got}"));
        }
    }
    if m.small_sample != e["small_sample"].as_bool().unwrap() {
        problems.push(format!(
            "small_sample: expected {}, got {}",
            e["small_sample"], m.small_sample
        ));
    }
    for name in METRICS.into_iter().filter(|n| !skip.contains(n)) {
        let want = e[name].as_f64();
        let got = value_of(m, name);
        match (want, got) {
            (Some(w), Some(g)) => {
                let err = (g - w).abs() / (REL * w.abs() + ABS);
                worst = worst.max(err);
                if err.is_nan() || err > 1.0 {
                    problems.push(format!(
                        "{name}: expected {w:e}, got {g:e} (diff {:e})",
                        g - w
                    ));
                }
            }
            (None, None) => {
                if !m.notes.contains_key(name) {
                    problems.push(format!("{name}: undefined without a note"));
                }
            }
            (w, g) => problems.push(format!(
                "{name}: expected {w:?}, got {g:?} (notes: {:?})",
                m.notes
            )),
        }
        if got.is_some() && m.notes.contains_key(name) {
            problems.push(format!("{name}: has a value and a note"));
        }
        if let Some(g) = got {
            assert!(g.is_finite(), "{}: {name} = {g}", case.name);
        }
    }
    (problems, worst)
}

#[test]
fn every_fixture_matches_the_numpy_reference_in_several_batchings() {
    let names = case_names();
    assert!(names.len() >= 13, "fixtures missing: {names:?}");
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for name in &names {
        let case = load(name);
        let n = case.labels.len();
        let mut worst: f64 = 0.0;
        // One batch (sequential and parallel kernels), odd small batches,
        // and single rows, merged batch by batch or folded into shards: all
        // must agree with the reference.
        for (batch, par, shards) in [
            (n.max(1), Par::Seq, None),
            (n.max(1), Par::rayon(0), None),
            (7, Par::Seq, None),
            (64, Par::rayon(0), None),
            (1, Par::Seq, None),
            (n.max(1), Par::Seq, Some(1)),
            (7, Par::Seq, Some(3)),
            (64, Par::rayon(0), Some(8)),
            (1, Par::Seq, Some(5)),
        ] {
            let acc = match shards {
                None => accumulate(&case, batch, par),
                Some(shards) => accumulate_sharded(&case, batch, shards, par),
            };
            let m = metrics::compute(&acc, par).unwrap();
            // Checked on its own in class_separation_with_a_large_offset.
            let skip: &[&str] = if name == "large_offset" {
                &["class_separation"]
            } else {
                &[]
            };
            let (problems, w) = compare(&case, &m, skip);
            worst = worst.max(w);
            for p in problems {
                failures.push(format!("{name} (batch {batch}, shards {shards:?}): {p}"));
            }
        }
        report.push(format!(
            "{name}: largest error {worst:.2e} of the tolerance"
        ));
    }
    println!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_cases_the_issue_asks_for_are_present() {
    let names = case_names();
    for required in [
        "balanced",
        "imbalanced",
        "unused_classes",
        "large_offset",
        "d_gt_n",
        "k_gt_d",
        "zero_rows",
        "collapsed",
        "single_class",
        "one_sample",
        "equal_means",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "missing fixture {required}"
        );
    }
    // The fixtures really have the shapes their names promise.
    let c = load("d_gt_n");
    assert!(c.features.ncols() > c.features.nrows());
    let c = load("k_gt_d");
    assert!(c.num_classes > c.features.ncols());
    let c = load("large_offset");
    let mean = c.features.mean().unwrap();
    assert!(mean > 5e3, "offset {mean}");
    let c = load("zero_rows");
    assert!(
        c.features
            .rows()
            .into_iter()
            .filter(|r| r.iter().all(|&v| v == 0.0))
            .count()
            > 20
    );
    let c = load("unused_classes");
    let mut seen = vec![false; c.num_classes];
    c.labels.iter().for_each(|&l| seen[l as usize] = true);
    assert!(seen.iter().any(|s| !s));
}

/// numpy itself wrote these (format 2.0 float32 features, uint8 labels in
/// 2.0, int16 in 3.0, uint32 and int8 in 1.0); they must all read the same.
#[test]
fn numpy_written_format_variants_read_identically() {
    let dir = fixtures();
    let reader = FeatureReader::open(dir.join("float32.features.npy")).unwrap();
    assert_eq!(reader.dtype(), npy::FloatDtype::F32);
    let base = npy::read_labels(dir.join("float32.labels.npy")).unwrap();
    assert_eq!(base.len(), reader.rows());
    for variant in ["labels_i2_v3", "labels_u4", "labels_i1"] {
        let other = npy::read_labels(dir.join(format!("float32.{variant}.npy"))).unwrap();
        assert_eq!(other, base, "{variant}");
    }
    // The reference metrics were computed from the float32 values widened
    // to float64, which is exactly what the reader returns.
    let case = load("float32");
    let values = case.features.iter().map(|&v| v as f32 as f64);
    assert!(values.zip(case.features.iter()).all(|(a, &b)| a == b));
}

/// Cosine class separation on features with a 1e4 common offset and 1e-2
/// spread: every unit vector is nearly parallel to the offset, so the
/// cosine distances are ~1e-12 and `1 - |mean unit vector|^2` cancels
/// catastrophically. The reference avoids the cancellation (pairwise
/// differences, checked against 60-digit decimal arithmetic); the issue asks
/// for 1e-9 here too, and also that the batching not matter.
#[test]
fn class_separation_with_a_large_offset() {
    let case = load("large_offset");
    let want = case.expected["class_separation"].as_f64().unwrap();
    let mut problems = Vec::new();
    for batch in [case.labels.len(), 64, 7, 1] {
        let acc = accumulate(&case, batch, Par::Seq);
        let got = metrics::compute(&acc, Par::Seq)
            .unwrap()
            .class_separation
            .unwrap();
        if (got - want).abs() > REL * want.abs() + ABS {
            problems.push(format!(
                "batch {batch}: expected {want:e}, got {got:e} (diff {:e})",
                got - want
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "class_separation, large_offset:\n{}",
        problems.join("\n")
    );
}
