"""What the client sees, measured at the router (deployments/metrics.py lists every splitserve metric)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray.serve import metrics

from deployments.metrics import export_zero

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
# Measured TTFT over the scheduler's prediction: 1 is a perfect prediction.
PREDICTION_RATIO_BUCKETS = [0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4]
TOKEN_LATENCY_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2]
# Ray drops a gauge's series unless it is set again within two metric-export intervals (20 s by default).
GAUGE_REFRESH_S = 5.0


class RouterMetrics:
    def __init__(self, model: str):
        tags = {"model": model}
        self.requests = metrics.Counter("splitserve_requests", "Requests answered, by route and status code.",
                                        tag_keys=("model", "route_path", "status_code"))
        self.ttft = metrics.Histogram("splitserve_ttft_seconds", "Time to first token of streamed responses.",
                                      boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
        self.tpot = metrics.Histogram("splitserve_tpot_seconds", "Time per output token after the first (streams).",
                                      boundaries=TOKEN_LATENCY_BUCKETS_S, tag_keys=("model",))
        self.e2e = metrics.Histogram("splitserve_e2e_seconds", "End-to-end latency of answered requests.",
                                     boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
        self.in_flight = metrics.Gauge("splitserve_requests_in_flight", "Requests the router is serving now.",
                                       tag_keys=("model",))
        self.prefill_fallbacks = metrics.Counter(
            "splitserve_prefill_fallbacks", "Requests whose prefill failed, so that decode computed the prompt itself.",
            tag_keys=("model",))
        self.decisions = metrics.Counter(
            "splitserve_scheduling_decisions", "Requests by the path the scheduler chose (split, decode_local, "
            "prefill_local) and its policy.", tag_keys=("model", "policy", "path"))
        self.ttft_prediction_ratio = metrics.Histogram(
            "splitserve_ttft_prediction_ratio", "Measured time to first token over the scheduler's prediction.",
            boundaries=PREDICTION_RATIO_BUCKETS, tag_keys=("model", "policy", "path"))
        self.pending_prompt_tokens = metrics.Gauge(
            "splitserve_engine_pending_prompt_tokens", "Prompt tokens each engine holds not yet computed, as the "
            "router's scheduler estimates them.", tag_keys=("model", "engine", "role"))
        self.engine_requests = metrics.Gauge(
            "splitserve_engine_requests", "Requests each engine holds, as the router's scheduler estimates them.",
            tag_keys=("model", "engine", "role"))
        for metric in (self.requests, self.ttft, self.tpot, self.e2e, self.in_flight, self.prefill_fallbacks,
                       self.decisions, self.ttft_prediction_ratio, self.pending_prompt_tokens, self.engine_requests):
            metric.set_default_tags(dict(tags))  # Serve adds its tags to the dict it is given
        self._num_in_flight = 0
        export_zero(self.prefill_fallbacks)

    def prefill_fallback(self) -> None:
        self.prefill_fallbacks.inc()

    def decided(self, policy: str, path: str, ttft_s: float | None, predicted_ttft_s: float | None) -> None:
        """A scheduled request got its first token (streams: `ttft_s` after its decision)."""
        tags = {"policy": policy, "path": path}
        self.decisions.inc(tags=tags)
        if predicted_ttft_s and ttft_s is not None:
            self.ttft_prediction_ratio.observe(ttft_s / predicted_ttft_s, tags=tags)

    async def refresh_gauges(self, engine_loads: Callable[[], dict[str, dict[str, Any]]] = dict) -> None:
        """Runs for the router's lifetime: an idle router still reports 0 requests in flight, and each engine's
        load as its scheduler estimates it (`engine_loads`: the scheduler summary's `engines`)."""
        while True:
            self.in_flight.set(self._num_in_flight)
            for engine_id, load in engine_loads().items():
                tags = {"engine": engine_id, "role": load["role"]}
                self.pending_prompt_tokens.set(load["num_pending_prompt_tokens"], tags=tags)
                self.engine_requests.set(load["num_requests"], tags=tags)
            await asyncio.sleep(GAUGE_REFRESH_S)

    def started(self) -> None:
        self._num_in_flight += 1
        self.in_flight.set(self._num_in_flight)

    def finished(self, *, route: str, status_code: int, e2e_s: float, ttft_s: float | None = None,
                 num_output_chunks: int = 0) -> None:
        self._num_in_flight -= 1
        self.in_flight.set(self._num_in_flight)
        self.requests.inc(tags={"route_path": route, "status_code": str(status_code)})
        if status_code != 200:
            return
        self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if num_output_chunks > 1:
                self.tpot.observe((e2e_s - ttft_s) / (num_output_chunks - 1))
