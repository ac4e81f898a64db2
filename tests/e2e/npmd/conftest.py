"""One nPmD app for the scheduler, several-router and two-node tests of this folder, started once per KV backend.

    head (decode + ingress):     Router x2 -> DecodeServer (core 1)
    node 127.0.0.2 (prefill):    PrefillServer x2 (both on core 0, prompts shortest first)

serve_config.yaml with two prefill replicas, two routers and the prefill pool on a second Ray node of this host,
placed by node labels: its own raylet, object store and loopback address, as a second machine would have. Its
default policy (`predictive`) decides, and the operator's path override lets a test drive one path on purpose.
Each start of this app costs about three minutes here; one app serves the three modules, which is why they share a
folder. Order within a backend (tests/conftest.py): every test, then the leak check, then the tests marked
`ends_app` (stopping the prefill node), since nothing can run on the app after them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from bench import engines, processes, replicas
from tests.conftest import TEST_KV_HANDLE_KEY, connect_driver

NUM_PREFILL_REPLICAS = 2
NUM_ROUTERS = 2
PREFILL_NODE = processes.Node(node_ip="127.0.0.2", labels={"splitserve/pool": "prefill"})
HEAD_LABELS = {"splitserve/pool": "decode", "splitserve/ingress": "true"}


@dataclass
class NPMDApp:
    backend: str
    base_url: str
    log_path: Path
    served: processes.ServedApp
    prefill_replicas: list[str]  # Serve replica ids
    decode_replica: str
    # Releases the tests made on purpose, per prefill replica: the leak check expects exactly these.
    released_unclaimed: dict[str, int] = field(default_factory=dict)

    def client(self, path: str | None = None) -> openai.OpenAI:
        """The official client; `path` forces the scheduler's path (the operator's override)."""
        headers = {"X-Splitserve-Path": path} if path else None
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=300,
                             default_headers=headers)


def _config(backend: str) -> dict[str, Any]:
    from bench.systems import serve_config as shipped_config

    serve_config = shipped_config()  # serve_config.yaml (on a share of a GPU under SPLITSERVE_DEVICE=cuda)
    args = serve_config["applications"][0]["args"]
    # Two prefill engines share core 0, decode has core 1; KV caches of 1 GiB each (vLLM's CPU minimum). The
    # prefill engines order their prompts shortest first (vLLM's priority scheduling, each request's priority set by
    # its replica), so that every path and the leak check run through it on the real engine.
    args["prefill"].update({"num_replicas": NUM_PREFILL_REPLICAS, "cpu_binding": ["0"], "kv_cache_gib": 1,
                            "scheduling_policy": "shortest_first", "node_labels": {"splitserve/pool": "prefill"}})
    args["decode"].update({"kv_cache_gib": 1, "node_labels": {"splitserve/pool": "decode"}})
    # The routers stay on the head when the prefill node goes.
    args["router"].update({"num_replicas": NUM_ROUTERS, "node_labels": {"splitserve/ingress": "true"}})
    # serve_config.yaml's own policy (null: the mode's default), which test_scheduling_paths checks is predictive.
    args["scheduling"].update({"allow_path_override": True, "load_report_period_s": 0.25})
    # A short KV load timeout: a load from the stopped prefill node gives up within seconds (test_two_nodes).
    args["transfer"].update({"backend": backend, "load_timeout_s": 10})
    return serve_config


def health_by_router(base_url: str, *, until: Any = None, timeout_s: float = 60) -> dict[str, dict]:
    """/health as each router answers it (Serve's proxy picks one per request), polled until `until(by_router)`
    holds (or every router answered, without `until`); returns the newest answer of each."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = replicas.health(base_url)
        router_id = health.get("scheduling", {}).get("router_id")
        if router_id is not None:
            seen[router_id] = health
        if len(seen) == NUM_ROUTERS and (until is None or until(seen)):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"timed out; last /health per router: {seen}")


def _reports_from_every_engine(by_router: dict[str, dict]) -> bool:
    return all(len(health["scheduling"]["engines"]) == NUM_PREFILL_REPLICAS + 1 for health in by_router.values())


@pytest.fixture(scope="package", params=["nixl", "object_store"])
def npmd(request, reference_outputs, logs_dir) -> Iterator[NPMDApp]:
    backend = request.param
    with processes.serve_run(_config(backend), name=f"npmd-{backend}", logs_dir=logs_dir,
                             env={"SPLITSERVE_KV_HANDLE_KEY": TEST_KV_HANDLE_KEY}, head_labels=HEAD_LABELS,
                             nodes=(PREFILL_NODE,)) as served:
        by_router = health_by_router(served.base_url, until=_reports_from_every_engine)
        reported = {replica_id: load["role"]
                    for replica_id, load in next(iter(by_router.values()))["scheduling"]["engines"].items()}
        connect_driver(served.ray_address)
        try:
            yield NPMDApp(backend=backend, base_url=served.base_url, log_path=served.log_path, served=served,
                          prefill_replicas=sorted(r for r, role in reported.items() if role == "prefill"),
                          decode_replica=next(r for r, role in reported.items() if role == "decode"))
        finally:
            engines.disconnect_driver()
