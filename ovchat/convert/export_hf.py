"""GGUF -> Hugging Face checkpoint directory, with ovchat's own reader and writer (no torch).

Tools that only read Hugging Face checkpoints (``optimum-cli export openvino``, transformers)
can then work on exactly the weights ovchat converts from a GGUF: the tensors come from
``checkpoint.open_checkpoint`` (dequantized to f16, Q/K rows back in Hugging Face order), the
config is the one ovchat derives from the GGUF metadata, and the tokenizer is the equivalent
``tokenizer.json`` ovchat builds from ``tokenizer.ggml.*``. ``scripts/bench_peers.py`` uses it
to give optimum the same model as ovchat.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List

from ovchat.convert import safetensors
from ovchat.errors import CheckpointError, OutputExistsError
from ovchat.modelfiles import install_directory
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)

# Tensors are written in shards of about this size, so memory holds one shard at a time.
SHARD_BYTES = 2 * 1024 ** 3


def export_hf(source, output, *, force: bool = False, shard_bytes: int = SHARD_BYTES,
              progress: ProgressCallback = ignore) -> Path:
    """Write the GGUF file ``source`` as a Hugging Face directory ``output`` and return its path.

    ``output`` gets config.json, generation_config.json, model.safetensors (or shards and an
    index), tokenizer.json and tokenizer_config.json. Like ``convert``, it is written beside
    ``output`` and renamed into place only when complete; an existing ``output`` is refused
    unless ``force``.
    """
    from ovchat.convert.sources import open_checkpoint
    from ovchat.convert.tokenizer import write_gguf_tokenizer_files

    output = Path(output).expanduser().absolute()
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass force=True to replace it, or choose another output")
    checkpoint = open_checkpoint(source)
    if checkpoint.kind != "gguf":
        raise CheckpointError(f"{checkpoint.path} is not a GGUF file; only GGUF sources are exported "
                              "to Hugging Face layout (a Hugging Face directory already is one)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        _write_weights(checkpoint, tmp, shard_bytes, progress)
        config = dict(checkpoint.config)
        # The weights are written as stored after dequantization: f16 matrices, f32 norms.
        config["torch_dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(
            json.dumps(checkpoint.generation_config or {}, indent=2) + "\n", encoding="utf-8")
        progress(Progress("tokenizer", "writing tokenizer.json"))
        write_gguf_tokenizer_files(checkpoint, tmp)
        install_directory(tmp, output, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", checkpoint.path, output)
    return output


def _write_weights(checkpoint, directory: Path, shard_bytes: int, progress: ProgressCallback) -> None:
    names = checkpoint.names()
    shards: List[List[str]] = [[]]
    size = 0
    for name in names:
        nbytes = checkpoint.element_count(name) * 2  # at most 2 bytes a value once dequantized
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: Dict[str, str] = {}
    total = 0
    for k, group in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        progress(Progress("save", f"writing {file}", k - 1, len(shards)))
        tensors = {name: checkpoint.get(name) for name in group}
        safetensors.save(directory / file, tensors, metadata={"format": "pt"})
        total += sum(w.array.nbytes for w in tensors.values())
        weight_map.update({name: file for name in group})
        del tensors
    progress(Progress("save", "weights written", len(shards), len(shards)))
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            encoding="utf-8")
