"""Which KV backend the app uses, and the one place that builds each engine's `kv_transfer_config`.

1. `resolve_backend` runs once, in build_app: `auto` becomes `nixl` or `object_store` there (after the NIXL probe),
   so that prefill and decode can never disagree.
2. `kv_transfer_config` then builds vLLM's connector config for one engine: producer on prefill, consumer on
   decode, with the backend's typed extra config (kv_transfer/config.py) as `kv_connector_extra_config`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from kv_transfer.config import Backend, NixlExtraConfig, ObjectStoreExtraConfig, TransferConfig
from kv_transfer.nixl.probe import can_use_nixl

logger = logging.getLogger("ray.serve")

# vLLM imports each connector by these names inside its engine process. Named here rather than imported: the
# NIXL connector's module resets Python logging when it is imported (see deployments/engine.py), and the replica
# that builds the config never needs the class. tests/unit/test_backend.py checks that the names resolve.
CONNECTORS: dict[Backend, tuple[str, str]] = {
    "object_store": ("SplitserveConnector", "kv_transfer.object_store.connector"),
    "nixl": ("SplitserveNixlConnector", "kv_transfer.nixl.connector"),
}


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


def kv_transfer_config(transfer: TransferConfig, *, is_producer: bool, engine_id: str) -> dict[str, Any]:
    """vLLM's kv_transfer_config for one engine of the app (called in the engine's replica)."""
    if transfer.backend == "auto":
        raise ValueError("transfer.backend 'auto' must be resolved by build_app before engines start")
    connector, module = CONNECTORS[transfer.backend]
    config: dict[str, Any] = {
        "kv_connector": connector,
        "kv_connector_module_path": module,
        "kv_role": "kv_producer" if is_producer else "kv_consumer",
        "engine_id": engine_id,
        # A load that fails (store restarted, lease expired, timeout, failed read) makes decode compute those
        # tokens itself instead of failing the request.
        "kv_load_failure_policy": "recompute",
    }
    if transfer.backend == "nixl":
        config["kv_buffer_device"] = nixl_buffer_device(transfer)
        extra: NixlExtraConfig | ObjectStoreExtraConfig = NixlExtraConfig.from_transfer(transfer)
    else:
        import ray

        context = ray.get_runtime_context()
        extra = ObjectStoreExtraConfig(
            ray_address=context.gcs_address, ray_namespace=context.namespace,
            store_name=store_name(engine_id) if is_producer else None,
            load_timeout_s=transfer.load_timeout_s, is_layer_by_layer=transfer.is_layer_by_layer,
            is_load_in_step=transfer.is_load_in_step,
        )
    config["kv_connector_extra_config"] = extra.model_dump()
    return config


def nixl_buffer_device(transfer: TransferConfig, engine_device_type: str | None = None) -> str:
    """Where NIXL reads KV from: the engine's KV cache itself (`auto`), or host staging (`cpu`)."""
    if transfer.nixl_buffer_device != "auto":
        return transfer.nixl_buffer_device
    if engine_device_type is None:
        from vllm.platforms import current_platform

        engine_device_type = current_platform.device_type
    return "cuda" if engine_device_type == "cuda" else "cpu"


def store_name(prefill_engine_id: str) -> str:
    """The name of the KV store a prefill replica creates for its engine's KV (object_store backend)."""
    return f"splitserve-kv-store-{prefill_engine_id}"
