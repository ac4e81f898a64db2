"""What an operator sees: a request's id in its response and in the logs of all three roles, and every metric of
deployments/metrics.py (plus vLLM's own, through Ray) on Ray's Prometheus endpoint, with values that add up to
what the engines themselves counted."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import engines, processes
from bench.engines import APP_NAME
from serve_app.grafana import DASHBOARD_JSON
from tests.conftest import _app_config
from tests.e2e.workload import MODEL

ROLES = ("Router", "PrefillServer", "DecodeServer")


def _scrape(metrics_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for sample_labels, value in samples.get(name, [])
               if all(sample_labels.get(key) == wanted for key, wanted in labels.items()))


def _until(check, timeout_s: float = 60.0):
    """Ray exports metrics every few seconds: poll until `check` stops raising."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _role_logs(session_dir: Path, role: str) -> str:
    return "".join(path.read_text(errors="replace")
                   for path in (session_dir / "logs" / "serve").glob(f"replica_splitserve_{role}_*.log"))


def _some_traffic(app, openai_client) -> None:
    """A streamed completion, a chat and an unknown model: every router, TTFT/TPOT and KV-transfer series moves."""
    stream = openai_client.completions.create(model=MODEL, prompt="The lighthouse keeper", max_tokens=8,
                                              temperature=0, stream=True)
    assert len([chunk for chunk in stream if chunk.choices]) >= 2
    openai_client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Name a colour."}])
    assert httpx.post(f"{app.base_url}/v1/completions", json={"model": "no-such-model", "prompt": "x"},
                      headers=app.headers, timeout=30).status_code == 404


