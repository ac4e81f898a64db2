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

    from kv_transfer import connector

    context = ray.get_runtime_context()
    return connector.kv_transfer_config(
        is_producer=is_producer,
        engine_id=engine_id,
        ray_address=context.gcs_address,
        ray_namespace=context.namespace,
        store_name=store_name(engine_id) if is_producer else None,
        load_timeout_s=transfer.load_timeout_s,
        is_layer_by_layer=transfer.is_layer_by_layer,
    )


def store_name(prefill_engine_id: str) -> str:
    """The name of the KV store a prefill replica creates for its engine's KV (object_store backend)."""
    return f"splitserve-kv-store-{prefill_engine_id}"
