"""The peer's config: Ray Serve LLM's PD app, as shipped or with our CPU-fixed connector, and nothing else apart."""

from __future__ import annotations

import copy

import pytest

from bench.ray_serve_llm_peer import (
    FIXED_CONNECTOR,
    FIXED_CONNECTOR_MODULE,
    register_fixed_connector_backend,
    serve_config,
)
from bench.processes import PROJECT_ROOT


def _config(is_cpu_fixed: bool) -> dict:
    return serve_config(model_path=".models/SmolLM2-135M-Instruct", served_name="smol", max_model_len=2048,
                        is_cpu_fixed=is_cpu_fixed, prefill_cores="0", decode_cores="1", http_port=8123)


def _sides(config: dict) -> dict:
    return config["applications"][0]["args"]


def test_as_shipped_is_ray_serve_llms_own_builder_with_vllms_nixl_connector_on_cpu():
    config = _config(is_cpu_fixed=False)
    assert config["applications"][0]["import_path"] == "ray.serve.llm:build_pd_openai_app"
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    for side in _sides(config).values():
        assert side["engine_kwargs"]["kv_transfer_config"] == {
            "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        assert side["accelerator_config"] == {"kind": "cpu"}
        assert side["model_loading_config"]["model_source"] == str(PROJECT_ROOT / ".models/SmolLM2-135M-Instruct")


def test_cpu_fixed_changes_only_the_connector_and_the_engines_wait():
    from kv_transfer.nixl.connector import SplitserveNixlConnector

    assert (FIXED_CONNECTOR, FIXED_CONNECTOR_MODULE) == (SplitserveNixlConnector.__name__,
                                                         SplitserveNixlConnector.__module__)
    shipped, fixed = _sides(_config(is_cpu_fixed=False)), _sides(_config(is_cpu_fixed=True))
    for name in ("prefill_config", "decode_config"):
        assert fixed[name]["engine_kwargs"]["kv_transfer_config"] == {
            "kv_connector": FIXED_CONNECTOR, "kv_connector_module_path": FIXED_CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_buffer_device": "cpu",
            "kv_connector_extra_config": {"keep_engine_affinity": True, "progress_interval_us": 5000,
                                          "ucx_lock": "mutex",
                                          "kv_lease_duration": 30, "is_load_in_step": False,  # vLLM's load
                                          "load_timeout_s": 60.0}}
        # As shipped, vLLM's spin between an engine's processes; fixed, our plugin's sleeping readers
        # (deployments/engine_ipc.py).
        assert shipped[name]["runtime_env"]["env_vars"]["SPLITSERVE_ENGINE_SPIN_S"] == "vllm"
        assert "SPLITSERVE_ENGINE_SPIN_S" not in fixed[name]["runtime_env"]["env_vars"]
        rest = [copy.deepcopy(sides[name]) for sides in (shipped, fixed)]
        del rest[0]["runtime_env"]["env_vars"]["SPLITSERVE_ENGINE_SPIN_S"]
        for side in rest:
            del side["engine_kwargs"]["kv_transfer_config"]
            del side["runtime_env"]["env_vars"]["VLLM_NIXL_SIDE_CHANNEL_PORT"]  # a free port each time
        assert rest[0] == rest[1]


def test_each_engine_gets_its_own_core_and_nixl_port_and_ray_accepts_the_args():
    from ray.llm._internal.serve.serving_patterns.prefill_decode.builder import PDServingArgs

    sides = _sides(_config(is_cpu_fixed=True))
    env = {name: side["runtime_env"]["env_vars"] for name, side in sides.items()}
    assert (env["prefill_config"]["VLLM_CPU_OMP_THREADS_BIND"], env["decode_config"]["VLLM_CPU_OMP_THREADS_BIND"]) \
        == ("0", "1")
    assert env["prefill_config"]["VLLM_NIXL_SIDE_CHANNEL_PORT"] != env["decode_config"]["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    args = PDServingArgs.model_validate(sides)
    assert args.decode_config.engine_kwargs == sides["decode_config"]["engine_kwargs"]
    assert args.prefill_config.engine_kwargs["dtype"] == "float32"


@pytest.fixture
def backend_registry():
    from ray.llm._internal.serve.engines.vllm.kv_transfer.factory import KVConnectorBackendFactory

    yield KVConnectorBackendFactory
    KVConnectorBackendFactory.unregister_backend(FIXED_CONNECTOR)


def test_our_connector_gets_rays_nixl_backend_not_its_no_op_default(backend_registry):
    from ray.llm._internal.serve.engines.vllm.kv_transfer.nixl import NixlConnectorBackend

    register_fixed_connector_backend()
    register_fixed_connector_backend()  # idempotent: Ray's registry refuses a second registration
    assert backend_registry.get_backend_class(FIXED_CONNECTOR) is NixlConnectorBackend
