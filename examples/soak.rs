//! Soak: the real `vcid serve` process under churn for a fixed time, with
//! its resident memory sampled throughout; fails when memory keeps growing
//! after warm-up.
//!
//! ```sh
//! cargo build --release --bin vcid --example soak
//! target/release/examples/soak                      # 10 minutes, 16 writers
//! target/release/examples/soak --seconds 60         # the CI version
//! ```
//!
//! The daemon is the `vcid` binary next to this example's directory
//! (`target/release/vcid`; `--bin PATH` for another), started on free
//! loopback ports with a temporary data directory. For the whole duration,
//! `--writers` tasks (16) each repeat a cycle on a run of their own:
//! create it (K = 10, d = `--dim`, with metadata), push three epochs of
//! train and val batches over `Push` streams (256 float32 rows per batch,
//! with a writer id and sequences) and close them, every third cycle also a
//! `PushStats` block, a batch with a bad label (refused) and an epoch left
//! open, then delete the run. Meanwhile a reader lists runs, reads one and
//! scrapes `/metrics` and the web API. Runs are deleted, so nothing needs to
//! accumulate: memory should settle once the allocator's pools and the
//! database cache are warm.
//!
//! Every 250 ms it reads `VmRSS` of the daemon from `/proc`. Warm-up is the
//! first fifth of the time (at least 10 s); the run fails (exit status 1)
//! when the peak after warm-up exceeds the peak during warm-up by more than
//! 10% + 16 MiB, when any cycle fails in an unexpected way, or when the
//! accumulator budget is not back to zero after the last delete. Numbers go
//! to BENCHMARKS.md; this is the command behind them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{
    CloseEpochRequest, CreateRunRequest, DeleteRunRequest, FeatureBatch, GetRunRequest,
    ListRunsRequest,
};
use vcid::stats::{Accumulator, Par};
use vcid::synthetic::{Split, Synthetic};

#[path = "support/daemon.rs"]
mod daemon;

type Client = VciMonitorClient<Channel>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CLASSES: usize = 10;
const ROWS: usize = 256;
const EPOCHS: u64 = 3;
const BATCHES_PER_EPOCH: usize = 4;

struct Options {
    seconds: u64,
    writers: usize,
    dim: usize,
    bin: PathBuf,
}

fn options() -> Result<Options, BoxError> {
    let default_bin = daemon::default_bin()?;
    let mut opts = Options {
        seconds: 600,
        writers: 16,
        dim: 64,
        bin: default_bin,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{arg}: expected a value"))?;
        let number = || -> Result<u64, BoxError> {
            value
                .parse()
                .map_err(|_| format!("{arg}: expected a number, got {value:?}").into())
        };
        match arg.as_str() {
            "--seconds" => opts.seconds = number()?,
            "--writers" => opts.writers = number()? as usize,
            "--dim" => opts.dim = number()? as usize,
            "--bin" => opts.bin = PathBuf::from(&value),
            _ => {
                return Err(format!(
                    "unknown argument {arg:?} (--seconds, --writers, --dim, --bin)"
                )
                .into())
            }
        }
    }
    if opts.writers == 0 || opts.dim == 0 || opts.seconds == 0 {
        return Err("--seconds, --writers and --dim must be at least 1".into());
    }
    Ok(opts)
}

/// Counts of what the workers did.
#[derive(Default)]
struct Counts {
    cycles: AtomicU64,
    rows: AtomicU64,
    closes: AtomicU64,
    refused: AtomicU64,
    reads: AtomicU64,
}

fn batch(
    synth: &Synthetic,
    run: &str,
    split: Split,
    epoch: u64,
    index: u64,
    writer: &str,
    sequence: u64,
) -> FeatureBatch {
    FeatureBatch {
        writer_id: writer.into(),
        sequence,
        ..synth.feature_batch(run, split, epoch, index, ROWS as u32)
    }
}

