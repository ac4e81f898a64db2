"""The connector's worker half: moves KV bytes between vLLM's paged cache and a `KVTransport`.

It runs in vLLM's worker process and is given its transport as a factory, called on first use: the object store's
(connector.py) joins the Ray cluster from that process; tests give it an in-process one.

Prefill (KV out):
1. `save_kv_layer`, called right after each attention layer wrote its KV: queue that layer's prompt blocks for
   the sender thread, as views of a CPU cache (runs of consecutive blocks), not copies, or as pinned host copies
   of a CUDA cache made on a side stream (host_staging.py);
2. the sender thread announces the transfer and puts the layers into the object store while later layers still
   compute; layers that are ready together go as one object. `ray.put` is the only copy on this side, and the
   transport hands all references to the store in one message after the last layer, and keeps the transfer's
   receipt (receipt.py) for `take_receipts`, which vLLM carries to the scheduler half with the step's output;
3. `wait_for_save`, at the end of the step, waits until this step's transfers are wholly in the store (the last
   layer's put, as the others overlapped the compute): prefill's answer never leaves before its KV, and carries
   its receipt. Without layer-by-layer overlap (`is_layer_by_layer: false`), all layers are queued here and sent
   before the step ends, as a connector that hands over KV only after prefill would;
4. once a request's last layer is in the store, `get_finished` reports it as sent, and vLLM frees its blocks.
Decode (KV in):
1. `start_load_kv`, before the step's forward pass: an in-step load (its handle's receipt says every part is in the
   store) is received by its receipt and written into this engine's cache right here, since this very step computes
   its request; any other goes to a loader thread, which receives it (by its receipt, or from the store, waiting for
   parts still in flight) and writes its blocks while steps go on. A third thread releases each transfer in the
   store afterwards;
2. `get_finished` reports background loads done to the scheduler; a failed load of either kind reports its blocks
   through `get_block_ids_with_load_errors` at the end of the step, and vLLM recomputes them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer import stats
from kv_transfer.errors import KVTransferError
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.host_staging import HostStaging, Staged
from kv_transfer.object_store.metadata import LoadRequest, SaveRequest, SplitserveConnectorMetadata
from kv_transfer.transport import KVTicket, KVTransport, TransportFactory
from kv_transfer.wire import block_runs

logger = logging.getLogger("splitserve.kv_transfer")

SAVE_TIMEOUT_S = 30.0


@dataclass
class _Send:
    save: SaveRequest
    first_index: int
    staged: list[Staged]  # one per layer, from the first: its blocks on the host (host_staging.py)
    sent: threading.Event | None = None  # set once the last layer is in the store (first layer only)

    @property
    def parts(self) -> list[list[np.ndarray]]:
        return [layer.arrays for layer in self.staged]


class WorkerSide:
    def __init__(self, transport_factory: TransportFactory, num_blocks: int, load_timeout_s: float,
                 is_layer_by_layer: bool = True):
        self._transport_factory = transport_factory
        self._transport: KVTransport | None = None
        self._num_blocks = num_blocks
        self._load_timeout_s = load_timeout_s
        self._is_layer_by_layer = is_layer_by_layer
        self._layers: list[torch.Tensor] = []
        self._layer_index: dict[str, int] = {}
        self._block_dim = 0
        self._lock = threading.Lock()
        self._finished_sends: set[str] = set()
        self._finished_loads: set[str] = set()
        self._failed_block_ids: set[int] = set()
        self._stats = stats.empty_connector_stats()
        self._sends: queue.SimpleQueue[_Send] = queue.SimpleQueue()
        self._sent: dict[str, threading.Event] = {}
        self._receipts: dict[str, str] = {}  # transfer key -> receipt, until the step's end takes them
        self._loads: queue.SimpleQueue[LoadRequest] = queue.SimpleQueue()
        self._releases: queue.SimpleQueue[LoadRequest] = queue.SimpleQueue()
        for loop, name in ((self._send_loop, "send"), (self._load_loop, "load"), (self._release_loop, "release")):
            threading.Thread(target=loop, name=f"splitserve-kv-{name}", daemon=True).start()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = list(kv_caches.values())
        self._layer_index = {name: index for index, name in enumerate(kv_caches)}
        # The block dimension is the one sized num_blocks: 0 on the CPU backend, 1 for (2, blocks, ...) layouts.
        self._block_dim = list(self._layers[0].shape).index(self._num_blocks)
        self._staging = HostStaging(self._layers[0].device, self._block_dim)

    def layout(self, num_blocks: int) -> KVLayout:
        shape = list(self._layers[0].shape)
        shape[self._block_dim] = num_blocks
        return KVLayout(num_parts=len(self._layers), part_shape=tuple(shape), block_dim=self._block_dim,
                        dtype=str(self._layers[0].dtype).removeprefix("torch."))

    def transport(self) -> KVTransport:
        if self._transport is None:
            self._transport = self._transport_factory()
        return self._transport

    # --- prefill: KV out ------------------------------------------------------------------------------------

    def save_kv_layer(self, metadata: SplitserveConnectorMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not metadata.saves or not self._is_layer_by_layer:
            return
        index = self._layer_index[layer_name]
        for save in metadata.saves:
            self._queue(save, index, [kv_layer])

    def _queue(self, save: SaveRequest, first_index: int, layers: list[torch.Tensor]) -> None:
        sent = None
        if first_index == 0:
            sent = self._sent[save.transfer_key] = threading.Event()
        # CPU: views (the blocks stay allocated until this request is reported sent, so ray.put copies once);
        # CUDA: pinned host copies made on a side stream while later layers compute.
        staged = [self._staging.stage_out(layer, save.block_ids) for layer in layers]
        self._sends.put(_Send(save, first_index, staged, sent))

    def _send_loop(self) -> None:
        tickets: dict[str, KVTicket] = {}
        sent_events: dict[str, threading.Event] = {}
        while True:
            batch = [self._sends.get()]
            while True:  # whatever else is ready goes along: fewer objects and store calls
                try:
                    batch.append(self._sends.get_nowait())
                except queue.Empty:
                    break
            for run in self._runs(batch):
                first, last = run[0], run[-1]
                if first.sent is not None:
                    sent_events[first.save.transfer_key] = first.sent
                for item in run:
                    for layer in item.staged:
                        layer.wait()  # a device-to-host copy still on its way (CUDA only)
                self._send(first, [part for item in run for part in item.parts], tickets)
                for item in run:  # the store holds its own copy now: pinned buffers go back to the pool
                    for layer in item.staged:
                        layer.release()
                if last.first_index + len(last.parts) == len(self._layers):
                    key = last.save.transfer_key
                    receipt = self.transport().take_receipt(key) if tickets.pop(key, None) is not None else None
                    with self._lock:
                        if receipt is not None:
                            self._receipts[key] = receipt
                        self._finished_sends.add(last.save.request_id)
                    event = sent_events.pop(key, None)
                    if event is not None:
                        event.set()

    @staticmethod
    def _runs(batch: list[_Send]) -> list[list[_Send]]:
        """The batch cut into runs of consecutive layers of one transfer; each run becomes one send."""
        runs: list[list[_Send]] = []
        latest: dict[str, list[_Send]] = {}
        for item in batch:
            run = latest.get(item.save.transfer_key)
            if run is not None and run[-1].first_index + len(run[-1].parts) == item.first_index:
                run.append(item)
            else:
                run = latest[item.save.transfer_key] = [item]
                runs.append(run)
        return runs

    def _send(self, first: _Send, parts: list[list[np.ndarray]], tickets: dict[str, KVTicket]) -> None:
        save = first.save
        try:
            if first.first_index == 0:
                tickets[save.transfer_key] = self.transport().open(save.transfer_key, self.layout(len(save.block_ids)))
            ticket = tickets.get(save.transfer_key)
            if ticket is not None:  # else opening failed (store full, store gone): decode will recompute
                self.transport().send(ticket, first.first_index, parts)
        except Exception as exc:  # never let a transfer take the engine down
            tickets.pop(save.transfer_key, None)
            logger.warning("KV of %s not sent (decode will recompute): %s", save.request_id, exc)

    def wait_for_save(self, metadata: SplitserveConnectorMetadata, timeout_s: float = SAVE_TIMEOUT_S) -> None:
        started = time.perf_counter()
        for save in metadata.saves:
            if not self._is_layer_by_layer:
                self._queue(save, 0, self._layers)
            sent = self._sent.pop(save.transfer_key, None)
            if sent is not None and not sent.wait(timeout_s):
                logger.warning("KV of %s: not in the store within %.0f s", save.request_id, timeout_s)
        if metadata.saves:  # the engine's step waited this long on KV hand-over instead of computing
            with self._lock:
                self._stats[stats.SEND_WAIT_DURATION].append(time.perf_counter() - started)

    # --- decode: KV in --------------------------------------------------------------------------------------

    def start_load_kv(self, metadata: SplitserveConnectorMetadata) -> None:
        for load in metadata.loads:
            if not load.block_ids:  # nothing to read: the transfer is only released
                self._releases.put(load)
            elif load.is_in_step:
                self._load_and_account(load)
            else:
                self._loads.put(load)

    def _load_loop(self) -> None:
        while True:
            load = self._loads.get()
            self._load_and_account(load)
            with self._lock:
                self._finished_loads.add(load.request_id)

    def _load_and_account(self, load: LoadRequest) -> None:
        started = time.perf_counter()
        try:
            self._load(load)
            with self._lock:
                self._stats[stats.TRANSFER_DURATION].append(time.perf_counter() - started)
                self._stats[stats.BYTES_TRANSFERRED].append(self.layout(len(load.block_ids)).nbytes)
        except Exception as exc:
            logger.warning("KV of %s not loaded (recomputing): %s", load.request_id, exc)
            with self._lock:
                self._failed_block_ids.update(load.block_ids)
                self._stats[stats.NUM_FAILED_TRANSFERS].append(1)
                if load.is_in_step:
                    self._stats[stats.FAILED_IN_STEP_TOKENS].append(load.num_tokens)
        # Dropping the store's copy is bookkeeping, not on any request's path: its own thread, so that neither the
        # next load nor the step waits for a store call.
        self._releases.put(load)

    def _release_loop(self) -> None:
        while True:
            load = self._releases.get()
            try:
                self.transport().release(load.source, load.transfer_key)
            except Exception as exc:  # the store drops it when its lease runs out
                logger.warning("KV of %s not released: %s", load.request_id, exc)

    def _load(self, load: LoadRequest) -> None:
        first, count = load.first_remote_block, len(load.block_ids)
        if first + count > load.num_remote_blocks:
            raise KVTransferError(f"{load.request_id} needs blocks {first}..{first + count} of "
                                  f"{load.num_remote_blocks}")
        parts = self.transport().receive(load.source, load.transfer_key, self.layout(load.num_remote_blocks),
                                         self._load_timeout_s, receipt=load.receipt)
        # Where each remote block goes, as runs: remote block `first + offset` and the next `length - 1` land in
        # local blocks `local_first`..; a fresh request's blocks are usually one run, so a layer is one plain copy
        # (index_copy_ scatters block by block, slower than one copy of the same bytes).
        runs, offset = [], 0
        for local_first, length in block_runs(load.block_ids):
            runs.append((first + offset, local_first, length))
            offset += length
        for layer, segments in zip(self._layers, parts, strict=True):
            self._staging.stage_in(layer, segments, runs)

    def take_receipts(self) -> dict[str, str]:
        """Receipts of the transfers wholly sent since the last call: asked at the end of every engine step, after
        `wait_for_save`, so a step's transfers are in its own output."""
        with self._lock:
            receipts, self._receipts = self._receipts, {}
        return receipts

    def get_finished(self) -> tuple[set[str], set[str]]:
        """(requests whose KV is now in the store, requests whose KV is now loaded)."""
        with self._lock:
            sent, self._finished_sends = self._finished_sends, set()
            loaded, self._finished_loads = self._finished_loads, set()
        return sent, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def take_stats(self) -> dict[str, list[float]]:
        """What was measured since the last call, in vLLM's connector-stats keys (kv_transfer/stats.py)."""
        with self._lock:
            taken, self._stats = self._stats, stats.empty_connector_stats()
        return taken
