//! How runs and epoch results look outside gRPC: the JSON of the HTTP API
//! (and `vcid runs|history --format json`), the CSV of
//! `/api/v1/runs/{run}/history?format=csv` (and `vcid history --format csv`).
//! The metric columns come from the registry
//! ([`METRICS`]).
//!
//! Pure conversions of the wire types; every number is passed through as the
//! daemon computed it (JSON and CSV print the shortest text that reads back
//! as the same f64). It must not compute or round any metric.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};

use crate::metrics::registry::METRICS;
use crate::proto::{EpochResult, Run};

/// One epoch result as the JSON of the API: every field of the
/// `EpochResult` message under its proto name and in its order, the metrics
/// from the registry, undefined ones as `null` with the reason in `notes`
/// (sorted by metric). Serialised straight from the result, without an
/// intermediate `serde_json::Value`.
#[derive(Clone, Copy, Debug)]
pub struct ResultJson<'a>(pub &'a EpochResult);

impl Serialize for ResultJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let notes: BTreeMap<&str, &str> = r
            .notes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut map = serializer.serialize_map(Some(13 + METRICS.len()))?;
        map.serialize_entry("run_id", &r.run_id)?;
        map.serialize_entry("split", &r.split)?;
        map.serialize_entry("layer", &r.layer)?;
        map.serialize_entry("epoch", &r.epoch)?;
        map.serialize_entry("samples", &r.samples)?;
        map.serialize_entry("classes_observed", &r.classes_observed)?;
        map.serialize_entry("feature_dim", &r.feature_dim)?;
        for m in METRICS {
            map.serialize_entry(m.name, &(m.get)(r))?;
        }
        map.serialize_entry("rank_total", &r.rank_total)?;
        map.serialize_entry("rank_between", &r.rank_between)?;
        map.serialize_entry("small_sample", &r.small_sample)?;
        map.serialize_entry("notes", &notes)?;
        map.serialize_entry("close_seconds", &r.close_seconds)?;
        map.serialize_entry("closed_unix_ms", &r.closed_unix_ms)?;
        map.end()
    }
}

/// The history document of the API and `vcid history --format json`:
/// `{"run_id": ..., "results": [...]}`.
#[derive(Debug, Serialize)]
pub struct HistoryJson<'a> {
    run_id: &'a str,
    results: Vec<ResultJson<'a>>,
}

impl<'a> HistoryJson<'a> {
    pub fn new(run_id: &'a str, results: &'a [EpochResult]) -> Self {
        HistoryJson {
            run_id,
            results: results.iter().map(ResultJson).collect(),
        }
    }
}

/// A run as JSON: every field of the `Run` message, plus `latest` (the
/// highest closed epoch of every stream with its VCI) when given.
pub fn run_json(run: &Run, latest: Option<&[std::sync::Arc<EpochResult>]>) -> Value {
    let mut value = json!({
        "run_id": run.run_id,
        "num_classes": run.num_classes,
        "feature_dim": run.feature_dim,
        "metadata": run.metadata,
        "created_unix_ms": run.created_unix_ms,
        "rows_ingested": run.rows_ingested,
        "closed_epochs": run.closed_epochs,
        "open_epochs": run.open_epochs.iter().map(|open| json!({
            "split": open.split,
            "layer": open.layer,
            "epoch": open.epoch,
            "samples": open.samples,
        })).collect::<Vec<_>>(),
        "finished": run.finished,
        "finished_unix_ms": run.finished_unix_ms,
    });
    if let (Some(latest), Some(map)) = (latest, value.as_object_mut()) {
        let mut streams: Vec<&EpochResult> = latest.iter().map(|r| r.as_ref()).collect();
        streams.sort_by(|a, b| (&a.split, &a.layer).cmp(&(&b.split, &b.layer)));
        map.insert(
            "latest".into(),
            streams
                .iter()
                .map(|r| {
                    json!({
                        "split": r.split,
                        "layer": r.layer,
                        "epoch": r.epoch,
                        "vci": r.vci,
                        "closed_unix_ms": r.closed_unix_ms,
                    })
                })
                .collect(),
        );
    }
    value
}

