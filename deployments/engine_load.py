"""An engine replica's load, as the routers' schedulers need it: kept by the replica, published through Serve.

1. A request arrives with the router's `Dispatch` (or none: a caller without a scheduler). `counted(dispatch)`
   holds it for as long as the replica works on it: its prompt tokens are pending until `prompt_done` (prefill's
   answer, or a stream's first chunk), and it is held until the block ends, however it ends.
2. Every count is kept per router replica too, so that each router can take its own share out of a report and put
   in its place what it knows of its own requests now (scheduling/loads.py): a report then never brings back a
   request that router already saw finish, nor misses one it sent since.
3. Serve's controller calls the replica's `record_routing_stats` every `scheduling.load_report_period_s`;
   `report` answers with a `LoadReport`: these counts, vLLM's own running requests, KV usage and prompt tokens
   computed so far (from the engine's stat logger), and the pure decode steps timed since the last report.
Plain state; the replica's event loop is its only writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from deployments.engine_counters import EngineCounters
from deployments.messages import Dispatch, LoadReport


@dataclass
class CountedRequest:
    """One request held by the replica; `prompt_done` once its prompt is computed (idempotent)."""

    tracker: LoadTracker
    router_id: str | None
    num_pending_prompt_tokens: int

    def prompt_done(self) -> None:
        if self.num_pending_prompt_tokens:
            self.tracker._add(self.router_id, 0, -self.num_pending_prompt_tokens)
            self.num_pending_prompt_tokens = 0


@dataclass
class LoadTracker:
    engine_id: str
    role: str
    num_pending_prompt_tokens: int = 0
    num_requests: int = 0  # accepted and not finished (what the router can see of this replica's work)
    # Router replica -> [its requests held here, their prompt tokens pending]: the shares of the two counts above.
    by_router: dict[str, list[int]] = field(default_factory=dict)

    # 1.
    @contextmanager
    def counted(self, dispatch: Dispatch | None) -> Iterator[CountedRequest]:
        router_id = dispatch.router_id if dispatch is not None else None
        request = CountedRequest(self, router_id, dispatch.num_prompt_tokens if dispatch is not None else 0)
        self._add(router_id, 1, request.num_pending_prompt_tokens)
        try:
            yield request
        finally:
            request.prompt_done()
            self._add(router_id, -1, 0)

    # 2.
    def _add(self, router_id: str | None, num_requests: int, num_tokens: int) -> None:
        self.num_requests += num_requests
        self.num_pending_prompt_tokens += num_tokens
        if router_id is None:
            return
        share = self.by_router.setdefault(router_id, [0, 0])
        share[0] += num_requests
        share[1] += num_tokens
        if share == [0, 0]:
            del self.by_router[router_id]  # a router that scaled away leaves nothing behind

    # 3.
    def report(self, counters: EngineCounters, decode_steps: list[tuple[int, float, int]]) -> LoadReport:
        return LoadReport(engine_id=self.engine_id, role=self.role,
                          num_pending_prompt_tokens=self.num_pending_prompt_tokens,
                          num_requests=self.num_requests,
                          num_running=min(counters.num_running_requests, self.num_requests),
                          kv_usage=counters.kv_cache_usage,
                          num_prompt_tokens_computed=counters.num_prompt_tokens_computed,
                          by_router={router_id: (share[0], share[1]) for router_id, share in self.by_router.items()},
                          decode_steps=decode_steps)
