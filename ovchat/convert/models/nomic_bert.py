"""nomic-bert (nomic-embed-text): BERT's post-LN layers with RoPE instead of learned positions, a
SwiGLU feed-forward, and no biases in the projections.

Two spellings of its checkpoints exist: nomic's own (``encoder.layers.N.attn.Wqkv``, ``mlp.fc11``
(up), ``mlp.fc12`` (gate), ``mlp.fc2``, ``norm1``/``norm2``, ``emb_ln``; config fields ``n_embd``,
``n_head``, ``n_layer``, ``n_inner``, ``rotary_emb_base``), and transformers' (``layers.N.self_attn.
q_proj``... ``mlp.gate_proj``/``up_proj``/``down_proj``, ``post_attention_layernorm``,
``post_mlp_layernorm``, ``embeddings.LayerNorm``). Both are read; the fused q/k/v are split in
numpy, as for Phi-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
import openvino as ov

from ovchat.convert import graph
from ovchat.convert.models.llama import getter, shared
from ovchat.convert.tensors import Weight
from ovchat.errors import CheckpointError, UnsupportedArchitectureError
from ovchat.progress import Progress, ProgressCallback, ignore


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-12
    rope_theta: float = 1000.0
    rotary_fraction: float = 1.0

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        """Either spelling of the config (nomic's GPT-2-style names, or transformers')."""
        def field(*names, default=None):
            for name in names:
                if c.get(name) is not None:
                    return c[name]
            if default is None:
                raise CheckpointError(f"config.json lacks {names[0]}; use the checkpoint's original config.json")
            return default

        params = c.get("rope_parameters") or {}
        if c.get("rotary_emb_interleaved"):
            raise UnsupportedArchitectureError("nomic-bert with interleaved rotary embeddings is not supported")
        hidden = field("hidden_size", "n_embd")
        return cls(hidden_size=hidden, num_hidden_layers=field("num_hidden_layers", "n_layer"),
                   num_attention_heads=field("num_attention_heads", "n_head"),
                   intermediate_size=field("intermediate_size", "n_inner", default=4 * hidden),
                   layer_norm_eps=field("layer_norm_eps", "layer_norm_epsilon", default=1e-12),
                   rope_theta=float(params.get("rope_theta") or field("rope_theta", "rotary_emb_base", default=1000.0)),
                   rotary_fraction=float(field("rotary_emb_fraction", default=1.0)))


def _layer_weights(get: Callable[[str], Weight], has: Callable[[str], bool], i: int, hidden: int) -> Dict[str, Weight]:
    """One layer's weights under transformers' names, read from either spelling."""
    new = f"layers.{i}"
    if has(f"{new}.self_attn.q_proj.weight"):
        w = {t: get(f"{new}.self_attn.{t}_proj.weight") for t in "qkvo"}
        w.update(up=get(f"{new}.mlp.up_proj.weight"), gate=get(f"{new}.mlp.gate_proj.weight"),
                 down=get(f"{new}.mlp.down_proj.weight"))
        for norm, name in (("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")):
            w[f"{norm}.weight"], w[f"{norm}.bias"] = get(f"{new}.{name}.weight"), get(f"{new}.{name}.bias")
        return w
    old = f"encoder.layers.{i}"
    qkv = get(f"{old}.attn.Wqkv.weight")
    w = {t: qkv.rows(j * hidden, (j + 1) * hidden) for j, t in enumerate("qkv")}
    w.update(o=get(f"{old}.attn.out_proj.weight"), up=get(f"{old}.mlp.fc11.weight"), gate=get(f"{old}.mlp.fc12.weight"),
             down=get(f"{old}.mlp.fc2.weight"))
    for norm in ("norm1", "norm2"):
        w[f"{norm}.weight"], w[f"{norm}.bias"] = get(f"{old}.{norm}.weight"), get(f"{old}.{norm}.bias")
    return w


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    args = ModelArgs.from_config(checkpoint.config)
    fetched: list = []
    get = getter(checkpoint, fetched)
    ops = graph.ops
    head_dim = args.hidden_size // args.num_attention_heads
    inp = graph.encoder_inputs(token_types=True)
    norm = "embeddings.LayerNorm" if checkpoint.has("embeddings.LayerNorm.weight") else "emb_ln"

    words = graph.weight(get("embeddings.word_embeddings.weight"), "embeddings.word_embeddings.weight")
    types = graph.weight(get("embeddings.token_type_embeddings.weight"), "embeddings.token_type_embeddings.weight")
    x = ops.add(graph.embedding(inp.input_ids, words, "embeddings.words"),
                graph.embedding(inp.token_type_ids, types, "embeddings.types"))
    x = graph.layer_norm(x.output(0), get(f"{norm}.weight"), get(f"{norm}.bias"), args.layer_norm_eps, "embeddings.norm")
    rope = graph.Rope(inv_freq=(1.0 / args.rope_theta ** (np.arange(0, int(head_dim * args.rotary_fraction), 2,
                                                                    dtype=np.float64) / (head_dim * args.rotary_fraction))
                                ).astype(np.float32))
    rotary = rope.cos_sin(graph.positions(inp))
    bias = graph.padding_bias(inp.attention_mask)
    for i in range(args.num_hidden_layers):
        w = _layer_weights(get, checkpoint.has, i, args.hidden_size)
        name = f"layers.{i}"
        h = graph.encoder_attention(x, w, heads=args.num_attention_heads, head_dim=head_dim, bias=bias,
                                    name=f"{name}.self_attn", rotary=rotary)
        x = graph.layer_norm(ops.add(x, h).output(0), w["norm1.weight"], w["norm1.bias"], args.layer_norm_eps,
                             f"{name}.post_attention_layernorm")
        h = graph.gated_mlp(x, {"gate": w["gate"], "up": w["up"], "down": w["down"]}, f"{name}.mlp")
        x = graph.layer_norm(ops.add(x, h).output(0), w["norm2.weight"], w["norm2.bias"], args.layer_norm_eps,
                             f"{name}.post_mlp_layernorm")
        progress(Progress("build", "building the encoder layers", i + 1, args.num_hidden_layers))
    return graph.encoder_model(inp, x, "nomic_bert", arrays=shared(fetched))
