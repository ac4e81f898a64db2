"""bench/processes.py: what the suite and the benchmarks start is stopped by the signal they send."""

from __future__ import annotations

import signal
import sys
import time

from bench import processes


def test_a_child_stops_on_sigint_even_when_the_shell_started_us_ignoring_it(tmp_path):
    """A background shell job ignores SIGINT and its children inherit that: `serve run` then slept through
    `stop`'s SIGINT for the whole grace period. `start` gives every child SIGINT's default back."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `make test &` leaves this process
    try:
        child = processes.start([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                tmp_path / "child.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    processes.wait_until(lambda: b"up" in (tmp_path / "child.log").read_bytes(), timeout_s=30, what="child",
                         log_path=tmp_path / "child.log", proc=child, interval_s=0.1)
    began = time.monotonic()
    processes.stop(child, first_signal=signal.SIGINT, grace_s=30)
    assert child.returncode is not None and time.monotonic() - began < 10


def test_a_config_error_from_the_build_is_reported_whole_and_a_traceback_by_its_last_error_line(tmp_path):
    """`serve run` keeps running when the app cannot be built; the suite and the benchmarks read the reason from its
    output: the app's own config error with every line of it (a pydantic error spans several), else a traceback's
    last "...Error: " line."""
    prefix = "\x1b[36m(ServeController pid=7)\x1b[0m "
    log = tmp_path / "serve-run.log"
    log.write_text(f"{prefix}ERROR controller -- Deploying app 'splitserve' failed with exception:\n"
                   f"{prefix}{processes.CONFIG_ERROR}: 1 validation error for AppConfig\n"
                   f"{prefix}scheduling.policy\n"
                   f"{prefix}  Input should be 'always_split' or 'predictive' [input_value='nope']\n"
                   "2026-12-07 INFO scripts.py -- Got KeyboardInterrupt, shutting down...\n"
                   "(raylet) Task ServeController.graceful_shutdown failed. Error: The actor is dead\n")
    assert processes._deploy_failed(log) == (
        f"the app failed to deploy: {processes.CONFIG_ERROR}: 1 validation error for AppConfig | scheduling.policy | "
        "Input should be 'always_split' or 'predictive' [input_value='nope']")
    log.write_text("INFO starting\n(ServeController pid=7) Deploying app 'splitserve' failed with exception:\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: engine: boom\n")
    assert processes._deploy_failed(log) == "the app failed to deploy: RuntimeError: engine: boom"
    log.write_text("INFO still deploying\n")
    assert processes._deploy_failed(log) is None
