"""GGUF quantized blocks as OpenVINO compressed weights, value for value (numpy only).

Every quantization type of llama.cpp stores, per small group of weights, integers and a scale
(and for some types an offset): ``value = scale * q`` or ``value = scale * q - offset``. OpenVINO
holds compressed weights in the same shape: an integer Constant (u4, i4, u8 or i8), a scale per
group and an optional zero point per group, decompressed as ``scale * (q - zero_point)`` right
before the MatMul or Gather, which the CPU plugin fuses into its compressed-weight kernels. So a
quantized GGUF can be kept exactly as it is instead of being dequantized and quantized again.

``exact_form`` returns that form for one tensor, or None where none exists. Two ways:

- The common types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants) are unpacked bit for bit:
  4-bit integers go in 4-bit containers with the type's own block (32) or sub-block (16, 32)
  size, 5- and 6-bit ones in 8-bit containers. A scale that is the GGUF's own f16 stays f16; a
  K-quant's sub-block scale ``d * sc`` (an f16 times a 6-bit integer) needs float32 to be exact,
  and so do zero points (``offset / scale``).
- The codebook types (IQ*, TQ*, MXFP4, NVFP4) have, per group, values ``s * k`` with ``k`` a
  small integer from a known set (the grid's levels, doubled where they are halves). They are
  dequantized with the ``gguf`` package and ``s`` is recovered per group as ``max|v| / k`` for
  the first candidate ``k`` that makes every value of the group an integer multiple; the
  integers go in an i8 container. A group for which no candidate fits means no exact form.

Exact means: the decompressed values equal ``gguf.quants.dequantize``'s float32 values, bit for
bit for the symmetric types; for types with an offset, to within float32 rounding of the offset
(the zero point is ``offset / scale`` in float32).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ovchat.convert.tensors import QuantizedWeight

QK_K = 256

# The types whose values are integer multiples of a per-group scale, with the candidate
# magnitudes of a group's largest integer, and the group size (the type's sub-block).
_IQ4 = (127, 113, 104, 89, 83, 69, 65, 53, 49, 38, 35, 25, 22, 13, 10, 1)
_FP4 = (1, 2, 3, 4, 6, 8, 12)  # e2m1 magnitudes doubled: 0.5 -> 1 ... 6 -> 12
_LATTICE: Dict[str, Tuple[Tuple[int, ...], int]] = {
    "IQ4_NL": (_IQ4, 32),
    "IQ4_XS": (_IQ4, 32),
    "IQ2_XXS": ((8, 25, 43), 32),
    "IQ2_XS": ((8, 25, 43), 16),
    "IQ2_S": ((8, 25, 43), 16),
    "IQ3_XXS": ((4, 12, 20, 28, 36, 44, 52, 62), 32),
    "IQ3_S": ((1, 3, 5, 7, 9, 11, 13, 15), 32),
    # grid in {-1, 0, 1} plus a delta of +-1/8: eight times that is 1, 7 or 9.
    "IQ1_S": ((1, 7, 9), 32),
    "IQ1_M": ((1, 7, 9), 16),
    "TQ1_0": ((1,), QK_K),
    "TQ2_0": ((1, 2), QK_K),  # 2 bits hold -1..2, though llama.cpp writes only -1..1
    "MXFP4": (_FP4, 32),
    "NVFP4": (_FP4, 16),
}


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row of ``raw`` [n, 2] as float16 [n, 1]."""
    return np.ascontiguousarray(raw).view(np.float16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes of a 32-value block -> [n, 32]: low nibbles are values 0-15, high 16-31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a Q5 block -> [n, 32]: bit j of the little-endian uint32 is value j's."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _asym(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, element: str) -> tuple:
    """``scale * q + offset`` as ``scale * (q - zp)``. A group whose scale is 0 holds only its
    offset; its integers are set to 0 and its scale to 1 so that ``zp = -offset`` carries it."""
    empty = scale == 0
    if empty.any():
        q = np.where(empty[..., None], 0, q).astype(q.dtype)
        scale = np.where(empty, scale.dtype.type(1), scale)
    zero_point = (-offset.astype(np.float32) / scale.astype(np.float32)).astype(np.float32)
    return q, scale, zero_point, element


# --- the common types, unpacked bit for bit -------------------------------------------------------
# Each takes the blocks [n, type_size] and returns (q [n, groups, group], scale [n, groups],
# zero point [n, groups] or None, container).

def _q4_0(b):
    q = _nibbles(b[:, 2:18]).astype(np.int8) - np.int8(8)
    return q[:, None], _f16(b[:, 0:2]), None, "i4"


def _q4_1(b):
    return _asym(_nibbles(b[:, 4:20])[:, None], _f16(b[:, 0:2]), _f16(b[:, 2:4]), "u4")


def _q5_0(b):
    q = (_nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return q[:, None], _f16(b[:, 0:2]), None, "i8"


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << np.uint8(4))
    return _asym(q[:, None], _f16(b[:, 0:2]), _f16(b[:, 2:4]), "u8")


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8)[:, None], _f16(b[:, 0:2]), None, "i8"


