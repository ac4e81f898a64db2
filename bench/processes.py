"""Start and stop what the benchmarks and end-to-end tests need, by process id, leaving nothing behind.

Every process is started in a session of its own; stopping it signals that whole group, then checks that no
process of the group (vLLM engines included) is left.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", PROJECT_ROOT / ".venv")) / "bin"
STARTUP_TIMEOUT_S = 420


def use_ray_token_auth() -> None:
    """Ray 2.60 starts clusters with token auth. Every process started from here (the head, `serve run`, drivers)
    uses this process's token: the user's own (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), else a
    fresh one for this process and its children, so that a fresh machine needs no `ray get-auth-token --generate`."""
    os.environ["RAY_AUTH_MODE"] = "token"
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").is_file())
    if not has_token:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min/max-worker-port
_handed_out: set[int] = set()


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (and above Ray's worker ports). A port the kernel picks
    for us (bind to 0) is ephemeral, and Ray's own processes bind ephemeral ports while a cluster starts: in one CI
    run one of them took the HTTP port picked for `serve run` before Serve's proxy could bind it."""
    port_range = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(port_range.read_text().split()[0]) if port_range.exists() else 32768
    for _ in range(500):
        port = random.randint(RAY_WORKER_PORTS.stop, max(RAY_WORKER_PORTS.stop, low - 1))
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port found below the ephemeral range")


def _default_sigint() -> None:
    """In the child, before it runs: SIGINT back to its default. A shell ignores SIGINT in what it starts in the
    background (`make test &`, nohup), children inherit that, and Python then installs no KeyboardInterrupt
    handler: `serve run` slept through `stop`'s polite SIGINT until the grace period ended, 90 s per app
    (found in a background run of the suite: SigIgn 0x...06, SIGINT and SIGQUIT, on `serve run`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True,
                            preexec_fn=_default_sigint)


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen, *, first_signal: int = signal.SIGINT, grace_s: float = 60.0,
         known_children: list[psutil.Process] | None = None) -> None:
    """Ask politely, then end the whole process group and every child we saw, by id."""
    children = descendants(proc) + list(known_children or [])
    if proc.poll() is None:
        proc.send_signal(first_signal)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        alive = [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
        for child in alive:
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=15)
        if proc.poll() is None:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
        if not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]:
            return


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str, log_path: Path,
               proc: subprocess.Popen | None = None, interval_s: float = 2.0,
               failed: Callable[[], str | None] | None = None) -> None:
    """Polls `predicate` until it holds; fails early if `proc` (the process that should make it hold) exits, or
    `failed` says why it never will."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
        reason = failed() if failed is not None else None
        if reason:
            raise RuntimeError(f"{what}: {reason}; log tail:\n{_tail(log_path)}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s; log tail:\n{_tail(log_path)}")


CONFIG_ERROR = "splitserve cannot start with this config"  # serve_app/builder.py's AppConfigError, as Serve logs it


def _deploy_failed(serve_log: Path) -> str | None:
    """`serve run` of a config file keeps running when the app cannot be built (Serve's controller logs "Deploying
    app '...' failed with exception" and marks it DEPLOY_FAILED): the reason, instead of waiting out the start-up
    timeout."""
    text = serve_log.read_bytes().decode(errors="replace")
    marker = text.find("failed with exception")
    if marker < 0:
        return None
    lines = text[marker:].splitlines()[1:40]
    # The app's own config error (serve_app/builder.py's AppConfigError) is its message, from the next line on (a
    # pydantic error spans several, each with the controller's prefix); anything else is a traceback, whose last
    # "...Error: " line says what failed.
    if lines and CONFIG_ERROR in lines[0]:
        prefix = lines[0][:lines[0].find(CONFIG_ERROR)]
        message = [line.removeprefix(prefix).strip() for line in lines if line.startswith(prefix)]
        return "the app failed to deploy: " + " | ".join(filter(None, message))
    reasons = [line.strip() for line in lines if "Error: " in line]
    return "the app failed to deploy: " + (reasons[-1] if reasons else text[marker:marker + 500])


def _tail(path: Path, num_chars: int = 6000) -> str:
    return path.read_bytes()[-num_chars:].decode(errors="replace")


@dataclass(frozen=True)
class Node:
    """One more Ray node on this host for `serve_run`: its own raylet and object store, as a second machine would
    have. A loopback address of its own (127.0.0.2, ...) makes a bind to the wrong address fail as it would
    between machines; `labels` are what a role's `node_labels` select."""

    node_ip: str
    labels: dict[str, str]
    num_cpus: int = 1


@dataclass
class StartedNode:
    node: Node
    proc: subprocess.Popen
    log_path: Path
    children: list[psutil.Process]


@dataclass(frozen=True)
class ServedApp:
    base_url: str
    ray_address: str
    log_path: Path
    metrics_url: str  # the head node's Prometheus endpoint (Ray's metrics agent)
    session_dir: Path  # Ray's session: logs/serve/ holds every replica's log
    nodes: tuple[StartedNode, ...] = ()  # the nodes beside the head, for tests that stop one


def _labels(labels: dict[str, str]) -> list[str]:
    return [f"--labels={','.join(f'{key}={value}' for key, value in labels.items())}"] if labels else []


def stop_node(started: StartedNode) -> None:
    """A node's raylet and everything it started (its agents outlive a killed raylet), by id."""
    stop(started.proc, first_signal=signal.SIGTERM, grace_s=30,
         known_children=started.children + descendants(started.proc))


