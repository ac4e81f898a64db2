"""The one place that builds and drives a vLLM engine: `AsyncLLM` plus vLLM's own OpenAI serving layer.

1. `engine_environment` fixes what vLLM reads from the process environment (cores, KV-cache size, NIXL address);
   the EngineCore subprocess inherits it when it is spawned.
2. `Engine.start` parses our config into vLLM's own CLI arguments, so every default of `vllm serve` applies,
   starts `AsyncLLM` with a counting stat logger (which also publishes splitserve's KV-transfer metrics) and
   vLLM's own metrics re-exported through Ray (`RayPrometheusStatLogger`), and builds vLLM's serving objects
   (`init_app_state`): chat templates, request validation, sampling parameters, stop strings and response shapes
   all stay vLLM's.
3. `generate` runs a typed vLLM request (chat or completion) through those objects and returns what vLLM returns:
   an SSE string stream, a full response, or an `ErrorResponse`. Exceptions become `ErrorResponse` values here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import random
import socket
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

from deployments.engine_counters import EngineCounters, counting_stat_logger
from deployments.error_responses import service_unavailable
from deployments.messages import OpenAIRequest
from deployments.step_trace import step_trace_logger, step_trace_path
from kv_transfer.config import TransferConfig
from serve_app.config import EngineRoleConfig, ModelConfig

logger = logging.getLogger("splitserve.engine")


# Below the kernel's ephemeral range (32768-60999), where every outgoing connection takes its local port, and
# above Ray's worker ports (10002-19999) and Ray Serve LLM's NIXL ports (20000+, 22000+). A port taken from the
# ephemeral range could be given to a connection between our check and vLLM's bind: NIXL's handshake listener
# then dies with "Address already in use" (seen here).
SIDE_CHANNEL_PORTS = range(24000, 32000)


LOOPBACK = "127.0.0.1"


def side_channel_host(setting: str, *, node_ip: str, num_alive_nodes: int) -> str:
    """The address NIXL's side channel listens on: loopback while the cluster is one node (nothing outside the host
    can reach it), the node's own address once decode may run on another node."""
    if setting == "loopback" or (setting == "auto" and num_alive_nodes <= 1):
        return LOOPBACK
    return node_ip


def this_node_ip() -> str:
    """The address this Ray node was started with (`ray start --node-ip-address`), as the cluster lists it:
    `ray.util.get_node_ip_address()` answers the host's routed address on a head started on loopback."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next((node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id),
                ray.util.get_node_ip_address())


def _this_nodes_side_channel_host(setting: str) -> str:
    import ray

    if setting == "loopback":
        return LOOPBACK
    num_alive_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return side_channel_host(setting, node_ip=this_node_ip(), num_alive_nodes=num_alive_nodes)


def _side_channel_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now, from a range no connection is given automatically."""
    for port in random.sample(SIDE_CHANNEL_PORTS, 64):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port for NIXL's side channel in {SIDE_CHANNEL_PORTS}")


def engine_environment(role: EngineRoleConfig, replica_rank: int, *,
                       side_channel_host: str = LOOPBACK) -> dict[str, str]:
    return {
        "VLLM_CPU_OMP_THREADS_BIND": role.cpu_binding_for(replica_rank),
        "VLLM_CPU_KVCACHE_SPACE": str(role.kv_cache_gib),
        # Each engine's NIXL side channel (where decode asks prefill for its agent metadata) needs its own port.
        "VLLM_NIXL_SIDE_CHANNEL_HOST": side_channel_host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(_side_channel_port(side_channel_host)),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
    }


def binding_cores(binding: str) -> set[int]:
    """The cores a `cpu_binding` entry names ("0", "0-3", "1,3", "0|1": every rank's), empty for "auto"."""
    cores: set[int] = set()
    for part in binding.replace("|", ",").split(","):
        if part and part != "auto":
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
    return cores


def vllm_cli_args(model: ModelConfig, role: EngineRoleConfig, kv_transfer_config: dict[str, Any] | None) -> list[str]:
    args = [
        "--model", model.path,
        "--served-model-name", model.served_name,
        "--dtype", model.dtype,
        "--max-model-len", str(model.max_model_len),
        "--seed", str(model.seed),
        "--max-num-seqs", str(role.max_num_seqs),
        "--max-num-batched-tokens", str(role.max_num_batched_tokens),
        # usage.prompt_tokens_details.cached_tokens: clients see how much of the prompt was not recomputed.
        "--enable-prompt-tokens-details",
    ]
    if role.gpu_memory_fraction is not None:
        args += ["--gpu-memory-utilization", str(role.gpu_memory_fraction)]
    if role.long_prefill_token_threshold:
        args += ["--long-prefill-token-threshold", str(role.long_prefill_token_threshold)]
    if role.scheduling_policy != "fcfs":  # shortest_first is vLLM's priority policy, its priorities set by the replica
        args += ["--scheduling-policy", "priority"]
    if model.block_size is not None:
        args += ["--block-size", str(model.block_size)]
    if model.enforce_eager:
        args.append("--enforce-eager")
    if kv_transfer_config is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    return args


