"""What a request's KV looks like on the wire: one array per part (a layer), all of one shape and dtype.

Both sides describe their own KV-cache geometry with a `KVLayout`; the receiver refuses a payload whose layout is
not the one it expects, so blocks of another model, dtype or block size never land in its cache.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class KVLayout(BaseModel):
    model_config = ConfigDict(frozen=True)

    num_parts: int = Field(ge=1)  # one part per attention layer
    part_shape: tuple[int, ...]  # e.g. (2, num_blocks, num_kv_heads, block_size, head_dim)
    dtype: str

    @property
    def part_nbytes(self) -> int:
        return math.prod(self.part_shape) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.num_parts * self.part_nbytes

    @classmethod
    def of(cls, parts: list[np.ndarray]) -> KVLayout:
        return cls(num_parts=len(parts), part_shape=tuple(parts[0].shape), dtype=str(parts[0].dtype))

    def check_part(self, index: int, part: object) -> np.ndarray:
        """The part as an array of this layout, or KVPayloadError naming what differs."""
        from kv_transfer.errors import KVPayloadError

        if not 0 <= index < self.num_parts:
            raise KVPayloadError(f"part {index} is outside this layout's {self.num_parts} parts")
        if not isinstance(part, np.ndarray):
            raise KVPayloadError(f"part {index} is a {type(part).__name__}, not an array")
        if tuple(part.shape) != self.part_shape or str(part.dtype) != self.dtype:
            raise KVPayloadError(
                f"part {index} has shape {tuple(part.shape)} and dtype {part.dtype}; "
                f"expected {self.part_shape} and {self.dtype}"
            )
        return part
