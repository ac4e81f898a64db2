"""Checks the object-store path's pinned host staging on a CUDA host, byte for byte (no vLLM, no Ray):

    python -m bench.gpu_staging_check            # exits 0 and prints what it moved, or fails on the first mismatch

A bfloat16 and a float32 KV cache in vLLM's CUDA layout (2, blocks, block size, heads, dim) per layer: the request's
blocks are staged out layer by layer while the next layer's "compute" runs on the default stream (a matmul), then
staged into another cache at other block ids; every block must arrive equal, and pinned buffers must be reused.
"""

from __future__ import annotations

import sys
import time

import torch

from kv_transfer.object_store.host_staging import HostStaging

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM = 8, 256, 16, 8, 128


def check(dtype: torch.dtype) -> str:
    device = torch.device("cuda")
    caches = [torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, device=device).to(dtype)
              for _ in range(NUM_LAYERS)]
    block_ids = tuple(range(10, 40)) + (100, 101, 7)  # two runs and a stray block
    staging = HostStaging(device, block_dim=1)
    assert staging.is_pinned
    work = torch.randn(2048, 2048, device=device)
    began = time.perf_counter()
    staged = []
    for layer in caches:
        staged.append(staging.stage_out(layer, block_ids))
        work = work @ work / 2048  # the next layer's compute, queued behind the copy's wait
    for layer in staged:
        layer.wait()
    out_s = time.perf_counter() - began
    targets = [torch.zeros_like(layer) for layer in caches]
    local_ids = tuple(range(200, 200 + len(block_ids)))
    began = time.perf_counter()
    for target, layer in zip(targets, staged, strict=True):
        staging.stage_in(target, [array.copy() for array in layer.arrays], runs=[(0, 200, len(block_ids))])
        layer.release()
    in_s = time.perf_counter() - began
    for cache, target in zip(caches, targets, strict=True):
        for remote, local in zip(block_ids, local_ids, strict=True):
            if not torch.equal(target[:, local], cache[:, remote]):
                raise AssertionError(f"{dtype}: block {remote} -> {local} differs")
    again = staging.stage_out(caches[0], block_ids)
    again.wait()
    assert again._buffer is not None and any(again._buffer.data_ptr() == layer.arrays[0].ctypes.data
                                             for layer in staged), "pinned buffers were not reused"
    num_bytes = sum(layer.arrays[0].nbytes for layer in staged)
    return f"{dtype}: {num_bytes / 1e6:.1f} MB out in {out_s * 1e3:.1f} ms, in in {in_s * 1e3:.1f} ms, every block equal"


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a CUDA host (the CPU path is tests/unit/test_host_staging.py)")
    for dtype in (torch.bfloat16, torch.float32):
        print(check(dtype))


if __name__ == "__main__":
    main()
