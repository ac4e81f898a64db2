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
