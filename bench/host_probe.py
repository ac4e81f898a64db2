"""How fast this host is right now: a fixed workload timed between cells, while the engines are idle.

Machines of one kind differ by 2x between sessions, and one machine's speed drifts by tens of percent within an
hour (a busy neighbour on a shared core, a vCPU descheduled after idling): the AMD EPYC host served the same
one-at-a-time request 30% slower at one hour than three hours before, with little steal time to show for it. A
slowdown is only against the reference when the host ran at the reference's speed, so every cell records this
probe and the report flags cells measured on a slower host than the reference's.

1. `host_probe_ms()` multiplies two fixed float32 matrices of 384 × 384 (the engines' own kind of work: dense
   matrix products, a working set that lives in the cores' caches) 20 times, five times over after one untimed
   product, and returns the median in milliseconds. About half a second per cell.
"""

from __future__ import annotations

import time

import numpy as np

PROBE_SIZE, PROBE_PRODUCTS, PROBE_REPEATS = 384, 20, 5


def host_probe_ms(repeats: int = PROBE_REPEATS) -> float:
    matrix = np.random.default_rng(0).random((PROBE_SIZE, PROBE_SIZE), dtype=np.float32)
    product = np.empty_like(matrix)
    np.matmul(matrix, matrix, out=product)  # the BLAS threads start here, not in a timed round
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(PROBE_PRODUCTS):
            np.matmul(matrix, matrix, out=product)
        times.append(time.perf_counter() - began)
    return round(float(np.median(times)) * 1e3, 3)
