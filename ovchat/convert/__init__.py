"""Checkpoint -> OpenVINO model conversion (torch-free). See the README's Architecture section.

``convert()`` runs the stages in order: open the checkpoint (``sources``: ``hf`` or ``gguf``),
decide the recipe (a quantized GGUF keeps its own quantization unless a recipe is asked for),
build the graph (``models``), compress it (``compress``) or keep the GGUF's blocks (``quants``),
convert the tokenizer (``tokenizer``), measure the accuracy receipt (``receipt``), and write config
files and the ``ovchat.json`` manifest. Everything is written into a temporary directory beside
OUTPUT and moved into place only when complete, so an interrupted or failed conversion never
leaves something at OUTPUT that looks like a model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from ovchat.errors import CheckpointError, ConversionError, OutputExistsError
from ovchat.interrupts import sigterm_as_interrupt
from ovchat.machine import installed_versions
from ovchat.modelfiles import (MANIFEST, MODEL_XML, TOKENIZER_FILES, install_directory, replaceable, sha256,
                               storage_error)
from ovchat.progress import Progress, ProgressCallback, ignore

__all__ = ["convert", "Recipe", "MANIFEST", "read_manifest"]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2

if TYPE_CHECKING:  # pragma: no cover
    from ovchat.convert.recipe import Recipe


def __getattr__(name: str):
    # Recipe is re-exported lazily: importing ovchat.convert (as every submodule import does)
    # must stay light.
    if name == "Recipe":
        from ovchat.convert.recipe import Recipe

        return Recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


EXTRA_MODULES = ("nncf", "gguf", "transformers", "tokenizers")
NEEDS_EXTRA = "pip install 'ovchat[convert]'"


def extra_installed() -> bool:
    """Whether the convert extra's packages are installed (checked without importing them)."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in EXTRA_MODULES)


