//! Ingest load generator: float32 batches of 256 × d (default d = 512,
//! K = 10) pushed over real loopback gRPC to an in-process daemon from 1, 2
//! and 4 (`--writers`) concurrent `Push` streams, next to the in-process
//! accumulator rate on the same data and the machine's f64 syrk ceiling,
//! in the same run.
//!
//! ```sh
//! cargo run --release --example ingest_load            # about 40 s
//! cargo run --release --example ingest_load -- --batches 400 --rounds 3
//! cargo run --release --example ingest_load -- --dim 2048 --classes 1000 --writers 1,2,4,8 --batches 96 --rounds 1
//! cargo build --release --bin vcid --example ingest_load
//! target/release/examples/ingest_load --child --dim 2048 --classes 1000 --batches 96 --rounds 1
//! ```
//!
//! The daemon runs in this process by default. With `--child` it is the
//! real `vcid serve` binary (`target/release/vcid`, or `--bin PATH`) as a
//! child process on free loopback ports, so its own peak RSS (`VmHWM`) is
//! known and printed next to the most accumulator bytes its budget held
//! (the issue's target: at most 256 MiB above them).
//!
//! What is measured (printed again as a Markdown table at the end):
//!
//! - **in-process**: fold the same float32 bytes, read where they lie as
//!   the server reads them, into one accumulator
//!   (`Accumulator::fold_values_with`, one reused `FoldScratch`) with all
//!   cores in the product, as the daemon folds into an epoch's only shard.
//!   This is the baseline of the "vs in-process" column.
//! - **in-process, 2 threads**: the same on two threads with one
//!   accumulator each (`Par::Seq`), merged at the end, as the daemon folds
//!   two streams into two shards: how much a second core really adds on
//!   this machine.
//! - **stream, c writers**: c concurrent client-streaming `Push` calls into
//!   the same (run, split, layer, epoch), like data-parallel ranks, each
//!   sending `batches / c` batches back to back. Rate = rows / wall time from
//!   the first send until every `PushSummary` is back (the server answers
//!   only after applying the last batch, so every row counted is merged).
//! - **p99 latency, c writers**: a separate phase in which each of c writers
//!   sends one batch per `Push` call and waits for its `PushSummary` before
//!   sending the next: the latency is the time from handing a batch to the
//!   client until the server confirms it was applied (decode, statistics,
//!   merge, reply), under c-way concurrency. The same rate is reported for
//!   this mode (it lacks the pipelining of a long stream).
//!
//! - **syrk ceiling**: faer's lower-triangular XᵀX of a 256 × d f64 batch
//!   (a pool batch, widened and centred) with all cores, d·(d+1) flops per
//!   row: the rows/s the exact f64 rank-n update allows on this machine
//!   (GFLOP/s ÷ d·(d+1)); every gRPC rate is printed next to it. It is
//!   measured at the start of each round and again just before and just
//!   after each long-stream phase, each time over 8 slices of 0.15 s: its
//!   best slice (the undisturbed speed) and its mean rate over all 8. A
//!   shared machine's speed drifts within seconds, and a phase's rate is a
//!   mean over its whole duration, so the targets compare it with the mean
//!   rates of the two ceilings around it (like with like), median over
//!   rounds; the share of the best slices is printed beside it. The
//!   table's "vs syrk ceiling" column uses the best slice of all rounds.
//!
//! Each phase writes a fresh epoch, which is then closed and its sample
//! count checked, so a silently dropped batch would fail the run. Before
//! the close, the daemon's `vcid_accumulator_bytes` (its budget in use: one
//! accumulator per shard and the fold buffers the shards keep) is read
//! from `/metrics`; the slowest close and the process's peak RSS (`VmHWM`:
//! daemon and client together, with the data pool; with `--child`, the
//! client's, and the daemon's own beside the budget) are printed at the
//! end. With `--child`, each long-stream phase also prints the daemon's
//! CPU time (user and system, all threads) and minor page faults per batch
//! from `/proc/{pid}/stat`: the cost of a batch, which a busy shared
//! machine disturbs much less than it does the rates. The data pool (16 distinct batches) is generated before timing starts; each sent
//! message is a clone of a pool batch (its features are a shared
//! `bytes::Bytes`, not copied); encoding it into tonic's buffer is the
//! client's cost.
//!
//! Performance numbers belong to BENCHMARKS.md, not to tests; this example
//! is the command behind them.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{Accum, Mat};
use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{CloseEpochRequest, CreateRunRequest, FeatureBatch};
use vcid::stats::{operand_stride, Accumulator, FoldScratch, Par, Value};
use vcid::synthetic::{Split, Synthetic};

