//! The metric registry (`vcid::metrics::registry`) against every place that
//! lists the metrics: the table in `docs/metrics.md`, the `optional double`
//! fields of the proto's `EpochResult`, the fields of `EpochMetrics`, and
//! what a real daemon exports on `/metrics` and the `vcid history` binary
//! prints. A metric added in one place only fails here.
//!
//! `UPDATE_DOCS=1 cargo test --release --test metric_registry` rewrites the
//! generated table in `docs/metrics.md` instead of comparing it.

mod server_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use prost::Message;
use server_support::*;
use vcid::metrics::registry::{self, Source, METRICS, STREAM_GAUGES};
use vcid::metrics::EpochMetrics;
use vcid::proto::{CloseEpochRequest, EpochResult, GetHistoryRequest};
use vcid::server::ServeConfig;

const BEGIN: &str = "<!-- metric-table:begin (generated; do not edit by hand) -->\n";
const END: &str = "<!-- metric-table:end -->";

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn docs_table_is_generated_from_the_registry() {
    let path = repo_file("docs/metrics.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find(BEGIN).expect("begin marker") + BEGIN.len();
    let end = text.find(END).expect("end marker");
    let table = registry::markdown_table();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let updated = format!("{}{table}{}", &text[..start], &text[end..]);
        std::fs::write(&path, updated).unwrap();
    } else {
        assert_eq!(
            text[start..end],
            table,
            "docs/metrics.md's metric table differs from the registry; \
             regenerate it with UPDATE_DOCS=1 cargo test --release --test metric_registry"
        );
    }
    // Every metric has its own section, which the table links to.
    for m in METRICS {
        assert!(
            text.contains(&format!("\n### {}\n", m.name)),
            "docs/metrics.md has no section `### {}`",
            m.name
        );
    }
}

/// `(name, field number)` of every `optional double` of `message EpochResult`.
fn proto_optional_doubles() -> Vec<(String, u32)> {
    let proto = std::fs::read_to_string(repo_file("proto/vcid/v1/vcid.proto")).unwrap();
    let body = proto
        .split("message EpochResult {")
        .nth(1)
        .expect("message EpochResult")
        .split('}')
        .next()
        .unwrap();
    body.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("optional double ")?;
            let (name, number) = rest.split_once('=')?;
            let number = number.trim().trim_end_matches(';').trim().parse().ok()?;
            Some((name.trim().to_owned(), number))
        })
        .collect()
}

fn read_varint(bytes: &[u8]) -> (u64, usize) {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("truncated varint");
}

#[test]
fn proto_optional_doubles_are_the_registry() {
    let fields = proto_optional_doubles();
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    let registry: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
    assert_eq!(names, registry, "EpochResult's optional doubles");
    // Each row's accessors touch exactly the proto field of its name: set
    // one value, encode, and find it under that field number.
    for ((_, number), (i, m)) in fields.iter().zip(METRICS.iter().enumerate()) {
        let value = 0.125 + i as f64;
        let mut result = EpochResult::default();
        (m.set)(&mut result, Some(value));
        assert_eq!((m.get)(&result), Some(value), "{}", m.name);
        let bytes = result.encode_to_vec();
        let (tag, used) = read_varint(&bytes);
        assert_eq!(
            tag,
            u64::from(*number) << 3 | 1,
            "{} is not field {number}",
            m.name
        );
        assert_eq!(bytes.len(), used + 8, "{} set more than one field", m.name);
        let encoded = f64::from_le_bytes(bytes[used..].try_into().unwrap());
        assert_eq!(encoded, value, "{}", m.name);
    }
}

fn metrics_with(value: impl Fn(usize) -> Option<f64>) -> EpochMetrics {
    EpochMetrics {
        vci: value(0),
        linear_probe_mse: value(1),
        nc1: value(2),
        cdnv: value(3),
        class_separation: value(4),
        equinorm: value(5),
        equiangularity: value(6),
        effective_rank: value(7),
        samples: 10,
        classes_observed: 2,
        feature_dim: 3,
        rank_total: 3,
        rank_between: 1,
        small_sample: false,
        notes: BTreeMap::new(),
    }
}

#[test]
fn epoch_metrics_fields_are_the_registry() {
    // The optional fields of EpochMetrics (null when unset) are exactly the
    // registry's metrics of one epoch.
    let json = serde_json::to_value(metrics_with(|_| None)).unwrap();
    let optional: BTreeSet<&str> = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k.as_str())
        .collect();
    let epoch: BTreeSet<&str> = registry::epoch_metrics().map(|m| m.name).collect();
    assert_eq!(optional, epoch);
    // Each accessor reads the field of its name.
    let m = metrics_with(|i| Some(0.5 + i as f64));
    let json = serde_json::to_value(&m).unwrap();
    for metric in registry::epoch_metrics() {
        assert_eq!(
            json[metric.name].as_f64(),
            metric.of_epoch(&m),
            "{}",
            metric.name
        );
    }
    // Only the history-dependent metrics come from elsewhere.
    let changes: Vec<&str> = METRICS
        .iter()
        .filter(|m| matches!(m.source, Source::Change))
        .map(|m| m.name)
        .collect();
    assert_eq!(changes, ["vci_delta"]);
}