@contextlib.contextmanager
def serve_run(serve_config: dict[str, Any], *, name: str, logs_dir: Path, env: dict[str, str] | None = None,
              startup_timeout_s: float = STARTUP_TIMEOUT_S, head_labels: dict[str, str] | None = None,
              nodes: tuple[Node, ...] = ()) -> Iterator[ServedApp]:
    """`serve run` of `serve_config` (given a free HTTP port) on a Ray head of its own, until healthy; on exit
    both are stopped by their ids, with every process they started. `env` goes to the head and to `serve run`.
    `nodes` join the head before the app starts (each with its own temp dir, so its sockets are its own)."""
    use_ray_token_auth()  # `serve run` and the head get this process's token through its environment
    env = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    http_port, ray_port, metrics_port = free_port(), free_port(), free_port()
    serve_config = {**serve_config, "http_options": {**serve_config["http_options"], "port": http_port}}
    workdir = Path(tempfile.mkdtemp(prefix="ss-"))  # short: Ray's socket paths must fit 107 bytes
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))
    ray_address = f"127.0.0.1:{ray_port}"
    ray_log, serve_log = logs_dir / f"ray-head-{name}.log", logs_dir / f"serve-run-{name}.log"
    node_ip = ["--node-ip-address=127.0.0.1"] if nodes else []  # every node on loopback: no byte leaves the host
    ray_head = start([str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}", "--num-cpus=2",
                      f"--metrics-export-port={metrics_port}", "--include-dashboard=false", "--disable-usage-stats",
                      f"--temp-dir={workdir / 'ray'}", *node_ip, *_labels(head_labels or {})],
                     ray_log, env=env)
    serve_proc = None
    seen_children: list[psutil.Process] = []
    started_nodes: list[StartedNode] = []
    try:
        wait_until(lambda: (workdir / "ray" / "session_latest").exists(), timeout_s=120, what="ray head",
                   proc=ray_head, log_path=ray_log)
        for index, node in enumerate(nodes, start=1):
            node_log = logs_dir / f"ray-node{index}-{name}.log"
            proc = start([str(VENV_BIN / "ray"), "start", "--block", f"--address={ray_address}",
                          f"--node-ip-address={node.node_ip}", f"--num-cpus={node.num_cpus}", "--disable-usage-stats",
                          f"--temp-dir={workdir / f'node{index}'}", *_labels(node.labels)], node_log, env=env)
            started_nodes.append(StartedNode(node, proc, node_log, []))
        for started in started_nodes:
            # `ray start` says so once its raylet registered with the head (no dashboard here for the state API).
            wait_until(lambda started=started: b"Ray runtime started" in started.log_path.read_bytes(),
                       timeout_s=120, what=f"ray node {started.node.node_ip}", proc=started.proc,
                       log_path=started.log_path, interval_s=0.5)
            started.children = descendants(started.proc)
        serve_proc = start([str(VENV_BIN / "serve"), "run", str(config_path), "--address", ray_address],
                           serve_log, env=env)
        base_url = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: httpx.get(f"{base_url}/health", timeout=15).json().get("status") == "ok",
                   timeout_s=startup_timeout_s, what=f"serve run ({name})", proc=serve_proc, log_path=serve_log,
                   interval_s=3, failed=lambda: _deploy_failed(serve_log))
        seen_children = descendants(ray_head)
        yield ServedApp(base_url=base_url, ray_address=ray_address, log_path=serve_log,
                        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                        session_dir=(workdir / "ray" / "session_latest").resolve(), nodes=tuple(started_nodes))
    finally:
        seen_children += descendants(ray_head)
        if serve_proc is not None:
            stop(serve_proc, first_signal=signal.SIGINT, grace_s=90)
        for started in started_nodes:
            stop_node(started)
        stop(ray_head, first_signal=signal.SIGTERM, grace_s=60, known_children=seen_children)
        # Serve's controller and replica logs outlive the run, beside the others, for a post-mortem.
        serve_logs = workdir / "ray" / "session_latest" / "logs" / "serve"
        if serve_logs.is_dir():
            shutil.copytree(serve_logs, logs_dir / f"serve-logs-{name}", dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def prometheus(scrape_targets: list[str], *, log_path: Path, scrape_interval_s: int = 2,
               startup_timeout_s: float = 60) -> Iterator[str]:
    """A Prometheus server (the `prometheus` binary on PATH, e.g. Debian's package) that scrapes `scrape_targets`
    (`host:port` of Ray's metrics endpoints) into a throwaway database; yields its base URL and stops it on exit.
    It evaluates PromQL exactly as the Prometheus behind a Grafana would."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("no `prometheus` on PATH")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ss-prom-"))
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump({
        "global": {"scrape_interval": f"{scrape_interval_s}s", "evaluation_interval": f"{scrape_interval_s}s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": scrape_targets}]}],
    }))
    server = start([binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}"], log_path)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base_url}/-/ready", timeout=5).status_code == 200,
                   timeout_s=startup_timeout_s, what="prometheus", proc=server, log_path=log_path, interval_s=0.5)
        yield base_url
    finally:
        stop(server, first_signal=signal.SIGTERM, grace_s=30)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def vllm_api_server(config: Any, *, log_path: Path,
                    startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """One standalone vLLM OpenAI server with the app's model and prefill-engine settings, no KV connector, on
    prefill's core; yields its base URL and stops it on exit."""
    from deployments.engine import vllm_cli_args

    port = free_port()
    server = start(
        [str(VENV_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
         *vllm_cli_args(config.model, config.prefill, None), "--host", "127.0.0.1", "--port", str(port)],
        log_path,
        env={"VLLM_CPU_OMP_THREADS_BIND": config.prefill.cpu_binding_for(0),
             "VLLM_CPU_KVCACHE_SPACE": str(config.prefill.kv_cache_gib), "HF_HUB_OFFLINE": "1"},
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base_url}/health").status_code == 200, timeout_s=startup_timeout_s,
                   what="standalone vLLM server", proc=server, log_path=log_path)
        yield base_url
    finally:
        stop(server)
