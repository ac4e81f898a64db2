"""The router's scheduler: the policy's decision for each request, carried out on the replicas Serve runs now.

1. `refresh` (before each decision; O(1) while nothing changed): the newest routing stats of the prefill and
   decode replicas (replica_choice.py) become the book's `EngineLoad`s, keyed by Serve replica id; the decode
   steps they timed feed the rates; replicas that are gone leave the book. When new reports came, every engine
   is re-keyed under the current rates (O(engines) per report period, never per decision).
2. `decide(request, path)`: the prompt's size (prompt_size.py), then the policy (scheduling/policies.py). A path
   forced by the operator (`scheduling.allow_path_override`) takes its engines from the same book.
3. `dispatch(engine, tokens)`: the `Dispatch` the call carries (Serve's request router sends it to that replica;
   the replica counts it in its reports as this router's) and the book's live count of this router's own requests.
   Its `Flight` closes it: `prompt_done` at the first token or KV handle, `request_done` when the engine's part
   ends (a stream's [DONE] before the client reads it), both once.
4. What the router observes feeds the rates (a prompt on an engine that had nothing ahead, a split's hand-over),
   the policy (how long answers are), and the metrics (decisions per path, measured TTFT against the prediction).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.messages import Dispatch, LoadReport, OpenAIRequest
from deployments.scheduling.loads import EngineLoad, LoadBook, Role
from deployments.scheduling.policies import Decision, Path, Policy, RequestFacts, make_policy
from deployments.scheduling.rates import Rates
from serve_app.config import SchedulingConfig

logger = logging.getLogger("ray.serve")

RoutingStatsSource = Callable[[str], tuple[int, dict[str, dict[str, Any]]]]
# Recent TTFT predictions kept for /health's error figures.
NUM_RECENT_PREDICTIONS = 256


@dataclass
class Flight:
    """One dispatched call, closed exactly once per step whatever way the request ends."""

    scheduler: Scheduler
    engine_id: str | None
    dispatch: Dispatch
    started: float = field(default_factory=time.perf_counter)
    is_prompt_done: bool = False
    is_done: bool = False

    def prompt_done(self) -> float:
        """Marks the prompt computed; returns the seconds since dispatch."""
        seconds = time.perf_counter() - self.started
        if not self.is_prompt_done:
            self.is_prompt_done = True
            if self.engine_id is not None:
                self.scheduler.book.prompt_done(self.engine_id, self.dispatch.seq)
        return seconds

    def request_done(self) -> None:
        self.prompt_done()
        if not self.is_done:
            self.is_done = True
            if self.engine_id is not None:
                self.scheduler.book.request_done(self.engine_id, self.dispatch.seq)


class Scheduler:
    def __init__(self, config: SchedulingConfig, *, router_id: str, prefill_deployment: str,
                 decode_deployment: str, prompt_size: Callable[[OpenAIRequest], int],
                 routing_stats: RoutingStatsSource, decode_chunk_tokens: int = 2048,
                 prefill_chunk_tokens: int = 2048):
        self.config = config
        self.policy: Policy = make_policy(config, decode_chunk_tokens=decode_chunk_tokens,
                                          prefill_chunk_tokens=prefill_chunk_tokens)
        self.rates = Rates(min_observations=config.min_observations)
        self.book = LoadBook(drain_time=self.rates.drain_s)
        self._router_id = router_id
        self._deployments: dict[Role, str] = {"prefill": prefill_deployment, "decode": decode_deployment}
        self._prompt_size = prompt_size
        self._routing_stats = routing_stats
        self._versions: dict[Role, int] = {"prefill": 0, "decode": 0}
        self._replica_of_engine: dict[str, str] = {}  # engine id (in KV handles) -> Serve replica id
        self._seq = 0
        self.decisions: Counter[str] = Counter()
        self.recent_predictions: deque[tuple[str, float, float]] = deque(maxlen=NUM_RECENT_PREDICTIONS)

    # 1. Reports.
    def refresh(self) -> None:
        self.book.now_s = time.monotonic()
        has_new_reports = False
        for role, deployment in self._deployments.items():
            version, stats = self._routing_stats(deployment)
            if version == self._versions[role]:
                continue
            self._versions[role], has_new_reports = version, True
            self._take_reports(role, stats)
        if has_new_reports:
            self.book.refresh_keys()

    def _take_reports(self, role: Role, stats: dict[str, dict[str, Any]]) -> None:
        for replica_id in set(self.book.engine_ids(role)) - set(stats):
            self.book.remove(replica_id)  # gone: died or scaled down
        for replica_id, replica_stats in stats.items():
            report = LoadReport.from_routing_stats(replica_stats)
            if report is None:
                continue  # starting: no report yet
            self._replica_of_engine[report.engine_id] = replica_id
            for batch_size, seconds, _ in report.decode_steps:
                self.rates.observe_decode_step(replica_id, batch_size, seconds)
            load = self._engine_load(replica_id, role, report)
            previous = self.book.engine(replica_id)
            if previous is None or previous.reported != load:  # an unchanged engine keeps its heap entry
                self.book.report(load)

    def _engine_load(self, replica_id: str, role: Role, report: LoadReport) -> EngineLoad:
        num_own_requests, num_own_pending_prompt_tokens = report.by_router.get(self._router_id, (0, 0))
        return EngineLoad(engine_id=replica_id, role=role, num_pending_prompt_tokens=report.num_pending_prompt_tokens,
                          num_running=report.num_running, num_waiting=report.num_requests - report.num_running,
                          kv_usage=report.kv_usage, num_prompt_tokens_computed=report.num_prompt_tokens_computed,
                          num_own_requests=num_own_requests,
                          num_own_pending_prompt_tokens=num_own_pending_prompt_tokens)

    def addressed_to(self, engine_id: str) -> Dispatch:
        """A call for the replica that runs the engine named in a KV handle (a release), no load: Serve's own
        choice while that replica has not reported yet."""
        self._seq += 1
        return Dispatch(router_id=self._router_id, seq=self._seq, replica_id=self._replica_of_engine.get(engine_id))

    # 2. Decisions.
    def decide(self, request: OpenAIRequest, path: Path | None = None) -> tuple[Decision, int]:
        """The decision for `request` and its prompt size in tokens."""
        self.refresh()
        num_prompt_tokens = self._prompt_size(request)
        facts = RequestFacts(request.request_id, num_prompt_tokens)
        if path is None:
            decision = self.policy.decide(facts, self.book, self.rates)
        else:
            decision = Decision(path, self.book.least_loaded("prefill") if path != Path.DECODE_LOCAL else None,
                                self.book.least_loaded("decode") if path != Path.PREFILL_LOCAL else None,
                                "path forced by the request")
        self.decisions[decision.path.value] += 1
        logger.info("request %s: %s (%s) for %d prompt tokens on prefill %s, decode %s%s", request.request_id,
                    decision.path.value, decision.reason, num_prompt_tokens, decision.prefill_engine,
                    decision.decode_engine, "" if decision.predicted_ttft_s is None
                    else f", predicted TTFT {decision.predicted_ttft_s * 1e3:.0f} ms")
        return decision, num_prompt_tokens

    # 3. Dispatches.
    def dispatch(self, engine_id: str | None, num_prompt_tokens: int) -> Flight:
        self._seq += 1
        dispatch = Dispatch(router_id=self._router_id, seq=self._seq, replica_id=engine_id,
                            num_prompt_tokens=num_prompt_tokens)
        if engine_id is not None:
            self.book.dispatched(engine_id, dispatch.seq, num_prompt_tokens)
        return Flight(self, engine_id, dispatch)

    # 4. Observations.
    def is_idle(self, engine_id: str | None) -> bool:
        """Nothing ahead on the engine now: a prompt sent to it measures its prefill rate."""
        engine = self.book.engine(engine_id) if engine_id is not None else None
        return engine is not None and engine.num_requests == 0 and engine.num_pending_prompt_tokens == 0

    def observed_prefill(self, engine_id: str | None, num_prompt_tokens: int, seconds: float) -> None:
        if engine_id is not None and num_prompt_tokens > 0:
            self.rates.observe_prefill(engine_id, num_prompt_tokens, seconds)

    def observed_handover(self, decode_engine: str | None, num_prompt_tokens: int, seconds: float,
                          num_ahead: int) -> None:
        """A split's decode call to its first token, sent with `num_ahead` requests already on the decode engine:
        the KV hand-over (and the engine's wait when busy) plus one decode step of the batch it joined."""
        if decode_engine is None:
            return  # Serve's own pick: which engine waited is unknown
        step_s = self.rates.decode_step_s(decode_engine, num_ahead + 1)
        self.rates.observe_handover(decode_engine, num_prompt_tokens, num_ahead, max(0.0, seconds - step_s))

    def observed_output(self, num_tokens: int) -> None:
        """A request answered in full had `num_tokens` output tokens: policies that weigh output length learn it."""
        observe = getattr(self.policy, "observe_output", None)
        if observe is not None and num_tokens > 0:
            observe(num_tokens)

    def observed_ttft(self, decision: Decision, seconds: float, request_id: str = "") -> None:
        if decision.predicted_ttft_s is not None and decision.predicted_ttft_s > 0:
            self.recent_predictions.append((decision.path.value, decision.predicted_ttft_s, seconds))
            logger.info("request %s: first token %.0f ms after its decision (predicted %.0f ms)", request_id,
                        seconds * 1e3, decision.predicted_ttft_s * 1e3)

    def summary(self) -> dict[str, Any]:
        """For /health: this router (of several), the policy, its decisions, each engine's estimated load (its own
        requests there among them), the prediction error."""
        engines = {}
        for role in ("prefill", "decode"):
            for replica_id in self.book.engine_ids(role):
                engine = self.book.engine(replica_id)
                engines[replica_id] = {"role": role, "num_pending_prompt_tokens": engine.num_pending_prompt_tokens,
                                       "num_requests": engine.num_requests, "num_own_requests": engine.num_own_requests,
                                       "kv_usage": engine.reported.kv_usage,
                                       "prompt_tokens_per_s": round(self.book.prompt_tokens_per_s(replica_id), 1)}
        errors = [abs(measured / predicted - 1) for _, predicted, measured in self.recent_predictions]
        return {"router_id": self._router_id, "policy": self.policy.name, "decisions": dict(self.decisions),
                "rates_known": self.rates.is_known(),
                "rates": self.rates.summary(),
                "engines": engines, "num_recent_predictions": len(errors),
                "ttft_prediction_median_abs_error": sorted(errors)[len(errors) // 2] if errors else None}
