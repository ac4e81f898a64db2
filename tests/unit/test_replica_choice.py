"""Serve's request router for the engine deployments, with fake replicas: a request that names a replica is offered
that replica only; one that names none, or a replica that is gone, gets two at random (power of two choices)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from deployments.messages import Dispatch
from deployments.replica_choice import ChosenReplicaRouter, replicas_to_offer


def _replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def _router(replicas: list[SimpleNamespace]) -> ChosenReplicaRouter:
    router = ChosenReplicaRouter(deployment_id=DeploymentID(name="PrefillServer", app_name="splitserve"),
                                 handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    router._by_unique_id = {replica.replica_id.unique_id: replica for replica in replicas}  # what update_replicas keeps
    return router


def _to(unique_id: str) -> Dispatch:
    return Dispatch(router_id="router-replica", seq=0, replica_id=unique_id)


def _choose(router: ChosenReplicaRouter, candidates: list, **kwargs) -> list[list]:
    return asyncio.run(router.choose_replicas(candidates, SimpleNamespace(kwargs=kwargs)))


def test_the_chosen_replica_is_the_only_one_offered():
    replicas = [_replica(f"r{index}") for index in range(5)]
    router = _router(replicas)
    assert _choose(router, replicas, dispatch=_to("r3")) == [[replicas[3]]]


def test_no_choice_or_a_gone_replica_gets_two_at_random():
    replicas = [_replica(f"r{index}") for index in range(5)]
    router = _router(replicas)
    for ranks in (_choose(router, replicas), _choose(router, replicas, dispatch=_to("r9"))):
        assert len(ranks) == 1 and len(ranks[0]) == 2 and set(map(id, ranks[0])) <= set(map(id, replicas))
    # A replica Serve left out of the candidates (draining) is not offered either.
    assert replicas[3] not in _choose(router, replicas[:3], dispatch=_to("r3"))[0]


def test_power_of_two_on_small_sets():
    rng = random.Random(0)
    assert replicas_to_offer([], None, rng=rng) == []
    only = _replica("r0")
    assert replicas_to_offer([only], None, rng=rng) == [[only]]


SHIPPED_ROUTER_CHECK = """
import asyncio, pickle, sys
from types import SimpleNamespace
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
from deployments import replica_choice
shipped = pickle.loads(sys.stdin.buffer.read())
assert shipped is not replica_choice.ChosenReplicaRouter
assert shipped.update_replicas.__globals__ is not vars(replica_choice)  # a copy of the module's globals

async def main():
    deployment = DeploymentID(name="PrefillServer", app_name="splitserve")
    router = shipped(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    replica = SimpleNamespace(replica_id=ReplicaID(unique_id="r0", deployment_id=deployment),
                              routing_stats={"load": {"role": "prefill"}}, multiplexed_model_ids=set(),
                              node_id="n0", availability_zone=None, max_ongoing_requests=1)
    try:
        router.update_replicas([replica])
    except Exception:
        pass  # Serve's own bookkeeping after ours may want more of a real replica than this fake has
    print(replica_choice.latest_routing_stats("PrefillServer"))

asyncio.run(main())
"""


def test_routing_stats_reach_the_scheduler_even_from_a_router_class_shipped_by_value():
    """Serve ships the request-router class by value (cloudpickle, with a copy of its module's globals) to the
    process that routes; the stats it is given must still land on the board the router's scheduler reads there."""
    import subprocess
    import sys

    import cloudpickle

    from deployments import replica_choice

    cloudpickle.register_pickle_by_value(replica_choice)
    try:
        shipped = cloudpickle.dumps(ChosenReplicaRouter)
    finally:
        cloudpickle.unregister_pickle_by_value(replica_choice)
    result = subprocess.run([sys.executable, "-c", SHIPPED_ROUTER_CHECK], input=shipped, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().strip().splitlines()[-1] == "(1, {'r0': {'load': {'role': 'prefill'}}})"
