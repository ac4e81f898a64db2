"""The systems a comparison starts, one after another on this host; each yields an OpenAI base URL while it runs.

- `collocated`: splitserve's router in front of two plain vLLM replicas (one per core) that run both phases:
  `build_app` in `mode: collocated`. The baseline every ratio is taken against.
- `splitserve-object-store`, `splitserve-nixl`: splitserve PD (prefill on core 0, decode on core 1), with each
  KV transfer backend, every request split (`always_split`, the shipped default).
- `splitserve-token-jsq`, `splitserve-conditional`, `splitserve-mixed-pool`, `splitserve-predictive`: the same
  engines on NIXL, each scheduling policy as its own row (`--systems policies` runs them all beside the baseline,
  splitserve-nixl and the CPU-fixed peer); `splitserve-predictive-chunked`: predictive with decode computing a
  local prompt in small chunks (vLLM's long_prefill_token_threshold); `splitserve-predictive-short-steps`:
  predictive with prefill steps of at most 512 tokens (vLLM's max_num_batched_tokens); `splitserve-predictive-pinned`:
  predictive with every engine process pinned to its role's core (`pin_engine_processes`).
- `collocated-vllm-spin`, `splitserve-predictive-vllm-spin`: those two with vLLM's engine processes spinning on
  their queues as vLLM ships them (`SPLITSERVE_ENGINE_SPIN_S=vllm`; deployments/engine_ipc.py), to weigh the spin.
- `ray-serve-llm-pd-cpu-fixed`: Ray Serve LLM's `build_pd_openai_app` with vLLM's NixlConnector, the two CPU
  pathologies removed (docs/kv-transfer.md): the peer at its best on this host (labelled as such).
- `ray-serve-llm-pd`: the same, as its users get it.

Every system uses serve_config.yaml's model and engine settings; each is stopped, with every process it started,
before the next one starts, so no two systems share the cores.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import processes
from bench.processes import PROJECT_ROOT


@dataclass(frozen=True)
class System:
    name: str
    description: str
    start: Callable[[Path], contextlib.AbstractContextManager[str]]  # logs dir -> base URL while running
    config: Callable[[], dict[str, Any]]  # the full serve config it runs, for run.json (ports are picked at start)


# SPLITSERVE_DEVICE=cuda (`make test-gpu`, or a comparison on a GPU host): the same configs on one CUDA GPU, each
# engine on a share of it small enough for the most engines a test starts at once (three); CPU bindings and KV
# sizes in GiB then do nothing.
GPU_SHARE = {"num_gpus": 0.3, "gpu_memory_fraction": 0.25}


def serve_config(**args_update: Any) -> dict[str, Any]:
    """serve_config.yaml with `args` sections updated (one level deep), e.g. transfer={"backend": "nixl"}."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    if os.environ.get("SPLITSERVE_DEVICE") == "cuda":
        for role in ("prefill", "decode", "collocated"):
            args[role] = {**args[role], **GPU_SHARE}
    for section, update in args_update.items():
        args[section] = {**args[section], **update} if isinstance(update, dict) else update
    return config


def app_config(config: dict[str, Any] | None = None) -> Any:
    from serve_app.config import AppConfig

    return AppConfig.model_validate((config or serve_config())["applications"][0]["args"])


def _splitserve(name: str, *, env: dict[str, str] | None = None,
                **args_update: Any) -> Callable[[Path], contextlib.AbstractContextManager[str]]:
    """`env`: set where the app's processes start (the Ray head and `serve run`), e.g. VLLM_SPIN."""
    @contextlib.contextmanager
    def start(logs_dir: Path) -> Iterator[str]:
        with processes.serve_run(serve_config(**copy.deepcopy(args_update)), name=name, logs_dir=logs_dir,
                                 env=env) as app:
            yield app.base_url

    return start


