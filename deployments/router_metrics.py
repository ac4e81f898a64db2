"""What the client sees, measured at the router (deployments/metrics.py lists every splitserve metric)."""

from __future__ import annotations

import asyncio

from ray.serve import metrics

from deployments.metrics import export_zero

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
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
        for metric in (self.requests, self.ttft, self.tpot, self.e2e, self.in_flight, self.prefill_fallbacks):
            metric.set_default_tags(dict(tags))  # Serve adds its tags to the dict it is given
        self._num_in_flight = 0
        export_zero(self.prefill_fallbacks)

    def prefill_fallback(self) -> None:
        self.prefill_fallbacks.inc()

    async def refresh_gauges(self) -> None:
        """Runs for the router's lifetime: an idle router still reports 0 requests in flight."""
        while True:
            self.in_flight.set(self._num_in_flight)
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
