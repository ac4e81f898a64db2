"""Autoscaled pools: each replica's signals (engine_load.py), the pure decisions (scheduling/pool_size.py), Serve's
policies around them (serve_app/autoscaling.py) and the deployment options the builder gives Serve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig

from deployments.engine_counters import EngineCounters
from deployments.engine_load import LoadTracker
from deployments.messages import Dispatch
from deployments.scheduling.pool_size import DOWN_HEADROOM, batch_within_tbt, decode_replicas, prefill_replicas
from serve_app.autoscaling import DecodePool, PrefillPool
from serve_app.config import EngineRoleConfig, PoolAutoscalingConfig
from serve_app.placement import replica_count


def _ctx(metrics: dict[str, dict[str, float]], current: int, target: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=current,
                           target_num_replicas=current if target is None else target, policy_state={},
                           deployment_name="PrefillServer")


def test_a_pool_grows_at_once_to_what_its_load_needs_and_shrinks_only_with_headroom_left():
    # 1. Up: 5 s of prompts queued at 2 s per replica needs 3.
    assert prefill_replicas(5.0, 2.0, current=1).num_replicas == 3
    # 2. Held: 3 replicas for 3 s of prompts (1 s each, within 2 s but 3 s fits 2 only at 75% > 70% headroom).
    assert prefill_replicas(3.0, 2.0, current=3).num_replicas == 3
    # 3. Down to the count whose replicas stay within the headroom: 2.6 s fits 2 at 65% of 2 s each.
    assert prefill_replicas(2.6, 2.0, current=3).num_replicas == 2 and 2.6 / (2 * 2.0) <= DOWN_HEADROOM
    # 4. Idle: one replica, never none (the scheduler routes to the pool).
    assert prefill_replicas(0.0, 2.0, current=4).num_replicas == 1
    # 5. Decode: 20 requests held, 6 per replica within the TBT bound: 4 replicas.
    assert decode_replicas(20, 6, current=2).num_replicas == 4
    assert decode_replicas(20, 0, current=2).num_replicas == 2  # nothing measured: keep


def test_the_batch_within_the_tbt_bound_comes_from_the_measured_step_line():
    # Step 75 ms + 10 ms per stream: step(1) 85 ms; within 1.25x (106.25 ms) runs 3 (105 ms), not 4 (115 ms).
    assert batch_within_tbt(0.085, 0.010, 1.25, max_num_seqs=16) == 3
    assert batch_within_tbt(0.085, 0.0001, 1.25, max_num_seqs=16) == 16  # the engine's cap bounds it
    assert batch_within_tbt(0.0, 0.0, 1.25, max_num_seqs=16) == 16  # not measured: the cap stands for it


def test_a_replica_learns_its_prompt_rate_only_while_prompts_stay_queued_and_reports_held_seconds():
    tracker = LoadTracker("prefill-0-x", "prefill")

    def counters(computed: int) -> EngineCounters:
        return EngineCounters(num_prompt_tokens_computed=computed)

    tracker.report(counters(0), [], now_s=0.0)
    assert "pending_prompt_s" not in tracker.autoscaling_stats(max_num_seqs=16, tbt_slowdown=1.25)
    with tracker.counted(Dispatch(router_id="r", seq=1, num_prompt_tokens=3000)):
        # 1. Queued at both ends of each 0.5 s period, 200 tokens computed in each: 400 tokens/s.
        for step in range(1, 9):
            tracker.report(counters(200 * step), [], now_s=0.5 * step)
        stats = tracker.autoscaling_stats(max_num_seqs=16, tbt_slowdown=1.25)
        assert stats["pending_prompt_s"] == pytest.approx(3000 / 400) and stats["num_requests"] == 1
    # 2. The queue drained: a period that ends idle is no sample (its idle time is not the engine's speed).
    tracker.report(counters(1700), [], now_s=10.0)
    tracker.report(counters(1700), [], now_s=20.0)
    assert tracker.prompt_rate.intercept == pytest.approx(400)
    assert tracker.autoscaling_stats(max_num_seqs=16, tbt_slowdown=1.25)["pending_prompt_s"] == 0.0
    # 3. Decode steps timed by batch size give the batch within the bound.
    tracker.report(counters(1700), [(1, 0.085, 10), (4, 0.115, 10), (8, 0.155, 10)], now_s=21.0)
    assert tracker.autoscaling_stats(max_num_seqs=16, tbt_slowdown=1.25)["batch_within_tbt"] == 3


def test_serves_policies_scale_on_the_replicas_metrics_and_hold_until_they_are_measured():
    prefill = PrefillPool(target_queue_s=2.0)
    # 1. No replica has measured its rate: the target stays.
    assert prefill(_ctx({}, current=1, target=1))[0] == 1
    # 2. Two replicas hold 3.5 s and 4 s of prompts: 4 replicas.
    replicas, state = prefill(_ctx({"pending_prompt_s": {"a": 3.5, "b": 4.0}}, current=2))
    assert replicas == 4 and "needs 4" in state["reason"]
    # 3. Decode: the smallest batch within the bound decides (a slower replica must not be overfilled).
    decode = DecodePool()
    assert decode(_ctx({"num_requests": {"a": 9, "b": 9}, "batch_within_tbt": {"a": 8, "b": 6}}, current=2))[0] == 3
    assert decode(_ctx({"num_requests": {"a": 1}, "batch_within_tbt": {"a": 8}}, current=3))[0] == 1
    # 4. A second replica is starting (1 running, 2 asked for): the running one's 1.5 s of prompts, at 2 s each,
    #    fits the two within the headroom, so the new replica is kept, not wished away while it starts.
    assert prefill(_ctx({"pending_prompt_s": {"a": 1.5}}, current=1, target=2))[0] == 2


def test_an_autoscaled_role_becomes_serves_autoscaling_config_with_its_pools_policy():
    assert replica_count("prefill", EngineRoleConfig(num_replicas=2)) == {"num_replicas": 2}
    bounds = PoolAutoscalingConfig(min_replicas=1, max_replicas=3, target_queue_s=1.5)
    for role_name, policy in (("prefill", "serve_app.autoscaling:PrefillPool"),
                              ("decode", "serve_app.autoscaling:DecodePool")):
        options = replica_count(role_name, EngineRoleConfig(num_replicas=1, autoscaling=bounds))
        config = AutoscalingConfig(**options["autoscaling_config"])  # Serve's own model accepts it
        assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (1, 3, 1)
        assert config.policy.policy_function == policy and callable(config.policy.get_policy())
    assert replica_count("prefill", EngineRoleConfig(autoscaling=bounds))["autoscaling_config"]["policy"][
        "policy_kwargs"] == {"target_queue_s": 1.5}
    collocated = replica_count("collocated", EngineRoleConfig(num_replicas=2, max_num_seqs=8, autoscaling=bounds))
    assert collocated["autoscaling_config"]["target_ongoing_requests"] == 8
    # An autoscaled role admits what its largest size works on: the queue that builds is what makes it grow.
    assert EngineRoleConfig(num_replicas=1, max_num_seqs=16, autoscaling=bounds).num_admissible == 3 * 16 + 32


@pytest.mark.parametrize(("role", "message"), [
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) is above max_replicas (2)"),
    ({"num_replicas": 4, "autoscaling": {"max_replicas": 3}}, "num_replicas (4) is where autoscaling starts"),
    ({"autoscaling": {"min_replicas": 0}}, "min_replicas"),
    ({"autoscaling": {"target_queue_s": 0}}, "target_queue_s"),
])
def test_bad_autoscaling_bounds_are_refused_with_the_values_named(role, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineRoleConfig(**role)
