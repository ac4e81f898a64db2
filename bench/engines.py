"""Read the engines' own counters through Serve deployment handles (the caller is a Ray driver: a test or a benchmark)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray import serve

from bench.replicas import APP_NAME, ROLE_DEPLOYMENTS
from deployments.engine_counters import EngineCounters


def counters(role: str) -> EngineCounters:
    return serve.get_deployment_handle(ROLE_DEPLOYMENTS[role], app_name=APP_NAME).counters.remote().result(timeout_s=30)


def store_counters():
    """The prefill replica's KV store (object_store backend): what it holds now and has seen; None on nixl."""
    return serve.get_deployment_handle("PrefillServer", app_name=APP_NAME).store_counters.remote().result(
        timeout_s=30)


def delta(after: EngineCounters, before: EngineCounters) -> dict[str, float]:
    return {name: getattr(after, name) - getattr(before, name) for name in EngineCounters.model_fields}


def kv_bytes_per_block(model_path: str, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of K and V for one block of every layer: what one transferred block must weigh."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * block_size * dtype_bytes


def num_blocks(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
