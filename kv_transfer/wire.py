"""KV on the wire: how a torch KV cache's blocks become numpy arrays a transport can carry, and back.

The one dtype rule lives here: numpy has no bfloat16, so bfloat16 KV travels as its raw 16-bit pattern (int16)
and is viewed as bfloat16 again on arrival; every other dtype travels as itself. `KVLayout` (layout.py) names a
payload's wire dtype with `wire_dtype`, the connector's worker converts with `to_wire` / `from_wire`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported only where tensors are converted: the store and the layout never need it
    import torch

_WIRE_DTYPES = {"bfloat16": "int16"}


def wire_dtype(dtype: str) -> str:
    """The numpy dtype that carries KV of torch dtype `dtype` ("float32", "bfloat16", ...)."""
    return _WIRE_DTYPES.get(dtype, dtype)


def to_wire(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor, no copy."""
    import torch

    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def from_wire(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor view of a received array, in the receiver's KV dtype."""
    import torch

    with warnings.catch_warnings():  # the object store's arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


def block_runs(block_ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first block, number of blocks) for each run of consecutive ids, in order: each run is one segment."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs
