"""A checkpoint's config checked against itself and against its weights, before anything is built.

A config.json from the internet can lie: a head count of 0 (a ZeroDivisionError deep in a
builder), a string where a number belongs, a hidden size the weights do not have (a numpy
reshape error), one layer fewer than the weights hold (converted silently into a model that is
missing a layer), a vocabulary larger than the embedding. The builders trust the config, so it is
checked here, with the tensors' shapes as every reader knows them without loading them (the
safetensors headers, the GGUF tensor table), and refused in one line naming the key.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

from ovchat.convert.checkpoint import Checkpoint
from ovchat.errors import CheckpointError

# Whole numbers the builders size things by, and a bound far above any real model's.
_SIZES = {"hidden_size": 1 << 17, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
          "num_hidden_layers": 1024, "intermediate_size": 1 << 20, "vocab_size": 1 << 22,
          "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24}
_POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "partial_rotary_factor")
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def check(checkpoint: Checkpoint) -> None:
    """CheckpointError unless the config is sound and the weights have the shapes it gives."""
    where = checkpoint.path
    config = checkpoint.config
    _check_config(config, where)
    _check_weights(checkpoint, config, where)


def _bad(where: Any, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}; use the checkpoint's original config.json, or download it again")


def _check_config(config: Dict[str, Any], where: Any) -> None:
    for key, limit in _SIZES.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise _bad(where, f"config {key} is {value!r} (a whole number from 1 to {limit} is needed)")
    for key in _POSITIVE_NUMBERS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise _bad(where, f"config {key} is {value!r} (a positive number is needed)")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise _bad(where, f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    hidden = config.get("hidden_size")
    if heads and hidden and not config.get("head_dim") and hidden % heads:
        raise _bad(where, f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    scaling = config.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise _bad(where, f"config rope_scaling is {type(scaling).__name__}, not an object")
        for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                    "beta_fast", "beta_slow"):
            value = scaling.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise _bad(where, f"config rope_scaling.{key} is {value!r} (a positive number is needed)")
        for key in ("long_factor", "short_factor"):
            value = scaling.get(key)
            if value is not None and (not isinstance(value, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise _bad(where, f"config rope_scaling.{key} must be a list of numbers")


def _shape(checkpoint: Checkpoint, suffix: str) -> Optional[Tuple[str, Tuple[int, ...]]]:
    name = next((n for n in checkpoint.names() if n.endswith(suffix)), None)
    return None if name is None else (name, checkpoint.shape(name))


def _check_weights(checkpoint: Checkpoint, config: Dict[str, Any], where: Any) -> None:
    layers = {int(m.group(1)) for m in map(_LAYER.search, checkpoint.names()) if m}
    count = config.get("num_hidden_layers")
    if count and layers and max(layers) + 1 != count:
        raise _bad(where, f"num_hidden_layers is {count} but the weights hold {max(layers) + 1} layers")
    if count and layers and len(layers) != count:
        missing = sorted(set(range(count)) - layers)[:3]
        raise _bad(where, f"the weights lack layer {', '.join(map(str, missing))}")
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    found = _shape(checkpoint, "embed_tokens.weight") or _shape(checkpoint, "word_embeddings.weight")
    if found and hidden and vocab:
        name, shape = found
        # A GGUF's vocabulary may be shorter than its embedding (padding rows); a config's may not.
        fits = shape[0] >= vocab if checkpoint.kind == "gguf" else shape[0] == vocab
        if len(shape) != 2 or shape[1] != hidden or not fits:
            raise _bad(where, f"{name} has shape {list(shape)} but vocab_size x hidden_size is [{vocab}, {hidden}]")
    heads = config.get("num_attention_heads")
    if not (hidden and heads):
        return
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    inter = config.get("intermediate_size")
    expected = {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
                "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
                "self_attn.qkv_proj.weight": (q + 2 * kv, hidden)}
    if inter:
        expected.update({"mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                         "mlp.down_proj.weight": (hidden, inter), "mlp.gate_up_proj.weight": (2 * inter, hidden)})
    for layer in sorted(layers):
        for part, shape in expected.items():
            name = f"model.layers.{layer}.{part}"
            if checkpoint.has(name) and tuple(checkpoint.shape(name)) != shape:
                raise _bad(where, f"{name} has shape {list(checkpoint.shape(name))} but the config gives {list(shape)}")
