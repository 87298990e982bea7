"""The chart's Grafana dashboard and PrometheusRule: shape, promtool, and the series they read.

`promtool` ships with Debian's prometheus package (the one the tests run): it checks the
rendered rules and runs `alert_rules_test.yaml`, which feeds each alert the series that must
fire it and a healthy cascade that must not. That every dashboard query returns data from real
workers and the real operator is tests/operator/kube/test_kube_dashboard.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging_support import CHART_DIR

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")

DASHBOARD = CHART_DIR / "dashboards" / "diffcascade.json"
RULES_TEST = Path(__file__).with_name("alert_rules_test.yaml")
ENABLED = {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name="dc", namespace="ops", is_install=True)
    return [
        doc
        for name, text in rendered.items()
        if not name.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def _one(values: dict[str, Any], kind: str) -> dict[str, Any]:
    [doc] = [d for d in _render(values) if d["kind"] == kind]
    return doc


def _promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    return found


def _rules_file(folder: Path, values: dict[str, Any] = ENABLED) -> Path:
    rule = _one(values, "PrometheusRule")
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_dashboard_and_rules_are_off_by_default() -> None:
    kinds = [d["kind"] for d in _render({})]
    assert "PrometheusRule" not in kinds
    assert not [d for d in _render({}) if d["kind"] == "ConfigMap"]


def test_dashboard_is_a_configmap_the_grafana_sidecar_picks_up() -> None:
    values = {"grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                   "annotations": {"grafana_folder": "ML"}}}  # fmt: skip
    cm = _one(values, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["diffcascade.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_has_the_panels_a_platform_team_asks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert titles == [
        "Demand vs planned capacity",
        "Threshold and deferral share",
        "Light share",
        "Latency against the SLO",
        "SLO violations",
        "Replicas: desired vs ready",
        "Queues",
        "Solver",
        "Profile drift",
    ]
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "namespace", "cascade"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]


def _series_names(text: str) -> set[str]:
    return set(re.findall(r"\b(diffcascade_[a-z0-9_]+)\b", text))


def test_every_series_the_dashboard_and_alerts_read_is_exported(tmp_path: Path) -> None:
    from diffcascade_operator.control_metrics import ALL_SERIES, SOLVER_SECONDS
    from diffcascade_worker.protocol import ALL_METRICS

    exported = {s.name for s in ALL_SERIES} | {f"{SOLVER_SECONDS.name}_bucket"}
    for metric in ALL_METRICS:
        exported.add(metric.exposed)
        if metric.kind == "histogram":
            exported |= {f"{metric.name}_bucket", f"{metric.name}_count", f"{metric.name}_sum"}
    used = _series_names(DASHBOARD.read_text()) | _series_names(_rules_file(tmp_path).read_text())
    assert used and used <= exported, used - exported


def test_prometheus_rule_passes_promtool_check(tmp_path: Path) -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(_rules_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_each_alert_fires_on_its_trouble_and_not_on_a_healthy_cascade(tmp_path: Path) -> None:
    _rules_file(tmp_path)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    done = subprocess.run(
        [_promtool(), "test", "rules", str(tmp_path / RULES_TEST.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_burn_rate_thresholds_follow_the_error_budget() -> None:
    rule = _one({**ENABLED, "prometheusRule": {"enabled": True, "sloErrorBudget": 0.05}},
                "PrometheusRule")  # fmt: skip
    fast = rule["spec"]["groups"][0]["rules"][0]["expr"]
    assert "> 0.72" in fast  # 14.4 x 5 %
    with pytest.raises(helm.HelmError, match="sloErrorBudget must be in"):
        _render({"prometheusRule": {"enabled": True, "sloErrorBudget": 1.5}})
