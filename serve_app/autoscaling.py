"""Serve's autoscaling policies for the prefill and decode pools: what Serve's controller calls every tick, with the
custom metrics each replica reports (`record_autoscaling_stats`, deployments/engine_server.py). The decisions are
deployments/scheduling/pool_size.py's; Serve wraps them with the role's min/max bounds and its up/down delays.

1. `PrefillPool(target_queue_s)`: the seconds of prompt compute the replicas hold, summed, against
   `target_queue_s` per replica.
2. `DecodePool()`: the requests the replicas hold, summed, against the smallest batch any of them runs within the
   TBT bound.
3. Until a replica has measured its rates, its metric is missing and the pool keeps its target: a guess never
   scales a pool of engines that take a minute each to start.
4. A pool is sized from the replicas it asked for (`_committed`), not only the running ones: while a new replica
   starts (a minute), the load the running one holds dips and rises around its target, and a decision against
   the running count alone wished the new replica away and back every few seconds (seen in the e2e test).
serve_app/builder.py names these classes in each role's `autoscaling_config`.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.scheduling.pool_size import PoolDecision, decode_replicas, prefill_replicas

logger = logging.getLogger("ray.serve")


def _committed(ctx: Any) -> int:
    """4."""
    return max(ctx.current_num_replicas, ctx.target_num_replicas)


def _decided(ctx: Any, decision: PoolDecision | None) -> tuple[int, dict[str, Any]]:
    if decision is None:
        return ctx.target_num_replicas, ctx.policy_state
    # Serve calls the policy every ~0.1 s and applies its own delays: log a wish when it changes, not every tick.
    if decision.num_replicas != ctx.policy_state.get("wanted", ctx.target_num_replicas):
        logger.info("autoscaling %s: %d -> %d replicas wanted (%s)", ctx.deployment_name, ctx.target_num_replicas,
                    decision.num_replicas, decision.reason)
    return decision.num_replicas, {**ctx.policy_state, "reason": decision.reason, "wanted": decision.num_replicas}


class PrefillPool:
    """1."""

    def __init__(self, target_queue_s: float):
        self.target_queue_s = target_queue_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        queued = (ctx.aggregated_metrics or {}).get("pending_prompt_s") or {}
        decision = None if not queued else prefill_replicas(sum(queued.values()), self.target_queue_s,
                                                            _committed(ctx))
        return _decided(ctx, decision)


class DecodePool:
    """2."""

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        held, batches = metrics.get("num_requests") or {}, metrics.get("batch_within_tbt") or {}
        decision = None if not batches else decode_replicas(sum(held.values()), min(batches.values()),
                                                            _committed(ctx))
        return _decided(ctx, decision)