@contextlib.contextmanager
def serve_log_files_kept(logger_name: str = "ray.serve") -> Iterator[None]:
    """vLLM configures logging (`logging.config.dictConfig`) when it builds an engine config and when its NIXL
    connector module is imported, and dictConfig closes every handler of the process: Serve's replica log file
    among them, whose MemoryHandler then drops what it is given. Every log line of the replica (request ids
    included) would go to stderr only. Re-attach the files afterwards."""
    handlers = [handler for handler in logging.getLogger(logger_name).handlers
                if isinstance(handler, logging.handlers.MemoryHandler)]
    targets = [handler.target for handler in handlers]
    try:
        yield
    finally:
        for handler, target in zip(handlers, targets):
            if handler.target is None and target is not None:
                handler.setTarget(target)  # a closed FileHandler opens its file again on the next record


class Engine:
    """A started vLLM engine and its OpenAI serving objects."""

    def __init__(self, engine_client: Any, state: Any, counters: Any):
        self.engine_client = engine_client
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._models = state.openai_serving_models
        self._counters = counters

    @classmethod
    async def start(
        cls, model: ModelConfig, role: EngineRoleConfig, *, replica_rank: int, role_name: str = "engine",
        transfer: TransferConfig | None = None, engine_id: str = "", is_kv_producer: bool = False,
    ) -> Engine:
        """`transfer` None: a plain engine (collocated). Otherwise the engine gets the backend's KV connector, as
        producer (prefill) or consumer (decode). Everything here runs with Serve's log files kept: vLLM's engine
        start and the import of its NIXL connector both reset Python logging."""
        with serve_log_files_kept():
            return await cls._start(model, role, replica_rank=replica_rank, role_name=role_name, transfer=transfer,
                                    engine_id=engine_id, is_kv_producer=is_kv_producer)

    @classmethod
    async def _start(
        cls, model: ModelConfig, role: EngineRoleConfig, *, replica_rank: int, role_name: str,
        transfer: TransferConfig | None, engine_id: str, is_kv_producer: bool,
    ) -> Engine:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        from deployments.transfer_metrics import KVTransferMetrics
        from kv_transfer.backend import kv_transfer_config

        connector_config = None if transfer is None else kv_transfer_config(
            transfer, is_producer=is_kv_producer, engine_id=engine_id)
        environment = engine_environment(role, replica_rank, side_channel_host=LOOPBACK if transfer is None else
                                         _this_nodes_side_channel_host(transfer.side_channel_host))
        # vLLM reads these from the environment of the process that spawns its EngineCore: this one.
        os.environ.update(environment)
        cli_args = vllm_cli_args(model, role, connector_config)
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(cli_args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        on_transfer_stats = None if transfer is None else KVTransferMetrics(
            model.served_name, transfer.backend, role_name).record
        stat_logger_factory, counters = counting_stat_logger(on_transfer_stats=on_transfer_stats)
        stat_loggers = [stat_logger_factory, RayPrometheusStatLogger]
        trace_path = step_trace_path(role_name, engine_id)
        if trace_path is not None:
            stat_loggers.append(step_trace_logger(trace_path))
        logger.info("starting vLLM engine: %s, env %s", " ".join(cli_args), environment)
        if role.pin_engine_processes and (cores := binding_cores(role.cpu_binding_for(replica_rank))):
            os.sched_setaffinity(0, cores)  # the EngineCore and worker processes spawned next inherit it
        engine_client = AsyncLLM.from_vllm_config(
            vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=stat_loggers
        )
        state = State()
        await init_app_state(engine_client, state, args, supported_tasks=("generate",))
        return cls(engine_client, state, counters)

    async def generate(self, request: OpenAIRequest) -> AsyncGenerator[str, None] | Any:
        """Run a ChatCompletionRequest or CompletionRequest through vLLM's serving layer."""
        create = (
            self._chat.create_chat_completion
            if isinstance(request, ChatCompletionRequest)
            else self._completion.create_completion
        )
        try:
            result = await create(request, raw_request=None)
        except Exception as exc:  # vLLM raises for some bad input instead of returning an ErrorResponse
            logger.info("request %s rejected: %s", getattr(request, "request_id", "?"), exc)
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse) and not self.is_alive:
            # vLLM answers 500 once its engine has died; Serve is about to replace this replica: a 503 tells the
            # client that a retry will be served.
            return service_unavailable("this replica's engine has stopped and is being replaced")
        return result

    def counters(self) -> EngineCounters:
        return self._counters.snapshot()

    def recent_transfer_seconds(self) -> list[float]:
        """Each of the latest KV transfers' seconds (decode's loads), oldest first."""
        return self._counters.recent_transfer_seconds()

    def take_decode_steps(self) -> list[tuple[int, float, int]]:
        """The pure decode steps timed since the last call: (batch size, mean seconds, steps)."""
        return self._counters.take_decode_steps()

    @property
    def is_alive(self) -> bool:
        return not self.engine_client.errored

    async def check_health(self) -> None:
        await self.engine_client.check_health()

    def shutdown(self) -> None:
        self.engine_client.shutdown()
