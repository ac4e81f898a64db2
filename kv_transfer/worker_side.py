"""The connector's worker half: moves KV bytes between vLLM's paged cache and the transport.

It runs in vLLM's worker process, so it joins the Ray cluster itself (address and namespace come from the
connector config) to reach the KV-store actor.

Prefill (KV out):
1. `save_kv_layer`, called right after each attention layer wrote its KV: copy that layer's prompt blocks into
   one contiguous array (they may be reused once the request finishes) and queue it;
2. a sender thread opens the transfer and puts each layer into the store while later layers still compute;
3. `wait_for_save`, at the end of the step, waits until this step's transfers are open (issued at layer 0, so
   normally done by then): prefill's answer can never reach decode before the store knows the transfer.
Decode (KV in):
1. `start_load_kv`: a loader thread receives each requested transfer (waiting for parts still in flight),
   writes the blocks into this engine's cache, and releases the transfer;
2. `get_finished` reports loaded requests to the scheduler; failed loads report their blocks through
   `get_block_ids_with_load_errors`, and vLLM recomputes them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from kv_transfer.connector_metadata import LoadRequest, SaveRequest, SplitserveConnectorMetadata
from kv_transfer.errors import KVTransferError
from kv_transfer.layout import KVLayout

logger = logging.getLogger("splitserve.kv_transfer")


class WorkerSide:
    def __init__(self, transport_factory: Any, num_blocks: int, load_timeout_s: float):
        self._transport_factory = transport_factory
        self._transport: Any = None
        self._num_blocks = num_blocks
        self._load_timeout_s = load_timeout_s
        self._layers: list[torch.Tensor] = []
        self._layer_index: dict[str, int] = {}
        self._block_dim = 0
        self._lock = threading.Lock()
        self._finished_loads: set[str] = set()
        self._failed_block_ids: set[int] = set()
        self._stats: dict[str, list[float]] = {"transfer_duration": [], "bytes_transferred": [],
                                               "num_failed_transfers": []}
        self._sends: queue.SimpleQueue = queue.SimpleQueue()
        self._opened: dict[str, threading.Event] = {}
        self._loads: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send_loop, name="splitserve-kv-send", daemon=True).start()
        threading.Thread(target=self._load_loop, name="splitserve-kv-load", daemon=True).start()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = list(kv_caches.values())
        self._layer_index = {name: index for index, name in enumerate(kv_caches)}
        # The block dimension is the one sized num_blocks: 0 on the CPU backend, 1 for (2, blocks, ...) layouts.
        self._block_dim = list(self._layers[0].shape).index(self._num_blocks)

    def layout(self, num_blocks: int) -> KVLayout:
        shape = list(self._layers[0].shape)
        shape[self._block_dim] = num_blocks
        return KVLayout(num_parts=len(self._layers), part_shape=tuple(shape),
                        dtype=str(self._layers[0].dtype).removeprefix("torch."))

    def transport(self) -> Any:
        if self._transport is None:
            self._transport = self._transport_factory()
        return self._transport

    # --- prefill: KV out ------------------------------------------------------------------------------------

    def save_kv_layer(self, metadata: SplitserveConnectorMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not metadata.saves:
            return
        index = self._layer_index[layer_name]
        for save in metadata.saves:
            opened = None
            if index == 0:
                opened = self._opened[save.transfer_key] = threading.Event()
            ids = torch.tensor(save.block_ids, dtype=torch.long, device=kv_layer.device)
            part = kv_layer.index_select(self._block_dim, ids).cpu().numpy()
            self._sends.put((save, index, part, opened))

    def _send_loop(self) -> None:
        tickets: dict[str, Any] = {}
        while True:
            save, index, part, opened = self._sends.get()
            try:
                if opened is not None:
                    try:
                        tickets[save.transfer_key] = self.transport().open(
                            save.transfer_key, self.layout(len(save.block_ids)))
                    finally:
                        opened.set()
                ticket = tickets.get(save.transfer_key)
                if ticket is None:  # opening failed (store full, store gone): decode will recompute
                    continue
                self.transport().send(ticket, index, [part])
                if index == len(self._layers) - 1:
                    del tickets[save.transfer_key]
            except Exception as exc:  # never let a transfer take the engine down
                tickets.pop(save.transfer_key, None)
                logger.warning("KV of %s not sent (decode will recompute): %s", save.request_id, exc)

    def wait_for_save(self, metadata: SplitserveConnectorMetadata, timeout_s: float = 30.0) -> None:
        for save in metadata.saves:
            opened = self._opened.pop(save.transfer_key, None)
            if opened is not None and not opened.wait(timeout_s):
                logger.warning("KV of %s: the store did not answer within %.0f s", save.request_id, timeout_s)

    # --- decode: KV in --------------------------------------------------------------------------------------

    def start_load_kv(self, metadata: SplitserveConnectorMetadata) -> None:
        for load in metadata.loads:
            self._loads.put(load)

    def _load_loop(self) -> None:
        while True:
            load: LoadRequest = self._loads.get()
            started = time.perf_counter()
            try:
                self._load(load)
                with self._lock:
                    self._stats["transfer_duration"].append(time.perf_counter() - started)
                    self._stats["bytes_transferred"].append(self.layout(len(load.block_ids)).nbytes)
            except Exception as exc:
                logger.warning("KV of %s not loaded (recomputing): %s", load.request_id, exc)
                with self._lock:
                    self._failed_block_ids.update(load.block_ids)
                    self._stats["num_failed_transfers"].append(1)
                try:
                    self.transport().release(load.transfer_key)
                except Exception:
                    pass
            with self._lock:
                self._finished_loads.add(load.request_id)

    def _load(self, load: LoadRequest) -> None:
        transport = self.transport()
        parts = transport.receive(load.transfer_key, self.layout(load.num_remote_blocks), self._load_timeout_s)
        try:
            first, count = load.first_remote_block, len(load.block_ids)
            if first + count > load.num_remote_blocks:
                raise KVTransferError(f"{load.request_id} needs blocks {first}..{first + count} of "
                                      f"{load.num_remote_blocks}")
            ids = torch.tensor(load.block_ids, dtype=torch.long, device=self._layers[0].device)
            for layer, part in zip(self._layers, parts, strict=True):
                source = torch.from_numpy(np.asarray(part)).narrow(self._block_dim, first, count)
                layer.index_copy_(self._block_dim, ids, source.to(layer.device))
        finally:
            transport.release(load.transfer_key)

    def get_finished(self) -> set[str]:
        with self._lock:
            finished, self._finished_loads = self._finished_loads, set()
        return finished

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def take_stats(self) -> dict[str, list[float]]:
        with self._lock:
            stats = self._stats
            self._stats = {name: [] for name in stats}
        return stats
