"""Serve's request router for the engine deployments: a request goes to the replica the scheduler chose.

1. The hand-off names the replica in the call (`handle.generate.remote(request, chosen_replica=<unique id>)`, the
   Serve replica's `replica_id.unique_id`); the scheduler's engine ids are those ids.
2. `choose_replicas` offers Serve that one replica. Serve then asks it whether it has room, and while it has none
   retries with backoff: a request waits for the engine chosen for it rather than going elsewhere unaccounted.
3. A request that names no replica, or one that is gone (died, scaled down), gets Serve's own power of two
   choices: two random replicas, the one with the shorter queue.
No FIFO mixin: with it, a replica found for one request may serve an older one, which would break step 2.
(Not used yet: build_app sets it on the engine deployments when a policy that chooses engines is wired.)
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

CHOSEN_REPLICA_KWARG = "chosen_replica"


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
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        self._by_unique_id.pop(replica_id.unique_id, None)
        super().on_replica_actor_died(replica_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        wanted = (pending_request.kwargs or {}).get(CHOSEN_REPLICA_KWARG) if pending_request is not None else None
        chosen = getattr(self, "_by_unique_id", {}).get(wanted) if wanted else None
        if chosen is not None and chosen not in candidate_replicas:
            chosen = None  # filtered out by Serve (e.g. draining): the default choice
        return replicas_to_offer(candidate_replicas, chosen)
