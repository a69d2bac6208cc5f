//! The daemon's gRPC and HTTP API against a real server on loopback
//! ephemeral ports: exact metrics over concurrent streams, every bad-input
//! row of SPEC §5 with "nothing applied", duplicates, Watch, /metrics,
//! health and auth.

mod server_support;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use server_support::*;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};
use vcid::proto::vci_monitor_client::VciMonitorClient;
use vcid::proto::{
    CreateRunRequest, DeleteRunRequest, FeatureBatch, GetHistoryRequest, GetRunRequest,
    ListRunsRequest, StatsBlock, WatchRequest,
};
use vcid::server::{Limits, ServeConfig};
use vcid::stats::{Accumulator, Par};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_give_exact_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (5u32, 12u32);
    create_run(&mut client, "exact", k, d).await;

    // Watch before anything is closed: it must see every result.
    let mut watch = client
        .watch(WatchRequest {
            run_id: "exact".into(),
            split: "train".into(),
            layer: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut expected = HashMap::new();
    for epoch in 0..2u64 {
        let spread = 2.0 / (1.0 + epoch as f64 * 3.0);
        let (train_x, train_y) = dataset(10 + epoch, 3000, k, d, spread);
        let (val_x, val_y) = dataset(20 + epoch, 700, k, d, spread);
        // Train arrives over three concurrent Push streams (three ranks),
        // val over one, all at the same time.
        let train = batches("exact", "train", epoch, d, &train_x, &train_y, 97);
        let mut pushes = Vec::new();
        for rank in 0..3 {
            let part: Vec<FeatureBatch> = train.iter().skip(rank).step_by(3).cloned().collect();
            let mut c = client.clone();
            pushes.push(tokio::spawn(async move {
                c.push(tokio_stream::iter(part))
                    .await
                    .map(|r| r.into_inner())
            }));
        }
        let val = batches("exact", "val", epoch, d, &val_x, &val_y, 64);
        let mut c = client.clone();
        pushes.push(tokio::spawn(async move {
            c.push(tokio_stream::iter(val))
                .await
                .map(|r| r.into_inner())
        }));
        let mut rows = 0;
        for p in pushes {
            let summary = p.await.unwrap().expect("push succeeds");
            assert_eq!(summary.duplicates, 0);
            rows += summary.rows_applied;
        }
        assert_eq!(rows, 3700);

        let (mut c1, mut c2) = (client.clone(), client.clone());
        let (train_res, val_res) = tokio::join!(
            c1.close_epoch(close_req("exact", "train", epoch)),
            c2.close_epoch(close_req("exact", "val", epoch)),
        );
        let train_res = train_res.unwrap().into_inner();
        let val_res = val_res.unwrap().into_inner();
        assert_eq!(train_res.split, "train");
        assert_eq!(train_res.layer, "penultimate");
        assert_matches(&train_res, &reference(&train_x, &train_y, k, d), 1e-9);
        assert_matches(&val_res, &reference(&val_x, &val_y, k, d), 1e-9);
        assert!(train_res.closed_unix_ms > 0 && train_res.close_seconds >= 0.0);
        expected.insert(("train", epoch), train_res);
        expected.insert(("val", epoch), val_res);
    }

    // vci_delta: absent for the first epoch, the difference afterwards.
    let t0 = &expected[&("train", 0)];
    let t1 = &expected[&("train", 1)];
    assert_eq!(t0.vci_delta, None);
    assert!(t0.notes.contains_key("vci_delta"));
    assert_eq!(t1.vci_delta, Some(t1.vci.unwrap() - t0.vci.unwrap()));
    // Tighter clusters in epoch 1: more collapse, lower VCI.
    assert!(t1.vci.unwrap() < t0.vci.unwrap());

    // History is ordered by split, layer, epoch and equals what Close returned.
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "exact".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let order: Vec<(String, u64)> = history.iter().map(|r| (r.split.clone(), r.epoch)).collect();
    assert_eq!(
        order,
        vec![
            ("train".into(), 0),
            ("train".into(), 1),
            ("val".into(), 0),
            ("val".into(), 1)
        ]
    );
    assert_eq!(history[1], expected[&("train", 1)]);
    let only_val = client
        .get_history(GetHistoryRequest {
            run_id: "exact".into(),
            split: "val".into(),
            layer: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(only_val.len(), 2);

    // Watch delivered the two train results (val filtered out), in order.
    for epoch in 0..2 {
        let got = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch delivers")
            .expect("stream open")
            .expect("result");
        assert_eq!(got, expected[&("train", epoch)]);
    }

    let run = get_run(&mut client, "exact").await;
    assert_eq!(run.rows_ingested, 2 * 3700);
    assert_eq!(run.closed_epochs, 4);
    assert!(run.open_epochs.is_empty());

    // Deleting the run ends its watchers.
    client
        .delete_run(DeleteRunRequest {
            run_id: "exact".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch ends");
    assert!(end.is_none());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encodings_and_push_stats_merge_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (3u32, 4u32);
    create_run(&mut client, "enc", k, d).await;
    let (x, y) = dataset(3, 400, k, d, 1.0);

    // float16 and bfloat16 halves of the same data, the reference rounds
    // identically.
    let mut rounded = Vec::with_capacity(x.len());
    let mut push = Vec::new();
    for (i, (encoding, rows)) in [(1, 0..200usize), (2, 200..400usize)]
        .into_iter()
        .enumerate()
    {
        let mut bytes = Vec::new();
        for v in &x[rows.start * d as usize..rows.end * d as usize] {
            let v = *v as f32;
            let (b, r) = if encoding == 1 {
                let h = half::f16::from_f32(v);
                (h.to_le_bytes(), h.to_f64())
            } else {
                let h = half::bf16::from_f32(v);
                (h.to_le_bytes(), h.to_f64())
            };
            bytes.extend_from_slice(&b);
            rounded.push(r);
        }
        push.push(FeatureBatch {
            run_id: "enc".into(),
            epoch: 0,
            rows: rows.len() as u32,
            features: bytes.into(),
            encoding,
            labels: y[rows].to_vec(),
            writer_id: "w".into(),
            sequence: i as u64,
            ..Default::default()
        });
    }
    client.push(tokio_stream::iter(push)).await.unwrap();

    // The same data as a pre-aggregated StatsBlock into another stream.
    let view = ndarray::ArrayView2::from_shape((400, d as usize), &rounded[..]).unwrap();
    let acc = Accumulator::from_batch(view, &y, k as usize, Par::Seq).unwrap();
    let block = StatsBlock {
        run_id: "enc".into(),
        split: "stats".into(),
        writer_id: "stats-writer".into(),
        sequence: 7,
        ..StatsBlock::from(acc.to_parts())
    };
    let summary = client.push_stats(block.clone()).await.unwrap().into_inner();
    assert_eq!((summary.batches_applied, summary.rows_applied), (1, 400));
    // The same block again is a duplicate.
    let summary = client.push_stats(block).await.unwrap().into_inner();
    assert_eq!((summary.batches_applied, summary.duplicates), (0, 1));

    let reference = reference(&rounded, &y, k, d);
    let raw = client
        .close_epoch(close_req("enc", "", 0))
        .await
        .unwrap()
        .into_inner();
    let stats = client
        .close_epoch(close_req("enc", "stats", 0))
        .await
        .unwrap()
        .into_inner();
    assert_matches(&raw, &reference, 1e-9);
    assert_matches(&stats, &reference, 1e-9);
    assert_eq!(stats.samples, 400);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    create_run(&mut client, "dup", 2, 3).await;
    let (x, y) = dataset(5, 100, 2, 3, 1.0);
    let mut all = batches("dup", "", 0, 3, &x, &y, 10);
    for (i, b) in all.iter_mut().enumerate() {
        b.writer_id = "rank0".into();
        b.sequence = 100 + i as u64;
    }
    let first = client
        .push(tokio_stream::iter(all[..6].to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.batches_applied, first.duplicates), (6, 0));
    // A retry resends 4..10: 4 and 5 are skipped, 6..10 applied.
    let retry = client
        .push(tokio_stream::iter(all[4..].to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retry.batches_applied, retry.duplicates, retry.rows_applied),
        (4, 2, 40)
    );
    // Another writer with the same sequence numbers is not a duplicate.
    let mut other = all[0].clone();
    other.writer_id = "rank1".into();
    let s = client
        .push(tokio_stream::iter(vec![other]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.batches_applied, 1);
    // Without writer_id nothing is deduplicated.
    let mut anon = all[0].clone();
    anon.writer_id.clear();
    let s = client
        .push(tokio_stream::iter(vec![anon.clone(), anon]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.batches_applied, 2);
    let run = get_run(&mut client, "dup").await;
    assert_eq!(open_samples(&run, "train", 0), 100 + 10 + 20);
    assert_eq!(run.rows_ingested, 130);
    server.stop().await.unwrap();
}

/// The duplicate filter never drops data: a sequence that would give its
/// writer more gaps than `--max-sequence-gaps-per-writer` is refused with
/// FAILED_PRECONDITION (over Push and PushStats, nothing applied), late
/// batches filling remembered gaps are applied, and the filter with its
/// limit survives a graceful restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_gaps_beyond_the_limit_are_refused_never_dropped() {
    const GAPS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let config = || ServeConfig {
        limits: Limits {
            max_sequence_gaps_per_writer: GAPS,
            ..Limits::default()
        },
        ..ServeConfig::ephemeral(dir.path())
    };
    let server = start(config()).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (3u32, 4u32);
    create_run(&mut client, "gaps", k, d).await;
    let (x, y) = dataset(13, 200, k, d, 1.0);
    // Five rows of writer "rank0" numbered `seq`.
    let numbered = |seq: u64| {
        let start = (seq as usize % 40) * 5;
        FeatureBatch {
            writer_id: "rank0".into(),
            sequence: seq,
            ..batch("gaps", "", 0, d, &x, &y, start, start + 5)
        }
    };
    let stats = |seq: u64| {
        let start = (seq as usize % 40) * 5;
        StatsBlock {
            run_id: "gaps".into(),
            writer_id: "rank0".into(),
            sequence: seq,
            ..stats_of(
                &x[start * d as usize..(start + 5) * d as usize],
                &y[start..start + 5],
                k,
                d,
            )
        }
    };

    // Sequences 0, 2, …, 2·GAPS: exactly GAPS gaps, all applied.
    let evens: Vec<FeatureBatch> = (0..=GAPS).map(|i| numbered(2 * i)).collect();
    let s = client
        .push(tokio_stream::iter(evens))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.batches_applied, s.rows_applied, s.duplicates),
        (GAPS + 1, 5 * (GAPS + 1), 0)
    );
    let mut rows = 5 * (GAPS + 1);

    // One gap more: refused, over Push and over PushStats; nothing applied.
    let over = 2 * GAPS + 2;
    let err = client
        .push(tokio_stream::iter(vec![numbered(over)]))
        .await
        .unwrap_err();
    let received = format!("received {over}");
    let limit = format!("limit {GAPS}");
    let needles = [
        "sequence:",
        "writer_id \"rank0\"",
        "run \"gaps\"",
        received.as_str(),
        limit.as_str(),
        "--max-sequence-gaps-per-writer",
        "Nothing was applied",
        "increasing order",
        "new writer_id",
    ];
    assert_status(&err, Code::FailedPrecondition, &needles);
    assert!(
        err.message().contains("batch 0 of this Push stream"),
        "{err:?}"
    );
    let err = client.push_stats(stats(over)).await.unwrap_err();
    assert_status(&err, Code::FailedPrecondition, &needles);
    let run = get_run(&mut client, "gaps").await;
    assert_eq!(open_samples(&run, "train", 0), rows);
    assert_eq!(run.rows_ingested, rows);

    // Remembered, not forgotten: an old sequence is still a duplicate, and
    // a late batch filling a gap is applied, which makes room for `over`.
    let s = client
        .push(tokio_stream::iter(vec![
            numbered(0),
            numbered(1),
            numbered(over),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.batches_applied, s.rows_applied, s.duplicates),
        (2, 10, 1)
    );
    rows += 10;
    // At the limit again; a late stats block filling gap 3 is applied too.
    let s = client.push_stats(stats(3)).await.unwrap().into_inner();
    assert_eq!((s.batches_applied, s.rows_applied), (1, 5));
    rows += 5;
    let run = get_run(&mut client, "gaps").await;
    assert_eq!(open_samples(&run, "train", 0), rows);

    let (_, metrics) = http_get(server.http_addr(), "/metrics");
    assert!(
        metrics.contains("vcid_batches_rejected_total{reason=\"sequence_gaps\"} 2"),
        "{metrics}"
    );
    server.stop().await.unwrap();

    // After a graceful restart the filter is back, exactly, with its limit:
    // GAPS − 1 gaps now, so one new gap is admitted and the next refused.
    let server = start(config()).await;
    let mut client = connect(&server.grpc_url()).await;
    let s = client
        .push(tokio_stream::iter(vec![numbered(4), numbered(100)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.batches_applied, s.duplicates), (1, 1));
    rows += 5;
    let err = client
        .push(tokio_stream::iter(vec![numbered(200)]))
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        &["received 200", &format!("already has {GAPS} gaps")],
    );
    // Another writer has its own filter.
    let mut other = numbered(200);
    other.writer_id = "rank1".into();
    let s = client
        .push(tokio_stream::iter(vec![other]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.batches_applied, 1);
    rows += 5;
    let run = get_run(&mut client, "gaps").await;
    assert_eq!(open_samples(&run, "train", 0), rows);
    let result = client
        .close_epoch(close_req("gaps", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.samples, rows);
    server.stop().await.unwrap();
}

fn assert_status(err: &tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(err.code(), code, "{err:?}");
    for needle in needles {
        assert!(
            err.message().contains(needle),
            "message {:?} lacks {needle:?}",
            err.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (3u32, 2u32);
    create_run(&mut client, "bad", k, d).await;
    let (x, y) = dataset(9, 40, k, d, 1.0);
    let good = batch("bad", "", 0, d, &x, &y, 0, 10);
    client
        .push(tokio_stream::iter(vec![good.clone()]))
        .await
        .unwrap();
    let before = get_run(&mut client, "bad").await;
    assert_eq!(open_samples(&before, "train", 0), 10);

    let nan = {
        let mut b = good.clone();
        let mut bytes = b.features.to_vec();
        bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        b.features = bytes.into();
        b
    };
    let inf = {
        let mut b = good.clone();
        let mut bytes = b.features.to_vec();
        bytes[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
        b.features = bytes.into();
        b
    };
    let cases: Vec<(&str, FeatureBatch, Code, Vec<&str>)> = vec![
        (
            "unknown run",
            FeatureBatch {
                run_id: "nope".into(),
                ..good.clone()
            },
            Code::NotFound,
            vec!["run_id", "nope"],
        ),
        (
            "bad split",
            FeatureBatch {
                split: "a/b".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["split", "[A-Za-z0-9_.:-]", "a/b"],
        ),
        (
            "bad layer",
            FeatureBatch {
                layer: "x".repeat(65),
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["layer", "1-64"],
        ),
        (
            "rows = 0",
            FeatureBatch {
                rows: 0,
                features: Default::default(),
                labels: vec![],
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["rows", "at least 1", "0"],
        ),
        (
            "byte length",
            FeatureBatch {
                features: good.features.slice(..79),
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["features", "80 bytes", "79 bytes"],
        ),
        (
            "label count",
            FeatureBatch {
                labels: good.labels[..9].to_vec(),
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["labels", "10", "9"],
        ),
        (
            "label >= K",
            FeatureBatch {
                labels: {
                    let mut l = good.labels.clone();
                    l[6] = 3;
                    l
                },
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["labels[6]", "[0, 3)", "3"],
        ),
        (
            "NaN",
            nan,
            Code::InvalidArgument,
            vec!["features[0][1]", "finite", "NaN"],
        ),
        (
            "Inf",
            inf,
            Code::InvalidArgument,
            vec!["features[1][0]", "finite", "inf"],
        ),
        (
            "unknown encoding",
            FeatureBatch {
                encoding: 9,
                ..good.clone()
            },
            Code::InvalidArgument,
            vec!["encoding", "ENCODING_FLOAT32", "9"],
        ),
    ];
    for (name, bad, code, needles) in cases {
        let err = client
            .push(tokio_stream::iter(vec![bad]))
            .await
            .expect_err(name);
        assert_status(&err, code, &needles);
        assert!(
            err.message().contains("batch 0"),
            "{name}: {}",
            err.message()
        );
        let after = get_run(&mut client, "bad").await;
        assert_eq!(
            after.open_epochs, before.open_epochs,
            "{name} changed state"
        );
        assert_eq!(
            after.rows_ingested, before.rows_ingested,
            "{name} changed state"
        );
    }

    // Good, good, bad: the first two stay applied and the error says so.
    let two_good = batch("bad", "", 0, d, &x, &y, 10, 20);
    let three_good = batch("bad", "", 0, d, &x, &y, 20, 30);
    let bad = FeatureBatch {
        encoding: 5,
        ..good.clone()
    };
    let err = client
        .push(tokio_stream::iter(vec![two_good, three_good, bad]))
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["batch 2", "the 2 batches before it were applied"],
    );
    let run = get_run(&mut client, "bad").await;
    assert_eq!(open_samples(&run, "train", 0), 30);
    // Bad, good: batches after the bad one are never applied, even though
    // the server prepares the next batch while applying the current one.
    let bad_first = FeatureBatch {
        labels: vec![7; 10],
        ..good.clone()
    };
    let err = client
        .push(tokio_stream::iter(vec![
            bad_first,
            batch("bad", "", 0, d, &x, &y, 30, 40),
        ]))
        .await
        .unwrap_err();
    assert_status(&err, Code::InvalidArgument, &["batch 0", "labels[0]"]);
    let run = get_run(&mut client, "bad").await;
    assert_eq!(open_samples(&run, "train", 0), 30);

    // Unknown run on every RPC that names one.
    let err = client
        .get_run(GetRunRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::NotFound, &["run_id", "nope"]);
    let err = client
        .close_epoch(close_req("nope", "", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .get_history(GetHistoryRequest {
            run_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete_run(DeleteRunRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .watch(WatchRequest {
            run_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .push_stats(StatsBlock {
            run_id: "nope".into(),
            class_counts: vec![1, 0, 0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Bad CreateRun requests create nothing.
    for (req, field) in [
        (
            CreateRunRequest {
                run_id: "has space".into(),
                num_classes: 2,
                feature_dim: 1,
                ..Default::default()
            },
            "run_id",
        ),
        (
            CreateRunRequest {
                run_id: String::new(),
                num_classes: 2,
                feature_dim: 1,
                ..Default::default()
            },
            "run_id",
        ),
        (
            CreateRunRequest {
                run_id: "x".repeat(129),
                num_classes: 2,
                feature_dim: 1,
                ..Default::default()
            },
            "run_id",
        ),
        (
            CreateRunRequest {
                run_id: "k1".into(),
                num_classes: 1,
                feature_dim: 1,
                ..Default::default()
            },
            "num_classes",
        ),
        (
            CreateRunRequest {
                run_id: "d0".into(),
                num_classes: 2,
                feature_dim: 0,
                ..Default::default()
            },
            "feature_dim",
        ),
    ] {
        let err = client.create_run(req).await.unwrap_err();
        assert_status(&err, Code::InvalidArgument, &[field, "expected"]);
    }
    // Same shape again: a no-op returning the run; another shape: ALREADY_EXISTS.
    let again = create_run(&mut client, "bad", k, d).await;
    assert_eq!(again.rows_ingested, 30);
    let err = client
        .create_run(CreateRunRequest {
            run_id: "bad".into(),
            num_classes: 4,
            feature_dim: d,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&err, Code::AlreadyExists, &["3/2", "4/2"]);
    let runs = client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);

    // A bad StatsBlock (wrong length) changes nothing.
    let err = client
        .push_stats(StatsBlock {
            run_id: "bad".into(),
            class_counts: vec![1, 1, 1],
            class_means: vec![0.0; 5],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .push_stats(StatsBlock {
            run_id: "bad".into(),
            class_counts: vec![0, 0, 0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["class_counts", "at least one sample"],
    );

    // Closing: an epoch never opened, then closing, pushing and closing
    // again after it is closed.
    let err = client
        .close_epoch(close_req("bad", "", 5))
        .await
        .unwrap_err();
    assert_status(&err, Code::FailedPrecondition, &["epoch", "open: 0", "5"]);
    client.close_epoch(close_req("bad", "", 0)).await.unwrap();
    let err = client
        .close_epoch(close_req("bad", "", 0))
        .await
        .unwrap_err();
    assert_status(&err, Code::FailedPrecondition, &["epoch", "already closed"]);
    let err = client
        .push(tokio_stream::iter(vec![good.clone()]))
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        &["epoch", "already closed", "bad/train/penultimate"],
    );
    let err = client
        .push_stats(StatsBlock {
            run_id: "bad".into(),
            ..stats_of(&x[..20], &y[..10], k, d)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let run = get_run(&mut client, "bad").await;
    assert!(run.open_epochs.is_empty(), "{:?}", run.open_epochs);
    assert_eq!(run.rows_ingested, 30);
    // A later epoch opens side by side with others.
    let mut e2 = good.clone();
    e2.epoch = 2;
    let mut e1 = good.clone();
    e1.epoch = 1;
    client.push(tokio_stream::iter(vec![e2, e1])).await.unwrap();
    let run = get_run(&mut client, "bad").await;
    assert_eq!(run.open_epochs.len(), 2);
    server.stop().await.unwrap();
}

/// A StatsBlock (epoch 0, default stream) of some rows.
fn stats_of(x: &[f64], y: &[u32], k: u32, d: u32) -> StatsBlock {
    let view = ndarray::ArrayView2::from_shape((y.len(), d as usize), x).unwrap();
    let acc = Accumulator::from_batch(view, y, k as usize, Par::Seq).unwrap();
    // Epoch 0 of the default stream (empty names), no run id: the caller
    // fills those in.
    StatsBlock::from(acc.to_parts())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_resource_exhausted_with_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (k, d) = (4u32, 8u32);
    // One K=4, d=8 accumulator is 8·(64 + 64 + 16) = 1152 bytes.
    let config = tight_limits(dir.path());
    let server = start(config).await;
    let mut client = connect(&server.grpc_url()).await;
    // A run whose single accumulator cannot fit.
    let err = client
        .create_run(CreateRunRequest {
            run_id: "huge".into(),
            num_classes: 2,
            feature_dim: 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::ResourceExhausted,
        &["max_accumulator_bytes", "1500", "83264"],
    );
    assert!(client
        .list_runs(ListRunsRequest {})
        .await
        .unwrap()
        .into_inner()
        .runs
        .is_empty());

    create_run(&mut client, "lim", k, d).await;
    let (x, y) = dataset(1, 120, k, d, 1.0);
    client
        .push(tokio_stream::iter(vec![batch(
            "lim", "", 0, d, &x, &y, 0, 20,
        )]))
        .await
        .unwrap();
    // A second open epoch would exceed the budget.
    let err = client
        .push(tokio_stream::iter(vec![batch(
            "lim", "", 1, d, &x, &y, 0, 20,
        )]))
        .await
        .unwrap_err();
    assert_status(&err, Code::ResourceExhausted, &["1152", "1500", "in use"]);
    let run = get_run(&mut client, "lim").await;
    assert_eq!(run.open_epochs.len(), 1);
    assert_eq!(run.rows_ingested, 20);

    // Too many rows (message still small: 101·8·4 = 3232 bytes).
    let err = client
        .push(tokio_stream::iter(vec![batch(
            "lim", "", 0, d, &x, &y, 0, 101,
        )]))
        .await
        .unwrap_err();
    assert_status(&err, Code::ResourceExhausted, &["rows", "100", "101"]);

    // A streamed message above the size limit, after a good one.
    let big = FeatureBatch {
        features: vec![0; 8192].into(),
        ..batch("lim", "", 0, d, &x, &y, 0, 20)
    };
    let err = client
        .push(tokio_stream::iter(vec![
            batch("lim", "", 0, d, &x, &y, 20, 30),
            big,
        ]))
        .await
        .unwrap_err();
    assert_status(&err, Code::ResourceExhausted, &["4096"]);
    // A unary message above the limit (PushStats of d = 8 with padding).
    let err = client
        .push_stats(StatsBlock {
            run_id: "lim".into(),
            scatter: vec![0.0; 1000],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::ResourceExhausted,
        &["4096", "--max-message-bytes"],
    );
    let run = get_run(&mut client, "lim").await;
    assert_eq!(open_samples(&run, "train", 0), 30);

    // Closing frees the budget: epoch 1 opens now.
    client.close_epoch(close_req("lim", "", 0)).await.unwrap();
    client
        .push(tokio_stream::iter(vec![batch(
            "lim", "", 1, d, &x, &y, 0, 20,
        )]))
        .await
        .unwrap();
    let (_, metrics) = http_get(server.http_addr(), "/metrics");
    assert!(
        metrics.contains("vcid_batches_rejected_total{reason=\"memory_budget\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vcid_batches_rejected_total{reason=\"too_large\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("vcid_accumulator_bytes 1152"), "{metrics}");
    server.stop().await.unwrap();
}

/// `promtool check metrics` on the exposition, when promtool is installed
/// (the deploy e2e test always runs it against a real Prometheus).
fn promtool_check(body: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed; lint skipped");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Value of the sample line starting with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_renders_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (3u32, 4u32);
    let metadata = [
        ("model", "resnet18"),
        ("data-set", "cifar"),
        ("run", "shadow"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    client
        .create_run(CreateRunRequest {
            run_id: "m1".into(),
            num_classes: k,
            feature_dim: d,
            metadata,
        })
        .await
        .unwrap();
    let (x, y) = dataset(2, 300, k, d, 1.0);
    client
        .push(tokio_stream::iter(batches("m1", "", 0, d, &x, &y, 50)))
        .await
        .unwrap();
    let train = client
        .close_epoch(close_req("m1", "", 0))
        .await
        .unwrap()
        .into_inner();
    // A val stream where a single class was observed: VCI is undefined.
    let one_class: Vec<u32> = vec![1; 30];
    client
        .push(tokio_stream::iter(vec![batch(
            "m1", "val", 0, d, &x, &one_class, 0, 30,
        )]))
        .await
        .unwrap();
    let val = client
        .close_epoch(close_req("m1", "val", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(val.vci, None);
    assert!(val.notes.contains_key("vci"));

    let (status, body) = http_get(server.http_addr(), "/metrics");
    assert_eq!(status, 200);
    for name in [
        "vcid_vci",
        "vcid_linear_probe_mse",
        "vcid_nc1",
        "vcid_cdnv",
        "vcid_class_separation",
        "vcid_equinorm",
        "vcid_equiangularity",
        "vcid_effective_rank",
        "vcid_epoch",
        "vcid_epoch_samples",
        "vcid_epoch_close_timestamp_seconds",
        "vcid_run_info",
        "vcid_rows_ingested_total",
        "vcid_batches_rejected_total",
        "vcid_ingest_bytes_total",
        "vcid_epoch_close_duration_seconds",
        "vcid_runs",
        "vcid_accumulator_bytes",
        "vcid_build_info",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
    }
    assert!(
        !body.to_lowercase().contains("nan"),
        "NaN in output:\n{body}"
    );
    let train_labels = "{run=\"m1\",split=\"train\",layer=\"penultimate\"}";
    let val_labels = "{run=\"m1\",split=\"val\",layer=\"penultimate\"}";
    assert_eq!(sample(&body, &format!("vcid_vci{train_labels}")), train.vci);
    assert_eq!(sample(&body, &format!("vcid_nc1{train_labels}")), train.nc1);
    assert_eq!(
        sample(&body, &format!("vcid_epoch_samples{train_labels}")),
        Some(300.0)
    );
    // Undefined for val: absent, while val's defined series are present.
    assert_eq!(sample(&body, &format!("vcid_vci{val_labels}")), None);
    assert_eq!(
        sample(&body, &format!("vcid_vci_delta{train_labels}")),
        None
    );
    assert_eq!(sample(&body, &format!("vcid_epoch{val_labels}")), Some(0.0));
    assert_eq!(
        sample(&body, &format!("vcid_epoch_samples{val_labels}")),
        Some(30.0)
    );
    // Metadata labels are sanitised and never replace `run`.
    let info = body
        .lines()
        .find(|l| l.starts_with("vcid_run_info{"))
        .unwrap();
    for part in [
        "run=\"m1\"",
        "model=\"resnet18\"",
        "data_set=\"cifar\"",
        "meta_run=\"shadow\"",
    ] {
        assert!(info.contains(part), "{info}");
    }
    assert_eq!(
        sample(&body, "vcid_rows_ingested_total{run=\"m1\"}"),
        Some(330.0)
    );
    assert_eq!(sample(&body, "vcid_runs "), Some(1.0));
    assert!(
        body.contains("vcid_epoch_close_duration_seconds_count 2"),
        "{body}"
    );
    assert!(body.contains(&format!(
        "vcid_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));

    promtool_check(&body);

    let (status, body) = http_get(server.http_addr(), "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = http_get(server.http_addr(), "/readyz");
    assert_eq!(status, 200);

    // Deleting the run removes every one of its series.
    client
        .delete_run(DeleteRunRequest {
            run_id: "m1".into(),
        })
        .await
        .unwrap();
    let (_, body) = http_get(server.http_addr(), "/metrics");
    assert!(
        !body.contains("m1"),
        "series of a deleted run remain:\n{body}"
    );
    assert_eq!(sample(&body, "vcid_runs "), Some(0.0));
    assert!(!body.contains("# TYPE vcid_vci "), "{body}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "vcid.v1.VciMonitor"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service:?} not SERVING");
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_every_rpc() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        auth_token: Some("s3cret-token".into()),
        ..ServeConfig::ephemeral(dir.path())
    };
    let server = start(config).await;
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut anonymous = VciMonitorClient::new(channel.clone());
    let err = anonymous.list_runs(ListRunsRequest {}).await.unwrap_err();
    assert_status(&err, Code::Unauthenticated, &["authorization", "Bearer"]);
    let err = anonymous
        .create_run(CreateRunRequest {
            run_id: "a".into(),
            num_classes: 2,
            feature_dim: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let with_token = |token: &'static str| {
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        move |mut req: Request<()>| {
            req.metadata_mut().insert("authorization", value.clone());
            Ok(req)
        }
    };
    let mut wrong = VciMonitorClient::with_interceptor(channel.clone(), with_token("guess"));
    let err = wrong.list_runs(ListRunsRequest {}).await.unwrap_err();
    assert_status(&err, Code::Unauthenticated, &["wrong token"]);
    let err = wrong
        .push(tokio_stream::iter(Vec::<FeatureBatch>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut ok = VciMonitorClient::with_interceptor(channel.clone(), with_token("s3cret-token"));
    ok.create_run(CreateRunRequest {
        run_id: "a".into(),
        num_classes: 2,
        feature_dim: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        ok.list_runs(ListRunsRequest {})
            .await
            .unwrap()
            .into_inner()
            .runs
            .len(),
        1
    );
    let mut health = HealthClient::with_interceptor(channel, with_token("s3cret-token"));
    assert_eq!(
        health
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status,
        1
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["vcid.v1.VciMonitor", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    server.stop().await.unwrap();
}