/// One create → push/close → (bad batch, stats block, open epoch) → delete
/// cycle on run `run`.
async fn cycle(
    client: &mut Client,
    synth: &Synthetic,
    run: &str,
    dim: usize,
    cycle: u64,
    counts: &Counts,
) -> Result<(), BoxError> {
    client
        .create_run(CreateRunRequest {
            run_id: run.into(),
            num_classes: CLASSES as u32,
            feature_dim: dim as u32,
            metadata: [("owner".to_owned(), "soak".to_owned())].into(),
        })
        .await?;
    let writer = format!("{run}-writer");
    let mut sequence = 0;
    for epoch in 0..EPOCHS {
        for split in [Split::Train, Split::Val] {
            let batches: Vec<FeatureBatch> = (0..BATCHES_PER_EPOCH as u64)
                .map(|i| {
                    sequence += 1;
                    batch(synth, run, split, epoch, cycle * 64 + i, &writer, sequence)
                })
                .collect();
            let summary = client
                .push(futures::stream::iter(batches))
                .await?
                .into_inner();
            if summary.rows_applied != (ROWS * BATCHES_PER_EPOCH) as u64 {
                return Err(format!("{run}: {} rows applied", summary.rows_applied).into());
            }
            counts
                .rows
                .fetch_add(summary.rows_applied, Ordering::Relaxed);
            let result = client
                .close_epoch(CloseEpochRequest {
                    run_id: run.into(),
                    split: split.name().into(),
                    layer: String::new(),
                    epoch,
                })
                .await?
                .into_inner();
            if result.samples != (ROWS * BATCHES_PER_EPOCH) as u64 {
                return Err(format!("{run}: epoch {epoch} has {} samples", result.samples).into());
            }
            counts.closes.fetch_add(1, Ordering::Relaxed);
        }
    }
    if cycle.is_multiple_of(3) {
        // A refused batch (label out of range) changes nothing...
        let mut bad = batch(synth, run, Split::Train, EPOCHS, 0, "", 0);
        bad.labels[0] = CLASSES as u32;
        match client.push(futures::stream::iter([bad])).await {
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
            }
            other => return Err(format!("{run}: a bad label got {other:?}").into()),
        }
        // ...a stats block computed client-side is merged...
        let (features, labels) = synth.batch_f32(Split::Train, EPOCHS, cycle, ROWS);
        let x: Vec<f64> = features
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect();
        let x = ndarray::Array2::from_shape_vec((ROWS, dim), x)?;
        let acc = Accumulator::from_batch(x.view(), &labels, CLASSES, Par::Seq)?;
        let block = vcid::proto::StatsBlock {
            run_id: run.into(),
            split: "train".into(),
            epoch: EPOCHS,
            ..vcid::proto::StatsBlock::from(acc.to_parts())
        };
        client.push_stats(block).await?;
        // ...and the epoch is left open: the delete below must free it.
    }
    client
        .delete_run(DeleteRunRequest { run_id: run.into() })
        .await?;
    counts.cycles.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `GET path` on the HTTP listener: the status code and the whole reply.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), BoxError> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status line")?;
    Ok((code, text))
}

