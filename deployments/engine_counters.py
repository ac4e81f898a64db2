"""Counters read off a vLLM engine's own stats: the proof that decode loaded KV instead of recomputing it.

vLLM reports, per engine step, where each prompt token's KV came from (computed here, local prefix cache, or an
external KV transfer) and what its KV connector moved (parsed once, kv_transfer/stats.py). `CountingStatLogger` is
a vLLM stat logger that adds those up for the life of the engine; `EngineCounters` is the frozen snapshot a deployment hands out.
It also times the engine's pure decode steps (steps in which no prompt finished), by batch size, for the
scheduler's load reports (engine_load.py): the gap vLLM measured between each request's tokens in that step.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict
from vllm.v1.metrics.loggers import StatLoggerBase

from kv_transfer.stats import TransferStats

TransferStatsSink = Callable[[TransferStats], None]
# How many of the latest transfers keep their own time (a benchmark reads them for tails; a few tens of KB).
NUM_RECENT_TRANSFERS = 4096


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
        self._decode_steps: dict[int, list[float]] = {}  # batch size -> [seconds summed, steps]
        # Each transfer's own time, the latest NUM_RECENT_TRANSFERS: tails (p90) need the values, not their sum.
        self._transfer_seconds: deque[float] = deque(maxlen=NUM_RECENT_TRANSFERS)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def set(self, **values: Any) -> None:
        with self._lock:
            self._counts.update(values)

    def add_decode_step(self, batch_size: int, seconds: float) -> None:
        with self._lock:
            total = self._decode_steps.setdefault(batch_size, [0.0, 0])
            total[0] += seconds
            total[1] += 1

    def take_decode_steps(self) -> list[tuple[int, float, int]]:
        """(batch size, mean seconds, steps) of the pure decode steps since the last call."""
        with self._lock:
            steps, self._decode_steps = self._decode_steps, {}
        return [(batch, total / count, count) for batch, (total, count) in sorted(steps.items())]

    def add_transfers(self, seconds: tuple[float, ...]) -> None:
        with self._lock:
            self._transfer_seconds.extend(seconds)

    def recent_transfer_seconds(self) -> list[float]:
        """Each of the latest transfers' seconds, oldest first (at most NUM_RECENT_TRANSFERS)."""
        with self._lock:
            return list(self._transfer_seconds)

    def snapshot(self) -> EngineCounters:
        with self._lock:
            return EngineCounters(**self._counts)


class CountingStatLogger(StatLoggerBase):
    """Adds up the engine's stats; hands each step's KV-transfer stats to `on_transfer_stats` too (the replica
    publishes them as Ray metrics: transfer_metrics.py)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, accumulator: _Accumulator,
                 on_transfer_stats: TransferStatsSink | None = None):
        self._accumulator = accumulator
        self._on_transfer_stats = on_transfer_stats

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
            gaps = iteration_stats.inter_token_latencies_iter
            if gaps and not iteration_stats.time_to_first_tokens_iter:  # no prompt finished in this step
                self._accumulator.add_decode_step(len(gaps), sum(gaps) / len(gaps))
        if scheduler_stats is not None:
            self._accumulator.set(
                num_running_requests=scheduler_stats.num_running_reqs,
                num_waiting_requests=scheduler_stats.num_waiting_reqs,
                kv_cache_usage=scheduler_stats.kv_cache_usage,
            )
            if scheduler_stats.kv_connector_stats:
                stats = TransferStats.from_connector_stats(scheduler_stats.kv_connector_stats)
                self._accumulator.add(
                    # A load that failed inside its step: vLLM counted its tokens as loaded, the engine computed them.
                    num_prompt_tokens_computed=stats.num_recomputed_tokens,
                    num_prompt_tokens_external=-stats.num_recomputed_tokens,
                    num_kv_transfers=stats.num_transfers,
                    num_kv_bytes_transferred=stats.num_bytes,
                    num_kv_failed_transfers=stats.num_failed,
                    num_kv_expired_requests=stats.num_expired,
                    kv_load_seconds=stats.total_transfer_seconds,
                    kv_send_wait_seconds=stats.total_send_wait_seconds,
                )
                self._accumulator.add_transfers(stats.transfer_seconds)
                if self._on_transfer_stats is not None:
                    self._on_transfer_stats(stats)

    def log_engine_initialized(self) -> None:
        pass


def counting_stat_logger(*, on_transfer_stats: TransferStatsSink | None = None) -> tuple[Any, _Accumulator]:
    """A vLLM stat-logger factory and the accumulator its logger writes into."""
    accumulator = _Accumulator()

    def factory(vllm_config: Any, engine_index: int = 0) -> CountingStatLogger:
        return CountingStatLogger(vllm_config, engine_index, accumulator=accumulator,
                                  on_transfer_stats=on_transfer_stats)

    return factory, accumulator
