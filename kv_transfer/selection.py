"""Which KV transport the app uses and which vLLM connector each engine gets: the one place that chooses.

`resolve_backend` runs once, in build_app: `auto` becomes `nixl` or `object_store` there, so that prefill and
decode can never disagree. `engine_kv_transfer_config` then builds each engine's connector config.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from kv_transfer.probe import can_use_nixl
from serve_app.config import TransferConfig

logger = logging.getLogger("ray.serve")


def resolve_backend(transfer: TransferConfig,
                    probe: Callable[[], tuple[bool, str]] = can_use_nixl) -> TransferConfig:
    """A copy of `transfer` whose backend is concrete; the choice and its reason are logged."""
    if transfer.backend != "auto":
        logger.info("KV transfer backend: %s (configured)", transfer.backend)
        return transfer
    is_nixl_usable, reason = probe()
    backend = "nixl" if is_nixl_usable else "object_store"
    logger.info("KV transfer backend: %s (auto: %s)", backend, reason)
    return transfer.model_copy(update={"backend": backend})


def engine_kv_transfer_config(transfer: TransferConfig, *, is_producer: bool, engine_id: str) -> dict[str, Any]:
    if transfer.backend == "auto":
        raise ValueError("transfer.backend 'auto' must be resolved by build_app before engines start")
    if transfer.backend == "nixl":
        from kv_transfer import nixl_handoff

        return nixl_handoff.kv_transfer_config(transfer, is_producer=is_producer, engine_id=engine_id)

    import ray
    from ray import serve

    from kv_transfer import connector

    context = ray.get_runtime_context()
    return connector.kv_transfer_config(
        is_producer=is_producer,
        engine_id=engine_id,
        ray_address=context.gcs_address,
        ray_namespace=context.namespace,
        # One store per application: replicas of both roles find it by name.
        store_name=f"splitserve-kv-store-{serve.get_replica_context().app_name}",
        store_capacity_bytes=int(transfer.store_capacity_gib * (1 << 30)),
        kv_lease_s=transfer.kv_lease_s,
        load_timeout_s=transfer.load_timeout_s,
    )
