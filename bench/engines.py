"""Read the engines' own counters through Serve deployment handles (the caller is a Ray driver: a test or a benchmark)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ray import serve

from bench.replicas import APP_NAME, ROLE_DEPLOYMENTS
from deployments.engine_counters import EngineCounters
from deployments.messages import Dispatch

if TYPE_CHECKING:
    from kv_transfer.object_store.store_state import StoreCounters


def disconnect_driver() -> None:
    """Leave the app's cluster: Serve's handles first, then Ray. A handle pushes its autoscaling metrics to the
    controller every half second from a thread of its own; left running past `ray.shutdown()`, its next `ray.wait`
    auto-initialises a *local* Ray instance in this process (seen in the autoscaling test: "Started a local Ray
    instance", then a traceback per push), whose processes outlive the driver."""
    import ray
    from ray.serve import context

    client = context._global_client  # Serve's own cache of this driver's handles; None if it made none
    if client is not None:
        client.shutdown_cached_handles()
        context._set_global_client(None)
    ray.shutdown()


def _to(replica_id: str | None) -> dict:
    """The call's `dispatch` that sends it to one replica (its Serve replica id); none: Serve's choice."""
    return {} if replica_id is None else {"dispatch": Dispatch(router_id="driver", seq=0, replica_id=replica_id)}


def counters(role: str, replica_id: str | None = None) -> EngineCounters:
    """The role's engine counters: of the replica `replica_id`, or of the one replica the role has."""
    handle = serve.get_deployment_handle(ROLE_DEPLOYMENTS[role], app_name=APP_NAME)
    return handle.counters.remote(**_to(replica_id)).result(timeout_s=30)


def recent_transfer_seconds(role: str, replica_id: str | None = None) -> list[float]:
    """Each of the role's latest KV transfers' seconds (decode: its loads), oldest first."""
    handle = serve.get_deployment_handle(ROLE_DEPLOYMENTS[role], app_name=APP_NAME)
    return handle.recent_transfer_seconds.remote(**_to(replica_id)).result(timeout_s=30)


def store_counters(replica_id: str | None = None) -> StoreCounters | None:
    """A prefill replica's KV store (object_store backend): what it holds now and has seen; None on nixl."""
    return serve.get_deployment_handle("PrefillServer", app_name=APP_NAME).store_counters.remote(
        **_to(replica_id)).result(timeout_s=30)


@dataclass(frozen=True)
class IdleState:
    """What `wait_idle` saw last: whether everything was idle, and the counters that say so (or what was busy)."""

    is_idle: bool
    counters: dict[str, EngineCounters]  # per role polled
    store: StoreCounters | None  # None unless the KV store was polled

    @property
    def busy(self) -> list[str]:
        """What was still busy, one line each; empty when idle."""
        lines = [f"{role}: {c.num_running_requests} running, {c.num_waiting_requests} waiting, "
                 f"kv_cache_usage {c.kv_cache_usage}" for role, c in self.counters.items() if not _is_engine_idle(c)]
        if self.store is not None and not _is_store_empty(self.store):
            lines.append(f"kv store: {self.store.num_open} open, {self.store.num_bytes_in_use} bytes in use")
        return lines


def wait_idle(roles: Sequence[str] = ("prefill", "decode"), *, is_object_store: bool, timeout_s: float = 60,
              poll_s: float = 1) -> IdleState:
    """Polls until every role's engine runs and queues no request and holds no KV block, and (`is_object_store`)
    the prefill replica's KV store holds no transfer; or until `timeout_s`. Never raises on timeout: callers
    assert on (or report) the returned state."""
    deadline = time.monotonic() + timeout_s
    while True:
        per_role = {role: counters(role) for role in roles}
        store = store_counters() if is_object_store else None
        is_idle = all(_is_engine_idle(c) for c in per_role.values()) and (store is None or _is_store_empty(store))
        if is_idle or time.monotonic() >= deadline:
            return IdleState(is_idle=is_idle, counters=per_role, store=store)
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def _is_engine_idle(c: EngineCounters) -> bool:
    return (c.num_running_requests, c.num_waiting_requests, c.kv_cache_usage) == (0, 0, 0.0)


def _is_store_empty(store: StoreCounters) -> bool:
    return (store.num_open, store.num_bytes_in_use) == (0, 0)


def delta(after: EngineCounters, before: EngineCounters) -> dict[str, float]:
    return {name: getattr(after, name) - getattr(before, name) for name in EngineCounters.model_fields}


def kv_bytes_per_block(model_path: str, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of K and V for one block of every layer: what one transferred block must weigh."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * block_size * dtype_bytes


def num_blocks(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
