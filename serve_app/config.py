"""serve_config.yaml's `args`, validated once at start-up. Frozen: nothing downstream mutates config.

Every error names the bad value and what is allowed, e.g.
`model.dtype: 'fp8' is not one of float32, bfloat16, float16`.

A leaf module: it imports nothing of splitserve's but other config (the `transfer` section is kv_transfer's own,
kv_transfer/config.py), so that every layer may import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kv_transfer.config import TransferConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The embedded default model, converted by `make setup` (serve_app/model.py).
DEFAULT_MODEL_DIR = PROJECT_ROOT / ".models" / "SmolLM2-135M-Instruct"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """What both engines load. `path` is a local HF-format directory (or a hub id where a hub is reachable)."""

    path: str = str(DEFAULT_MODEL_DIR)
    served_name: str = "SmolLM2-135M-Instruct"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_model_len: int = Field(2048, ge=16)
    # None keeps vLLM's default for the platform (128 on CPU, whose attention needs multiples of 32).
    block_size: int | None = Field(None, ge=1)
    seed: int = 0
    enforce_eager: bool = True

    @field_validator("path")
    @classmethod
    def path_is_a_model_dir_or_hub_id(cls, value: str) -> str:
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = PROJECT_ROOT / candidate
        if candidate.exists():
            if not (candidate / "config.json").is_file():
                raise ValueError(f"model.path {str(candidate)!r} has no config.json: not an HF model directory")
            return str(candidate)
        looks_like_hub_id = value.count("/") == 1 and not value.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            hint = " (run `make setup` to convert the embedded default model)" if candidate == DEFAULT_MODEL_DIR else ""
            raise ValueError(f"model.path {value!r} does not exist{hint}")
        return value


class PlacedConfig(_Frozen):
    """Where a deployment's replicas run in the Ray cluster. Ray's logical CPUs and GPUs per replica; Ray custom
    resources per replica (nodes started with `ray start --resources '{"prefill_pool": 8}'`); node labels a replica's
    node must match (`ray start --labels splitserve/pool=prefill`; Ray's label selector: "v", "!v", "in(a,b)",
    "!in(a,b)"). Roles given different labels or resources never share a node. Ray's own rules check them when the
    app is built (serve_app/placement.py): this module stays free of Ray."""

    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # a vLLM engine on CUDA takes one per tensor-parallel rank
    resources: dict[str, float] = Field(default_factory=dict)
    node_labels: dict[str, str] = Field(default_factory=dict)
    # false: a placement that no live node can take (GPUs on a CPU-only cluster, a resource or label no node has) is
    # refused when the app starts, naming what each node has; true: Serve waits for such a node to join (a cluster
    # autoscaler or KubeRay adds nodes after the app starts).
    wait_for_nodes: bool = False

    @property
    def ray_actor_options(self) -> dict[str, Any]:
        """What Serve places each replica by: only the options that are set, so a one-node app asks for nothing."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.node_labels:
            options["label_selector"] = dict(self.node_labels)
        return options


class PoolAutoscalingConfig(_Frozen):
    """Serve's autoscaling of one role's replicas, on the signal that predicts that role's SLO misses
    (deployments/scheduling/pool_size.py): prefill on the seconds of prompt compute it holds, decode on the requests
    it holds against the batch each replica runs within the TBT bound (`scheduling.tbt_mean_slowdown`), collocated
    on Serve's own count of ongoing requests (`max_num_seqs` per replica). `num_replicas` is where it starts."""

    min_replicas: int = Field(1, ge=1)  # a pool the scheduler routes to never empties
    max_replicas: int = Field(2, ge=1)
    # prefill: seconds of queued prompt compute per replica the pool aims at (a first token waits behind them).
    target_queue_s: float = Field(2.0, gt=0)
    # Serve's own guards against flapping: a change must be wanted this long before it happens.
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    # How often replicas report, and over how long Serve averages their reports.
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def min_below_max(self) -> PoolAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        return self


