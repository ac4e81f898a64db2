"""A vLLM general plugin, loaded by vLLM in each of its processes: an engine's processes wait for each other asleep.

Why: vLLM's CPU engine is two processes, the EngineCore (scheduler) and a Worker (the model, its threads on the
role's core), which pass every step through shared-memory queues. A queue's reader spins on it (`sched_yield` in a
loop) for a second after each read before it sleeps on a socket, so while the Worker computes a step the EngineCore
spins for all of it. The EngineCore is not pinned: in a bench run it took 19% of a core beside its Worker's 46%,
decode-local requests one at a time (py-spy: 6 of 8 samples in that wait). That is harmless while a core is idle
and comes out of the engines' compute when every core is busy, which on a small host is any load worth measuring.
Asleep, a reader pays one wake-up through the socket per message (tens of µs), against steps of 30 ms and more.

1. vLLM loads the `vllm.general_plugins` entry points (pyproject.toml) in every process it starts, before that
   process builds its queues; `register` is ours.
2. Every queue reader built from then on spins at most `SPLITSERVE_ENGINE_SPIN_S` seconds after a read (default 0
   on CPUs: it sleeps until the writer's notification; vLLM's own 1 s on GPUs, whose hosts have cores to spare and
   whose steps are short enough for a wake-up to count). `SPLITSERVE_ENGINE_SPIN_S=1` is vLLM's default anywhere.
"""

from __future__ import annotations

import os

SPIN_ENV = "SPLITSERVE_ENGINE_SPIN_S"


def spin_s(*, is_cpu: bool = True) -> float | None:
    """The readers' spin window, seconds; None: leave vLLM's."""
    value = os.environ.get(SPIN_ENV)
    if value is None:
        return 0.0 if is_cpu else None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{SPIN_ENV} must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{SPIN_ENV} must be 0 or more seconds, got {value!r}")
    return seconds


def register() -> None:
    """Idempotent (vLLM may load plugins more than once per process)."""
    from vllm.distributed.device_communicators import shm_broadcast

    from vllm.platforms import current_platform

    condition = shm_broadcast.SpinCondition
    if getattr(condition, "_splitserve_spin_s", None) is not None:
        return
    limit = spin_s(is_cpu=current_platform.is_cpu())
    if limit is None:
        return
    original_init = condition.__init__

    def init_with_spin_limit(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = min(self.busy_loop_s, limit)

    condition.__init__ = init_with_spin_limit
    condition._splitserve_spin_s = limit