def _k_scale_min(scales: np.ndarray) -> tuple:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K block, packed in 12 bytes."""
    import gguf

    return gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(scales))


def _shifted(x: np.ndarray, shifts, mask: int) -> np.ndarray:
    """x [..., k] >> each shift, masked: [..., len(shifts), k] (llama.cpp's packing of q bits)."""
    s = np.array(shifts, dtype=np.uint8).reshape((1,) * (x.ndim - 1) + (-1, 1))
    return (x[..., None, :] >> s) & np.uint8(mask)


def _q2_k(b):
    n = len(b)
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]).astype(np.float32), _f16(b[:, 82:84]).astype(np.float32)
    q = _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    return _asym(q, d * (scales & 0xF), -(dmin * (scales >> 4)), "u4")


def _q3_k(b):
    n = len(b)
    hmask, qs, packed = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110]).astype(np.float32)
    low = _shifted(packed[:, 0:8], (0, 4), 0x0F).reshape(n, 16)
    high = _shifted(packed[:, 8:12], (0, 2, 4, 6), 0x03).reshape(n, 16)
    sc = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).astype(np.int8)
    hbit = _shifted(hmask.reshape(n, 1, 32), range(8), 1).reshape(n, 16, 16).astype(np.int8)
    # A cleared high bit means "minus 4" (llama.cpp stores the bit inverted).
    return ql - ((hbit ^ 1) << 2), d * sc, None, "i4"


def _q4_k(b):
    n = len(b)
    d, dmin = _f16(b[:, 0:2]).astype(np.float32), _f16(b[:, 2:4]).astype(np.float32)
    sc, m = _k_scale_min(b[:, 4:16])
    q = _shifted(b[:, 16:144].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return _asym(q, d * sc, -(dmin * m), "u4")


def _q5_k(b):
    n = len(b)
    d, dmin = _f16(b[:, 0:2]).astype(np.float32), _f16(b[:, 2:4]).astype(np.float32)
    sc, m = _k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176]
    low = _shifted(qs.reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _shifted(qh.reshape(n, 1, 32), range(8), 1).reshape(n, 8, 32)
    return _asym(low | (high << np.uint8(4)), d * sc, -(dmin * m), "u8")


def _q6_k(b):
    n = len(b)
    ql, qh, scales = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210]).astype(np.float32)
    low = _shifted(ql.reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _shifted(qh.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 16, 16)
    return q, d * np.ascontiguousarray(scales).view(np.int8).astype(np.float32), None, "i8"


_UNPACK: Dict[str, Callable] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


# --- the codebook types, by lattice ---------------------------------------------------------------

def _lattice(values: np.ndarray, candidates: Tuple[int, ...], group: int) -> Optional[tuple]:
    """``values`` [n, k*group] as integers times a per-group scale, or None if some group is not."""
    v = values.reshape(len(values), -1, group)
    peak = np.abs(v).max(axis=-1)
    scale = np.zeros(peak.shape, np.float32)
    found = peak == 0
    scale[found] = 1.0
    for c in candidates:
        s = peak / np.float32(c)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = v / np.where(s == 0, 1, s)[..., None]
        fits = ~found & (np.abs(k - np.round(k)) <= 1e-4).all(axis=-1)
        scale[fits] = s[fits]
        found |= fits
        if found.all():
            break
    if not found.all():
        return None
    q = np.round(v / scale[..., None])
    if np.abs(q).max(initial=0) > 127 or not np.array_equal(q * scale[..., None], v):
        return None
    return q.astype(np.int8), scale, None, "i8"


# --- entry point ----------------------------------------------------------------------------------

def exact_form(raw: np.ndarray, qtype: str, shape: Tuple[int, int]) -> Optional[QuantizedWeight]:
    """The tensor of ``shape`` [rows, cols] (Hugging Face order) stored as ``raw`` GGUF blocks of
    type ``qtype``, as a QuantizedWeight holding the very same values; None if OpenVINO's
    compressed-weight form cannot hold them exactly."""
    import gguf

    rows, cols = shape
    gtype = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[gtype]
    if cols % block:
        return None
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, size)
    if qtype in _UNPACK:
        q, scale, zp, element = _UNPACK[qtype](blocks)
    elif qtype in _LATTICE:
        candidates, group = _LATTICE[qtype]
        values = gguf.quants.dequantize(blocks, gtype)
        form = _lattice(values, candidates, group)
        if form is None:
            return None
        q, scale, zp, element = form
    else:
        return None
    group = q.shape[2]
    groups = cols // group

    def per_group(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).reshape(rows, groups, 1)

    return QuantizedWeight(
        q=np.ascontiguousarray(q).reshape(rows, groups, group),
        element=element,
        scale=per_group(scale),
        zero_point=None if zp is None else per_group(zp),
        source=qtype,
    )
