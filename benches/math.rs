//! Math-core benchmarks (criterion): the batch update and the epoch close.
//!
//! 256-row f64 batches, all cores (`Par::rayon(0)`), for (d, K) in
//! {(128, 10), (512, 10), (2048, 10), (2048, 1000)}; with K = 1000 a batch
//! holds ~230 of the classes.
//!
//! - `batch_update/d{d}_k{K}`: `Accumulator::from_batch` + `merge` into a
//!   running accumulator: batch statistics in a d × d accumulator of their
//!   own, then an O(d²) merge (the daemon's path before sharding).
//! - `batch_fold/d{d}_k{K}`: `Accumulator::fold_batch_with`, the batch
//!   folded in place with a reused `FoldScratch` (no d × d or d × rows
//!   allocation, classes present only): `vcid compute`'s path and a shard's.
//! - `shard_merge/d{d}_k{K}`: `merge` of one full accumulator into another
//!   (what closing a sharded epoch does once per shard).
//! - `faer_syrk/{d}` and `faer_gemm/{d}`: faer's lower-triangular product
//!   and its dense `matmul` on the same operands (the 256 × d centred batch
//!   times its transpose, its columns `stats::operand_stride` apart as in
//!   a fold), measured in the same run as the baseline.
//! - `close/d2048_k1000`: `metrics::compute` (all metrics) of an
//!   accumulator with d = 2048, K = 1000, N = 4096.
//! - `eigenvalues/{one_stage,two_stage}/d2048`: the eigenvalues alone of
//!   the same Σ_T (the close's largest step): faer's one-stage
//!   `self_adjoint_evd` (the baseline) and `SymmetricEigen::values_of_lower`
//!   (two-stage, what the close uses).
//! - `from_parts/d2048`: `Accumulator::from_parts` of the same statistics
//!   (K = 10 here): every check of statistics from outside, dominated by
//!   the positive-semi-definiteness check (one d × d Cholesky).
//!
//! At the end a table prints rows/s and GFLOP/s for each (the batch paths
//! and the syrk count n·d·(d+1) flops, the lower triangle of XᵀX; the gemm
//! 2·n·d²), and for the batch paths the share of the syrk ceiling measured
//! in this run: ceiling rows/s = syrk GFLOP/s ÷ d·(d+1).
//! Run: `cargo bench --bench math` (add a filter such as `d2048` to run
//! fewer).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use vcid::linalg::SymmetricEigen;
use vcid::metrics;
use vcid::stats::{operand_stride, Accumulator, FoldScratch, Par};

const ROWS: usize = 256;
const DIMS: [usize; 3] = [128, 512, 2048];
/// (d, K) of the batch paths.
const CASES: [(usize, usize); 4] = [(128, 10), (512, 10), (2048, 10), (2048, 1000)];

/// (iterations, total time) per benchmark, for the GFLOP/s table.
static TIMES: Mutex<BTreeMap<String, (u64, Duration, f64)>> = Mutex::new(BTreeMap::new());

fn record(name: &str, iters: u64, elapsed: Duration, flops_per_iter: f64) {
    if let Ok(mut times) = TIMES.lock() {
        let entry = times
            .entry(name.to_string())
            .or_insert((0, Duration::ZERO, flops_per_iter));
        entry.0 += iters;
        entry.1 += elapsed;
    }
}

fn features(rng: &mut StdRng, rows: usize, d: usize, classes: usize) -> (Array2<f64>, Vec<u32>) {
    let means: Vec<f64> = (0..classes * d)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    let labels: Vec<u32> = (0..rows)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    let x = Array2::from_shape_fn((rows, d), |(i, j)| {
        means[labels[i] as usize * d + j] + rng.sample::<f64, _>(StandardNormal)
    });
    (x, labels)
}

fn batch_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(ROWS as u64));
    group
}

/// Times `step` (one 256-row batch per call) under `name/d{d}_k{k}`.
fn time_batches(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    (d, k): (usize, usize),
    mut step: impl FnMut(),
) {
    let id = format!("d{d}_k{k}");
    let flops = (ROWS * d * (d + 1)) as f64;
    group.bench_function(&id, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                step();
            }
            let elapsed = start.elapsed();
            record(&format!("{name}/{id}"), iters, elapsed, flops);
            elapsed
        })
    });
}

