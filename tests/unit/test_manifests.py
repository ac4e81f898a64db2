"""The real-cluster manifest (serve_app/deploy/rayservice.yaml): its embedded serve config is one the app and Ray
Serve accept, and every role's placement has nodes of its own to run on, so an edit that would be refused at
deploy time, or that no node could host, fails here instead of on a cluster."""

from __future__ import annotations

import re

import pytest
import ray
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import PROJECT_ROOT, AppConfig, EngineRoleConfig
from serve_app.placement import ray_actor_options, selects, unplaceable

MANIFEST = PROJECT_ROOT / "serve_app" / "deploy" / "rayservice.yaml"


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def _serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def _app_config(manifest: dict) -> AppConfig:
    (application,) = _serve_config(manifest)["applications"]
    return AppConfig.model_validate(application["args"])


def _groups_for(role: EngineRoleConfig, manifest: dict) -> list[dict]:
    return [group for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            if selects(role.node_labels, group.get("labels", {}))]


def _gpus_per_pod(group: dict) -> float:
    return sum(float(container["resources"]["limits"].get("nvidia.com/gpu", 0))
               for container in group["template"]["spec"]["containers"])


def test_the_manifest_is_a_rayservice_whose_serve_config_ray_serve_and_the_app_accept():
    manifest = _manifest()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    ServeDeploySchema.model_validate(_serve_config(manifest))
    (application,) = _serve_config(manifest)["applications"]
    shipped = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"][0]
    assert application["import_path"] == shipped["import_path"]
    config = _app_config(manifest)
    assert config.is_disaggregated and config.transfer.backend == "nixl"
    assert config.transfer.side_channel_host == "node"  # decode on another node must reach prefill's side channel
    # The cluster runs the Ray this project pins (the image's Ray must be the driver's).
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_prefill_and_decode_run_on_node_groups_of_their_own_with_the_gpus_they_ask_for():
    manifest = _manifest()
    config = _app_config(manifest)
    names = {}
    for role_name, role in (("prefill", config.prefill), ("decode", config.decode)):
        assert ray_actor_options(role_name, role)["label_selector"] == role.node_labels and role.num_gpus >= 1
        assert role.wait_for_nodes  # KubeRay may deploy the app before the GPU pods have joined
        groups = _groups_for(role, manifest)
        assert groups, f"no worker group has labels that {role_name}'s node_labels {role.node_labels} select"
        names[role_name] = {group["groupName"] for group in groups}
        for group in groups:
            assert _gpus_per_pod(group) >= role.num_gpus, group["groupName"]
        # Every replica fits when the groups are at their largest.
        capacity = sum(group["maxReplicas"] * (_gpus_per_pod(group) // role.num_gpus) for group in groups)
        assert capacity >= role.num_replicas, (role_name, capacity)
    assert not names["prefill"] & names["decode"], "prefill and decode would share nodes"


def test_a_roles_placement_becomes_serves_ray_actor_options_only_where_set():
    assert EngineRoleConfig().ray_actor_options == {"num_cpus": 0.0}
    role = EngineRoleConfig(num_gpus=1, resources={"prefill_pool": 1}, node_labels={"splitserve/pool": "!in(a,b)"})
    assert role.ray_actor_options == {"num_cpus": 0.0, "num_gpus": 1, "resources": {"prefill_pool": 1},
                                      "label_selector": {"splitserve/pool": "!in(a,b)"}}
    assert selects(role.node_labels, {"splitserve/pool": "c"}) and not selects(role.node_labels,
                                                                                   {"splitserve/pool": "a"})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("resources", {"GPU": 1}, "num_gpus"),
    ("node_labels", {"bad key!": "x"}, "bad key!"),
    ("node_labels", {"splitserve/pool": "in(a,"}, "in(a,"),
])
def test_a_bad_placement_is_refused_by_rays_rules_with_the_role_and_value_named(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        ray_actor_options("decode", EngineRoleConfig(**{field: value}))
    assert str(error.value).startswith("decode: ")


def test_negative_placement_amounts_are_refused_in_the_config():
    with pytest.raises(ValidationError, match="num_gpus"):
        EngineRoleConfig(num_gpus=-1)


def _node(address: str, alive: bool = True, labels: dict[str, str] | None = None, **resources: float) -> dict:
    """One entry of `ray.nodes()` as Ray 2.60 returns it (the keys the check reads)."""
    return {"NodeManagerAddress": address, "Alive": alive, "Resources": resources, "Labels": labels or {}}


def test_a_placement_no_live_node_can_take_is_refused_with_what_each_node_has():
    cpu_only = [_node("10.0.0.1", CPU=16, labels={"splitserve/pool": "decode"}),
                _node("10.0.0.2", CPU=16, labels={"splitserve/pool": "prefill"}),
                _node("10.0.0.3", alive=False, CPU=8, GPU=8, labels={"splitserve/pool": "prefill"})]
    # 1. GPUs on a CPU-only cluster (the dead node's GPUs do not count): refused, naming the role and every live node.
    with pytest.raises(ValueError, match=re.escape(
            "prefill: no live node can take a replica that asks for GPU 1, label splitserve/pool=prefill; the nodes "
            "have: 10.0.0.1 (GPU 0, CPU 16, labels splitserve/pool=decode); 10.0.0.2 (GPU 0, CPU 16, labels "
            "splitserve/pool=prefill). Start a node") + ".*wait_for_nodes: true"):
        ray_actor_options("prefill", EngineRoleConfig(num_gpus=1, node_labels={"splitserve/pool": "prefill"}), cpu_only)
    # 2. A custom resource or a label no node has.
    assert "prefill_pool 1" in unplaceable({"num_cpus": 0, "resources": {"prefill_pool": 1}}, cpu_only)
    assert "label splitserve/pool=gpu" in unplaceable({"label_selector": {"splitserve/pool": "gpu"}}, cpu_only)
    # 3. What one node can take passes; so does anything, once the role waits for nodes to join.
    assert unplaceable({"num_cpus": 4, "label_selector": {"splitserve/pool": "prefill"}}, cpu_only) is None
    assert ray_actor_options("decode", EngineRoleConfig(num_gpus=1, wait_for_nodes=True), cpu_only)["num_gpus"] == 1
    # 4. With no cluster to check against (no Ray initialised here), only Ray's own rules apply.
    assert not ray.is_initialized() and ray_actor_options("decode", EngineRoleConfig(num_gpus=1))["num_gpus"] == 1
