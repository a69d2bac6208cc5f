//! The metric registry: one table describing every per-epoch quantity vcid
//! reports (name, Prometheus help, unit, range, direction, `vcid history`
//! column and how to read it), from which the Prometheus exporter, the
//! command line, the conversion to the wire `EpochResult` and the metric
//! table of `docs/metrics.md` are all produced.
//!
//! Owns descriptions and accessors only: no computation (that is
//! [`compute`](super::compute)), no I/O. A new metric is one row of
//! [`METRICS`] plus its field in [`EpochMetrics`] and in the proto's
//! `EpochResult`; `tests/metric_registry.rs` fails until the three, the
//! exporter, the command line and `docs/metrics.md` agree.

use std::fmt::Write as _;

use super::EpochMetrics;
use crate::proto::EpochResult;

/// Where a metric's value comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The epoch's own statistics: set by [`compute`](super::compute).
    Epoch(fn(&EpochMetrics) -> Option<f64>),
    /// The change from the stream's previous closed epoch (`vci_delta`):
    /// set by the daemon, which holds the history. Shown with its sign.
    Change,
}

/// One metric of a closed epoch: an `optional double` of `EpochResult`,
/// absent (with the reason in `notes`) when undefined.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// The name everywhere: field of `EpochResult` and [`EpochMetrics`],
    /// JSON key, key of `notes`, section of `docs/metrics.md`; exported as
    /// `vcid_<name>`.
    pub name: &'static str,
    /// What it measures, in one line of ASCII (Prometheus HELP, docs).
    pub help: &'static str,
    /// Unit of the value.
    pub unit: &'static str,
    /// Values it can take.
    pub range: &'static str,
    /// Which way means more collapse.
    pub direction: &'static str,
    /// Header of its column in `vcid history`.
    pub column: &'static str,
    /// Axis label for people (the web view's selector, `vcid plot`).
    pub label: &'static str,
    /// Whether charts default to a logarithmic y axis (metrics that span
    /// orders of magnitude).
    pub log_scale: bool,
    /// Where the value comes from.
    pub source: Source,
    /// Reads it from a result.
    pub get: fn(&EpochResult) -> Option<f64>,
    /// Writes it into a result.
    pub set: fn(&mut EpochResult, Option<f64>),
}

impl Metric {
    /// The Prometheus series, `vcid_<name>`.
    pub fn series(&self) -> String {
        format!("vcid_{}", self.name)
    }

    /// The Prometheus HELP text of the series.
    pub fn prometheus_help(&self) -> String {
        format!("{}, latest closed epoch ({}).", self.help, self.direction)
    }

    /// Its value in one epoch's statistics, unless it needs the history.
    pub fn of_epoch(&self, metrics: &EpochMetrics) -> Option<f64> {
        match self.source {
            Source::Epoch(read) => read(metrics),
            Source::Change => None,
        }
    }
}

