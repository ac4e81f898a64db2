"""splitserve's own metrics, through Ray's metrics system: on every node's Prometheus endpoint (names get Ray's
`ray_` prefix), on the Ray dashboard, and in the Grafana dashboard (grafana/splitserve.json).

All are `ray.serve.metrics` metrics, so Serve tags each with its deployment, replica and application; `model` is
the served model name. What vLLM already measures (queues, running requests, KV-cache usage, vLLM's own TTFT and
TPOT) is re-exported through Ray by vLLM's `RayPrometheusStatLogger` (deployments/engine.py), not re-invented:
those `ray_vllm_*` series carry the replica's `WorkerId`, which the Grafana dashboard joins to its deployment,
so prefill's and decode's queues show side by side.

1. `RouterMetrics`: what the client sees — requests by route and status code, TTFT and time per output token of
   streams, end-to-end latency, requests in flight.
2. `KVTransferMetrics`: every KV transfer an engine's connector reports — bytes, duration and bandwidth, by
   backend and role; failed transfers (each makes decode recompute the prompt: the fallback); leases expired.
"""

from __future__ import annotations

import asyncio

from ray.serve import metrics

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
TOKEN_LATENCY_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2]
TRANSFER_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5]
BYTES_BUCKETS = [2**20 * size for size in (1, 4, 16, 32, 64, 128, 256, 512, 1024)]
BANDWIDTH_BUCKETS = [1e9 * rate for rate in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)]  # bytes/s
# Ray drops a gauge's series unless it is set again within two metric-export intervals (20 s by default).
GAUGE_REFRESH_S = 5.0


def export_zero(counter: metrics.Counter) -> None:
    """Makes an event counter (failures, expirations) exist at 0 before its first event, so that dashboards show 0
    rather than "no data". Ray's public `inc` refuses 0; its `_record` is what `inc` calls."""
    counter._record(0)


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


class KVTransferMetrics:
    """Fed by the engine's stat logger with vLLM's KV-connector stats (lists with one entry per transfer)."""

    def __init__(self, model: str, backend: str, role: str):
        tag_keys = ("model", "backend", "role")
        self.bytes = metrics.Histogram("splitserve_kv_transfer_bytes", "Bytes of KV per transfer.",
                                       boundaries=BYTES_BUCKETS, tag_keys=tag_keys)
        self.duration = metrics.Histogram(
            "splitserve_kv_transfer_seconds",
            "Time a request waited for its KV: decode's load, or prefill's step blocked on sending.",
            boundaries=TRANSFER_BUCKETS_S, tag_keys=tag_keys)
        self.bandwidth = metrics.Histogram("splitserve_kv_transfer_bandwidth_bytes_per_second",
                                           "Bytes over duration, per transfer.", boundaries=BANDWIDTH_BUCKETS,
                                           tag_keys=tag_keys)
        self.bytes_total = metrics.Counter("splitserve_kv_transferred_bytes", "Bytes of KV moved.",
                                           tag_keys=tag_keys)
        self.failures = metrics.Counter(
            "splitserve_kv_transfer_failures",
            "Failed transfers, handshakes or notifications; each failed load makes decode recompute the prompt.",
            tag_keys=tag_keys)
        self.expired = metrics.Counter("splitserve_kv_leases_expired",
                                       "Requests whose KV lease expired before decode read it.", tag_keys=tag_keys)
        for metric in (self.bytes, self.duration, self.bandwidth, self.bytes_total, self.failures, self.expired):
            metric.set_default_tags({"model": model, "backend": backend, "role": role})
        export_zero(self.failures)
        export_zero(self.expired)

    def record(self, connector_stats: dict) -> None:
        sizes = connector_stats.get("bytes_transferred") or []
        durations = connector_stats.get("transfer_duration") or []
        for size, duration in zip(sizes, durations):
            self.bytes.observe(size)
            self.duration.observe(duration)
            if duration > 0:
                self.bandwidth.observe(size / duration)
        if sizes:
            self.bytes_total.inc(sum(sizes))
        for wait in connector_stats.get("send_wait_duration") or []:
            self.duration.observe(wait)
        num_failed = sum(sum(connector_stats.get(key) or []) for key in
                         ("num_failed_transfers", "num_failed_handshakes", "num_failed_notifications"))
        if num_failed:
            self.failures.inc(num_failed)
        num_expired = sum(connector_stats.get("num_kv_expired_reqs") or [])
        if num_expired:
            self.expired.inc(num_expired)
