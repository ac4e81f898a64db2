"""A vLLM general plugin, loaded by vLLM in each of its processes: an engine's two processes wait for each other
asleep, and are woken every time.

Why: vLLM's CPU engine is two processes, the EngineCore (scheduler) and a Worker (the model, its threads on the
role's core), which pass every step through shared-memory queues. For a second after each read, a queue's reader
waits for the next message by spinning (`sched_yield` in a loop): the unpinned EngineCore spins through every step
its Worker computes, and the Worker between steps. On a small host that spinner takes time from the engines' own
threads and from everything else (the router, Serve's proxy): with two engines on two cores, one at a time, every
token gap was 1.05-1.10× what it is without the spin (docs/benchmarks.md, the engine-wait probe).
A reader that goes to sleep instead waits on a ZeroMQ PUB/SUB notification that vLLM's writer sends after each
message, but vLLM builds that PUB socket with a send high-water mark of 1. ZeroMQ processes the pipe's "read"
acknowledgements lazily (at most every millisecond or so on the sender's side), so a second notification sent soon
after a first is silently dropped while the sender still counts the first in flight: a reader that consumed the
first then sleeps through its message until a later notification, or vLLM's 5 s poll timeout (`python -m
bench.queue_wakeups`: 622 of 3,000 messages late, p99 21 ms; with no mark, none, p99 0.41 ms). vLLM's 1 s spin
hides that loss.

1. vLLM loads the `vllm.general_plugins` entry points (pyproject.toml) in every process it starts, before that
   process builds its queues (EngineCore: in its constructor; Worker: in `init_worker`); `register` is ours.
2. Every notification socket a writer builds from then on keeps what it sends (no high-water mark), so no wake-up
   is lost; the reader keeps vLLM's CONFLATE (one pending ping at most: it carries no data).
3. Every reader spins at most `SPLITSERVE_ENGINE_SPIN_S` seconds after a read, then sleeps until notified (default
   0 on CPUs; `vllm` leaves vLLM's queues as they ship, as GPU platforms do by default: they have cores to spare
   and steps of milliseconds, where the wake-up's tenth of a millisecond would count).
"""

from __future__ import annotations

import os
from typing import Any

SPIN_ENV = "SPLITSERVE_ENGINE_SPIN_S"
AS_SHIPPED = "vllm"
# The writer's notification socket: ZeroMQ's "no limit". Its pipe empties into the reader's conflating queue as
# fast as ZeroMQ's I/O thread runs, so nothing accumulates.
NOTIFY_SNDHWM = 0


def spin_s(*, is_cpu: bool = True) -> float | None:
    """How long a reader spins after a read, seconds; None: vLLM's queues untouched."""
    value = os.environ.get(SPIN_ENV)
    if value is None:
        return 0.0 if is_cpu else None
    if value.strip().lower() == AS_SHIPPED:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{SPIN_ENV} must be a number of seconds or {AS_SHIPPED!r}, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{SPIN_ENV} must be 0 or more seconds, got {value!r}")
    return seconds


def lossless_init(original_init: Any, max_spin_s: float) -> Any:
    """`SpinCondition.__init__` whose writer never drops a notification and whose reader spins at most
    `max_spin_s`. The writer's branch is vLLM's own (shm_broadcast.py, vLLM 0.32) with the high-water mark set
    before the bind: a mark set after it does not reach the subscriber's pipe."""
    import zmq

    def init(self: Any, is_reader: bool, context: Any, notify_address: str, busy_loop_s: float = 1) -> None:
        if is_reader:
            original_init(self, is_reader, context, notify_address, busy_loop_s)
            self.busy_loop_s = min(self.busy_loop_s, max_spin_s)
            return
        self.is_reader = False
        self.local_notify_socket = context.socket(zmq.PUB)
        self.local_notify_socket.setsockopt(zmq.SNDHWM, NOTIFY_SNDHWM)
        self.local_notify_socket.bind(notify_address)
        self.last_read = 0
        self.busy_loop_s = 0
        self.read_cancel_socket = None
        self.write_cancel_socket = None
        self.poller = None

    return init


def register() -> None:
    """Idempotent (vLLM may load plugins more than once per process)."""
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.platforms import current_platform

    condition = shm_broadcast.SpinCondition
    if getattr(condition, "_splitserve_spin_s", None) is not None:
        return
    max_spin_s = spin_s(is_cpu=current_platform.is_cpu())
    if max_spin_s is None:
        return
    condition._vllm_init = condition.__init__  # vLLM's own, for tests and the wake-up benchmark
    condition.__init__ = lossless_init(condition.__init__, max_spin_s)
    condition._splitserve_spin_s = max_spin_s
