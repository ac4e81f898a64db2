"""An engine's steps, one line each, for finding where time goes under load (off unless asked for).

Why: the engine's counters and Prometheus metrics add up; a stall shows only on a timeline. Aligned with the
bench's per-request times it found the NIXL hand-over waiting for prefill's forward pass (docs/kv-transfer.md).
1. With `SPLITSERVE_STEP_TRACE_DIR` set where the app starts, every engine appends to
   `<dir>/<role>-<engine id>.steps.tsv`, with a header line.
2. vLLM calls the logger once per engine step, from its output loop, with what the step did: a line then holds
   the wall time, the prompts that finished (and their tokens), the tokens generated, the requests running and
   waiting after it, KV-cache usage and the KV transfers the step saw. Idle polling steps (nothing scheduled,
   e.g. prefill keeping KV for decode) are lines too: their rate is the loop's.
3. The file is flushed each line, so a trace survives the engine being killed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, TextIO

from vllm.v1.metrics.loggers import StatLoggerBase

from kv_transfer.stats import TransferStats

STEP_TRACE_DIR_ENV = "SPLITSERVE_STEP_TRACE_DIR"
COLUMNS = ("wall_s", "num_prompts_finished", "num_prompt_tokens", "num_generation_tokens", "num_running",
           "num_waiting", "kv_cache_usage", "num_kv_transfers")


def step_trace_path(role_name: str, engine_id: str) -> Path | None:
    """Where this engine's trace goes, or None when tracing is off."""
    directory = os.environ.get(STEP_TRACE_DIR_ENV)
    return Path(directory) / f"{role_name}-{engine_id or os.getpid()}.steps.tsv" if directory else None


class StepTraceLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, *, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", buffering=1)
        self._file.write("\t".join(COLUMNS) + "\n")

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        prompts = generated = prompt_tokens = 0
        if iteration_stats is not None:
            prompts = len(iteration_stats.time_to_first_tokens_iter)
            prompt_tokens = iteration_stats.prompt_token_stats.total
            generated = iteration_stats.num_generation_tokens
        running = waiting = transfers = 0
        usage = 0.0
        if scheduler_stats is not None:
            running, waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            usage = scheduler_stats.kv_cache_usage
            if scheduler_stats.kv_connector_stats:
                transfers = TransferStats.from_connector_stats(scheduler_stats.kv_connector_stats).num_transfers
        self._file.write(f"{time.time():.4f}\t{prompts}\t{prompt_tokens}\t{generated}\t{running}\t{waiting}\t"
                         f"{usage:.4f}\t{transfers}\n")

    def log_engine_initialized(self) -> None:
        pass


def step_trace_logger(path: Path) -> Any:
    """A vLLM stat-logger factory writing to `path`."""
    def factory(vllm_config: Any, engine_index: int = 0) -> StepTraceLogger:
        return StepTraceLogger(vllm_config, engine_index, path=path)
    return factory
