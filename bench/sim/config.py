"""What a simulation runs: the cluster, each machine's limits, the performance model, the policy. Validated once.

A YAML file like serve_config.yaml's shape: `cluster` (mode, machines per pool, each pool's limits), `model` (the
performance model, or `profile:` the CSV bench.profile wrote) and `scheduling`, which is the app's own
`SchedulingConfig`: the simulator refuses what the app refuses, with the same messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.sim.model import PerfModel
from serve_app.config import SchedulingConfig

# The policies that need a prefill pool beside the decode pool.
POOL_POLICIES = ("token_jsq", "mixed_pool", "conditional", "predictive")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MachineConfig(_Frozen):
    """One engine's limits, as vLLM's scheduler has them."""

    max_batch_tokens: int = Field(2048, ge=1)  # vLLM's max_num_batched_tokens
    max_num_seqs: int = Field(16, ge=1)
    kv_capacity_tokens: int = Field(22_000, ge=1)  # its KV cache over the model's KV bytes per token
    long_prefill_token_threshold: int | None = Field(None, ge=1)  # a prompt's largest chunk per iteration
    max_preemptions: int = Field(2, ge=0)  # per request; at the cap it is never chosen to make room again
    # Iterations a handed-over KV's load spans on a busy engine before its request is scheduled: our connectors
    # load asynchronously, as vLLM's do (the load starts in the step after the request reached the engine and is
    # seen done at that step's end), so 1; 0 for a load inside the step that computes the request (the app's
    # default, transfer.is_load_in_step): that step then waits out the hand-over, its streams with it (machine.py).
    kv_load_steps: int = Field(1, ge=0)

    @property
    def num_prefill_chunk_tokens(self) -> int:
        """What it computes of one prompt per iteration beside its streams (as serve_app's role config)."""
        return self.long_prefill_token_threshold or self.max_batch_tokens


class ClusterConfig(_Frozen):
    mode: Literal["disaggregated", "collocated"] = "disaggregated"
    num_prefill: int = Field(1, ge=0)  # disaggregated: the prefill pool
    num_decode: int = Field(1, ge=0)  # disaggregated: the decode pool; collocated: every machine, both phases
    prefill: MachineConfig = MachineConfig()
    decode: MachineConfig = MachineConfig()
    # Machines that share one host, in order (the prefill pool's, then the decode pool's): an iteration that starts
    # while another machine of its host computes takes the model's `shared_host_slowdown` longer. 1: a host each.
    machines_per_host: int = Field(1, ge=1)
    # The core of each machine of a host, in the same order (e.g. [0, 0, 1]: two prefill engines sharing core 0,
    # decode on core 1). Machines on one core take turns on it: while k of them compute, each runs at 1/k of its
    # speed. Empty: a core each.
    host_cores: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def has_machines(self) -> ClusterConfig:
        if self.host_cores and len(self.host_cores) != self.machines_per_host:
            raise ValueError(f"cluster.host_cores {self.host_cores} names {len(self.host_cores)} cores: give one per "
                             f"machine of a host (machines_per_host is {self.machines_per_host}), or none")
        if self.num_decode < 1:
            raise ValueError(f"cluster.num_decode is {self.num_decode}: every cluster needs at least one machine "
                             "that decodes")
        if self.mode == "disaggregated" and self.num_prefill < 1:
            raise ValueError(f"cluster.num_prefill is {self.num_prefill} in disaggregated mode: a split needs a "
                             "prefill machine (or set mode: collocated)")
        if self.mode == "collocated" and self.num_prefill:
            raise ValueError(f"cluster.num_prefill is {self.num_prefill} in collocated mode, where every machine "
                             "runs both phases: give them all as num_decode")
        return self


class SimConfig(_Frozen):
    cluster: ClusterConfig = ClusterConfig()
    model: PerfModel | None = None  # the performance model itself, or
    profile: Path | None = None  # the CSV bench.profile wrote (bench/results/profile/model.csv)
    transfer_backend: str = "nixl"  # whose hand-over line the profile gives
    scheduling: SchedulingConfig = SchedulingConfig()
    seed: int = 0  # Serve's power-of-two choices where a policy leaves the replica to Serve
    keeps_token_gaps: bool = True  # every gap per request (all-gap TBT tails); off for very large runs
    # The client's timeout from a request's arrival: one not done by then is aborted, its engine freed (as the
    # router cancels a request whose client went). None: every request runs to its end.
    request_timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def policy_by_mode(cls, data: object) -> object:
        """As the app: an unset policy is the mode's own (predictive split, always_split collocated)."""
        if isinstance(data, dict) and not isinstance(data.get("scheduling"), SchedulingConfig):
            cluster = data.get("cluster") or {}
            mode = cluster.mode if isinstance(cluster, ClusterConfig) else cluster.get("mode", "disaggregated")
            scheduling = dict(data.get("scheduling") or {})
            if scheduling.get("policy") is None:
                scheduling["policy"] = "predictive" if mode == "disaggregated" else "always_split"
            data = {**data, "scheduling": scheduling}
        return data

    @model_validator(mode="after")
    def is_consistent(self) -> SimConfig:
        if (self.model is None) == (self.profile is None):
            raise ValueError("give the performance model either as `model` or as `profile` (bench.profile's CSV), "
                             "exactly one of them")
        if self.cluster.mode == "collocated" and self.scheduling.policy in POOL_POLICIES:
            raise ValueError(f"scheduling.policy {self.scheduling.policy!r} needs a prefill pool and a decode pool; "
                             "collocated mode has one: leave it unset (null) or set always_split")
        return self

    def perf_model(self) -> PerfModel:
        if self.model is not None:
            return self.model
        assert self.profile is not None
        return PerfModel.from_profile(self.profile, backend=self.transfer_backend)

    @classmethod
    def from_yaml(cls, path: Path) -> SimConfig:
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data.get("profile"), str):
            data["profile"] = str((path.parent / data["profile"]).resolve())
        return cls.model_validate(data)
