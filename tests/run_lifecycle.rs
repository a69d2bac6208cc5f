//! `FinishRun` against the real daemon binary: a finished run keeps its
//! history and series, refuses pushes and closes with FAILED_PRECONDITION
//! (changing nothing), is exported as `vcid_run_finished 1`, and stays
//! finished across a graceful restart and a `kill -9`.

mod server_support;
mod web_support;

use tonic::Code;
use vcid::proto::{CloseEpochRequest, FinishRunRequest, GetRunRequest, StatsBlock};
use web_support::{batch, create, history, push_and_close, three_classes, Client};

async fn connect(url: String) -> Client {
    Client::connect(url).await.expect("client connects")
}

async fn finish(client: &mut Client, run: &str) -> Result<vcid::proto::Run, tonic::Status> {
    client
        .finish_run(FinishRunRequest { run_id: run.into() })
        .await
        .map(tonic::Response::into_inner)
}

async fn run_state(client: &mut Client, run: &str) -> vcid::proto::Run {
    client
        .get_run(GetRunRequest { run_id: run.into() })
        .await
        .unwrap()
        .into_inner()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = server_support::http_get(addr, "/metrics");
    assert_eq!(status, 200);
    body
}

fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_refuses_data_and_stays_finished_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = server_support::Daemon::spawn(dir.path(), &[]);
    let mut client = connect(daemon.url()).await;
    create(&mut client, "done", &[]).await;
    create(&mut client, "busy", &[]).await;
    push_and_close(&mut client, "done", "train", 0, 1.0, false).await;
    push_and_close(&mut client, "done", "val", 0, 1.0, false).await;

    // Unknown run: NOT_FOUND.
    assert_eq!(
        finish(&mut client, "ghost").await.unwrap_err().code(),
        Code::NotFound
    );

    // An open epoch blocks finishing, and the message names it.
    let (x, y) = three_classes(0.5);
    client
        .push(futures::stream::iter(vec![batch(
            "done", "train", 1, &x, &y,
        )]))
        .await
        .unwrap();
    let err = finish(&mut client, "done").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("run_id: expected a run without open epochs")
            && err.message().contains("train/penultimate epoch 1"),
        "{}",
        err.message()
    );
    assert!(!run_state(&mut client, "done").await.finished);
    client
        .close_epoch(CloseEpochRequest {
            run_id: "done".into(),
            split: "train".into(),
            layer: String::new(),
            epoch: 1,
        })
        .await
        .unwrap();

    let finished = finish(&mut client, "done").await.unwrap();
    assert!(finished.finished && finished.finished_unix_ms > 0);
    assert_eq!(finished.closed_epochs, 3);
    let before = history(&mut client, "done", "", "").await;
    let rows_before = finished.rows_ingested;
    // Finishing again is a no-op that keeps the first time.
    let again = finish(&mut client, "done").await.unwrap();
    assert_eq!(again.finished_unix_ms, finished.finished_unix_ms);

    // Pushes, stats blocks and closes are refused and change nothing.
    let push_err = client
        .push(futures::stream::iter(vec![batch(
            "done", "train", 2, &x, &y,
        )]))
        .await
        .unwrap_err();
    let stats_err = client
        .push_stats(StatsBlock {
            run_id: "done".into(),
            split: "train".into(),
            epoch: 2,
            class_counts: vec![1, 0, 0],
            class_means: vec![0.0; 6],
            scatter: vec![0.0; 4],
            within_trace: vec![0.0; 3],
            unit_sum: vec![0.0; 6],
            unit_count: vec![0; 3],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let close_err = client
        .close_epoch(CloseEpochRequest {
            run_id: "done".into(),
            split: "train".into(),
            layer: String::new(),
            epoch: 2,
        })
        .await
        .unwrap_err();
    for err in [&push_err, &stats_err, &close_err] {
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(
            err.message()
                .contains("expected a run that is not finished")
                && err.message().contains("\"done\""),
            "{}",
            err.message()
        );
    }
    let after = run_state(&mut client, "done").await;
    assert_eq!(
        (after.rows_ingested, after.open_epochs.len()),
        (rows_before, 0)
    );
    assert_eq!(history(&mut client, "done", "", "").await, before);
    // The other run is untouched.
    push_and_close(&mut client, "busy", "train", 0, 1.0, false).await;

    // Exported: finished 1, running 0; the finished run keeps its series.
    let metrics = scrape(daemon.http);
    assert_eq!(
        sample(&metrics, "vcid_run_finished{run=\"done\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "vcid_run_finished{run=\"busy\"}"),
        Some(0.0)
    );
    assert!(metrics.contains("vcid_vci{run=\"done\",split=\"train\",layer=\"penultimate\"}"));
    assert_eq!(
        sample(
            &metrics,
            "vcid_batches_rejected_total{reason=\"run_finished\"}"
        ),
        Some(2.0),
        "the refused Push and PushStats are counted"
    );

    // Graceful restart, then kill -9: finished (with its time) and refusing.
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = server_support::Daemon::spawn(dir.path(), &[]);
    let mut client = connect(daemon.url()).await;
    let restored = run_state(&mut client, "done").await;
    assert!(restored.finished);
    assert_eq!(restored.finished_unix_ms, finished.finished_unix_ms);
    assert_eq!(history(&mut client, "done", "", "").await, before);
    assert!(!run_state(&mut client, "busy").await.finished);
    finish(&mut client, "busy").await.unwrap();
    daemon.kill9();
    let daemon = server_support::Daemon::spawn(dir.path(), &[]);
    let mut client = connect(daemon.url()).await;
    assert!(
        run_state(&mut client, "busy").await.finished,
        "durable before FinishRun returned"
    );
    let err = client
        .push(futures::stream::iter(vec![batch("done", "val", 5, &x, &y)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        sample(&scrape(daemon.http), "vcid_run_finished{run=\"done\"}"),
        Some(1.0)
    );
    drop(daemon);
}
