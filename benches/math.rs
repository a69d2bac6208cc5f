//! Math-core benchmarks (criterion): the batch update and the epoch close.
//!
//! - `batch_update/{d}`: `Accumulator::from_batch` + `merge` of a 256-row
//!   batch into a running accumulator (K = 10), d ∈ {128, 512, 2048}, with
//!   all cores (`Par::rayon(0)`), reported as rows/s: the daemon's path.
//! - `batch_fold/{d}`: the same batch folded in place with
//!   `Accumulator::fold_batch` (no second d × d scatter): `vcid compute`'s path.
//! - `faer_syrk/{d}` and `faer_gemm/{d}`: faer's lower-triangular product
//!   and its dense `matmul` on the same operands (the 256 × d centred batch
//!   times its transpose), measured in the same run as the baseline.
//! - `close/d2048_k1000`: `metrics::compute` (all metrics) of an
//!   accumulator with d = 2048, K = 1000, N = 4096.
//! - `from_parts/d2048`: `Accumulator::from_parts` of the same statistics
//!   (K = 10 here): every check of statistics from outside, dominated by
//!   the positive-semi-definiteness check (one d × d Cholesky).
//!
//! At the end a table prints rows/s and GFLOP/s for each: the batch update
//! and the syrk count n·d·(d+1) flops (lower triangle of XᵀX), the gemm
//! 2·n·d². Run: `cargo bench --bench math`.

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
use vcid::metrics;
use vcid::stats::{Accumulator, Par};

const ROWS: usize = 256;
const CLASSES: usize = 10;
const DIMS: [usize; 3] = [128, 512, 2048];

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

fn batch_update(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group("batch_update");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(ROWS as u64));
    for d in DIMS {
        let (x, labels) = features(&mut rng, ROWS, d, CLASSES);
        let mut acc = Accumulator::from_batch(x.view(), &labels, CLASSES, Par::rayon(0))
            .unwrap_or_else(|e| panic!("{e}"));
        let flops = (ROWS * d * (d + 1)) as f64;
        group.bench_with_input(BenchmarkId::from_parameter(d), &d, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let batch = Accumulator::from_batch(x.view(), &labels, CLASSES, Par::rayon(0))
                        .unwrap_or_else(|e| panic!("{e}"));
                    acc.merge(&batch).unwrap_or_else(|e| panic!("{e}"));
                }
                let elapsed = start.elapsed();
                record(&format!("batch_update/{d}"), iters, elapsed, flops);
                elapsed
            })
        });
    }
    group.finish();
}

/// The same batches folded in place (`fold_batch`), as `vcid compute` does.
fn batch_fold(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group("batch_fold");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(ROWS as u64));
    for d in DIMS {
        let (x, labels) = features(&mut rng, ROWS, d, CLASSES);
        let mut acc = Accumulator::new(CLASSES, d);
        let flops = (ROWS * d * (d + 1)) as f64;
        group.bench_with_input(BenchmarkId::from_parameter(d), &d, |b, _| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    acc.fold_batch(x.view(), &labels, Par::rayon(0))
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                let elapsed = start.elapsed();
                record(&format!("batch_fold/{d}"), iters, elapsed, flops);
                elapsed
            })
        });
    }
    group.finish();
}

fn faer_products(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    for (kernel, triangular) in [("faer_syrk", true), ("faer_gemm", false)] {
        let mut group = c.benchmark_group(kernel);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        group.throughput(Throughput::Elements(ROWS as u64));
        for d in DIMS {
            // The centred batch, d × n column-major as in from_batch.
            let x = Mat::<f64>::from_fn(d, ROWS, |_, _| rng.sample(StandardNormal));
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
                                x.as_ref(),
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
                                x.as_ref(),
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
    println!(
        "\n{:<22} {:>12} {:>14} {:>10}",
        "benchmark", "time/iter", "rows/s", "GFLOP/s"
    );
    for (name, &(iters, total, flops)) in times.iter() {
        if iters == 0 {
            continue;
        }
        let per_iter = total.as_secs_f64() / iters as f64;
        if flops > 0.0 {
            println!(
                "{name:<22} {:>10.3}ms {:>14.0} {:>10.1}",
                per_iter * 1e3,
                ROWS as f64 / per_iter,
                flops / per_iter / 1e9
            );
        } else {
            println!(
                "{name:<22} {:>10.3}ms {:>14} {:>10}",
                per_iter * 1e3,
                "-",
                "-"
            );
        }
    }
}

criterion_group!(
    benches,
    batch_update,
    batch_fold,
    faer_products,
    close,
    from_parts
);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
