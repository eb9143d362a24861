"""What a model on disk is, without loading it: its kind, completeness and context length.

A model is either a directory that LLMPipeline reads (an OpenVINO IR with tokenizer IRs) or a
``.gguf`` file, which OpenVINO GenAI reads directly. GGUF metadata is parsed here with the
standard library so the base install needs no ``gguf`` package.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path
from typing import Any, Dict, Optional

from ovchat.errors import ModelNotFoundError

REQUIRED_IR_FILES = (
    "openvino_model.xml",
    "openvino_model.bin",
    "openvino_tokenizer.xml",
    "openvino_tokenizer.bin",
    "openvino_detokenizer.xml",
    "openvino_detokenizer.bin",
)

GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 8 * 1024 * 1024


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks (model files are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_model(path: Path) -> Path:
    """Return ``path`` if it is a loadable model, else raise ModelNotFoundError saying what is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model {path} does not exist; give a model directory, a .gguf file "
                                 "or a known model name")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelNotFoundError(f"{path} is not a GGUF file; give a model directory or a .gguf file")
        return path
    missing = [name for name in REQUIRED_IR_FILES if not (path / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"model directory {path} is incomplete (missing {', '.join(missing)}); "
                                 "convert it again with `ovchat convert`")
    return path


def context_length(path: Path) -> Optional[int]:
    """The model's trained context window, if the model says (config.json or GGUF metadata)."""
    path = Path(path)
    if path.is_file():
        meta = read_gguf_metadata(path, keys_ending=(".context_length",))
        values = [v for k, v in meta.items() if k.endswith(".context_length")]
        return int(values[0]) if values else None
    for name in ("ovchat.json", "config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in ("context_length", "max_position_embeddings"):
            if isinstance(data.get(key), int):
                return data[key]
    return None


# GGUF value types -> struct format (scalars) as in the GGUF spec.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, *, keys_ending: tuple = ()) -> Dict[str, Any]:
    """Read GGUF key/values (arrays are skipped). ``keys_ending`` limits which keys are kept."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != GGUF_MAGIC:
            raise ModelNotFoundError(f"{path} is not a GGUF file")
        try:
            version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
            if version < 2:
                raise ModelNotFoundError(f"{path} is GGUF version {version}; only version 2 and later are read")
            pos = 24
            out: Dict[str, Any] = {}
            for _ in range(n_kv):
                key, pos = _string(m, pos)
                (vtype,) = struct.unpack_from("<I", m, pos)
                value, pos = _value(m, pos + 4, vtype)
                if not keys_ending or key.endswith(keys_ending):
                    out[key] = value
            return out
        except (struct.error, UnicodeDecodeError, KeyError):
            raise ModelNotFoundError(f"{path} has corrupt GGUF metadata; download it again") from None


def _string(m: mmap.mmap, pos: int) -> tuple:
    (n,) = struct.unpack_from("<Q", m, pos)
    if pos + 8 + n > len(m):
        raise struct.error("string runs past the end of the file")
    return m[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(m: mmap.mmap, pos: int, vtype: int) -> tuple:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _string(m, pos)
    if vtype == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", m, pos)
        pos += 12
        if item_type in _SCALARS:
            return None, pos + count * struct.calcsize(_SCALARS[item_type])
        for _ in range(count):
            _, pos = _value(m, pos, item_type)
        return None, pos
    raise KeyError(vtype)
