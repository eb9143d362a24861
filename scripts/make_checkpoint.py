#!/usr/bin/env python3
"""Write a random-weight checkpoint in Hugging Face layout, without torch.

Library use (tests)::

    from make_checkpoint import write_checkpoint
    write_checkpoint(tmp_path / "m", "phi3", dtype="bf16", shards=2, seed=0, sliding_window=8)

Command line (a full-size checkpoint for memory and speed measurements)::

    python scripts/make_checkpoint.py --arch phi3 --preset phi3-mini-4k /tmp/phi3-random

Tensors are generated and written one at a time, so a 7.6 GB checkpoint needs well under 1 GB
of memory. The directory gets config.json, generation_config.json, *.safetensors (with
model.safetensors.index.json when sharded), tokenizer.json and tokenizer_config.json. The
tokenizer is a synthetic byte-level BPE with the config's vocabulary size: it round-trips any
text, but it is not the real model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

# Tiny defaults per architecture; keyword overrides replace any of them.
TINY = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 8,
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
              "sliding_window": None, "max_window_layers": 2, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 320, "max_position_embeddings": 512,
             "original_max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "rope_scaling": None, "sliding_window": 8, "tie_word_embeddings": False,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    # head_dim 32 is not hidden_size / heads, as in Qwen3-4B and up.
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 320, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
    # Six layers: five local (window 8, RoPE base 10000) and one global, as Gemma 3 interleaves them.
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 320, "max_position_embeddings": 512,
               "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "rope_scaling": None, "sliding_window": 8,
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
               "query_pre_attn_scalar": 32, "final_logit_softcapping": None, "attn_logit_softcapping": None,
               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "smollm3": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
                "rms_norm_eps": 1e-6, "rope_theta": 5000000.0, "no_rope_layers": [1, 1, 1, 0],
                "no_rope_layer_interval": 4, "use_sliding_window": False, "sliding_window": None,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
}
# Norms that multiply by (1 + weight): their weights are small and centred on 0.
_OFFSET_NORMS = ("gemma3",)

# microsoft/Phi-3-mini-4k-instruct's config.json (the fields that shape the model).
PRESETS = {
    "phi3-mini-4k": ("phi3", {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000,
        "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064}),
}

_ST_DTYPE = {"f32": ("F32", np.float32), "f16": ("F16", np.float16), "bf16": ("BF16", np.uint16)}
_SPECIAL = ["<unk>", "<s>", "</s>"]


def tensor_shapes(arch: str, config: dict) -> List[Tuple[str, Tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor; kind is "norm", "bias" or "matrix"."""
    h, n_layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    norm = "offset_norm" if arch in _OFFSET_NORMS else "norm"
    out = [("model.embed_tokens.weight", (config["vocab_size"], h), "matrix")]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", (h,), norm))
        if arch == "phi3":
            out.append((f"{p}.self_attn.qkv_proj.weight", (q + 2 * kv, h), "matrix"))
        else:
            out += [(f"{p}.self_attn.q_proj.weight", (q, h), "matrix"),
                    (f"{p}.self_attn.k_proj.weight", (kv, h), "matrix"),
                    (f"{p}.self_attn.v_proj.weight", (kv, h), "matrix")]
            if arch == "qwen2" or config.get("attention_bias"):
                out += [(f"{p}.self_attn.q_proj.bias", (q,), "bias"),
                        (f"{p}.self_attn.k_proj.bias", (kv,), "bias"),
                        (f"{p}.self_attn.v_proj.bias", (kv,), "bias")]
        if arch in ("qwen3", "gemma3"):
            out += [(f"{p}.self_attn.q_norm.weight", (head_dim,), norm),
                    (f"{p}.self_attn.k_norm.weight", (head_dim,), norm)]
        out.append((f"{p}.self_attn.o_proj.weight", (h, q), "matrix"))
        if arch != "qwen2" and config.get("attention_bias"):
            out.append((f"{p}.self_attn.o_proj.bias", (h,), "bias"))
        out.append((f"{p}.post_attention_layernorm.weight", (h,), norm))
        if arch == "gemma3":
            out += [(f"{p}.pre_feedforward_layernorm.weight", (h,), norm),
                    (f"{p}.post_feedforward_layernorm.weight", (h,), norm)]
        if arch == "phi3":
            out.append((f"{p}.mlp.gate_up_proj.weight", (2 * inter, h), "matrix"))
        else:
            out += [(f"{p}.mlp.gate_proj.weight", (inter, h), "matrix"),
                    (f"{p}.mlp.up_proj.weight", (inter, h), "matrix")]
        out.append((f"{p}.mlp.down_proj.weight", (h, inter), "matrix"))
        if config.get("mlp_bias"):
            out += [(f"{p}.mlp.gate_proj.bias", (inter,), "bias"), (f"{p}.mlp.up_proj.bias", (inter,), "bias"),
                    (f"{p}.mlp.down_proj.bias", (h,), "bias")]
    out.append(("model.norm.weight", (h,), norm))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (config["vocab_size"], h), "matrix"))
    return out


