"""Checkpoint -> OpenVINO model conversion (torch-free). See the README's Architecture section.

``convert()`` runs the stages in order: open the checkpoint (``sources``), build the float graph
(``models``; a GGUF's is saved and read back memory-mapped), compress it (``compress``),
convert the tokenizer (``tokenizer``), write config files and the ``ovchat.json`` manifest.
Everything is written into a temporary directory beside OUTPUT and renamed into place only when
complete, so an interrupted or failed conversion never leaves something at OUTPUT that looks like
a model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from ovchat.errors import CheckpointError, ConversionError, OutputExistsError
from ovchat.interrupts import sigterm_as_interrupt
from ovchat.modelfiles import sha256
from ovchat.progress import Progress, ProgressCallback, ignore

__all__ = ["convert", "Recipe", "MANIFEST", "read_manifest"]

log = logging.getLogger(__name__)

MANIFEST = "ovchat.json"
MANIFEST_VERSION = 1
MODEL_XML = "openvino_model.xml"

if TYPE_CHECKING:  # pragma: no cover
    from ovchat.convert.compress import Recipe


def __getattr__(name: str):
    # Recipe is re-exported lazily: importing ovchat.convert (as every submodule import does)
    # must stay light, and compress pulls in the NNCF recipe machinery.
    if name == "Recipe":
        from ovchat.convert.compress import Recipe

        return Recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def convert(source, output, *, recipe: "Optional[Recipe]" = None, force: bool = False,
            progress: ProgressCallback = ignore) -> Path:
    """Convert a Hugging Face directory, a .gguf file or a float OpenVINO IR into OUTPUT.

    OUTPUT becomes a directory that ``openvino_genai.LLMPipeline`` loads. An existing OUTPUT is
    refused unless ``force``; with ``force`` it is replaced only once the new model is complete.
    Returns OUTPUT's path.
    """
    from ovchat.convert.compress import Recipe
    from ovchat.convert.sources import open_checkpoint
    from ovchat.convert.tokenizer import has_tokenizer

    recipe = recipe if recipe is not None else Recipe()
    source_path = Path(source).expanduser().absolute()
    output = Path(output).expanduser().absolute()
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it, or choose another OUTPUT")
    if output == source_path or source_path in output.parents:
        raise ConversionError(f"OUTPUT {output} must not be SOURCE or lie inside it; choose another OUTPUT")

    started = time.time()
    progress(Progress("read", f"reading {source_path}"))
    checkpoint = open_checkpoint(source_path)
    if checkpoint.kind != "ov" and not has_tokenizer(checkpoint):
        raise CheckpointError(f"{source_path} has no tokenizer (tokenizer.json or GGUF tokenizer metadata); "
                              "copy the model's tokenizer files beside its weights")
    if checkpoint.kind == "ov" and not _ov_tokenizer_available(checkpoint.path):
        raise CheckpointError(f"{source_path} has neither openvino_tokenizer.xml nor tokenizer.json; "
                              "copy the model's tokenizer.json into it")

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovchat-hash")
    try:
        with sigterm_as_interrupt():
            # Hashing the source is I/O bound and releases the GIL: it overlaps the build.
            hashes = hasher.submit(_hash_files, checkpoint.files)
            bitwidths = _build_and_compress(checkpoint, work, recipe, progress)
            _write_tokenizer(checkpoint, work, progress)
            _write_configs(checkpoint, work)
            progress(Progress("save", "hashing the source files for the manifest"))
            _write_manifest(work, checkpoint, recipe, bitwidths, hashes, started)
            _install(work, output, progress)
    except BaseException:
        # Interrupts included: the partial directory must never outlive the conversion.
        hasher.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        hasher.shutdown(wait=True)
    progress(Progress("done", f"wrote {output} in {time.time() - started:.1f} s"))
    return output


def read_manifest(model_dir) -> dict:
    """The ``ovchat.json`` manifest of a converted model directory."""
    path = Path(model_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {MANIFEST}; it was not written by `ovchat convert`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); convert the model again") from None


# ---------------------------------------------------------------------------------------------


def _build_and_compress(checkpoint, work: Path, recipe: "Recipe", progress: ProgressCallback) -> dict:
    import openvino as ov

    from ovchat.convert.compress import compress

    core = ov.Core()
    float_dir = None
    if checkpoint.kind == "ov":
        _refuse_compressed(checkpoint.xml)
        progress(Progress("read", f"reading {checkpoint.xml}"))
        model = core.read_model(checkpoint.xml)
    else:
        from ovchat.convert.models import build_model

        progress(Progress("build", f"building the {checkpoint.architecture} graph"))
        model = build_model(checkpoint, progress=progress)
        # A Hugging Face model is compressed as built: its Constants share the memory-mapped
        # safetensors, whose pages compress() drops after each NNCF step, so a float IR round
        # trip would only add a full write and read of the weights. The model object holds the
        # arrays its Constants share (build_model): it must live until it is saved below.
        if checkpoint.kind == "gguf":
            # GGUF weights are dequantized into ordinary memory that nothing can drop while the
            # model holds it: save the float IR, free the graph with its arrays and the GGUF
            # pages read while dequantizing, and compress the IR read back memory-mapped.
            float_dir = work / ".float"
            progress(Progress("save", "saving the float model"))
            ov.save_model(model, float_dir / MODEL_XML, compress_to_fp16=False)
            del model
            gc.collect()
            checkpoint.drop_weight_pages()
            model = core.read_model(float_dir / MODEL_XML)
    model, bitwidths = compress(model, recipe, progress=progress)
    progress(Progress("save", "saving the model"))
    ov.save_model(model, work / MODEL_XML)
    del model
    gc.collect()
    if float_dir is not None:
        shutil.rmtree(float_dir)
    return bitwidths


def _refuse_compressed(xml: Path) -> None:
    """NNCF would compress already-quantized weights a second time; refuse such an IR instead."""
    import math

    import openvino as ov

    low = {ov.Type.u4, ov.Type.i4, ov.Type.u8, ov.Type.i8, ov.Type.nf4}
    for op in ov.Core().read_model(xml).get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) in low \
                and op.get_output_partial_shape(0).is_static and math.prod(op.get_output_shape(0)) >= 4096:
            raise CheckpointError(f"{xml.parent} already has compressed weights ({op.get_output_element_type(0)}); "
                                  "convert from the float checkpoint instead")


def _ov_tokenizer_available(path: Path) -> bool:
    return (path / "openvino_tokenizer.xml").is_file() or (path / "tokenizer.json").is_file()


def _write_tokenizer(checkpoint, work: Path, progress: ProgressCallback) -> None:
    from ovchat.convert.tokenizer import TOKENIZER_FILES, convert_tokenizer

    if checkpoint.kind == "ov" and all((checkpoint.path / f).is_file() for f in TOKENIZER_FILES):
        progress(Progress("tokenizer", "copying the tokenizer"))
        for f in TOKENIZER_FILES:
            shutil.copy2(checkpoint.path / f, work / f)
        if (checkpoint.path / "generation_config.json").is_file():
            shutil.copy2(checkpoint.path / "generation_config.json", work / "generation_config.json")
        return
    convert_tokenizer(checkpoint, work, progress=progress)


def _write_configs(checkpoint, work: Path) -> None:
    if checkpoint.kind in ("hf", "ov") and (checkpoint.path / "config.json").is_file():
        shutil.copy2(checkpoint.path / "config.json", work / "config.json")
    elif checkpoint.config:
        (work / "config.json").write_text(json.dumps(checkpoint.config, indent=2) + "\n", encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if checkpoint.kind in ("hf", "ov") and (checkpoint.path / name).is_file():
            shutil.copy2(checkpoint.path / name, work / name)


def _hash_files(files: List[Path]) -> Dict[str, str]:
    return {str(f): sha256(f) for f in files}


def _versions() -> Dict[str, Optional[str]]:
    out = {}
    for dist in ("openvino", "openvino-genai", "openvino-tokenizers", "nncf", "ovchat"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _write_manifest(work: Path, checkpoint, recipe: "Recipe", bitwidths: dict, hashes: "Future[Dict[str, str]]",
                    started: float) -> None:
    config = checkpoint.config or {}
    outputs = sorted(f for f in work.iterdir() if f.is_file() and f.name != MANIFEST)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conversion_seconds": None,
        "source": {
            "path": str(checkpoint.path),
            "kind": checkpoint.kind,
            "files": [{"path": str(f), "size": f.stat().st_size, "sha256": hashes.result()[str(f)]}
                      for f in checkpoint.files],
        },
        "architecture": checkpoint.architecture or None,
        "model_type": config.get("model_type"),
        "context_length": config.get("max_position_embeddings"),
        "recipe": dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else dict(vars(recipe)),
        "bitwidth_distribution": bitwidths,
        "versions": _versions(),
        # The output's own files, so that damage to the converted model can be detected later.
        "files": {f.name: {"size": f.stat().st_size, "sha256": digest}
                  for f, digest in zip(outputs, _hash_files(outputs).values())},
    }
    manifest["conversion_seconds"] = round(time.time() - started, 2)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")


def _install(work: Path, output: Path, progress: ProgressCallback) -> None:
    """Rename the complete model into place, replacing an older OUTPUT only at the last moment."""
    progress(Progress("save", f"moving the model into {output}"))
    old = None
    if output.exists() or output.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.rmdir(old)
        os.replace(output, old)
    try:
        os.replace(work, output)
    except OSError as e:
        if old is not None:
            os.replace(old, output)
        raise ConversionError(f"could not move the converted model into {output} ({e}); check permissions") from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
