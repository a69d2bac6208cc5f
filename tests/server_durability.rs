//! Durability of the daemon: runs and closed epochs survive `kill -9` of the
//! real binary; an epoch that was open at the kill continues from its last
//! checkpoint, and its close is refused with DATA_LOSS (naming the writers)
//! until every writer whose later batches died has resent them; SIGTERM
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
    CheckpointRequest, DeleteRunRequest, FeatureBatch, GetHistoryRequest, ListRunsRequest,
};
use vcid::server::ServeConfig;

/// Asserts a DATA_LOSS refusal of closing `epoch` of durable/train/penultimate
/// that names exactly the `missing` writers (as the message words them).
fn assert_missing(err: &tonic::Status, epoch: u64, missing: &str) {
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    let text = err.message();
    assert!(
        text.contains(&format!(
            "batches of epoch {epoch} of stream durable/train/penultimate died with an earlier \
             daemon process to have resent them, received nothing yet from: {missing}. The \
             epoch stays open"
        )),
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

/// `batches` stamped with `writer` and consecutive sequences from `first`.
fn stamped(mut all: Vec<FeatureBatch>, writer: &str, first: u64) -> Vec<FeatureBatch> {
    for (i, b) in all.iter_mut().enumerate() {
        b.writer_id = writer.into();
        b.sequence = first + i as u64;
    }
    all
}

fn checkpoint_req(writer: &str, force: bool) -> CheckpointRequest {
    CheckpointRequest {
        run_id: "durable".into(),
        writer_id: writer.into(),
        force,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_closed_epochs_and_checkpointed_open_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (3u32, 6u32);
    let (x, y) = dataset(31, 600, k, d, 1.0);
    // Periodic checkpoints off: this test decides when they happen.
    let off = ["--checkpoint-interval", "0"];

    let daemon = Daemon::spawn(dir.path(), &off);
    let mut client = connect(&daemon.url()).await;
    create_run(&mut client, "durable", k, d).await;
    create_run(&mut client, "doomed", k, d).await;
    client
        .delete_run(DeleteRunRequest {
            run_id: "doomed".into(),
        })
        .await
        .unwrap();
    let epoch0 = stamped(batches("durable", "", 0, d, &x, &y, 100), "a", 0);
    let summary = client
        .push(tokio_stream::iter(epoch0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        summary.durable_through, None,
        "applied, nothing durable yet"
    );
    let closed = client
        .close_epoch(close_req("durable", "", 0))
        .await
        .unwrap()
        .into_inner();
    // The close made writer a's sequences 0..=5 durable with the result.
    let reply = client
        .checkpoint(checkpoint_req("a", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.durable_through, reply.epochs_written), (Some(5), 0));

    // Epoch 1: writer a's sequences 6..=8 are checkpointed, 9..=11 only
    // applied; writer b's two batches only applied; epoch 2 holds a batch
    // without a writer_id (which nobody can resend idempotently).
    let epoch1_a = stamped(batches("durable", "", 1, d, &x, &y, 100), "a", 6);
    client
        .push(tokio_stream::iter(epoch1_a[..3].to_vec()))
        .await
        .unwrap();
    let reply = client
        .checkpoint(checkpoint_req("a", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.durable_through, reply.epochs_written), (Some(8), 1));
    let summary = client
        .push(tokio_stream::iter(epoch1_a[3..].to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.batches_applied, 3);
    assert_eq!(summary.durable_through, Some(8), "9..=11 are not durable");
    assert_eq!(summary.incarnation, reply.incarnation);
    let (xb, yb) = dataset(32, 150, k, d, 1.0);
    let epoch1_b = stamped(batches("durable", "", 1, d, &xb, &yb, 75), "b", 0);
    client
        .push(tokio_stream::iter(epoch1_b.clone()))
        .await
        .unwrap();
    client
        .push(tokio_stream::iter(batches(
            "durable", "", 2, d, &x, &y, 600,
        )))
        .await
        .unwrap();
    let run = get_run(&mut client, "durable").await;
    let open1 = &run.open_epochs[0];
    assert_eq!(
        (open1.epoch, open1.samples, open1.durable_samples),
        (1, 750, 300)
    );
    assert!(open1.durable_unix_ms > 1_700_000_000_000);
    drop(client);
    daemon.kill9();

    let daemon = Daemon::spawn(dir.path(), &off);
    // The start-up says why epoch 2 waits for its writers.
    assert!(
        daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("died with an unclean stop of the daemon")),
        "no unclean-stop warning after kill -9"
    );
    let mut client = connect(&daemon.url()).await;
    let runs = client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    let ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, vec!["durable"], "CreateRun and DeleteRun are durable");
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
    // Epoch 1 continues from its checkpoint; epoch 2 (never checkpointed)
    // continues empty.
    let run = get_run(&mut client, "durable").await;
    let open: Vec<(u64, u64, u64)> = run
        .open_epochs
        .iter()
        .map(|o| (o.epoch, o.samples, o.durable_samples))
        .collect();
    assert_eq!(open, vec![(1, 300, 300), (2, 0, 0)]);
    let reply = client
        .checkpoint(checkpoint_req("a", false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.durable_through, Some(8));
    assert_ne!(reply.incarnation, summary.incarnation, "a new process");

    // Closing refuses while writers a and b have not resent, naming them
    // and where their durable batches end; it changes nothing.
    let err = client
        .close_epoch(close_req("durable", "", 1))
        .await
        .unwrap_err();
    assert_missing(
        &err,
        1,
        "writer_id \"a\" after sequence 8, writer_id \"b\" (none of its batches is durable)",
    );
    // Writer a resends everything it was not told was durable: 6..=8 are
    // skipped by the restored duplicate filter, 9..=11 applied.
    let resent = client
        .push(tokio_stream::iter(epoch1_a.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resent.batches_applied, resent.duplicates), (3, 3));
    let err = client
        .close_epoch(close_req("durable", "", 1))
        .await
        .unwrap_err();
    assert_missing(&err, 1, "writer_id \"b\" (none of its batches is durable)");
    client.push(tokio_stream::iter(epoch1_b)).await.unwrap();
    let result = client
        .close_epoch(close_req("durable", "", 1))
        .await
        .unwrap()
        .into_inner();
    // Equal to the same data in one uninterrupted batch.
    let mut all_x = x.clone();
    all_x.extend_from_slice(&xb);
    let mut all_y = y.clone();
    all_y.extend_from_slice(&yb);
    assert_eq!(result.samples, 750);
    assert_matches(&result, &reference(&all_x, &all_y, k, d), 1e-9);

    // Batches without a writer_id cannot be resent: epoch 2 never closes
    // (pushes are still taken; nothing is reported as whole that is not).
    let err = client
        .close_epoch(close_req("durable", "", 2))
        .await
        .unwrap_err();
    assert_missing(
        &err,
        2,
        "batches without a writer_id (they cannot be resent idempotently) (none of its batches \
         is durable)",
    );
    assert_eq!(
        rejected(&daemon, "epoch_lost"),
        "0",
        "closes are not batches"
    );
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));

    // A graceful restart keeps that refusal (the marker stays until the
    // epoch closes or the run is deleted).
    let daemon = Daemon::spawn(dir.path(), &off);
    let mut client = connect(&daemon.url()).await;
    let err = client
        .close_epoch(close_req("durable", "", 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "durable".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0], closed);
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
        .close_epoch(close_req("ckpt", "", 3))
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
        .close_epoch(close_req("ckpt", "", 3))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_fold_into_budgeted_shards_and_checkpoint_exactly() {
    let (k, d) = (10u32, 192u32);
    let (x, y) = dataset(91, 4096, k, d, 1.2);
    let per_accumulator = vcid::stats::Accumulator::estimated_bytes(k.into(), d.into()).unwrap();
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
    // Every shard is one accumulator of the budget plus the fold buffers
    // it keeps (64 rows widened to f64, their centred copy, the class
    // tables, per-thread sums: at most 8·(2·65·d + 2·K·d + 4·d + 256)
    // bytes); one or two shards (the limit itself is checked in
    // `state::run`'s unit tests, where shards can be counted).
    let reserved = daemon_gauge(&daemon, "vcid_accumulator_bytes");
    let buffers = 8 * u64::from(2 * 65 * d + 2 * k * d + 4 * d + 256);
    assert!(
        (1..=2u64)
            .any(|n| (n * per_accumulator..=n * (per_accumulator + buffers)).contains(&reserved)),
        "{reserved} bytes for accumulators of {per_accumulator} and buffers up to {buffers}"
    );
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));

    // Restored as one accumulator holding the combined statistics.
    let daemon = Daemon::spawn(dir.path(), &["--max-shards-per-epoch", "2"]);
    assert_eq!(
        daemon_gauge(&daemon, "vcid_accumulator_bytes"),
        per_accumulator
    );
    let mut client = connect(&daemon.url()).await;
    let closed = client
        .close_epoch(close_req("shards", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_matches(&closed, &reference(&x, &y, k, d), 1e-9);
    assert_eq!(daemon_gauge(&daemon, "vcid_accumulator_bytes"), 0);
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

/// Checkpoint atomicity: SIGKILL at random moments around a large
/// checkpoint round (4 open epochs of d = 1024, ~34 MB in one transaction)
/// never restores a torn or unacknowledged state: after each restart every
/// epoch holds the same number of batches, either the last acknowledged
/// checkpoint's or the newer one's (the newer one whenever its `Checkpoint`
/// reply arrived before the kill), and the restored duplicate filter agrees
/// with the restored statistics exactly (resending everything applies
/// precisely the batches the statistics lack). At the end the epochs equal
/// the same data in one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_checkpoint_write_restores_one_acknowledged_state() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let (k, d, rows, rounds, epochs) = (10u32, 1024u32, 64usize, 6usize, 4u64);
    let (x, y) = dataset(5, rows * rounds, k, d, 1.0);
    let all: Vec<Vec<FeatureBatch>> = (0..epochs)
        .map(|e| stamped(batches("durable", "", e, d, &x, &y, rows), "w", e * 100))
        .collect();
    let off = ["--checkpoint-interval", "0"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut daemon = Daemon::spawn(dir.path(), &off);
    let mut client = connect(&daemon.url()).await;
    create_run(&mut client, "durable", k, d).await;
    let mut durable = 0u64; // batches per epoch in the last durable checkpoint
    let (mut acknowledged, mut restored_newest) = (0, 0);
    for round in 0..rounds {
        for epoch in &all {
            client
                .push(tokio_stream::iter([epoch[round].clone()]))
                .await
                .unwrap();
        }
        let mut forcing = client.clone();
        let checkpoint =
            tokio::spawn(async move { forcing.checkpoint(checkpoint_req("w", true)).await });
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        daemon.kill9();
        let acked = matches!(checkpoint.await, Ok(Ok(_)));
        acknowledged += usize::from(acked);

        daemon = Daemon::spawn(dir.path(), &off);
        client = connect(&daemon.url()).await;
        let run = get_run(&mut client, "durable").await;
        let held: Vec<u64> = run.open_epochs.iter().map(|o| o.samples).collect();
        assert_eq!(held.len(), epochs as usize, "{held:?}");
        assert!(held.iter().all(|&s| s == held[0]), "torn round: {held:?}");
        let n = held[0] / rows as u64;
        let newest = round as u64 + 1;
        assert!(
            n == durable || n == newest,
            "round {round}: restored {n} batches, acknowledged states {durable} and {newest}"
        );
        if acked {
            assert_eq!(n, newest, "an acknowledged checkpoint was lost");
        }
        durable = n;
        restored_newest += usize::from(n == newest);
        for epoch in &all {
            let summary = client
                .push(tokio_stream::iter(epoch[..=round].to_vec()))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                (summary.duplicates, summary.batches_applied),
                (n, newest - n),
                "the duplicate filter disagrees with the statistics"
            );
        }
    }
    eprintln!(
        "{acknowledged} of {rounds} checkpoints answered before the kill, \
         {restored_newest} restored the newest state"
    );
    let expected = reference(&x, &y, k, d);
    for epoch in 0..epochs {
        let result = client
            .close_epoch(close_req("durable", "", epoch))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(result.samples, (rows * rounds) as u64);
        assert_matches(&result, &expected, 1e-9);
    }
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
}
