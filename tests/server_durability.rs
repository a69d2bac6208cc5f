//! Durability of the daemon: runs and closed epochs survive `kill -9` of the
//! real binary, and an epoch that was open at the kill is refused with
//! DATA_LOSS afterwards (never reopened with part of its data); SIGTERM
//! checkpoints open epochs (and the duplicate filter) so an epoch closed
//! after a graceful restart has the same metrics as without the restart; a
//! Push stream in flight at shutdown keeps every batch it was told was
//! applied; an epoch fed by concurrent streams (several accumulator
//! shards, each in the memory budget) is checkpointed as its combined
//! statistics and closes after the restart as without it.

mod server_support;

use std::time::Duration;

use server_support::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use vcid::proto::{
    CloseEpochRequest, DeleteRunRequest, FeatureBatch, GetHistoryRequest, ListRunsRequest,
    StatsBlock,
};
use vcid::server::ServeConfig;
use vcid::stats::{Accumulator, Par};

fn close_req(run: &str, epoch: u64) -> CloseEpochRequest {
    CloseEpochRequest {
        run_id: run.into(),
        split: String::new(),
        layer: String::new(),
        epoch,
    }
}

/// The statistics of `rows` rows as a `StatsBlock` for `run`, epoch `epoch`.
fn stats_block(run: &str, epoch: u64, x: &[f64], y: &[u32], k: u32, d: u32) -> StatsBlock {
    let view = ndarray::ArrayView2::from_shape((y.len(), d as usize), x).unwrap();
    let acc = Accumulator::from_batch(view, y, k as usize, Par::Seq).unwrap();
    StatsBlock {
        run_id: run.into(),
        epoch,
        ..StatsBlock::from(acc.to_parts())
    }
}

/// Asserts a DATA_LOSS refusal naming epoch 1 of durable/train/penultimate.
fn assert_lost(err: &tonic::Status) {
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    let text = err.message();
    assert!(
        text.contains("epoch: expected an epoch that still holds its statistics, received 1")
            && text
                .contains("epoch 1 of stream durable/train/penultimate lost its open statistics")
            && text.contains("stopped uncleanly at or before 20")
            && text.contains("under a new epoch number"),
        "{text}"
    );
}

