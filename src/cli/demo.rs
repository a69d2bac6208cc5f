//! `vcid demo`: the README's main command. Starts the daemon in-process on
//! loopback, plays a synthetic training run whose class features collapse
//! epoch by epoch (train and val splits) through the real gRPC path, and
//! prints each closed epoch's metrics as a live table.
//!
//! Owns the demo's choreography (writers, pacing, table, progress bar). It
//! must not compute metrics or touch the daemon's state directly: every
//! number printed is an `EpochResult` returned by `CloseEpoch` over gRPC.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::client::{self, fmt_delta, fmt_metric, Client};
use super::CliError;
use crate::auth::AttachToken;
use crate::proto::{
    CloseEpochRequest, CreateRunRequest, DeleteRunRequest, EpochResult, FeatureBatch, GetRunRequest,
};
use crate::synthetic::{Split, Synthetic};

/// Arguments of `vcid demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of epochs to play (the collapse schedule spans them all).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub epochs: u64,
    /// Number of classes K.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub classes: u32,
    /// Feature dimension d.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub dim: u32,
    /// Train rows per epoch (split across the writers).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub train_rows: u32,
    /// Val rows per epoch (as many as train by default: with far fewer rows
    /// than train, sample VCI is biased low by the small N/d ratio and would
    /// hide the generalisation gap the demo shows).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub val_rows: u32,
    /// Rows per pushed batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_rows: u32,
    /// Concurrent Push streams for the train split, like data-parallel ranks.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writers: u32,
    /// Simulated training time per epoch, in milliseconds.
    #[arg(long, default_value_t = 600)]
    pub epoch_ms: u64,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 2023)]
    pub seed: u64,
    /// Run id of the demo run (an existing run of that name is replaced).
    #[arg(long, default_value = "demo")]
    pub run_id: String,
    /// Where the daemon keeps its database; default: a temporary directory
    /// removed at exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address of the in-process daemon (default: an ephemeral
    /// loopback port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc_addr: SocketAddr,
    /// HTTP (web view, /metrics) listen address of the in-process daemon
    /// (default: an ephemeral loopback port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_addr: SocketAddr,
    /// Keep the daemon, its web view and /metrics up after the last epoch,
    /// until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
}

/// Runs `vcid demo`.
pub fn run(args: DemoArgs) -> Result<(), CliError> {
    validate(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| CliError::Failed(format!("cannot start the async runtime: {err}")))?;
    runtime.block_on(run_async(args))
}

fn validate(args: &DemoArgs) -> Result<(), CliError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "_.:-".contains(c);
    if args.run_id.is_empty() || args.run_id.len() > 128 || !args.run_id.chars().all(ok) {
        return Err(CliError::Input(format!(
            "--run-id: expected 1-128 characters of [A-Za-z0-9_.:-], got {:?}",
            args.run_id
        )));
    }
    if args.train_rows < args.writers {
        return Err(CliError::Input(format!(
            "--train-rows: expected at least one row per writer (--writers {}), got {}",
            args.writers, args.train_rows
        )));
    }
    Ok(())
}

/// A data directory that is removed when the demo ends (unless the user
/// chose one with --data-dir).
struct DataDir {
    path: PathBuf,
    temporary: bool,
}

