"""Where each role's replicas run, and how many: the role's config as Serve's deployment options.

1. `ray_actor_options`: its placement (CPUs, GPUs, custom resources, node labels), checked by Ray's own rules when
   the app is built (a bad label selector or resource name stops the start-up with Ray's message and the role's
   name, instead of leaving the deployment waiting for a node that cannot exist).
2. `replica_count`: a fixed `num_replicas`, or Serve's `autoscaling_config` with the role's policy
   (serve_app/autoscaling.py: prefill and decode on their own signals; collocated on Serve's ongoing requests).

Apart from config.py, which stays free of Ray: the scheduler and the simulator import the config without Ray.
"""

from __future__ import annotations

from typing import Any

from ray._common.ray_option_utils import validate_actor_options  # Ray's own option rules (ray is pinned)

from serve_app.config import EngineRoleConfig, PlacedConfig


def ray_actor_options(role_name: str, role: PlacedConfig) -> dict[str, Any]:
    options = role.ray_actor_options
    try:
        validate_actor_options(options, in_options=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{role_name}: {error}") from None
    return options


# 2. The policy each scheduled role scales by (import paths: Serve's controller imports them).
POOL_POLICIES = {"prefill": "serve_app.autoscaling:PrefillPool", "decode": "serve_app.autoscaling:DecodePool"}


def replica_count(role_name: str, role: EngineRoleConfig) -> dict[str, Any]:
    bounds = role.autoscaling
    if bounds is None:
        return {"num_replicas": role.num_replicas}
    config: dict[str, Any] = {
        "min_replicas": bounds.min_replicas, "max_replicas": bounds.max_replicas,
        "initial_replicas": role.num_replicas, "upscale_delay_s": bounds.upscale_delay_s,
        "downscale_delay_s": bounds.downscale_delay_s, "metrics_interval_s": bounds.metrics_interval_s,
        "look_back_period_s": bounds.look_back_period_s}
    if role_name in POOL_POLICIES:
        kwargs = {"target_queue_s": bounds.target_queue_s} if role_name == "prefill" else {}
        config["policy"] = {"policy_function": POOL_POLICIES[role_name], "policy_kwargs": kwargs}
    else:  # collocated engines run whole requests: Serve's own policy, a full batch per replica
        config["target_ongoing_requests"] = role.max_num_seqs
    return {"autoscaling_config": config}
