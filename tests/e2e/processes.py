"""Start and stop what the end-to-end tests need, by process id, leaving nothing behind.

Every process is started in a session of its own; stopping it signals that whole group, then checks that no
process of the group (vLLM engines included) is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", PROJECT_ROOT / ".venv")) / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


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
               proc: subprocess.Popen | None = None, interval_s: float = 2.0) -> None:
    """Polls `predicate` until it holds; fails early if `proc` (the process that should make it hold) exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s; log tail:\n{_tail(log_path)}")


def _tail(path: Path, num_chars: int = 6000) -> str:
    return path.read_bytes()[-num_chars:].decode(errors="replace")
