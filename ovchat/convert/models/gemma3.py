"""Gemma 3 text models (270m, 1b): a decoder of its own.

What sets it apart from Llama, each handled below:
- the embedding is multiplied by sqrt(hidden_size) (in float32, as llama.cpp does; transformers
  rounds the factor to the weights' dtype first);
- every RMSNorm multiplies by (1 + weight), and there are four per layer: before and after the
  attention, before and after the MLP (the "sandwich" norms), plus q_norm/k_norm over each head;
- the MLP is GeGLU: down(gelu_tanh(gate(x)) * up(x));
- layers are local (a sliding window, RoPE base ``rope_local_base_freq``, no RoPE scaling) or
  global (full attention, RoPE base ``rope_theta`` with ``rope_scaling``), five local to one
  global unless ``layer_types`` says otherwise;
- q.k is scaled by query_pre_attn_scalar ** -0.5, and the logits are soft-capped
  (cap * tanh(logits / cap)) where ``final_logit_softcapping`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import openvino as ov

from ovchat.convert import graph
from ovchat.convert.models import llama
from ovchat.errors import UnsupportedArchitectureError
from ovchat.progress import Progress, ProgressCallback, ignore

_NORM_OFFSET = 1.0  # Gemma's RMSNorm computes x_normed * (1 + weight)


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    layer_types: Optional[List[str]] = None
    sliding_window_pattern: int = 6
    rope_local_base_freq: float = 10000.0
    hidden_activation: str = "gelu_pytorch_tanh"

    def layer_window(self, layer: int) -> Optional[int]:
        if self.layer_types is not None:
            local = self.layer_types[layer] == "sliding_attention"
        else:
            local = (layer + 1) % self.sliding_window_pattern != 0
        return self.sliding_window if local else None

    @property
    def attention_scale(self) -> Optional[float]:
        """q.k's factor when it is not SDPA's default 1/sqrt(head_dim)."""
        if self.query_pre_attn_scalar is None or self.query_pre_attn_scalar == self.head_size:
            return None
        return self.query_pre_attn_scalar ** -0.5


def _local_theta(config: dict, args: ModelArgs) -> float:
    """The local layers' RoPE base: transformers 5 nests it under rope_parameters."""
    nested = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    return float(nested.get("rope_theta", args.rope_local_base_freq))


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    config = checkpoint.config
    args = ModelArgs.from_config(config)
    if args.attn_logit_softcapping:
        raise UnsupportedArchitectureError(
            f"{checkpoint.path}: attention logit soft-capping (Gemma 2) is not supported; Gemma 3 has none")
    if args.hidden_activation != "gelu_pytorch_tanh":
        raise UnsupportedArchitectureError(f"{checkpoint.path}: activation {args.hidden_activation} is not supported")
    fetched: List = []
    get = llama.getter(checkpoint, fetched)
    eps = args.rms_norm_eps

    def norm(x: ov.Output, name: str) -> ov.Output:
        return graph.rms_norm(x, get(f"{name}.weight"), eps, name, offset=_NORM_OFFSET)

    shape = graph.AttentionShape(args.num_attention_heads, args.kv_heads, args.head_size)
    inp = graph.inputs()
    rotary = {
        "global": graph.Rope.from_config(config, args.head_size).cos_sin(inp.position_ids),
        "local": graph.Rope.from_config(config, args.head_size, theta=_local_theta(config, args),
                                        scaled=False).cos_sin(inp.position_ids),
    }
    masks: Dict[Optional[int], ov.Output] = {}

    table = graph.weight(get("model.embed_tokens.weight"), "model.embed_tokens.weight")
    x = graph.embedding(inp.input_ids, table, "model.embed_tokens", scale=math.sqrt(args.hidden_size))
    sinks: List[ov.Node] = []
    for i in range(args.num_hidden_layers):
        prefix, attn = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        window = args.layer_window(i)
        if window not in masks:
            masks[window] = graph.attention_mask(inp, window)

        h = norm(x, f"{prefix}.input_layernorm")
        w = llama.attention_weights(get, prefix, args)
        q = graph.linear(h, w["q"], f"{attn}.q_proj", w.get("q_bias"))
        k = graph.linear(h, w["k"], f"{attn}.k_proj", w.get("k_bias"))
        v = graph.linear(h, w["v"], f"{attn}.v_proj", w.get("v_bias"))
        context, layer_sinks = graph.attention(
            q, k, v, inp=inp, shape=shape, rotary=rotary["local" if window else "global"], mask=masks[window],
            layer=i, name=attn, scale=args.attention_scale,
            q_norm=(get(f"{attn}.q_norm.weight"), eps, _NORM_OFFSET),
            k_norm=(get(f"{attn}.k_norm.weight"), eps, _NORM_OFFSET))
        sinks += layer_sinks
        out = graph.linear(context, w["o"], f"{attn}.o_proj", w.get("o_bias"))
        x = graph.ops.add(x, norm(out, f"{prefix}.post_attention_layernorm")).output(0)

        h = norm(x, f"{prefix}.pre_feedforward_layernorm")
        out = graph.gated_mlp(h, llama.mlp_weights(get, prefix, args), f"{prefix}.mlp", activation="gelu_tanh")
        x = graph.ops.add(x, norm(out, f"{prefix}.post_feedforward_layernorm")).output(0)
        progress(Progress("build", "building the decoder layers", i + 1, args.num_hidden_layers))

    x = norm(x, "model.norm")
    logits = graph.linear(x, llama.lm_head(checkpoint, args.tie_word_embeddings, table, get), "lm_head")
    if args.final_logit_softcapping:
        logits = graph.softcap(logits, float(args.final_logit_softcapping))
    return graph.model(inp, logits, sinks, "gemma3", arrays=llama.shared(fetched))
