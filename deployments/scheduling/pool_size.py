"""How many replicas a pool needs, from the signals that predict its SLO misses. Pure: Serve's autoscaler calls it
(serve_app/autoscaling.py), and a simulator can.

1. Prefill: a prompt's first token waits for the prompts queued ahead of it, so the load is the seconds of prompt
   compute the pool holds (each replica's pending prompt tokens at the rate its own engine was measured to compute
   them), against `target_queue_s` per replica.
2. Decode: a stream's gaps grow with the batch it shares, so the load is the requests the pool holds, against the
   batch each replica can run while its step stays within the TBT bound of its own single-stream step (from its
   measured step times; until measured, its `max_num_seqs`).
3. Up at once to what the load needs; down only to a count whose replicas would still hold at most
   `DOWN_HEADROOM` of their capacity, so that a pool never shrinks into load the rest could not absorb. Serve adds
   its own delays (`upscale_delay_s`, `downscale_delay_s`) and the min/max bounds, so one noisy sample never
   flaps the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A pool shrinks only while the replicas left would be at most this full: a margin that keeps the load a pool
# had just absorbed from pushing it straight back up.
DOWN_HEADROOM = 0.7


@dataclass(frozen=True)
class PoolDecision:
    num_replicas: int
    reason: str


def num_replicas_for(load: float, capacity_per_replica: float, current: int, *, what: str) -> PoolDecision:
    """The replicas `load` needs at `capacity_per_replica` each, moving from `current` (at least one: a pool the
    scheduler routes to never empties)."""
    if capacity_per_replica <= 0:
        return PoolDecision(max(1, current), f"no capacity measured yet for {what}: keep {current}")
    needed = max(1, math.ceil(load / capacity_per_replica - 1e-9))
    if needed > current:
        return PoolDecision(needed, f"{what} {load:.2f} needs {needed} at {capacity_per_replica:.2f} each")
    room = max(1, math.ceil(load / (DOWN_HEADROOM * capacity_per_replica) - 1e-9))
    if room < current:
        return PoolDecision(room, f"{what} {load:.2f} fits {room} within {DOWN_HEADROOM:.0%} of "
                                  f"{capacity_per_replica:.2f} each")
    return PoolDecision(current, f"{what} {load:.2f} at {current} replicas")


def prefill_replicas(pending_prompt_s: float, target_queue_s: float, current: int) -> PoolDecision:
    """1. `pending_prompt_s`: the pool's seconds of prompt compute queued, summed over its replicas."""
    return num_replicas_for(pending_prompt_s, target_queue_s, current, what="prompt seconds queued")


def decode_replicas(num_requests: float, batch_within_tbt: float, current: int) -> PoolDecision:
    """2. `num_requests`: the requests the pool holds; `batch_within_tbt`: what one replica runs within the bound."""
    return num_replicas_for(num_requests, batch_within_tbt, current, what="requests held")


def batch_within_tbt(step_s_at_one: float, step_s_per_stream: float, tbt_slowdown: float, max_num_seqs: int) -> int:
    """2. The largest batch whose step, on the line step(b) = step(1) + (b - 1) · per-stream, stays within
    `tbt_slowdown` of step(1); the engine's own cap bounds it (and stands for it while nothing was measured)."""
    if step_s_at_one <= 0 or step_s_per_stream <= 0:
        return max_num_seqs
    return max(1, min(max_num_seqs, 1 + math.floor((tbt_slowdown - 1) * step_s_at_one / step_s_per_stream)))
