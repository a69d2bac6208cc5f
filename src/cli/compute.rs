//! `vcid compute`: the metrics of `docs/metrics.md` for features saved as
//! `.npy`.
//!
//! Owns the offline path: validate the label file, stream the feature file
//! through [`Accumulator::fold_batch_with`] `--batch-rows` rows at a time
//! (each worker thread folding in place into its own accumulator with one
//! reused [`FoldScratch`]), close with [`metrics::compute`] and print the
//! result as JSON (the names of `docs/metrics.md`) or a table. Every
//! problem with an input file becomes one [`CliError::Input`] line naming
//! the file, what was expected and what was found (exit status 2). A closed
//! stdout ends it quietly ([`super::emit`]).
//!
//! Must not: compute statistics itself (that is `stats`/`metrics`), hold the
//! whole feature matrix in memory, or print anything but the result on
//! stdout.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use ndarray::Array2;

use super::CliError;
use crate::metrics::{self, registry, EpochMetrics};
use crate::npy::{self, FeatureReader, NpyError};
use crate::stats::{Accumulator, FoldScratch, Par, StatsError};

/// Largest accumulator `vcid compute` will allocate; a wrong `--num-classes`
/// or a stray huge label should be an error, not an out-of-memory abort.
const MAX_ACCUMULATOR_BYTES: u64 = 16 << 30;

/// Batches waiting per worker. One keeps the reader ahead of each worker;
/// memory stays at about (2·workers + 1) batches.
const READ_AHEAD: usize = 1;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object: every metric (null when undefined, see
    /// docs/metrics.md), samples, classes_observed, feature_dim,
    /// rank_total, rank_between, small_sample and notes.
    Json,
    /// An aligned human-readable table.
    Table,
}

/// Arguments of `vcid compute`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    /// Features: a 2-D .npy array (rows = samples), float32 or float64, C order.
    #[arg(long, value_name = "X.npy")]
    pub features: PathBuf,
    /// Labels: a 1-D .npy array of non-negative integers, one per feature row.
    #[arg(long, value_name = "y.npy")]
    pub labels: PathBuf,
    /// Number of classes K (default: largest label + 1).
    #[arg(long, value_name = "K")]
    pub num_classes: Option<usize>,
    /// Rows read and folded into the statistics per step (at most); any
    /// value gives the same numbers up to rounding. A fold puts at most
    /// 256 rows through one triangular product, where it is fastest, and
    /// batches of that size also hold the least memory (BENCHMARKS.md).
    #[arg(long, value_name = "R", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    pub batch_rows: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Runs `vcid compute`.
pub fn run(args: ComputeArgs) -> Result<(), CliError> {
    let result = analyse(&args)?;
    let text = match args.format {
        Format::Json => render_json(&result.metrics)?,
        Format::Table => render_table(&args, &result),
    };
    super::emit(&format!("{text}\n"))
}

/// What `analyse` found, for printing.
struct Analysis {
    metrics: EpochMetrics,
    num_classes: usize,
    dtype: npy::FloatDtype,
}

fn input(err: NpyError) -> CliError {
    CliError::Input(err.to_string())
}

/// Reads both files, folds the features into one accumulator and computes
/// the metrics.
fn analyse(args: &ComputeArgs) -> Result<Analysis, CliError> {
    let labels = npy::read_labels(&args.labels).map_err(input)?;
    let mut reader = FeatureReader::open(&args.features).map_err(input)?;
    let (rows, dim) = (reader.rows(), reader.cols());
    if labels.len() != rows {
        return Err(CliError::Input(format!(
            "{}: expected {rows} labels (one per row of {}), found {}",
            args.labels.display(),
            args.features.display(),
            labels.len()
        )));
    }
    if dim == 0 {
        return Err(CliError::Input(format!(
            "{}: expected at least 1 feature column, found shape ({rows}, 0)",
            args.features.display()
        )));
    }
    let num_classes = num_classes(args, &labels)?;
    check_memory(args, num_classes, dim)?;

    let batch_rows = usize::try_from(args.batch_rows).unwrap_or(usize::MAX);
    let acc = fold(&mut reader, &labels, num_classes, batch_rows)?;
    let metrics = metrics::compute(&acc, Par::rayon(0))
        .map_err(|e| CliError::Failed(format!("{}: {e}", args.features.display())))?;
    Ok(Analysis {
        metrics,
        num_classes,
        dtype: reader.dtype(),
    })
}

/// `--num-classes`, checked against the labels, or the largest label + 1.
fn num_classes(args: &ComputeArgs, labels: &[u32]) -> Result<usize, CliError> {
    match args.num_classes {
        Some(0) => Err(CliError::Input(
            "--num-classes: expected at least 1, found 0".into(),
        )),
        Some(k) => match labels.iter().position(|&l| l as usize >= k) {
            Some(i) => Err(CliError::Input(format!(
                "{}: label at index {i}: expected a class in [0, {k}) (--num-classes {k}), found {}",
                args.labels.display(),
                labels[i]
            ))),
            None => Ok(k),
        },
        // An empty file has no largest label; one class keeps the shapes valid.
        None => Ok(labels.iter().max().map_or(1, |&m| m as usize + 1)),
    }
}

