"""Serve's request router for the engine deployments: a request goes to the replica the scheduler chose.

1. The hand-off names the replica in the call's `Dispatch` (`handle.prefill.remote(request, dispatch=...)`, its
   `replica_id` is the Serve replica's `replica_id.unique_id`); the scheduler's engine ids are those ids.
2. `choose_replicas` offers Serve that one replica. Serve then asks it whether it has room, and while it has none
   retries with backoff: a request waits for the engine chosen for it rather than going elsewhere unaccounted.
3. A request that names no replica, or one that is gone (died, scaled down), gets Serve's own power of two
   choices: two random replicas, the one with the shorter queue.
4. Every replica's routing stats (its `LoadReport`, engine_server.py) arrive here with each replica update that
   Serve's controller broadcasts; `latest_routing_stats(deployment)` gives the router's scheduler the newest,
   with a version that says whether they changed. This router runs on Serve's router thread, the scheduler on
   the replica's event loop: one reference swapped whole, never a structure shared while it changes.
No FIFO mixin: with it, a replica found for one request may serve an older one, which would break step 2.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

DISPATCH_KWARG = "dispatch"

# Per deployment name (in this process): (version, {replica unique id: routing stats}).
_latest: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}


def _board() -> dict[str, tuple[int, dict[str, dict[str, Any]]]]:
    """`_latest` of this module as imported. Serve ships a request-router class by value (cloudpickle), with a
    copy of this module's globals: a plain `_latest` there would be a second board nobody reads."""
    return importlib.import_module(__name__)._latest


def latest_routing_stats(deployment_name: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """The newest routing stats of the deployment's replicas seen by any request router in this process; version
    0 and nothing before the first update (a handle's router starts with its first request)."""
    return _board().get(deployment_name, (0, {}))


def _publish(deployment_name: str, replicas: list[Any]) -> None:
    board = _board()
    version = board.get(deployment_name, (0, {}))[0] + 1
    board[deployment_name] = (version, {replica.replica_id.unique_id: dict(replica.routing_stats or {})
                                        for replica in replicas})


def replicas_to_offer(candidates: list[Any], chosen: Any | None, *, rng: random.Random = random) -> list[list[Any]]:
    """One rank: the chosen replica if it is among the candidates, else two at random (power of two choices)."""
    if chosen is not None:
        return [[chosen]]
    return [rng.sample(candidates, min(2, len(candidates)))] if candidates else []


class ChosenReplicaRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._by_unique_id: dict[str, RunningReplica] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        self._by_unique_id = {replica.replica_id.unique_id: replica for replica in replicas}
        _publish(self._deployment_id.name, replicas)
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        self._by_unique_id.pop(replica_id.unique_id, None)
        super().on_replica_actor_died(replica_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        dispatch = (pending_request.kwargs or {}).get(DISPATCH_KWARG) if pending_request is not None else None
        wanted = getattr(dispatch, "replica_id", None)
        chosen = getattr(self, "_by_unique_id", {}).get(wanted) if wanted else None
        if chosen is not None and chosen not in candidate_replicas:
            chosen = None  # filtered out by Serve (e.g. draining): the default choice
        return replicas_to_offer(candidate_replicas, chosen)
