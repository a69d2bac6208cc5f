//! Issue 11, item 2: the registry answers while the CPU is busy with
//! statistics. `GetRun` and `ListRuns` of the real daemon stay fast while
//! two Push streams saturate ingest into one run at d = 2048 and a close of
//! a d = 2048, K = 1000 epoch computes its metrics: runtime threads never
//! wait on a lock held during a fold, merge, snapshot or close. The bound
//! is generous (a second, against the multi-second waits of a runtime
//! thread queued behind a fold); the measured latencies are printed
//! (`cargo test --release --test responsive -- --nocapture`).

mod server_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use server_support::*;
use vcid::proto::{FeatureBatch, ListRunsRequest};

/// `q`-quantile of sorted `samples` (nearest rank).
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_run_and_list_runs_stay_fast_while_ingest_and_a_close_use_every_core() {
    let d = 2048u32;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;

    // The epoch to close: K = 1000, 2000 rows (two per class on average).
    let big_k = 1000u32;
    create_run(&mut client, "wide", big_k, d).await;
    let (x, y) = dataset(5, 2000, big_k, d, 1.0);
    client
        .push(tokio_stream::iter(batches("wide", "", 0, d, &x, &y, 250)))
        .await
        .unwrap();

    // Two streams saturating ingest into one run (K = 10), 64-row batches,
    // until told to stop.
    create_run(&mut client, "busy", 10, d).await;
    let (bx, by) = dataset(6, 512, 10, d, 1.0);
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let all = batches("busy", "", 0, d, &bx, &by, 64);
            let stop = Arc::clone(&stop);
            let mut c = client.clone();
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<FeatureBatch>(2);
                let push = tokio::spawn(async move {
                    c.push(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                });
                let mut sent = 0u64;
                for b in all.iter().cycle() {
                    if stop.load(Ordering::Relaxed) || tx.send(b.clone()).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                drop(tx);
                let summary = push.await.unwrap().unwrap().into_inner();
                (sent, summary.batches_applied)
            })
        })
        .collect();
    // Let ingest reach a steady state, then close the wide epoch.
    let started = Instant::now();
    while open_samples(&get_run(&mut client, "busy").await, "train", 0) < 1024 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "ingest stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut closer = client.clone();
    let close = tokio::spawn(async move {
        let started = Instant::now();
        let result = closer.close_epoch(close_req("wide", "", 0)).await;
        (result, started.elapsed())
    });

    // Ask GetRun and ListRuns in turn until the close is done.
    let mut latencies = Vec::new();
    let mut samples_seen = Vec::new();
    while !close.is_finished() || latencies.len() < 40 {
        let asked = Instant::now();
        let run = get_run(&mut client, "busy").await;
        latencies.push(asked.elapsed());
        samples_seen.push(open_samples(&run, "train", 0));
        // The run whose epoch is being closed answers as fast.
        let asked = Instant::now();
        get_run(&mut client, "wide").await;
        latencies.push(asked.elapsed());
        let asked = Instant::now();
        let runs = client
            .list_runs(ListRunsRequest {})
            .await
            .unwrap()
            .into_inner()
            .runs;
        latencies.push(asked.elapsed());
        assert_eq!(runs.len(), 2);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (closed, close_time) = close.await.unwrap();
    let closed = closed.unwrap().into_inner();
    stop.store(true, Ordering::Relaxed);
    let mut applied = 0;
    for stream in streams {
        let (sent, batches_applied) = stream.await.unwrap();
        assert_eq!(sent, batches_applied);
        applied += batches_applied;
    }

    assert_eq!(closed.samples, 2000);
    // Ingest went on during the measurement, and GetRun saw it.
    assert!(
        samples_seen.windows(2).any(|w| w[1] > w[0]),
        "no progress seen"
    );
    latencies.sort();
    let (p50, p99, max) = (
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    println!(
        "GetRun/ListRuns during ingest ({applied} batches of 64 rows) and a {:.2} s close of \
         d = {d}, K = {big_k}: {} requests, p50 {p50:?}, p99 {p99:?}, max {max:?}",
        close_time.as_secs_f64(),
        latencies.len()
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
}
