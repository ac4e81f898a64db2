"""The peer system: Ray Serve LLM's own PD mode (`build_pd_openai_app`, Ray 2.60) with vLLM's NixlConnector.

`ray_serve_llm_pd(...)` starts a Ray head of its own (16 logical CPUs: each LLM replica reserves 2) and
`serve run` of a YAML config: an OpenAI ingress -> a decode replica (the orchestrator, engine on core 1) -> a
prefill replica (engine on core 0). Engine settings match splitserve's serve_config.yaml (float32, eager, seed 0,
16 seqs, 2048 batched tokens, 1 GiB KV cache); each engine gets its own free NIXL side-channel port. On exit
both processes and everything they started are stopped by process id (bench/processes.py).

Two variants; `is_cpu_fixed` changes only the KV connector of both engines:
- as shipped (`is_cpu_fixed=False`): `NixlConnector`, `kv_buffer_device: cpu` — what Ray's users get.
- CPU-fixed (`is_cpu_fixed=True`): splitserve's `SplitserveNixlConnector` (kv_transfer/nixl/connector.py), vLLM's
  NixlConnector minus its two CPU pathologies (docs/kv-transfer.md): the connector moves the model thread onto
  the last core (both engines then compute on core 1) and NIXL's progress thread busy-polls a core per agent. The app is
  built through `build_cpu_fixed_pd_app`, which registers Ray's own `NixlConnectorBackend` under that connector
  name, so Ray sets up ports, host and engine ids exactly as for `NixlConnector`.
Both variants run vLLM's `mp` executor, as splitserve's own engines do: vLLM's CPU platform turns `uni` into `mp`
for every CPU engine (vllm/platforms/cpu.py), and Ray Serve LLM also sets "mp" for CPU deployments
(VLLMEngineConfig.get_initialization_kwargs).

    python -m bench.ray_serve_llm_peer --cpu-fixed | --as-shipped   # 3 streamed requests: TTFT, TPOT
"""

from __future__ import annotations

import os

# Ray 2.60 starts clusters with token auth; its clients read the mode when Ray is first imported.
os.environ["RAY_AUTH_MODE"] = "token"

import argparse
import contextlib
import pathlib
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import yaml

from bench import processes
from bench.processes import PROJECT_ROOT, VENV_BIN
from kv_transfer.backend import CONNECTORS
from kv_transfer.config import NixlExtraConfig, TransferConfig

DEFAULT_MODEL_PATH = ".models/SmolLM2-135M-Instruct"
RAY_LOGICAL_CPUS = 16
APP_NAME = "ray-serve-llm-pd"
NUM_PROMPT_TOKENS, NUM_OUTPUT_TOKENS = 300, 32  # the CLI's check
FIXED_CONNECTOR, FIXED_CONNECTOR_MODULE = CONNECTORS["nixl"]
RAY_NIXL_BACKEND = "ray.llm._internal.serve.engines.vllm.kv_transfer.nixl:NixlConnectorBackend"


def kv_transfer_config(*, is_cpu_fixed: bool) -> dict[str, Any]:
    config = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    if is_cpu_fixed:
        # Our connector's defaults (no busy progress thread, the engine's own cores), as serve_config.yaml has them.
        extra = NixlExtraConfig.from_transfer(TransferConfig(is_load_in_step=False))  # vLLM's own load
        config |= {"kv_connector": FIXED_CONNECTOR, "kv_connector_module_path": FIXED_CONNECTOR_MODULE,
                   "kv_connector_extra_config": extra.model_dump()}
    return config


