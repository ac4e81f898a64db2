"""What every engine replica shares (prefill, decode, collocated): one vLLM engine per replica, its counters, its
health, its status, and the way its answers go back to the router.

1. `_start_engine` names the engine (`<role>-<replica rank>-<random>`, also in KV handles and logs) and starts it
   on this replica's cores (deployments/engine.py).
2. `_answers` yields what vLLM returned: its SSE strings one by one when the request streams, else the one
   response object or `ErrorResponse`. The router always calls a replica as a stream and reads the first item.
3. Serve calls `check_health` every 10 s: a dead engine fails it, and Serve replaces the replica.
4. Prefill and decode replicas keep their load (engine_load.py, `self._load`): a request is `counted` with the
   router's `Dispatch` while the replica works on it, its prompt pending until computed. Serve's controller
   calls `record_routing_stats` every few hundred milliseconds and hands the `LoadReport` to every router; an
   autoscaled role's replicas also answer `record_autoscaling_stats` (serve_app/autoscaling.py).
5. Under `scheduling_policy: shortest_first` every request gets its place in the engine's queue here
   (`_in_order`, scheduling/prompt_order.py), from the prompt size its `Dispatch` carries and the tokens the
   engine has computed so far.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from deployments.engine import Engine, this_node_ip
from deployments.engine_counters import EngineCounters
from deployments.engine_load import LoadTracker
from deployments.messages import Dispatch, RoleStatus
from deployments.scheduling.prompt_order import shortest_first_priority
from kv_transfer.config import TransferConfig
from kv_transfer.handle_signing import HandleSigner
from serve_app.config import AppConfig, EngineRoleConfig

logger = logging.getLogger("ray.serve")

# Serve's health check of an engine replica: every 10 s, 30 s to answer (an engine step can take seconds on CPU).
HEALTH_CHECK = {"health_check_period_s": 10, "health_check_timeout_s": 30}


class EngineServer:
    role_name = "engine"
    engine_id = ""
    transfer_backend: str | None = None  # how KV leaves or arrives (prefill, decode)
    kv_store: str | None = None  # the KV store's actor name (prefill on the object store)
    node_ip: str | None = None  # the Ray node this replica runs on
    _engine: Engine | None = None
    _load: LoadTracker | None = None
    _shortest_first_aging: float | None = None  # None: the engine orders prompts itself (fcfs, or their priority)

    def _name_engine(self) -> int:
        """Names this replica's engine; returns the replica's rank (which picks its cores)."""
        rank = serve.get_replica_context().rank.local_rank
        self.engine_id = f"{self.role_name}-{rank}-{uuid.uuid4().hex[:8]}"
        return rank

    def _name_kv_engine(self, config: AppConfig, kv_handle_key: str) -> int:
        """Prefill and decode: `_name_engine`, plus the app's transfer settings and the key that signs and checks
        KV handles (only the app's replicas have it)."""
        self._config = config
        self._signer = HandleSigner(kv_handle_key)
        self.transfer_backend = config.transfer.backend
        return self._name_engine()

    async def _start_engine(self, config: AppConfig, role: EngineRoleConfig, rank: int, *,
                            transfer: TransferConfig | None = None, is_kv_producer: bool = False) -> None:
        self._engine = await Engine.start(config.model, role, replica_rank=rank, role_name=self.role_name,
                                          transfer=transfer, engine_id=self.engine_id, is_kv_producer=is_kv_producer)
        self.node_ip = this_node_ip()
        if transfer is not None:  # prefill and decode are scheduled; collocated engines are Serve's to pick
            self._load = LoadTracker(self.engine_id, self.role_name)
            self._role = role
        if role.scheduling_policy == "shortest_first":
            self._shortest_first_aging = role.shortest_first_aging

    def _in_order(self, request: Any, dispatch: Dispatch | None) -> Any:
        """`request` with its place in the engine's queue (shortest_first), else unchanged. A client's own
        `priority` is replaced: the order is the operator's choice. Without a dispatch, no size: the clock."""
        if self._shortest_first_aging is None:
            return request
        num_prompt_tokens = dispatch.num_prompt_tokens if dispatch is not None else 0
        priority = shortest_first_priority(num_prompt_tokens, self._engine.counters().num_prompt_tokens_computed,
                                           self._shortest_first_aging)
        return request.model_copy(update={"priority": priority})

    # 4. Load.
    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook: this replica's `LoadReport`, for the routers' schedulers."""
        if self._load is None:  # the engine is still starting, or not scheduled (collocated)
            return {}
        return self._load.report(self._engine.counters(), self._engine.take_decode_steps(),
                                 now_s=time.monotonic()).to_routing_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics, for an autoscaled prefill or decode role (serve_app/autoscaling.py):
        what this replica holds, in the units its role's policy scales on."""
        if self._load is None:
            return {}
        return self._load.autoscaling_stats(max_num_seqs=self._role.max_num_seqs,
                                            tbt_slowdown=self._config.scheduling.tbt_mean_slowdown)

    @staticmethod
    async def _answers(result: Any) -> AsyncGenerator[Any, None]:
        if isinstance(result, AsyncGenerator):
            async for chunk in result:
                yield chunk
        else:
            yield result

    async def _counted_answers(self, request: Any, dispatch: Dispatch | None) -> AsyncGenerator[Any, None]:
        """`_answers` of one request run on this engine, with its load counted: its prompt is done at the first
        chunk, and it is finished however the stream ends (done, failed, cancelled by the router)."""
        with self._load.counted(dispatch) as counted:
            result = await self._engine.generate(self._in_order(request, dispatch))
            async for answer in self._answers(result):
                counted.prompt_done()
                yield answer

    # Every method takes the optional `dispatch` by which a caller addresses one replica (replica_choice.py).
    def counters(self, dispatch: Dispatch | None = None) -> EngineCounters:
        return self._engine.counters()

    def recent_transfer_seconds(self, dispatch: Dispatch | None = None) -> list[float]:
        """Each of the engine's latest KV transfers' seconds, oldest first: tails for the benchmarks."""
        return self._engine.recent_transfer_seconds()

    def role(self, dispatch: Dispatch | None = None) -> RoleStatus:
        side_channel = None
        if self.transfer_backend == "nixl":  # what engine.py put in this process's environment for vLLM
            side_channel = ":".join(os.environ.get(name, "?") for name in ("VLLM_NIXL_SIDE_CHANNEL_HOST",
                                                                             "VLLM_NIXL_SIDE_CHANNEL_PORT"))
        return RoleStatus(role=self.role_name, engine_id=self.engine_id, is_engine_alive=self._engine.is_alive,
                          transfer_backend=self.transfer_backend, kv_store=self.kv_store,
                          node_ip=self.node_ip, side_channel=side_channel)

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