fn batch_update(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = batch_group(c, "batch_update");
    for (d, k) in CASES {
        let (x, labels) = features(&mut rng, ROWS, d, k);
        let mut acc = Accumulator::from_batch(x.view(), &labels, k, Par::rayon(0))
            .unwrap_or_else(|e| panic!("{e}"));
        time_batches(&mut group, "batch_update", (d, k), || {
            let batch = Accumulator::from_batch(x.view(), &labels, k, Par::rayon(0))
                .unwrap_or_else(|e| panic!("{e}"));
            acc.merge(&batch).unwrap_or_else(|e| panic!("{e}"));
        });
    }
    group.finish();
}

/// The same batches folded in place with a reused scratch.
fn batch_fold(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = batch_group(c, "batch_fold");
    for (d, k) in CASES {
        let (x, labels) = features(&mut rng, ROWS, d, k);
        let mut acc = Accumulator::new(k, d);
        let mut scratch = FoldScratch::new();
        time_batches(&mut group, "batch_fold", (d, k), || {
            acc.fold_batch_with(x.view(), &labels, &mut scratch, Par::rayon(0))
                .unwrap_or_else(|e| panic!("{e}"));
        });
    }
    group.finish();
}

/// Merging one full accumulator (every class observed) into another.
fn shard_merge(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(4);
    let mut group = c.benchmark_group("shard_merge");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (d, k) in [(512, 10), (2048, 1000)] {
        let (x, labels) = features(&mut rng, k.max(ROWS), d, k);
        let shard = Accumulator::from_batch(x.view(), &labels, k, Par::rayon(0))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut total = shard.clone();
        let id = format!("d{d}_k{k}");
        group.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    total.merge(&shard).unwrap_or_else(|e| panic!("{e}"));
                }
                let elapsed = start.elapsed();
                record(&format!("shard_merge/{id}"), iters, elapsed, 0.0);
                elapsed
            })
        });
    }
    group.finish();
}

fn faer_products(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    for (kernel, triangular) in [("faer_syrk", true), ("faer_gemm", false)] {
        let mut group = batch_group(c, kernel);
        for d in DIMS {
            // The centred batch, d × n column-major with the column
            // stride of a fold's operand (rows d.. are padding).
            let padded =
                Mat::<f64>::from_fn(operand_stride(d), ROWS, |_, _| rng.sample(StandardNormal));
            let x = padded.as_ref().subrows(0, d);
            let mut out = Mat::<f64>::zeros(d, d);
            let flops = if triangular {
                (ROWS * d * (d + 1)) as f64
            } else {
                (2 * ROWS * d * d) as f64
            };
            group.bench_with_input(BenchmarkId::from_parameter(d), &d, |b, _| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        if triangular {
                            triangular_matmul(
                                out.as_mut(),
                                BlockStructure::TriangularLower,
                                Accum::Replace,
                                x,
                                BlockStructure::Rectangular,
                                x.transpose(),
                                BlockStructure::Rectangular,
                                1.0,
                                Par::rayon(0),
                            );
                        } else {
                            faer::linalg::matmul::matmul(
                                out.as_mut(),
                                Accum::Replace,
                                x,
                                x.transpose(),
                                1.0,
                                Par::rayon(0),
                            );
                        }
                    }
                    let elapsed = start.elapsed();
                    record(&format!("{kernel}/{d}"), iters, elapsed, flops);
                    elapsed
                })
            });
        }
        group.finish();
    }
}

fn close(c: &mut Criterion) {
    let (d, k, n) = (2048, 1000, 4096);
    let mut rng = StdRng::seed_from_u64(3);
    let (x, labels) = features(&mut rng, n, d, k);
    let acc = Accumulator::from_batch(x.view(), &labels, k, Par::rayon(0))
        .unwrap_or_else(|e| panic!("{e}"));
    drop(x);
    let mut group = c.benchmark_group("close");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(12));
    group.bench_function("d2048_k1000", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let m = metrics::compute(&acc, Par::rayon(0)).unwrap_or_else(|e| panic!("{e}"));
                std::hint::black_box(m);
            }
            let elapsed = start.elapsed();
            record("close/d2048_k1000", iters, elapsed, 0.0);
            elapsed
        })
    });
    group.finish();

    // The close's largest step, Σ_T's eigenvalues: faer's one-stage
    // tridiagonalisation (the baseline, what the close used before) and
    // linalg's two-stage reduction, on the same Σ_T in the same run.
    let scatter = acc.scatter_lower();
    let total = || {
        Mat::from_fn(d, d, |i, j| {
            if i >= j {
                scatter[(i, j)] / n as f64
            } else {
                0.0
            }
        })
    };
    let mut group = c.benchmark_group("eigenvalues");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    for name in ["one_stage", "two_stage"] {
        group.bench_function(format!("{name}/d{d}"), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let lower = total();
                    let start = Instant::now();
                    let values = if name == "one_stage" {
                        faer_eigenvalues(lower)
                    } else {
                        SymmetricEigen::values_of_lower(lower, Par::rayon(0))
                            .unwrap_or_else(|e| panic!("{e}"))
                    };
                    elapsed += start.elapsed();
                    std::hint::black_box(values);
                }
                record(&format!("eigenvalues/{name}/d{d}"), iters, elapsed, 0.0);
                elapsed
            })
        });
    }
    group.finish();
}

