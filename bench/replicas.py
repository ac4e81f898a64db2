"""The app's replicas as processes on this host: find them, kill them, wait until Serve has replaced them (for
the fault tests and the soak)."""

from __future__ import annotations

import time

import httpx
import psutil

ROLE_DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer"}


def engine_core_process(role: str, timeout_s: float = 15) -> psutil.Process:
    """vLLM's EngineCore process of the role's (one) live replica: the EngineCore whose parent is a Serve replica
    of that deployment. Ray retitles replica processes as they run (`ray::ServeReplica:splitserve:<Deployment>`,
    `ray::SERVE_REPLICA::splitserve#<Deployment>#<id>...`), so the parent is matched on the deployment's name."""
    deployment = ROLE_DEPLOYMENTS[role]
    deadline = time.monotonic() + timeout_s
    while True:
        cores, seen = [], []
        # Fresh reads only: psutil keeps the name it first saw for a process, and an engine seen while it was
        # being spawned is still called "python3.11" there. Command lines are read anew each time.
        psutil.process_iter.cache_clear()
        for proc in psutil.process_iter(["cmdline", "status"]):
            if "VLLM::EngineCore" not in " ".join(proc.info["cmdline"] or []) \
                    or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                parent = " ".join(proc.parent().cmdline())
            except (psutil.Error, AttributeError):
                continue
            seen.append((proc.pid, parent[:120]))
            if "splitserve" in parent and deployment in parent:
                cores.append(proc)
        if len(cores) == 1:
            return cores[0]
        assert time.monotonic() < deadline, (role, seen, _processes())
        time.sleep(1)


def _processes() -> list[tuple[int, int, str]]:
    """Ray's and vLLM's processes on this host, for a failure message."""
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = " ".join(proc.info["cmdline"] or []).strip()
        if any(word in cmdline for word in ("VLLM", "Serve", "SERVE", "spawn")):
            found.append((proc.pid, proc.info["ppid"], cmdline[:100]))
    return found


def replica_process(role: str) -> psutil.Process:
    """The Ray worker process of the role's (one) live replica: its engine's parent."""
    return engine_core_process(role).parent()


def router_process() -> psutil.Process:
    """The Ray worker process of the router's (one) replica."""
    title = "ServeReplica:splitserve:Router"
    (router,) = [proc for proc in psutil.process_iter(["cmdline"]) if title in " ".join(proc.info["cmdline"] or [])]
    return router


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
