"""Read and write the safetensors format with numpy alone (no torch, no safetensors package).

Layout: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
raw tensor bytes; offsets are relative to the end of the header. numpy has no bfloat16, so BF16
tensors come back as uint16 arrays holding the raw bits and are marked ``bf16`` in ``Weight``
(ovchat.convert.tensors).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Mapping, Tuple

import numpy as np

from ovchat.convert.tensors import Weight
from ovchat.errors import CheckpointError

# safetensors dtype -> (numpy dtype of the stored bits, ovchat dtype tag)
_DTYPES = {
    "F32": (np.float32, "f32"),
    "F16": (np.float16, "f16"),
    "BF16": (np.uint16, "bf16"),
    "F64": (np.float64, "f64"),
    "I64": (np.int64, "i64"),
    "I32": (np.int32, "i32"),
    "I16": (np.int16, "i16"),
    "I8": (np.int8, "i8"),
    "U8": (np.uint8, "u8"),
    "BOOL": (np.bool_, "bool"),
}
_TAG_TO_ST = {tag: st for st, (_, tag) in _DTYPES.items()}
_NP_TO_TAG = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.float64): "f64",
              np.dtype(np.int64): "i64", np.dtype(np.int32): "i32", np.dtype(np.int16): "i16",
              np.dtype(np.int8): "i8", np.dtype(np.uint8): "u8", np.dtype(np.bool_): "bool"}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> Tuple[dict, int]:
    """Return (header dict, offset of the data section) after checking that it fits the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({str(e)[:100]}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not an object); re-download it")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, size - data_start)
    return header, data_start


def _check_entry(path: Path, name: str, info: object, data_size: int) -> None:
    """One tensor's header entry: a known dtype, a shape of whole numbers, and byte offsets that
    lie inside the data and hold exactly that many values (the reader maps what they say)."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name} {what}; re-download it")

    if not isinstance(info, dict):
        raise corrupt("has no description")
    if info.get("dtype") not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise corrupt(f"has the shape {str(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
        raise corrupt(f"has the data offsets {str(offsets)[:80]}")
    if offsets[1] > data_size:
        raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {offsets[1]} of the data but the "
                              f"file holds {data_size}; re-download it")
    count = 1
    for d in shape:
        count *= d
    if count * np.dtype(_DTYPES[info["dtype"]][0]).itemsize != offsets[1] - offsets[0]:
        raise corrupt(f"has the shape {shape} but {offsets[1] - offsets[0]} bytes")


def load(path: Path) -> Dict[str, Weight]:
    """Memory-map every tensor of one file (nothing is read until it is used)."""
    path = Path(path)
    header, data_start = read_header(path)
    tensors: Dict[str, Weight] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size > data_start else None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, tag = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            arr = mm[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
        tensors[name] = Weight(arr, tag)
    return tensors


def save(path: Path, tensors: Mapping[str, "Weight | np.ndarray"], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy arrays, or Weight for bf16) to one safetensors file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    items = []
    for name, t in tensors.items():
        w = t if isinstance(t, Weight) else Weight(np.asarray(t), _NP_TO_TAG[np.asarray(t).dtype])
        arr = np.ascontiguousarray(w.array)
        header[name] = {"dtype": _TAG_TO_ST[w.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        items.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in items:
            f.write(arr.tobytes())


def to_bf16(array: np.ndarray) -> Weight:
    """Round float32 values to bfloat16 (nearest even) and return them as a bf16 Weight."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return Weight((rounded >> 16).astype(np.uint16), "bf16")


def names(paths: Iterable[Path]) -> Dict[str, Path]:
    """Map each tensor name to the file that holds it."""
    owner: Dict[str, Path] = {}
    for p in paths:
        header, _ = read_header(Path(p))
        for n in header:
            if n != "__metadata__":
                owner[n] = Path(p)
    return owner