/// Lists runs, reads one, scrapes `/metrics` and the API, until `stop`.
async fn reader(
    mut client: Client,
    http: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> Result<(), BoxError> {
    while !stop.load(Ordering::Relaxed) {
        let runs = client
            .list_runs(ListRunsRequest {})
            .await?
            .into_inner()
            .runs;
        if let Some(run) = runs.first() {
            // It may be deleted in between: NOT_FOUND is an answer too.
            match client
                .get_run(GetRunRequest {
                    run_id: run.run_id.clone(),
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(s.into()),
            }
        }
        for path in ["/metrics", "/api/v1/runs"] {
            let (code, _) = http_get(http, path).await?;
            if code != 200 {
                return Err(format!("GET {path}: {code}").into());
            }
        }
        counts.reads.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let opts = options()?;
    let daemon = daemon::start_daemon(&opts.bin)?;
    let pid = daemon.child.id();
    let url = format!("http://{}", daemon.file.grpc_addr);
    let client = VciMonitorClient::connect(url).await?;
    println!(
        "soak: {} writers, d = {}, K = {CLASSES}, {} s against {} (pid {pid})",
        opts.writers,
        opts.dim,
        opts.seconds,
        opts.bin.display()
    );

    let started = Instant::now();
    let duration = Duration::from_secs(opts.seconds);
    let warmup = (duration / 5).max(Duration::from_secs(10)).min(duration);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let synth = Arc::new(Synthetic::new(CLASSES, opts.dim, EPOCHS + 1, 7));

    let mut tasks = Vec::new();
    for w in 0..opts.writers {
        let (mut client, stop, counts, synth) = (
            client.clone(),
            Arc::clone(&stop),
            Arc::clone(&counts),
            Arc::clone(&synth),
        );
        let dim = opts.dim;
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let run = format!("soak-{w:02}-{n}");
                cycle(&mut client, &synth, &run, dim, n, &counts).await?;
                n += 1;
            }
            Ok::<(), BoxError>(())
        }));
    }
    let read_task = tokio::spawn(reader(
        client.clone(),
        daemon.file.http_addr,
        Arc::clone(&stop),
        Arc::clone(&counts),
    ));

    let (mut warm_peak, mut late_peak, mut samples) = (0u64, 0u64, Vec::new());
    let mut next_report = Duration::from_secs(10);
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rss = daemon::status_bytes(pid, "VmRSS").ok_or("the daemon exited")?;
        let t = started.elapsed();
        if t < warmup {
            warm_peak = warm_peak.max(rss);
        } else {
            late_peak = late_peak.max(rss);
        }
        samples.push((t, rss));
        if t >= next_report {
            println!(
                "  {:>4} s  rss {:>7.1} MiB  cycles {:>6}  closes {:>7}  rows {:>10}",
                t.as_secs(),
                mib(rss),
                counts.cycles.load(Ordering::Relaxed),
                counts.closes.load(Ordering::Relaxed),
                counts.rows.load(Ordering::Relaxed),
            );
            next_report += Duration::from_secs(10);
        }
        if tasks.iter().any(|t| t.is_finished()) || read_task.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    read_task.await??;

    // Every run was deleted, so no accumulator may be left reserved.
    let mut client = client;
    let left = client
        .list_runs(ListRunsRequest {})
        .await?
        .into_inner()
        .runs;
    if !left.is_empty() {
        return Err(format!("{} runs left after the soak", left.len()).into());
    }
    let (_, metrics) = http_get(daemon.file.http_addr, "/metrics").await?;
    let reserved = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vcid_accumulator_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or("no vcid_accumulator_bytes in /metrics")?;

    let elapsed = started.elapsed().as_secs_f64();
    let final_rss = samples.last().map(|s| s.1).unwrap_or(0);
    let allowed = warm_peak + warm_peak / 10 + (16 << 20);
    println!(
        "\n| seconds | writers | d | cycles (create → 6 closes → delete) | rows | closes | refused | reads | RSS peak, warm-up ({} s) | RSS peak after | RSS at end | growth allowed up to |",
        warmup.as_secs()
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {elapsed:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        opts.writers,
        opts.dim,
        counts.cycles.load(Ordering::Relaxed),
        counts.rows.load(Ordering::Relaxed),
        counts.closes.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.reads.load(Ordering::Relaxed),
        mib(warm_peak),
        mib(late_peak),
        mib(final_rss),
        mib(allowed),
    );
    if reserved != 0.0 {
        return Err(
            format!("vcid_accumulator_bytes is {reserved} after every run was deleted").into(),
        );
    }
    if late_peak > allowed {
        return Err(format!(
            "memory grew after warm-up: peak {:.1} MiB > {:.1} MiB allowed",
            mib(late_peak),
            mib(allowed)
        )
        .into());
    }
    println!("soak: ok (memory flat after warm-up, budget back to 0)");
    Ok(())
}
