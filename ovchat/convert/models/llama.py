"""Llama (2, 3, 3.1/3.2 with llama3 RoPE scaling, SmolLM2): the reference decoder wiring.

mistral, qwen2, qwen3, smollm3 and phi3 reuse ``decoder`` with their own config fields (the
``ModelArgs`` hooks say which layers slide, rotate, and normalise q/k) and weight mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import openvino as ov

from ovchat.convert import graph
from ovchat.convert.tensors import Weight
from ovchat.convert.checkpoint import config_fields
from ovchat.errors import CheckpointError
from ovchat.progress import Progress, ProgressCallback, ignore


@dataclass
class ModelArgs:
    """The config.json fields the graph needs, under their Hugging Face names."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False

    # Not config fields: what the variants change.
    qk_norm = False  # an RMSNorm over each query and key head (Qwen3)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        return cls(**config_fields(cls, config))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        # head_dim may be given explicitly (and may be null in the config).
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of one layer (None: full attention)."""
        return self.sliding_window

    def layer_rotates(self, layer: int) -> bool:
        """Whether this layer applies RoPE to q and k."""
        return True


# One layer's weights by projection: "q", "k", "v", "o" (attention) or "gate", "up", "down" (MLP),
# plus "<projection>_bias" where the model has biases. Variants override these two functions.
LayerWeights = Dict[str, Weight]


def attention_weights(get: Callable[[str], Weight], prefix: str, args: ModelArgs) -> LayerWeights:
    return _projections(get, f"{prefix}.self_attn", ("q", "k", "v", "o"), args.attention_bias)


def mlp_weights(get: Callable[[str], Weight], prefix: str, args: ModelArgs) -> LayerWeights:
    return _projections(get, f"{prefix}.mlp", ("gate", "up", "down"), args.mlp_bias)


def _projections(get, prefix: str, names, bias: bool) -> LayerWeights:
    w = {p: get(f"{prefix}.{p}_proj.weight") for p in names}
    if bias:
        w.update({f"{p}_bias": get(f"{prefix}.{p}_proj.bias") for p in names})
    return w


def decoder(checkpoint, args: ModelArgs, *, progress: ProgressCallback = ignore,
            attention_weights=attention_weights, mlp_weights=mlp_weights) -> ov.Model:
    """Wire embeddings, ``num_hidden_layers`` pre-norm decoder layers, the final norm and lm_head."""
    fetched: List[Weight] = []
    get = getter(checkpoint, fetched)
    shape = graph.AttentionShape(args.num_attention_heads, args.kv_heads, args.head_size)
    inp = graph.inputs()
    rotary = graph.Rope.from_config(checkpoint.config, args.head_size).cos_sin(inp.position_ids)
    masks: Dict[Optional[int], ov.Output] = {}

    table = graph.weight(get("model.embed_tokens.weight"), "model.embed_tokens.weight")
    x = graph.embedding(inp.input_ids, table, "model.embed_tokens")
    sinks: List[ov.Node] = []
    for i in range(args.num_hidden_layers):
        prefix = f"model.layers.{i}"
        window = args.layer_window(i)
        if window not in masks:
            masks[window] = graph.attention_mask(inp, window)

        h = graph.rms_norm(x, get(f"{prefix}.input_layernorm.weight"), args.rms_norm_eps, f"{prefix}.input_layernorm")
        w = attention_weights(get, prefix, args)
        attn = f"{prefix}.self_attn"
        q = graph.linear(h, w["q"], f"{attn}.q_proj", w.get("q_bias"))
        k = graph.linear(h, w["k"], f"{attn}.k_proj", w.get("k_bias"))
        v = graph.linear(h, w["v"], f"{attn}.v_proj", w.get("v_bias"))
        norms = {}
        if args.qk_norm:
            norms = {f"{t}_norm": (get(f"{attn}.{t}_norm.weight"), args.rms_norm_eps, 0.0) for t in "qk"}
        context, layer_sinks = graph.attention(q, k, v, inp=inp, shape=shape,
                                               rotary=rotary if args.layer_rotates(i) else None,
                                               mask=masks[window], layer=i, name=attn, **norms)
        sinks += layer_sinks
        x = graph.ops.add(x, graph.linear(context, w["o"], f"{attn}.o_proj", w.get("o_bias"))).output(0)

        h = graph.rms_norm(x, get(f"{prefix}.post_attention_layernorm.weight"), args.rms_norm_eps,
                           f"{prefix}.post_attention_layernorm")
        x = graph.ops.add(x, graph.gated_mlp(h, mlp_weights(get, prefix, args), f"{prefix}.mlp")).output(0)
        progress(Progress("build", "building the decoder layers", i + 1, args.num_hidden_layers))

    x = graph.rms_norm(x, get("model.norm.weight"), args.rms_norm_eps, "model.norm")
    logits = graph.linear(x, lm_head(checkpoint, args.tie_word_embeddings, table, get), "lm_head")
    return graph.model(inp, logits, sinks, checkpoint.config.get("model_type", "llama"), arrays=shared(fetched))


def lm_head(checkpoint, tied: bool, table: ov.Output, get: Callable[[str], Weight]):
    """The output projection: its own weight, or the embedding table when tied (or absent)."""
    return table if tied or not checkpoint.has("lm_head.weight") else get("lm_head.weight")


def getter(checkpoint, fetched: List) -> Callable[[str], Weight]:
    """checkpoint.get with a clear error, remembering each weight: the model's float Constants
    share their memory, so the model must hold them (see graph.constant)."""
    def get(name: str) -> Weight:
        if not checkpoint.has(name):
            raise CheckpointError(f"{checkpoint.path} lacks tensor {name}; the checkpoint is incomplete or not "
                                  f"a {checkpoint.config.get('model_type', '?')} model")
        w = checkpoint.get(name)
        fetched.append(w)
        return w
    return get


def shared(fetched: List) -> List:
    """The arrays float Constants may share (kept weights are copied into their Constants)."""
    return [w.array for w in fetched if isinstance(w, Weight)]


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    return decoder(checkpoint, ModelArgs.from_config(checkpoint.config), progress=progress)
