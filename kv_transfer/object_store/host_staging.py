"""Where a KV cache meets host memory on the object-store path: the object store holds host bytes, so device KV is
staged through pinned host buffers, and a CPU cache is read in place.

Prefill (`stage_out`, called as each layer's KV is written):
1. CPU cache: views of the request's runs of blocks (no copy; `ray.put` is the one copy).
2. CUDA cache: the blocks gathered on the device, then copied into a pinned host buffer on a side stream that
   first waits for the layer's compute, so the copy overlaps the layers still computing; `Staged.wait` (in the
   sender thread, before `ray.put`) waits for that copy only. `release` gives the buffer back for reuse once the
   store has its own copy.
Decode (`stage_in`, on the loader thread):
3. CPU cache: each run copied straight from the received array into the cache's blocks, with numpy on views of
   both (a few µs a segment, where torch's views and copy_ took ~25: 2.2 ms of a 64 MB transfer's 90 segments).
4. CUDA cache: the received layer copied once into a pinned buffer, then run by run to the device on a side stream,
   synchronized before the request is reported loaded.
Pinned buffers are pooled by size: a steady stream of transfers allocates none after the first few.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kv_transfer.wire import block_runs, from_wire, to_wire

# Runs of a received layer: (remote first block, local first block, number of blocks).
Runs = list[tuple[int, int, int]]


@dataclass
class Staged:
    """One layer's blocks on the host: `arrays` (what the transport sends), ready once `wait` returned."""

    arrays: list[np.ndarray]
    _event: torch.cuda.Event | None = None
    _buffer: torch.Tensor | None = None  # the pinned buffer the arrays view (CUDA), back to the pool on release
    _release: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def release(self) -> None:
        if self._buffer is not None and self._release is not None:
            self._release(self._buffer)
            self._buffer = None


class HostStaging:
    def __init__(self, device: torch.device | str, block_dim: int):
        self._device = torch.device(device)
        self._block_dim = block_dim
        self._is_cuda = self._device.type == "cuda"
        self._out_stream = torch.cuda.Stream(self._device) if self._is_cuda else None
        self._in_stream = torch.cuda.Stream(self._device) if self._is_cuda else None
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    @property
    def is_pinned(self) -> bool:
        return self._is_cuda

    # 1-2. Prefill.
    def stage_out(self, layer: torch.Tensor, block_ids: tuple[int, ...]) -> Staged:
        if not self._is_cuda:
            return Staged([to_wire(layer.narrow(self._block_dim, first, count))
                           for first, count in block_runs(block_ids)])
        ids = torch.tensor(block_ids, dtype=torch.long, device=self._device)
        compute = torch.cuda.current_stream(self._device)
        with torch.cuda.stream(self._out_stream):
            self._out_stream.wait_stream(compute)  # the layer's KV is written by the kernels queued so far
            gathered = layer.index_select(self._block_dim, ids)
            buffer = self._take(tuple(gathered.shape), gathered.dtype)
            buffer.copy_(gathered, non_blocking=True)
            gathered.record_stream(self._out_stream)  # freed only after the copy, though made on this stream
            event = torch.cuda.Event()
            event.record(self._out_stream)
        return Staged([to_wire(buffer)], event, buffer, self._give_back)

    # 3-4. Decode.
    def stage_in(self, layer: torch.Tensor, segments: list[np.ndarray], runs: Runs) -> None:
        """Each run (remote first block, local first block, number of blocks) from `segments` (the remote blocks,
        in order, cut into runs of their own) into `layer`."""
        if not self._is_cuda:
            self._stage_in_host(layer, segments, runs)
            return
        # 4. Whatever the engine queued on these blocks (their allocation) goes first.
        self._in_stream.wait_stream(torch.cuda.current_stream(self._device))
        start = 0  # the remote index of the segment's first block
        for segment in segments:
            length = segment.shape[self._block_dim]
            source = from_wire(segment, layer.dtype)
            pinned = self._take(tuple(source.shape), source.dtype)
            pinned.copy_(source)
            with torch.cuda.stream(self._in_stream):
                for remote_first, local_first, count in runs:
                    low, high = max(remote_first, start), min(remote_first + count, start + length)
                    if low < high:
                        target = layer.narrow(self._block_dim, local_first + low - remote_first, high - low)
                        target.copy_(pinned.narrow(self._block_dim, low - start, high - low), non_blocking=True)
            self._in_stream.synchronize()  # the pinned buffer is reused, and the engine reads these blocks next
            self._give_back(pinned)
            start += length

    def _stage_in_host(self, layer: torch.Tensor, segments: list[np.ndarray], runs: Runs) -> None:
        """3. `stage_in` for a CPU cache: the cache's memory as numpy (`to_wire`: the very bytes the received arrays
        hold, bfloat16 as int16), each overlap of a segment and a run one `np.copyto`."""
        cache = to_wire(layer)
        target: list[slice] = [slice(None)] * cache.ndim
        source: list[slice] = [slice(None)] * cache.ndim
        start = 0  # the remote index of the segment's first block
        for segment in segments:
            length = segment.shape[self._block_dim]
            for remote_first, local_first, count in runs:
                low, high = max(remote_first, start), min(remote_first + count, start + length)
                if low < high:
                    target[self._block_dim] = slice(local_first + low - remote_first, local_first + high - remote_first)
                    source[self._block_dim] = slice(low - start, high - start)
                    np.copyto(cache[tuple(target)], segment[tuple(source)], casting="no")
            start += length

    # The pool.
    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)

