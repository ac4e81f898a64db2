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
from serve_app.placement import ray_actor_options

MANIFEST = PROJECT_ROOT / "serve_app" / "deploy" / "rayservice.yaml"


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def _serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def _app_config(manifest: dict) -> AppConfig:
    (application,) = _serve_config(manifest)["applications"]
    return AppConfig.model_validate(application["args"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector against a node's labels: "v", "!v", "in(a,b)", "!in(a,b)" per key."""
    for key, wanted in selector.items():
        is_negated = wanted.startswith("!")
        wanted = wanted.removeprefix("!")
        found = re.fullmatch(r"in\((.*)\)", wanted)
        values = {value.strip() for value in found.group(1).split(",")} if found else {wanted}
        if (labels.get(key) in values) == is_negated:
            return False
    return True


def _groups_for(role: EngineRoleConfig, manifest: dict) -> list[dict]:
    return [group for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            if _selects(role.node_labels, group.get("labels", {}))]


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
    assert _selects(role.node_labels, {"splitserve/pool": "c"}) and not _selects(role.node_labels,
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
