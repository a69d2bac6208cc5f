//! Prometheus export (README "Metrics (Prometheus)", `docs/metrics.md`):
//! the daemon's own counters and a custom collector that renders per-run
//! and per-stream series from daemon state at scrape time.
//!
//! Rendering from state means a deleted run's series vanish with no
//! bookkeeping, and an undefined metric is simply not emitted (absent, never
//! NaN). Owns the names and help texts of the daemon and per-run series and
//! label sanitising; the per-stream series come from the metric registry
//! (`metrics::registry`). It must not change daemon state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::metrics::registry::{METRICS, STREAM_GAUGES};
use crate::proto::EpochResult;

use super::error::{Reason, ServerError};
use super::state::State;

/// A per-stream gauge: name, help, and how to read it from a result.
struct StreamSeries {
    name: String,
    help: String,
    read: fn(&EpochResult) -> Option<f64>,
}

/// Every per-stream gauge, from the metric registry: the metrics, then the
/// bookkeeping gauges.
fn stream_series() -> Vec<StreamSeries> {
    let metrics = METRICS.iter().map(|m| StreamSeries {
        name: m.series(),
        help: m.prometheus_help(),
        read: m.get,
    });
    let gauges = STREAM_GAUGES.iter().map(|g| StreamSeries {
        name: g.series.to_owned(),
        help: g.help.to_owned(),
        read: g.get,
    });
    metrics.chain(gauges).collect()
}

/// The daemon's metrics registry.
pub struct Telemetry {
    registry: Registry,
    rejected: IntCounterVec,
    ingest_bytes: IntCounter,
    close_duration: Histogram,
    /// Whether run metadata becomes labels of `vcid_run_info`
    /// (`--metrics-metadata`); shared with the collector.
    metadata_labels: Arc<AtomicBool>,
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
        for reason in Reason::ALL {
            rejected.with_label_values(&[reason.label()]);
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
        let metadata_labels = Arc::new(AtomicBool::new(true));
        registry
            .register(Box::new(StateCollector::new(
                state,
                Arc::clone(&metadata_labels),
            )?))
            .map_err(prom_err)?;
        Ok(Telemetry {
            registry,
            rejected,
            ingest_bytes,
            close_duration,
            metadata_labels,
        })
    }

    /// Whether run metadata becomes labels of `vcid_run_info` (on by
    /// default; `--metrics-metadata=false` keeps it out of `/metrics`).
    pub fn set_metadata_labels(&self, on: bool) {
        self.metadata_labels.store(on, Ordering::Relaxed);
    }