fn check_memory(args: &ComputeArgs, k: usize, d: usize) -> Result<(), CliError> {
    // Checked (the label file decides K, so it must not overflow). A batch
    // and the running total each hold one accumulator.
    let bytes = Accumulator::estimated_bytes(k as u64, d as u64).and_then(|b| b.checked_mul(2));
    match bytes {
        Some(b) if b <= MAX_ACCUMULATOR_BYTES => Ok(()),
        _ => Err(CliError::Input(format!(
            "{}: expected statistics for at most {} GiB, found {k} classes x {d} features \
             (K from {}); pass --num-classes if the labels are sparse",
            args.features.display(),
            MAX_ACCUMULATOR_BYTES >> 30,
            if args.num_classes.is_some() {
                "--num-classes".to_string()
            } else {
                format!("the largest label in {} + 1", args.labels.display())
            }
        ))),
    }
}

/// How `fold` splits the file: `batches` batches of at most `rows` rows
/// (the last may be shorter), folded by `workers` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    rows: usize,
    batches: usize,
    workers: usize,
}

/// Plans the batches for `total` rows, at most `max_rows` per batch, on
/// `cores` cores. With several batches each core folds its own share with
/// sequential kernels (measured ~15% faster end to end on 2 cores than
/// folding one batch at a time with both cores, because fold_batch's
/// per-row passes then run in parallel too); the batch count is rounded up
/// to a multiple of the worker count so the shares are even. A single batch
/// gets all cores inside its kernels instead.
fn plan(total: usize, max_rows: usize, cores: usize) -> Plan {
    let max_rows = max_rows.max(1);
    let batches = total.div_ceil(max_rows);
    if batches < 2 || cores < 2 {
        return Plan {
            rows: max_rows,
            batches,
            workers: 1,
        };
    }
    let workers = cores.min(batches);
    let batches = batches.div_ceil(workers) * workers;
    let rows = total.div_ceil(batches);
    Plan {
        rows,
        batches: total.div_ceil(rows),
        workers,
    }
}

/// One batch on its way from the reader to a worker: first row and rows.
type Batch = (usize, Array2<f64>);

/// Streams the feature file through the accumulator. A reader thread
/// converts batch `i` and hands it to worker `i % workers`, so reading
/// overlaps the statistics, at most [`READ_AHEAD`] batches wait per worker,
/// and the assignment (hence the rounding, hence the output) is the same on
/// every run. Used buffers go back to the reader for reuse.
fn fold(
    reader: &mut FeatureReader,
    labels: &[u32],
    num_classes: usize,
    batch_rows: usize,
) -> Result<Accumulator, CliError> {
    let dim = reader.cols();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = plan(reader.rows(), batch_rows, cores);
    let par = if plan.workers == 1 {
        Par::rayon(0)
    } else {
        Par::Seq
    };
    let path = reader.path().to_path_buf();
    std::thread::scope(|scope| {
        let (recycle, reusable) = mpsc::channel::<Array2<f64>>();
        let mut queues = Vec::with_capacity(plan.workers);
        let mut workers = Vec::with_capacity(plan.workers);
        for _ in 0..plan.workers {
            let (queue, inbox) = mpsc::sync_channel::<Batch>(READ_AHEAD);
            queues.push(queue);
            let recycle = recycle.clone();
            let path = &path;
            workers.push(
                scope.spawn(move || -> Result<Accumulator, (usize, CliError)> {
                    let mut acc = Accumulator::new(num_classes, dim);
                    let mut scratch = FoldScratch::new();
                    // Returning early drops `inbox`, which stops the reader.
                    for (start, batch) in inbox {
                        let batch_labels = &labels[start..start + batch.nrows()];
                        acc.fold_batch_with(batch.view(), batch_labels, &mut scratch, par)
                            .map_err(|e| (start, batch_error(path, start, e)))?;
                        // The reader may have finished; then the buffer is just freed.
                        let _ = recycle.send(batch);
                    }
                    Ok(acc)
                }),
            );
        }
        drop(recycle);
        let reading = scope.spawn(move || -> Result<(), (usize, CliError)> {
            for index in 0.. {
                let start = reader.position();
                let take = (reader.rows() - start).min(plan.rows);
                if take == 0 {
                    break;
                }
                let mut buffer = match reusable.try_recv() {
                    Ok(buffer) if buffer.nrows() == take => buffer,
                    _ => Array2::zeros((take, dim)),
                };
                reader
                    .read_into(&mut buffer)
                    .map_err(|e| (start, input(e)))?;
                if queues[index % plan.workers].send((start, buffer)).is_err() {
                    // That worker stopped on an error, which it reports.
                    break;
                }
            }
            Ok(())
        });
        let panicked = |what: &str| (0, CliError::Failed(format!("the {what} thread panicked")));
        let mut accumulators = Vec::with_capacity(plan.workers);
        let mut errors = Vec::new();
        for worker in workers {
            match worker.join().unwrap_or_else(|_| Err(panicked("worker"))) {
                Ok(acc) => accumulators.push(acc),
                Err(e) => errors.push(e),
            }
        }
        if let Err(e) = reading.join().unwrap_or_else(|_| Err(panicked("reader"))) {
            errors.push(e);
        }
        // Several threads may have failed: report the problem that comes
        // first in the file, as a sequential reader would.
        if let Some((_, first)) = errors.into_iter().min_by_key(|(start, _)| *start) {
            return Err(first);
        }
        // Merge in worker order: the same rounding on every run.
        let mut accumulators = accumulators.into_iter();
        let mut total = accumulators
            .next()
            .unwrap_or_else(|| Accumulator::new(num_classes, dim));
        for acc in accumulators {
            total
                .merge(&acc)
                .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
        }
        Ok(total)
    })
}

