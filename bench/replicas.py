"""The app's replicas as processes on this host: find them, kill them, wait until Serve has replaced them (for
the fault tests and the soak)."""

from __future__ import annotations

import time

import httpx
import psutil

APP_NAME = "splitserve"
ROLE_DEPLOYMENTS = {"prefill": "PrefillServer", "decode": "DecodeServer"}


def engine_core_process(role: str, timeout_s: float = 15) -> psutil.Process:
    """vLLM's EngineCore process of the role's (one) live replica: the replica's child that vLLM spawned.

    Found by the process tree, not by the engine's title: vLLM titles it `VLLM::EngineCore`, but that title is not
    always there to read (in a fault test the object-store run's engines, whose KV connector starts a Ray driver
    in them, showed their original `multiprocessing.spawn` command lines)."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines = []
        for replica in _replicas(ROLE_DEPLOYMENTS[role]):
            try:
                engines += [child for child in replica.children() if _is_engine_core(child)]
            except psutil.Error:
                continue  # the replica went away while we looked
        if len(engines) == 1:
            return engines[0]
        assert time.monotonic() < deadline, (role, [engine.pid for engine in engines], _processes())
        time.sleep(1)


def _live_ray_processes(is_wanted) -> list[psutil.Process]:
    """Live processes whose title (`ray::...`, which Ray changes as a worker runs) passes `is_wanted`. Command lines
    are read afresh: psutil caches names."""
    psutil.process_iter.cache_clear()
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("ray::") and is_wanted(title) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _replicas(deployment: str) -> list[psutil.Process]:
    """Live Ray worker processes of the deployment's replicas. Ray retitles a replica as it runs
    (`ray::ServeReplica:splitserve:<Deployment>`, `ray::SERVE_REPLICA::splitserve#<Deployment>#<id>...`): the
    title is matched on the app's and the deployment's names."""
    return _live_ray_processes(lambda title: APP_NAME in title and deployment in title)


def _is_engine_core(proc: psutil.Process) -> bool:
    """vLLM's engine process: spawned by multiprocessing (`spawn` start method) or already titled by vLLM."""
    try:
        cmdline = " ".join(proc.cmdline())
        return proc.status() != psutil.STATUS_ZOMBIE and ("VLLM::EngineCore" in cmdline
                                                           or "multiprocessing.spawn" in cmdline)
    except psutil.Error:
        return False


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
    (router,) = _replicas("Router")
    return router


def proxy_process() -> psutil.Process:
    """Ray Serve's HTTP proxy on this node (`ray::ProxyActor`): its pid changes when the controller restarts it."""
    (proxy,) = _live_ray_processes(lambda title: title.startswith("ray::ProxyActor"))
    return proxy


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
