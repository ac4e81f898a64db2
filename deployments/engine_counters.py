"""Counters read off a vLLM engine's own stats: the proof that decode loaded KV instead of recomputing it.

vLLM reports, per engine step, where each prompt token's KV came from (computed here, local prefix cache, or an
external KV transfer) and what its KV connector moved. `CountingStatLogger` is a vLLM stat logger that adds those
up for the life of the engine; `EngineCounters` is the frozen snapshot a deployment hands out.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, ConfigDict
from vllm.v1.metrics.loggers import StatLoggerBase


class EngineCounters(BaseModel):
    model_config = ConfigDict(frozen=True)

    num_prompt_tokens: int = 0
    num_prompt_tokens_computed: int = 0
    num_prompt_tokens_local_cache_hit: int = 0
    num_prompt_tokens_external: int = 0
    num_generation_tokens: int = 0
    num_finished_requests: int = 0
    num_kv_transfers: int = 0
    num_kv_bytes_transferred: int = 0
    num_kv_failed_transfers: int = 0
    num_kv_expired_requests: int = 0
    # Time on the request's path: decode waiting for and loading KV; prefill's step blocked on sending it.
    kv_load_seconds: float = 0.0
    kv_send_wait_seconds: float = 0.0
    num_running_requests: int = 0
    num_waiting_requests: int = 0
    kv_cache_usage: float = 0.0


class _Accumulator:
    """Shared by the logger (written from the engine's output loop) and the deployment (read on demand)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Any] = EngineCounters().model_dump()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def set(self, **values: Any) -> None:
        with self._lock:
            self._counts.update(values)

    def snapshot(self) -> EngineCounters:
        with self._lock:
            return EngineCounters(**self._counts)


def _sum_connector_stats(stats: dict[str, Any]) -> dict[str, float]:
    def total(key: str) -> int:
        return int(sum(stats.get(key) or []))

    return {
        "num_kv_transfers": len(stats.get("transfer_duration") or []),
        "num_kv_bytes_transferred": total("bytes_transferred"),
        # As vLLM's own NIXL stats count them: a failed read, handshake or notification is a failed transfer.
        "num_kv_failed_transfers": total("num_failed_transfers") + total("num_failed_handshakes")
        + total("num_failed_notifications"),
        "num_kv_expired_requests": total("num_kv_expired_reqs"),
        "kv_load_seconds": float(sum(stats.get("transfer_duration") or [])),
        "kv_send_wait_seconds": float(sum(stats.get("send_wait_duration") or [])),
    }


class CountingStatLogger(StatLoggerBase):
    """Adds up the engine's stats; with `kv_metrics`, also publishes each KV transfer through Ray (metrics.py)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, accumulator: _Accumulator,
                 kv_metrics: Any = None):
        self._accumulator = accumulator
        self._kv_metrics = kv_metrics

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        if iteration_stats is not None:
            prompt = iteration_stats.prompt_token_stats
            self._accumulator.add(
                num_prompt_tokens=prompt.total,
                num_prompt_tokens_computed=prompt.computed,
                num_prompt_tokens_local_cache_hit=prompt.local_cache_hit,
                num_prompt_tokens_external=prompt.external_kv_transfer,
                num_generation_tokens=iteration_stats.num_generation_tokens,
                num_finished_requests=len(iteration_stats.finished_requests),
            )
        if scheduler_stats is not None:
            self._accumulator.set(
                num_running_requests=scheduler_stats.num_running_reqs,
                num_waiting_requests=scheduler_stats.num_waiting_reqs,
                kv_cache_usage=scheduler_stats.kv_cache_usage,
            )
            if scheduler_stats.kv_connector_stats:
                self._accumulator.add(**_sum_connector_stats(scheduler_stats.kv_connector_stats))
                if self._kv_metrics is not None:
                    self._kv_metrics.record(scheduler_stats.kv_connector_stats)

    def log_engine_initialized(self) -> None:
        pass


def counting_stat_logger(*, kv_metrics: Any = None) -> tuple[Any, _Accumulator]:
    """A vLLM stat-logger factory and the accumulator its logger writes into."""
    accumulator = _Accumulator()

    def factory(vllm_config: Any, engine_index: int = 0) -> CountingStatLogger:
        return CountingStatLogger(vllm_config, engine_index, accumulator=accumulator, kv_metrics=kv_metrics)

    return factory, accumulator