/// Translates a batch error into file terms (global row numbers).
fn batch_error(path: &Path, start: usize, err: StatsError) -> CliError {
    match err {
        StatsError::NonFinite { row, column, value } => CliError::Input(format!(
            "{}: row {}, column {column}: expected a finite number, found {value}",
            path.display(),
            start + row
        )),
        // Labels and shapes were validated before streaming started.
        other => CliError::Failed(format!("{} (rows from {start}): {other}", path.display())),
    }
}

/// The JSON document: `EpochMetrics` serialises to exactly the epoch-result
/// names (metrics, counts, ranks, `small_sample`, `notes`).
fn render_json(m: &EpochMetrics) -> Result<String, CliError> {
    serde_json::to_string_pretty(m).map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))
}

fn render_table(args: &ComputeArgs, a: &Analysis) -> String {
    let m = &a.metrics;
    let mut out = String::new();
    let mut line = |name: &str, value: String| {
        out.push_str(&format!("{name:<18} {value}\n"));
    };
    line(
        "features",
        format!("{} ({})", args.features.display(), a.dtype),
    );
    line("labels", args.labels.display().to_string());
    line("samples", m.samples.to_string());
    line(
        "classes observed",
        format!("{} of {}", m.classes_observed, a.num_classes),
    );
    line("feature dim", m.feature_dim.to_string());
    line("rank total", m.rank_total.to_string());
    line("rank between", m.rank_between.to_string());
    line(
        "small sample",
        if m.small_sample {
            "yes: N <= d + classes, an affine probe can fit exactly".into()
        } else {
            "no".into()
        },
    );
    out.push('\n');
    for metric in registry::epoch_metrics() {
        let shown = match metric.of_epoch(m) {
            Some(v) => format!("{v:.6}"),
            None => format!(
                "undefined ({})",
                m.notes.get(metric.name).map_or("no value", String::as_str)
            ),
        };
        out.push_str(&format!("{:<18} {shown}\n", metric.name));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_never_exceeds_batch_rows_and_covers_every_row() {
        for total in [0usize, 1, 2, 7, 100, 4095, 4096, 4097, 65536, 65537] {
            for max_rows in [1usize, 3, 64, 4096, 100_000] {
                for cores in [1usize, 2, 3, 8] {
                    let p = plan(total, max_rows, cores);
                    assert!(
                        p.rows >= 1 && p.rows <= max_rows,
                        "{total} {max_rows} {cores}: {p:?}"
                    );
                    assert_eq!(p.batches, total.div_ceil(p.rows), "{p:?}");
                    assert!(p.workers >= 1 && p.workers <= cores.max(1), "{p:?}");
                    assert!(p.workers <= p.batches.max(1), "{p:?}");
                }
            }
        }
    }

    #[test]
    fn plan_splits_evenly_between_workers() {
        assert_eq!(
            plan(65536, 4096, 2),
            Plan {
                rows: 4096,
                batches: 16,
                workers: 2
            }
        );
        // 4097 rows would be 4096 + 1: two even halves instead.
        assert_eq!(
            plan(4097, 4096, 2),
            Plan {
                rows: 2049,
                batches: 2,
                workers: 2
            }
        );
        // One batch: one worker with parallel kernels.
        assert_eq!(
            plan(100, 4096, 2),
            Plan {
                rows: 4096,
                batches: 1,
                workers: 1
            }
        );
        assert_eq!(plan(0, 4096, 2).batches, 0);
        assert_eq!(plan(65536, 4096, 1).workers, 1);
    }
}
