"""Static checks of the files under deploy/ that no running stack exercises:
they agree with each other (ports, labels, probe paths, data directory,
runbook anchors) and with the real `vcid serve` flags, and they pass the
validators available offline (Kubernetes schemas, systemd-analyze,
promtool for the Kubernetes scrape config).

Owns nothing but assertions over deploy/**; starts no server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import yaml

from e2e_stack import DASHBOARD, DEPLOY, PROM_DIR, REPO, RULE_FILES

K8S = DEPLOY / "k8s"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def serve_env_vars(vcid_bin: Path) -> set:
    """The VCID_* variables `vcid serve` reads, from its own --help."""
    out = subprocess.run([str(vcid_bin), "serve", "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    names = set(re.findall(r"\[env: (VCID_[A-Z0-9_]+)", out))
    assert {"VCID_GRPC_ADDR", "VCID_HTTP_ADDR", "VCID_DATA_DIR"} <= names, out
    return names


def used_env_vars(path: Path) -> set:
    return set(re.findall(r"\bVCID_[A-Z0-9_]+", path.read_text()))


@pytest.mark.parametrize("path", [DEPLOY / "systemd" / "vcid.service",
                                  DEPLOY / "docker" / "Dockerfile",
                                  K8S / "deployment.yaml"], ids=lambda p: p.name)
def test_env_vars_are_ones_vcid_serve_reads(path: Path, serve_env_vars: set) -> None:
    used = used_env_vars(path)
    assert used, f"{path} sets no VCID_* variable"
    assert used <= serve_env_vars, f"{path}: unknown to `vcid serve`: {used - serve_env_vars}"


# ---------------------------------------------------------------- Kubernetes

def k8s_docs() -> Dict[str, Dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        doc = load_yaml(path)
        docs[doc["kind"]] = doc
    return docs


def test_kustomization_lists_every_manifest() -> None:
    kust = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_builtin_kinds_pass_strict_schema_validation() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for path in sorted(K8S.glob("*.yaml")):
        doc = load_yaml(path)
        if "." in doc["apiVersion"].split("/")[0]:  # CRDs (PodMonitor, Kustomization)
            continue
        kv.validate(doc, kv.latest_version(), strict=True)


def test_deployment_service_podmonitor_and_pvc_agree() -> None:
    docs = k8s_docs()
    dep, svc, pm, pvc = (docs["Deployment"], docs["Service"], docs["PodMonitor"],
                         docs["PersistentVolumeClaim"])
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}

    # The daemon listens where the ports, probes and annotations say.
    assert env["VCID_GRPC_ADDR"] == f"0.0.0.0:{ports['grpc']}"
    assert env["VCID_HTTP_ADDR"] == f"0.0.0.0:{ports['http']}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(ports["http"])
    assert ann["prometheus.io/path"] == "/metrics"

    # One writer per database: a single replica, replaced not rolled.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    # The data directory is the PVC.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    data_volume = next(n for n, p in mounts.items() if p == env["VCID_DATA_DIR"])
    assert volumes[data_volume]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    # Non-root, read-only root file system, no privilege escalation.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # The Service and the PodMonitor find the pod and its named ports.
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    # job="vcid", which VcidDaemonDown selects.
    assert pod_labels[pm["spec"]["jobLabel"]] == "vcid"


def test_kubernetes_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the check
    runs on a copy whose discovery block is swapped for a static target;
    everything else (relabelling, rule files) is checked as shipped. The
    relabelling itself runs in test_prometheus_stack."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (apt-get install -y prometheus)", pytrace=False)
    config = load_yaml(PROM_DIR / "prometheus-kubernetes.yml")
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    for rule_file in RULE_FILES:
        shutil.copy(rule_file, tmp_path / rule_file.name)
    (tmp_path / "k8s.yml").write_text(yaml.safe_dump(config))
    run = subprocess.run([promtool, "check", "config", str(tmp_path / "k8s.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# ---------------------------------------------------------------- container

def test_dockerfile_runs_vcid_serve_as_the_deployments_user() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"(?m)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text)
    assert len(stages) >= 2, "expected a multi-stage build"
    builder = stages[0][0]
    wanted = re.search(r'rust-version\s*=\s*"(\d+)\.(\d+)"',
                       (REPO / "Cargo.toml").read_text())
    got = re.match(r"rust:(\d+)\.(\d+)", builder)
    assert wanted and got and tuple(map(int, got.groups())) >= tuple(map(int, wanted.groups()))
    final = text[text.rindex("\nFROM "):]
    user = re.search(r"(?m)^USER\s+(\d+)(?::(\d+))?", final)
    assert user and user.group(1) != "0"
    run_as = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert int(user.group(1)) == run_as
    assert re.search(r'(?m)^ENTRYPOINT \["/usr/local/bin/vcid"\]', final)
    assert re.search(r'(?m)^CMD \["serve"\]', final)
    assert re.search(r"(?m)^EXPOSE 50051 9464$", final)


# ---------------------------------------------------------------- systemd

def test_systemd_unit_verifies_and_is_sandboxed(tmp_path: Path, vcid_bin: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "vcid.service").read_text()
    for key in ("DynamicUser=yes", "StateDirectory=vcid", "ProtectSystem=strict",
                "NoNewPrivileges=yes", "Environment=VCID_DATA_DIR=%S/vcid"):
        assert re.search(rf"(?m)^{re.escape(key)}$", unit), key
    # verify insists that ExecStart exists: point it at the built binary.
    local = tmp_path / "vcid.service"
    local.write_text(unit.replace("/usr/local/bin/vcid", str(vcid_bin)))
    run = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                         timeout=60)
    # verify exits 0 on unknown keys and only warns: require silence.
    assert run.returncode == 0 and not (run.stdout + run.stderr).strip(), run.stdout + run.stderr
    sec = subprocess.run([analyze, "security", "--offline=true", str(local)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 2.0, sec.stdout


# ---------------------------------------------------------------- rules

def alerting_rules() -> Iterator[Dict[str, Any]]:
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield {**rule, "group": group["name"]}


def github_anchors(markdown: str) -> set:
    anchors = set()
    for heading in re.findall(r"(?m)^#+\s+(.+?)\s*$", markdown):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_has_for_severity_text_and_a_runbook_section() -> None:
    anchors = github_anchors((DEPLOY / "README.md").read_text())
    rules = list(alerting_rules())
    assert {r["alert"] for r in rules} == {
        "VcidTrainVciCollapsed", "VcidVciFallingFast", "VcidTrainValGapWidening",
        "VcidEpochsStalled", "VcidBatchesRejected", "VcidDaemonDown"}
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        url = ann["runbook_url"]
        assert url == f"deploy/README.md#{name.lower()}", (name, url)
        assert name.lower() in anchors, f"deploy/README.md has no section for {name}"
        # Name the run, split and layer wherever the alert's series has them
        # (the gap alert compares two splits; the stall alert is per run).
        needs = {"VcidTrainVciCollapsed": ("run", "split", "layer"),
                 "VcidVciFallingFast": ("run", "split", "layer"),
                 "VcidTrainValGapWidening": ("run", "layer"),
                 "VcidEpochsStalled": ("run",)}.get(name, ())
        for label in needs:
            assert f"$labels.{label}" in ann["description"], (name, label)


def test_every_threshold_row_belongs_to_an_alert_that_reads_it() -> None:
    alerts = {r["alert"]: r for r in alerting_rules()}
    text = (PROM_DIR / "alerts.yml").read_text()
    (group,) = load_yaml(PROM_DIR / "thresholds.yml")["groups"]
    defaults = [r["labels"]["alert"] for r in group["rules"] if "run" not in r["labels"]]
    assert len(defaults) == len(set(defaults)), "one default row per alert"
    for name in defaults:
        assert name in alerts, f"threshold row for unknown alert {name}"
        assert f'alert="{name}"' in text, f"no rule reads the threshold of {name}"
    for name, rule in alerts.items():
        if "vcid_alert_threshold" in rule["expr"] or "vcid:alert_threshold" in rule["expr"]:
            assert name in defaults, f"{name} reads a threshold that has no default row"


# ---------------------------------------------------------------- Grafana

def board() -> Dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_dashboard_uses_the_datasource_variable_only() -> None:
    b = board()
    refs = list(datasource_refs(b["panels"])) + list(datasource_refs(b["templating"]))
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": "${datasource}"}, ref
    (ds_var,) = [v for v in b["templating"]["list"] if v["name"] == "datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"


def test_dashboard_variables_and_panels() -> None:
    b = board()
    variables = {v["name"]: v for v in b["templating"]["list"]}
    for name in ("run", "split", "layer"):
        q = variables[name]["query"]
        q = q["query"] if isinstance(q, dict) else q
        assert re.fullmatch(rf"label_values\(vcid_vci(\{{.*\}})?, {name}\)", q), q
        assert variables[name]["multi"] and variables[name]["includeAll"]

    panels = [p for p in all_panels(b["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in all_panels(b["panels"])]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needle in ["vcid_vci{", "vcid_linear_probe_mse{", "vcid_nc1{", "vcid_cdnv{",
                   "vcid_class_separation{", "vcid_epoch{",
                   "rate(vcid_rows_ingested_total", "rate(vcid_batches_rejected_total",
                   "histogram_quantile(0.99, sum by (le) (rate(vcid_epoch_close_duration_seconds_bucket",
                   "vcid_accumulator_bytes", "vcid_inflight_bytes"]:
        assert needle in exprs, needle
    for p in panels:
        assert len(p.get("description", "")) >= 40, f"panel {p['title']!r} lacks a description"
        if p["type"] in ("timeseries", "stat"):
            assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"
    # Every panel about a collapse metric says which way is "more collapsed".
    for p in panels:
        if re.search(r"vcid_(vci|linear_probe_mse|nc1|cdnv|class_separation)\{",
                     " ".join(t["expr"] for t in p["targets"])):
            assert re.search(r"MORE COLLAPSED|Negative = collapsing", p["description"]), p["title"]

    # Panels tile the 24-column grid without overlapping.
    cells = set()
    for p in all_panels(b["panels"]):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    prov = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "vcid.yaml")
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    # The dashboard must not depend on the example's uid.
    assert source["uid"] not in DASHBOARD.read_text()
