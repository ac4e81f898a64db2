"""splitserve's own metrics, through Ray's metrics system: on every node's Prometheus endpoint (names get Ray's
`ray_` prefix), on the Ray dashboard, and in the Grafana dashboard (serve_app/dashboards/).

All are `ray.serve.metrics` metrics, so Serve tags each with its deployment, replica and application; `model` is
the served model name. What vLLM already measures (queues, running requests, KV-cache usage, vLLM's own TTFT and
TPOT) is re-exported through Ray by vLLM's `RayPrometheusStatLogger` (deployments/engine.py), not re-invented:
those `ray_vllm_*` series carry the replica's `WorkerId`, which the Grafana dashboard joins to its deployment,
so prefill's and decode's queues show side by side.

1. `RouterMetrics` (router_metrics.py): what the client sees — requests by route and status code, TTFT and time
   per output token of streams, end-to-end latency, requests in flight, prefill fallbacks; and what the
   scheduler did — decisions by policy and path, measured TTFT over its prediction, each engine's estimated
   pending prompt tokens and requests.
2. `KVTransferMetrics` (transfer_metrics.py): every KV transfer an engine's connector reports — bytes, duration
   and bandwidth, by backend and role; failed transfers (each makes decode recompute the prompt); leases expired.
3. The KV store's own gauges (kv_transfer/object_store/store.py): memory held against its bound, open transfers.
"""

from __future__ import annotations

from ray.serve import metrics


def export_zero(counter: metrics.Counter) -> None:
    """Makes an event counter (failures, expirations) exist at 0 before its first event, so that dashboards show 0
    rather than "no data". Ray's public `inc` refuses 0; its `_record` is what `inc` calls."""
    counter._record(0)