def _ray_serve_llm_config(*, is_cpu_fixed: bool) -> dict[str, Any]:
    from bench.ray_serve_llm_peer import serve_config as peer_serve_config

    config = app_config()
    return peer_serve_config(model_path=config.model.path, served_name=config.model.served_name,
                             max_model_len=config.model.max_model_len, is_cpu_fixed=is_cpu_fixed,
                             prefill_cores=config.prefill.cpu_binding_for(0),
                             decode_cores=config.decode.cpu_binding_for(0), http_port=0)


def _ray_serve_llm(name: str, *, is_cpu_fixed: bool) -> Callable[[Path], contextlib.AbstractContextManager[str]]:
    @contextlib.contextmanager
    def start(logs_dir: Path) -> Iterator[str]:
        from bench.ray_serve_llm_peer import ray_serve_llm_pd

        config = app_config()
        with ray_serve_llm_pd(model_path=config.model.path, served_name=config.model.served_name,
                              max_model_len=config.model.max_model_len, is_cpu_fixed=is_cpu_fixed,
                              logs_dir=logs_dir, name=name, prefill_cores=config.prefill.cpu_binding_for(0),
                              decode_cores=config.decode.cpu_binding_for(0)) as base_url:
            yield base_url

    return start


# The two transfer systems split every request (always_split): they measure the hand-over path itself, whatever
# the shipped default policy; collocated's policy is its mode's (serve_config.yaml leaves it null).
ALWAYS_SPLIT = {"policy": "always_split"}
SPLITSERVE_UPDATES: dict[str, dict[str, Any]] = {
    "collocated": {"mode": "collocated"},
    "splitserve-object-store": {"transfer": {"backend": "object_store"}, "scheduling": ALWAYS_SPLIT},
    "splitserve-nixl": {"transfer": {"backend": "nixl"}, "scheduling": ALWAYS_SPLIT},
}
# The object store with every KV loaded in the background (`is_load_in_step: false`, the only way before): what
# loading inside decode's step buys a split.
SPLITSERVE_UPDATES["splitserve-object-store-in-background"] = {
    "transfer": {"backend": "object_store", "is_load_in_step": False}, "scheduling": ALWAYS_SPLIT}
# NIXL and the default policy with every KV loaded in the background, as vLLM's NixlConnector loads (NIXL's default
# from 19b28e4 until the in-step load became it, and the only way before 666a193).
SPLITSERVE_UPDATES["splitserve-nixl-in-background"] = {
    "transfer": {"backend": "nixl", "is_load_in_step": False}, "scheduling": ALWAYS_SPLIT}
SPLITSERVE_UPDATES["splitserve-predictive-in-background"] = {
    "transfer": {"backend": "nixl", "is_load_in_step": False}, "scheduling": {"policy": "predictive"}}
# NIXL and the default policy with each split loaded inside decode's step (named: the default since the wait polls
# only its own READs, docs/benchmarks.md).
SPLITSERVE_UPDATES["splitserve-nixl-in-step"] = {
    "transfer": {"backend": "nixl", "is_load_in_step": True}, "scheduling": ALWAYS_SPLIT}
SPLITSERVE_UPDATES["splitserve-predictive-in-step"] = {
    "transfer": {"backend": "nixl", "is_load_in_step": True}, "scheduling": {"policy": "predictive"}}
POLICY_SYSTEMS = {"splitserve-token-jsq": "token_jsq", "splitserve-conditional": "conditional",
                  "splitserve-mixed-pool": "mixed_pool", "splitserve-predictive": "predictive"}
for _name, _policy in POLICY_SYSTEMS.items():
    SPLITSERVE_UPDATES[_name] = {"transfer": {"backend": "nixl"}, "scheduling": {"policy": _policy}}