def convert(source, output, *, recipe: "Optional[Recipe]" = None, force: bool = False,
            receipt: Optional[bool] = None, manifest_extra: Optional[Dict[str, object]] = None,
            progress: ProgressCallback = ignore) -> Path:
    """Convert a Hugging Face directory, a .gguf file or a float OpenVINO IR into OUTPUT.

    OUTPUT becomes a directory that ``openvino_genai.LLMPipeline`` loads. An existing OUTPUT is
    refused unless ``force``; with ``force`` it is replaced only once the new model is complete.
    ``recipe``: by default a quantized GGUF keeps its quantization and anything else gets the int4
    recipe (see ``Recipe``). ``receipt``: measure the converted model against the float weights
    (True, False, or None: only where that fits this machine comfortably). ``manifest_extra``:
    more top-level fields of ``ovchat.json`` (the store records its entry there). Returns
    OUTPUT's path.
    """
    from ovchat.convert.sources import open_checkpoint
    from ovchat.convert.recipe import Recipe
    from ovchat.convert.tokenizer import has_tokenizer

    if not extra_installed():  # said before anything is read or written
        raise ConversionError(f"converting needs the convert extra: {NEEDS_EXTRA}")
    recipe = recipe if recipe is not None else Recipe()
    source_path = Path(source).expanduser().absolute()
    output = Path(output).expanduser().absolute()
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it, or choose another OUTPUT")
    if output == source_path or source_path in output.parents:
        raise ConversionError(f"OUTPUT {output} must not be SOURCE or lie inside it; choose another OUTPUT")
    if output in source_path.parents:
        raise ConversionError(f"OUTPUT {output} holds SOURCE; choose another OUTPUT")
    refused = replaceable(output)
    if refused is not None:  # --force replaces only a model ovchat made, or an empty folder
        raise OutputExistsError(f"{refused}; --force replaces only a model directory ovchat made. "
                                "Choose another OUTPUT")

    started = time.time()
    progress(Progress("read", f"reading {source_path}"))
    checkpoint = open_checkpoint(source_path)
    if checkpoint.kind != "ov":  # a config that lies about its weights, refused before anything is built
        from ovchat.convert.validate import check as check_checkpoint

        check_checkpoint(checkpoint)
    pooling = _pooling(checkpoint)  # a sentence encoder's, or None for a chat model
    if checkpoint.kind != "ov" and not has_tokenizer(checkpoint):
        raise CheckpointError(f"{source_path} has no tokenizer (tokenizer.json or GGUF tokenizer metadata); "
                              "copy the model's tokenizer files beside its weights")
    if checkpoint.kind == "ov" and not _ov_tokenizer_available(checkpoint.path):
        raise CheckpointError(f"{source_path} has neither openvino_tokenizer.xml nor tokenizer.json; "
                              "copy the model's tokenizer.json into it")
    recipe = _resolve(recipe, checkpoint, progress, encoder=pooling is not None)

    work = _work_directory(output)
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovchat-hash")
    try:
        with sigterm_as_interrupt():
            # Hashing the source is I/O bound and releases the GIL: it overlaps the build.
            hashes = hasher.submit(_hash_files, checkpoint.files)
            built = _build_and_compress(checkpoint, work, recipe, progress, encoder=pooling is not None)
            _write_tokenizer(checkpoint, work, progress)
            _write_configs(checkpoint, work)
            if pooling is None:  # a template that crashes or runs away is refused before the model is stored
                from ovchat.templatecheck import vet_model

                vet_model(work, name=str(source_path))
            measured = _receipt(checkpoint, work, built, receipt, progress, pooling)
            shutil.rmtree(work / _FLOAT_DIR, ignore_errors=True)
            progress(Progress("save", "hashing the source files for the manifest"))
            kind = {"kind": "chat"} if pooling is None else {"kind": "embedding", "embedding": pooling}
            _write_manifest(work, checkpoint, recipe, built, measured, hashes, started, {**kind, **(manifest_extra or {})})
            progress(Progress("save", f"moving the model into {output}"))
            install_directory(work, output, replace=force)
    except BaseException as e:
        # Interrupts included: the partial directory must never outlive the conversion.
        hasher.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
        full = storage_error(output.parent, e) if isinstance(e, (OSError, RuntimeError)) else None
        if full is not None:
            raise full from None
        raise
    finally:
        hasher.shutdown(wait=True)
    progress(Progress("done", f"wrote {output} in {time.time() - started:.1f} s"))
    return output


def read_manifest(model_dir) -> dict:
    """The ``ovchat.json`` manifest of a converted model directory."""
    from ovchat.modelfiles import read_manifest as read

    return read(Path(model_dir).expanduser())


# ---------------------------------------------------------------------------------------------

_FLOAT_DIR = ".float"  # the float IR of a GGUF, inside the work directory, kept for the receipt
_PARTIAL = ".partial-"


def _work_directory(output: Path) -> Path:
    """A fresh directory beside OUTPUT (so the final rename stays on one file system), named
    .OUTPUT.partial-PID-RANDOM: leftovers of a conversion that was killed are recognisable, and
    removable once their process is gone (``modelfiles.remove_stale_partials``)."""
    from ovchat.modelfiles import remove_stale_partials
    import os

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(output.parent, f".{output.name}{_PARTIAL}")
        return Path(tempfile.mkdtemp(prefix=f".{output.name}{_PARTIAL}{os.getpid()}-", dir=output.parent))
    except OSError as e:
        raise ConversionError(f"cannot write beside {output} ({e.strerror}); choose an OUTPUT in a "
                              "writable directory") from None


def _pooling(checkpoint) -> Optional[Dict[str, object]]:
    """How a sentence encoder pools (with its vectors' size); None for a chat model."""
    from ovchat.convert import sentence
    from ovchat.convert.families import family_of

    if checkpoint.kind == "ov" or family_of(checkpoint.config).kind != "embedding":
        return None
    config = checkpoint.config
    if checkpoint.kind == "gguf":
        found = sentence.from_gguf(checkpoint.field, checkpoint.family.gguf, config)
    else:
        found = sentence.from_directory(checkpoint.path, config)
    return {**found.as_dict(), "dimensions": config.get("hidden_size") or config.get("n_embd")}