#[test]
fn registry_rows_are_well_formed() {
    let (mut names, mut columns) = (BTreeSet::new(), BTreeSet::new());
    for m in METRICS {
        assert!(names.insert(m.name), "{} twice", m.name);
        assert!(columns.insert(m.column), "column {} twice", m.column);
        // Prometheus HELP is ASCII on one line.
        let help = m.prometheus_help();
        assert!(help.is_ascii() && !help.contains('\n'), "{help}");
    }
    for g in STREAM_GAUGES {
        assert!(g.help.is_ascii(), "{}", g.help);
        assert!(g.series.starts_with("vcid_"));
    }
}

/// `(series, labels) → value` and `series → HELP` of an exposition.
fn parse_exposition(text: &str) -> (BTreeMap<(String, String), f64>, BTreeMap<String, String>) {
    let mut samples = BTreeMap::new();
    let mut help = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap();
            help.insert(name.to_owned(), text.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            // Label order is the encoder's business: compare them sorted.
            let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            labels.sort_unstable();
            samples.insert((name.to_owned(), labels.join(",")), value.parse().unwrap());
        }
    }
    (samples, help)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_and_history_cli_show_every_registry_metric() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(ServeConfig::ephemeral(dir.path())).await;
    let mut client = connect(&server.grpc_url()).await;
    let (k, d) = (3u32, 4u32);
    create_run(&mut client, "reg", k, d).await;
    let mut results = Vec::new();
    for epoch in 0..2u64 {
        let (x, y) = dataset(40 + epoch, 300, k, d, 1.0 / (1.0 + epoch as f64));
        client
            .push(tokio_stream::iter(batches(
                "reg", "train", epoch, d, &x, &y, 100,
            )))
            .await
            .unwrap();
        let result = client
            .close_epoch(CloseEpochRequest {
                run_id: "reg".into(),
                split: "train".into(),
                layer: String::new(),
                epoch,
            })
            .await
            .unwrap()
            .into_inner();
        results.push(result);
    }
    let latest = results.last().unwrap();
    // Every metric is defined in the second epoch, so every row is checked.
    for m in METRICS {
        assert!((m.get)(latest).is_some(), "{} undefined", m.name);
    }

    // /metrics: one gauge per registry row with the registry's HELP and the
    // result's value, and no per-stream gauge the registry does not know.
    let (status, body) = http_get(server.http_addr(), "/metrics");
    assert_eq!(status, 200);
    let (samples, help) = parse_exposition(&body);
    let labels = r#"layer="penultimate",run="reg",split="train""#.to_owned();
    let mut expected: BTreeMap<String, (String, f64)> = BTreeMap::new();
    for m in METRICS {
        expected.insert(m.series(), (m.prometheus_help(), (m.get)(latest).unwrap()));
    }
    for g in STREAM_GAUGES {
        expected.insert(
            g.series.to_owned(),
            (g.help.to_owned(), (g.get)(latest).unwrap()),
        );
    }
    let exported: BTreeSet<&str> = samples
        .keys()
        .filter(|(_, l)| l.contains("split="))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        exported,
        expected.keys().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for (series, (want_help, want_value)) in &expected {
        assert_eq!(help.get(series), Some(want_help), "HELP of {series}");
        assert_eq!(
            samples.get(&(series.clone(), labels.clone())),
            Some(want_value),
            "{series}"
        );
    }

    // `vcid history`: a column per metric, and every metric in the JSON
    // with the value the server returned.
    let history = client
        .get_history(GetHistoryRequest {
            run_id: "reg".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(history, results);
    let addr = server.grpc_url();
    let run = |format: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_vcid"))
                .args(["history", "reg", "--addr", &addr, "--format", format])
                .env_remove("VCID_AUTH_TOKEN_FILE")
                .output()
                .unwrap()
        })
    };
    let table = run("table").await.unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    for m in METRICS {
        assert!(header.contains(&m.column), "{} not in {header:?}", m.column);
    }
    let json = run("json").await.unwrap();
    assert!(json.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    // The binary prints the shortest exact representation; serde_json's
    // default parser may be off by one ulp.
    for (shown, result) in doc["results"].as_array().unwrap().iter().zip(&results) {
        for m in METRICS {
            let (got, want) = (shown[m.name].as_f64(), (m.get)(result));
            let same = match (got, want) {
                (Some(a), Some(b)) => (a - b).abs() <= f64::EPSILON * b.abs(),
                (a, b) => a == b,
            };
            assert!(same, "{}: {got:?} vs {want:?}", m.name);
        }
    }
    server.stop().await.unwrap();
}
