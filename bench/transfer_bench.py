"""Transfer microbenchmark: bytes/s of each KV path for KV sizes of 1 to 64 MB, as ratios to a memory copy of the
same size measured in the same run (the ceiling for any CPU-staged path).

Life cycle of one run:
1. Start a 2-CPU Ray instance and warm its object store (unless `--cold-object-store`).
2. For each size, measure memcpy `--memcpy-repeats` times, then every other path `--repeats` times. Every timed
   repeat starts from a flushed cache (`CacheFlusher`): KV that crosses between engines is not cache-resident, and
   this host's last-level cache (260 MiB here) would otherwise hold every size measured.
3. Per path and size: the median and p10-p90 over the repeats, and the ratio of memcpy's median to the path's with
   a 95% bootstrap interval (`bench.bootstrap.ratio_interval`), so a ratio's noise is visible next to it.
4. Write transfer.csv and report.md (command, date, measured commit, then the table) under --out; print the table.
5. Shut Ray down: the actors (and their NIXL agents) end with it.

Paths:
- memcpy: one numpy copy between two preallocated buffers;
- object_store: our transport as the connector uses it. This process plays prefill (open, then one `ray.put`
  per layer, 30 layers, the references handed to the store in one message after the last, and the transfer's
  receipt taken; object_store_one_send: all layers in one object); a Ray actor in another process plays decode
  (reads the parts by the receipt, with no store call: maps them, copies them into its own preallocated blocks,
  then releases). As the app's engines on a host with fewer cores than Ray's 6 copy threads, the sender cuts each
  layer into buffers below Ray's parallel-copy threshold (1 MiB; kv_transfer/object_store/transport.py). Timed as prefill's part (open to receipt) plus decode's (receipt in hand to copy done): the
  receipt's trip to decode is the KV handle's, which every backend's request makes and the NIXL rows do not time
  either; object_store_one_send_handoff times it too (one actor call carrying the receipt), from open to the copy
  being done. object_store_claimed is the fallback where the handle has no receipt (one that missed its
  engine step): decode claims the parts from the store while prefill sends, as before receipts, from open to
  the copy being done. The per-layer row puts back to back, with no compute between layers to hide the per-put
  cost, so it is a floor on what the app's overlap gives. The object store is warm, as in a server that has run
  for a while: its pages were written once by this process and read once by the very receiver that is timed
  (each process maps shared memory on its own first touch, which costs more than the copy);
- nixl (only where NIXL is installed): the app's shape. A Ray actor in another process plays prefill: its NIXL
  agent (UCX) owns 30 registered DRAM layers. Both agents run NIXL's progress thread with the app's delay
  (`transfer.nixl_progress_interval_us`), and prefill's agent makes no NIXL call while decode reads, as an engine
  busy with a forward pass. This process plays decode: it loads prefill's agent metadata and layer addresses (the
  handshake vLLM's NixlConnector does over its side channel), prepares both descriptor lists once (one descriptor
  per 128-token block of K or V of a layer), and per transfer makes and posts one READ of every block straight
  into its own registered layers, then polls until it sees the READ done. Timed from making the READ to seeing it
  done;
- nixl_polled_source: the same with no progress thread and prefill's agent polled back to back (an idle engine
  loop): the best case without the thread; under load a READ waits for prefill's next poll instead;
- nixl_one_process: both agents in this one process, no thread (the reader also polls the source's
  notifications). Not how the app runs; kept because UCX may pick another transport within a process, so the gap
  between the rows shows how much the process boundary costs.
- kernel_read: the nixl row's blocks read into the same layers by the kernel's cross-memory attach
  (process_vm_readv, one iovec per block), the single copy UCX itself makes for a READ between two processes of
  one host (its `cma` transport): the floor under the nixl row, so that the gap between them is NIXL's and UCX's;
- `--block-tokens N ...`: the nixl and kernel_read rows again with descriptors of N-token blocks
  (`nixl_blockN`, `kernel_read_blockN`; the app's blocks are vLLM's CPU default of 128 tokens, one descriptor per
  block of a layer's K or V: 96 KiB for the default model): what a larger block (`model.block_size`) would give.

Cross-node (`--cross-node`): the bench starts a Ray head (127.0.0.1) and a second node on its own loopback address
(127.0.0.2) on this host, each with its own raylet and object store, as two machines would have; the remote side of
each path (decode's receiver for the object store, prefill's agent for NIXL) runs on the second node:
- object_store_cross_node: the KV crosses from this node's object store to the other's through Ray's object
  manager (decode pulls what prefill put);
- nixl_cross_node: decode's READ from an agent on the other node (UCX picks its transport between the two
  processes; on one host it may still be shared memory, which the row cannot tell from a network);
- tcp_cross_node: a plain TCP copy of the same bytes from a socket on 127.0.0.2 into a preallocated buffer here,
  the floor a network transfer between the two nodes' addresses has on this host.

    python -m bench.transfer_bench [--sizes-mb 1 2 4 8 16 32 64] [--repeats 15] [--memcpy-repeats 51]
                                   [--out bench/results/transfer] [--cold-object-store] [--cross-node]
                                   [--block-tokens 512 ...] [--paths nixl kernel_read ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import functools
import importlib.util
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import processes

# Before Ray is imported (Ray reads RAY_AUTH_MODE once, at import): the cross-node cluster's nodes and this driver
# share one token under Ray 2.60's token auth; run alone, the second node and the driver were refused.
processes.use_ray_token_auth()

import ray  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.bootstrap import ratio_interval  # noqa: E402
from bench.result_files import measured_commit  # noqa: E402
from kv_transfer.config import TransferConfig  # noqa: E402

NUM_LAYERS = 30
OBJECT_STORE_BYTES = 1 << 30
WARM_UP_OBJECT_BYTES = 64 << 20
# The default model's KV block of one layer, K or V apart: block tokens x 3 KV heads x 64 dims x 4 bytes (float32).
# vLLM's NixlConnector posts one descriptor per such block; the app's blocks are vLLM's CPU default, 128 tokens.
KV_BYTES_PER_TOKEN_PER_LAYER = 3 * 64 * 4
APP_BLOCK_TOKENS = 128
NIXL_BLOCK_BYTES = APP_BLOCK_TOKENS * KV_BYTES_PER_TOKEN_PER_LAYER
# process_vm_readv takes at most this many iovecs per call (Linux's IOV_MAX).
IOV_MAX = 1024
NIXL_TIMEOUT_S = 60.0
# The app's progress-thread delay: transfer.nixl_progress_interval_us as shipped.
APP_PROGRESS_INTERVAL_US = TransferConfig.model_fields["nixl_progress_interval_us"].default
APP_UCX_LOCK = TransferConfig.model_fields["nixl_ucx_lock"].default
FALLBACK_LAST_LEVEL_CACHE_BYTES = 256 << 20
CACHE_LINE_BYTES = 64
PERCENTILES = (10, 50, 90)

Measure = Callable[[int, int, Callable[[], None]], list[float]]
# Cross-node: the second node's address and the custom resource that places an actor there.
OTHER_NODE_IP = "127.0.0.2"
OTHER_NODE = {"resources": {"bench_other_node": 0.001}}
TCP_CHUNK_BYTES = 4 << 20


class CacheFlusher:
    """Evicts the caches before a timed repeat by reading a buffer twice the size of the last-level cache.
    It reads one byte per cache line of memory written once at start: reads leave clean lines, so the timed copy
    never pays for writing the flush buffer back."""

    def __init__(self, cache_bytes: int | None = None):
        size = 2 * (cache_bytes or last_level_cache_bytes())
        self._lines = np.ones(size, dtype=np.uint8)[::CACHE_LINE_BYTES]  # ones, not zeros: zeros map one shared page

    def __call__(self) -> None:
        self._lines.max()


def last_level_cache_bytes() -> int:
    """The largest cache that CPU 0 reports (Linux sysfs), or 256 MiB where none is reported."""
    sizes = []
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=FALLBACK_LAST_LEVEL_CACHE_BYTES)


def measure_memcpy(nbytes: int, repeats: int, flush: Callable[[], None]) -> list[float]:
    source = np.ones(nbytes, dtype=np.uint8)
    target = np.ones(nbytes, dtype=np.uint8)  # written once: no page faults timed
    seconds = []
    for _ in range(repeats):
        flush()
        started = time.perf_counter()
        np.copyto(target, source)
        seconds.append(time.perf_counter() - started)
    return seconds


@ray.remote(num_cpus=0)
class Receiver:
    """Decode's side of the object-store path, in a process of its own."""

    def __init__(self, source: str, part_shape: tuple[int, ...]):
        from kv_transfer.layout import KVLayout
        from kv_transfer.object_store.transport import ObjectStoreTransport

        self._source = source
        self._transport = ObjectStoreTransport()
        self._layout = KVLayout(num_parts=NUM_LAYERS, part_shape=part_shape, dtype="uint8")
        self._blocks = [np.empty(part_shape, dtype=np.uint8) for _ in range(NUM_LAYERS)]
        for block in self._blocks:
            block.fill(0)  # fault the pages in now, as a running engine's KV cache already is

    def receive(self, key: str, receipt: str | None = None) -> tuple[float, float, float]:
        """(when decode had the receipt in hand, when the parts were mapped, when its copy was done): by the
        receipt, or claimed from the store."""
        started = time.perf_counter()
        parts = self._transport.receive(self._source, key, self._layout, timeout_s=60, receipt=receipt)
        mapped = time.perf_counter()
        for block, segments in zip(self._blocks, parts, strict=True):
            start = 0  # a layer may arrive cut into several segments (transport.py)
            for segment in segments:
                np.copyto(block[start:start + len(segment)], segment)
                start += len(segment)
        done = time.perf_counter()
        self._transport.release(self._source, key)
        return started, mapped, done

    def touch(self, wrapped_ref: list) -> None:
        payload = ray.get(wrapped_ref[0])
        if getattr(self, "_scratch", None) is None or self._scratch.shape != payload.shape:
            self._scratch = np.empty_like(payload)
        np.copyto(self._scratch, payload)


