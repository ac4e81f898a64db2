"""Where each role's replicas run, and how many: the role's config as Serve's deployment options.

1. `ray_actor_options`: its placement (CPUs, GPUs, custom resources, node labels), checked by Ray's own rules when
   the app is built (a bad label selector or resource name stops the start-up with Ray's message and the role's
   name, instead of leaving the deployment waiting for a node that cannot exist).
2. `unplaceable`: then against the cluster's live nodes, when the app is built inside one: a placement that no node
   can take (GPUs on a CPU-only cluster, a resource or label no node has) stops the start-up with the role, what it
   asks and what each node has. Serve would otherwise wait for such a node for ever, its deployment DEPLOYING. A
   role with `wait_for_nodes` (a cluster autoscaler or KubeRay adds nodes after the app starts) is not checked.
3. `replica_count`: a fixed `num_replicas`, or Serve's `autoscaling_config` with the role's policy
   (serve_app/autoscaling.py: prefill and decode on their own signals; collocated on Serve's ongoing requests).

Apart from config.py, which stays free of Ray: the scheduler and the simulator import the config without Ray.
"""

from __future__ import annotations

import re
from typing import Any

import ray
from ray._common.ray_option_utils import validate_actor_options  # Ray's own option rules (ray is pinned)

from serve_app.config import EngineRoleConfig, PlacedConfig


def ray_actor_options(role_name: str, role: PlacedConfig, nodes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """1-2. `nodes`: `ray.nodes()`'s entries; by default the cluster's own where Ray is initialised (the app is
    being built in it), none to check against otherwise (a unit test)."""
    options = role.ray_actor_options
    try:
        validate_actor_options(options, in_options=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{role_name}: {error}") from None
    if nodes is None and ray.is_initialized():
        nodes = ray.nodes()
    problem = None if nodes is None or role.wait_for_nodes else unplaceable(options, nodes)
    if problem:
        raise ValueError(f"{role_name}: {problem}. Start a node that has it, change the role's placement, or set "
                         f"its wait_for_nodes: true where nodes join after the app starts (a cluster autoscaler)")
    return options


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector against a node's labels: "v", "!v", "in(a,b)", "!in(a,b)" per key."""
    for key, wanted in selector.items():
        is_negated = wanted.startswith("!")
        wanted = wanted.removeprefix("!")
        found = re.fullmatch(r"in\((.*)\)", wanted)
        values = {value.strip() for value in found.group(1).split(",")} if found else {wanted}
        if (labels.get(key) in values) == is_negated:
            return False
    return True


def unplaceable(options: dict[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """2. Why no live node could host one replica with these options (Ray's resources per replica, its label
    selector), or None when one could."""
    asked = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    asked = {name: amount for name, amount in asked.items() if amount}
    selector = options.get("label_selector", {})
    live = [node for node in nodes if node.get("Alive")]
    for node in live:
        has = node.get("Resources", {})
        if all(has.get(name, 0) >= amount for name, amount in asked.items()) and selects(selector, node.get("Labels", {})):
            return None
    wants = ", ".join([f"{name} {amount:g}" for name, amount in asked.items()] +
                      [f"label {key}={value}" for key, value in selector.items()]) or "nothing"
    return f"no live node can take a replica that asks for {wants}; the nodes have: " + "; ".join(
        _described(node, [*asked, "CPU", "GPU"], selector) for node in live)


def _described(node: dict[str, Any], names: list[str], selector: dict[str, str]) -> str:
    has, labels = node.get("Resources", {}), node.get("Labels", {})
    amounts = ", ".join(f"{name} {has.get(name, 0):g}" for name in dict.fromkeys(names))
    shown = ", ".join(f"{key}={labels[key]}" for key in selector if key in labels)
    return f"{node.get('NodeManagerAddress', '?')} ({amounts}{', labels ' + shown if shown else ''})"


# 3. The policy each scheduled role scales by (import paths: Serve's controller imports them).
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