fn rejected(daemon: &Daemon, reason: &str) -> String {
    let (status, body) = http_get(daemon.http, "/metrics");
    assert_eq!(status, 200);
    let prefix = format!("vcid_batches_rejected_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in metrics"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_runs_and_closed_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (3u32, 6u32);
    let (x, y) = dataset(31, 600, k, d, 1.0);

    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;
    create_run(&mut client, "durable", k, d).await;
    create_run(&mut client, "doomed", k, d).await;
    client
        .delete_run(DeleteRunRequest {
            run_id: "doomed".into(),
        })
        .await
        .unwrap();
    client
        .push(tokio_stream::iter(batches(
            "durable", "", 0, d, &x, &y, 100,
        )))
        .await
        .unwrap();
    let closed = client
        .close_epoch(close_req("durable", 0))
        .await
        .unwrap()
        .into_inner();
    // Epoch 1 is still open when the process dies.
    client
        .push(tokio_stream::iter(batches(
            "durable", "", 1, d, &x, &y, 100,
        )))
        .await
        .unwrap();
    drop(client);
    daemon.kill9();

    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;
    let runs = client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    let ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, vec!["durable"], "CreateRun and DeleteRun are durable");
    assert_eq!((runs[0].num_classes, runs[0].feature_dim), (k, d));
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "durable".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        history,
        vec![closed.clone()],
        "the closed epoch survives kill -9 unchanged"
    );
    // Open accumulators are only checkpointed on a graceful shutdown, but
    // the open epoch's durable marker tells the daemon that epoch 1 lost its
    // data: pushes (streamed or pre-aggregated) and closes of it are refused
    // with DATA_LOSS and change nothing, instead of reopening it with only
    // the rows sent after the restart.
    assert_eq!(rejected(&daemon, "epoch_lost"), "0");
    let err = client
        .push(tokio_stream::iter(batches(
            "durable", "", 1, d, &x, &y, 100,
        )))
        .await
        .unwrap_err();
    assert_lost(&err);
    assert!(err.message().starts_with("batch 0 of this Push stream"));
    let err = client
        .push_stats(stats_block("durable", 1, &x[..60], &y[..10], k, d))
        .await
        .unwrap_err();
    assert_lost(&err);
    let err = client
        .close_epoch(close_req("durable", 1))
        .await
        .unwrap_err();
    assert_lost(&err);
    assert_eq!(rejected(&daemon, "epoch_lost"), "2");
    let run = get_run(&mut client, "durable").await;
    assert!(run.open_epochs.is_empty(), "{:?}", run.open_epochs);
    assert_eq!(run.closed_epochs, 1);
    // Closed epoch 0 still refuses pushes.
    let err = client
        .push(tokio_stream::iter(batches(
            "durable", "", 0, d, &x, &y, 100,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // A new epoch number works normally, and the restored history still
    // feeds vci_delta.
    client
        .push(tokio_stream::iter(batches(
            "durable", "", 2, d, &x, &y, 100,
        )))
        .await
        .unwrap();
    let next = client
        .close_epoch(close_req("durable", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.samples, 600);
    assert_eq!(
        next.vci_delta,
        Some(next.vci.unwrap() - closed.vci.unwrap())
    );
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));

    // Lost stays lost across later (graceful) restarts; the closed epochs
    // are unchanged.
    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;
    let err = client
        .push(tokio_stream::iter(batches(
            "durable", "", 1, d, &x, &y, 100,
        )))
        .await
        .unwrap_err();
    assert_lost(&err);
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "durable".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(history, vec![closed, next]);
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_open_epochs() {
    let (k, d) = (4u32, 10u32);
    let (x, y) = dataset(77, 2000, k, d, 1.5);
    let mut all = batches("ckpt", "", 3, d, &x, &y, 100);
    for (i, b) in all.iter_mut().enumerate() {
        b.writer_id = "rank0".into();
        b.sequence = i as u64;
    }
    let (first, second) = all.split_at(12);

    // Reference: the same pushes into a daemon that is never restarted.
    let ref_dir = tempfile::tempdir().unwrap();
    let reference_server = start(ServeConfig::ephemeral(ref_dir.path())).await;
    let mut rc = connect(&reference_server.grpc_url()).await;
    create_run(&mut rc, "ckpt", k, d).await;
    rc.push(tokio_stream::iter(first.to_vec())).await.unwrap();
    rc.push(tokio_stream::iter(second.to_vec())).await.unwrap();
    let expected = rc
        .close_epoch(close_req("ckpt", 3))
        .await
        .unwrap()
        .into_inner();
    reference_server.stop().await.unwrap();
    assert_matches(&expected, &reference(&x, &y, k, d), 1e-9);

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;
    create_run(&mut client, "ckpt", k, d).await;
    client
        .push(tokio_stream::iter(first.to_vec()))
        .await
        .unwrap();
    drop(client);
    assert_eq!(daemon.terminate(), Some(0), "SIGTERM exits with status 0");

    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;
    let run = get_run(&mut client, "ckpt").await;
    assert_eq!(open_samples(&run, "train", 3), 1200, "checkpoint restored");
    assert_eq!(run.rows_ingested, 1200);
    // The duplicate filter came back too: resending batch 11 is skipped.
    let resent = client
        .push(tokio_stream::iter(vec![first[11].clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resent.batches_applied, resent.duplicates), (0, 1));
    client
        .push(tokio_stream::iter(second.to_vec()))
        .await
        .unwrap();
    let after_restart = client
        .close_epoch(close_req("ckpt", 3))
        .await
        .unwrap()
        .into_inner();
    assert_same_metrics(&after_restart, &expected, 1e-12);
    assert_eq!(rejected(&daemon, "epoch_lost"), "0", "restored, not lost");
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));

    // Checkpoints are consumed at start-up: after another restart (even a
    // crash) the closed epoch stays closed and nothing reappears as open.
    let daemon = Daemon::spawn(dir.path(), &[]);
    let mut client = connect(&daemon.url()).await;
    let run = get_run(&mut client, "ckpt").await;
    assert!(run.open_epochs.is_empty());
    assert_eq!(run.closed_epochs, 1);
    drop(client);
    daemon.kill9();
}

fn accumulator_bytes(daemon: &Daemon) -> u64 {
    let (status, body) = http_get(daemon.http, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("vcid_accumulator_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("vcid_accumulator_bytes in metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_fold_into_budgeted_shards_and_checkpoint_exactly() {
    let (k, d) = (10u32, 192u32);
    let (x, y) = dataset(91, 4096, k, d, 1.2);
    let per_accumulator = Accumulator::estimated_bytes(k.into(), d.into()).unwrap();
    let all = batches("shards", "", 0, d, &x, &y, 64);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path(), &["--max-shards-per-epoch", "2"]);
    let mut client = connect(&daemon.url()).await;
    create_run(&mut client, "shards", k, d).await;
    // Open the epoch, then two ranks push their halves concurrently.
    client
        .push(tokio_stream::iter(all[..1].to_vec()))
        .await
        .unwrap();
    let rest = &all[1..];
    let ranks: Vec<Vec<FeatureBatch>> = (0..2)
        .map(|r| rest.iter().skip(r).step_by(2).cloned().collect())
        .collect();
    let pushes = ranks.into_iter().map(|part| {
        let mut c = client.clone();
        tokio::spawn(async move { c.push(tokio_stream::iter(part)).await })
    });
    for push in pushes.collect::<Vec<_>>() {
        push.await.unwrap().unwrap();
    }
    // Every shard is one accumulator of the budget, at most two of them.
    let reserved = accumulator_bytes(&daemon);
    assert_eq!(reserved % per_accumulator, 0, "{reserved}");
    assert!(
        (1..=2).contains(&(reserved / per_accumulator)),
        "{reserved}"
    );
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));

    // Restored as one accumulator holding the combined statistics.
    let daemon = Daemon::spawn(dir.path(), &["--max-shards-per-epoch", "2"]);
    assert_eq!(accumulator_bytes(&daemon), per_accumulator);
    let mut client = connect(&daemon.url()).await;
    let closed = client
        .close_epoch(close_req("shards", 0))
        .await
        .unwrap()
        .into_inner();
    assert_matches(&closed, &reference(&x, &y, k, d), 1e-9);
    assert_eq!(accumulator_bytes(&daemon), 0);
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_in_flight_at_shutdown_keeps_applied_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (2u32, 3u32);
    let (x, y) = dataset(4, 50, k, d, 1.0);
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    create_run(&mut client, "inflight", k, d).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<FeatureBatch>(4);
    let mut push_client = client.clone();
    let push = tokio::spawn(async move { push_client.push(ReceiverStream::new(rx)).await });
    for b in batches("inflight", "", 0, d, &x, &y, 10)
        .into_iter()
        .take(2)
    {
        tx.send(b).await.unwrap();
    }
    // Wait until both are applied, then shut down with the stream still open.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_samples(&get_run(&mut client, "inflight").await, "train", 0) < 20 {
        assert!(std::time::Instant::now() < deadline, "batches not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(client);
    server.shutdown();
    let err = tokio::time::timeout(Duration::from_secs(10), push)
        .await
        .expect("push ends at shutdown")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("after 2 batches"),
        "{}",
        err.message()
    );
    drop(tx);
    server.wait().await.unwrap();

    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let run = get_run(&mut client, "inflight").await;
    assert_eq!(open_samples(&run, "train", 0), 20);
    server.stop().await.unwrap();
}
