#!/usr/bin/env python3
"""Write a Hugging Face checkpoint as an F16 GGUF that llama.cpp loads, one tensor at a time.

    python scripts/gguf_from_hf.py CHECKPOINT OUT.gguf

For the peer benchmark at Phi-3-mini size (scripts/bench_peers.py ``--llama-quants``): llama.cpp
runs the same weights as ovchat, quantized by its own ``llama_model_quantize``. The layout is what
llama.cpp's convert_hf_to_gguf.py writes for these families: llama.cpp's tensor names; Q and K
rows permuted for llama and mistral (llama.cpp applies RoPE to interleaved pairs); Phi-3's fused
``qkv_proj`` and ``gate_up_proj`` kept fused (``attn_qkv``, ``ffn_up``). The tokenizer must be a
byte-level BPE tokenizer.json (as scripts/make_checkpoint.py writes) and is stored as llama.cpp's
``gpt2`` vocabulary. Tensors are memory-mapped and converted one by one, so a 7.6 GB checkpoint
needs well under 1 GB of memory. Needs the ``gguf`` package (the convert extra).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Phi3ForCausalLM": "phi3"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.N.<part>.<weight|bias>
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK[part]}.{kind}"


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half order of Q/K rows -> llama.cpp's interleaved pairs."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensors(checkpoint: Path, config: dict, arch: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(GGUF name, float array in GGUF's dtype) per tensor, read lazily from the safetensors."""
    from ovchat.convert import safetensors

    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    owners = safetensors.names(sorted(checkpoint.glob("*.safetensors")))
    files: Dict[Path, dict] = {}
    for name in sorted(owners, key=_order):
        if owners[name] not in files:
            files[owners[name]] = safetensors.load(owners[name])
        array = files[owners[name]][name].to_float32()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = permute(array, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = permute(array, kv)
        # llama.cpp keeps norms (1-D) in f32 and matrices in f16, as its converter does.
        yield gguf_name(name), array.astype(np.float32 if array.ndim == 1 else np.float16)


def _order(name: str) -> Tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if parts[1] == "layers" else (-1 if "embed" in name else 1 << 20)), name


def vocabulary(checkpoint: Path, config: dict) -> Dict[str, object]:
    spec = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise SystemExit("gguf_from_hf: only byte-level BPE tokenizer.json files are supported")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = config["vocab_size"]
    tokens: List[str] = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        if i < size:
            tokens[i] = token
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    padding = set(range(size)) - set(vocab.values())
    config_file = checkpoint / "tokenizer_config.json"
    template: Optional[str] = None
    if config_file.exists():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    return {"tokens": tokens,
            "types": [3 if i in specials else 5 if i in padding else 1 for i in range(size)],
            "merges": [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])],
            "bos": config.get("bos_token_id", 1), "eos": config.get("eos_token_id", 2), "template": template}


def write(checkpoint: Path, out: Path) -> Path:
    import gguf

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    arch = ARCHS.get((config.get("architectures") or [""])[0])
    if arch is None:
        raise SystemExit(f"gguf_from_hf: {config.get('architectures')} is not one of {', '.join(ARCHS)}")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(head_dim * (config.get("partial_rotary_factor") or 1.0)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if arch == "phi3" and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    vocab = vocabulary(checkpoint, config)
    # llama.cpp sets token attributes by general.name: a name holding "phi3" or "phi-3" makes it
    # look up Phi-3's "<|endoftext|>", and a vocabulary without it (make_checkpoint's synthetic
    # one) fails to load ("error loading model vocabulary: unordered_map::at").
    name = checkpoint.name
    if re.search(r"phi-?3", name.lower()) and "<|endoftext|>" not in vocab["tokens"]:
        name = "checkpoint"
    writer.add_name(name)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    if vocab["template"]:
        writer.add_chat_template(vocab["template"])

    # Tensor infos first (names, shapes, sizes), then the data, one tensor in memory at a time.
    infos = [(name, array.shape, array.dtype) for name, array in _shapes(checkpoint, config, arch)]
    for name, shape, dtype in infos:
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, array in tensors(checkpoint, config, arch):
        writer.write_tensor_data(array)
    writer.close()
    return out


def _shapes(checkpoint: Path, config: dict, arch: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Like ``tensors`` but without reading any data: zero-strided stand-ins of the right shape."""
    from ovchat.convert import safetensors

    owners = safetensors.names(sorted(checkpoint.glob("*.safetensors")))
    headers = {path: safetensors.read_header(path)[0] for path in set(owners.values())}
    for name in sorted(owners, key=_order):
        shape = tuple(headers[owners[name]][name]["shape"])
        dtype = np.float32 if len(shape) == 1 else np.float16
        yield gguf_name(name), np.broadcast_to(np.zeros((), dtype), shape)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    partial = args.output.with_name(args.output.name + ".partial")
    write(args.checkpoint, partial)
    partial.replace(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
