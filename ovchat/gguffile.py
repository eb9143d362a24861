"""The GGUF container format, read with the standard library (numpy only for big numeric arrays).

A GGUF file is a header (magic, version, tensor and key counts), typed key/value metadata,
tensor descriptions (name, dimensions, type, offset) and, aligned after them, the tensor data.
This module reads the first three and maps the file; what a tensor's bytes mean (the
quantization types) is the ``gguf`` package's business, used only by the converter.

The ``gguf`` package has a reader too, but it builds a numpy view per array element: a 262,144
token vocabulary (Gemma 3) took it 25 s to open; this reader takes well under a second.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class FormatError(ValueError):
    """The file is not GGUF, or its header runs past its end."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's description: ``dims`` in GGUF order (fastest-varying first), ``type_id``
    ggml's type number, ``offset`` from the start of the file."""

    name: str
    dims: Tuple[int, ...]
    type_id: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class GGUFFile:
    """An open GGUF file: ``fields`` (all metadata, arrays as lists) and ``tensors``.

    ``arrays=False`` skips array values (they come back as None), for callers that want a few
    scalar keys of a large file quickly. The file stays mapped (``mapping``) until ``close``.
    """

    def __init__(self, path: Path, *, arrays: bool = True, tensors: bool = True):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m = self.mapping
        try:
            if m[:4] != MAGIC:
                raise FormatError(f"{self.path} is not a GGUF file")
            self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
            if self.version < 2:
                raise FormatError(f"{self.path} is GGUF version {self.version}; only version 2 and later are read")
            # Each key/value takes at least 12 bytes and each tensor description 24: larger counts
            # are lies that would otherwise size a loop or an allocation.
            if n_kv * 12 > len(m) or n_tensors * 24 > len(m):
                raise FormatError(f"{self.path} has a corrupt or truncated GGUF header ({n_tensors} tensors and "
                                  f"{n_kv} keys in {len(m)} bytes)")
            pos = 24
            self.fields: Dict[str, Any] = {}
            for _ in range(n_kv):
                key, pos = _string(m, pos)
                (vtype,) = struct.unpack_from("<I", m, pos)
                self.fields[key], pos = _value(m, pos + 4, vtype, arrays)
            self.tensors: List[TensorInfo] = []
            if tensors:
                infos = []
                for _ in range(n_tensors):
                    name, pos = _string(m, pos)
                    (n_dims,) = struct.unpack_from("<I", m, pos)
                    if n_dims > _MAX_DIMS:
                        raise struct.error(f"tensor {name!r} has {n_dims} dimensions")
                    dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
                    type_id, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
                    pos += 4 + 8 * n_dims + 12
                    infos.append((name, tuple(int(d) for d in dims), int(type_id), int(offset)))
                alignment = self.fields.get("general.alignment") or _DEFAULT_ALIGNMENT
                if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
                    raise FormatError(f"{self.path} has a corrupt GGUF header (alignment {alignment!r})")
                start = -(-pos // alignment) * alignment
                self.tensors = [TensorInfo(n, d, t, start + o) for n, d, t, o in infos]
        except (struct.error, UnicodeDecodeError, KeyError, OverflowError, MemoryError, RecursionError):
            self.close()
            raise FormatError(f"{self.path} has a corrupt or truncated GGUF header") from None
        except FormatError:
            self.close()
            raise

    def field(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key)
        return default if value is None else value

    def data(self, tensor: TensorInfo, n_bytes: int):
        """The tensor's bytes as a read-only numpy uint8 array over the mapping (no copy)."""
        import numpy as np

        return np.frombuffer(self.mapping, dtype=np.uint8, count=n_bytes, offset=tensor.offset)

    @property
    def size(self) -> int:
        return len(self.mapping)

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            pass  # numpy views of tensors are still alive; the mapping goes with the last of them


def _string(m: mmap.mmap, pos: int) -> tuple:
    (n,) = struct.unpack_from("<Q", m, pos)
    if pos + 8 + n > len(m):
        raise struct.error("string runs past the end of the file")
    return m[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(m: mmap.mmap, pos: int, vtype: int, arrays: bool) -> tuple:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _string(m, pos)
    if vtype != _ARRAY:
        raise KeyError(vtype)
    item_type, count = struct.unpack_from("<IQ", m, pos)
    pos += 12
    if item_type in _SCALARS:
        end = pos + count * struct.calcsize(_SCALARS[item_type])
        if end > len(m):
            raise struct.error("array runs past the end of the file")
        if not arrays:
            return None, end
        import numpy as np

        return np.frombuffer(m, dtype=_NUMPY[item_type], count=count, offset=pos).tolist(), end
    if not arrays and item_type == _STRING:  # skip by the lengths alone, decoding nothing
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", m, pos)
            pos += 8 + n
        if pos > len(m):
            raise struct.error("array runs past the end of the file")
        return None, pos
    items: Optional[list] = [] if arrays else None
    for _ in range(count):
        item, pos = _value(m, pos, item_type, arrays)
        if items is not None:
            items.append(item)
    return items, pos