const ROWS: usize = 256;
const POOL: usize = 16;

/// d and K of this run (`--dim`, `--classes`), set once before any work.
static SHAPE: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

fn dim() -> usize {
    SHAPE.get().map_or(512, |s| s.0)
}

fn classes() -> usize {
    SHAPE.get().map_or(10, |s| s.1)
}
const RUN: &str = "ingest-load";
const MIB: f64 = 1024.0 * 1024.0;

#[path = "support/daemon.rs"]
mod daemon;

type Client = VciMonitorClient<tonic::transport::Channel>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    /// Batches per measured phase (split across the writers).
    batches: usize,
    /// Repetitions of every measurement; the best round is reported (the
    /// machine is shared and noisy; the best is the least disturbed).
    rounds: usize,
    /// Concurrent writers of each gRPC phase.
    writers: Vec<usize>,
    /// The `vcid` binary to run as a child daemon (`--child`), if any.
    child: Option<std::path::PathBuf>,
}

fn options() -> Result<Options, BoxError> {
    let mut opts = Options {
        batches: 240,
        rounds: 3,
        writers: vec![1, 2, 4],
        child: None,
    };
    let (mut dim, mut classes) = (512, 10);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<usize, BoxError> {
            let v = args
                .next()
                .ok_or_else(|| format!("{name}: expected a number"))?;
            let n: usize = v
                .parse()
                .map_err(|_| format!("{name}: expected a number, got {v:?}"))?;
            if n == 0 {
                return Err(format!("{name}: expected at least 1, got 0").into());
            }
            Ok(n)
        };
        match arg.as_str() {
            "--batches" => opts.batches = value("--batches")?,
            "--rounds" => opts.rounds = value("--rounds")?,
            "--dim" => dim = value("--dim")?,
            "--classes" => classes = value("--classes")?.max(2),
            "--writers" => {
                let v = args.next().unwrap_or_default();
                opts.writers = v
                    .split(',')
                    .map(|w| w.trim().parse::<usize>().ok().filter(|&n| n > 0))
                    .collect::<Option<Vec<_>>>()
                    .filter(|w| !w.is_empty())
                    .ok_or_else(|| {
                        format!("--writers: expected counts such as 1,2,4,8, got {v:?}")
                    })?;
            }
            "--child" => {
                opts.child.get_or_insert(daemon::default_bin()?);
            }
            "--bin" => {
                let path = args.next().ok_or("--bin: expected a path")?;
                opts.child = Some(path.into());
            }
            "--bench" => {} // passed by `cargo bench`-style runners; ignored
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--batches N, --rounds N, --dim D, --classes K, --writers 1,2,4, --child, --bin PATH)"
                )
                .into())
            }
        }
    }
    SHAPE.set((dim, classes)).map_err(|_| "shape already set")?;
    Ok(opts)
}

/// The batches every phase sends, and their labels.
fn pool() -> Vec<FeatureBatch> {
    let synth = Synthetic::new(classes(), dim(), 10, 42);
    (0..POOL)
        // Data of the synthetic run's epoch 3, sent as epoch 0.
        .map(|i| FeatureBatch {
            epoch: 0,
            ..synth.feature_batch(RUN, Split::Train, 3, i as u64, ROWS as u32)
        })
        .collect()
}

/// A pool batch as the d × 256 operand of a fold's product: its rows
/// widened to f64 and centred on their mean, in columns
/// [`vcid::stats::operand_stride`] apart as a fold lays them out (rows d..
/// of the returned matrix are padding). The values matter too: on some
/// CPUs faer's product of small integers runs a third slower than that of
/// real features, which would understate the ceiling.
fn centred_f64(batch: &FeatureBatch) -> Mat<f64> {
    let d = dim();
    let rows: Vec<f64> = values(batch).iter().map(|v| v.wide()).collect();
    let mean: Vec<f64> = (0..d)
        .map(|i| rows.iter().skip(i).step_by(d).sum::<f64>() / ROWS as f64)
        .collect();
    Mat::from_fn(operand_stride(d), ROWS, |i, j| {
        if i < d {
            rows[j * d + i] - mean[i]
        } else {
            0.0
        }
    })
}

