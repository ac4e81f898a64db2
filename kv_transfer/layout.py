"""What a request's KV looks like on the wire: one part per attention layer, all parts of one shape and dtype.

A part travels as one or more segments: runs of consecutive blocks, cut along the block dimension. A request
whose blocks sit together in the paged cache is one segment per layer, a plain view of the cache that the
object store copies exactly once.

Both sides describe their own KV-cache geometry with a `KVLayout`; the receiver refuses a payload whose layout is
not the one it expects, so blocks of another model, dtype or block size never land in its cache. How blocks become
arrays (and bfloat16 a 16-bit pattern) is wire.py's.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kv_transfer.errors import KVPayloadError
from kv_transfer.wire import wire_dtype


class KVLayout(BaseModel):
    model_config = ConfigDict(frozen=True)

    num_parts: int = Field(ge=1)  # one part per attention layer
    part_shape: tuple[int, ...]  # e.g. (num_blocks, num_kv_heads, block_size, head_dim) on the CPU backend
    dtype: str  # the KV cache's dtype, as torch names it ("float32", "bfloat16", ...)
    block_dim: int = Field(0, ge=0)  # the dimension of part_shape that counts blocks

    @property
    def wire_dtype(self) -> str:
        return wire_dtype(self.dtype)

    @property
    def num_blocks(self) -> int:
        return self.part_shape[self.block_dim]

    @property
    def part_nbytes(self) -> int:
        return math.prod(self.part_shape) * np.dtype(self.wire_dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.num_parts * self.part_nbytes

    def check_part(self, index: int, part: object) -> list[np.ndarray]:
        """The part as a list of segments of this layout, or KVPayloadError naming what differs."""
        if not 0 <= index < self.num_parts:
            raise KVPayloadError(f"part {index} is outside this layout's {self.num_parts} parts")
        segments = [part] if isinstance(part, np.ndarray) else part
        if not isinstance(segments, list) or not segments or not all(isinstance(s, np.ndarray) for s in segments):
            raise KVPayloadError(f"part {index} is a {type(part).__name__}, not an array or a list of arrays")
        expected = list(self.part_shape)
        for segment in segments:
            shape = list(segment.shape)
            if len(shape) == len(expected):
                expected[self.block_dim] = shape[self.block_dim]
            if shape != expected or str(segment.dtype) != self.wire_dtype:
                raise KVPayloadError(
                    f"part {index} has a segment of shape {tuple(segment.shape)} and dtype {segment.dtype}; "
                    f"expected {self.part_shape} (any number of blocks in dimension {self.block_dim}) "
                    f"and {self.wire_dtype}"
                )
        num_blocks = sum(segment.shape[self.block_dim] for segment in segments)
        if num_blocks != self.num_blocks:
            raise KVPayloadError(f"part {index} has {num_blocks} blocks; expected {self.num_blocks}")
        return segments
