//! Checkpoint cost at d = 2048: ingest throughput with periodic checkpoints
//! on (at `--checkpoint-interval`, default the daemon's default) against
//! off, and the time and size of one checkpoint of an open epoch.
//!
//! ```sh
//! cargo run --release --example checkpoint_load                      # about 2 min
//! cargo run --release --example checkpoint_load -- --seconds 30 --rounds 3 --interval 10
//! ```
//!
//! Each phase starts a fresh in-process daemon (`vcid::server::spawn`, a
//! temporary data directory) with checkpoints off or on, and two writers
//! push float32 batches of 256 × 2048 (K = 10) over loopback gRPC into one
//! epoch on long `Push` streams until the phase's time is up; rate = rows
//! applied / wall time. Phases alternate off/on for `--rounds` rounds and
//! the best of each is reported (the machine is shared). Then, on an epoch
//! holding data, one `Checkpoint(force)` is timed and the database file's
//! growth is the bytes it wrote. Numbers belong to BENCHMARKS.md.

use std::time::{Duration, Instant};

use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{CheckpointRequest, CloseEpochRequest, CreateRunRequest, FeatureBatch};
use vcid::synthetic::{Split, Synthetic};

const ROWS: usize = 256;
const DIM: usize = 2048;
const CLASSES: usize = 10;
const POOL: usize = 8;
const RUN: &str = "checkpoint-load";
const WRITERS: usize = 2;

type Client = VciMonitorClient<tonic::transport::Channel>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    seconds: f64,
    rounds: usize,
    interval: f64,
}

fn options() -> Result<Options, BoxError> {
    let mut opts = Options {
        seconds: 25.0,
        rounds: 2,
        interval: vcid::server::ServeConfig::default()
            .checkpoint_interval
            .as_secs_f64(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<f64, BoxError> {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .parse::<f64>()
                .map_err(|e| format!("{name}: {e}").into())
        };
        match arg.as_str() {
            "--seconds" => opts.seconds = value("--seconds")?,
            "--rounds" => opts.rounds = value("--rounds")? as usize,
            "--interval" => opts.interval = value("--interval")?,
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--seconds S, --rounds N, --interval S)"
                )
                .into())
            }
        }
    }
    Ok(opts)
}

fn pool() -> Vec<FeatureBatch> {
    let synth = Synthetic::new(CLASSES, DIM, 10, 42);
    (0..POOL)
        // Data of the synthetic run's epoch 3, sent as epoch 0.
        .map(|i| FeatureBatch {
            epoch: 0,
            ..synth.feature_batch(RUN, Split::Train, 3, i as u64, ROWS as u32)
        })
        .collect()
}

/// A fresh daemon; two writers push until `seconds` are up. Returns
/// (rows/s, the daemon, its client, its data directory).
async fn phase(
    interval: Duration,
    seconds: f64,
    pool: &[FeatureBatch],
) -> Result<(f64, vcid::server::ServerHandle, Client, tempfile::TempDir), BoxError> {
    let dir = tempfile::tempdir()?;
    let mut config = vcid::server::ServeConfig::ephemeral(dir.path());
    config.checkpoint_interval = interval;
    let server = vcid::server::spawn(config).await?;
    let client = VciMonitorClient::connect(server.grpc_url()).await?;
    client
        .clone()
        .create_run(CreateRunRequest {
            run_id: RUN.into(),
            num_classes: CLASSES as u32,
            feature_dim: DIM as u32,
            metadata: Default::default(),
        })
        .await?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut client = client.clone();
        let source = pool.to_vec();
        let stream = futures::stream::iter((0..).map_while(move |i: usize| {
            (Instant::now() < deadline).then(|| {
                let mut b = source[(w * 3 + i) % source.len()].clone();
                b.writer_id = format!("w{w}");
                b.sequence = i as u64;
                b
            })
        }));
        tasks.push(tokio::spawn(async move { client.push(stream).await }));
    }
    let mut rows = 0;
    for task in tasks {
        rows += task.await??.into_inner().rows_applied;
    }
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    Ok((rate, server, client, dir))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let opts = options()?;
    let pool = pool();
    println!(
        "checkpoint_load: {ROWS} x {DIM} float32 batches, K={CLASSES}, {WRITERS} writers, \
         {} s phases, best of {} rounds, interval {} s",
        opts.seconds, opts.rounds, opts.interval
    );
    let on = Duration::from_secs_f64(opts.interval);
    let (mut best_off, mut best_on) = (0f64, 0f64);
    let mut last = None;
    for round in 0..opts.rounds {
        for (name, interval) in [("off", Duration::ZERO), ("on", on)] {
            let (rate, server, client, dir) = phase(interval, opts.seconds, &pool).await?;
            println!("round {round}: checkpoints {name:>3}: {rate:>9.0} rows/s");
            if interval.is_zero() {
                best_off = best_off.max(rate);
                server.stop().await?;
            } else {
                best_on = best_on.max(rate);
                if let Some((server, _, _)) = last.replace((server, client, dir)) {
                    let server: vcid::server::ServerHandle = server;
                    server.stop().await?;
                }
            }
        }
    }
    println!(
        "checkpoints on at {} s: {:.1}% of off ({best_on:.0} vs {best_off:.0} rows/s)",
        opts.interval,
        100.0 * best_on / best_off
    );

    // One forced checkpoint of the open epoch (it changed since the last).
    let (server, mut client, dir) = last.ok_or("no phase ran")?;
    let file = dir.path().join("vcid.redb");
    let before = std::fs::metadata(&file)?.len();
    let started = Instant::now();
    let reply = client
        .checkpoint(CheckpointRequest {
            run_id: RUN.into(),
            writer_id: "w0".into(),
            force: true,
        })
        .await?
        .into_inner();
    let secs = started.elapsed().as_secs_f64();
    let after = std::fs::metadata(&file)?.len();
    let estimated =
        vcid::stats::Accumulator::estimated_bytes(CLASSES as u64, DIM as u64).unwrap_or_default();
    println!(
        "one checkpoint round: {} epoch(s) in {:.0} ms; database file {} -> {} bytes; \
         accumulator estimate {estimated} bytes",
        reply.epochs_written,
        secs * 1e3,
        before,
        after
    );
    client
        .close_epoch(CloseEpochRequest {
            run_id: RUN.into(),
            split: "train".into(),
            layer: String::new(),
            epoch: 0,
        })
        .await?;
    server.stop().await?;
    Ok(())
}