class EngineRoleConfig(PlacedConfig):
    """One role (prefill or decode): its replicas, the cores its engines compute on, its KV-cache size."""

    num_replicas: int = Field(1, ge=1)
    # vLLM's VLLM_CPU_OMP_THREADS_BIND per replica ("0", "0-3", "0|1" ...); one entry is shared by all replicas.
    cpu_binding: list[str] = Field(default_factory=lambda: ["auto"])
    kv_cache_gib: int = Field(1, ge=1)  # vLLM on CPU takes whole GiB (VLLM_CPU_KVCACHE_SPACE)
    # On CUDA: the share of the GPU's memory the engine may take (vLLM's --gpu-memory-utilization; its KV cache is
    # what the weights leave of it). Below 0.5 when two engines share one GPU (num_gpus 0.5). None: vLLM's default.
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    # vLLM's long_prefill_token_threshold: a prompt longer than this is computed at most this many tokens per step
    # when other requests share the batch, so that a prompt run on a decode engine does not stall its streams.
    # 0: no cap (vLLM's default).
    long_prefill_token_threshold: int = Field(0, ge=0)
    # The order in which waiting prompts run: `fcfs` (vLLM's default); `priority` (vLLM's: each request's own
    # `priority`, lower first, ties by arrival); `shortest_first` (vLLM's priority scheduling with the priority
    # set by the replica, deployments/scheduling/prompt_order.py: shorter prompts first, aged so that nothing
    # arriving after the engine has computed `shortest_first_aging` times a prompt's tokens since it came passes
    # it; prefill and decode roles, whose prompt sizes the router sends).
    scheduling_policy: Literal["fcfs", "priority", "shortest_first"] = "fcfs"
    shortest_first_aging: float = Field(1.0, ge=0)
    # num_cpus, num_gpus, resources, node_labels: where the replicas run (PlacedConfig). Ray's logical CPUs count only
    # for placement: the engine's real cores are set by cpu_binding.
    # Pin the whole replica process to its cpu_binding cores before the engine starts, so that vLLM's EngineCore
    # and worker processes (which inherit it) poll on the engine's own cores: after each step they spin for up to a
    # second on any core otherwise, beside the other role's engine. Off: only the model's threads are pinned.
    pin_engine_processes: bool = False
    # Requests one replica takes at once (Serve's max_ongoing_requests); None: max_num_seqs, the engine's batch, plus
    # max_queued_requests, so that requests past the batch wait in vLLM's scheduler for the engine chosen for them.
    # Held back in Serve's router instead, each one retries that replica with backoff until it has room: at
    # saturation the router and the prefill replica spent a third of a 2-core host on it (docs/benchmarks.md).
    max_ongoing_requests: int | None = Field(None, ge=1)
    # Overload bound: requests that may wait for this role beyond what its replicas work on. The router answers
    # the next one with 503 and Retry-After instead of queueing it.
    max_queued_requests: int = Field(32, ge=0)
    # None: `num_replicas` replicas always. Set: Serve scales the role between its bounds (PoolAutoscalingConfig).
    autoscaling: PoolAutoscalingConfig | None = None

    @field_validator("cpu_binding", mode="before")
    @classmethod
    def one_binding_becomes_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, (str, int)) else value

    @field_validator("cpu_binding")
    @classmethod
    def bindings_look_like_core_lists(cls, value: list[str]) -> list[str]:
        allowed = set("0123456789-,|")
        for entry in value:
            if entry != "auto" and (not entry or not set(entry) <= allowed):
                raise ValueError(f"cpu_binding entry {entry!r} is neither 'auto' nor a core list like '0', '0-3', '1,3'")
        return [str(entry) for entry in value]

    @model_validator(mode="after")
    def one_binding_per_replica(self) -> EngineRoleConfig:
        most = self.num_replicas if self.autoscaling is None else self.autoscaling.max_replicas
        if len(self.cpu_binding) not in (1, self.num_replicas, most):
            raise ValueError(
                f"cpu_binding has {len(self.cpu_binding)} entries for {most} replicas: "
                "give one entry (shared) or one per replica"
            )
        return self

    @model_validator(mode="after")
    def starts_within_its_autoscaling_bounds(self) -> EngineRoleConfig:
        bounds = self.autoscaling
        if bounds is not None and not bounds.min_replicas <= self.num_replicas <= bounds.max_replicas:
            raise ValueError(f"num_replicas ({self.num_replicas}) is where autoscaling starts: it must be within "
                             f"min_replicas ({bounds.min_replicas}) and max_replicas ({bounds.max_replicas})")
        return self

    def cpu_binding_for(self, replica_rank: int) -> str:
        return self.cpu_binding[replica_rank % len(self.cpu_binding)]

    @property
    def num_ongoing_per_replica(self) -> int:
        return self.max_ongoing_requests or self.max_num_seqs + self.max_queued_requests

    @property
    def num_working_per_replica(self) -> int:
        """Requests one replica works on, not counting those queued in its engine: what the overload bound counts."""
        return self.max_ongoing_requests or self.max_num_seqs

    @property
    def num_prefill_chunk_tokens(self) -> int:
        """The most prompt tokens of one request this role's engine computes per step beside other requests."""
        return self.long_prefill_token_threshold or self.max_num_batched_tokens

    @property
    def num_admissible(self) -> int:
        """Requests this role may hold in all, working and waiting, before new ones are refused. An autoscaled role
        is bounded by its largest size: the queue that builds meanwhile is what makes it grow."""
        most = self.num_replicas if self.autoscaling is None else self.autoscaling.max_replicas
        return most * self.num_working_per_replica + self.max_queued_requests