def llm_config(*, model_path: str, served_name: str, max_model_len: int, is_cpu_fixed: bool, cores: str,
               nixl_port: int) -> dict[str, Any]:
    """One side's LLMConfig (prefill and decode differ only in cores and port)."""
    return {
        "model_loading_config": {"model_id": served_name, "model_source": model_path},
        "accelerator_config": {"kind": "cpu"},
        "deployment_config": {"num_replicas": 1},
        "engine_kwargs": {
            "dtype": "float32", "max_model_len": max_model_len, "enforce_eager": True, "seed": 0,
            "max_num_seqs": 16, "max_num_batched_tokens": 2048,
            "kv_transfer_config": kv_transfer_config(is_cpu_fixed=is_cpu_fixed),
        },
        # Inherited by the engine's subprocesses. A free side-channel port per engine instead of Ray's defaults
        # (20000 / 22000) so that nothing else on the host can collide with it.
        # As shipped, its engines' processes spin on their queues as vLLM's do; CPU-fixed, they sleep until woken
        # like splitserve's (deployments/engine_ipc.py: our vLLM plugin, loaded by any vLLM in this venv).
        "runtime_env": {"env_vars": {
            "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl_port),
            **({} if is_cpu_fixed else {"SPLITSERVE_ENGINE_SPIN_S": "vllm"}),
        }},
    }


def serve_config(*, model_path: str, served_name: str, max_model_len: int, is_cpu_fixed: bool,
                 prefill_cores: str, decode_cores: str, http_port: int) -> dict[str, Any]:
    path = pathlib.Path(model_path)
    model_path = str(path if path.is_absolute() else PROJECT_ROOT / path)  # replicas run in Ray's own cwd
    sides = {side: llm_config(model_path=model_path, served_name=served_name, max_model_len=max_model_len,
                              is_cpu_fixed=is_cpu_fixed, cores=cores, nixl_port=processes.free_port())
             for side, cores in (("prefill_config", prefill_cores), ("decode_config", decode_cores))}
    # Spelled out: under `python -m`, __name__ is "__main__".
    import_path = ("bench.ray_serve_llm_peer:build_cpu_fixed_pd_app" if is_cpu_fixed
                   else "ray.serve.llm:build_pd_openai_app")
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": http_port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": import_path, "args": sides}]}


def register_fixed_connector_backend() -> None:
    """Ray's NIXL backend (side-channel port and host, unique engine ids) for our connector's name too; an
    unknown name would get Ray's no-op default backend. Ray's registry carries it to the replicas."""
    from ray.llm._internal.serve.engines.vllm.kv_transfer.factory import KVConnectorBackendFactory

    if not KVConnectorBackendFactory.is_registered(FIXED_CONNECTOR):
        KVConnectorBackendFactory.register_backend(FIXED_CONNECTOR, RAY_NIXL_BACKEND)


def build_cpu_fixed_pd_app(args: dict[str, Any]) -> Any:
    """`build_pd_openai_app`, after registering the backend for our connector (runs in Serve's build task)."""
    from ray.serve.llm import build_pd_openai_app

    register_fixed_connector_backend()
    return build_pd_openai_app(args)