def warm_object_store(remote: dict[str, Any] | None = None, reader: Any = None) -> None:
    """Write and read every page of the object store once, in this process and in `reader`'s (a throwaway one by
    default; on the other node's store too with `remote`), as a server's steady state has: each process maps a page
    on its first touch, and freed objects leave their pages mapped for the next ones."""
    is_throwaway = reader is None
    if is_throwaway:
        reader = Receiver.options(**(remote or {})).remote("none", (1,))
    payload = np.ones(WARM_UP_OBJECT_BYTES, dtype=np.uint8)
    for _ in range(2 * OBJECT_STORE_BYTES // WARM_UP_OBJECT_BYTES):
        ref = ray.put(payload)
        ray.get(reader.touch.remote([ref]))
        del ref
    if is_throwaway:
        ray.kill(reader)


def measure_object_store(nbytes: int, repeats: int, flush: Callable[[], None], is_layer_by_layer: bool = True,
                         remote: dict[str, Any] | None = None, by: str = "receipt", is_warm: bool = True) -> list[float]:
    """`by`: "receipt" (prefill's part plus decode's, the handle's trip not timed), "handoff" (the receipt's trip in
    one actor call timed too) or "claim" (no receipt: decode claims from the store while prefill sends)."""
    from kv_transfer.layout import KVLayout
    from kv_transfer.object_store.store import create_store
    from kv_transfer.object_store.transport import ObjectStoreTransport

    part_shape = (nbytes // NUM_LAYERS,)
    layout = KVLayout(num_parts=NUM_LAYERS, part_shape=part_shape, dtype="uint8")
    name = f"bench-store-{uuid.uuid4().hex[:6]}"
    store = create_store(name=name, capacity_bytes=1 << 31, lease_s=60)
    receiver = Receiver.options(**(remote or {})).remote(name, part_shape)
    if is_warm:  # decode's engine has read from the object store for a while: its mappings are in place
        warm_object_store(remote, reader=receiver)
    transport = ObjectStoreTransport(home_store=name)
    parts = [np.random.default_rng(i).integers(0, 255, part_shape, dtype=np.uint8) for i in range(NUM_LAYERS)]
    seconds = []
    for repeat in range(repeats + 1):
        key = f"bench-{repeat}"
        flush()
        started = time.perf_counter()
        ticket = transport.open(key, layout)
        if by == "claim":
            done = receiver.receive.remote(key)  # decode asks the store while prefill is still sending
        if is_layer_by_layer:  # one send per layer, back to back: no compute to hide the per-call cost
            for index, part in enumerate(parts):
                transport.send(ticket, index, [part])
        else:  # every layer in one send (one store call)
            transport.send(ticket, 0, parts)
        if by == "claim":
            *_, finished = ray.get(done)  # both processes share this host's perf_counter clock
            seconds.append(finished - started)
            continue
        receipt = transport.take_receipt(key)
        sent = time.perf_counter()
        decode_started, _, finished = ray.get(receiver.receive.remote(key, receipt))
        seconds.append(finished - started if by == "handoff" else (sent - started) + (finished - decode_started))
    ray.kill(receiver)
    ray.kill(store)
    return seconds[1:]  # the first transfer pays the actors' first calls


def new_nixl_agent(role: str, progress_interval_us: int | None = None) -> Any:
    """A NIXL agent (UCX) as the app builds one: with `progress_interval_us`, NIXL's progress thread waiting that
    long between passes (the app's `transfer.nixl_progress_interval_us`, set through the connector's own guard,
    with the app's `transfer.nixl_ucx_lock`); None: no thread, so someone must poll the agent for a READ from it to
    move."""
    from nixl._api import nixl_agent, nixl_agent_config

    name = f"bench-{role}-{uuid.uuid4().hex[:8]}"
    if progress_interval_us is None:
        return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    from kv_transfer.nixl.connector import _agent_progress

    with _agent_progress(progress_interval_us, APP_UCX_LOCK):
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

        return nixl_agent(name, base_worker.nixl_agent_config(backends=["UCX"]))


def layer_pattern(layer: int, layer_bytes: int) -> np.ndarray:
    """The bytes prefill's layer `layer` holds: distinct per layer, so a READ of the wrong block is caught."""
    return np.random.default_rng(layer).integers(0, 255, layer_bytes, dtype=np.uint8)


def block_descriptors(layer_addresses: Sequence[int], layer_bytes: int,
                      block_bytes: int = NIXL_BLOCK_BYTES) -> np.ndarray:
    """NIXL's (address, length, device) rows: every layer cut into `block_bytes` blocks (the last one shorter)."""
    offsets = np.arange(0, layer_bytes, block_bytes, dtype=np.uint64)
    lengths = np.minimum(block_bytes, layer_bytes - offsets)
    rows = [np.stack([address + offsets, lengths, np.zeros_like(offsets)], axis=1) for address in layer_addresses]
    return np.concatenate(rows).astype(np.uint64)


@dataclass(frozen=True)
class NixlHandshake:
    """What prefill hands decode before any READ: its agent's metadata (taken after registering, so it carries the
    memory keys) and where its layers are. vLLM's NixlAgentMetadata, reduced to what this READ needs."""

    agent_metadata: bytes
    layer_addresses: list[int]
    layer_bytes: int
    pid: int  # for the kernel's own cross-process read of the same layers (`kernel_read`)


class NixlSource:
    """Prefill's side: 30 registered DRAM layers holding `layer_pattern` bytes, and the notifications decode's READs
    send when done (what lets prefill free its blocks in the app). With a progress thread it makes no NIXL call
    while decode reads, as an engine busy with a forward pass; without one it must poll."""

    def __init__(self, layer_bytes: int, progress_interval_us: int | None = None):
        self._agent = new_nixl_agent("prefill", progress_interval_us)
        self._layers = [layer_pattern(layer, layer_bytes) for layer in range(NUM_LAYERS)]
        self._registration = self._agent.register_memory(
            [(layer.ctypes.data, layer.nbytes, 0, "") for layer in self._layers], "DRAM")
        self._layer_bytes = layer_bytes
        self._is_polled = progress_interval_us is None

    def handshake(self) -> NixlHandshake:
        return NixlHandshake(self._agent.get_agent_metadata(), [layer.ctypes.data for layer in self._layers],
                             self._layer_bytes, os.getpid())

    def poll_notifications(self) -> int:
        return sum(len(messages) for messages in self._agent.get_new_notifs().values())

    def serve_reads(self, count: int, timeout_s: float) -> int:
        """Until `count` READs have reported done (or the deadline): polls notifications back to back when the agent
        has no progress thread (prefill's engine loop between steps, nothing computed: the best case), or checks
        them every 50 ms when it has one (the thread moves the READs; the check only counts them). Returns the
        number seen."""
        seen, deadline = 0, time.monotonic() + timeout_s
        while seen < count and time.monotonic() < deadline:
            seen += self.poll_notifications()
            if not self._is_polled:
                time.sleep(0.05)
        return seen

    def close(self) -> None:
        self._agent.deregister_memory(self._registration)


NixlSourceActor = ray.remote(num_cpus=0)(NixlSource)


class NixlReader:
    """Decode's side: its own registered layers, prefill's agent loaded from the handshake, and both descriptor
    lists prepared once (vLLM does this at the handshake too), so a transfer only makes and posts the READ."""

    def __init__(self, handshake: NixlHandshake, progress_interval_us: int | None = None,
                 block_bytes: int = NIXL_BLOCK_BYTES):
        self._agent = new_nixl_agent("decode", progress_interval_us)
        self._layer_bytes = handshake.layer_bytes
        self.layers = [np.zeros(handshake.layer_bytes, dtype=np.uint8) for _ in range(NUM_LAYERS)]
        addresses = [layer.ctypes.data for layer in self.layers]
        self._registration = self._agent.register_memory(
            [(address, handshake.layer_bytes, 0, "") for address in addresses], "DRAM")
        self._remote = self._agent.add_remote_agent(handshake.agent_metadata)
        self._local_rows = block_descriptors(addresses, handshake.layer_bytes, block_bytes)
        self._remote_rows = block_descriptors(handshake.layer_addresses, handshake.layer_bytes, block_bytes)
        self._local_side = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._local_rows, "DRAM")
        self._remote_side = self._agent.prep_xfer_dlist(self._remote, self._remote_rows, "DRAM")
        self._indices = np.arange(len(self._local_rows), dtype=np.int32)
        self._source_pid = handshake.pid
        self._kernel_read: KernelRead | None = None

    def read(self, notification: bytes, poll_source: Callable[[], Any] | None = None) -> float:
        """READ every block of prefill's layers into ours and poll until done; returns the seconds from making the
        READ to seeing it done. `poll_source` progresses a source agent in this same process (it has no thread)."""
        started = time.perf_counter()
        handle = self._agent.make_prepped_xfer("READ", self._local_side, self._indices, self._remote_side,
                                               self._indices, notif_msg=notification)
        try:
            state, deadline = self._agent.transfer(handle), time.monotonic() + NIXL_TIMEOUT_S
            while state == "PROC" and time.monotonic() < deadline:
                state = self._agent.check_xfer_state(handle)
                if poll_source is not None:
                    poll_source()
            elapsed = time.perf_counter() - started
        finally:
            self._agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL READ ended in state {state}")
        return elapsed

    def read_by_kernel(self) -> float:
        """The same blocks into the same layers by the kernel's cross-memory attach (process_vm_readv, one iovec per
        block), which UCX uses between two processes of one host: the floor under a NIXL READ here. Returns its
        seconds."""
        if self._kernel_read is None:
            self._kernel_read = KernelRead.prepare(self._source_pid, self._local_rows, self._remote_rows)
        started = time.perf_counter()
        self._kernel_read()
        return time.perf_counter() - started

    def check_layers(self) -> None:
        for layer, received in enumerate(self.layers):
            if not np.array_equal(received, layer_pattern(layer, self._layer_bytes)):
                raise RuntimeError(f"NIXL READ completed but layer {layer}'s bytes differ")

    def close(self) -> None:
        self._local_side.release()
        self._remote_side.release()
        self._agent.remove_remote_agent(self._remote)
        self._agent.deregister_memory(self._registration)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class KernelRead:
    """One process_vm_readv call per IOV_MAX rows of (address, length) descriptors, its iovec arrays built once
    (as NIXL prepares its descriptor lists once), so that a timed read is the kernel's copy alone."""

    pid: int
    calls: list[tuple[Any, Any, int]]  # (local iovecs, remote iovecs, the bytes they cover)

    @classmethod
    def prepare(cls, pid: int, local_rows: np.ndarray, remote_rows: np.ndarray) -> KernelRead:
        def iovecs(rows: np.ndarray) -> Any:
            return (_IoVec * len(rows))(*[_IoVec(int(address), int(length)) for address, length, _ in rows])

        return cls(pid, [(iovecs(local_rows[start:start + IOV_MAX]), iovecs(remote_rows[start:start + IOV_MAX]),
                          int(local_rows[start:start + IOV_MAX, 1].sum()))
                         for start in range(0, len(local_rows), IOV_MAX)])

    def __call__(self) -> None:
        for local_iov, remote_iov, expected in self.calls:
            moved = _LIBC.process_vm_readv(self.pid, local_iov, len(local_iov), remote_iov, len(remote_iov), 0)
            if moved != expected:
                raise OSError(ctypes.get_errno(), f"process_vm_readv moved {moved} of {expected} bytes")


def measure_nixl(nbytes: int, repeats: int, flush: Callable[[], None],
                 progress_interval_us: int | None = APP_PROGRESS_INTERVAL_US,
                 remote: dict[str, Any] | None = None, block_bytes: int = NIXL_BLOCK_BYTES,
                 by: str = "nixl") -> list[float]:
    """Prefill's agent in a Ray actor (another process, on another node with `remote`), decode's here: the app's
    shape. Both agents get the app's progress thread unless `progress_interval_us` is None (then prefill's agent is
    polled back to back). `block_bytes`: one descriptor per block of that many bytes of a layer. `by="kernel"`:
    the same blocks read by process_vm_readv instead of NIXL (the source sees no notification then)."""
    source = NixlSourceActor.options(**(remote or {})).remote(nbytes // NUM_LAYERS, progress_interval_us)
    try:
        reader = NixlReader(ray.get(source.handshake.remote()), progress_interval_us, block_bytes)
        is_nixl = by == "nixl"
        try:
            served = source.serve_reads.remote(repeats + 1, NIXL_TIMEOUT_S * (repeats + 1)) if is_nixl else None
            seconds = []
            for repeat in range(repeats + 1):
                flush()
                seconds.append(reader.read(f"bench-{repeat}".encode()) if is_nixl else reader.read_by_kernel())
            if served is not None and (seen := ray.get(served)) != repeats + 1:
                raise RuntimeError(f"prefill saw {seen} of {repeats + 1} READs' notifications")
            reader.check_layers()
        finally:
            reader.close()
        ray.get(source.close.remote())
    finally:
        ray.kill(source)
    return seconds[1:]  # the first READ pays UCX's connection set-up


def measure_nixl_one_process(nbytes: int, repeats: int, flush: Callable[[], None]) -> list[float]:
    source = NixlSource(nbytes // NUM_LAYERS)
    reader = NixlReader(source.handshake())
    try:
        seconds = []
        for repeat in range(repeats + 1):
            flush()
            seconds.append(reader.read(f"bench-{repeat}".encode(), poll_source=source.poll_notifications))
        reader.check_layers()
    finally:
        reader.close()
        source.close()
    return seconds[1:]


@ray.remote(num_cpus=0)
class TcpSender:
    """The other node's end of a plain TCP copy: listens on its own address and sends `nbytes` per request."""

    def __init__(self, host: str, nbytes: int):
        self._payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        self._server = socket.create_server((host, 0))
        self.address = self._server.getsockname()

    def where(self) -> tuple[str, int]:
        return self.address

    def payload(self) -> np.ndarray:
        return self._payload

    def serve(self, count: int) -> int:
        connection, _ = self._server.accept()
        with connection:
            for _ in range(count):
                if not connection.recv(1):
                    break
                connection.sendall(memoryview(self._payload))
        return count


def measure_tcp(nbytes: int, repeats: int, flush: Callable[[], None], remote: dict[str, Any]) -> list[float]:
    """Timed from asking to the last byte in a preallocated buffer here: what a copy of the KV's bytes between the
    two nodes' addresses costs without any KV machinery."""
    sender = TcpSender.options(**remote).remote(OTHER_NODE_IP, nbytes)
    # Its address first: the actor runs one call at a time, and `serve` holds it in `accept` until we connect.
    address = ray.get(sender.where.remote())
    served = sender.serve.remote(repeats + 1)
    target, seconds = np.empty(nbytes, dtype=np.uint8), []
    with socket.create_connection(address) as connection:
        view = memoryview(target)
        for _ in range(repeats + 1):
            flush()
            started = time.perf_counter()
            connection.sendall(b"x")
            received = 0
            while received < nbytes:
                received += connection.recv_into(view[received:], min(TCP_CHUNK_BYTES, nbytes - received))
            seconds.append(time.perf_counter() - started)
    ray.get(served)
    if not np.array_equal(target, ray.get(sender.payload.remote())):
        raise RuntimeError("the TCP copy's bytes differ from the sender's")
    ray.kill(sender)
    return seconds[1:]  # the first pays the connection's start


def cross_node_paths(is_warm: bool = True) -> dict[str, Measure]:
    """The paths whose remote side runs on the second node."""
    measures: dict[str, Measure] = {
        "object_store_cross_node": functools.partial(measure_object_store, remote=OTHER_NODE, is_warm=is_warm),
        "tcp_cross_node": functools.partial(measure_tcp, remote=OTHER_NODE),
    }
    if importlib.util.find_spec("nixl") is not None:
        measures["nixl_cross_node"] = functools.partial(measure_nixl, remote=OTHER_NODE)
    return measures


@contextlib.contextmanager
def two_node_cluster() -> Iterator[str]:
    """A Ray head and a second node on this host, each on its own loopback address with its own raylet and object
    store; yields the head's address and stops both, by process id, with everything they started."""
    workdir = Path(tempfile.mkdtemp(prefix="tb-"))  # short: Ray's socket paths must fit 107 bytes
    port = processes.free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}"]
    head = processes.start([str(processes.VENV_BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                            "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                            f"--temp-dir={workdir / 'head'}", *common], workdir / "head.log")
    other = None
    try:
        processes.wait_until(lambda: (workdir / "head" / "session_latest").exists(), timeout_s=120,
                             what="ray head", proc=head, log_path=workdir / "head.log")
        other = processes.start([str(processes.VENV_BIN / "ray"), "start", f"--address={address}",
                                 f"--node-ip-address={OTHER_NODE_IP}", "--num-cpus=1",
                                 '--resources={"bench_other_node": 1}', f"--temp-dir={workdir / 'other'}", *common],
                                workdir / "other.log")
        processes.wait_until(lambda: b"Ray runtime started" in (workdir / "other.log").read_bytes(),
                             timeout_s=120, what="second ray node", proc=other, log_path=workdir / "other.log")
        yield address
    finally:
        for proc in (other, head):
            if proc is not None:
                processes.stop(proc, first_signal=signal.SIGTERM, grace_s=30)


def paths(is_warm: bool = True, block_tokens: Sequence[int] = ()) -> dict[str, Measure]:
    """The KV paths to measure after memcpy; the NIXL ones only where NIXL is installed (it is optional).
    `block_tokens`: blocks other than the app's for which the nixl and kernel_read rows are measured too."""
    object_store = functools.partial(measure_object_store, is_warm=is_warm)
    measures: dict[str, Measure] = {
        "object_store": object_store,
        "object_store_one_send": functools.partial(object_store, is_layer_by_layer=False),
        "object_store_one_send_handoff": functools.partial(object_store, is_layer_by_layer=False, by="handoff"),
        "object_store_claimed": functools.partial(object_store, is_layer_by_layer=False, by="claim"),
    }
    if importlib.util.find_spec("nixl") is not None:
        measures |= {"nixl": measure_nixl,
                     "nixl_polled_source": lambda nbytes, repeats, flush: measure_nixl(nbytes, repeats, flush, None),
                     "nixl_one_process": measure_nixl_one_process,
                     "kernel_read": functools.partial(measure_nixl, by="kernel")}
        for tokens in block_tokens:
            block_bytes = tokens * KV_BYTES_PER_TOKEN_PER_LAYER
            measures |= {f"nixl_block{tokens}": functools.partial(measure_nixl, block_bytes=block_bytes),
                         f"kernel_read_block{tokens}": functools.partial(measure_nixl, block_bytes=block_bytes,
                                                                         by="kernel")}
    return measures


def summarize(size_mb: int, path: str, nbytes: int, seconds: list[float], memcpy_seconds: list[float]) -> dict:
    """One CSV row: the path's median and p10-p90 over repeats, and memcpy's median over the path's with its 95%
    bootstrap interval (1 for memcpy itself)."""
    p10, median, p90 = np.percentile(seconds, PERCENTILES)
    ratio = ratio_interval(memcpy_seconds, seconds)
    return {"size_mb": size_mb, "path": path, "repeats": len(seconds), "median_ms": round(median * 1e3, 3),
            "p10_ms": round(p10 * 1e3, 3), "p90_ms": round(p90 * 1e3, 3), "gb_per_s": round(nbytes / median / 1e9, 3),
            "ratio_to_memcpy": round(ratio.ratio, 3), "ratio_low": round(ratio.low, 3),
            "ratio_high": round(ratio.high, 3)}


def markdown_table(rows: list[dict]) -> list[str]:
    table = ["| size | path | repeats | median ms (p10-p90) | GB/s | ratio to memcpy (95% interval) |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['size_mb']} MB | {r['path']} | {r['repeats']} | {r['median_ms']} ({r['p10_ms']}-{r['p90_ms']}) "
              f"| {r['gb_per_s']} | {r['ratio_to_memcpy']} ({r['ratio_low']}-{r['ratio_high']}) |" for r in rows]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=15, help="timed transfers per KV path and size")
    parser.add_argument("--memcpy-repeats", type=int, default=51, help="timed copies per size (the denominator)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer")
    parser.add_argument("--cold-object-store", action="store_true", help="do not warm the object store first")
    parser.add_argument("--cross-node", action="store_true",
                        help="also the cross-node rows, on a second Ray node of this host (127.0.0.2)")
    parser.add_argument("--block-tokens", type=int, nargs="*", default=[],
                        help=f"also the nixl and kernel_read rows with KV blocks of these many tokens (the app's: "
                             f"{APP_BLOCK_TOKENS}): one descriptor per block of a layer's K or V")
    parser.add_argument("--paths", nargs="*", default=None,
                        help="only these rows after memcpy (default: every path this host has)")
    args = parser.parse_args()
    # A stop by SIGTERM (a timeout, a test's clean-up) unwinds like Ctrl-C, so that the cross-node cluster's
    # raylets, which live in sessions of their own, are stopped by id on the way out instead of outliving us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    flush, measures = CacheFlusher(), paths(is_warm=not args.cold_object_store, block_tokens=args.block_tokens)
    if args.cross_node:
        measures |= cross_node_paths(is_warm=not args.cold_object_store)
    if args.paths is not None:
        if unknown := set(args.paths) - set(measures):
            parser.error(f"--paths: no such path here: {sorted(unknown)} (known: {sorted(measures)})")
        measures = {path: measure for path, measure in measures.items() if path in args.paths}
    namespace = f"transfer-bench-{uuid.uuid4().hex[:6]}"
    with contextlib.ExitStack() as stack:
        if args.cross_node:
            ray.init(address=stack.enter_context(two_node_cluster()), logging_level="ERROR", log_to_driver=False,
                     namespace=namespace)
        else:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     object_store_memory=OBJECT_STORE_BYTES, namespace=namespace)
        stack.callback(ray.shutdown)
        rows = _measure(args, measures, flush)
    _write(args, rows)


def _measure(args: argparse.Namespace, measures: dict[str, Measure], flush: Callable[[], None]) -> list[dict]:
    if not args.cold_object_store and any(path.startswith("object_store") for path in measures):
        warm_object_store()
        if args.cross_node:
            warm_object_store(OTHER_NODE)
    rows = []
    with tqdm(total=len(args.sizes_mb) * (len(measures) + 1), desc="transfer bench", unit="cell") as progress:
        for size_mb in args.sizes_mb:
            nbytes = (size_mb << 20) // NUM_LAYERS * NUM_LAYERS
            progress.set_postfix_str(f"{size_mb} MB memcpy")
            memcpy_seconds = measure_memcpy(nbytes, args.memcpy_repeats, flush)
            rows.append(summarize(size_mb, "memcpy", nbytes, memcpy_seconds, memcpy_seconds))
            progress.update()
            for path, measure in measures.items():
                progress.set_postfix_str(f"{size_mb} MB {path}")
                try:
                    seconds = measure(nbytes, args.repeats, flush)
                except OSError as error:
                    if not path.startswith("kernel_read"):
                        raise
                    # A host that forbids reading another process's memory (seccomp, Yama's ptrace scope) has no
                    # kernel row; UCX then cannot use it either, and the nixl rows show what it used instead.
                    tqdm.write(f"{path} skipped at {size_mb} MB: {error}")
                else:
                    rows.append(summarize(size_mb, path, nbytes, seconds, memcpy_seconds))
                progress.update()
    return rows


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "transfer.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows)
    command = " ".join(["python -m bench.transfer_bench", *sys.argv[1:]])
    warmth = "cold" if args.cold_object_store else "warmed first"
    header = ["# KV transfer paths", "",
              f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, commit {measured_commit()}, on this host: "
              f"each KV path's median and p10-p90 over its repeats, each repeat from a flushed cache; its ratio to "
              f"memcpy is memcpy's median over the path's at the same size in the same run, with a 95% bootstrap "
              f"interval (object store {warmth}; nixl: prefill's agent in another process, both with the app's "
              f"progress thread ({APP_PROGRESS_INTERVAL_US} us), prefill's never polled; nixl_polled_source: no "
              f"thread, prefill's agent polled back to back; nixl_one_process: both agents in this one process; "
              f"kernel_read: nixl's blocks read by process_vm_readv, the kernel's copy UCX uses between two "
              f"processes of one host; *_block<N>: descriptors of N-token blocks, the app's being "
              f"{APP_BLOCK_TOKENS}"
              + ("; *_cross_node: the remote side on a second Ray node of this host at "
                 f"{OTHER_NODE_IP}, tcp_cross_node a plain TCP copy from it" if args.cross_node else "")
              + "). Every row is in [transfer.csv](transfer.csv).", ""]
    (args.out / "report.md").write_text("\n".join(header + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
