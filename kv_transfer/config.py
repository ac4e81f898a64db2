"""How KV moves from prefill to decode: the user's `transfer` settings and what each connector is given.

A leaf module: it imports nothing of splitserve's, so that anything (serve_app's config, the builder, the
connectors inside vLLM's engine process) may import it.

1. `TransferConfig` is serve_config.yaml's `transfer` section, validated once at start-up. Its defaults are the
   only defaults: everything below is derived from it.
2. `ObjectStoreExtraConfig` / `NixlExtraConfig` are the `kv_connector_extra_config` each connector reads back
   inside vLLM's engine process. `kv_transfer/backend.py` builds them from a `TransferConfig` (the one place
   that builds a `kv_transfer_config`); every field is required, so no default is repeated here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# A concrete backend: what `auto` resolves to, what a KV handle names.
Backend = Literal["nixl", "object_store"]


class TransferConfig(BaseModel):
    """`object_store`: our own connector (kv_transfer/object_store/) through Ray's object store and a KV store actor.
    `nixl`: vLLM's NixlConnector over UCX (DRAM here, RDMA/GPU-direct where available; kv_transfer/nixl/).
    `auto`: `nixl` if NIXL imports and a start-up probe moves bytes through it, else `object_store`; chosen once
    by build_app, so every replica uses the same backend.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["auto", "nixl", "object_store"] = "auto"
    # Seconds a finished prefill's KV waits for decode before it is dropped (renewed while decode reads it).
    kv_lease_s: int = Field(30, ge=1)
    # object_store: each prefill replica's KV-store memory bound; a transfer that would exceed it is refused and
    # decode recomputes that prompt.
    store_capacity_gib: float = Field(2.0, gt=0)
    # How long decode waits for a prompt's KV before recomputing it (NIXL: an in-step READ).
    load_timeout_s: float = Field(60.0, gt=0)
    # object_store: send each layer's KV while later layers still compute (Splitwise's overlap). Off, the KV is
    # handed over after the forward pass, as vLLM's disaggregation connectors do; for comparison.
    is_layer_by_layer: bool = True
    # Load a split's KV inside the engine step that computes the request's next token (vLLM's synchronous load),
    # instead of in the background with the request scheduled a step later: under load that later step is a whole
    # decode step of TTFT. The step's other streams wait for the copy (~15-30 ms for a 1,000-token prompt here).
    # object_store: a handle without a receipt always loads in the background, since its parts may still be on
    # their way. nixl: a split from a prefill engine decode has no connection to yet loads in the background,
    # which makes the connection without holding up the step. On by default for both, as measured on a 2-core host
    # (docs/benchmarks.md); false is the background load of vLLM's own connectors.
    is_load_in_step: bool = True
    # nixl: microseconds NIXL's progress thread waits between passes (docs/kv-transfer.md). Without the thread a
    # READ moves only when prefill's engine loop polls, between steps: under load each hand-over waits out a whole
    # forward pass (seconds on a CPU). 5,000 µs: ~1% of a core per idle agent here, READs as fast as at 200 µs.
    # 0 is NIXL's own busy poll (a core per agent); null: no thread, transfers progress from the engine loops alone.
    nixl_progress_interval_us: int | None = Field(5000, ge=0)
    # nixl: how a thread waits for UCX's worker while another holds it (UCX_USE_MT_MUTEX). With the progress thread,
    # two threads of an engine share that worker, and each engine computes on the cores of its `cpu_binding`. UCX's
    # default, `spin`, lets the progress thread spin out its time slice on decode's one core while the model thread
    # that holds the worker waits, mid-READ, for the core: an in-step READ took 2-4x the kernel's copy
    # (bench/results/nixl_mt_mutex). `mutex` makes the waiter sleep. A UCX_USE_MT_MUTEX already in the engines'
    # environment is left as the user set it.
    nixl_ucx_lock: Literal["mutex", "spin"] = "mutex"
    # nixl: where NIXL reads KV from. `auto`: the engine's own KV cache (GPU-direct on CUDA, DRAM on CPU). `cpu` on a
    # GPU host stages KV through host memory, for networks or GPUs that cannot register device memory.
    nixl_buffer_device: Literal["auto", "cuda", "cpu"] = "auto"
    # nixl: vLLM pins the NIXL worker's model thread to the last core on CPU (docs/kv-transfer.md); keep our binding
    # instead.
    keep_engine_affinity: bool = True
    # nixl: where each engine's side channel listens (decode asks prefill there for its NIXL metadata; the address
    # travels in the signed KV handle). `auto`: the node's address when the Ray cluster has more than one node,
    # else loopback; `loopback`: 127.0.0.1 (one node only); `node`: the node's address (a cluster that grows later).
    side_channel_host: Literal["auto", "loopback", "node"] = "auto"
    # KV handles are signed by prefill and verified by decode (kv_transfer/handle_signing.py). The key comes from
    # this environment variable where the app is built, if set (one key across redeploys and apps), else it is
    # made afresh for each deploy. The key itself never enters the config.
    handle_key_env: str = "SPLITSERVE_KV_HANDLE_KEY"

    @property
    def store_capacity_bytes(self) -> int:
        return int(self.store_capacity_gib * (1 << 30))


class ObjectStoreExtraConfig(BaseModel):
    """What our object-store connector reads from `kv_connector_extra_config`, in vLLM's engine process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The engine process is not a Ray worker: the connector joins the app's cluster with these.
    ray_address: str
    ray_namespace: str
    # The KV store prefill sends through (its replica created it); None on decode, which finds stores by the
    # names that travel in KV handles.
    store_name: str | None
    load_timeout_s: float
    is_layer_by_layer: bool
    is_load_in_step: bool


class NixlExtraConfig(BaseModel):
    """What our NIXL connector reads from `kv_connector_extra_config`; vLLM's NixlConnector reads the same dict."""

    # vLLM's NixlConnector may add keys of its own to the dict it is given.
    model_config = ConfigDict(frozen=True, extra="ignore")

    progress_interval_us: int | None  # None: no progress thread
    ucx_lock: Literal["mutex", "spin"]  # how a thread waits for the UCX worker another thread holds
    keep_engine_affinity: bool
    # vLLM's own key: prefill frees a finished request's blocks after this many seconds unless decode's reads
    # renew the lease.
    kv_lease_duration: int
    is_load_in_step: bool
    load_timeout_s: float  # how long decode's step waits for an in-step READ before recomputing it

    @classmethod
    def from_transfer(cls, transfer: TransferConfig) -> NixlExtraConfig:
        return cls(progress_interval_us=transfer.nixl_progress_interval_us, ucx_lock=transfer.nixl_ucx_lock,
                   keep_engine_affinity=transfer.keep_engine_affinity, kv_lease_duration=transfer.kv_lease_s,
                   is_load_in_step=transfer.is_load_in_step, load_timeout_s=transfer.load_timeout_s)
