"""How a checkpoint's weights reach the graph builders: as stored floats, or as quantized blocks.

Readers hand every tensor over in Hugging Face layout ([out, in] for matrices). A float tensor is
a ``Weight``; a tensor that a GGUF file stores quantized, and that ovchat keeps as it is, is a
``QuantizedWeight``: the integers of each block, one scale per block and (for the types with an
offset) one zero point per block, so that ``scale * (q - zero_point)`` gives back exactly the
values the GGUF holds. ``graph.constant`` turns either into OpenVINO Constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

# Containers of a kept weight: OpenVINO element type -> (numpy dtype of one value, bits, signed).
CONTAINERS = {"u4": (np.uint8, 4, False), "i4": (np.int8, 4, True), "u8": (np.uint8, 8, False),
              "i8": (np.int8, 8, True)}


@dataclass(frozen=True)
class Weight:
    """A tensor as stored: ``array`` holds float32, float16, or (for bf16) uint16 bits."""

    array: np.ndarray
    dtype: str  # "f32" | "f16" | "bf16" | other tags of safetensors' dtypes

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)

    def to_float32(self) -> np.ndarray:
        if self.dtype == "bf16":
            # bfloat16 is the top half of a float32: widen by shifting the bits into place.
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array.astype(np.float32, copy=False)

    def rows(self, start: int, stop: int) -> "Weight":
        """Output channels start..stop (a view: fused projections are split this way)."""
        return Weight(self.array[start:stop], self.dtype)

    def reorder_rows(self, order: np.ndarray) -> "Weight":
        return Weight(self.array[order], self.dtype)


@dataclass(frozen=True)
class QuantizedWeight:
    """A matrix [rows, groups * group_size] held as ``scale * (q - zero_point)`` per group.

    ``q``: the integers, [rows, groups, group_size], in a numpy dtype wide enough for
    ``element`` (u4/i4/u8/i8: OpenVINO's name of the container). ``scale``: [rows, groups, 1],
    float16 where the GGUF's scale is itself an f16, else float32 (a product of an f16 and a
    small integer is exact in float32, not in float16). ``zero_point``: [rows, groups, 1]
    float32, or None for symmetric types. ``source``: the GGUF type the values came from.
    """

    q: np.ndarray
    element: str
    scale: np.ndarray
    zero_point: Optional[np.ndarray]
    source: str

    def __post_init__(self) -> None:
        if self.element not in CONTAINERS:
            raise ValueError(f"unknown container {self.element}")
        if self.q.ndim != 3 or self.scale.shape != self.q.shape[:2] + (1,):
            raise ValueError(f"q {self.q.shape} and scale {self.scale.shape} do not describe groups")
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError("the zero point must have the scale's shape")

    @property
    def shape(self) -> Tuple[int, int]:
        rows, groups, size = self.q.shape
        return rows, groups * size

    @property
    def group_size(self) -> int:
        return int(self.q.shape[2])

    @property
    def dtype(self) -> str:
        return self.element

    def dequantize(self) -> np.ndarray:
        """The float32 values, computed as the decompression subgraph computes them."""
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - self.zero_point
        return (q * self.scale.astype(np.float32)).reshape(self.shape)

    def to_float32(self) -> np.ndarray:
        return self.dequantize()

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        return self._take(slice(start, stop))

    def reorder_rows(self, order: np.ndarray) -> "QuantizedWeight":
        return self._take(order)

    def _take(self, index) -> "QuantizedWeight":
        zp = None if self.zero_point is None else self.zero_point[index]
        return QuantizedWeight(self.q[index], self.element, self.scale[index], zp, self.source)

    def packed(self) -> np.ndarray:
        """``q`` as OpenVINO stores the container: 4-bit values two to a byte, low nibble first."""
        if CONTAINERS[self.element][1] == 8:
            return np.ascontiguousarray(self.q, dtype=CONTAINERS[self.element][0])
        flat = np.ascontiguousarray(self.q).reshape(-1).view(np.uint8) & np.uint8(0x0F)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        return flat[0::2] | (flat[1::2] << np.uint8(4))

    def describe(self) -> str:
        """'int4_asym g32, f16 scale, f32 zero point': the form as the manifest records it."""
        bits = CONTAINERS[self.element][1]
        scale = "f16" if self.scale.dtype == np.float16 else "f32"
        if self.zero_point is None:
            return f"int{bits}_sym g{self.group_size}, {scale} scale"
        return f"int{bits}_asym g{self.group_size}, {scale} scale, f32 zero point"
