//! Prometheus export (SPEC §4): the daemon's own counters and a custom
//! collector that renders per-run and per-stream series from daemon state
//! at scrape time.
//!
//! Rendering from state means a deleted run's series vanish with no
//! bookkeeping, and an undefined metric is simply not emitted (absent, never
//! NaN). Owns metric names, help texts and label sanitising; it must not
//! change daemon state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::proto::EpochResult;

use super::error::ServerError;
use super::state::State;

/// Per-stream gauges: name, help, and how to read the value from a result.
type StreamGauge = (&'static str, &'static str, fn(&EpochResult) -> Option<f64>);

const STREAM_GAUGES: &[StreamGauge] = &[
    (
        "vcid_vci",
        "Variability Collapse Index of the latest closed epoch (0 = complete collapse).",
        |r| r.vci,
    ),
    (
        "vcid_linear_probe_mse",
        "MSE of the best affine probe to one-hot labels, latest closed epoch.",
        |r| r.linear_probe_mse,
    ),
    (
        "vcid_nc1",
        "NC1 = Tr(Sigma_W Sigma_B^+)/K of the latest closed epoch.",
        |r| r.nc1,
    ),
    (
        "vcid_cdnv",
        "Class-distance normalized variance of the latest closed epoch.",
        |r| r.cdnv,
    ),
    (
        "vcid_class_separation",
        "R^2 class separation (cosine distance) of the latest closed epoch.",
        |r| r.class_separation,
    ),
    (
        "vcid_equinorm",
        "Coefficient of variation of centred class-mean norms, latest closed epoch.",
        |r| r.equinorm,
    ),
    (
        "vcid_equiangularity",
        "Std of pairwise cosines of centred class means, latest closed epoch.",
        |r| r.equiangularity,
    ),
    (
        "vcid_effective_rank",
        "Effective rank of the centred features of the latest closed epoch.",
        |r| r.effective_rank,
    ),
    (
        "vcid_vci_delta",
        "VCI of the latest closed epoch minus that of the previous closed epoch.",
        |r| r.vci_delta,
    ),
    ("vcid_epoch", "Number of the latest closed epoch.", |r| {
        Some(r.epoch as f64)
    }),
    (
        "vcid_epoch_samples",
        "Samples in the latest closed epoch.",
        |r| Some(r.samples as f64),
    ),
    (
        "vcid_epoch_close_timestamp_seconds",
        "Unix time the latest epoch was closed.",
        |r| Some(r.closed_unix_ms as f64 / 1000.0),
    ),
];

/// 1 for a run marked finished (FinishRun), 0 otherwise: stall alerts
/// ignore finished runs with `unless on (run) vcid_run_finished == 1`.
const RUN_FINISHED: (&str, &str) = (
    "vcid_run_finished",
    "1 if the run was marked finished (FinishRun): it takes no more data.",
);

/// The daemon's metrics registry.
pub struct Telemetry {
    registry: Registry,
    rejected: IntCounterVec,
    ingest_bytes: IntCounter,
    close_duration: Histogram,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

fn prom_err(err: prometheus::Error) -> ServerError {
    ServerError::Internal(format!("prometheus registry: {err}"))
}

impl Telemetry {
    /// Registers the daemon counters and the state collector.
    pub fn new(state: Arc<State>) -> Result<Telemetry, ServerError> {
        let registry = Registry::new();
        let rejected = IntCounterVec::new(
            Opts::new(
                "vcid_batches_rejected_total",
                "Feature batches and stats blocks rejected, by reason.",
            ),
            &["reason"],
        )
        .map_err(prom_err)?;
        for reason in ServerError::REASONS {
            rejected.with_label_values(&[*reason]);
        }
        let ingest_bytes = IntCounter::new(
            "vcid_ingest_bytes_total",
            "Bytes of FeatureBatch and StatsBlock messages received.",
        )
        .map_err(prom_err)?;
        let close_duration = Histogram::with_opts(
            HistogramOpts::new(
                "vcid_epoch_close_duration_seconds",
                "Wall time of closing an epoch: metrics plus the durable write.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .map_err(prom_err)?;
        registry
            .register(Box::new(rejected.clone()))
            .map_err(prom_err)?;
        registry
            .register(Box::new(ingest_bytes.clone()))
            .map_err(prom_err)?;
        registry
            .register(Box::new(close_duration.clone()))
            .map_err(prom_err)?;
        registry
            .register(Box::new(StateCollector::new(state)?))
            .map_err(prom_err)?;
        Ok(Telemetry {
            registry,
            rejected,
            ingest_bytes,
            close_duration,
        })
    }

    /// Counts one rejected batch.
    pub fn reject(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Counts received message bytes.
    pub fn ingest_bytes(&self, bytes: usize) {
        self.ingest_bytes.inc_by(bytes as u64);
    }

    /// Records one epoch close.
    pub fn observe_close(&self, seconds: f64) {
        self.close_duration.observe(seconds);
    }

    /// The text exposition format of everything.
    pub fn render(&self) -> Result<String, ServerError> {
        let families = self.registry.gather();
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&families, &mut out)
            .map_err(prom_err)?;
        String::from_utf8(out).map_err(|e| ServerError::Internal(e.to_string()))
    }
}

/// Turns a metadata key into a valid Prometheus label name
/// (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`).
pub fn sanitize_label(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    if name.starts_with("__") {
        name = format!("meta{name}");
    }
    name
}

/// Metadata as label pairs: sanitised, never `run` (that one is
/// `meta_run`), collisions made unique with `_2`, `_3`, … in key order.
pub fn metadata_labels(metadata: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut used: BTreeSet<String> = BTreeSet::from(["run".to_owned()]);
    let mut out = Vec::with_capacity(metadata.len());
    for (key, value) in metadata {
        let base = sanitize_label(key);
        let base = if base == "run" {
            "meta_run".to_owned()
        } else {
            base
        };
        let mut name = base.clone();
        let mut n = 2;
        while used.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        used.insert(name.clone());
        out.push((name, value.clone()));
    }
    out
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

fn gauge_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    let mut metric = Metric::default();
    metric.set_label(labels);
    metric.set_gauge(gauge);
    metric
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_owned());
    mf.set_help(help.to_owned());
    mf.set_field_type(kind);
    mf.set_metric(metrics);
    mf
}

/// Renders run, stream and budget series from [`State`] at scrape time.
struct StateCollector {
    state: Arc<State>,
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new(state: Arc<State>) -> Result<StateCollector, ServerError> {
        let stream_labels = vec!["run".to_owned(), "split".to_owned(), "layer".to_owned()];
        let mut descs = Vec::new();
        for (name, help, _) in STREAM_GAUGES {
            descs.push(
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    stream_labels.clone(),
                    Default::default(),
                )
                .map_err(prom_err)?,
            );
        }
        for (name, help, labels) in [
            (
                "vcid_run_info",
                "Runs with their metadata as labels (value 1).",
                vec!["run".to_owned()],
            ),
            (
                "vcid_rows_ingested_total",
                "Rows folded into a run's accumulators.",
                vec!["run".to_owned()],
            ),
            (RUN_FINISHED.0, RUN_FINISHED.1, vec!["run".to_owned()]),
            ("vcid_runs", "Runs registered in the daemon.", vec![]),
            (
                "vcid_accumulator_bytes",
                "Bytes reserved by open accumulators.",
                vec![],
            ),
            (
                "vcid_build_info",
                "Build of the daemon (value 1).",
                vec!["version".to_owned()],
            ),
        ] {
            descs.push(
                Desc::new(name.to_owned(), help.to_owned(), labels, Default::default())
                    .map_err(prom_err)?,
            );
        }
        Ok(StateCollector { state, descs })
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let runs = self.state.list();
        let mut out = Vec::new();

