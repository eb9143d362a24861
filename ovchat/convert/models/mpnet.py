"""MPNet sentence encoders (microsoft/mpnet-base, sentence-transformers' all-mpnet-base-v2).

BERT's post-LN layers, without token types, with two kinds of position: learned absolute
positions counted as RoBERTa counts them (from ``pad_token_id + 1``, padding at
``pad_token_id``), and a relative-position bias added to every layer's attention scores: the
distance between query and key falls into one of 32 T5-style buckets (exact up to 8 either way,
logarithmic up to 128), and each bucket has a learned bias per head. The bucket of each distance
is computed once here, as transformers computes it (float32 arithmetic and truncation), into a
table the graph indexes; computing it in the graph instead would risk a different rounding at a
bucket's edge.

Names as Hugging Face's MPNetModel saves them, with or without the ``mpnet.`` prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import openvino as ov

from ovchat.convert import graph
from ovchat.convert.models.llama import getter, shared
from ovchat.convert.checkpoint import config_fields
from ovchat.progress import Progress, ProgressCallback, ignore

_MAX_DISTANCE = 128  # transformers' relative_position_bucket default


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 514
    layer_norm_eps: float = 1e-5
    relative_attention_num_buckets: int = 32
    pad_token_id: int = 1
    hidden_act: str = "gelu"

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        return cls(**config_fields(cls, config))


def bucket_table(max_length: int, num_buckets: int) -> np.ndarray:
    """The bucket of every distance key - query from -(max_length - 1) to max_length - 1 (index
    distance + max_length - 1), as transformers' MPNet relative_position_bucket gives it."""
    relative = np.arange(-(max_length - 1), max_length, dtype=np.int64)
    n = -relative
    half = num_buckets // 2
    out = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(math.log(_MAX_DISTANCE / exact))
    large = exact + (scaled * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return out + np.where(n < exact, n, large)


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    args = ModelArgs.from_config(checkpoint.config)
    fetched: list = []
    get = getter(checkpoint, fetched)
    p = "mpnet." if checkpoint.has("mpnet.embeddings.word_embeddings.weight") else ""
    ops = graph.ops
    head_dim = args.hidden_size // args.num_attention_heads
    inp = graph.encoder_inputs()

    # Absolute positions: pad + the running count of real tokens, pad itself on padding.
    real = ops.convert(ops.not_equal(inp.input_ids, graph._i64(args.pad_token_id)), ov.Type.i64)
    positions = ops.add(ops.multiply(ops.cumsum(real, graph._i64(1)), real), graph._i64(args.pad_token_id))
    words = graph.weight(get(f"{p}embeddings.word_embeddings.weight"), f"{p}embeddings.word_embeddings.weight")
    places = graph.weight(get(f"{p}embeddings.position_embeddings.weight"), f"{p}embeddings.position_embeddings.weight")
    x = ops.add(graph.embedding(inp.input_ids, words, "embeddings.words"),
                graph.embedding(positions, places, "embeddings.positions"))
    x = graph.layer_norm(x.output(0), get(f"{p}embeddings.LayerNorm.weight"), get(f"{p}embeddings.LayerNorm.bias"),
                         args.layer_norm_eps, "embeddings.LayerNorm")

    # The relative-position bias [1, heads, L, L], shared by every layer, plus the padding bias.
    length = ops.squeeze(inp.length(), graph._i64([0]))
    index = ops.range(graph._i64(0), length, graph._i64(1), "i64")
    distance = ops.subtract(ops.unsqueeze(index, graph._i64([0])), ops.unsqueeze(index, graph._i64([1])))  # k - q
    table = ops.constant(bucket_table(args.max_position_embeddings, args.relative_attention_num_buckets))
    buckets = ops.gather(table, ops.add(distance, graph._i64(args.max_position_embeddings - 1)), graph._i64(0))
    relative = graph.weight(get(f"{p}encoder.relative_attention_bias.weight"), f"{p}encoder.relative_attention_bias")
    per_head = ops.transpose(ops.gather(relative, buckets, graph._i64(0)), graph._i64([2, 0, 1]))  # [heads, L, L]
    bias = ops.add(ops.unsqueeze(per_head, graph._i64([0])), graph.padding_bias(inp.attention_mask)).output(0)

    for i in range(args.num_hidden_layers):
        layer = f"{p}encoder.layer.{i}"
        attention = {t: get(f"{layer}.attention.attn.{t}.weight") for t in "qkvo"}
        attention.update({f"{t}_bias": get(f"{layer}.attention.attn.{t}.bias") for t in "qkvo"})
        h = graph.encoder_attention(x, attention, heads=args.num_attention_heads, head_dim=head_dim, bias=bias,
                                    name=f"{layer}.attention.attn")
        x = graph.layer_norm(ops.add(x, h).output(0), get(f"{layer}.attention.LayerNorm.weight"),
                             get(f"{layer}.attention.LayerNorm.bias"), args.layer_norm_eps,
                             f"{layer}.attention.LayerNorm")
        mlp = {"in": get(f"{layer}.intermediate.dense.weight"), "in_bias": get(f"{layer}.intermediate.dense.bias"),
               "out": get(f"{layer}.output.dense.weight"), "out_bias": get(f"{layer}.output.dense.bias")}
        h = graph.gelu_mlp(x, mlp, f"{layer}.mlp", args.hidden_act)
        x = graph.layer_norm(ops.add(x, h).output(0), get(f"{layer}.output.LayerNorm.weight"),
                             get(f"{layer}.output.LayerNorm.bias"), args.layer_norm_eps, f"{layer}.output.LayerNorm")
        progress(Progress("build", "building the encoder layers", i + 1, args.num_hidden_layers))
    return graph.encoder_model(inp, x, "mpnet", arrays=shared(fetched))
