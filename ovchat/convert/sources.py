"""Which reader a checkpoint on disk needs: a Hugging Face directory, a GGUF file, or an OpenVINO IR.

``open_checkpoint`` looks at what is there and opens it with ``hf`` or ``gguf``; an OpenVINO IR
directory with float weights is only recompressed, so its reader is the small ``OVCheckpoint``
here. Any checkpoint whose architecture has no builder is refused at once (``families``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ovchat.convert.checkpoint import HF_EXTRA_FILES, Checkpoint, read_json
from ovchat.convert.families import family_of
from ovchat.convert.gguf import open_gguf
from ovchat.convert.hf import normalize_config, open_hf
from ovchat.convert.tensors import Weight
from ovchat.errors import CheckpointError
from ovchat.gguffile import MAGIC as GGUF_MAGIC
from ovchat.modelfiles import MODEL_BIN, MODEL_XML, TOKENIZER_FILES

log = logging.getLogger(__name__)


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


def open_checkpoint(path, *, keep_quantized: bool = False) -> Checkpoint:
    """Open a Hugging Face directory, a .gguf file or an OpenVINO IR directory, by what is there.

    ``keep_quantized``: a GGUF's quantized tensors come back as QuantizedWeight (their own
    blocks) rather than dequantized to float16.
    """
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
    if checkpoint.kind != "ov":  # fail before any heavy work when no builder exists
        family_of(checkpoint.config, where=str(checkpoint.path))
    log.info("opened %r", checkpoint)
    return checkpoint
