"""End to end: training-script client -> `vcid serve` -> real Prometheus
running the shipped rules -> the Grafana dashboard's queries.

One module-scoped stack (daemon, Prometheus with 1 s scrape and rule
intervals, one run fed four epochs of train and val features) is shared by
the tests below; the last test stops the daemon on purpose.

The features are built so the outcome is known in advance: three classes
whose means form an equilateral triangle (between-class covariance = I in
that plane, rotated into d = 8 and shifted by a large offset), plus isotropic
noise of standard deviation sigma, so VCI ~= sigma^2 / (sigma^2 + 1). The
train split's sigma shrinks every epoch (VCI ~0.9 -> 0.6 -> 0.3 -> 0.01:
collapse, falling fast, gap to val widening); val keeps sigma = 3 (VCI ~0.9).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import grpc
import numpy as np
import pytest
import yaml

import vcid
from vcid.v1 import vcid_pb2 as pb
from vcid.v1 import vcid_pb2_grpc as pb_grpc

from e2e_stack import (DASHBOARD, RULE_FILES, Daemon, Prometheus, http_get, require_tool,
                       wait_until)

RUN = "e2e-collapse"
K, D = 3, 8
PER_CLASS = 200
TRAIN_SIGMAS = [3.0, 1.22, 0.655, 0.1]
VAL_SIGMA = 3.0
SPLITS = ("train", "val")
LAYER = "penultimate"

# Per-stream gauges of SPEC §4 and the EpochResult field each one exports.
STREAM_METRICS = {
    "vcid_vci": "vci",
    "vcid_linear_probe_mse": "linear_probe_mse",
    "vcid_nc1": "nc1",
    "vcid_cdnv": "cdnv",
    "vcid_class_separation": "class_separation",
    "vcid_equinorm": "equinorm",
    "vcid_equiangularity": "equiangularity",
    "vcid_effective_rank": "effective_rank",
    "vcid_vci_delta": "vci_delta",
    "vcid_epoch": "epoch",
    "vcid_epoch_samples": "samples",
}


def class_means(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    angles = 2 * np.pi * np.arange(K) / K
    plane = np.zeros((K, D))
    plane[:, 0] = np.sqrt(2) * np.cos(angles)
    plane[:, 1] = np.sqrt(2) * np.sin(angles)
    rotation, _ = np.linalg.qr(rng.standard_normal((D, D)))
    offset = 5.0 + rng.standard_normal(D)
    return plane @ rotation.T + offset, rotation


def make_split(rng: np.random.Generator, means: np.ndarray, sigma: float):
    labels = np.repeat(np.arange(K), PER_CLASS)
    feats = means[labels] + sigma * rng.standard_normal((labels.size, D))
    order = rng.permutation(labels.size)
    return feats[order].astype(np.float32), labels[order].astype(np.int64)


@dataclass
class Fed:
    """What the feeding fixture saw: CloseEpoch results and, right after
    each close, the per-stream series Prometheus had scraped."""

    start: float
    results: Dict[Tuple[str, int], vcid.EpochResult] = field(default_factory=dict)
    observed: Dict[Tuple[str, int], Dict[str, float]] = field(default_factory=dict)
    rejection: Tuple[Any, str] = (None, "")


def stream_series(prom: Prometheus, split: str) -> Dict[str, float]:
    result = prom.query(
        f'{{__name__=~"vcid_.*", job="vcid", run="{RUN}", split="{split}", layer="{LAYER}"}}')
    return {s["metric"]["__name__"]: float(s["value"][1]) for s in result}


@pytest.fixture(scope="module")
def fed(daemon: Daemon, prometheus: Prometheus) -> Fed:
    """Feeds four epochs of train and val through the Python client. After
    every epoch it waits until Prometheus has scraped both closes and the
    recording rules have seen them, so every epoch leaves a trace in the TSDB
    (the gap and falling-fast rules look back over time)."""
    rng = np.random.default_rng(20230607)
    means, _ = class_means(rng)
    fed = Fed(start=time.time())
    with vcid.Monitor(run=RUN, num_classes=K, feature_dim=D, address=daemon.grpc_addr,
                      metadata={"model": "e2e-mlp", "dataset": "synthetic-simplex"}) as mon:
        for epoch, train_sigma in enumerate(TRAIN_SIGMAS):
            for split, sigma in (("train", train_sigma), ("val", VAL_SIGMA)):
                feats, labels = make_split(rng, means, sigma)
                for chunk in np.array_split(np.arange(labels.size), 4):
                    mon.push(feats[chunk], labels[chunk], epoch=epoch, split=split)
                fed.results[(split, epoch)] = mon.close_epoch(epoch, split=split)

            def scraped(epoch: int = epoch) -> bool:
                rows = prometheus.query(f'vcid_epoch{{job="vcid", run="{RUN}"}}')
                return len(rows) == 2 and all(float(r["value"][1]) == epoch for r in rows)

            wait_until(f"Prometheus to scrape epoch {epoch}", scraped)
            for split in SPLITS:
                fed.observed[(split, epoch)] = stream_series(prometheus, split)
            gap = fed.results[("val", epoch)].vci - fed.results[("train", epoch)].vci

            def recorded(gap: float = gap) -> bool:
                v = prometheus.value(f'vcid:vci_val_minus_train{{job="vcid", run="{RUN}"}}')
                return v is not None and abs(v - gap) < 1e-9

            wait_until(f"the gap rule to record epoch {epoch}", recorded)

    # One batch the daemon must reject (label 7 >= K = 3), sent with the raw
    # stubs because the client refuses it before sending.
    channel = grpc.insecure_channel(daemon.grpc_addr)
    try:
        bad = pb.FeatureBatch(run_id=RUN, split="train", layer=LAYER, epoch=len(TRAIN_SIGMAS),
                              rows=1, features=np.zeros(D, "<f4").tobytes(), labels=[7])
        try:
            pb_grpc.VciMonitorStub(channel).Push(iter([bad]), timeout=10)
        except grpc.RpcError as err:
            fed.rejection = (err.code(), err.details() or "")
    finally:
        channel.close()
    return fed


def test_feature_design_gives_the_intended_collapse_curve(fed: Fed) -> None:
    """Guards the assumptions the alert test relies on."""
    train = [fed.results[("train", e)].vci for e in range(len(TRAIN_SIGMAS))]
    val = [fed.results[("val", e)].vci for e in range(len(TRAIN_SIGMAS))]
    expected = [s * s / (s * s + 1) for s in TRAIN_SIGMAS]
    assert np.allclose(train, expected, atol=0.05), (train, expected)
    assert all(b - a < -0.15 for a, b in zip(train, train[1:])), train
    assert train[-1] < 0.05
    assert all(abs(v - 0.9) < 0.05 for v in val), val


def test_vcid_vci_in_prometheus_equals_close_epoch_result(fed: Fed) -> None:
    for (split, epoch), result in sorted(fed.results.items()):
        seen = fed.observed[(split, epoch)]
        assert seen.get("vcid_epoch") == epoch
        # Exact: f64 -> text exposition -> Prometheus float64 -> JSON string
        # round-trips without loss.
        assert seen.get("vcid_vci") == result.vci, (split, epoch, seen.get("vcid_vci"), result.vci)


def test_every_stream_gauge_matches_the_latest_result(fed: Fed, prometheus: Prometheus) -> None:
    last = len(TRAIN_SIGMAS) - 1
    for split in SPLITS:
        result = fed.results[(split, last)]
        seen = fed.observed[(split, last)]
        for name, attr in STREAM_METRICS.items():
            expected = getattr(result, attr)
            assert expected is not None, f"{attr} undefined for {split}: {result.notes}"
            assert seen.get(name) == float(expected), (split, name, seen.get(name), expected)
        assert seen["vcid_epoch_close_timestamp_seconds"] == result.closed_unix_ms / 1000.0
    rows = prometheus.value(f'vcid_rows_ingested_total{{job="vcid", run="{RUN}"}}')
    assert rows == len(SPLITS) * len(TRAIN_SIGMAS) * K * PER_CLASS
    (info,) = prometheus.query(f'vcid_run_info{{job="vcid", run="{RUN}"}}')
    assert info["metric"]["model"] == "e2e-mlp"
    assert info["metric"]["dataset"] == "synthetic-simplex"


def test_rejected_batch_is_counted(fed: Fed, prometheus: Prometheus) -> None:
    code, details = fed.rejection
    assert code == grpc.StatusCode.INVALID_ARGUMENT, fed.rejection
    assert "label" in details, details
    wait_until("vcid_batches_rejected_total{reason=invalid_argument} = 1", lambda: prometheus.value(
        'vcid_batches_rejected_total{job="vcid", reason="invalid_argument"}') == 1.0)


def rule_file_rules() -> List[Dict[str, Any]]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                rules.append({**rule, "group": group["name"], "file": path.name})
    return rules


def test_shipped_rules_are_loaded_and_healthy(fed: Fed, prometheus: Prometheus) -> None:
    expected = rule_file_rules()

    def all_evaluated():
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if len(rules) != len(expected) or any(
                r["lastEvaluation"].startswith("0001-") for r in rules):
            return None
        return groups

    groups = wait_until("every rule to be evaluated", all_evaluated)
    assert sorted(g["name"] for g in groups) == sorted({r["group"] for r in expected})
    loaded = [(g["name"], r.get("name")) for g in groups for r in g["rules"]]
    wanted = [(r["group"], r.get("alert") or r.get("record")) for r in expected]
    assert sorted(loaded) == sorted(wanted)
    for g in groups:
        assert g["file"].endswith(tuple(p.name for p in RULE_FILES)), g["file"]
        for r in g["rules"]:
            assert r["health"] == "ok" and not r.get("lastError"), (g["name"], r)


def test_every_rule_expression_evaluates(fed: Fed, prometheus: Prometheus) -> None:
    for rule in rule_file_rules():
        prometheus.query(rule["expr"])  # raises, naming the expression, on error
    # The per-run threshold resolution yields the shipped defaults for the run.
    for alert, default in [("VcidTrainVciCollapsed", 0.05), ("VcidVciFallingFast", 0.1),
                           ("VcidTrainValGapWidening", 0.1), ("VcidEpochsStalled", 7200)]:
        assert prometheus.value(
            f'vcid:alert_threshold:by_run{{alert="{alert}", run="{RUN}"}}') == default


# Values for the dashboard's template variables, formatted as Grafana does
# for a Prometheus data source (multi-value -> regex alternation).
GRAFANA_VARS = {
    "run": RUN,
    "split": "(train|val)",
    "layer": LAYER,
    "__rate_interval": "5s",
    "__interval": "1s",
    "__range": "60s",
    "__range_s": "60",
    "__interval_ms": "1000",
}


def substitute(expr: str) -> str:
    def repl(m: "re.Match[str]") -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARS, f"unknown dashboard variable ${name} in {expr!r}"
        return GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def dashboard_targets() -> List[Tuple[str, Dict[str, Any]]]:
    board = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels: List[Dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p["title"], t))

    walk(board["panels"])
    return out


def test_every_dashboard_query_evaluates_and_has_data(fed: Fed, prometheus: Prometheus) -> None:
    targets = dashboard_targets()
    assert len(targets) >= 20
    end = time.time()
    for title, target in targets:
        expr = substitute(target["expr"])
        if target.get("instant"):
            result = prometheus.query(expr)
        else:
            answer = prometheus.api("query_range", {
                "query": expr, "start": f"{fed.start:.3f}", "end": f"{end:.3f}", "step": "1"})
            assert answer["status"] == "success", (title, expr, answer.get("error"))
            result = answer["data"]["result"]
        # Every panel shows something for this run: catches metric and label
        # names that the daemon does not export.
        assert result, f"panel {title!r}: {expr!r} returned no series"


def test_dashboard_variables_list_the_run(fed: Fed, prometheus: Prometheus) -> None:
    board = json.loads(DASHBOARD.read_text())
    found = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        selector, label = substitute(m.group(1)), m.group(2)
        found[var["name"]] = {s["metric"][label] for s in prometheus.query(selector)}
    assert found == {"run": {RUN}, "split": set(SPLITS), "layer": {LAYER}}


def active_alerts(prometheus: Prometheus) -> List[Dict[str, Any]]:
    return [a for a in prometheus.api("alerts")["data"]["alerts"]
            if a["labels"].get("job") in ("vcid", None)]


def test_alerts_go_pending_on_a_collapsing_run(fed: Fed, prometheus: Prometheus) -> None:
    """The shipped rules, evaluated by a real Prometheus on the daemon's real
    output: the designed collapse trips exactly the training alerts it should
    (pending, since their `for:` is minutes), and the rejected batch trips
    VcidBatchesRejected."""
    expected = {
        ("VcidTrainVciCollapsed", "train"),
        ("VcidVciFallingFast", "train"),
        ("VcidTrainValGapWidening", None),
        ("VcidBatchesRejected", None),
    }

    def keys():
        alerts = active_alerts(prometheus)
        got = {(a["labels"]["alertname"], a["labels"].get("split")) for a in alerts}
        return alerts if expected <= got else None

    alerts = wait_until("the expected alerts to become active", keys, timeout=30)
    got = {(a["labels"]["alertname"], a["labels"].get("split")) for a in alerts}
    assert got == expected, got  # nothing else: not val, not stalled, not down
    for a in alerts:
        assert a["state"] == "pending", a
        name, labels, ann = a["labels"]["alertname"], a["labels"], a["annotations"]
        assert labels["severity"] == "warning"
        assert ann["runbook_url"] == f"deploy/README.md#{name.lower()}"
        if name == "VcidBatchesRejected":
            assert labels["reason"] == "invalid_argument"
            continue
        assert labels["run"] == RUN and labels["layer"] == LAYER
        assert RUN in ann["summary"] and RUN in ann["description"]
        assert LAYER in ann["description"]
    by_name = {a["labels"]["alertname"]: a for a in alerts}
    # The threshold in the text comes from a `query` template: it must render.
    assert "below the collapse threshold 0.05." in by_name["VcidTrainVciCollapsed"]["annotations"]["description"]
    assert "(threshold 0.1)" in by_name["VcidTrainValGapWidening"]["annotations"]["description"]
    assert "a drop of 0.1 per epoch" in by_name["VcidVciFallingFast"]["annotations"]["description"]
    collapsed = float(by_name["VcidTrainVciCollapsed"]["value"])
    assert collapsed == fed.results[("train", len(TRAIN_SIGMAS) - 1)].vci


def test_kubernetes_relabelling_finds_the_pod(fed: Fed, prometheus: Prometheus,
                                              daemon: Daemon) -> None:
    """prometheus-kubernetes.yml's relabelling, run by Prometheus on the meta
    labels of a deploy/k8s/deployment.yaml pod (see conftest), scrapes the
    annotated port and path and labels the series with namespace and pod."""
    def k8s_target():
        targets = prometheus.api("targets")["data"]["activeTargets"]
        sims = [t for t in targets if t["labels"].get("job") == "vcid-k8s-sim"]
        return sims if sims and sims[0]["health"] == "up" else None

    (target,) = wait_until("the simulated Kubernetes target to be up", k8s_target)
    assert target["scrapeUrl"] == f"http://{daemon.http_addr}/metrics"
    assert target["labels"]["namespace"] == "ml-monitoring"
    assert target["labels"]["pod"] == "vcid-7d9f8b6c5-x2x9q"
    assert not any(k.startswith("__") for k in target["labels"])
    v = prometheus.value(
        f'vcid_vci{{job="vcid-k8s-sim", run="{RUN}", split="train"}}')
    assert v == fed.results[("train", len(TRAIN_SIGMAS) - 1)].vci


def test_metrics_output_passes_promtool_check_metrics(fed: Fed, daemon: Daemon) -> None:
    """SPEC §4: `promtool check metrics` accepts the exposition, with a run,
    its streams and its metadata labels present."""
    status, body = http_get(daemon.metrics_url)
    assert status == 200 and f'vcid_vci{{run="{RUN}"' in body, body[:2000]
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_daemon_down_alert_after_graceful_stop(fed: Fed, prometheus: Prometheus,
                                               daemon: Daemon) -> None:
    """Runs last in this module: SIGTERM stops the daemon cleanly (exit 0),
    Prometheus then sees up == 0 and VcidDaemonDown becomes active."""
    assert daemon.process.stop(timeout=30) == 0, daemon.process.log_tail()
    wait_until("up{job=vcid} == 0", lambda: prometheus.value('up{job="vcid"}') == 0.0)

    def down():
        return [a for a in active_alerts(prometheus)
                if a["labels"]["alertname"] == "VcidDaemonDown"] or None

    (alert,) = wait_until("VcidDaemonDown to become active", down)
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["instance"] == daemon.http_addr
    assert daemon.http_addr in alert["annotations"]["description"]
    assert not math.isnan(float(alert["value"]))
