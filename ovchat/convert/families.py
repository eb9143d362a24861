"""The one registry of the architectures ovchat converts.

Each ``Family`` says how to recognise a checkpoint of it (Hugging Face ``architectures`` and
``model_type``, GGUF ``general.architecture``), which builder module in ``ovchat.convert.models``
makes its graph, and what llama.cpp's converter did to its tensors that the GGUF reader undoes.
The Hugging Face reader, the GGUF reader, the CLI's help and the README's list all read this
table (tests/test_families.py holds the README to it). No heavy imports: the CLI reads it at
start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ovchat.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """One architecture.

    ``module``: its builder, ``ovchat.convert.models.<module>``. ``architectures``/``model_types``:
    the config.json values that name it. ``gguf``: llama.cpp's ``general.architecture`` (None: no
    GGUF support). ``gguf_names``: per-block GGUF tensor names that differ from the llama
    family's mapping; ``permuted``: llama.cpp permuted the Q/K rows for its interleaved RoPE;
    ``norm_offset``: the GGUF's norms hold 1 + w (Gemma). ``models``: what users know it as.
    ``kind``: ``chat`` (a decoder: LLMPipeline) or ``embedding`` (a sentence encoder: its IR's
    output is every token's state, pooled into one vector by ovchat.embeddings).
    """

    module: str
    architectures: Tuple[str, ...]
    model_types: Tuple[str, ...]
    models: str
    gguf: Optional[str] = None
    gguf_names: Tuple[Tuple[str, str], ...] = ()
    permuted: bool = False
    norm_offset: float = 0.0
    kind: str = "chat"


FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), ("llama",), "Llama 2, 3, 3.1 and 3.2 (llama3 RoPE scaling, tied "
           "embeddings), SmolLM2", gguf="llama", permuted=True),
    Family("mistral", ("MistralForCausalLM",), ("mistral",), "Mistral (sliding window)", gguf="mistral",
           permuted=True),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), "Qwen2, Qwen2.5, Qwen2.5-Coder", gguf="qwen2"),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), "Qwen3 (q/k norms)", gguf="qwen3"),
    # Phi-3 keeps q/k/v fused in attn_qkv and gate/up fused in ffn_up, as its checkpoint does.
    Family("phi3", ("Phi3ForCausalLM",), ("phi3",), "Phi-3 mini/medium (LongRoPE for 128k), Phi-4-mini "
           "(partial rotary)", gguf="phi3", gguf_names=(("ffn_up", "mlp.gate_up_proj"),)),
    Family("gemma3", ("Gemma3ForCausalLM",), ("gemma3", "gemma3_text"), "Gemma 3 text models (270m, 1b)",
           gguf="gemma3", norm_offset=1.0, gguf_names=(
               ("post_attention_norm", "post_attention_layernorm"),
               ("ffn_norm", "pre_feedforward_layernorm"),
               ("post_ffw_norm", "post_feedforward_layernorm"))),
    Family("smollm3", ("SmolLM3ForCausalLM",), ("smollm3",), "SmolLM3 (no RoPE in every fourth layer)",
           gguf="smollm3", permuted=True),
    # Sentence encoders, for embeddings.
    Family("bert", ("BertModel", "BertForMaskedLM", "BertForPreTraining"), ("bert",),
           "BERT encoders (all-MiniLM, bge, e5, gte-base)", gguf="bert", kind="embedding"),
    Family("mpnet", ("MPNetModel", "MPNetForMaskedLM"), ("mpnet",), "MPNet encoders (all-mpnet-base-v2)",
           kind="embedding"),
    Family("nomic_bert", ("NomicBertModel", "NomicBertForMaskedLM"), ("nomic_bert",),
           "nomic-bert (nomic-embed-text)", gguf="nomic-bert", kind="embedding"),
)

_BY_ARCHITECTURE: Dict[str, Family] = {a: f for f in FAMILIES for a in f.architectures}
_BY_MODEL_TYPE: Dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
BY_GGUF: Dict[str, Family] = {f.gguf: f for f in FAMILIES if f.gguf}


def family_of(config: dict, *, where: str = "") -> Family:
    """The family of a Hugging Face config (its ``architectures``, else its ``model_type``), or
    UnsupportedArchitectureError naming what is supported."""
    architectures = config.get("architectures") or []
    if architectures and architectures[0] in _BY_ARCHITECTURE:
        return _BY_ARCHITECTURE[architectures[0]]
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    found = architectures[0] if architectures else model_type
    raise UnsupportedArchitectureError(
        f"{where + ': ' if where else ''}architecture {found or 'unknown (config.json names none)'} is not "
        f"supported; ovchat converts {', '.join(a for f in FAMILIES for a in f.architectures)}")


def gguf_family(arch: str, *, where: str = "") -> Family:
    if arch not in BY_GGUF:
        raise UnsupportedArchitectureError(
            f"{where + ' has ' if where else ''}GGUF architecture {arch!r}; ovchat converts "
            f"{', '.join(sorted(BY_GGUF))}")
    return BY_GGUF[arch]


def summary() -> str:
    """The families in one line, for help texts: 'llama, mistral, ..., smollm3'."""
    return ", ".join(f.module for f in FAMILIES)