def _normal(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    """Values that keep a tiny random model numerically tame: unit-ish norms, 1/sqrt(fan_in) matrices."""
    if kind == "norm":
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if kind == "offset_norm":
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if kind == "bias":
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))


def _fast_bf16(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    """Random bf16 bits without float arithmetic (the full-size preset): magnitudes 2^-8..2^-5,
    norms around 1. Quick enough to write 3.8B parameters in about a minute."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    mantissa = bits & np.uint16(0x7F)
    sign = bits & np.uint16(0x8000)
    if kind == "norm":
        return (np.uint16(127 << 7) | mantissa).astype(np.uint16)  # [1, 2)
    if kind == "offset_norm":
        return (sign | (np.uint16(123) << 7) | mantissa).astype(np.uint16)  # +-[2^-4, 2^-3)
    exponent = (np.uint16(119) + ((bits >> 7) & np.uint16(3))) << 7  # 2^-8 .. 2^-5
    return (sign | exponent | mantissa).astype(np.uint16)


def _to_stored(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        if values.dtype == np.uint16:
            return values
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(_ST_DTYPE[dtype][1])


def _write_safetensors(path: Path, specs: List[Tuple[str, Tuple[int, ...]]], dtype: str,
                       make: Callable[[str], np.ndarray]) -> int:
    """Stream tensors into one safetensors file; the header is laid out from shapes first."""
    st_dtype, np_dtype = _ST_DTYPE[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header, offset = {}, 0
    for name, shape in specs:
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in specs:
            data = np.ascontiguousarray(make(name))
            assert data.shape == tuple(shape) and data.dtype == np_dtype, name
            f.write(memoryview(data).cast("B"))
    return offset


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly ``vocab_size`` entries: 3 specials, 256 bytes, then merges of
    already-present tokens (deterministic). Needs the ``tokenizers`` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: Dict[str, int] = {t: i for i, t in enumerate(_SPECIAL)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges: List[Tuple[str, str]] = []
    # Merge the most "text-like" symbols first so ordinary words get multi-byte tokens.
    base = [ch for ch in alphabet if ch.isalnum()] + ["Ġ"]
    frontier = list(base)
    while len(vocab) < vocab_size:
        grown = []
        for a in frontier:
            for b in base:
                if len(vocab) >= vocab_size:
                    break
                if a + b not in vocab:
                    vocab[a + b] = len(vocab)
                    merges.append((a, b))
                    grown.append(a + b)
            if len(vocab) >= vocab_size:
                break
        frontier = grown or frontier
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIAL)
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def write_checkpoint(directory, arch: str, *, dtype: str = "f32", shards: int = 1, seed: int = 0,
                     preset: Optional[str] = None, **overrides) -> Path:
    """Write a random checkpoint of ``arch`` (llama, mistral, qwen2, qwen3, phi3, gemma3, smollm3)
    and return its path.

    ``overrides`` replace config.json fields (e.g. ``sliding_window=8``,
    ``rope_scaling={...}``); ``preset`` starts from a real model's config instead of the tiny one.
    """
    if dtype not in _ST_DTYPE:
        raise ValueError(f"dtype must be one of {sorted(_ST_DTYPE)}")
    if preset is not None:
        arch, base = PRESETS[preset]
    else:
        base = TINY[arch]
    config = {**base, **overrides}
    config["torch_dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a rewrite with other shards must not leave old tensors

    specs = tensor_shapes(arch, config)
    kinds = {name: kind for name, _, kind in specs}
    shapes = {name: shape for name, shape, _ in specs}
    rng = np.random.default_rng(seed)
    fast = preset is not None and dtype == "bf16"

    def make(name: str) -> np.ndarray:
        values = (_fast_bf16 if fast else _normal)(rng, shapes[name], kinds[name])
        return _to_stored(values, dtype)

    names = [name for name, _, _ in specs]
    groups = [list(g) for g in np.array_split(np.array(names, dtype=object), shards)]
    if shards == 1:
        _write_safetensors(out / "model.safetensors", [(n, shapes[n]) for n in names], dtype, make)
    else:
        weight_map, total = {}, 0
        for k, group in enumerate(groups, 1):
            fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
            total += _write_safetensors(out / fname, [(n, shapes[n]) for n in group], dtype, make)
            weight_map.update({n: fname for n in group})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2)}, indent=2))
    byte_level_tokenizer(config["vocab_size"]).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, indent=2))
    return out


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", choices=sorted(TINY), default="llama")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--dtype", choices=sorted(_ST_DTYPE))
    parser.add_argument("--shards", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.preset and PRESETS[args.preset][0] != args.arch:
        parser.error(f"preset {args.preset} is a {PRESETS[args.preset][0]} model")
    dtype = args.dtype or ("bf16" if args.preset else "f32")
    shards = args.shards or (2 if args.preset else 1)
    path = write_checkpoint(args.output, args.arch, dtype=dtype, shards=shards, seed=args.seed, preset=args.preset)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
