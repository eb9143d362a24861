"""One module per architecture; ``build_model`` picks it from the checkpoint's config."""

from __future__ import annotations

from importlib import import_module

import openvino as ov

from ovchat.errors import UnsupportedArchitectureError
from ovchat.progress import ProgressCallback, ignore

# config.json "architectures"[0] and "model_type" -> module of this package
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "SmolLM3ForCausalLM": "smollm3",
    "Gemma3ForCausalLM": "gemma3",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "smollm3": "smollm3", "gemma3": "gemma3", "gemma3_text": "gemma3"}


def module_name(config: dict) -> str:
    """The builder module for a config, or UnsupportedArchitectureError naming what is supported."""
    architectures = config.get("architectures") or []
    if architectures and architectures[0] in ARCHITECTURES:
        return ARCHITECTURES[architectures[0]]
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    found = architectures[0] if architectures else model_type
    raise UnsupportedArchitectureError(
        f"architecture {found or 'unknown (config.json names none)'} is not supported; supported: "
        f"{', '.join(ARCHITECTURES)}")


def build_model(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    """The float, stateful OpenVINO model of ``checkpoint`` (see ovchat.convert.graph).

    Its Constants share the checkpoint's (memory-mapped) arrays without owning them; the returned
    Python object holds them. Keep it alive while the model, or anything compiled from it, is
    used (``convert`` keeps it until the compressed model is saved; saving it and reading the IR
    back, as ``convert`` does for GGUF sources, ends that dependence).
    """
    module = import_module(f"{__name__}.{module_name(checkpoint.config)}")
    return module.build(checkpoint, progress=progress)
