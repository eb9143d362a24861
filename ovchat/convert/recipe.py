"""How to store a model's weights: the recipe, checked, and how it is described (no heavy imports,
so `ovchat list` can describe a store entry's recipe without loading OpenVINO or NNCF).

The recipe for float sources is the mission's (``optimum-cli export openvino --weight-format int4
--sym --group-size 128 --ratio 0.6``). A source that is already quantized (a GGUF in Q4_K_M, say)
keeps its own quantization by default (``keep``): quantizing it again would only lose accuracy; a
recipe named explicitly still applies, as llama.cpp's ``llama-quantize --allow-requantize`` would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

from ovchat.errors import OptionError

WEIGHT_FORMATS = ("auto", "keep", "int4", "int8", "fp16")
GROUP_SIZE_FALLBACKS = ("adjust", "ignore", "error")
TARGETS = ("any", "NPU")


@dataclass(frozen=True)
class Recipe:
    """How to store the weights. ``group_size`` and ``ratio`` apply to int4 only; ``group_size``
    -1 means one group per output channel.

    ``weight_format``: ``auto`` (the default) is ``keep`` for an already-quantized GGUF and
    ``int4`` for everything else; ``keep`` holds a quantized GGUF's blocks exactly as they are;
    ``int4``, ``int8`` and ``fp16`` are NNCF's recipes (applied after dequantizing a quantized
    source). ``resolve`` turns ``auto`` into one of the others once the source is known.
    """

    weight_format: str = "auto"
    sym: bool = True
    group_size: int = 128
    ratio: float = 0.6
    group_size_fallback: str = "adjust"
    # "NPU": the layout the NPU plugin compiles (int4 symmetric, every layer it can, one group per
    # channel by default: OpenVINO's NPU guide); recorded so that `--device auto` picks the NPU.
    target: str = "any"

    def __post_init__(self):
        if self.weight_format not in WEIGHT_FORMATS:
            raise OptionError(f"weight format {self.weight_format!r} is unknown; use one of {', '.join(WEIGHT_FORMATS)}")
        if not isinstance(self.sym, bool):
            raise OptionError(f"sym must be true or false, not {self.sym!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or \
                not (self.group_size == -1 or self.group_size > 0):
            raise OptionError(f"group size {self.group_size!r} is invalid; use a positive integer such as 128, "
                              "or -1 for per-channel")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio <= 1:
            raise OptionError(f"ratio {self.ratio!r} is invalid; use a number in [0, 1], e.g. 0.6")
        if self.target not in TARGETS:
            raise OptionError(f"target {self.target!r} is unknown; use one of {', '.join(TARGETS)}")
        if self.target == "NPU" and (self.weight_format in ("keep", "auto") or
                                     (self.weight_format == "int4" and not self.sym)):
            raise OptionError("the NPU needs symmetric int4 (or int8, fp16): its compiler does not take a GGUF's "
                              "own blocks or asymmetric int4")
        if self.group_size_fallback not in GROUP_SIZE_FALLBACKS:
            raise OptionError(f"group size fallback {self.group_size_fallback!r} is unknown; use one of "
                              f"{', '.join(GROUP_SIZE_FALLBACKS)}")

    def resolve(self, *, quantized_source: bool, source: object = "the source", encoder: bool = False) -> "Recipe":
        """The recipe that applies to a source: ``auto`` decided, ``keep`` checked. A sentence
        encoder (``encoder``) gets fp16 by ``auto``: it is small, and its vectors are compared
        by cosine, which 4-bit weights would blur."""
        if self.weight_format == "auto":
            float_default = "fp16" if encoder else "int4"
            return dataclasses.replace(self, weight_format="keep" if quantized_source else float_default)
        if self.weight_format == "keep" and not quantized_source:
            raise OptionError(f"{source} is not quantized, so there is no quantization to keep; use "
                              "--weight-format auto (int4) or int4, int8 or fp16")
        return self

    @property
    def mode(self) -> str:
        """NNCF's name of the primary mode, e.g. ``int4_sym``; ``fp16`` for no compression."""
        if self.weight_format in ("fp16", "keep", "auto"):
            return self.weight_format
        return f"{self.weight_format}_{'sym' if self.sym else 'asym'}"

    def describe(self) -> str:
        text = self._describe()
        return text + ", for the NPU" if self.target == "NPU" else text

    def _describe(self) -> str:
        if self.weight_format == "int4":
            return (f"int4 {'sym' if self.sym else 'asym'}, group size {self.group_size}, ratio {self.ratio:g}, "
                    f"int8_asym backup, group-size fallback {self.group_size_fallback}")
        if self.weight_format == "keep":
            return "keep the source's own quantization (no second quantization)"
        if self.weight_format == "auto":
            return ("auto: a quantized GGUF keeps its own quantization, anything else gets int4 sym, group size "
                    f"{self.group_size}, ratio {self.ratio:g}")
        return self.mode


def short_label(recipe: Mapping[str, object], kept: Optional[Mapping[str, object]] = None) -> str:
    """A manifest's recipe in a few characters: 'int4_sym g128 r0.6', 'int8_asym', 'fp16', 'kept Q4_1+Q8_0'."""
    fmt = recipe.get("weight_format", "?")
    if fmt == "fp16":
        return "fp16"
    if fmt == "keep":
        return "kept " + "+".join(sorted(kept)) if kept else "kept"
    text = f"{fmt}_{'sym' if recipe.get('sym') else 'asym'}"
    if fmt == "int4":
        text += f" g{recipe.get('group_size')} r{recipe.get('ratio')}"
    return text + " npu" if recipe.get("target") == "NPU" else text