def test_request_id_reaches_the_response_and_the_logs_of_every_role(app):
    request_id = f"trace-{uuid.uuid4().hex}"
    response = httpx.post(f"{app.base_url}/v1/completions", headers={"X-Request-Id": request_id, **app.headers}, timeout=120,
                          json={"model": MODEL, "prompt": "The river", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    assert 'desc="prefill-' in response.headers["server-timing"]

    def every_role_logged_it():
        for role in ROLES:
            assert request_id in _role_logs(app.session_dir, role), role

    _until(every_role_logged_it, timeout_s=30)


def test_metrics_reach_rays_prometheus_endpoint_and_add_up(app, openai_client, ray_driver):
    # 1. A streamed completion, a chat and an unknown model: routes, status codes, token timings.
    _some_traffic(app, openai_client)
    decode = engines.counters("decode")

    # 2. The router's view.
    def router_metrics_arrived():
        samples = _scrape(app.metrics_url)
        assert _total(samples, "ray_splitserve_requests_total", route_path="/v1/completions", status_code="200") >= 1
        assert _total(samples, "ray_splitserve_requests_total", route_path="/v1/chat/completions",
                      status_code="200") >= 1
        assert _total(samples, "ray_splitserve_requests_total", status_code="404") >= 1
        assert _total(samples, "ray_splitserve_ttft_seconds_count") >= 1
        assert _total(samples, "ray_splitserve_tpot_seconds_count") >= 1
        assert _total(samples, "ray_splitserve_e2e_seconds_count") >= 2
        assert samples["ray_splitserve_requests_in_flight"], "no in-flight gauge"
        # The scheduler: every answered request was decided (the 404 too: an unknown model is prefill's answer),
        # and each engine's estimated load is published.
        policy = _app_config()[1].scheduling.policy
        assert _total(samples, "ray_splitserve_scheduling_decisions_total", policy=policy) >= 2
        roles = {labels["role"] for labels, _ in samples["ray_splitserve_engine_pending_prompt_tokens"]}
        assert roles == {"prefill", "decode"}, roles
        return samples

    samples = _until(router_metrics_arrived)
    assert {labels["deployment"] for labels, _ in samples["ray_splitserve_requests_total"]} == {"Router"}

    # 3. KV transfers: decode's bytes and transfers are exactly what its engine counted.
    def kv_metrics_match_the_engine():
        samples = _scrape(app.metrics_url)
        tags = {"role": "decode", "backend": app.resolved_backend}
        assert _total(samples, "ray_splitserve_kv_transferred_bytes_total", **tags) \
            == decode.num_kv_bytes_transferred > 0
        assert _total(samples, "ray_splitserve_kv_transfer_bytes_count", **tags) == decode.num_kv_transfers
        assert _total(samples, "ray_splitserve_kv_transfer_seconds_count", **tags) == decode.num_kv_transfers
        assert _total(samples, "ray_splitserve_kv_transfer_bandwidth_bytes_per_second_count", **tags) >= 1
        return samples

    samples = _until(kv_metrics_match_the_engine)

    # 4. vLLM's own engine metrics, through Ray: one series per engine, prefill's and decode's.
    for name in ("ray_vllm_num_requests_waiting", "ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc"):
        workers = {labels.get("WorkerId") for labels, _ in samples.get(name, []) if labels.get("model_name") == MODEL}
        assert len(workers) >= 2, (name, workers)

    # 5. The KV store (object_store backend): its bound, and nothing held once every request is done. (A store
    #    killed by the fault test may leave its last series behind; the live one reads zero.) Decode releases a
    #    transfer after the request is answered, off its path, and the store republishes its gauges every few
    #    seconds: polled, as one CI-like run scraped one block (5,898,240 bytes) still held.
    def store_reads_empty():
        store = _scrape(app.metrics_url)
        assert {value for _, value in store["ray_splitserve_kv_store_capacity_bytes"]} == {2 * (1 << 30)}
        assert 0 in {value for _, value in store["ray_splitserve_kv_store_bytes_in_use"]}
        assert 0 in {value for _, value in store["ray_splitserve_kv_store_open_transfers"]}

    if app.resolved_backend == "object_store":
        _until(store_reads_empty)


def test_every_query_of_the_grafana_dashboard_names_an_exported_metric(app):
    """Run after the metrics test: by then every series the dashboard reads has been exported at least once."""
    exported = set(_scrape(app.metrics_url))
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 15
    named = {name for query in queries for name in re.findall(r"\b(ray_[a-z0-9_]+)", query)}
    if app.resolved_backend != "object_store":  # the KV store's panel: the object-store backend only
        named = {name for name in named if not name.startswith("ray_splitserve_kv_store_")}
    if not _is_predicting():  # the prediction panel: policies that predict a TTFT only
        named = {name for name in named if "ttft_prediction" not in name}
    missing = sorted(name for name in named if name not in exported)
    assert not missing, missing


def _is_predicting() -> bool:
    """Whether the suite's app runs a policy that predicts TTFTs (its decisions carry a prediction)."""
    _, config = _app_config()
    return config.scheduling.policy == "predictive"


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with Grafana's variables set as a user's Grafana would set them."""
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    return [(panel["title"], target["expr"].replace("$application", APP_NAME).replace("$__rate_interval", "1m"))
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _query(prometheus_url: str, promql: str) -> list[tuple[dict[str, str], float]]:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=30).json()
    assert answer["status"] == "success", (promql, answer)
    return [(series["metric"], float(series["value"][1])) for series in answer["data"]["result"]]


def test_every_panel_of_the_grafana_dashboard_shows_data_in_a_real_prometheus(app, openai_client, logs_dir):
    """The dashboard's panels are PromQL that a Grafana hands to Prometheus: a real Prometheus scrapes the app and
    evaluates each query as Grafana would. Each query is valid and returns series; the request path's panels show
    non-zero values; the engine panels' join (vLLM's WorkerId to Serve's deployment) finds both engines."""
    if shutil.which("prometheus") is None:
        pytest.skip("no `prometheus` on PATH (`make test` installs Debian's package where it runs as root)")
    target = app.metrics_url.removeprefix("http://").removesuffix("/metrics")
    with processes.prometheus([target], log_path=logs_dir / f"prometheus-{app.backend}.log") as prometheus_url:
        # 1. Every series the panels read exists before the traffic that the rates are taken over.
        _some_traffic(app, openai_client)
        scraped = ("ray_splitserve_requests_total", "ray_splitserve_ttft_seconds_bucket",
                   "ray_splitserve_kv_transfer_seconds_bucket", "ray_splitserve_kv_transferred_bytes_total")

        def scraped_once() -> None:
            for name in scraped:
                assert _query(prometheus_url, name), name

        _until(scraped_once, timeout_s=90)
        # 2. Traffic inside the panels' rate window.
        _some_traffic(app, openai_client)

        # 3. Every query, as Grafana would send it.
        def every_panel_shows_data() -> None:
            values: dict[str, list[tuple[dict[str, str], float]]] = {}
            for title, promql in _panel_queries():
                result = _query(prometheus_url, promql)
                if "kv_store_" in promql and app.resolved_backend != "object_store":
                    continue  # the KV store's series: the object-store backend only
                if "ttft_prediction" in promql and not _is_predicting():
                    continue
                assert result, (title, promql)
                values.setdefault(title, []).extend(result)
            for title in ("Request rate by route and status", "Error ratio", "TTFT", "TPOT", "End-to-end latency",
                          "KV bandwidth", "KV transfer time", "KV transfer share of latency",
                          "Scheduling decisions by path"):
                assert any(math.isfinite(value) and value > 0 for _, value in values[title]), (title, values[title])
            for title in ("Waiting requests", "Running requests", "KV-cache usage"):
                deployments = {labels.get("deployment") for labels, _ in values[title]}
                assert {"PrefillServer", "DecodeServer"} <= deployments, (title, values[title])
            roles = {labels.get("role") for labels, _ in values["Pending prompt tokens per engine"]}
            assert roles == {"prefill", "decode"}, values["Pending prompt tokens per engine"]

        _until(every_panel_shows_data, timeout_s=90)
