//! Bounded fuzzing of every decoder of untrusted bytes (issue 11, item 6),
//! as property tests that `cargo test --release` runs with a short budget:
//! random and mutated `FeatureBatch` and `StatsBlock` messages through
//! decode and validation up to the statistics, `.npy` files through the
//! reader, `vcid serve --config` files through the parser, and HTTP paths
//! and query strings through the web API's router. Each must answer with
//! a value or an error — never a panic — and allocate only what the limits
//! allow (the run's shape and `--max-batch-rows` bound every allocation;
//! a case that allocated more would abort the test process).
//!
//! `VCID_FUZZ_CASES` sets the cases per target (default 200); the long
//! budget of README "Tests and CI" is
//! `VCID_FUZZ_CASES=200000 cargo test --release fuzz`.
//! Owns no production code.

use proptest::prelude::*;
use prost::Message;

use crate::proto::{FeatureBatch, StatsBlock};
use crate::server::decode::decode_batch;
use crate::stats::{Accumulator, Par};

/// The run the decoded messages belong to: K = 3, d = 4, at most 64 rows.
const K: u32 = 3;
const D: u32 = 4;
const MAX_ROWS: u32 = 64;

pub(crate) fn config() -> ProptestConfig {
    let cases = std::env::var("VCID_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `valid` with some bytes overwritten, some dropped, and maybe truncated
/// or extended.
pub(crate) fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len().max(1);
    (
        prop::collection::vec((0..len, any::<u8>()), 0..8),
        prop::collection::vec(0..len, 0..3),
        prop::option::of(0..len + 16),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(writes, drops, cut, tail)| {
            let mut bytes = valid.clone();
            for (at, byte) in writes {
                if at < bytes.len() {
                    bytes[at] = byte;
                }
            }
            for at in drops {
                if at < bytes.len() {
                    bytes.remove(at);
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            bytes.extend(tail);
            bytes
        })
}

fn valid_batch(rows: u32, encoding: i32) -> Vec<u8> {
    let width = if encoding == 0 { 4 } else { 2 };
    FeatureBatch {
        run_id: "r".into(),
        split: "train".into(),
        layer: "l".into(),
        epoch: 1,
        rows,
        features: vec![0x3c; (rows * D) as usize * width].into(),
        encoding,
        labels: (0..rows).map(|i| i % K).collect(),
        writer_id: "w".into(),
        sequence: 7,
    }
    .encode_to_vec()
}

fn valid_stats() -> Vec<u8> {
    let features = ndarray::Array2::from_shape_fn((6, D as usize), |(i, j)| (i * 7 + j) as f64);
    let labels = [0, 1, 2, 0, 1, 2];
    let acc = Accumulator::from_batch(features.view(), &labels, K as usize, Par::Seq)
        .expect("valid batch");
    StatsBlock {
        run_id: "r".into(),
        ..StatsBlock::from(acc.to_parts())
    }
    .encode_to_vec()
}

/// Decode and validate a `FeatureBatch` as `Push` does, up to its
/// statistics.
fn ingest_batch(bytes: &[u8]) {
    let Ok(batch) = FeatureBatch::decode(bytes) else {
        return;
    };
    let Ok(decoded) = decode_batch(batch, D, MAX_ROWS) else {
        return;
    };
    assert!(decoded.features.rows() <= MAX_ROWS as usize);
    if Accumulator::check_labels(&decoded.labels, K as usize).is_err()
        || decoded.features.check_finite().is_err()
    {
        return;
    }
    // A batch the door accepts folds.
    let mut buffer = Vec::new();
    let rows = decoded.features.widen_into(&mut buffer).unwrap();
    Accumulator::from_batch(rows, &decoded.labels, K as usize, Par::Seq).unwrap();
}

/// Decode and validate a `StatsBlock` as `PushStats` does.
fn ingest_stats(bytes: &[u8]) {
    let Ok(block) = StatsBlock::decode(bytes) else {
        return;
    };
    if let Ok(acc) = Accumulator::from_parts(block.into_parts(K, D)) {
        // Accepted statistics must give metrics (or a clean error).
        let _ = crate::metrics::compute(&acc, Par::Seq);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_feature_batch_random(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        ingest_batch(&bytes);
    }

    #[test]
    fn fuzz_feature_batch_mutated(
        bytes in (1..MAX_ROWS + 4, 0..3i32).prop_flat_map(|(rows, enc)| mutated(valid_batch(rows, enc)))
    ) {
        ingest_batch(&bytes);
    }

    #[test]
    fn fuzz_stats_block_random(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        ingest_stats(&bytes);
    }

    #[test]
    fn fuzz_stats_block_mutated(bytes in mutated(valid_stats())) {
        ingest_stats(&bytes);
    }

    /// Random f64 fields of the right lengths: what survives validation
    /// must give finite metrics or a clean error.
    #[test]
    fn fuzz_stats_block_values(
        counts in prop::collection::vec(prop_oneof![Just(0u64), 1u64..100, Just(u64::MAX), Just(1u64 << 53)], K as usize),
        values in prop::collection::vec(prop_oneof![any::<f64>(), -10.0..10.0f64, Just(1e300), Just(-1e-300)], (2 * K * D + D * D + 2 * K) as usize),
    ) {
        let (k, d) = (K as usize, D as usize);
        let mut values = values.into_iter();
        let mut take = |n: usize| values.by_ref().take(n).collect::<Vec<f64>>();
        let block = StatsBlock {
            class_counts: counts.clone(),
            class_means: take(k * d),
            scatter: take(d * d),
            within_trace: take(k),
            unit_sum: take(k * d),
            unit_count: counts,
            unit_within_trace: take(k),
            ..StatsBlock::default()
        };
        if let Ok(acc) = Accumulator::from_parts(block.into_parts(K, D)) {
            let _ = crate::metrics::compute(&acc, Par::Seq);
        }
    }
}

/// The bytes of a valid `.npy` file: `descr`, `shape`, `data`.
fn npy_bytes(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("x.npy");
    crate::npy::write_npy(&path, descr, shape, data).expect("write");
    std::fs::read(&path).expect("read")
}

/// Reads `bytes` as a feature file (all rows, 16 at a time) and as a
/// label file.
fn read_npy(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("x.npy");
    std::fs::write(&path, bytes).expect("write");
    if let Ok(mut reader) = crate::npy::FeatureReader::open(&path) {
        // The header's shape was checked against the file's length, so
        // the rows read are bounded by the file.
        assert!(reader.rows().saturating_mul(reader.cols()) <= bytes.len());
        while let Ok(Some(rows)) = reader.read_rows(16) {
            assert!(rows.nrows() <= 16);
        }
    }
    if let Ok(labels) = crate::npy::read_labels(&path) {
        assert!(labels.len() <= bytes.len());
    }
}

/// A path of the web API, `/metrics` or the web view, with a random tail
/// of characters URIs and percent-decoding find interesting.
fn http_path() -> impl Strategy<Value = String> {
    let prefixes = prop::sample::select(vec![
        "/",
        "/metrics",
        "/healthz",
        "/api/v1/runs",
        "/api/v1/runs/",
        "/api/v1/runs/r",
        "/api/v1/runs/r/history",
        "/api/v1/runs/r/history?split=",
        "/api/v1/runs/r/history?format=",
        "/api/v1/runs/r/history?split=train&layer=",
        "/api/v2/",
        "/assets/",
        "/login?next=",
    ]);
    let tail = prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "r",
            "/",
            "%",
            "%2F",
            "%00",
            "%FF",
            "%E2%82",
            "?",
            "&",
            "=",
            "#",
            "..",
            "csv",
            "json",
            "train",
            "+",
            " ",
            "%20",
            "\u{e9}",
            "{",
            "}",
            "*",
            ";",
            "format=xml",
        ]),
        0..12,
    );
    (prefixes, tail).prop_map(|(prefix, tail)| format!("{prefix}{}", tail.concat()))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_npy_random(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        read_npy(&bytes);
    }

    #[test]
    fn fuzz_npy_mutated(
        bytes in prop_oneof![
            Just(npy_bytes("<f4", &[3, 2], &[0; 24])),
            Just(npy_bytes("<f8", &[2, 2], &[0; 32])),
            Just(npy_bytes("<i8", &[4], &[1; 32])),
            Just(npy_bytes("|u1", &[5], &[2; 5])),
        ].prop_flat_map(mutated)
    ) {
        read_npy(&bytes);
    }
}

/// Requests through the real router of a daemon over a temporary
/// database: every path answers with a status, never a panic or a 500.
#[test]
fn fuzz_http_paths() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use tower::ServiceExt;

    use crate::auth::RequireToken;
    use crate::server::http::{router, HttpState};

    let dir = tempfile::tempdir().expect("temp dir");
    let daemon =
        crate::server::daemon::Daemon::open(dir.path(), Default::default()).expect("daemon opens");
    let (_stop, shutdown) = tokio::sync::watch::channel(true);
    let app = router(HttpState {
        daemon: Arc::new(daemon),
        ready: Arc::new(AtomicBool::new(true)),
        auth: RequireToken::new(None),
        metrics_auth: RequireToken::new(None),
        shutdown,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&http_path(), |path| {
            let Ok(request) =
                axum::http::Request::get(path.as_str()).body(axum::body::Body::empty())
            else {
                return Ok(());
            };
            let status = runtime.block_on(async {
                let response = app.clone().oneshot(request).await.expect("infallible");
                let status = response.status();
                if !path.starts_with("/api/v1/events") {
                    let _ = axum::body::to_bytes(response.into_body(), 1 << 20).await;
                }
                status
            });
            prop_assert!(status.as_u16() != 500, "{path}: {status}");
            Ok(())
        })
        .expect("no failing path");
}