def _is_serving(base_url: str, served_name: str) -> bool:
    models = httpx.get(f"{base_url}/v1/models", timeout=10)
    if models.status_code != 200 or served_name not in [model["id"] for model in models.json()["data"]]:
        return False
    # Goes through prefill, the NIXL handshake and decode: the first real request then pays none of it.
    completion = httpx.post(f"{base_url}/v1/completions", timeout=120, json={
        "model": served_name, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    return completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] > 0


@contextlib.contextmanager
def ray_serve_llm_pd(*, model_path: str, served_name: str, max_model_len: int, is_cpu_fixed: bool,
                     logs_dir: pathlib.Path, name: str, prefill_cores: str = "0", decode_cores: str = "1",
                     startup_timeout_s: float = 420) -> Iterator[str]:
    """yields the OpenAI base URL (http://127.0.0.1:<port>) once /v1/models answers and one tiny completion works;
    on exit stops everything it started, by process id (no stray raylet/gcs/vLLM `spawn_main` processes)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    http_port, ray_port = processes.free_port(), processes.free_port()
    config = serve_config(model_path=model_path, served_name=served_name, max_model_len=max_model_len,
                          is_cpu_fixed=is_cpu_fixed, prefill_cores=prefill_cores, decode_cores=decode_cores,
                          http_port=http_port)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rl-"))  # short: Ray's socket paths must fit 107 bytes
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    processes.use_ray_token_auth()  # the head and `serve run` inherit this process's token
    env = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_log, serve_log = logs_dir / f"ray-head-{name}.log", logs_dir / f"serve-run-{name}.log"
    ray_head = processes.start(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}",
         f"--num-cpus={RAY_LOGICAL_CPUS}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={workdir / 'ray'}"], ray_log, env=env)
    serve_proc = None
    seen_children: list[psutil.Process] = []
    try:
        processes.wait_until(lambda: (workdir / "ray" / "session_latest").exists(), timeout_s=120,
                             what="ray head", proc=ray_head, log_path=ray_log)
        serve_proc = processes.start(
            [str(VENV_BIN / "serve"), "run", str(config_path), "--address", f"127.0.0.1:{ray_port}"],
            serve_log, env=env)
        base_url = f"http://127.0.0.1:{http_port}"
        processes.wait_until(lambda: _is_serving(base_url, served_name), timeout_s=startup_timeout_s,
                             what=f"Ray Serve LLM PD ({name})", proc=serve_proc, log_path=serve_log, interval_s=3)
        seen_children = processes.descendants(ray_head)  # engines included, while their parents still live
        yield base_url
    finally:
        seen_children += processes.descendants(ray_head)
        if serve_proc is not None:
            processes.stop(serve_proc, first_signal=signal.SIGINT, grace_s=90)
        processes.stop(ray_head, first_signal=signal.SIGTERM, grace_s=60, known_children=seen_children)
        # The replicas' and engines' own logs live in the Ray session; keep them beside ours.
        if (workdir / "ray" / "session_latest" / "logs").is_dir():
            shutil.copytree(workdir / "ray" / "session_latest" / "logs", logs_dir / f"ray-session-{name}",
                            dirs_exist_ok=True, ignore_dangling_symlinks=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _timed_stream(client: Any, served_name: str, prompt: str) -> tuple[float, float]:
    """(TTFT, TPOT) of one streamed greedy completion. Ray Serve LLM batches stream chunks (every 50 ms), so
    TPOT divides by the tokens the server counted, not by the chunks."""
    sent, first, last, usage = time.perf_counter(), None, None, None
    for chunk in client.completions.create(model=served_name, prompt=prompt, max_tokens=NUM_OUTPUT_TOKENS,
                                           temperature=0, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
    if first is None or usage is None:
        raise RuntimeError("the stream ended without text or usage")
    return first - sent, (last - first) / max(1, usage.completion_tokens - 1)


def main() -> None:
    import openai

    from bench.load_generator import PromptBuilder, filler_document

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    variant = parser.add_mutually_exclusive_group(required=True)
    variant.add_argument("--cpu-fixed", dest="is_cpu_fixed", action="store_true")
    variant.add_argument("--as-shipped", dest="is_cpu_fixed", action="store_false")
    args = parser.parse_args()
    name = "ray-serve-llm-" + ("cpu-fixed" if args.is_cpu_fixed else "as-shipped")
    model_path, served_name = str(PROJECT_ROOT / DEFAULT_MODEL_PATH), pathlib.Path(DEFAULT_MODEL_PATH).name
    prompts = [PromptBuilder(model_path, filler_document()).build(index, NUM_PROMPT_TOKENS) for index in range(3)]
    started = time.perf_counter()
    with ray_serve_llm_pd(model_path=model_path, served_name=served_name, max_model_len=2048,
                          is_cpu_fixed=args.is_cpu_fixed, logs_dir=PROJECT_ROOT / ".cache" / "bench-logs",
                          name=name) as base_url:
        print(f"{name}: serving at {base_url} after {time.perf_counter() - started:.0f} s", flush=True)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        ttfts, tpots = zip(*[_timed_stream(client, served_name, prompt) for prompt in prompts])
    print(f"{name}: TTFT {' '.join(f'{t:.2f}' for t in ttfts)} s (mean {statistics.mean(ttfts):.2f}), "
          f"TPOT {' '.join(f'{t:.3f}' for t in tpots)} s (mean {statistics.mean(tpots):.3f}); "
          f"{NUM_PROMPT_TOKENS}-token prompts, {NUM_OUTPUT_TOKENS} output tokens, greedy")


if __name__ == "__main__":
    main()