    /// Counts one rejected batch or stats block under its error's reason.
    pub fn reject(&self, err: &ServerError) {
        if let Some(reason) = err.reason() {
            self.rejected.with_label_values(&[reason.label()]).inc();
        }
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

/// A per-run or daemon-wide family the collector renders.
struct StateSeries {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

impl StateSeries {
    fn family(&self, metrics: Vec<Metric>) -> MetricFamily {
        family(self.name, self.help, self.kind, metrics)
    }
}

const RUN_INFO: StateSeries = StateSeries {
    name: "vcid_run_info",
    help: "Runs with their metadata as labels (value 1).",
    kind: MetricType::GAUGE,
    labels: &["run"],
};
const ROWS_INGESTED: StateSeries = StateSeries {
    name: "vcid_rows_ingested_total",
    help: "Rows folded into a run's accumulators.",
    kind: MetricType::COUNTER,
    labels: &["run"],
};
/// 1 for a run marked finished (FinishRun), 0 otherwise: stall alerts
/// ignore finished runs with `unless on (run) (vcid_run_finished == 1)`.
const RUN_FINISHED: StateSeries = StateSeries {
    name: "vcid_run_finished",
    help: "1 if the run was marked finished (FinishRun): it takes no more data.",
    kind: MetricType::GAUGE,
    labels: &["run"],
};
const RUNS: StateSeries = StateSeries {
    name: "vcid_runs",
    help: "Runs registered in the daemon.",
    kind: MetricType::GAUGE,
    labels: &[],
};
const ACCUMULATOR_BYTES: StateSeries = StateSeries {
    name: "vcid_accumulator_bytes",
    help: "Bytes reserved by open accumulators and the fold buffers their shards keep.",
    kind: MetricType::GAUGE,
    labels: &[],
};
const INFLIGHT_BYTES: StateSeries = StateSeries {
    name: "vcid_inflight_bytes",
    help: "Bytes held by request messages in flight (received, decoded, being applied).",
    kind: MetricType::GAUGE,
    labels: &[],
};
const BUILD_INFO: StateSeries = StateSeries {
    name: "vcid_build_info",
    help: "Build of the daemon (value 1).",
    kind: MetricType::GAUGE,
    labels: &["version"],
};
const STATE_SERIES: [StateSeries; 7] = [
    RUN_INFO,
    ROWS_INGESTED,
    RUN_FINISHED,
    RUNS,
    ACCUMULATOR_BYTES,
    INFLIGHT_BYTES,
    BUILD_INFO,
];

/// Renders run, stream and budget series from [`State`] at scrape time.
struct StateCollector {
    state: Arc<State>,
    metadata_labels: Arc<AtomicBool>,
    streams: Vec<StreamSeries>,
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new(
        state: Arc<State>,
        metadata_labels: Arc<AtomicBool>,
    ) -> Result<StateCollector, ServerError> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            let labels = labels.iter().map(|l| (*l).to_owned()).collect();
            Desc::new(name.to_owned(), help.to_owned(), labels, Default::default())
                .map_err(prom_err)
        };
        let streams = stream_series();
        let descs = streams
            .iter()
            .map(|s| desc(&s.name, &s.help, &["run", "split", "layer"]))
            .chain(STATE_SERIES.iter().map(|s| desc(s.name, s.help, s.labels)))
            .collect::<Result<_, _>>()?;
        Ok(StateCollector {
            state,
            metadata_labels,
            streams,
            descs,
        })
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
        let mut per_gauge: Vec<Vec<Metric>> = vec![Vec::new(); self.streams.len()];
        let with_metadata = self.metadata_labels.load(Ordering::Relaxed);
        for run in &runs {
            let id = run.info.run_id.as_str();
            let mut labels = vec![label("run", id)];
            if with_metadata {
                labels.extend(
                    metadata_labels(&run.info.metadata)
                        .iter()
                        .map(|(k, v)| label(k, v)),
                );
            }
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
                for (slot, series) in per_gauge.iter_mut().zip(&self.streams) {
                    if let Some(value) = (series.read)(&result).filter(|v| v.is_finite()) {
                        slot.push(gauge_metric(labels.clone(), value));
                    }
                }
            }
        }
        // The text encoder rejects families without samples, and an empty
        // family says nothing: skip them.
        for (series, metrics) in self.streams.iter().zip(per_gauge) {
            if !metrics.is_empty() {
                out.push(family(
                    &series.name,
                    &series.help,
                    MetricType::GAUGE,
                    metrics,
                ));
            }
        }
        if !info.is_empty() {
            out.push(RUN_INFO.family(info));
            out.push(ROWS_INGESTED.family(rows));
            out.push(RUN_FINISHED.family(finished));
        }
        out.push(RUNS.family(vec![gauge_metric(vec![], runs.len() as f64)]));
        out.push(
            ACCUMULATOR_BYTES.family(vec![gauge_metric(vec![], self.state.budget.used() as f64)]),
        );
        out.push(INFLIGHT_BYTES.family(vec![gauge_metric(
            vec![],
            self.state.inflight.used() as f64,
        )]));
        out.push(BUILD_INFO.family(vec![gauge_metric(
            vec![label("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        )]));
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