        let mut info = Vec::with_capacity(runs.len());
        let mut rows = Vec::with_capacity(runs.len());
        let mut finished = Vec::with_capacity(runs.len());
        let mut per_gauge: Vec<Vec<Metric>> = vec![Vec::new(); STREAM_GAUGES.len()];
        for run in &runs {
            let id = run.info.run_id.as_str();
            let mut labels = vec![label("run", id)];
            labels.extend(
                metadata_labels(&run.info.metadata)
                    .iter()
                    .map(|(k, v)| label(k, v)),
            );
            info.push(gauge_metric(labels, 1.0));
            let mut counter = Counter::default();
            counter.set_value(run.rows_ingested() as f64);
            let mut metric = Metric::default();
            metric.set_label(vec![label("run", id)]);
            metric.set_counter(counter);
            rows.push(metric);
            let done = f64::from(u8::from(run.finished_unix_ms().is_some()));
            finished.push(gauge_metric(vec![label("run", id)], done));
            for result in run.latest_results() {
                let labels = vec![
                    label("run", id),
                    label("split", &result.split),
                    label("layer", &result.layer),
                ];
                for (slot, (_, _, read)) in per_gauge.iter_mut().zip(STREAM_GAUGES) {
                    if let Some(value) = read(&result).filter(|v| v.is_finite()) {
                        slot.push(gauge_metric(labels.clone(), value));
                    }
                }
            }
        }
        // The text encoder rejects families without samples, and an empty
        // family says nothing: skip them.
        for ((name, help, _), metrics) in STREAM_GAUGES.iter().zip(per_gauge) {
            if !metrics.is_empty() {
                out.push(family(name, help, MetricType::GAUGE, metrics));
            }
        }
        if !info.is_empty() {
            out.push(family(
                "vcid_run_info",
                "Runs with their metadata as labels (value 1).",
                MetricType::GAUGE,
                info,
            ));
            out.push(family(
                "vcid_rows_ingested_total",
                "Rows folded into a run's accumulators.",
                MetricType::COUNTER,
                rows,
            ));
            out.push(family(
                RUN_FINISHED.0,
                RUN_FINISHED.1,
                MetricType::GAUGE,
                finished,
            ));
        }
        out.push(family(
            "vcid_runs",
            "Runs registered in the daemon.",
            MetricType::GAUGE,
            vec![gauge_metric(vec![], runs.len() as f64)],
        ));
        out.push(family(
            "vcid_accumulator_bytes",
            "Bytes reserved by open accumulators.",
            MetricType::GAUGE,
            vec![gauge_metric(vec![], self.state.budget.used() as f64)],
        ));
        out.push(family(
            "vcid_build_info",
            "Build of the daemon (value 1).",
            MetricType::GAUGE,
            vec![gauge_metric(
                vec![label("version", env!("CARGO_PKG_VERSION"))],
                1.0,
            )],
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sanitised_without_clobbering_run() {
        let meta: BTreeMap<String, String> = [
            ("run", "x"),
            ("model-name", "resnet"),
            ("model_name", "vit"),
            ("9lives", "cat"),
            ("__secret", "s"),
            ("", "empty"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let labels = metadata_labels(&meta);
        let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "_",
                "_9lives",
                "meta__secret",
                "model_name",
                "model_name_2",
                "meta_run"
            ]
        );
        let valid = |n: &str| {
            n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with("__")
        };
        assert!(names.iter().all(|n| valid(n)), "{names:?}");
    }
}