/// The float32 values of a pool batch, where they lie (as the server
/// folds them).
fn values(batch: &FeatureBatch) -> &[[u8; 4]] {
    batch.features.as_chunks::<4>().0
}

/// Rows per second of the fold into one accumulator, with `par` in the
/// fold's product; and the time per batch.
fn in_process(pool: &[FeatureBatch], batches: usize, par: Par) -> Result<(f64, f64), BoxError> {
    let mut acc = Accumulator::new(classes(), dim());
    let mut scratch = FoldScratch::new();
    let start = Instant::now();
    for i in 0..batches {
        let batch = &pool[i % pool.len()];
        acc.fold_values_with(values(batch), &batch.labels, &mut scratch, par)?;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(acc.samples(), (batches * ROWS) as u64);
    Ok(((batches * ROWS) as f64 / secs, secs * 1e3 / batches as f64))
}

/// Rows per second of the same work on `threads` threads, each folding
/// into its own accumulator with one core, merged at the end (as the
/// daemon's shards): what the hardware allows for several streams.
fn in_process_parallel(
    pool: &[FeatureBatch],
    batches: usize,
    threads: usize,
) -> Result<f64, BoxError> {
    let per_thread = batches / threads;
    let start = Instant::now();
    let parts: Vec<Result<Accumulator, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut acc = Accumulator::new(classes(), dim());
                    let mut scratch = FoldScratch::new();
                    for i in 0..per_thread {
                        let batch = &pool[(t * 7 + i) % pool.len()];
                        acc.fold_values_with(values(batch), &batch.labels, &mut scratch, Par::Seq)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(acc)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let mut parts = parts.into_iter();
    let mut total = parts.next().ok_or("no threads")??;
    for part in parts {
        total.merge(&part?)?;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total.samples(), (per_thread * threads * ROWS) as u64);
    Ok(total.samples() as f64 / secs)
}

/// The daemon's `vcid_accumulator_bytes` (budget in use), from `/metrics`.
fn accumulator_bytes(http: std::net::SocketAddr) -> Result<u64, BoxError> {
    let mut conn = std::net::TcpStream::connect(http)?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix("vcid_accumulator_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no vcid_accumulator_bytes in /metrics".into())
}

/// c long-lived Push streams into one epoch, one connection each (like
/// data-parallel ranks); returns rows/s.
async fn streaming(
    clients: &[Client],
    pool: &[FeatureBatch],
    writers: usize,
    batches: usize,
    epoch: u64,
) -> Result<f64, BoxError> {
    let per_writer = batches / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = clients[w].clone();
        // Messages are made lazily as tonic pulls them (a clone shares the
        // pool batch's feature bytes).
        let source: Vec<FeatureBatch> = pool.to_vec();
        let stream = futures::stream::iter((0..per_writer).map(move |i| {
            let mut b = source[(w * 7 + i) % source.len()].clone();
            b.epoch = epoch;
            b
        }));
        tasks.push(tokio::spawn(async move { client.push(stream).await }));
    }
    let mut rows = 0u64;
    for task in tasks {
        let summary = task.await??.into_inner();
        rows += summary.rows_applied;
    }
    let secs = start.elapsed().as_secs_f64();
    if rows != (per_writer * writers * ROWS) as u64 {
        return Err(format!("applied {rows} rows, sent {}", per_writer * writers * ROWS).into());
    }
    Ok(rows as f64 / secs)
}

/// c writers, one connection each, one batch per Push call; returns
/// (rows/s, latencies).
async fn one_batch_calls(
    clients: &[Client],
    pool: &[FeatureBatch],
    writers: usize,
    batches: usize,
    epoch: u64,
) -> Result<(f64, Vec<Duration>), BoxError> {
    let per_writer = batches / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = clients[w].clone();
        let source: Vec<FeatureBatch> = pool.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let mut b = source[(w * 7 + i) % source.len()].clone();
                b.epoch = epoch;
                let sent = Instant::now();
                let summary = client.push(futures::stream::iter([b])).await?.into_inner();
                latencies.push(sent.elapsed());
                if summary.batches_applied != 1 {
                    return Err(tonic::Status::internal("a batch was not applied"));
                }
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(((latencies.len() * ROWS) as f64 / secs, latencies))
}

/// The median of `values`; 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// `shares` as "61%, 64%".
fn percents(shares: &[f64]) -> String {
    let each: Vec<String> = shares
        .iter()
        .map(|s| format!("{:.0}%", 100.0 * s))
        .collect();
    each.join(", ")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Closes `epoch`, checks its samples; returns the close's wall time.
async fn close_and_check(client: &Client, epoch: u64, rows: u64) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let result = client
        .clone()
        .close_epoch(CloseEpochRequest {
            run_id: RUN.into(),
            split: "train".into(),
            layer: String::new(),
            epoch,
        })
        .await?
        .into_inner();
    if result.samples != rows {
        return Err(format!(
            "epoch {epoch} closed with {} samples, pushed {rows}",
            result.samples
        )
        .into());
    }
    Ok(started.elapsed())
}

/// The f64 syrk ceiling measured now: faer's lower-triangular XᵀX of a
/// pool batch (`x`, from [`centred_f64`]: the operand a fold multiplies)
/// with all cores, over 8 slices of about 0.15 s each. Returns its best
/// slice (GFLOP/s, and rows/s = GFLOP/s ÷ d·(d+1)) and its mean rate over
/// all 8 (rows/s): on a shared machine a phase's rate is a mean over its
/// whole duration, disturbed or not, so the mean is the like-for-like
/// baseline; the best slice is the machine's undisturbed speed, an upper
/// bound no mean reaches under noise.
fn syrk_ceiling(x: &Mat<f64>) -> Ceiling {
    let d = dim();
    let x = x.as_ref().subrows(0, d);
    let mut out = Mat::<f64>::zeros(d, d);
    let (mut best, mut total_reps) = (0f64, 0usize);
    let started = Instant::now();
    for _ in 0..8 {
        let (start, mut reps) = (Instant::now(), 0usize);
        while reps == 0 || start.elapsed() < Duration::from_millis(150) {
            matmul(
                out.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                x,
                BlockStructure::Rectangular,
                x.transpose(),
                BlockStructure::Rectangular,
                1.0,
                Par::rayon(0),
            );
            reps += 1;
        }
        best = best.max((reps * ROWS) as f64 / start.elapsed().as_secs_f64());
        total_reps += reps;
    }
    Ceiling {
        gflops: best * (d * (d + 1)) as f64 / 1e9,
        best,
        mean: (total_reps * ROWS) as f64 / started.elapsed().as_secs_f64(),
    }
}

/// One measurement of the syrk ceiling ([`syrk_ceiling`]).
#[derive(Clone, Copy, Default)]
struct Ceiling {
    /// GFLOP/s of the best slice.
    gflops: f64,
    /// Rows/s of the best slice.
    best: f64,
    /// Rows/s over all slices.
    mean: f64,
}

fn mb_per_s(rows_per_s: f64) -> f64 {
    rows_per_s * (dim() * 4) as f64 / 1e6
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let opts = options()?;
    let data_dir = std::env::temp_dir().join(format!("vcid-ingest-load-{}", std::process::id()));
    let (server, child) = match &opts.child {
        Some(bin) => (None, Some(daemon::start_daemon(bin)?)),
        None => {
            std::fs::create_dir_all(&data_dir)?;
            let config = vcid::server::ServeConfig::ephemeral(&data_dir);
            (Some(vcid::server::spawn(config).await?), None)
        }
    };
    let (grpc, http) = match (&server, &child) {
        (Some(server), _) => (server.grpc_addr(), server.http_addr()),
        (_, Some(child)) => (child.file.grpc_addr, child.file.http_addr),
        _ => unreachable!("one of the two is started above"),
    };
    let addr = format!("http://{grpc}");
    let mut client = VciMonitorClient::connect(addr.clone()).await?;
    client
        .create_run(CreateRunRequest {
            run_id: RUN.into(),
            num_classes: classes() as u32,
            feature_dim: dim() as u32,
            metadata: Default::default(),
        })
        .await?;
    // One connection per writer, as data-parallel ranks have.
    let mut writers_clients = Vec::new();
    for _ in 0..opts.writers.iter().copied().max().unwrap_or(1) {
        writers_clients.push(VciMonitorClient::connect(addr.clone()).await?);
    }
    let pool = pool();
    let operand = centred_f64(&pool[0]);
    // The parallelism of the daemon's fold into an epoch's only shard.
    let par = Par::rayon(0);
    println!(
        "ingest_load: {ROWS} x {} float32 batches ({} KiB), K={}, {} batches per phase, best of {} rounds, server at {addr}",
        dim(),
        ROWS * dim() * 4 / 1024,
        classes(),
        opts.batches,
        opts.rounds,
    );

    // Warm-up: connections, allocator, page faults.
    in_process(&pool, 8, par)?;
    in_process_parallel(&pool, 8, 2)?;
    let mut epoch = 0u64;
    streaming(&writers_clients, &pool, 2, 8, epoch).await?;
    close_and_check(&client, epoch, 8 * ROWS as u64).await?;

    let mut best_inproc = 0f64;
    let mut best_inproc2 = 0f64;
    let mut best_fold_ms = 0f64;
    let mut slowest_close = Duration::ZERO;
    let mut most_budget = 0u64;
    let mut best_stream = vec![0f64; opts.writers.len()];
    let mut best_calls = vec![(0f64, Duration::ZERO, Duration::ZERO); opts.writers.len()];
    let mut ceiling = Ceiling::default();
    // Per writer count and round, the phase's rate ÷ the ceiling measured
    // around it (the mean of the one just before and the one just after):
    // (÷ their mean rates, ÷ their best slices).
    let mut shares = vec![(Vec::new(), Vec::new()); opts.writers.len()];
    for round in 0..opts.rounds {
        let measured = tokio::task::block_in_place(|| syrk_ceiling(&operand));
        if measured.best > ceiling.best {
            ceiling = measured;
        }
        println!(
            "round {round}: f64 syrk ceiling {:.0} rows/s ({:.1} GFLOP/s) in its best slice, {:.0} rows/s over all",
            measured.best, measured.gflops, measured.mean
        );
        let (inproc, fold_ms) =
            tokio::task::block_in_place(|| in_process(&pool, opts.batches, par))?;
        if inproc > best_inproc {
            best_inproc = inproc;
            best_fold_ms = fold_ms;
        }
        let inproc2 = tokio::task::block_in_place(|| in_process_parallel(&pool, opts.batches, 2))?;
        best_inproc2 = best_inproc2.max(inproc2);
        println!("round {round}: in-process {inproc:.0} rows/s (1 thread), {inproc2:.0} rows/s (2 threads)");
        for (i, &writers) in opts.writers.iter().enumerate() {
            epoch += 1;
            let pid = child.as_ref().map(|c| c.child.id());
            let before_phase = tokio::task::block_in_place(|| syrk_ceiling(&operand));
            let before = pid.and_then(daemon::cpu_and_faults);
            let rate = streaming(&writers_clients, &pool, writers, opts.batches, epoch).await?;
            let per_batch = match (before, pid.and_then(daemon::cpu_and_faults)) {
                (Some((cpu0, faults0)), Some((cpu1, faults1))) => {
                    let batches = ((opts.batches / writers) * writers) as f64;
                    format!(
                        "; the daemon's CPU time {:.1} ms and page faults {:.0} per batch",
                        (cpu1 - cpu0).as_secs_f64() * 1e3 / batches,
                        (faults1 - faults0) as f64 / batches
                    )
                }
                _ => String::new(),
            };
            let after_phase = tokio::task::block_in_place(|| syrk_ceiling(&operand));
            let around = (before_phase.mean + after_phase.mean) / 2.0;
            shares[i].0.push(rate / around);
            shares[i]
                .1
                .push(2.0 * rate / (before_phase.best + after_phase.best));
            let budget = accumulator_bytes(http)?;
            most_budget = most_budget.max(budget);
            let close = close_and_check(
                &client,
                epoch,
                ((opts.batches / writers) * writers * ROWS) as u64,
            )
            .await?;
            slowest_close = slowest_close.max(close);
            best_stream[i] = best_stream[i].max(rate);

            epoch += 1;
            let (call_rate, mut lat) =
                one_batch_calls(&writers_clients, &pool, writers, opts.batches / 2, epoch).await?;
            let close = close_and_check(&client, epoch, (lat.len() * ROWS) as u64).await?;
            slowest_close = slowest_close.max(close);
            lat.sort();
            let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
            if best_calls[i].0 == 0.0 || p99 < best_calls[i].2 {
                best_calls[i] = (call_rate, p50, p99);
            }
            println!(
                "round {round}: {writers} stream(s) {rate:.0} rows/s ({:.0}% of the ceiling's mean rate around the phase, {:.0} before and {:.0} after; {:.0} MiB of the budget in use{per_batch}); one-batch calls {call_rate:.0} rows/s, p50 {:.2} ms, p99 {:.2} ms",
                100.0 * rate / around,
                before_phase.mean,
                after_phase.mean,
                budget as f64 / MIB,
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
    }

    println!();
    let of_ceiling =
        |rate: f64| format!("{:.0}% of {:.0}", 100.0 * rate / ceiling.best, ceiling.best);
    println!(
        "f64 syrk ceiling (best slice of all rounds): {:.0} rows/s = {:.1} GFLOP/s / d(d+1)",
        ceiling.best, ceiling.gflops
    );
    println!("| mode | writers | rows/s | MB/s | vs in-process | vs syrk ceiling (rows/s) | p50 batch latency | p99 batch latency |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| in-process fold (one shard) | 1 stream | {best_inproc:.0} | {:.1} | 100% | {} | | |",
        mb_per_s(best_inproc),
        of_ceiling(best_inproc)
    );
    println!(
        "| in-process, 2 threads folding 2 accumulators | 2 threads | {best_inproc2:.0} | {:.1} | {:.0}% | {} | | |",
        mb_per_s(best_inproc2),
        100.0 * best_inproc2 / best_inproc,
        of_ceiling(best_inproc2)
    );
    for (i, &writers) in opts.writers.iter().enumerate() {
        let (call_rate, p50, p99) = best_calls[i];
        println!(
            "| gRPC Push, long streams | {writers} | {:.0} | {:.1} | {:.0}% | {} | | |",
            best_stream[i],
            mb_per_s(best_stream[i]),
            100.0 * best_stream[i] / best_inproc,
            of_ceiling(best_stream[i])
        );
        println!(
            "| gRPC Push, one batch per call | {writers} | {call_rate:.0} | {:.1} | {:.0}% | {} | {:.2} ms | {:.2} ms |",
            mb_per_s(call_rate),
            100.0 * call_rate / best_inproc,
            of_ceiling(call_rate),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("in-process time per batch (best round): fold {best_fold_ms:.3} ms");
    println!(
        "slowest close: {:.3} s; peak RSS of this process ({}client + data pool): {}",
        slowest_close.as_secs_f64(),
        if child.is_some() { "" } else { "daemon + " },
        daemon::status_bytes(std::process::id(), "VmHWM")
            .map_or("unknown".into(), |b| format!("{:.0} MiB", b as f64 / MIB)),
    );
    for (i, &writers) in opts.writers.iter().enumerate() {
        if writers == 2 || writers == 4 {
            let (of_mean, of_best) = &shares[i];
            let share = median(of_mean);
            println!(
                "target: {writers} streams >= 75% of the f64 syrk ceiling around the phase: median {:.0}% of its mean rate (rounds: {}) -> {}; median {:.0}% of its best slices (rounds: {})",
                100.0 * share,
                percents(of_mean),
                if share >= 0.75 { "met" } else { "MISSED" },
                100.0 * median(of_best),
                percents(of_best),
            );
        }
    }

    if let Some(child) = &child {
        let pid = child.child.id();
        let peak = daemon::status_bytes(pid, "VmHWM").ok_or("the daemon exited")?;
        let over = peak as f64 - most_budget as f64;
        println!(
            "daemon process (pid {pid}) peak RSS {:.0} MiB; most accumulator bytes in its budget {:.0} MiB; peak - budget = {:.0} MiB",
            peak as f64 / MIB,
            most_budget as f64 / MIB,
            over / MIB,
        );
        println!(
            "target: daemon peak RSS <= budget + 256 MiB: {}",
            if over <= 256.0 * MIB { "met" } else { "MISSED" }
        );
    }
    if let Some(server) = server {
        server.stop().await?;
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(())
}
