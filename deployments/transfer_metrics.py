"""KV transfers as an engine's connector reports them, published from the engine's replica (prefill or decode).

deployments/metrics.py lists every splitserve metric.
"""

from __future__ import annotations

from ray.serve import metrics

from deployments.metrics import export_zero
from kv_transfer.stats import TransferStats

TRANSFER_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5]
BYTES_BUCKETS = [2**20 * size for size in (1, 4, 16, 32, 64, 128, 256, 512, 1024)]
BANDWIDTH_BUCKETS = [1e9 * rate for rate in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)]  # bytes/s


class KVTransferMetrics:
    """Fed by the engine's stat logger with each step's KV-connector stats, parsed (kv_transfer/stats.py)."""

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

    def record(self, stats: TransferStats) -> None:
        for size, duration in zip(stats.transfer_bytes, stats.transfer_seconds):
            self.bytes.observe(size)
            self.duration.observe(duration)
            if duration > 0:
                self.bandwidth.observe(size / duration)
        if stats.num_bytes:
            self.bytes_total.inc(stats.num_bytes)
        for wait in stats.send_wait_seconds:
            self.duration.observe(wait)
        if stats.num_failed:
            self.failures.inc(stats.num_failed)
        if stats.num_expired:
            self.expired.inc(stats.num_expired)
