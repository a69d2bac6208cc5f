//! Structured error details against a real daemon on loopback: every
//! rejected request carries, beside its unchanged message, a
//! `grpc-status-details-bin` google.rpc.Status with the standard detail
//! types (README "Errors"): `BadRequest` naming the field for
//! INVALID_ARGUMENT, `ResourceInfo` naming the run for NOT_FOUND and
//! ALREADY_EXISTS, `QuotaFailure` naming the limit for RESOURCE_EXHAUSTED.

mod server_support;

use prost::Message;
use server_support::*;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use vcid::proto::{CreateRunRequest, FeatureBatch, GetRunRequest, StatsBlock};
use vcid::server::Reason;
use vcid::server::ServeConfig;

/// The details decode as a google.rpc.Status repeating the code and message.
fn rpc_status(status: &Status) -> tonic_types::pb::Status {
    let decoded = tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status");
    assert_eq!(decoded.code, status.code() as i32);
    assert_eq!(decoded.message, status.message());
    decoded
}

/// The one field violation of an INVALID_ARGUMENT status.
fn field_violation(status: &Status) -> (String, String) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(rpc_status(status).details.len(), 1);
    let mut violations = status
        .get_details_bad_request()
        .expect("BadRequest detail")
        .field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    let v = violations.remove(0);
    (v.field, v.description)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (3u32, 2u32);
    create_run(&mut client, "fields", k, d).await;
    let (x, y) = dataset(3, 10, k, d, 1.0);
    let good = batch("fields", "", 0, d, &x, &y, 0, 10);

    let mut bad_label = good.clone();
    bad_label.labels[6] = 3;
    let cases: Vec<(FeatureBatch, &str, &str)> = vec![
        (
            bad_label,
            "labels[6]",
            "expected a class in [0, 3), received 3",
        ),
        (
            FeatureBatch {
                split: "a/b".into(),
                ..good.clone()
            },
            "split",
            "expected 1-64 characters of [A-Za-z0-9_.:-], received \"a/b\"",
        ),
        (
            FeatureBatch {
                labels: good.labels[..9].to_vec(),
                ..good.clone()
            },
            "labels",
            "expected 10 labels (one per row), received 9 labels",
        ),
    ];
    for (bad, field, description) in cases {
        let err = client
            .push(tokio_stream::iter(vec![bad]))
            .await
            .unwrap_err();
        // The message is unchanged: it still names batch, field and values.
        assert!(err.message().contains("batch 0"), "{}", err.message());
        assert!(
            err.message().contains(&format!("{field}: {description}")),
            "{}",
            err.message()
        );
        assert_eq!(field_violation(&err), (field.into(), description.into()));
    }

    // A unary request, and a StatsBlock field checked by the math core.
    let err = client
        .create_run(CreateRunRequest {
            run_id: "k1".into(),
            num_classes: 1,
            feature_dim: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        field_violation(&err),
        (
            "num_classes".into(),
            "expected at least 2, received 1".into()
        )
    );
    let err = client
        .push_stats(StatsBlock {
            run_id: "fields".into(),
            class_counts: vec![1, 0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let (field, description) = field_violation(&err);
    assert_eq!(field, "class_counts");
    assert!(
        err.message().starts_with("class_counts: "),
        "{}",
        err.message()
    );
    assert!(description.starts_with("expected "), "{description}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_conflicting_runs_carry_resource_info() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let resource = |status: &Status| {
        rpc_status(status);
        let info = status.get_details_resource_info().expect("ResourceInfo");
        (info.resource_type, info.resource_name)
    };

    let err = client
        .get_run(GetRunRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());
    assert_eq!(resource(&err), ("run".into(), "nope".into()));

    // Through a Push stream too (the error that ends the stream).
    let (x, y) = dataset(1, 4, 2, 2, 1.0);
    let err = client
        .push(tokio_stream::iter(vec![batch(
            "gone", "", 0, 2, &x, &y, 0, 4,
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(resource(&err), ("run".into(), "gone".into()));

    create_run(&mut client, "shape", 3, 2).await;
    let err = client
        .create_run(CreateRunRequest {
            run_id: "shape".into(),
            num_classes: 4,
            feature_dim: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(resource(&err), ("run".into(), "shape".into()));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_carry_quota_failure() {
    let dir = tempfile::tempdir().unwrap();
    let config = tight_limits(dir.path());
    let server = start(config).await;
    let mut client = connect(&server.grpc_url()).await;
    let quota = |status: &Status| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        rpc_status(status);
        let mut violations = status
            .get_details_quota_failure()
            .expect("QuotaFailure")
            .violations;
        assert_eq!(violations.len(), 1);
        let v = violations.remove(0);
        assert!(!v.description.is_empty());
        (v.subject, v.quota_id, v.quota_value)
    };

    // The accumulator budget.
    let err = client
        .create_run(CreateRunRequest {
            run_id: "huge".into(),
            num_classes: 2,
            feature_dim: 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("max_accumulator_bytes"));
    assert_eq!(
        quota(&err),
        ("run:huge".into(), "max_accumulator_bytes".into(), 1500)
    );

    // Rows per batch.
    let (k, d) = (2u32, 2u32);
    create_run(&mut client, "lim", k, d).await;
    let (x, y) = dataset(2, 120, k, d, 1.0);
    let err = client
        .push(tokio_stream::iter(vec![batch(
            "lim", "", 0, d, &x, &y, 0, 101,
        )]))
        .await
        .unwrap_err();
    assert_eq!(quota(&err), ("rows".into(), "max_batch_rows".into(), 100));

    // Message size, streamed (seen by the Push handler) and unary (tonic's
    // refusal, rewritten on its way out).
    let big = FeatureBatch {
        features: vec![0; 8192].into(),
        ..batch("lim", "", 0, d, &x, &y, 0, 20)
    };
    let err = client
        .push(tokio_stream::iter(vec![big]))
        .await
        .unwrap_err();
    assert_eq!(
        quota(&err),
        ("message".into(), "max_message_bytes".into(), 4096)
    );
    let err = client
        .push_stats(StatsBlock {
            run_id: "lim".into(),
            scatter: vec![0.0; 1000],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("--max-message-bytes") && err.message().contains("found 8"),
        "{}",
        err.message()
    );
    assert_eq!(
        quota(&err),
        ("message".into(), "max_message_bytes".into(), 4096)
    );
    server.stop().await.unwrap();
}

#[test]
fn every_reason_label_is_documented() {
    for doc in ["README.md", "deploy/README.md"] {
        let text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(doc))
                .unwrap();
        for reason in Reason::ALL {
            assert!(
                text.contains(&format!("`{}`", reason.label())),
                "{doc} does not list the reason `{}`",
                reason.label()
            );
        }
    }
}