# mixed_pool lends engines at thresholds a CPU engine reaches inside the TTFT bounds: the app's defaults (2,048 /
# 512 pending prompt tokens) are about 7 s of prompts on one core of the AMD EPYC host, past every bound; 256 / 64
# tokens are about 0.9 / 0.2 s there.
MIXED_POOL_THRESHOLDS = {"borrow_tokens": 256, "return_tokens": 64}
SPLITSERVE_UPDATES["splitserve-mixed-pool"]["scheduling"] |= MIXED_POOL_THRESHOLDS
# The predictive policy with a small chunk budget on decode (vLLM's long_prefill_token_threshold): a local prompt
# there rides many short steps beside the streams instead of one long one, which its TBT guard weighs.
DECODE_CHUNK_TOKENS = 64
SPLITSERVE_UPDATES["splitserve-predictive-chunked"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"], "decode": {"long_prefill_token_threshold": DECODE_CHUNK_TOKENS}}
# The predictive policy with short prefill steps: on a CPU, prefill is compute-bound, so a 2,048-token step (several
# prompts batched) makes each of them wait for all of them; a smaller step budget lets a short prompt finish early.
PREFILL_STEP_TOKENS = 512
SPLITSERVE_UPDATES["splitserve-predictive-short-steps"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"], "prefill": {"max_num_batched_tokens": PREFILL_STEP_TOKENS}}

# The predictive policy with prefill engines running the shortest waiting prompt first, aged (a role's
# `scheduling_policy: shortest_first`): in a burst, short prompts stop waiting behind long ones.
SPLITSERVE_UPDATES["splitserve-predictive-shortest-first"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"], "prefill": {"scheduling_policy": "shortest_first"}}

# The predictive policy whose TBT guard charges a decode-local chunk its compute only, not a request's fixed cost.
SPLITSERVE_UPDATES["splitserve-predictive-compute-guard"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"],
    "scheduling": {**SPLITSERVE_UPDATES["splitserve-predictive"]["scheduling"], "tbt_guard_charge": "compute"}}

# The predictive policy offering prefill-local only while decode could take no more streams (the rule before ebcbefc),
# to hold the current rule (whenever prefill computes no prompt) against it in one run.
SPLITSERVE_UPDATES["splitserve-predictive-prefill-when-decode-full"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"],
    "scheduling": {**SPLITSERVE_UPDATES["splitserve-predictive"]["scheduling"], "prefill_local": "decode_full"}}


# The predictive policy whose TBT guard never yields (`split_late_slowdown: null`, the rule before it could): a prompt
# the split would make late stays off a busy decode engine all the same.
SPLITSERVE_UPDATES["splitserve-predictive-guard-holds"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"],
    "scheduling": {**SPLITSERVE_UPDATES["splitserve-predictive"]["scheduling"], "split_late_slowdown": None}}

# The predictive policy whose yield keeps the gap bound (`is_gap_bound_kept_on_yield`): only prompts short enough for
# decode's streams are saved from a late split (xeon_in_step: the yield fed a loop of long prompts on decode).
SPLITSERVE_UPDATES["splitserve-predictive-gap-kept"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"],
    "scheduling": {**SPLITSERVE_UPDATES["splitserve-predictive"]["scheduling"], "is_gap_bound_kept_on_yield": True}}

# The same, with decode computing a local prompt 128 tokens a step (its step with a chunk, ~65 + 190 ms here, within
# the gap bound of 5x its ~60 ms step): a yielded long prompt rides several short steps instead of stalling one.
SPLITSERVE_UPDATES["splitserve-predictive-gap-kept-chunked"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive-gap-kept"], "decode": {"long_prefill_token_threshold": 128}}

# The predictive policy with decode computing a local prompt 64 tokens a step and its TBT guard charging a chunk its
# compute only, so that a yielded long prompt rides several steps within the gap bound (at ~3.5 ms a token and ~80
# ms steps, a 64-token step is ~0.3 s, under 5x the step) instead of stalling one. Measured worse than the default
# (bench/results/chunked_compute): more long gaps, fewer prompts taken on decode.
SPLITSERVE_UPDATES["splitserve-predictive-chunked-compute"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive-compute-guard"],
    "decode": {"long_prefill_token_threshold": DECODE_CHUNK_TOKENS}}

# The predictive policy with each engine's whole replica process pinned to its cores (`pin_engine_processes`), so
# that vLLM's EngineCore, which spins on its queue through every step of its worker, spins on its own engine's core.
SPLITSERVE_UPDATES["splitserve-predictive-pinned"] = {
    **SPLITSERVE_UPDATES["splitserve-predictive"], "prefill": {"pin_engine_processes": True},
    "decode": {"pin_engine_processes": True}}


# 2 prefill + 1 decode engines on this host's two cores: both prefill engines bound to core 0 (serve_config.yaml's
# prefill binding), taking turns on it, decode on core 1. The simulator's second shape to validate against, as
# always_split and as the default policy.
TWO_PREFILL = {"prefill": {"num_replicas": 2}}
SPLITSERVE_UPDATES["splitserve-2p1d-nixl"] = {**SPLITSERVE_UPDATES["splitserve-nixl"], **TWO_PREFILL}
SPLITSERVE_UPDATES["splitserve-2p1d-predictive"] = {**SPLITSERVE_UPDATES["splitserve-predictive"], **TWO_PREFILL}


# always_split with each engine replica taking only its batch (`max_ongoing_requests` 16, the default before
# max_queued_requests was added to it): requests past it wait in Serve's router, which retries the chosen replica
# with backoff until it has room. What queueing in the engines instead buys at saturation (docs/benchmarks.md).
SERVE_QUEUE = {"prefill": {"max_ongoing_requests": 16}, "decode": {"max_ongoing_requests": 16}}
SPLITSERVE_UPDATES["splitserve-nixl-serve-queue"] = {**SPLITSERVE_UPDATES["splitserve-nixl"], **SERVE_QUEUE}


# vLLM's own queues between an engine's processes (a 1 s sched_yield spin), instead of our plugin's sleeping readers
# (deployments/engine_ipc.py): what sleeping buys, measured against the same systems with vLLM's spin.
VLLM_SPIN = {"SPLITSERVE_ENGINE_SPIN_S": "vllm"}
SPIN_SYSTEMS = {"collocated-vllm-spin": "collocated", "splitserve-predictive-vllm-spin": "splitserve-predictive"}
for _name, _of in SPIN_SYSTEMS.items():
    SPLITSERVE_UPDATES[_name] = SPLITSERVE_UPDATES[_of]


def _variant(name: str, description: str, *, env: dict[str, str] | None = None) -> System:
    """A splitserve system that differs from serve_config.yaml by `SPLITSERVE_UPDATES[name]` (and `env`)."""
    return System(name, description, _splitserve(name, env=env, **SPLITSERVE_UPDATES[name]),
                  lambda: serve_config(**copy.deepcopy(SPLITSERVE_UPDATES[name])))


SYSTEMS: dict[str, System] = {system.name: system for system in [
    System("collocated", "splitserve router + 2 plain vLLM replicas (cores 0 and 1), both phases on each",
           _splitserve("collocated", **SPLITSERVE_UPDATES["collocated"]),
           lambda: serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["collocated"]))),
    System("splitserve-object-store",
           "splitserve PD, KV through Ray's object store (sent layer by layer, loaded in decode's step)",
           _splitserve("splitserve-object-store", **SPLITSERVE_UPDATES["splitserve-object-store"]),
           lambda: serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["splitserve-object-store"]))),
    System("splitserve-nixl", "splitserve PD, KV through NIXL (UCX on DRAM)",
           _splitserve("splitserve-nixl", **SPLITSERVE_UPDATES["splitserve-nixl"]),
           lambda: serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["splitserve-nixl"]))),
    System("ray-serve-llm-pd-cpu-fixed", "Ray Serve LLM build_pd_openai_app + NixlConnector, CPU pathologies removed",
           _ray_serve_llm("ray-serve-llm-pd-cpu-fixed", is_cpu_fixed=True),
           lambda: _ray_serve_llm_config(is_cpu_fixed=True)),
    System("ray-serve-llm-pd", "Ray Serve LLM build_pd_openai_app + NixlConnector, as shipped",
           _ray_serve_llm("ray-serve-llm-pd", is_cpu_fixed=False),
           lambda: _ray_serve_llm_config(is_cpu_fixed=False)),
    *[_variant(name, f"splitserve PD on NIXL, scheduling policy {policy}") for name, policy in POLICY_SYSTEMS.items()],
    _variant("splitserve-predictive-chunked",
             f"splitserve PD on NIXL, predictive, decode prompts in chunks of {DECODE_CHUNK_TOKENS} tokens"),
    _variant("splitserve-predictive-short-steps",
             f"splitserve PD on NIXL, predictive, prefill steps of at most {PREFILL_STEP_TOKENS} tokens"),
    _variant("splitserve-predictive-compute-guard",
             "splitserve PD on NIXL, predictive, its TBT guard charging a decode-local chunk its compute only"),
    _variant("splitserve-predictive-shortest-first",
             "splitserve PD on NIXL, predictive, prefill engines run the shortest waiting prompt first (aged)"),
    _variant("splitserve-predictive-prefill-when-decode-full",
             "splitserve PD on NIXL, predictive, prefill-local only while decode can take no more streams"),
    _variant("splitserve-predictive-guard-holds",
             "splitserve PD on NIXL, predictive, its TBT guard never yielding to a prompt the split makes late"),
    _variant("splitserve-predictive-gap-kept",
             "splitserve PD on NIXL, predictive, its TBT guard yielding only within the gap bound"),
    _variant("splitserve-predictive-gap-kept-chunked",
             "splitserve PD on NIXL, predictive, yielding within the gap bound, decode prompts 128 tokens a step"),
    _variant("splitserve-predictive-chunked-compute",
             f"splitserve PD on NIXL, predictive, decode prompts {DECODE_CHUNK_TOKENS} tokens a step, "
             "compute-charged guard"),
    _variant("splitserve-predictive-pinned",
             "splitserve PD on NIXL, predictive, each engine's replica and vLLM processes pinned to its core"),
    _variant("splitserve-object-store-in-background",
             "splitserve PD, KV through Ray's object store, every KV loaded in the background (computed a step later)"),
    _variant("splitserve-nixl-in-background",
             "splitserve PD on NIXL, always_split, every KV loaded in the background (computed a step later)"),
    _variant("splitserve-predictive-in-background",
             "splitserve PD on NIXL, predictive, every KV loaded in the background (computed a step later)"),
    _variant("splitserve-nixl-in-step",
             "splitserve PD on NIXL, always_split, each split loaded inside decode's step"),
    _variant("splitserve-predictive-in-step",
             "splitserve PD on NIXL, predictive, each split loaded inside decode's step"),
    _variant("splitserve-2p1d-nixl",
             "splitserve PD on NIXL, always_split, 2 prefill engines (sharing core 0) + 1 decode"),
    _variant("splitserve-2p1d-predictive",
             "splitserve PD on NIXL, predictive, 2 prefill engines (sharing core 0) + 1 decode"),
    _variant("splitserve-nixl-serve-queue",
             "splitserve PD on NIXL, always_split, engine replicas taking only their batch (the rest queued in Serve)"),
    *[_variant(name, f"{of}, its engines' processes waiting for each other with vLLM's 1 s spin", env=VLLM_SPIN)
      for name, of in SPIN_SYSTEMS.items()],
]}
BASELINE = "collocated"
SPLIT_BASELINE = "splitserve-nixl"  # always_split on the policies' backend: what every policy is also held against
# The default comparison: splitserve as shipped (serve_config.yaml's default policy, predictive, on NIXL) against
# the two baselines; `--systems policies` adds always_split and the other policies, `--systems all` the rest.
DEFAULT_SYSTEMS = ("collocated", "splitserve-predictive", "ray-serve-llm-pd-cpu-fixed")
# `--systems policies`: every scheduling policy as its own row, beside the baseline and the peer.
POLICY_COMPARISON = ("collocated", "splitserve-nixl", *POLICY_SYSTEMS, "splitserve-predictive-chunked",
                     "ray-serve-llm-pd-cpu-fixed")