def _resolve(recipe: "Recipe", checkpoint, progress: ProgressCallback, *, encoder: bool = False) -> "Recipe":
    """The recipe for this source; a quantized GGUF is kept unless a recipe was named, and a
    sentence encoder gets fp16 by default."""
    quantized = checkpoint.kind == "gguf" and checkpoint.is_quantized()
    resolved = recipe.resolve(quantized_source=quantized, source=checkpoint.path, encoder=encoder)
    if resolved.weight_format == "keep":
        checkpoint.keep_quantized = True
        progress(Progress("compress", "keeping the GGUF's own quantization (no second quantization; "
                                      "--weight-format int4 would quantize it again)"))
    elif quantized:
        progress(Progress("compress", f"the GGUF is already quantized: --weight-format {resolved.weight_format} "
                                      "dequantizes it and quantizes it again, which loses accuracy; the "
                                      "default keeps it as it is"))
    return resolved


@dataclasses.dataclass
class _Built:
    """What building left for the later stages."""

    bitwidths: dict
    kept: Dict[str, dict]
    runtime_options: Dict[str, str]
    reference: Callable[[], object]  # builds the float model the receipt compares against


def _build_and_compress(checkpoint, work: Path, recipe: "Recipe", progress: ProgressCallback, *,
                        encoder: bool = False) -> _Built:
    import openvino as ov

    from ovchat.convert.compress import compress, save

    core = ov.Core()
    if checkpoint.kind == "ov":
        _refuse_compressed(checkpoint.xml)
        progress(Progress("read", f"reading {checkpoint.xml}"))
        model = core.read_model(checkpoint.xml)
        reference: Callable[[], object] = lambda: core.read_model(checkpoint.xml)  # noqa: E731
    else:
        from ovchat.convert.models import build_model

        progress(Progress("build", f"building the {checkpoint.architecture} graph"))
        model = build_model(checkpoint, progress=progress)
        reference = lambda: build_model(checkpoint.float_view())  # noqa: E731
        # A Hugging Face model is compressed as built: its Constants share the memory-mapped
        # safetensors, whose pages compress() drops after each NNCF step, so a float IR round
        # trip would only add a full write and read of the weights. The model object holds the
        # arrays its Constants share (build_model): it must live until it is saved below.
        if checkpoint.kind == "gguf" and recipe.weight_format != "keep":
            # Dequantized GGUF weights sit in ordinary memory that nothing can drop while the
            # model holds it: save the float IR, free the graph with its arrays and the GGUF
            # pages read while dequantizing, and compress the IR read back memory-mapped.
            float_xml = work / _FLOAT_DIR / MODEL_XML
            progress(Progress("save", "saving the float model"))
            save(model, float_xml)
            del model
            gc.collect()
            checkpoint.drop_weight_pages()
            model = core.read_model(float_xml)
            reference = lambda: core.read_model(float_xml)  # noqa: E731
    kept = _kept_summary(checkpoint, progress)
    model, bitwidths = compress(model, recipe, progress=progress)
    runtime_options = {}
    if recipe.weight_format == "fp16" and not encoder:  # an encoder has no KV cache
        # As optimum-cli does for fp16 exports: the CPU's default u8 KV cache would cost more
        # accuracy than the weights keep (decode logits off by ~1e-2 instead of ~4e-4).
        runtime_options["KV_CACHE_PRECISION"] = "f16"
    for key, value in runtime_options.items():
        model.set_rt_info(value, ["runtime_options", key])
    progress(Progress("save", "saving the model"))
    save(model, work / MODEL_XML)
    del model
    gc.collect()
    return _Built(bitwidths, kept, runtime_options, reference)