/// The columns of [`history_csv`] before the metrics and after them.
const CSV_LEADING: &[&str] = &[
    "run_id",
    "split",
    "layer",
    "epoch",
    "samples",
    "classes_observed",
    "feature_dim",
];
const CSV_TRAILING: &[&str] = &[
    "rank_total",
    "rank_between",
    "small_sample",
    "close_seconds",
    "closed_unix_ms",
    "notes",
];

/// The CSV header of [`history_csv`]: the `EpochResult` fields in proto
/// order, the metrics from the registry.
pub fn csv_header() -> String {
    let metrics = METRICS.iter().map(|m| m.name);
    let columns: Vec<&str> = CSV_LEADING
        .iter()
        .copied()
        .chain(metrics)
        .chain(CSV_TRAILING.iter().copied())
        .collect();
    columns.join(",")
}

/// Epoch results as CSV (RFC 4180, `\n` line ends): one row per result in
/// the given order, an empty cell for an undefined metric, `notes` as
/// `metric: reason` pairs joined by `; ` (sorted by metric).
pub fn history_csv(results: &[EpochResult]) -> String {
    let mut out = String::with_capacity(64 + results.len() * 256);
    out.push_str(&csv_header());
    out.push('\n');
    for r in results {
        let mut notes: Vec<(&String, &String)> = r.notes.iter().collect();
        notes.sort();
        let notes: Vec<String> = notes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = write!(
            out,
            "{},{},{},{},{},{},{}",
            csv_cell(&r.run_id),
            csv_cell(&r.split),
            csv_cell(&r.layer),
            r.epoch,
            r.samples,
            r.classes_observed,
            r.feature_dim,
        );
        for m in METRICS {
            out.push(',');
            if let Some(v) = (m.get)(r) {
                let _ = write!(out, "{v}");
            }
        }
        let _ = writeln!(
            out,
            ",{},{},{},{},{},{}",
            r.rank_total,
            r.rank_between,
            r.small_sample,
            r.close_seconds,
            r.closed_unix_ms,
            csv_cell(&notes.join("; ")),
        );
    }
    out
}

/// A CSV cell, quoted when it holds a comma, a quote or a line break.
fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_a_json_field_and_a_csv_column() {
        let r = EpochResult {
            vci: Some(0.5),
            nc1: Some(2.0),
            ..Default::default()
        };
        let json = serde_json::to_value(ResultJson(&r)).unwrap();
        let header = csv_header();
        let header: Vec<&str> = header.split(',').collect();
        for m in METRICS {
            assert_eq!(json[m.name].as_f64(), (m.get)(&r), "{}", m.name);
            assert!(header.contains(&m.name), "{}", m.name);
        }
        assert_eq!(
            header.len(),
            CSV_LEADING.len() + METRICS.len() + CSV_TRAILING.len()
        );
    }

    #[test]
    fn csv_quotes_and_leaves_undefined_cells_empty() {
        let r = EpochResult {
            run_id: "r".into(),
            split: "train".into(),
            layer: "penultimate".into(),
            epoch: 3,
            vci: Some(0.1 + 0.2),
            notes: [
                ("nc1".to_owned(), "rank, \"zero\"".to_owned()),
                ("cdnv".to_owned(), "x".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let text = history_csv(&[r]);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(csv_header().as_str()));
        assert_eq!(
            lines.next(),
            Some(
                "r,train,penultimate,3,0,0,0,0.30000000000000004,,,,,,,,,0,0,false,0,0,\
                 \"cdnv: x; nc1: rank, \"\"zero\"\"\""
            )
        );
        assert_eq!(lines.next(), None);
    }
}
