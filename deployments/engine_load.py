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
4. The same reports keep what Serve's autoscaler asks each replica for (`autoscaling_stats`, serve_app/autoscaling.py):
   the engine's own prompt rate, measured over report periods during which it had prompts queued the whole time
   (so the seconds of prompt it holds), and its decode step against the batch (so the batch it runs within a TBT
   bound), both learned on this host, no constant.
Plain state; the replica's event loop is its only writer, and gives it the time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from deployments.engine_counters import EngineCounters
from deployments.messages import Dispatch, LoadReport
from deployments.scheduling.pool_size import batch_within_tbt
from deployments.scheduling.rates import WeightedLine


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
    # 4. Prompt tokens per second while prompts were queued (exponentially weighted), and the decode step's line.
    prompt_rate: WeightedLine = field(default_factory=WeightedLine)
    step_line: WeightedLine = field(default_factory=WeightedLine)
    _last_sample: tuple[float, int, int] | None = None  # (seconds, prompt tokens computed, pending) at a report

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
    def report(self, counters: EngineCounters, decode_steps: list[tuple[int, float, int]],
               now_s: float | None = None) -> LoadReport:
        if now_s is not None:
            self._learn(counters, decode_steps, now_s)
        return LoadReport(engine_id=self.engine_id, role=self.role,
                          num_pending_prompt_tokens=self.num_pending_prompt_tokens,
                          num_requests=self.num_requests,
                          num_running=min(counters.num_running_requests, self.num_requests),
                          kv_usage=counters.kv_cache_usage,
                          num_prompt_tokens_computed=counters.num_prompt_tokens_computed,
                          by_router={router_id: (share[0], share[1]) for router_id, share in self.by_router.items()},
                          decode_steps=decode_steps)

    # 4.
    def _learn(self, counters: EngineCounters, decode_steps: list[tuple[int, float, int]], now_s: float) -> None:
        computed, pending = counters.num_prompt_tokens_computed, self.num_pending_prompt_tokens
        if self._last_sample is not None:
            then_s, computed_then, pending_then = self._last_sample
            # Prompts queued at both ends: the engine worked on prompts the whole period (a queue that drained
            # in between would pass idle time for a slow rate).
            if pending_then > 0 and pending > 0 and now_s > then_s and computed > computed_then:
                self.prompt_rate.observe(0.0, (computed - computed_then) / (now_s - then_s))
        self._last_sample = (now_s, computed, pending)
        for batch_size, seconds, _ in decode_steps:
            self.step_line.observe(batch_size, seconds)

    def autoscaling_stats(self, *, max_num_seqs: int, tbt_slowdown: float) -> dict[str, float]:
        """Serve's custom autoscaling metrics for this replica: the requests it holds, the batch it runs within
        `tbt_slowdown` of its single-stream step, and (once its prompt rate is measured) the seconds of prompt
        compute it holds."""
        stats = {"num_requests": float(self.num_requests), "batch_within_tbt": float(
            batch_within_tbt(self.step_line.predict(1), self.step_line.slope, tbt_slowdown, max_num_seqs)
            if self.step_line.num_observations >= 2 else max_num_seqs)}
        if self.prompt_rate.num_observations and self.prompt_rate.intercept > 0:
            stats["pending_prompt_s"] = self.num_pending_prompt_tokens / self.prompt_rate.intercept
        return stats