def _kept_summary(checkpoint, progress: ProgressCallback) -> Dict[str, dict]:
    """Per GGUF type, how many tensors kept their form and which; said on progress where a type
    had no exact form (such tensors are stored as f16, which costs size, not accuracy)."""
    summary: Dict[str, dict] = {}
    for name, (qtype, form) in getattr(checkpoint, "forms", {}).items():
        row = summary.setdefault(qtype, {"tensors": 0, "parameters": 0, "form": form})
        row["tensors"] += 1
        row["parameters"] += checkpoint.element_count(name)
    for qtype, row in summary.items():
        if row["form"].startswith("f16"):
            progress(Progress("compress", f"{row['tensors']} {qtype} tensors have no exact compressed form in "
                                          "OpenVINO: stored as f16 (exact to f16 rounding, 2 bytes a weight)"))
    return summary


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
    return (path / TOKENIZER_FILES[0]).is_file() or (path / "tokenizer.json").is_file()


def _write_tokenizer(checkpoint, work: Path, progress: ProgressCallback) -> None:
    from ovchat.convert.tokenizer import convert_tokenizer

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


def _receipt(checkpoint, work: Path, built: _Built, wanted: Optional[bool], progress: ProgressCallback,
             pooling: Optional[Dict[str, object]] = None) -> dict:
    """The accuracy receipt (see ovchat.convert.receipt), or why there is none."""
    from ovchat.convert import receipt

    parameters = checkpoint.parameter_count()
    if wanted is False:
        return {"skipped": "not asked for (--no-receipt)"}
    if wanted is None and not receipt.fits(parameters):
        return {"skipped": f"{parameters / 1e9:.1f}B weights: auto measures models up to "
                           f"{receipt.AUTO_MAX_PARAMETERS / 1e9:.0f}B that fit in memory several times "
                           "(--receipt measures it anyway)"}
    if pooling is not None:
        progress(Progress("receipt", "measuring the accuracy receipt: the converted encoder's vectors against the "
                                     "float weights'"))
        try:
            vectors = receipt.measure_embeddings(work / MODEL_XML, built.reference, work, pooling)
        except (RuntimeError, MemoryError) as e:
            from ovchat.errors import summary

            return {"skipped": f"could not be measured: {summary(e)}"}
        progress(Progress("receipt", f"receipt: cosine similarity {vectors.mean_cosine:.6f} on average, "
                                     f"{vectors.min_cosine:.6f} at worst, against the float weights"))
        return vectors.as_dict()
    progress(Progress("receipt", f"measuring the accuracy receipt: the converted model against the float "
                                 f"weights over {receipt.MAX_TOKENS} tokens of text"))
    try:
        measured = receipt.measure(work / MODEL_XML, built.reference, work)
    except (RuntimeError, MemoryError) as e:
        from ovchat.errors import summary

        return {"skipped": f"could not be measured: {summary(e)}"}
    progress(Progress("receipt", f"receipt: top-1 agreement {100 * measured.top1_agreement:.1f}%, mean KL "
                                 f"divergence {measured.mean_kl:.3g} against the float weights"))
    return measured.as_dict()


def _hash_files(files: List[Path]) -> Dict[str, str]:
    return {str(f): sha256(f) for f in files}


def _write_manifest(work: Path, checkpoint, recipe: "Recipe", built: _Built, measured: dict,
                    hashes: "Future[Dict[str, str]]", started: float, extra: Dict[str, object]) -> None:
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
        "parameters": checkpoint.parameter_count(),
        "recipe": dataclasses.asdict(recipe),
        "bitwidth_distribution": built.bitwidths,
        # GGUF type -> tensors and weights that kept their source form, and that form.
        "kept": built.kept,
        "runtime_options": built.runtime_options,
        "receipt": measured,
        "versions": installed_versions(("openvino", "openvino-genai", "openvino-tokenizers", "nncf", "gguf",
                                        "ovchat")),
        # The output's own files, so that damage to the converted model can be detected later.
        "files": {f.name: {"size": f.stat().st_size, "sha256": digest}
                  for f, digest in zip(outputs, _hash_files(outputs).values())},
        **extra,
    }
    manifest["conversion_seconds"] = round(time.time() - started, 2)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
