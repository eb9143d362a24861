"""One interface over every checkpoint ovchat converts, and the choice of reader by what is on disk.

Whatever the source, a ``Checkpoint`` presents a Hugging Face ``config.json``-style dict and the
weights under Hugging Face tensor names in Hugging Face layout, so the graph builders in
``ovchat.convert.models`` only ever deal with one naming scheme. Weights are read lazily, one
tensor per ``get()``. The readers live beside this module: ``hf`` (safetensors directories) and
``gguf`` (GGUF files); an OpenVINO IR directory is only recompressed, so its "reader" is here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ovchat.convert.tensors import Weight
from ovchat.errors import CheckpointError, UnsupportedArchitectureError
from ovchat.modelfiles import MODEL_BIN, MODEL_XML, TOKENIZER_FILES

log = logging.getLogger(__name__)

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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return data


# ---------------------------------------------------------------------------------------------
# OpenVINO IR directories


class OVCheckpoint(Checkpoint):
    """An OpenVINO IR with float weights: only compressed (and given a tokenizer if it lacks one)."""

    kind = "ov"

    @property
    def xml(self) -> Path:
        return self.path / MODEL_XML

    def get(self, name: str) -> Weight:
        raise CheckpointError(f"{self.path} is an OpenVINO IR; its weights are not read by name")

    def parameter_count(self) -> int:
        # A float IR holds its weights as f16 or f32; the .bin's size over 2 bounds the count.
        return (self.path / MODEL_BIN).stat().st_size // 2


def _open_ov(path: Path) -> OVCheckpoint:
    from ovchat.convert.hf import normalize_config

    xml = path / MODEL_XML
    binf = path / MODEL_BIN
    if not binf.is_file():
        raise CheckpointError(f"{path} has {xml.name} but no {binf.name}; copy the complete IR")
    config = normalize_config(read_json(path / "config.json")) if (path / "config.json").is_file() else {}
    generation_config = None
    if (path / "generation_config.json").is_file():
        generation_config = read_json(path / "generation_config.json")
    files = [xml, binf] + [path / f for f in ("config.json", "generation_config.json", *HF_EXTRA_FILES[:2],
                                               *TOKENIZER_FILES)
                           if (path / f).is_file()]
    return OVCheckpoint(path, config, generation_config, sorted(set(files), key=files.index))


# ---------------------------------------------------------------------------------------------


def supported_architectures() -> Optional[Sequence[str]]:
    """The Hugging Face architectures ovchat.convert.models can build, or None if it cannot say."""
    try:
        from ovchat.convert import models
    except ImportError:
        return None
    archs = getattr(models, "ARCHITECTURES", None)
    return sorted(archs) if archs else None


def check_architecture(checkpoint: Checkpoint) -> None:
    """Fail before any heavy work when no builder exists for the checkpoint."""
    if checkpoint.kind == "ov":
        return
    supported = supported_architectures()
    arch = checkpoint.architecture
    if supported is None or arch in supported:
        return
    from ovchat.convert import models

    # A config without "architectures" is still buildable from its model_type.
    if not arch and checkpoint.config.get("model_type") in getattr(models, "MODEL_TYPES", {}):
        return
    found = arch or checkpoint.config.get("model_type") or "unknown (config.json names none)"
    raise UnsupportedArchitectureError(
        f"{checkpoint.path}: architecture {found} is not supported; ovchat converts {', '.join(supported)}")


def open_checkpoint(path, *, keep_quantized: bool = False) -> Checkpoint:
    """Open a Hugging Face directory, a .gguf file or an OpenVINO IR directory, by what is there.

    ``keep_quantized``: a GGUF's quantized tensors come back as QuantizedWeight (their own
    blocks) rather than dequantized to float16.
    """
    from ovchat.convert.gguf import open_gguf
    from ovchat.gguffile import MAGIC as GGUF_MAGIC
    from ovchat.convert.hf import open_hf

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a model directory or a .gguf file")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file; give a .gguf file or a model directory")
        checkpoint: Checkpoint = open_gguf(path, keep_quantized=keep_quantized)
    elif (path / MODEL_XML).is_file():
        checkpoint = _open_ov(path)
    else:
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            checkpoint = open_gguf(ggufs[0], keep_quantized=keep_quantized)
        else:
            checkpoint = open_hf(path)
    check_architecture(checkpoint)
    log.info("opened %r", checkpoint)
    return checkpoint