impl DataDir {
    fn new(chosen: Option<PathBuf>) -> Result<Self, CliError> {
        if let Some(path) = chosen {
            return Ok(Self {
                path,
                temporary: false,
            });
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("vcid-demo-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|err| CliError::Failed(format!("cannot create {}: {err}", path.display())))?;
        Ok(Self {
            path,
            temporary: true,
        })
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.temporary {
            // Best effort: a leftover temp dir is harmless.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

async fn run_async(args: DemoArgs) -> Result<(), CliError> {
    let data_dir = DataDir::new(args.data_dir.clone())?;
    let daemon = daemon::start(args.grpc_addr, args.http_addr, &data_dir.path).await?;
    let outcome = play(&args, &daemon).await;
    let outcome = match outcome {
        Ok(()) if args.serve => serve_until_ctrl_c(&args, &daemon).await,
        other => other,
    };
    // Stop the daemon gracefully in every case, so its database is closed
    // before the temp dir goes away.
    let stopped = daemon.stop().await;
    drop(data_dir);
    outcome.and(stopped)
}

async fn serve_until_ctrl_c(args: &DemoArgs, daemon: &daemon::Daemon) -> Result<(), CliError> {
    println!();
    println!("the daemon stays up until Ctrl-C:");
    println!("  web view http://{}/", daemon.http_addr());
    println!("  gRPC     http://{}", daemon.grpc_addr());
    println!("  metrics  http://{}/metrics", daemon.http_addr());
    println!(
        "  try      vcid history {} --addr http://{}",
        args.run_id,
        daemon.grpc_addr()
    );
    let _ = std::io::stdout().flush();
    tokio::signal::ctrl_c()
        .await
        .map_err(|err| CliError::Failed(format!("cannot wait for Ctrl-C: {err}")))?;
    eprintln!("\nstopping");
    Ok(())
}

/// Plays the synthetic run against the daemon and prints the table.
async fn play(args: &DemoArgs, daemon: &daemon::Daemon) -> Result<(), CliError> {
    let addr = format!("http://{}", daemon.grpc_addr());
    let mut client =
        client::connect(&addr, AttachToken::default(), &client::TlsArgs::default()).await?;
    let fail = |status: tonic::Status| client::status_error(&status, &addr, Some(&args.run_id));

    let synth = Arc::new(Synthetic::new(
        args.classes as usize,
        args.dim as usize,
        args.epochs,
        args.seed,
    ));
    if client
        .get_run(GetRunRequest {
            run_id: args.run_id.clone(),
        })
        .await
        .is_ok()
    {
        // A run of the same name from an earlier demo in the same
        // --data-dir: its epochs are closed, so start it afresh.
        client
            .delete_run(DeleteRunRequest {
                run_id: args.run_id.clone(),
            })
            .await
            .map_err(fail)?;
        eprintln!("replaced the earlier run {:?}", args.run_id);
    }
    client
        .create_run(CreateRunRequest {
            run_id: args.run_id.clone(),
            num_classes: args.classes,
            feature_dim: args.dim,
            metadata: [
                ("model", "synthetic-mlp"),
                ("dataset", "gaussian-simplex"),
                ("source", "vcid-demo"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        })
        .await
        .map_err(fail)?;

    println!(
        "vcid demo: run {:?}, K={} classes, d={}, {} train + {} val rows per epoch, {} train writers",
        args.run_id, args.classes, args.dim, args.train_rows, args.val_rows, args.writers
    );
    println!(
        "web view: http://{}/  (live charts per epoch; open it now to watch the curves fill in)",
        daemon.http_addr()
    );
    println!(
        "daemon: gRPC http://{}  metrics http://{}/metrics",
        daemon.grpc_addr(),
        daemon.http_addr()
    );
    println!("(columns after VCI_VAL are metrics of the train split)");
    println!();
    println!("{}", table_header());

    let batches_per_epoch = batches_for(args.train_rows, args.batch_rows, args.writers)
        + batches_for(args.val_rows, args.batch_rows, 1);
    let progress = Progress::new(args.epochs, batches_per_epoch, args.epoch_ms);
    let ticker = progress.clone().spawn_ticker();
    let started = Instant::now();
    let mut first_last: Option<(EpochResult, EpochResult)> = None;
    let mut outcome = Ok(());
    for epoch in 0..args.epochs {
        match play_epoch(args, &addr, &synth, &client, epoch, &progress).await {
            Ok((train, val)) => {
                progress.println(&table_row(&train, &val), train.vci);
                let first = match first_last {
                    Some((first, _)) => first,
                    None => train.clone(),
                };
                first_last = Some((first, train));
            }
            Err(err) => {
                outcome = Err(err);
                break;
            }
        }
    }
    progress.finish();
    ticker.abort();
    outcome?;

    let elapsed = started.elapsed().as_secs_f64();
    let rows = progress.rows.load(Ordering::Relaxed);
    println!();
    if let Some((first, last)) = first_last {
        println!(
            "train VCI went from {} (epoch {}) to {} (epoch {}): the class features collapsed onto their means.",
            fmt_metric(first.vci),
            first.epoch,
            fmt_metric(last.vci),
            last.epoch
        );
    }
    println!(
        "{rows} rows pushed over gRPC in {elapsed:.1} s ({} epochs closed per split).",
        args.epochs
    );
    Ok(())
}

fn batches_for(rows: u32, batch_rows: u32, writers: u32) -> u64 {
    let per_writer = rows.div_ceil(writers);
    let mut total = 0u64;
    let mut left = rows;
    for _ in 0..writers {
        let mine = per_writer.min(left);
        left -= mine;
        total += u64::from(mine.div_ceil(batch_rows));
    }
    total
}

/// One epoch: simulated training time, the pushes (train from several
/// writers concurrently, val from one), then both closes.
async fn play_epoch(
    args: &DemoArgs,
    addr: &str,
    synth: &Arc<Synthetic>,
    client: &Client,
    epoch: u64,
    progress: &Progress,
) -> Result<(EpochResult, EpochResult), CliError> {
    progress.start_epoch(epoch);
    tokio::time::sleep(Duration::from_millis(args.epoch_ms)).await;
    progress.set_phase(Phase::Pushing);

    let mut pushes = Vec::new();
    let per_writer = args.train_rows.div_ceil(args.writers);
    let mut left = args.train_rows;
    for writer in 0..args.writers {
        let rows = per_writer.min(left);
        left -= rows;
        if rows > 0 {
            pushes.push(push_split(
                args,
                synth,
                client.clone(),
                Split::Train,
                epoch,
                writer,
                rows,
                progress,
                addr,
            ));
        }
    }
    pushes.push(push_split(
        args,
        synth,
        client.clone(),
        Split::Val,
        epoch,
        0,
        args.val_rows,
        progress,
        addr,
    ));
    for outcome in futures::future::join_all(pushes).await {
        outcome?;
    }
    progress.set_phase(Phase::Closing);

    let close = |split: Split| {
        let mut client = client.clone();
        let request = CloseEpochRequest {
            run_id: args.run_id.clone(),
            split: split.name().into(),
            layer: String::new(),
            epoch,
        };
        async move { client.close_epoch(request).await }
    };
    let (train, val) = tokio::join!(close(Split::Train), close(Split::Val));
    let fail = |status: tonic::Status| client::status_error(&status, addr, Some(&args.run_id));
    Ok((
        train.map_err(fail)?.into_inner(),
        val.map_err(fail)?.into_inner(),
    ))
}

/// One writer's Push stream of one split and epoch. Batches are generated
/// lazily as tonic pulls them, so memory stays at one batch per writer.
#[allow(clippy::too_many_arguments)]
async fn push_split(
    args: &DemoArgs,
    synth: &Arc<Synthetic>,
    mut client: Client,
    split: Split,
    epoch: u64,
    writer: u32,
    rows: u32,
    progress: &Progress,
    addr: &str,
) -> Result<(), CliError> {
    let batch_rows = args.batch_rows;
    let batches = u64::from(rows.div_ceil(batch_rows));
    let synth = synth.clone();
    let run_id = args.run_id.clone();
    let writer_id = format!("demo-{}-{writer}", split.name());
    let progress_in_stream = progress.clone();
    let stream = futures::stream::iter(0..batches).map(move |i| {
        let n = batch_rows.min(rows - (i as u32) * batch_rows);
        // Distinct parts per writer so the ranks send different samples.
        let part = u64::from(writer) * 1_000_000 + i;
        progress_in_stream.add_batch(u64::from(n));
        FeatureBatch {
            writer_id: writer_id.clone(),
            // Unique per (writer, epoch): a retried batch would be skipped.
            sequence: epoch * 1_000_000 + i,
            ..synth.feature_batch(&run_id, split, epoch, part, n)
        }
    });
    let summary = client
        .push(stream)
        .await
        .map_err(|status| client::status_error(&status, addr, Some(&args.run_id)))?;
    let summary = summary.into_inner();
    if summary.batches_applied + summary.duplicates != batches {
        return Err(CliError::Failed(format!(
            "the daemon applied {} of the {batches} {} batches of writer {writer} ({} duplicates)",
            summary.batches_applied,
            split.name(),
            summary.duplicates,
        )));
    }
    Ok(())
}

const COLUMNS: [(&str, usize); 11] = [
    ("EPOCH", 5),
    ("VCI_TRAIN", 9),
    ("VCI_VAL", 9),
    ("VCI_DELTA", 9),
    ("PROBE_MSE", 9),
    ("NC1", 9),
    ("CDNV", 9),
    ("CLASS_SEP", 9),
    ("EQUIANG", 9),
    ("EFF_RANK", 9),
    ("CLOSE_MS", 8),
];

fn table_header() -> String {
    COLUMNS
        .iter()
        .map(|(name, width)| format!("{name:>width$}"))
        .collect::<Vec<_>>()
        .join("  ")
}

/// One line of the live table; the columns are fixed-width so the table
/// lines up while it grows.
fn table_row(train: &EpochResult, val: &EpochResult) -> String {
    let cells = [
        train.epoch.to_string(),
        fmt_metric(train.vci),
        fmt_metric(val.vci),
        fmt_delta(train.vci_delta),
        fmt_metric(train.linear_probe_mse),
        fmt_metric(train.nc1),
        fmt_metric(train.cdnv),
        fmt_metric(train.class_separation),
        fmt_metric(train.equiangularity),
        fmt_metric(train.effective_rank),
        format!("{:.1}", 1e3 * train.close_seconds.max(val.close_seconds)),
    ];
    cells
        .iter()
        .zip(COLUMNS)
        .map(|(cell, (_, width))| format!("{cell:>width$}"))
        .collect::<Vec<_>>()
        .join("  ")
}

/// What the demo is doing within an epoch (shown on the progress bar).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The simulated training step (`--epoch-ms`).
    Training = 0,
    /// Push streams are sending the epoch's batches.
    Pushing = 1,
    /// `CloseEpoch` for both splits.
    Closing = 2,
}

/// Share of an epoch's bar given to the simulated training time when there
/// is one; the pushes fill the rest.
const TRAINING_SHARE: f64 = 0.7;

/// The progress bar on stderr (only when stderr is a terminal, so piped
/// output stays a clean table). Table lines go through `println` so the bar
/// never tears them.
#[derive(Clone)]
struct Progress {
    inner: Arc<ProgressInner>,
    rows: Arc<AtomicU64>,
}

struct ProgressInner {
    draw: bool,
    epochs: u64,
    batches_per_epoch: u64,
    epoch_ms: u64,
    epoch: AtomicU64,
    phase: AtomicU64,
    batches_in_epoch: AtomicU64,
    started: Instant,
    /// When the current epoch began, and the last train VCI seen; also
    /// serialises terminal writes (bar redraws vs. table lines).
    term: Mutex<(Instant, Option<f64>)>,
}

impl Progress {
    fn new(epochs: u64, batches_per_epoch: u64, epoch_ms: u64) -> Self {
        Self {
            inner: Arc::new(ProgressInner {
                draw: std::io::stderr().is_terminal(),
                epochs,
                batches_per_epoch: batches_per_epoch.max(1),
                epoch_ms,
                epoch: AtomicU64::new(0),
                phase: AtomicU64::new(Phase::Training as u64),
                batches_in_epoch: AtomicU64::new(0),
                started: Instant::now(),
                term: Mutex::new((Instant::now(), None)),
            }),
            rows: Arc::new(AtomicU64::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Instant, Option<f64>)> {
        // A panic while drawing cannot leave the data inconsistent.
        self.inner.term.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_epoch(&self, epoch: u64) {
        let mut term = self.lock();
        term.0 = Instant::now();
        self.inner.epoch.store(epoch, Ordering::Relaxed);
        self.inner.batches_in_epoch.store(0, Ordering::Relaxed);
        self.set_phase(Phase::Training);
    }

    fn set_phase(&self, phase: Phase) {
        self.inner.phase.store(phase as u64, Ordering::Relaxed);
    }

    fn add_batch(&self, rows: u64) {
        self.inner.batches_in_epoch.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
    }

    fn spawn_ticker(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                self.redraw();
            }
        })
    }

    fn bar_text(&self, epoch_started: Instant, last_vci: Option<f64>) -> String {
        const WIDTH: usize = 30;
        let inner = &self.inner;
        let epoch = inner.epoch.load(Ordering::Relaxed);
        let phase = inner.phase.load(Ordering::Relaxed);
        let pushed =
            inner.batches_in_epoch.load(Ordering::Relaxed) as f64 / inner.batches_per_epoch as f64;
        let within = if inner.epoch_ms == 0 {
            pushed
        } else {
            let trained =
                (epoch_started.elapsed().as_secs_f64() * 1e3 / inner.epoch_ms as f64).min(1.0);
            TRAINING_SHARE * trained + (1.0 - TRAINING_SHARE) * pushed
        };
        let done = ((epoch as f64 + within.min(1.0)) / inner.epochs as f64).clamp(0.0, 1.0);
        let filled = (done * WIDTH as f64) as usize;
        let what = match phase {
            0 => "training",
            1 => "pushing",
            _ => "closing",
        };
        let vci = match last_vci {
            Some(v) => format!("  last train VCI {v:.4}"),
            None => String::new(),
        };
        format!(
            "[{}{}] epoch {}/{} {what:<8}  {} rows pushed  {:.1}s{vci}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            (epoch + 1).min(inner.epochs),
            inner.epochs,
            self.rows.load(Ordering::Relaxed),
            inner.started.elapsed().as_secs_f64(),
        )
    }

    fn redraw(&self) {
        if !self.inner.draw {
            return;
        }
        let term = self.lock();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", self.bar_text(term.0, term.1));
        let _ = err.flush();
    }

    /// Prints a table line above the bar and remembers its train VCI.
    fn println(&self, line: &str, train_vci: Option<f64>) {
        let mut term = self.lock();
        term.1 = train_vci.or(term.1);
        if self.inner.draw {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        drop(out);
        if self.inner.draw {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "{}", self.bar_text(term.0, term.1));
            let _ = err.flush();
        }
    }

    fn finish(&self) {
        if !self.inner.draw {
            return;
        }
        let _term = self.lock();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

/// The in-process daemon, started through the server's own start API.
mod daemon {
    use std::net::SocketAddr;
    use std::path::Path;

    use super::CliError;
    use crate::server::{self, ServeConfig, ServerHandle};

    /// A running in-process daemon.
    pub struct Daemon {
        handle: ServerHandle,
    }

    impl Daemon {
        pub fn grpc_addr(&self) -> SocketAddr {
            self.handle.grpc_addr()
        }

        pub fn http_addr(&self) -> SocketAddr {
            self.handle.http_addr()
        }

        /// Graceful shutdown: drains RPCs and closes the database.
        pub async fn stop(self) -> Result<(), CliError> {
            self.handle
                .stop()
                .await
                .map_err(|err| CliError::Failed(format!("stopping the daemon: {err}")))
        }
    }

    /// Starts a daemon with default limits, no auth, on the given addresses.
    pub async fn start(grpc: SocketAddr, http: SocketAddr, dir: &Path) -> Result<Daemon, CliError> {
        let config = ServeConfig {
            grpc_addr: grpc,
            http_addr: http,
            ..ServeConfig::ephemeral(dir)
        };
        let handle = server::spawn(config)
            .await
            .map_err(|err| CliError::Failed(format!("starting the in-process daemon: {err}")))?;
        Ok(Daemon { handle })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_counted_per_writer() {
        assert_eq!(batches_for(4096, 256, 2), 16);
        assert_eq!(batches_for(1000, 256, 1), 4);
        // 10 rows over 3 writers: 4, 4, 2 rows -> one batch each.
        assert_eq!(batches_for(10, 4, 3), 3);
        // 9 rows over 2 writers: 5, 4 rows -> 3 + 2 batches of 2.
        assert_eq!(batches_for(9, 2, 2), 5);
    }
}
