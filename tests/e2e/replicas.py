"""The app's replicas as processes on this host: find them, kill them, wait until Serve has replaced them."""

from __future__ import annotations

import time

import httpx
import psutil

ROLE_DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer"}


def replica_process(role: str) -> psutil.Process:
    """The Ray worker process of the role's (one) live replica."""
    title = f"ServeReplica:splitserve:{ROLE_DEPLOYMENTS[role]}"
    found = [proc for proc in psutil.process_iter(["cmdline"])
             if title in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE]
    assert len(found) == 1, (role, found)
    return found[0]


def engine_core_process(role: str) -> psutil.Process:
    """vLLM's EngineCore process under the role's replica: the engine itself."""
    cores = [child for child in replica_process(role).children() if "EngineCore" in child.name()
             or "EngineCore" in " ".join(child.cmdline())]
    assert len(cores) == 1, cores
    return cores[0]


def health(base_url: str) -> dict:
    try:
        return httpx.get(f"{base_url}/health", timeout=15).json()
    except (httpx.HTTPError, ValueError):
        return {}


def engine_id(base_url: str, role: str) -> str | None:
    return health(base_url).get("roles", {}).get(role, {}).get("engine_id")


def wait_for_replacement(base_url: str, role: str, old_engine_id: str, timeout_s: float = 300) -> dict:
    """Polls /health until the role answers ready from a new engine; returns that health report."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = health(base_url)
        info = report.get("roles", {}).get(role, {})
        if report.get("status") == "ok" and info.get("ready") and info.get("engine_id") not in (None, old_engine_id):
            return report
        time.sleep(3)
    raise TimeoutError(f"{role} was not replaced within {timeout_s:.0f} s: {health(base_url)}")
