"""Each engine role's settings become vLLM's own command-line arguments, which vLLM's parser turns into the engine's
config: a key of ours that vLLM would refuse or read differently fails here, not at start-up."""

from __future__ import annotations

import pytest

from deployments.engine import binding_cores, engine_environment, side_channel_host, vllm_cli_args
from serve_app.config import AppConfig, EngineRoleConfig


def _vllm_config(role: EngineRoleConfig):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(AppConfig().model, role, None))
    return AsyncEngineArgs.from_cli_args(args)


def test_the_shipped_roles_keep_vllms_scheduler_defaults():
    engine_args = _vllm_config(AppConfig().decode)
    assert (engine_args.max_num_seqs, engine_args.max_num_batched_tokens) == (16, 2048)
    assert engine_args.long_prefill_token_threshold == 0 and engine_args.scheduling_policy == "fcfs"


def test_a_decode_role_that_runs_prompts_caps_their_chunks_and_may_order_by_priority():
    role = EngineRoleConfig(max_num_batched_tokens=256, long_prefill_token_threshold=64,
                            scheduling_policy="priority")
    engine_args = _vllm_config(role)
    assert (engine_args.max_num_batched_tokens, engine_args.long_prefill_token_threshold) == (256, 64)
    assert engine_args.scheduling_policy == "priority"


def test_a_gpu_engine_may_take_a_share_of_its_gpus_memory():
    from vllm.engine.arg_utils import EngineArgs

    assert _vllm_config(EngineRoleConfig()).gpu_memory_utilization == EngineArgs.gpu_memory_utilization  # vLLM's
    assert _vllm_config(EngineRoleConfig(num_gpus=0.5, gpu_memory_fraction=0.4)).gpu_memory_utilization == 0.4


def test_bad_engine_scheduling_values_are_refused_with_their_name():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineRoleConfig(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineRoleConfig(scheduling_policy="sjf")


def test_shortest_first_runs_vllms_priority_scheduling_and_needs_the_routers_sizes():
    engine_args = _vllm_config(EngineRoleConfig(scheduling_policy="shortest_first", shortest_first_aging=2))
    assert engine_args.scheduling_policy == "priority"  # the replica sets each request's priority
    with pytest.raises(ValueError, match="shortest_first_aging"):
        EngineRoleConfig(scheduling_policy="shortest_first", shortest_first_aging=-1)
    shortest_first = {"scheduling_policy": "shortest_first"}
    AppConfig.model_validate({"prefill": shortest_first, "decode": shortest_first})
    with pytest.raises(ValueError, match="collocated.scheduling_policy 'shortest_first' needs each prompt's size"):
        AppConfig.model_validate({"mode": "collocated", "collocated": shortest_first})


def test_nixls_side_channel_listens_on_loopback_on_one_node_and_on_the_nodes_address_across_nodes():
    """Decode asks prefill's side channel for its NIXL metadata at the address in the KV handle: loopback cannot be
    reached from another node, and a node's address should not be opened while the cluster is one host."""
    assert side_channel_host("auto", node_ip="10.0.0.5", num_alive_nodes=1) == "127.0.0.1"
    assert side_channel_host("auto", node_ip="10.0.0.5", num_alive_nodes=2) == "10.0.0.5"
    assert side_channel_host("loopback", node_ip="10.0.0.5", num_alive_nodes=3) == "127.0.0.1"
    assert side_channel_host("node", node_ip="10.0.0.5", num_alive_nodes=1) == "10.0.0.5"
    # The engine's environment names that address, with a port found free on it (127.0.0.2: Linux's loopback
    # answers every 127/8 address, as a second node on the same host in the e2e suite uses).
    environment = engine_environment(EngineRoleConfig(cpu_binding="0"), 0, side_channel_host="127.0.0.2")
    assert environment["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.2"
    assert 24000 <= int(environment["VLLM_NIXL_SIDE_CHANNEL_PORT"]) < 32000


def test_a_binding_names_its_cores_for_pinning_the_engines_processes():
    assert binding_cores("0") == {0} and binding_cores("0-3") == {0, 1, 2, 3}
    assert binding_cores("1,3") == {1, 3} and binding_cores("0|1") == {0, 1} and binding_cores("auto") == set()
