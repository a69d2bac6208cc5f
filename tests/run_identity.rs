//! Issue 11, items 3 and 4 (second line of defence), against the real
//! `vcid serve` process:
//!
//! * a run deleted and created again under the same id is another run: the
//!   close of the deleted run that was in flight answers NOT_FOUND and
//!   writes nothing into the new run (nor do the old run's markers and
//!   checkpoint rounds), in memory and on disk, after `kill -9` and after a
//!   graceful restart;
//! * a close cut short by its caller (a client deadline) or by the end of
//!   the shutdown grace never strands its epoch: it is stored (or given
//!   back), its memory is returned, and a graceful stop is never logged as
//!   unclean.

mod server_support;

use std::time::{Duration, Instant};

use server_support::*;
use tonic::Code;
use vcid::proto::{
    CheckpointRequest, DeleteRunRequest, FeatureBatch, GetHistoryRequest, WatchRequest,
};

fn stamped(mut all: Vec<FeatureBatch>, writer: &str, first: u64) -> Vec<FeatureBatch> {
    for (i, b) in all.iter_mut().enumerate() {
        b.writer_id = writer.into();
        b.sequence = first + i as u64;
    }
    all
}

async fn history_len(client: &mut Client, run: &str) -> usize {
    client
        .get_history(GetHistoryRequest {
            run_id: run.into(),
            split: String::new(),
            layer: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .len()
}

/// What the daemon logs at start-up when batches died with an unclean stop.
const UNCLEAN: &str = "died with an unclean stop of the daemon";

fn logged(daemon: &Daemon, needle: &str) -> bool {
    daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(needle))
}

/// Waits until epoch `epoch` of `run` left the open set (its close began).
async fn wait_closing(client: &mut Client, run: &str, epoch: u64) {
    let started = Instant::now();
    while get_run(client, run)
        .await
        .open_epochs
        .iter()
        .any(|o| o.epoch == epoch)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "close never began"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_in_flight_never_writes_into_the_run_created_again_under_its_id() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoint rounds every 200 ms: rounds of the old run race too.
    let args = ["--checkpoint-interval", "0.2"];
    let daemon = Daemon::spawn(dir.path(), &args);
    let mut client = connect(&daemon.url()).await;

    // The old run: K = 10, d = 2048, epoch 0 to close (a close of a few
    // seconds: the d × d eigenproblems), epoch 1 open (its marker).
    let (old_k, old_d) = (10u32, 2048u32);
    create_run(&mut client, "x", old_k, old_d).await;
    let (ox, oy) = dataset(1, 400, old_k, old_d, 1.0);
    let mut old = stamped(batches("x", "", 0, old_d, &ox, &oy, 100), "old", 0);
    old.extend(stamped(
        batches(
            "x",
            "",
            1,
            old_d,
            &ox[..100 * old_d as usize],
            &oy[..100],
            100,
        ),
        "old",
        4,
    ));
    client.push(tokio_stream::iter(old)).await.unwrap();

    let mut closer = client.clone();
    let close = tokio::spawn(async move { closer.close_epoch(close_req("x", "", 0)).await });
    wait_closing(&mut client, "x", 0).await;

    // Meanwhile: delete x and create it again with K = 2, d = 3.
    client
        .delete_run(DeleteRunRequest { run_id: "x".into() })
        .await
        .unwrap();
    let (k, d) = (2u32, 3u32);
    let created = create_run(&mut client, "x", k, d).await;
    assert_eq!((created.num_classes, created.feature_dim), (k, d));
    let mut watch = client
        .watch(WatchRequest {
            run_id: "x".into(),
            split: String::new(),
            layer: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (x, y) = dataset(2, 120, k, d, 1.0);
    let new = stamped(batches("x", "", 0, d, &x, &y, 20), "new", 0);
    client
        .push(tokio_stream::iter(new[..3].to_vec()))
        .await
        .unwrap();

    // The close of the deleted run: NOT_FOUND, saying why.
    let err = close.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("deleted during the close")
            && err
                .message()
                .contains("epoch 0 of stream x/train/penultimate"),
        "{}",
        err.message()
    );
    // The new run is untouched and accepts pushes; its watcher saw nothing
    // of the old run.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.message())
            .await
            .is_err(),
        "the new run's watcher received an event"
    );
    let run = get_run(&mut client, "x").await;
    assert_eq!((run.num_classes, run.feature_dim), (k, d));
    assert_eq!(history_len(&mut client, "x").await, 0);
    assert_eq!(run.closed_epochs, 0);
    assert_eq!(run.open_epochs.len(), 1, "{:?}", run.open_epochs);
    assert_eq!(open_samples(&run, "train", 0), 60);
    assert_eq!(run.rows_ingested, 60);
    client
        .push(tokio_stream::iter(new[3..4].to_vec()))
        .await
        .unwrap();
    // Only the new run's memory is reserved: its accumulator and the fold
    // buffers its shard keeps, far below the old run's accumulator.
    let per_new = vcid::stats::Accumulator::estimated_bytes(k.into(), d.into()).unwrap();
    let per_old = vcid::stats::Accumulator::estimated_bytes(old_k.into(), old_d.into()).unwrap();
    let held = daemon_gauge(&daemon, "vcid_accumulator_bytes");
    assert!(
        per_new <= held && held < per_old / 100,
        "{held} bytes reserved"
    );
    let reply = client
        .checkpoint(CheckpointRequest {
            run_id: "x".into(),
            writer_id: "new".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.durable_through, Some(3));

    // kill -9: the run comes back as the new K = 2, d = 3 run, its epoch
    // with exactly its 80 rows, nothing of the old run (no result, no
    // epoch 1, no missing writer).
    drop((client, watch));
    daemon.kill9();
    let daemon = Daemon::spawn(dir.path(), &args);
    let mut client = connect(&daemon.url()).await;
    let run = get_run(&mut client, "x").await;
    assert_eq!((run.num_classes, run.feature_dim), (k, d));
    assert_eq!(run.open_epochs.len(), 1, "{:?}", run.open_epochs);
    assert_eq!(open_samples(&run, "train", 0), 80);
    assert_eq!(history_len(&mut client, "x").await, 0);
    assert!(!logged(&daemon, UNCLEAN));
    client
        .push(tokio_stream::iter(new[4..].to_vec()))
        .await
        .unwrap();

    // SIGTERM: the same after a graceful restart, and the epoch closes
    // with exactly the new run's rows.
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = Daemon::spawn(dir.path(), &args);
    let mut client = connect(&daemon.url()).await;
    let run = get_run(&mut client, "x").await;
    assert_eq!((run.num_classes, run.feature_dim), (k, d));
    assert_eq!(open_samples(&run, "train", 0), 120);
    assert!(!logged(&daemon, UNCLEAN));
    watch = client
        .watch(WatchRequest {
            run_id: "x".into(),
            split: String::new(),
            layer: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let closed = client
        .close_epoch(close_req("x", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_matches(&closed, &reference(&x, &y, k, d), 1e-9);
    let watched = watch.message().await.unwrap().expect("a result");
    assert_eq!((watched.epoch, watched.samples), (0, 120));
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_cut_short_by_its_caller_or_the_shutdown_grace_is_never_stranded() {
    let dir = tempfile::tempdir().unwrap();
    // No shutdown grace: in-flight RPCs are cut at once on SIGTERM.
    let args = [
        "--checkpoint-interval",
        "0",
        "--shutdown-grace-seconds",
        "0",
    ];
    let daemon = Daemon::spawn(dir.path(), &args);
    let mut client = connect(&daemon.url()).await;
    let (k, d) = (10u32, 2048u32);
    create_run(&mut client, "cut", k, d).await;
    let (x, y) = dataset(3, 300, k, d, 1.0);
    for epoch in [0, 1] {
        let all = stamped(batches("cut", "", epoch, d, &x, &y, 100), "w", epoch * 3);
        client.push(tokio_stream::iter(all)).await.unwrap();
    }
    let expected = reference(&x, &y, k, d);

    // A client deadline far shorter than the close: the caller gives up,
    // the close still finishes and is stored, and its memory is returned.
    let mut request = tonic::Request::new(close_req("cut", "", 0));
    request.set_timeout(Duration::from_millis(50));
    let err = client.close_epoch(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // Stored, and only epoch 1's accumulator (with the fold buffers its
    // shard keeps, much smaller) still reserved.
    let per = vcid::stats::Accumulator::estimated_bytes(k.into(), d.into()).unwrap();
    let started = Instant::now();
    while get_run(&mut client, "cut").await.closed_epochs == 0
        || daemon_gauge(&daemon, "vcid_accumulator_bytes") >= 2 * per
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "close stranded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = client
        .close_epoch(close_req("cut", "", 0))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(
        again.message().contains("already closed"),
        "{}",
        again.message()
    );

    // SIGTERM during the close of epoch 1, with no grace: the shutdown
    // waits for the close, which stores its result; the restart finds it
    // closed, and nothing calls the graceful stop unclean.
    let mut closer = client.clone();
    let close = tokio::spawn(async move { closer.close_epoch(close_req("cut", "", 1)).await });
    wait_closing(&mut client, "cut", 1).await;
    drop(client);
    let logs = std::sync::Arc::clone(&daemon.log);
    assert_eq!(daemon.terminate(), Some(0));
    let _ = close.await.unwrap();
    let waited = || {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("waiting for the epoch closes in flight"))
    };
    let started = Instant::now();
    while !waited() {
        // The log reader may still be draining the last lines.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the shutdown did not wait for the close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let daemon = Daemon::spawn(dir.path(), &args);
    let mut client = connect(&daemon.url()).await;
    let run = get_run(&mut client, "cut").await;
    assert!(run.open_epochs.is_empty(), "{:?}", run.open_epochs);
    assert_eq!(run.closed_epochs, 2);
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "cut".into(),
            split: String::new(),
            layer: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    for result in &history {
        assert_matches(result, &expected, 1e-9);
    }
    assert_eq!(daemon_gauge(&daemon, "vcid_accumulator_bytes"), 0);
    assert!(!logged(&daemon, UNCLEAN));
    drop(client);
    assert_eq!(daemon.terminate(), Some(0));
}
