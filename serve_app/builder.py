"""build_app: the deployment graph. Prefill and decode engines, then the router that drives them.

`serve run serve_config.yaml` calls it with the YAML's `args`; they are validated here, once.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.decode import DecodeServer
from deployments.prefill import PrefillServer
from deployments.router import Router
from kv_transfer.selection import resolve_backend
from serve_app.config import AppConfig


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    # `auto` is decided here, once, so that every replica of both roles uses the same transport.
    config = config.model_copy(update={"transfer": resolve_backend(config.transfer)})

    prefill = PrefillServer.options(
        num_replicas=config.prefill.num_replicas,
        ray_actor_options={"num_cpus": config.prefill.num_cpus},
    ).bind(config)

    decode = DecodeServer.options(
        num_replicas=config.decode.num_replicas,
        ray_actor_options={"num_cpus": config.decode.num_cpus},
    ).bind(config)

    return Router.options(
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.router.num_cpus},
    ).bind(prefill, decode, config)
