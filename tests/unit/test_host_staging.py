"""The object-store path's host staging (kv_transfer/object_store/host_staging.py) on a CPU cache: what leaves is a
view of the cache (ray.put makes the one copy), what arrives lands run by run in the right blocks. The CUDA path
(pinned buffers on side streams) is checked byte for byte by `python -m bench.gpu_staging_check` on a CUDA host."""

from __future__ import annotations

import torch

from kv_transfer.object_store.host_staging import HostStaging


def test_a_cpu_cache_leaves_as_views_of_its_runs_and_arrives_run_by_run():
    # A (blocks, block size, heads, dim) cache with 8 blocks; the request's blocks 1, 2, 3 and 6: two runs.
    cache = torch.arange(8 * 4 * 2 * 3, dtype=torch.float32).reshape(8, 4, 2, 3)
    staging = HostStaging("cpu", block_dim=0)
    assert not staging.is_pinned
    staged = staging.stage_out(cache, (1, 2, 3, 6))
    staged.wait()
    assert [array.shape[0] for array in staged.arrays] == [3, 1]
    assert all(torch.from_numpy(array).data_ptr() in (cache[1].data_ptr(), cache[6].data_ptr())
               for array in staged.arrays)  # views, not copies
    # Decode: remote blocks 0..3 (the four sent) into local blocks 4, 5 and 0, 7 (two runs of its own).
    target = torch.zeros_like(cache)
    staging.stage_in(target, staged.arrays, runs=[(0, 4, 2), (2, 0, 1), (3, 7, 1)])
    staged.release()
    for remote, local in zip((1, 2, 3, 6), (4, 5, 0, 7), strict=True):
        assert torch.equal(target[local], cache[remote])
    assert torch.count_nonzero(target[1:4]) == 0 and torch.count_nonzero(target[6]) == 0


def test_bfloat16_travels_as_its_bit_pattern_and_comes_back_equal():
    cache = torch.randn(4, 2, 8).to(torch.bfloat16)
    staging = HostStaging("cpu", block_dim=0)
    staged = staging.stage_out(cache, (2, 3))
    target = torch.zeros_like(cache)
    staging.stage_in(target, [array.copy() for array in staged.arrays], runs=[(0, 0, 2)])
    assert torch.equal(target[:2], cache[2:])


def test_blocks_along_the_second_dimension_arrive_in_place_and_other_bytes_are_refused():
    """vLLM's CPU layout, (K and V, blocks, heads, block size, dim): a run of blocks is two slabs, both land; an
    array of another dtype than the cache's is refused (the load fails and the prompt is recomputed), never cast."""
    import numpy as np
    import pytest

    cache = torch.randn(2, 10, 2, 4, 3)
    staging = HostStaging("cpu", block_dim=1)
    staged = staging.stage_out(cache, (2, 3, 4, 8))
    target = torch.zeros_like(cache)
    staging.stage_in(target, [array.copy() for array in staged.arrays], runs=[(0, 5, 3), (3, 1, 1)])
    assert torch.equal(target[:, 5:8], cache[:, 2:5]) and torch.equal(target[:, 1], cache[:, 8])
    assert torch.count_nonzero(target[:, [0, 2, 3, 4, 8, 9]]) == 0
    with pytest.raises(TypeError):
        staging.stage_in(torch.zeros_like(cache), [array.astype(np.float16) for array in staged.arrays],
                         runs=[(0, 5, 3), (3, 1, 1)])