class RouterConfig(PlacedConfig):
    # num_cpus, resources, node_labels: where the routers run (PlacedConfig), e.g. on the nodes that take HTTP traffic.
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    # Bodies larger than this are refused with 413 before they are parsed.
    max_request_body_bytes: int = Field(4 << 20, ge=1024)
    # Seconds a refused client is told to wait (Retry-After) when a role is at its overload bound.
    retry_after_s: int = Field(2, ge=1)
    # Optional API key: when this environment variable is set in the router's process, /v1 requests need
    # `Authorization: Bearer <key>` (401 otherwise). The key itself never enters the config.
    api_key_env: str = "SPLITSERVE_API_KEY"


class SchedulingConfig(_Frozen):
    """Which path each request takes (split, decode-local, prefill-local) and which engines serve it
    (deployments/scheduling/). Every threshold is in tokens or requests, or a slowdown against what the engines
    were measured to do: none is a time that fits one host."""

    # always_split: prefill then decode for every request, replicas picked by Serve (the behaviour before a
    # scheduler). token_jsq: split, each pool joined at its shortest queue of pending tokens (SplitwiseSim).
    # mixed_pool: Splitwise's cluster scheduler: engines of one pool borrowed into a mixed pool, running both
    # phases, while the other pool's queue is over a threshold. conditional: Dynamo's rule, split only a long
    # prompt while prefill's queue is short. predictive: the path with the lowest predicted time to first token
    # whose predicted TBT stays within bounds, from rates learned online. Unset or null in serve_config.yaml: the
    # mode's own (AppConfig), predictive where there are two pools, always_split in collocated mode.
    policy: Literal["always_split", "token_jsq", "mixed_pool", "conditional", "predictive"] = "predictive"
    # conditional: prompts up to this many tokens run on decode; longer ones are split while prefill has fewer
    # than `max_prefill_queue_requests` waiting (Dynamo's max_local_prefill_length and max_prefill_queue_size).
    max_local_prompt_tokens: int = Field(1000, ge=0)
    max_prefill_queue_requests: int = Field(2, ge=1)
    # mixed_pool: a decode engine joins the mixed pool when every prefill engine has more than `borrow_tokens`
    # pending, and goes back when one has fewer than `return_tokens`; a prefill engine joins when every decode
    # engine holds more than `borrow_requests`, back under `return_requests`.
    borrow_tokens: int = Field(2048, ge=1)
    return_tokens: int = Field(512, ge=0)
    borrow_requests: int = Field(12, ge=1)
    return_requests: int = Field(6, ge=0)
    # predictive: the bounds a decode-local prompt must keep decode's streams within, as slowdowns of the decode
    # engine's own measured step time (Splitwise's TBT SLOs: a request's mean gap 1.25x, any one gap 5x); the
    # mean bound weighs what the prompt adds, not the stream that joins the batch on every path.
    tbt_mean_slowdown: float = Field(1.25, gt=1)
    tbt_gap_slowdown: float = Field(5.0, gt=1)
    # predictive: where the split's predicted TTFT is past this multiple of its TTFT on idle engines (Splitwise's
    # P90 TTFT SLO, 3x) and a decode engine would start the prompt within that, the bounds above yield and the
    # prompt runs decode-local; null: they never yield.
    split_late_slowdown: float | None = Field(3.0, gt=1)
    # predictive: whether a yield still keeps the gap bound (the step that carries the prompt, beside the prompts
    # already waiting on that engine, within `tbt_gap_slowdown` of its single-stream step), so that it saves only
    # prompts short enough for decode's streams. false: it lifts both bounds. Under load on the code trace the
    # yield fed a loop, long prompts on decode, its steps 1-2 s, every split waiting for one and so predicted late
    # (bench/results/xeon_in_step, docs/benchmarks.md); true is being measured against it.
    is_gap_bound_kept_on_yield: bool = False
    # What the guard charges a decode step for a local prompt's chunk: "request", the engine's whole learned prefill
    # time (its line's intercept too: a request's own calls and forward pass), or "compute", the line's slope only
    # (the chunk rides in a step that runs for the streams anyway). "compute" is being measured (docs/benchmarks.md).
    tbt_guard_charge: Literal["request", "compute"] = "request"
    # When predictive offers a whole request to a prefill engine (within the mean bound either way): "idle", whenever
    # it computes no prompt (at light load the two engines share the streams, as collocated's do); "decode_full",
    # only while decode's least-loaded engine could take no more streams within the mean bound (before ebcbefc).
    prefill_local: Literal["idle", "decode_full"] = "idle"
    # Observations of each rate before it is trusted; until then predictive acts as token_jsq.
    min_observations: int = Field(4, ge=1)
    # How often each engine replica reports its load (Serve's routing stats, through its controller); between
    # reports every router counts its own traffic.
    load_report_period_s: float = Field(0.5, gt=0, le=60)
    # Lets a request force its path with an `X-Splitserve-Path: split|decode_local|prefill_local` header (tests,
    # debugging). Off in production: a client must not choose where its prompt runs.
    allow_path_override: bool = False

    @model_validator(mode="after")
    def returns_below_borrows(self) -> SchedulingConfig:
        if self.return_tokens >= self.borrow_tokens:
            raise ValueError(f"scheduling.return_tokens ({self.return_tokens}) must be below borrow_tokens "
                             f"({self.borrow_tokens}): an engine must be able to go back")
        if self.return_requests >= self.borrow_requests:
            raise ValueError(f"scheduling.return_requests ({self.return_requests}) must be below borrow_requests "
                             f"({self.borrow_requests}): an engine must be able to go back")
        if self.tbt_gap_slowdown < self.tbt_mean_slowdown:
            raise ValueError(f"scheduling.tbt_gap_slowdown ({self.tbt_gap_slowdown}) is below tbt_mean_slowdown "
                             f"({self.tbt_mean_slowdown}): one gap may not be held tighter than their mean")
        return self


