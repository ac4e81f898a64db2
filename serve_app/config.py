"""serve_config.yaml's `args`, validated once at start-up. Frozen: nothing downstream mutates config.

Every error names the bad value and what is allowed, e.g.
`model.dtype: 'fp8' is not one of float32, bfloat16, float16`.

A leaf module: it imports nothing of splitserve's but other config (the `transfer` section is kv_transfer's own,
kv_transfer/config.py), so that every layer may import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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


class EngineRoleConfig(_Frozen):
    """One role (prefill or decode): its replicas, the cores its engines compute on, its KV-cache size."""

    num_replicas: int = Field(1, ge=1)
    # vLLM's VLLM_CPU_OMP_THREADS_BIND per replica ("0", "0-3", "0|1" ...); one entry is shared by all replicas.
    cpu_binding: list[str] = Field(default_factory=lambda: ["auto"])
    kv_cache_gib: int = Field(1, ge=1)  # vLLM on CPU takes whole GiB (VLLM_CPU_KVCACHE_SPACE)
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    # Ray's logical CPUs per replica; the engine's real cores are set by cpu_binding.
    num_cpus: float = Field(0.0, ge=0)
    # Requests one replica works on at once (Serve's max_ongoing_requests); None: max_num_seqs, the engine's batch.
    max_ongoing_requests: int | None = Field(None, ge=1)
    # Overload bound: requests that may wait for this role beyond what its replicas work on. The router answers
    # the next one with 503 and Retry-After instead of queueing it.
    max_queued_requests: int = Field(32, ge=0)

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
        if len(self.cpu_binding) not in (1, self.num_replicas):
            raise ValueError(
                f"cpu_binding has {len(self.cpu_binding)} entries for {self.num_replicas} replicas: "
                "give one entry (shared) or one per replica"
            )
        return self

    def cpu_binding_for(self, replica_rank: int) -> str:
        return self.cpu_binding[replica_rank % len(self.cpu_binding)]

    @property
    def num_ongoing_per_replica(self) -> int:
        return self.max_ongoing_requests or self.max_num_seqs

    @property
    def num_admissible(self) -> int:
        """Requests this role may hold in all, working and waiting, before new ones are refused."""
        return self.num_replicas * self.num_ongoing_per_replica + self.max_queued_requests


class RouterConfig(_Frozen):
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    # Bodies larger than this are refused with 413 before they are parsed.
    max_request_body_bytes: int = Field(4 << 20, ge=1024)
    # Seconds a refused client is told to wait (Retry-After) when a role is at its overload bound.
    retry_after_s: int = Field(2, ge=1)
    # Optional API key: when this environment variable is set in the router's process, /v1 requests need
    # `Authorization: Bearer <key>` (401 otherwise). The key itself never enters the config.
    api_key_env: str = "SPLITSERVE_API_KEY"


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

    @property
    def is_disaggregated(self) -> bool:
        return self.mode == "disaggregated"
