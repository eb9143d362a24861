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
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download it") from None
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the file has "
                f"{size} bytes; re-download it")
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    return header, data_start


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