/// The eigenvalues of the matrix whose lower triangle `lower` holds, by
/// faer's one-stage `self_adjoint_evd` without vectors.
fn faer_eigenvalues(lower: Mat<f64>) -> Vec<f64> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::evd::{self, ComputeEigenvectors};
    let order = lower.nrows();
    let mut values = faer::diag::Diag::<f64>::zeros(order);
    let params = Default::default();
    let mut scratch = MemBuffer::new(evd::self_adjoint_evd_scratch::<f64>(
        order,
        ComputeEigenvectors::No,
        Par::rayon(0),
        params,
    ));
    evd::self_adjoint_evd(
        lower.as_ref(),
        values.as_mut(),
        None,
        Par::rayon(0),
        MemStack::new(&mut scratch),
        params,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    (0..order).map(|i| values[i]).collect()
}

fn from_parts(c: &mut Criterion) {
    let (d, k, n) = (2048, 10, 4096);
    let mut rng = StdRng::seed_from_u64(4);
    let (x, labels) = features(&mut rng, n, d, k);
    let parts = Accumulator::from_batch(x.view(), &labels, k, Par::rayon(0))
        .unwrap_or_else(|e| panic!("{e}"))
        .to_parts();
    drop(x);
    let mut group = c.benchmark_group("from_parts");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.bench_function("d2048", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let copy = parts.clone();
                let start = Instant::now();
                let acc = Accumulator::from_parts(copy).unwrap_or_else(|e| panic!("{e}"));
                elapsed += start.elapsed();
                std::hint::black_box(acc);
            }
            record("from_parts/d2048", iters, elapsed, 0.0);
            elapsed
        })
    });
    group.finish();
}

fn summary() {
    let Ok(times) = TIMES.lock() else { return };
    let per_iter = |&(iters, total, _): &(u64, Duration, f64)| total.as_secs_f64() / iters as f64;
    // The syrk ceiling of each d, measured in this run.
    let syrk_gflops = |d: usize| {
        let entry = times.get(&format!("faer_syrk/{d}"))?;
        (entry.0 > 0).then(|| entry.2 / per_iter(entry) / 1e9)
    };
    println!(
        "\n{:<24} {:>12} {:>12} {:>9} {:>14} {:>9}",
        "benchmark", "time/iter", "rows/s", "GFLOP/s", "syrk ceiling", "share"
    );
    for (name, entry) in times.iter() {
        if entry.0 == 0 {
            continue;
        }
        let t = per_iter(entry);
        if entry.2 == 0.0 {
            println!("{name:<24} {:>10.3}ms", t * 1e3);
            continue;
        }
        let gflops = entry.2 / t / 1e9;
        let d = name
            .split(['/', '_'])
            .find_map(|part| part.trim_start_matches('d').parse::<usize>().ok())
            .unwrap_or(0);
        let ceiling = syrk_gflops(d).map(|g| g * 1e9 / (d * (d + 1)) as f64);
        let (ceiling, share) = match ceiling {
            Some(c) if !name.starts_with("faer_") => (
                format!("{c:.0}"),
                format!("{:.0}%", 100.0 * ROWS as f64 / t / c),
            ),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{name:<24} {:>10.3}ms {:>12.0} {:>9.1} {:>14} {:>9}",
            t * 1e3,
            ROWS as f64 / t,
            gflops,
            ceiling,
            share
        );
    }
}

criterion_group!(
    benches,
    batch_update,
    batch_fold,
    shard_merge,
    faer_products,
    close,
    from_parts
);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
