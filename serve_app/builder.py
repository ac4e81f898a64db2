"""build_app: the deployment graph. Engines first, then the router that drives them.

    disaggregated (default):  Router -> PrefillServer (prompt, KV out) -> DecodeServer (KV in, tokens)
                              (the router's scheduler picks the path and the replicas: split, decode-local,
                              prefill-local; both engine deployments route by ChosenReplicaRouter and report
                              their load through Serve's routing stats)
    collocated (baseline):    Router -> CollocatedServer (prompt and tokens on one engine)

`serve run serve_config.yaml` calls it with the YAML's `args`; they are validated here, once. A config no retry can
fix (a bad value, a placement no node can take, a short KV handle key) fails the deploy at once, with its message, as
an AppConfigError: Serve reports a RayServeException from the build without retrying it, while any other exception
makes it build the whole app four times over (about 20 s each here, importing vLLM) before it gives up.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException

from deployments.collocated import CollocatedServer
from deployments.decode import DecodeServer
from deployments.prefill import KV_DRAIN_MARGIN_S, PrefillServer
from deployments.replica_choice import ChosenReplicaRouter
from deployments.router import Router
from kv_transfer.backend import resolve_backend
from serve_app.config import AppConfig, EngineRoleConfig, RouterConfig
from serve_app.placement import ray_actor_options, replica_count


# How long a stopping decode replica may take to finish its streams: a max_model_len answer at ~70 ms a token here.
STREAM_DRAIN_S = 300


class AppConfigError(RayServeException, ValueError):
    """The app's config cannot start (a ValueError, as pydantic's own are): Serve fails the deploy at once with it."""


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    try:
        return _build(args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {}))
    except ValueError as error:  # pydantic's ValidationError is one; so are placement's and the key's
        # bench/processes.py finds this sentence in `serve run`'s output.
        raise AppConfigError(f"splitserve cannot start with this config: {error}") from error


def _build(config: AppConfig) -> Application:
    if not config.is_disaggregated:
        collocated = _engines(CollocatedServer, "collocated", config.collocated, config)
        return _router(config.router).bind(config, collocated=collocated)

    # `auto` is decided here, once, so that every replica of both roles uses the same transport; so is the key
    # with which prefill signs KV handles and decode checks them: only this app's replicas have it.
    config = config.model_copy(update={"transfer": resolve_backend(config.transfer)})
    kv_handle_key = os.environ.get(config.transfer.handle_key_env) or secrets.token_hex(32)
    if len(kv_handle_key) < 32:
        raise ValueError(f"{config.transfer.handle_key_env} must hold at least 32 characters (a KV handle key)")
    chosen_replica = RequestRouterConfig(request_router_class=ChosenReplicaRouter,
                                         request_routing_stats_period_s=config.scheduling.load_report_period_s)
    # A stopping prefill replica waits for the KV it handed out to be read (at most the lease): Serve must not kill
    # it before (its default allows 20 s).
    prefill = _engines(PrefillServer, "prefill", config.prefill, config, kv_handle_key,
                       request_router_config=chosen_replica,
                       graceful_shutdown_timeout_s=config.transfer.kv_lease_s + KV_DRAIN_MARGIN_S + 10)
    # A stopping decode replica (scaled in, redeployed) finishes the streams it holds: Serve waits for ongoing
    # requests up to this long (its default, 20 s, is shorter than one long answer on a CPU).
    decode = _engines(DecodeServer, "decode", config.decode, config, kv_handle_key,
                      request_router_config=chosen_replica, graceful_shutdown_timeout_s=STREAM_DRAIN_S)
    return _router(config.router).bind(config, prefill=prefill, decode=decode)


def _engines(deployment: Any, role_name: str, role: EngineRoleConfig, config: AppConfig, *args: Any,
             **options: Any) -> Any:
    return deployment.options(**replica_count(role_name, role), max_ongoing_requests=role.num_ongoing_per_replica,
                              ray_actor_options=ray_actor_options(role_name, role), **options).bind(config, *args)


def _router(router: RouterConfig) -> Any:
    return Router.options(num_replicas=router.num_replicas, max_ongoing_requests=router.max_ongoing_requests,
                          ray_actor_options=ray_actor_options("router", router))
