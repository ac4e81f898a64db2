"""build_app: the deployment graph. Engines first, then the router that drives them.

    disaggregated (default):  Router -> PrefillServer (prompt, KV out) -> DecodeServer (KV in, tokens)
    collocated (baseline):    Router -> CollocatedServer (prompt and tokens on one engine)

`serve run serve_config.yaml` calls it with the YAML's `args`; they are validated here, once.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from ray.serve import Application

from deployments.collocated import CollocatedServer
from deployments.decode import DecodeServer
from deployments.prefill import PrefillServer
from deployments.router import Router
from kv_transfer.backend import resolve_backend
from serve_app.config import AppConfig, EngineRoleConfig, RouterConfig

# The scheduling policies the router carries out today (deployments/scheduling/ decides them all).
ROUTED_POLICIES = ("always_split",)


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    if not config.is_disaggregated:
        collocated = _engines(CollocatedServer, config.collocated, config)
        return _router(config.router).bind(config, collocated=collocated)

    if config.scheduling.policy not in ROUTED_POLICIES:
        raise ValueError(f"scheduling.policy {config.scheduling.policy!r} is not wired into the router yet; "
                         f"it runs {', '.join(ROUTED_POLICIES)}")
    # `auto` is decided here, once, so that every replica of both roles uses the same transport; so is the key
    # with which prefill signs KV handles and decode checks them: only this app's replicas have it.
    config = config.model_copy(update={"transfer": resolve_backend(config.transfer)})
    kv_handle_key = os.environ.get(config.transfer.handle_key_env) or secrets.token_hex(32)
    if len(kv_handle_key) < 32:
        raise ValueError(f"{config.transfer.handle_key_env} must hold at least 32 characters (a KV handle key)")
    prefill = _engines(PrefillServer, config.prefill, config, kv_handle_key)
    decode = _engines(DecodeServer, config.decode, config, kv_handle_key)
    return _router(config.router).bind(config, prefill=prefill, decode=decode)


def _engines(deployment: Any, role: EngineRoleConfig, config: AppConfig, *args: Any) -> Any:
    return deployment.options(num_replicas=role.num_replicas, max_ongoing_requests=role.num_ongoing_per_replica,
                              ray_actor_options={"num_cpus": role.num_cpus}).bind(config, *args)


def _router(router: RouterConfig) -> Any:
    return Router.options(num_replicas=router.num_replicas, max_ongoing_requests=router.max_ongoing_requests,
                          ray_actor_options={"num_cpus": router.num_cpus})
