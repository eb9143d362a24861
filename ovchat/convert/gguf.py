"""GGUF files (llama.cpp's format) seen as Hugging Face checkpoints.

The metadata becomes a Hugging Face config (``gguf_config``), tensor names become Hugging Face
names, and what llama.cpp's converter did to the weights is undone, so the builders see exactly
what they would see in the Hugging Face checkpoint:

- llama-family Q and K rows are permuted for llama.cpp's interleaved RoPE (``unpermute_rows``);
- Gemma's RMSNorm weights are stored with the 1 that Gemma adds at run time already added.

Tensors come back in one of two forms. By default a quantized tensor is dequantized to float16
(its values are an f16 scale times small integers, so f16 holds them to within its rounding).
With ``keep_quantized`` it comes back as a ``QuantizedWeight`` holding the file's own blocks
(see ``ovchat.convert.quants``), so that the converted model has the very same weights and none
is quantized twice. Every type the ``gguf`` package can dequantize is read; the file itself is
read with ``ovchat.gguffile`` (the ``gguf`` package's own reader takes 25 s over a 262k vocabulary).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ovchat import pages
from ovchat.ggufcheck import container_problem
from ovchat.gguffile import FormatError, GGUFFile, TensorInfo
from ovchat.convert.checkpoint import Checkpoint
from ovchat.convert.families import BY_GGUF, Family, gguf_family
from ovchat.convert.tensors import QuantizedWeight, Weight
from ovchat.errors import CheckpointError

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


# Per-block GGUF tensor name -> Hugging Face name, as llama.cpp's converter writes the llama family.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# The sentence encoders llama.cpp converts, block and top names (as gguf-py's tensor map has them).
_ENCODER_NAMES = {
    "bert": ({"attn_q": "attention.self.query", "attn_k": "attention.self.key", "attn_v": "attention.self.value",
              "attn_output": "attention.output.dense", "attn_output_norm": "attention.output.LayerNorm",
              "ffn_up": "intermediate.dense", "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm"},
             "encoder.layer",
             {"token_embd": "embeddings.word_embeddings", "position_embd": "embeddings.position_embeddings",
              "token_types": "embeddings.token_type_embeddings", "token_embd_norm": "embeddings.LayerNorm"}),
    "nomic-bert": ({"attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj", "attn_output_norm": "norm1",
                    "ffn_up": "mlp.fc11", "ffn_gate": "mlp.fc12", "ffn_down": "mlp.fc2", "layer_output_norm": "norm2"},
                   "encoder.layers",
                   {"token_embd": "embeddings.word_embeddings", "token_types": "embeddings.token_type_embeddings",
                    "token_embd_norm": "emb_ln"}),
}

# Tensors llama.cpp adds that have no Hugging Face counterpart; their content goes into config.
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def readable_types() -> Tuple[str, ...]:
    """Every tensor type the installed ``gguf`` package dequantizes (so ovchat reads)."""
    import gguf

    quantized = (t.name for t in gguf.GGMLQuantizationType if hasattr(gguf.quants, t.name))
    return tuple(dict.fromkeys((*FLOAT_TYPES, *quantized)))


def gguf_to_hf_name(name: str, arch: str) -> Optional[str]:
    """The Hugging Face name of a GGUF tensor, or None where there is none."""
    if arch in _ENCODER_NAMES:
        block_names, layers, top = _ENCODER_NAMES[arch]
        m = _BLOCK_RE.match(name)
        if m:
            part = block_names.get(m.group(2))
            return None if part is None else f"{layers}.{m.group(1)}.{part}.{m.group(3)}"
        stem, _, kind = name.rpartition(".")
        return f"{top[stem]}.{kind}" if stem in top else None
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        hf = dict(_BLOCK_NAMES, **dict(BY_GGUF[arch].gguf_names)).get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
    stem, _, kind = name.rpartition(".")
    hf = _TOP_NAMES.get(stem)
    return f"{hf}.{kind}" if hf else None


def unpermute_order(rows: int, n_head: int) -> np.ndarray:
    """The row order that undoes llama.cpp's Q/K permutation.

    convert_hf_to_gguf interleaves the two rotary halves of each head (row i of the first half
    and row i of the second become rows 2i and 2i+1) for its interleaved RoPE; ovchat's graph
    uses rotate-half RoPE as Hugging Face does, so the halves are put back.
    """
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    return w[unpermute_order(w.shape[0], n_head)]


@dataclass(frozen=True)
class _Tensor:
    """Where a tensor lies in the file and what it is."""

    info: TensorInfo
    qtype: str  # the gguf package's name of its type: F32, Q4_K...
    n_bytes: int

    @property
    def shape(self) -> Tuple[int, ...]:
        """Hugging Face order: [rows, cols] (GGUF lists the fastest dimension first)."""
        return tuple(reversed(self.info.dims))


class GGUFCheckpoint(Checkpoint):
    kind = "gguf"
    _missing = "the GGUF file; use a complete GGUF"

    def __init__(self, path: Path, file: GGUFFile, family: Family, config: dict, generation_config: dict,
                 tensors: Dict[str, _Tensor], keep_quantized: bool):
        super().__init__(path, config, generation_config, [path], tensors)  # name -> _Tensor
        self.file = file
        self.family = family
        self.keep_quantized = keep_quantized
        # What became of each quantized tensor read with keep_quantized: its GGUF type and form.
        self.forms: Dict[str, Tuple[str, str]] = {}

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name).shape

    def element_count(self, name: str) -> int:
        """How many values tensor ``name`` holds, without reading it."""
        return self._entry(name).info.n_elements

    def parameter_count(self) -> int:
        return sum(t.info.n_elements for t in self._index.values())

    def tensor_type(self, name: str) -> str:
        return self._entry(name).qtype

    def is_quantized(self) -> bool:
        """Whether any matrix is stored in a quantized type (norms are always float)."""
        return any(t.qtype not in FLOAT_TYPES and len(t.info.dims) == 2 for t in self._index.values())

    def float_view(self) -> "GGUFCheckpoint":
        """The same file, read with every weight dequantized (it shares the open file)."""
        if not self.keep_quantized:
            return self
        return GGUFCheckpoint(self.path, self.file, self.family, self.config, self.generation_config, self._index,
                              keep_quantized=False)

    def field(self, key: str, default=None):
        """A GGUF metadata value (arrays as lists), or ``default``."""
        return self.file.field(key, default)

    def drop_weight_pages(self) -> None:
        """Take the pages of the file read so far out of this process's resident set.

        Every page of the mapped file read while dequantizing stays resident until the mapping is
        unmapped (see ovchat.pages). A later read (the tokenizer's metadata) faults it in again.
        """
        pages.drop_mmap(self.file.mapping)

    def get(self, name: str) -> "Weight | QuantizedWeight":
        import gguf

        t = self._entry(name)
        raw = self.file.data(t.info, t.n_bytes)
        shape = t.shape
        if t.qtype == "F32":
            w: "Weight | QuantizedWeight" = Weight(raw.view(np.float32).reshape(shape), "f32")
        elif t.qtype == "F16":
            w = Weight(raw.view(np.float16).reshape(shape), "f16")
        elif t.qtype == "BF16":
            w = Weight(raw.view(np.uint16).reshape(shape), "bf16")
        else:
            kept = None
            if self.keep_quantized and len(shape) == 2:
                from ovchat.convert.quants import exact_form

                kept = exact_form(raw, t.qtype, shape)
                self.forms[name] = (t.qtype, kept.describe() if kept is not None else "f16 (no exact form)")
            # Block scales are f16 in every type, so f16 holds the dequantized values to within f16
            # rounding at half the memory of f32 (a 3.8B model: 7.6 GB, not 15).
            w = kept if kept is not None else Weight(
                gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[t.qtype]).reshape(shape)
                .astype(np.float16), "f16")
        return self._as_hf(name, w)

    def _as_hf(self, name: str, w: "Weight | QuantizedWeight") -> "Weight | QuantizedWeight":
        """Undo what llama.cpp's converter did to this tensor."""
        if self.family.permuted:
            for proj, heads in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
                if name.endswith((f"self_attn.{proj}.weight", f"self_attn.{proj}.bias")):
                    return w.reorder_rows(unpermute_order(w.shape[0], self.config[heads]))
        if self.family.norm_offset and name.endswith("norm.weight") and isinstance(w, Weight):
            w = Weight((w.to_float32().astype(np.float64) - self.family.norm_offset).astype(np.float32), "f32")
        return w


def _llama3_rope_scaling(freqs: np.ndarray, head_dim: int, theta: float) -> Optional[dict]:
    """Recover Llama 3.1's rope_scaling from llama.cpp's precomputed rope_freqs tensor.

    llama.cpp stores only the per-frequency divisors; the Hugging Face parameters are found by
    checking the ones every Llama 3.x release uses, and None is returned if they do not match.
    """
    factor = float(freqs.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
        low_wavelen, high_wavelen = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        expect = np.where(wavelen < high_wavelen, 1.0,
                          np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == freqs.shape and np.allclose(expect, freqs, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    return None


def _f32(v) -> float:
    """A GGUF float32 as the decimal Hugging Face wrote (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def gguf_config(path: Path, fields: Callable[[str, object], object], arch: str,
                tensors: Dict[str, "_Tensor"], raw: Dict[str, np.ndarray]) -> dict:
    """The Hugging Face config.json equivalent of a GGUF file's metadata."""
    def key(k, default=None):
        return fields(f"{arch}.{k}", default)

    family = BY_GGUF[arch]
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    layers = key("block_count")
    if not hidden or not heads or not layers:
        raise CheckpointError(f"{path} lacks {arch}.embedding_length/attention.head_count/block_count "
                              "metadata; use a GGUF written by a recent llama.cpp")
    if isinstance(heads, list):
        raise CheckpointError(f"{path} has per-layer head counts, which ovchat does not support")
    kv_heads = key("attention.head_count_kv", heads)
    head_dim = key("attention.key_length", hidden // heads)
    tokens = fields("tokenizer.ggml.tokens", None)
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "model.embed_tokens.weight" in tensors:
        vocab = int(tensors["model.embed_tokens.weight"].shape[0])
    theta = _f32(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [family.architectures[0]],
        "model_type": family.model_types[0],
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length", 0)),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": None,
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(vocab) if vocab else None,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "sliding_window": key("attention.sliding_window"),
        "torch_dtype": "float16",
    }
    if arch == "phi3" and not config["intermediate_size"] and "model.layers.0.mlp.gate_up_proj.weight" in tensors:
        config["intermediate_size"] = int(tensors["model.layers.0.mlp.gate_up_proj.weight"].shape[0]) // 2
    rot = key("rope.dimension_count")
    if rot and int(rot) != config["head_dim"]:
        config["partial_rotary_factor"] = int(rot) / config["head_dim"]
    scaling = key("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": _f32(key("rope.scaling.factor", 1.0))}
        original = key("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{path} uses rope scaling {scaling!r}, which ovchat does not support; "
                              "convert the Hugging Face checkpoint instead")
    if "rope_freqs.weight" in raw:
        freqs = raw["rope_freqs.weight"]
        recovered = _llama3_rope_scaling(freqs, int(rot or head_dim), theta)
        if recovered is None:
            raise CheckpointError(f"{path} has a rope_freqs table that matches no known Llama 3 rope "
                                  "scaling; convert the Hugging Face checkpoint instead")
        config["rope_scaling"] = recovered
    if "rope_factors_long.weight" in raw:
        original = key("rope.scaling.original_context_length") or config["max_position_embeddings"]
        config["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": [float(x) for x in raw["rope_factors_long.weight"]],
            "short_factor": [float(x) for x in raw["rope_factors_short.weight"]],
        }
        config["original_max_position_embeddings"] = int(original)
    _FAMILY_CONFIG.get(arch, lambda c, k: None)(config, key)
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        v = fields(f"tokenizer.ggml.{gguf_key}", None)
        if v is not None:
            config[hf_key] = int(v)
    return config


def _gemma3_config(config: dict, key: Callable) -> None:
    """What llama.cpp keeps in code rather than in a Gemma 3 file's metadata: every sixth layer
    attends globally (the others within the sliding window, with RoPE base 10000), and queries
    are scaled by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) in the 27B model, 62 layers)."""
    n = config["num_hidden_layers"]
    config["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    config["rope_local_base_freq"] = 10000.0
    config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"] if n == 62
                                       else config["head_dim"])
    config["hidden_activation"] = "gelu_pytorch_tanh"
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        value = key(name)
        config[name] = _f32(value) if value else None


def _smollm3_config(config: dict, key: Callable) -> None:
    """SmolLM3 skips RoPE in every fourth layer; llama.cpp keeps that in code, not metadata."""
    config["no_rope_layers"] = [0 if (i + 1) % 4 == 0 else 1 for i in range(config["num_hidden_layers"])]


_FAMILY_CONFIG: Dict[str, Callable[[dict, Callable], None]] = {"gemma3": _gemma3_config,
                                                               "smollm3": _smollm3_config}


def _encoder_config(path: Path, fields: Callable, arch: str, family: Family, tensors: Dict[str, "_Tensor"]) -> dict:
    """The Hugging Face config of a llama.cpp sentence encoder (bert or nomic-bert)."""
    def key(k, default=None):
        return fields(f"{arch}.{k}", default)

    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    if not hidden or not heads or not layers:
        raise CheckpointError(f"{path} lacks {arch}.embedding_length/attention.head_count/block_count "
                              "metadata; use a GGUF written by a recent llama.cpp")
    types = tensors.get("embeddings.token_type_embeddings.weight")
    config = {
        "architectures": [family.architectures[0]], "model_type": family.model_types[0],
        "hidden_size": int(hidden), "num_hidden_layers": int(layers), "num_attention_heads": int(heads),
        "intermediate_size": int(key("feed_forward_length", 4 * int(hidden))),
        "layer_norm_eps": _f32(key("attention.layer_norm_epsilon", 1e-12)),
        "max_position_embeddings": int(key("context_length", 512)),
        "vocab_size": int(tensors["embeddings.word_embeddings.weight"].shape[0]),
        "type_vocab_size": int(types.shape[0]) if types is not None else 2,
        "pad_token_id": int(fields("tokenizer.ggml.padding_token_id", 0)), "torch_dtype": "float16",
    }
    if arch == "nomic-bert":
        config["rope_theta"] = _f32(key("rope.freq_base", 1000.0))
    return config


def gguf_eos_ids(fields: Callable[[str, object], object]) -> List[int]:
    """Every token id at which llama.cpp would stop: eos, end-of-turn and end-of-message."""
    ids: List[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = fields(f"tokenizer.ggml.{k}", None)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def open_gguf(path: Path, *, keep_quantized: bool = False) -> GGUFCheckpoint:
    import gguf

    try:
        file = GGUFFile(path)
    except FormatError as e:
        raise CheckpointError(f"{e}; re-download it") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None
    problem = container_problem(file)
    if problem is not None:
        file.close()
        raise CheckpointError(f"{path} is not a usable GGUF model: {problem}")
    fields = file.field

    arch = fields("general.architecture", None)
    family = gguf_family(arch, where=str(path))

    readable = set(readable_types())
    tensors: Dict[str, _Tensor] = {}
    raw: Dict[str, np.ndarray] = {}
    for info in file.tensors:
        try:
            qtype = gguf.GGMLQuantizationType(info.type_id).name
        except ValueError:
            qtype = f"type {info.type_id}"
        if qtype not in readable:
            raise CheckpointError(f"{path}: tensor {info.name} has type {qtype}, which the gguf package "
                                  f"cannot read; ovchat reads {', '.join(sorted(readable))}")
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        tensor = _Tensor(info, qtype, info.n_elements // block * size)
        end = info.offset + tensor.n_bytes
        if end > file.size:
            raise CheckpointError(f"{path} is truncated: tensor {info.name} ends at byte {end} but the file "
                                  f"has {file.size} bytes; re-download it")
        if info.name in _CONFIG_TENSORS:
            raw[info.name] = file.data(info, tensor.n_bytes).view(np.float32).astype(np.float64)
            continue
        hf = gguf_to_hf_name(info.name, arch)
        if hf is None:
            raise CheckpointError(f"{path}: tensor {info.name} has no Hugging Face counterpart in a {arch} "
                                  "model; this GGUF variant is not supported")
        tensors[hf] = tensor
    if "model.embed_tokens.weight" not in tensors and "embeddings.word_embeddings.weight" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; use a complete GGUF")

    if family.kind == "embedding":
        config = _encoder_config(path, fields, arch, family, tensors)
        return GGUFCheckpoint(path, file, family, config, None, tensors, keep_quantized)
    config = gguf_config(path, fields, arch, tensors, raw)
    generation_config = {"bos_token_id": config.get("bos_token_id"),
                         "eos_token_id": gguf_eos_ids(fields) or config.get("eos_token_id"),
                         "pad_token_id": config.get("pad_token_id")}
    generation_config = {k: v for k, v in generation_config.items() if v not in (None, [])}
    return GGUFCheckpoint(path, file, family, config, generation_config, tensors, keep_quantized)