/// Every metric, in the order of `EpochResult`'s fields.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "vci",
        help: "Variability Collapse Index",
        unit: "ratio",
        range: "[0, 1]",
        direction: "lower = more collapsed; 0 = complete collapse",
        column: "VCI",
        label: "VCI",
        log_scale: false,
        source: Source::Epoch(|m| m.vci),
        get: |r| r.vci,
        set: |r, v| r.vci = v,
    },
    Metric {
        name: "linear_probe_mse",
        help: "Mean squared error of the best affine probe from the features to the one-hot labels",
        unit: "squared error",
        range: "[0, 1 − Σ_k p_k²]",
        direction: "lower = more collapsed",
        column: "PROBE_MSE",
        label: "linear-probe MSE",
        log_scale: false,
        source: Source::Epoch(|m| m.linear_probe_mse),
        get: |r| r.linear_probe_mse,
        set: |r, v| r.linear_probe_mse = v,
    },
    Metric {
        name: "nc1",
        help: "Within-class covariance relative to between-class covariance (NC1)",
        unit: "ratio",
        range: "≥ 0",
        direction: "lower = more collapsed",
        column: "NC1",
        label: "NC1",
        log_scale: true,
        source: Source::Epoch(|m| m.nc1),
        get: |r| r.nc1,
        set: |r, v| r.nc1 = v,
    },
    Metric {
        name: "cdnv",
        help: "Class-distance normalised variance, mean over class pairs",
        unit: "ratio",
        range: "≥ 0",
        direction: "lower = more collapsed",
        column: "CDNV",
        label: "CDNV",
        log_scale: true,
        source: Source::Epoch(|m| m.cdnv),
        get: |r| r.cdnv,
        set: |r, v| r.cdnv = v,
    },
    Metric {
        name: "class_separation",
        help: "R^2 class separation with cosine distance",
        unit: "ratio",
        range: "[0, 1]",
        direction: "higher = more collapsed",
        column: "CLASS_SEP",
        label: "class separation",
        log_scale: false,
        source: Source::Epoch(|m| m.class_separation),
        get: |r| r.class_separation,
        set: |r, v| r.class_separation = v,
    },
    Metric {
        name: "equinorm",
        help: "Coefficient of variation of the norms of the centred class means (NC2)",
        unit: "ratio",
        range: "≥ 0",
        direction: "lower = closer to equal norms",
        column: "EQUINORM",
        label: "equinorm",
        log_scale: false,
        source: Source::Epoch(|m| m.equinorm),
        get: |r| r.equinorm,
        set: |r, v| r.equinorm = v,
    },
    Metric {
        name: "equiangularity",
        help: "Standard deviation of the cosines between centred class means (NC2)",
        unit: "cosine",
        range: "[0, 1]",
        direction: "lower = closer to equal angles",
        column: "EQUIANG",
        label: "equiangularity",
        log_scale: false,
        source: Source::Epoch(|m| m.equiangularity),
        get: |r| r.equiangularity,
        set: |r, v| r.equiangularity = v,
    },
    Metric {
        name: "effective_rank",
        help: "Effective rank of the centred features",
        unit: "dimensions",
        range: "[1, rank(Σ_T)]",
        direction: "lower = fewer dimensions in use",
        column: "EFF_RANK",
        label: "effective rank",
        log_scale: false,
        source: Source::Epoch(|m| m.effective_rank),
        get: |r| r.effective_rank,
        set: |r, v| r.effective_rank = v,
    },
    Metric {
        name: "vci_delta",
        help: "VCI minus the VCI of the previous closed epoch of the stream",
        unit: "ratio",
        range: "[−1, 1]",
        direction: "negative = collapsing further",
        column: "VCI_DELTA",
        label: "VCI change per epoch",
        log_scale: false,
        source: Source::Change,
        get: |r| r.vci_delta,
        set: |r, v| r.vci_delta = v,
    },
];

/// The metric called `name`.
pub fn metric(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// The names of [`METRICS`], comma-separated (for error messages).
pub fn metric_names() -> String {
    METRICS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The metrics of one epoch's own statistics (all but the changes), the
/// ones [`compute`](super::compute) fills.
pub fn epoch_metrics() -> impl Iterator<Item = &'static Metric> {
    METRICS
        .iter()
        .filter(|m| matches!(m.source, Source::Epoch(_)))
}

/// A per-stream Prometheus series that every closed epoch has.
#[derive(Clone, Copy, Debug)]
pub struct StreamGauge {
    /// The Prometheus series.
    pub series: &'static str,
    /// Its Prometheus HELP text.
    pub help: &'static str,
    /// Unit of the value.
    pub unit: &'static str,
    /// Reads it from a result (always `Some`).
    pub get: fn(&EpochResult) -> Option<f64>,
}

/// The per-stream series beside the metrics, exported after them.
pub const STREAM_GAUGES: &[StreamGauge] = &[
    StreamGauge {
        series: "vcid_epoch",
        help: "Number of the latest closed epoch.",
        unit: "epoch",
        get: |r| Some(r.epoch as f64),
    },
    StreamGauge {
        series: "vcid_epoch_samples",
        help: "Samples in the latest closed epoch.",
        unit: "samples",
        get: |r| Some(r.samples as f64),
    },
    StreamGauge {
        series: "vcid_epoch_close_timestamp_seconds",
        help: "Unix time the latest epoch was closed.",
        unit: "seconds",
        get: |r| Some(r.closed_unix_ms as f64 / 1000.0),
    },
];

/// The metric tables of `docs/metrics.md` (between its
/// `metric-table` markers), rendered from [`METRICS`] and
/// [`STREAM_GAUGES`].
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| metric | what it measures | unit | range | direction | Prometheus | `vcid history` |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for m in METRICS {
        let _ = writeln!(
            out,
            "| [`{name}`](#{name}) | {help} | {unit} | {range} | {direction} | `{series}` | `{column}` |",
            name = m.name,
            help = m.help,
            unit = m.unit,
            range = m.range,
            direction = m.direction,
            series = m.series(),
            column = m.column,
        );
    }
    out.push_str(
        "\nBeside them, every stream with a closed epoch has:\n\n\
         | Prometheus | what it is | unit |\n|---|---|---|\n",
    );
    for g in STREAM_GAUGES {
        let _ = writeln!(out, "| `{}` | {} | {} |", g.series, g.help, g.unit);
    }
    out
}
