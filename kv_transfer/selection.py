"""Which KV connector an engine gets, from `transfer.backend`: the one place that chooses."""

from __future__ import annotations

from typing import Any

from serve_app.config import TransferConfig


def engine_kv_transfer_config(transfer: TransferConfig, *, is_producer: bool, engine_id: str) -> dict[str, Any]:
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
