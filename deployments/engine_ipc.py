"""A vLLM general plugin, loaded by vLLM in each of its processes: an engine's processes wait for each other politely.

Why: vLLM's CPU engine is two processes, the EngineCore (scheduler) and a Worker (the model, its threads on the
role's core), which pass every step through shared-memory queues. For a second after each read, a queue's reader
waits for the next message by spinning (`sched_yield` in a loop), so while the Worker computes a step the
EngineCore spins through all of it, on whichever core the kernel gives it: the EngineCore is not pinned. With two
engines on two cores that spinner shares a core with the other engine's Worker whenever both engines are busy, and
for a second after every step of a prefill engine that has just gone idle (one at a time, a decode engine's first
steps after a split were 56 ms against 52-53 ms later, the tail of prefill's spin; docs/benchmarks.md).
Reading the queue less eagerly is safe where sleeping on vLLM's notification socket was not: a reader that sleeps on
the socket within the window loses wake-ups (steps waited out vLLM's 5 s recheck: the engine-spin probe), one that
naps between looks at the queue's flags sees every message, at most one nap late.

1. vLLM loads the `vllm.general_plugins` entry points (pyproject.toml) in every process it starts; `register` is
   ours, and patches `SpinCondition.wait` before any queue waits.
2. Within vLLM's busy window a reader sleeps `SPLITSERVE_ENGINE_POLL_US` microseconds between looks instead of
   yielding (default 200 on CPUs: a few hundred wake-ups a second, against steps of 30 ms and more); after it, vLLM's
   own wait on its socket, unchanged. `0`, or a GPU platform (cores to spare, steps of milliseconds), keeps vLLM's
   spin.
"""

from __future__ import annotations

import os
import time

POLL_ENV = "SPLITSERVE_ENGINE_POLL_US"
DEFAULT_CPU_POLL_US = 200


def poll_s(*, is_cpu: bool = True) -> float | None:
    """The nap between a waiting reader's looks, seconds; None: vLLM's own spin."""
    value = os.environ.get(POLL_ENV)
    if value is None:
        return DEFAULT_CPU_POLL_US / 1e6 if is_cpu else None
    try:
        micros = float(value)
    except ValueError:
        raise ValueError(f"{POLL_ENV} must be a number of microseconds, got {value!r}") from None
    if micros < 0:
        raise ValueError(f"{POLL_ENV} must be 0 or more microseconds, got {value!r}")
    return micros / 1e6 if micros > 0 else None


def polite_wait(original_wait, nap_s: float):
    """`SpinCondition.wait` that naps instead of yielding inside vLLM's busy window."""
    def wait(self, timeout_ms: int | None = None) -> None:
        if time.monotonic() <= self.last_read + self.busy_loop_s:
            time.sleep(nap_s)
        else:
            original_wait(self, timeout_ms)
    return wait


def register() -> None:
    """Idempotent (vLLM may load plugins more than once per process)."""
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.platforms import current_platform

    condition = shm_broadcast.SpinCondition
    if getattr(condition, "_splitserve_poll_s", None) is not None:
        return
    nap_s = poll_s(is_cpu=current_platform.is_cpu())
    if nap_s is None:
        return
    condition.wait = polite_wait(condition.wait, nap_s)
    condition._splitserve_poll_s = nap_s
