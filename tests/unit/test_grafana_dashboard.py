"""The Grafana dashboard file: valid JSON of Grafana's dashboard model, a panel per part of the request path, and
queries that only name splitserve's, Serve's and vLLM's metrics (the e2e test checks each is really exported)."""

from __future__ import annotations

import json
import re

from serve_app.grafana import DASHBOARD_JSON, install_dashboard


def test_the_dashboard_is_valid_and_covers_the_request_path():
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    assert dashboard["uid"] == "splitserve" and dashboard["schemaVersion"] >= 30
    assert [variable["name"] for variable in dashboard["templating"]["list"]] == ["datasource", "application"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    titles = {panel["title"] for panel in panels}
    assert {"Request rate by route and status", "Error ratio", "TTFT", "TPOT", "KV bandwidth",
            "KV transfer share of latency", "Waiting requests"} <= titles
    for panel in panels:
        assert panel["targets"] and panel["description"] and panel["datasource"]["uid"] == "${datasource}"
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        for target in panel["targets"]:
            names = re.findall(r"\b(ray_[a-z0-9_]+)", target["expr"])
            assert names and all(name.startswith(("ray_splitserve_", "ray_vllm_", "ray_serve_")) for name in names)
            assert target["expr"].count("(") == target["expr"].count(")")


def test_installing_into_rays_grafana_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path / "dashboards"))
    installed = install_dashboard()
    assert installed == tmp_path / "dashboards" / DASHBOARD_JSON.name
    assert json.loads(installed.read_text()) == json.loads(DASHBOARD_JSON.read_text())