class AppConfig(_Frozen):
    # `disaggregated`: prefill and decode engines with the KV handed over between them (the product).
    # `collocated`: the same router in front of plain vLLM replicas that run both phases (the baseline to beat);
    # `prefill`, `decode` and `transfer` are then unused and `collocated` says how many engines run where.
    mode: Literal["disaggregated", "collocated"] = "disaggregated"
    model: ModelConfig = ModelConfig()
    prefill: EngineRoleConfig = EngineRoleConfig(cpu_binding=["0"])
    decode: EngineRoleConfig = EngineRoleConfig(cpu_binding=["1"])
    collocated: EngineRoleConfig = EngineRoleConfig(num_replicas=2, cpu_binding=["0", "1"])
    router: RouterConfig = RouterConfig()
    transfer: TransferConfig = TransferConfig()
    scheduling: SchedulingConfig = SchedulingConfig()

    @model_validator(mode="before")
    @classmethod
    def policy_defaults_by_mode(cls, data: Any) -> Any:
        """An unset (or null) `scheduling.policy` is the mode's own: collocated mode has one pool, so always_split
        (no choice to make); disaggregated mode gets `predictive`. A user who flips `mode` in serve_config.yaml
        need not touch the scheduling section; a policy set on purpose is checked against the mode below."""
        if not isinstance(data, dict):
            return data
        policy = "always_split" if data.get("mode") == "collocated" else "predictive"
        scheduling = data.get("scheduling")
        if scheduling is None:
            return {**data, "scheduling": {"policy": policy}}
        if isinstance(scheduling, dict) and scheduling.get("policy") is None:
            return {**data, "scheduling": {**scheduling, "policy": policy}}
        if isinstance(scheduling, SchedulingConfig) and "policy" not in scheduling.model_fields_set:
            return {**data, "scheduling": scheduling.model_copy(update={"policy": policy})}
        return data

    @model_validator(mode="after")
    def collocated_engines_order_by_arrival_or_priority(self) -> AppConfig:
        if self.collocated.scheduling_policy == "shortest_first" and not self.is_disaggregated:
            raise ValueError("collocated.scheduling_policy 'shortest_first' needs each prompt's size from the "
                             "router's scheduler, which collocated mode does not run: use fcfs or priority")
        return self

    @model_validator(mode="after")
    def scheduling_needs_two_pools(self) -> AppConfig:
        if not self.is_disaggregated and self.scheduling.policy != "always_split":
            raise ValueError(f"scheduling.policy {self.scheduling.policy!r} chooses between prefill and decode "
                             "engines, and mode 'collocated' has one pool: leave it unset (null) or set always_split")
        return self

    @property
    def is_disaggregated(self) -> bool:
        return self.mode == "disaggregated"
