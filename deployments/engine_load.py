"""An engine replica's load, as the routers' schedulers need it: kept by the replica, published through Serve.

1. A request arrives with the router's `Dispatch` (or none: a caller without a scheduler). `admitted` counts its
   prompt tokens as pending and remembers the dispatch number, per router replica.
2. When the engine has computed the prompt (prefill's answer, or the first chunk of a stream), `prompt_done`
   takes its tokens off; `finished` when the request is over, however it ended.
3. Serve's controller calls the replica's `record_routing_stats` every `scheduling.load_report_period_s`;
   `report` answers with a `LoadReport`: these counts, vLLM's own running requests and KV usage (from the engine's
   stat logger), the pure decode steps timed since the last report, and the dispatch numbers already counted, so
   that each router adds only what it sent since (scheduling/loads.py).
Plain state; the replica's event loop is its only writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deployments.engine_counters import EngineCounters
from deployments.messages import Dispatch, LoadReport


@dataclass
class LoadTracker:
    engine_id: str
    role: str
    num_pending_prompt_tokens: int = 0
    num_requests: int = 0  # accepted and not finished (what the router can see of this replica's work)
    seen_dispatches: dict[str, int] = field(default_factory=dict)

    # 1.
    def admitted(self, dispatch: Dispatch | None) -> int:
        """Counts a request in; returns the prompt tokens it holds pending (to pass to `prompt_done`)."""
        self.num_requests += 1
        if dispatch is None:
            return 0
        self.num_pending_prompt_tokens += dispatch.num_prompt_tokens
        self.seen_dispatches[dispatch.router_id] = max(dispatch.seq, self.seen_dispatches.get(dispatch.router_id, -1))
        return dispatch.num_prompt_tokens

    # 2.
    def prompt_done(self, num_prompt_tokens: int) -> None:
        self.num_pending_prompt_tokens = max(0, self.num_pending_prompt_tokens - num_prompt_tokens)

    def finished(self) -> None:
        self.num_requests = max(0, self.num_requests - 1)

    # 3.
    def report(self, counters: EngineCounters, decode_steps: list[tuple[int, float, int]]) -> LoadReport:
        return LoadReport(engine_id=self.engine_id, role=self.role,
                          num_pending_prompt_tokens=self.num_pending_prompt_tokens,
                          num_requests=self.num_requests,
                          num_running=min(counters.num_running_requests, self.num_requests),
                          kv_usage=counters.kv_cache_usage, seen_dispatches=dict(self.seen_dispatches),
                          decode_steps=decode_steps)
