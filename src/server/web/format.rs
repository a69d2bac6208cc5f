//! How runs and epoch results look outside gRPC: the JSON of the HTTP API
//! (and `vcid runs|history --format json`), the CSV of
//! `/api/v1/runs/{run}/history?format=csv` (and `vcid history --format csv`),
//! and [`SERIES`], the one list of per-epoch metrics that can be charted (the
//! web view's selector, `vcid plot --metric`).
//!
//! Pure conversions of the wire types; every number is passed through as the
//! daemon computed it (JSON and CSV print the shortest text that reads back
//! as the same f64). It must not compute or round any metric.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

use crate::proto::{EpochResult, Run};

/// One chartable per-epoch metric of an [`EpochResult`].
#[derive(Clone, Copy, Debug)]
pub struct Series {
    /// The field name (as in the proto, the JSON and the CSV header).
    pub name: &'static str,
    /// Axis label for people.
    pub label: &'static str,
    /// Whether charts default to a logarithmic y axis (metrics that span
    /// orders of magnitude).
    pub log_scale: bool,
    /// The value of an epoch; `None` when undefined (the result's `notes`
    /// say why).
    pub read: fn(&EpochResult) -> Option<f64>,
}

/// Every chartable metric, headline first. The web view's metric selector
/// and `vcid plot --metric` offer exactly these.
pub const SERIES: &[Series] = &[
    Series {
        name: "vci",
        label: "VCI",
        log_scale: false,
        read: |r| r.vci,
    },
    Series {
        name: "linear_probe_mse",
        label: "linear-probe MSE",
        log_scale: false,
        read: |r| r.linear_probe_mse,
    },
    Series {
        name: "nc1",
        label: "NC1",
        log_scale: true,
        read: |r| r.nc1,
    },
    Series {
        name: "cdnv",
        label: "CDNV",
        log_scale: true,
        read: |r| r.cdnv,
    },
    Series {
        name: "class_separation",
        label: "class separation",
        log_scale: false,
        read: |r| r.class_separation,
    },
    Series {
        name: "equinorm",
        label: "equinorm",
        log_scale: false,
        read: |r| r.equinorm,
    },
    Series {
        name: "equiangularity",
        label: "equiangularity",
        log_scale: false,
        read: |r| r.equiangularity,
    },
    Series {
        name: "effective_rank",
        label: "effective rank",
        log_scale: false,
        read: |r| r.effective_rank,
    },
    Series {
        name: "vci_delta",
        label: "VCI change per epoch",
        log_scale: false,
        read: |r| r.vci_delta,
    },
];

/// The [`Series`] called `name`.
pub fn series(name: &str) -> Option<&'static Series> {
    SERIES.iter().find(|s| s.name == name)
}

/// The names of [`SERIES`], comma-separated (for error messages).
pub fn series_names() -> String {
    SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// One epoch result as the JSON of the API: every field of the
/// `EpochResult` message under its proto name and in its order, undefined
/// metrics as `null` with the reason in `notes` (sorted by metric).
#[derive(Debug, Serialize)]
pub struct ResultJson<'a> {
    run_id: &'a str,
    split: &'a str,
    layer: &'a str,
    epoch: u64,
    samples: u64,
    classes_observed: u32,
    feature_dim: u32,
    vci: Option<f64>,
    linear_probe_mse: Option<f64>,
    nc1: Option<f64>,
    cdnv: Option<f64>,
    class_separation: Option<f64>,
    equinorm: Option<f64>,
    equiangularity: Option<f64>,
    effective_rank: Option<f64>,
    vci_delta: Option<f64>,
    rank_total: u32,
    rank_between: u32,
    small_sample: bool,
    notes: BTreeMap<&'a str, &'a str>,
    close_seconds: f64,
    closed_unix_ms: i64,
}

impl<'a> From<&'a EpochResult> for ResultJson<'a> {
    fn from(r: &'a EpochResult) -> Self {
        ResultJson {
            run_id: &r.run_id,
            split: &r.split,
            layer: &r.layer,
            epoch: r.epoch,
            samples: r.samples,
            classes_observed: r.classes_observed,
            feature_dim: r.feature_dim,
            vci: r.vci,
            linear_probe_mse: r.linear_probe_mse,
            nc1: r.nc1,
            cdnv: r.cdnv,
            class_separation: r.class_separation,
            equinorm: r.equinorm,
            equiangularity: r.equiangularity,
            effective_rank: r.effective_rank,
            vci_delta: r.vci_delta,
            rank_total: r.rank_total,
            rank_between: r.rank_between,
            small_sample: r.small_sample,
            notes: r
                .notes
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            close_seconds: r.close_seconds,
            closed_unix_ms: r.closed_unix_ms,
        }
    }
}

/// The history document of the API and `vcid history --format json`:
/// `{"run_id": ..., "results": [...]}`.
#[derive(Debug, Serialize)]
pub struct HistoryJson<'a> {
    pub run_id: &'a str,
    pub results: Vec<ResultJson<'a>>,
}

impl<'a> HistoryJson<'a> {
    pub fn new(run_id: &'a str, results: &'a [EpochResult]) -> Self {
        HistoryJson {
            run_id,
            results: results.iter().map(ResultJson::from).collect(),
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

/// The CSV header of [`history_csv`].
pub const CSV_HEADER: &str = "run_id,split,layer,epoch,samples,classes_observed,feature_dim,\
vci,linear_probe_mse,nc1,cdnv,class_separation,equinorm,equiangularity,effective_rank,vci_delta,\
rank_total,rank_between,small_sample,close_seconds,closed_unix_ms,notes";

/// Epoch results as CSV (RFC 4180, `\n` line ends): one row per result in
/// the given order, an empty cell for an undefined metric, `notes` as
/// `metric: reason` pairs joined by `; ` (sorted by metric).
pub fn history_csv(results: &[EpochResult]) -> String {
    let mut out = String::with_capacity(64 + results.len() * 256);
    out.push_str(CSV_HEADER);
    out.push('\n');
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in results {
        let mut notes: Vec<(&String, &String)> = r.notes.iter().collect();
        notes.sort();
        let notes: Vec<String> = notes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_cell(&r.run_id),
            csv_cell(&r.split),
            csv_cell(&r.layer),
            r.epoch,
            r.samples,
            r.classes_observed,
            r.feature_dim,
            opt(r.vci),
            opt(r.linear_probe_mse),
            opt(r.nc1),
            opt(r.cdnv),
            opt(r.class_separation),
            opt(r.equinorm),
            opt(r.equiangularity),
            opt(r.effective_rank),
            opt(r.vci_delta),
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
    fn series_read_their_own_field() {
        let r = EpochResult {
            vci: Some(0.5),
            nc1: Some(2.0),
            vci_delta: Some(-0.25),
            ..Default::default()
        };
        let by_name = |n: &str| (series(n).expect(n).read)(&r);
        assert_eq!(by_name("vci"), Some(0.5));
        assert_eq!(by_name("nc1"), Some(2.0));
        assert_eq!(by_name("vci_delta"), Some(-0.25));
        assert_eq!(by_name("cdnv"), None);
        assert!(series("nope").is_none());
        // Every chartable metric is a JSON field and a CSV column.
        let json = serde_json::to_value(ResultJson::from(&r)).unwrap();
        let header: Vec<&str> = CSV_HEADER.split(',').collect();
        for s in SERIES {
            assert!(json.get(s.name).is_some(), "{}", s.name);
            assert!(header.contains(&s.name), "{}", s.name);
        }
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
        assert_eq!(lines.next(), Some(CSV_HEADER));
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
