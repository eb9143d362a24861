"""Weight compression with NNCF, as a Recipe (ovchat.convert.recipe) says, and the bitwidth table.

Without a dataset NNCF keeps embeddings and the last MatMul in the backup precision (int8_asym)
and puts ``ratio`` of the remaining weights, by parameter count, in int4, choosing layers by
weight quantization error. A kept GGUF's weights arrive already compressed and are only counted.

NNCF normally prints its progress bars and tables to stdout; a library must not, so for the
duration of ``compress`` its progress bars are routed to the progress callback and its log
records to this module's logger.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import openvino as ov

from ovchat import pages
from ovchat.convert.recipe import Recipe
from ovchat.errors import OptionError
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)

def compress(model: ov.Model, recipe: Recipe, *, progress: ProgressCallback = ignore) -> Tuple[ov.Model, dict]:
    """Compress ``model``'s weights in place as ``recipe`` says.

    Returns the model and its bitwidth distribution (see ``bitwidth_distribution``). With
    ``fp16`` nothing is quantized: bf16 and f32 weights become f16 here. Every other float
    constant keeps its precision: the model is to be saved with ``compress_to_fp16=False``
    (see ``save``), since openvino's default would round RoPE's frequency table, norm scales and
    epsilons to f16 as well, an error that grows with the position.
    """
    recipe = recipe.resolve(quantized_source=recipe.weight_format == "keep")  # auto, on float weights: int4
    if recipe.weight_format == "keep":
        # Nothing to compress: a kept GGUF's weights arrive compressed (ovchat.convert.quants).
        return model, bitwidth_distribution(model)
    mapped = _MappedWeights(model)
    if recipe.weight_format == "fp16":
        _weights_to_f16(model, after_each=mapped.release)
        return model, bitwidth_distribution(model, float_as="fp16")

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    kwargs = {}
    if recipe.weight_format == "int4":
        mode = nncf.CompressWeightsMode.INT4_SYM if recipe.sym else nncf.CompressWeightsMode.INT4_ASYM
        kwargs = dict(group_size=recipe.group_size, ratio=recipe.ratio, backup_mode=nncf.BackupMode.INT8_ASYM,
                      advanced_parameters=AdvancedCompressionParameters(
                          group_size_fallback_mode=GroupSizeFallbackMode(recipe.group_size_fallback)))
    else:
        mode = nncf.CompressWeightsMode.INT8_SYM if recipe.sym else nncf.CompressWeightsMode.INT8_ASYM
    progress(Progress("compress", f"compressing weights: {recipe.describe()}"))
    with _nncf_quiet(progress, after_step=mapped.release):
        try:
            compressed = nncf.compress_weights(model, mode=mode, **kwargs)
        except nncf.InvalidGroupSizeError:
            raise OptionError(
                f"group size {recipe.group_size} does not divide the input size of some layers; pass "
                "--group-size-fallback adjust (or ignore), or a smaller --group-size") from None
    mapped.release()
    if compressed is not model and hasattr(model, "_ovchat_shared_arrays"):
        # A built model holds the arrays its Constants share (graph.model); so must its successor.
        compressed._ovchat_shared_arrays = model._ovchat_shared_arrays
    model = compressed
    distribution = bitwidth_distribution(model)
    _report_fallback(distribution, recipe, progress)
    for label, row in distribution.items():
        log.info("%s: %.1f%% of the weights (%d layers)", label, row["parameters_percent"], row["layers"])
    return model, distribution


def _report_fallback(distribution: Dict[str, dict], recipe: Recipe, progress: ProgressCallback) -> None:
    """Say which layers the group-size fallback touched: it changes size and accuracy."""
    if recipe.weight_format != "int4":
        return
    wanted = f"{recipe.mode}, group size {recipe.group_size}"
    for label, row in distribution.items():
        if label.startswith("int4") and label != wanted:
            progress(Progress("compress", f"{row['layers']} layers' input size is not a multiple of "
                                          f"{recipe.group_size}: they use {label} (--group-size-fallback adjust)"))
        elif label == "float":
            progress(Progress("compress", f"{row['layers']} layers kept in float: their input size is not a "
                                          f"multiple of {recipe.group_size} (--group-size-fallback ignore)"))


# --- the bitwidth table ---------------------------------------------------------------------------

_QUANTIZED = {"u4": "int4_asym", "i4": "int4_sym", "u8": "int8_asym", "i8": "int8_sym"}
_FLOAT_NAMES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
# The ops between a weight Constant and the MatMul/Gather using it: NNCF's decompression
# (Convert, Subtract zero point, Multiply scale, Reshape groups) or our own Convert.
_DECOMPRESSION = {"Convert", "Subtract", "Multiply", "Reshape"}


def bitwidth_distribution(model: ov.Model, *, float_as: Optional[str] = None) -> Dict[str, dict]:
    """Per storage mode, the share of weights, as NNCF's "bitwidth distribution" table shows it.

    Keys are NNCF's row labels (``"int4_sym, group size 128"``, ``"int8_asym, per-channel"``,
    ``"float"``); values ``{"parameters_percent", "layers", "ratio_defining_parameters_percent",
    "ratio_defining_layers"}``. A weight counts once even when shared (tied embeddings).
    Embeddings, the layer producing the logits and weights left in float are not ratio-defining.
    ``float_as`` names the float rows instead and keeps them ratio-defining (fp16, where nothing
    is quantized).
    """
    last = _logits_producer(model)
    weights: Dict[str, List] = {}  # constant name -> [label, size, ratio_defining]
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "MatMul":
            port = 1
        elif kind == "Gather":
            port = 0
        else:
            continue
        const = _weight_constant(op.input_value(port))
        if const is None:
            continue
        shape = list(const.get_output_shape(0))
        mode = _QUANTIZED.get(const.get_element_type().get_type_name())
        if mode is None:
            label, ratio_defining = float_as or "float", float_as is not None
        else:
            label = f"{mode}, group size {shape[-1]}" if len(shape) == 3 else f"{mode}, per-channel"
            ratio_defining = True
        ratio_defining = ratio_defining and kind == "MatMul" and op.get_friendly_name() != last
        key = const.get_friendly_name()
        if key in weights:
            weights[key][2] = weights[key][2] and ratio_defining
        else:
            weights[key] = [label, int(np.prod(shape)), ratio_defining]

    total = sum(size for _, size, _ in weights.values()) or 1
    total_rd = sum(size for _, size, rd in weights.values() if rd) or 1
    out: Dict[str, dict] = {}
    for label, size, rd in weights.values():
        row = out.setdefault(label, {"parameters": 0, "layers": 0, "ratio_defining_parameters": 0,
                                     "ratio_defining_layers": 0})
        row["parameters"] += size
        row["layers"] += 1
        if rd:
            row["ratio_defining_parameters"] += size
            row["ratio_defining_layers"] += 1
    for row in out.values():
        row["parameters_percent"] = round(100 * row.pop("parameters") / total, 1)
        row["ratio_defining_parameters_percent"] = round(100 * row.pop("ratio_defining_parameters") / total_rd, 1)
    # Float first, then from the widest to the narrowest, as NNCF lists the rows.
    return dict(sorted(out.items(), key=lambda kv: (kv[0].startswith("int"), kv[0].startswith("int4"), kv[0])))


def _weight_constant(value: ov.Output) -> Optional[ov.Node]:
    """The Constant a weight input comes from, or None if the input is computed at run time."""
    node = value.get_node()
    while node.get_type_name() in _DECOMPRESSION:
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant" or len(node.get_output_shape(0)) < 2:
        return None
    type_name = node.get_element_type().get_type_name()
    return node if type_name in _QUANTIZED or type_name in _FLOAT_NAMES else None


def _logits_producer(model: ov.Model) -> str:
    for out in model.outputs:
        if "logits" in out.get_names():
            return out.get_node().input_value(0).get_node().get_friendly_name()
    return model.output(0).get_node().input_value(0).get_node().get_friendly_name()


# --- fp16 -----------------------------------------------------------------------------------------

def _weights_to_f16(model: ov.Model, after_each: Callable[[], None]) -> None:
    """Store the weights in f16: every bf16 Constant, and the f32 Constants that are weights
    (those a MatMul or Gather reads). Values beyond f16's range are clipped.

    Small f32 constants (RoPE's inverse frequencies, Gemma's 1 + w norm scales, epsilons) stay
    f32: in f16, 0.649381... becomes 0.6494140625, and a frequency that is off by 1e-4 turns
    every key 2,000 positions away by a fifth of a radian."""
    import openvino.opset13 as ops

    f16_max = float(np.finfo(np.float16).max)
    weights = {c.get_name() for c in _weight_constants(model) if c.get_element_type() == ov.Type.f32}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        if op.get_element_type() == ov.Type.bf16:
            # get_data() shows bf16 bits as float16; they are bfloat16 bits, the top half of a float32.
            bits = op.get_data().view(np.uint16)
            values = (bits.astype(np.uint32) << 16).view(np.float32)
        elif op.get_name() in weights:
            values = op.get_data()
        else:
            continue
        f16 = ops.constant(np.clip(values, -f16_max, f16_max).astype(np.float16))
        f16.set_friendly_name(op.get_friendly_name())
        f16.output(0).set_names(op.output(0).get_names())
        # A bf16 weight already reaches its consumer through a Convert to f32; an f32 one needs one.
        op.output(0).replace(f16.output(0) if op.get_name() not in weights else ops.convert(f16, ov.Type.f32).output(0))
        after_each()
    model.validate_nodes_and_infer_types()


def _weight_constants(model: ov.Model) -> List[ov.Node]:
    """The Constants that MatMul and Gather ops read as weights (each once, by unique name)."""
    found: Dict[str, ov.Node] = {}
    for op in model.get_ordered_ops():
        port = {"MatMul": 1, "Gather": 0}.get(op.get_type_name())
        const = _weight_constant(op.input_value(port)) if port is not None else None
        if const is not None:
            found.setdefault(const.get_name(), const)
    return list(found.values())


def save(model: ov.Model, path) -> None:
    """Write the IR with every constant in the precision it has here (``compress`` chose the
    weights' storage; nothing else may be rounded to f16 behind its back)."""
    ov.save_model(model, path, compress_to_fp16=False)


# --- memory ---------------------------------------------------------------------------------------

class _MappedWeights:
    """The float weights that are memory-mapped read-only from a file (an IR read back from disk,
    or a checkpoint's safetensors), so that their pages can be dropped as NNCF goes.

    NNCF reads every float weight twice (sensitivity, then compression); each page it touched
    would stay in the resident set next to the compressed weights (see ovchat.pages), so a 7.6 GB
    checkpoint would show up whole. Only weights inside read-only file mappings are tracked.
    """

    _MIN_BYTES = 1 << 20

    def __init__(self, model: ov.Model):
        self._ranges: List[Tuple[int, int]] = []
        # Each array's base is its Constant, which holds the mapping: while they are held here no
        # range can be unmapped and reused for other memory, which DONTNEED would wipe.
        self._held: List[np.ndarray] = []
        self._madvise = pages.madvise()
        if self._madvise is None:
            return
        maps = [(start, start + length) for start, length in pages.read_only_mappings()]
        for op in model.get_ordered_ops():
            if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() not in _FLOAT_NAMES:
                continue
            data = op.get_data()
            start, end = data.ctypes.data, data.ctypes.data + data.nbytes
            if data.nbytes < self._MIN_BYTES or not any(lo <= start and end <= hi for lo, hi in maps):
                continue
            start, length = pages.inner_pages(start, end)
            if length:
                self._ranges.append((start, length))
                self._held.append(data)

    def release(self) -> None:
        if self._madvise is not None:
            pages.drop_ranges(self._ranges, self._madvise)


# --- keeping NNCF off stdout ----------------------------------------------------------------------

class _Forward(logging.Handler):
    """Re-emits NNCF's records through ovchat's logger, so the application decides about them."""

    def emit(self, record: logging.LogRecord) -> None:
        # NNCF's info lines (its own copy of the table) are detail next to ours.
        level = logging.DEBUG if record.levelno <= logging.INFO else record.levelno
        log.log(level, "nncf: %s", record.getMessage())


class _Track:
    """Stands in for NNCF's rich progress bar (nncf.common.logging.track_progress.track)."""

    progress: ProgressCallback = ignore
    after_step: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, sequence=None, description: str = "", total=None, weights=None, **_):
        self.sequence, self.description, self.weights = sequence, description, weights
        if weights is not None:
            total = sum(weights)
        elif total is None and hasattr(sequence, "__len__"):
            total = len(sequence)
        self.total = int(total) if total else None
        self.done = 0

    def __iter__(self):
        for i, item in enumerate(self.sequence):
            yield item
            self.update(self.weights[i] if self.weights is not None else 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, advance=1, **_):
        self.done += advance
        self.after_step()
        self.progress(Progress("compress", self.description.strip(), int(self.done), self.total))


@contextlib.contextmanager
def _nncf_quiet(progress: ProgressCallback, after_step: Callable[[], None]) -> Iterator[None]:
    import nncf.quantization.algorithms.weight_compression.algorithm as algorithm
    import nncf.quantization.algorithms.weight_compression.mixed_precision as mixed_precision

    nncf_logger = logging.getLogger("nncf")
    handlers = list(nncf_logger.handlers)
    forward = _Forward()
    track = type("Track", (_Track,), {"progress": staticmethod(progress), "after_step": staticmethod(after_step)})
    patched = [m for m in (algorithm, mixed_precision) if hasattr(m, "track")]
    saved = [m.track for m in patched]
    for h in handlers:
        nncf_logger.removeHandler(h)
    nncf_logger.addHandler(forward)
    for m in patched:
        m.track = track
    try:
        yield
    finally:
        for m, original in zip(patched, saved):
            m.track = original
        nncf_logger.removeHandler(forward)
        for h in handlers:
            nncf_logger.addHandler(h)


__all__ = ["Recipe", "compress", "bitwidth_distribution", "save"]
