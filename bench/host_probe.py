"""How fast this host's cores are right now: a fixed workload on one thread, timed between cells.

Machines of one kind differ by 2x between sessions, and one machine's speed drifts by tens of percent within an
hour (a busy neighbour on a shared core, a vCPU descheduled after idling): the AMD EPYC host served the same
one-at-a-time request 30% slower at one hour than three hours before, and 1.6x faster three hours later, with
little steal time to show for it. A slowdown is only against the reference when the host ran at the reference's
speed, so every cell records this probe and the report flags cells measured on a host off the reference's speed.

1. `host_probe()` multiplies two fixed float32 matrices of 384 × 384 (a prefill's kind of work: dense matrix
   products through torch, a working set that lives in the cores' caches) 20 times on **one thread**, seven times
   over after one untimed product, and returns the medians of the thread's CPU time and of the wall time in
   milliseconds. About a second per cell.
2. Then one matrix-vector product over 256 MiB of float32 weights, eight times the last-level cache of the hosts
   we run on (a decode step's kind of work: every weight streamed from memory for one token), on one thread, the
   median of seven: `memory_ms`. The compute probe alone missed what moves decode: on the AMD EPYC host it read
   26-30 ms (25.2 ms three hours before) while the reference's one-at-a-time token gaps grew from 57 to 81-94 ms.
3. The CPU time is the figure the report compares: it counts only the time the thread ran, so it follows the
   core's own speed (clock, a neighbour on the same physical core) and not whether something else in this machine
   held the core at that moment; the wall time beside it shows that. One thread, because a product split over both
   cores waits for the slower half: numpy's two BLAS threads, timed between cells as the first probe did, read
   15-280 ms on one host within 10 minutes (a process of the engines' woke on one core), while one thread read
   25-28 ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

PROBE_SIZE, PROBE_PRODUCTS, PROBE_REPEATS = 384, 20, 7
MEMORY_PROBE_ROWS, MEMORY_PROBE_COLUMNS = 16_384, 4_096  # 256 MiB of float32 weights


@dataclass(frozen=True)
class HostProbe:
    cpu_ms: float  # the thread's CPU time for the fixed work: the core's speed
    wall_ms: float  # the same work's wall time: above cpu_ms when the core was shared
    memory_ms: float  # one thread's CPU time streaming 256 MiB of weights once: the memory's speed


def host_probe(repeats: int = PROBE_REPEATS) -> HostProbe:
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        matrix = torch.rand((PROBE_SIZE, PROBE_SIZE), generator=torch.Generator().manual_seed(0))
        product = torch.empty_like(matrix)
        torch.matmul(matrix, matrix, out=product)  # one untimed product: the kernel is picked and warm
        cpu_s, wall_s = [], []
        for _ in range(repeats):
            wall_began, cpu_began = time.perf_counter(), time.thread_time()
            for _ in range(PROBE_PRODUCTS):
                torch.matmul(matrix, matrix, out=product)
            cpu_s.append(time.thread_time() - cpu_began)
            wall_s.append(time.perf_counter() - wall_began)
        memory_s = _memory_probe_s(repeats)
    finally:
        torch.set_num_threads(num_threads)
    return HostProbe(cpu_ms=_median_ms(cpu_s), wall_ms=_median_ms(wall_s), memory_ms=_median_ms(memory_s))


def _memory_probe_s(repeats: int) -> list[float]:
    """One thread's CPU time of a matrix-vector product over weights that no cache holds, per repeat (the thread
    runs while it waits on memory, so its CPU time counts the stalls)."""
    weights = torch.ones((MEMORY_PROBE_ROWS, MEMORY_PROBE_COLUMNS))  # written once: every page is touched
    vector, product = torch.ones(MEMORY_PROBE_COLUMNS), torch.empty(MEMORY_PROBE_ROWS)
    torch.mv(weights, vector, out=product)  # one untimed product
    spent = []
    for _ in range(repeats):
        began = time.thread_time()
        torch.mv(weights, vector, out=product)
        spent.append(time.thread_time() - began)
    return spent


def _median_ms(seconds: list[float]) -> float:
    return round(float(sorted(seconds)[len(seconds) // 2]) * 1e3, 3)
