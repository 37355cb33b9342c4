"""deploy/grafana-dashboard.json: valid, importable anywhere, and in step with supervisor.adapters.metrics.

A renamed or removed metric must break this test rather than leave an empty panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.adapters.metrics import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
DS_UID = "${DS_PROMETHEUS}"
METRIC = re.compile(r"clado_supervisor_[a-z_]+")
# The process's own metrics (ProcessCollector, PlatformCollector), on the same registry.
PROCESS_METRIC = re.compile(r"\b(?:process|python)_[a-z_]+")
RANGE = re.compile(r"\b(?:rate|irate|increase)\(.*?\[([^\]]+)\]")

# The series names each metric type exposes besides the family name itself.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def exposed() -> frozenset[str]:
    """Every series name the registry can expose: families with no labelled child yet have
    no samples, so names come from the family's type, plus whatever samples there are."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def _data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _data_panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var["type"] == "query" and query:
            exprs.append(query)
    return exprs


def test_parses_as_a_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert _data_panels(dashboard)


def test_datasource_is_templated(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["datasource"]["uid"] == DS_UID
        assert variables[name]["multi"]
        assert variables[name]["includeAll"]
    # No datasource uid of the exporting Grafana left anywhere.
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text(encoding="utf-8"))
    assert set(uids) <= {DS_UID, "-- Grafana --", dashboard["uid"]}


def test_every_panel_has_a_datasource_and_targets(dashboard: dict[str, Any]) -> None:
    for panel in _data_panels(dashboard):
        title = panel.get("title")
        assert panel.get("datasource", {}).get("uid") == DS_UID, title
        assert panel.get("targets"), title
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), title
            assert target.get("datasource", {}).get("uid", DS_UID) == DS_UID, title
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


def test_every_referenced_metric_exists(dashboard: dict[str, Any], exposed: frozenset[str]) -> None:
    referenced = {name for expr in _exprs(dashboard) for name in METRIC.findall(expr)}
    assert referenced, "no clado_supervisor_ metric referenced"
    unknown = sorted(referenced - exposed)
    assert not unknown, f"metrics not in supervisor.adapters.metrics.REGISTRY: {unknown}"


def test_every_process_metric_referenced_is_exported(dashboard: dict[str, Any], exposed: frozenset[str]) -> None:
    referenced = {name for expr in _exprs(dashboard) for name in PROCESS_METRIC.findall(expr)}
    assert referenced, "no process metric on the dashboard"
    assert not sorted(referenced - exposed)


def test_every_counter_queried_has_series_before_its_first_event(dashboard: dict[str, Any]) -> None:
    """Labelled counters start at 0 for each known label value: a panel's rate() is 0 from
    the start, not "no data" until the first cancel, warning or delivery."""
    referenced = {name for expr in _exprs(dashboard) for name in METRIC.findall(expr) if name.endswith("_total")}
    sampled = {sample.name for family in REGISTRY.collect() for sample in family.samples}
    assert referenced
    assert not sorted(referenced - sampled)


def test_queries_filter_by_job_and_instance(dashboard: dict[str, Any]) -> None:
    for panel in _data_panels(dashboard):
        for target in panel["targets"]:
            for selector in re.findall(r"(?:clado_supervisor|process|python)_[a-z_]+(\{[^}]*\})?", target["expr"]):
                where = (panel["title"], target["expr"])
                assert 'job=~"$job"' in selector, where
                assert 'instance=~"$instance"' in selector, where


def test_rate_windows(dashboard: dict[str, Any]) -> None:
    for panel in _data_panels(dashboard):
        for target in panel["targets"]:
            for window in RANGE.findall(target["expr"]):
                # rate() over 5m; increase() only in a stat that says its window in its title.
                assert window == "5m" or window in panel["title"], (panel["title"], target["expr"])
