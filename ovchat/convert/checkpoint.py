"""One interface over every checkpoint ovchat converts.

Whatever the source, a ``Checkpoint`` presents a Hugging Face ``config.json``-style dict and the
weights under Hugging Face tensor names in Hugging Face layout, so the graph builders in
``ovchat.convert.models`` only ever deal with one naming scheme. Weights are read lazily, one
tensor per ``get()``. The readers implement it: ``hf`` (safetensors directories) and ``gguf``
(GGUF files); ``sources`` chooses one by what is on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ovchat.convert.tensors import Weight
from ovchat.errors import CheckpointError

_MAX_JSON_BYTES = 64 << 20  # tokenizer.json files reach ~30 MB; configs are kilobytes
HF_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                  "special_tokens_map.json")


class Checkpoint:
    """A model checkpoint on disk, seen through Hugging Face names and config keys."""

    kind: str = ""
    # How a missing tensor is reported: "{path}: tensor {name} is missing from <where>; <hint>".
    _missing = "the checkpoint; re-download it"

    def __init__(self, path: Path, config: dict, generation_config: Optional[dict], files: List[Path],
                 index: Optional[Dict[str, object]] = None):
        self.path = path
        self.config = config
        self.generation_config = generation_config
        self.files = files
        self._index = dict(index or {})  # HF tensor name -> where the reader finds it

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else ""

    def names(self) -> List[str]:
        return list(self._index)

    def has(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> Weight:
        raise NotImplementedError

    def shape(self, name: str) -> Tuple[int, ...]:
        """Tensor ``name``'s shape in Hugging Face order, without reading it."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        """How many weights the checkpoint holds (without reading them)."""
        raise NotImplementedError

    def float_view(self) -> "Checkpoint":
        """The checkpoint with every weight as a float (a GGUF read with keep_quantized gives
        its blocks instead); the receipt's reference is built from it."""
        return self

    def _entry(self, name: str) -> object:
        """Where tensor ``name`` is stored, or CheckpointError if the checkpoint lacks it."""
        try:
            return self._index[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from {self._missing}") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.architecture} {self.path}>"


def read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(f"{path} is larger than {_MAX_JSON_BYTES >> 20} MB, which no config is; "
                                  "re-download it")
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a config; re-download it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return data


def config_fields(args_class, config: dict) -> dict:
    """The values of ``config`` that the dataclass ``args_class`` (an architecture's ModelArgs,
    fields named as in config.json) takes; CheckpointError naming the required ones it lacks."""
    import dataclasses

    fields = dataclasses.fields(args_class)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in config]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}; use the checkpoint's original config.json")
    names = {f.name for f in fields}
    return {k: v for k, v in config.items() if k in names}

