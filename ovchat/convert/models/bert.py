"""BERT sentence encoders (all-MiniLM, bge, e5, gte and the original BERT): learned absolute
positions and token types, then post-LN layers: attention, and a GELU feed-forward, each added
back to its input and layer-normalised.

Names as Hugging Face's BertModel saves them (``embeddings.*``, ``encoder.layer.N.*``), with or
without the ``bert.`` prefix a BertForMaskedLM checkpoint adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import openvino as ov

from ovchat.convert import graph
from ovchat.convert.models.llama import getter, shared
from ovchat.convert.checkpoint import config_fields
from ovchat.progress import Progress, ProgressCallback, ignore


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        return cls(**config_fields(cls, config))


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    args = ModelArgs.from_config(checkpoint.config)
    fetched: list = []
    get = getter(checkpoint, fetched)
    p = "bert." if checkpoint.has("bert.embeddings.word_embeddings.weight") else ""
    head_dim = args.hidden_size // args.num_attention_heads
    inp = graph.encoder_inputs(token_types=True)

    def table(name: str) -> ov.Output:
        return graph.weight(get(f"{p}embeddings.{name}.weight"), f"{p}embeddings.{name}.weight")

    x = graph.ops.add(graph.embedding(inp.input_ids, table("word_embeddings"), "embeddings.words"),
                      graph.embedding(graph.positions(inp), table("position_embeddings"), "embeddings.positions"))
    x = graph.ops.add(x, graph.embedding(inp.token_type_ids, table("token_type_embeddings"), "embeddings.types"))
    x = graph.layer_norm(x.output(0), get(f"{p}embeddings.LayerNorm.weight"), get(f"{p}embeddings.LayerNorm.bias"),
                         args.layer_norm_eps, "embeddings.LayerNorm")
    bias = graph.padding_bias(inp.attention_mask)
    for i in range(args.num_hidden_layers):
        layer = f"{p}encoder.layer.{i}"
        attention = {t: get(f"{layer}.attention.self.{n}.weight") for t, n in zip("qkv", ("query", "key", "value"))}
        attention.update({f"{t}_bias": get(f"{layer}.attention.self.{n}.bias")
                          for t, n in zip("qkv", ("query", "key", "value"))})
        attention.update(o=get(f"{layer}.attention.output.dense.weight"), o_bias=get(f"{layer}.attention.output.dense.bias"))
        h = graph.encoder_attention(x, attention, heads=args.num_attention_heads, head_dim=head_dim, bias=bias,
                                    name=f"{layer}.attention")
        x = graph.layer_norm(graph.ops.add(x, h).output(0), get(f"{layer}.attention.output.LayerNorm.weight"),
                             get(f"{layer}.attention.output.LayerNorm.bias"), args.layer_norm_eps,
                             f"{layer}.attention.output.LayerNorm")
        mlp = {"in": get(f"{layer}.intermediate.dense.weight"), "in_bias": get(f"{layer}.intermediate.dense.bias"),
               "out": get(f"{layer}.output.dense.weight"), "out_bias": get(f"{layer}.output.dense.bias")}
        h = graph.gelu_mlp(x, mlp, f"{layer}.mlp", args.hidden_act)
        x = graph.layer_norm(graph.ops.add(x, h).output(0), get(f"{layer}.output.LayerNorm.weight"),
                             get(f"{layer}.output.LayerNorm.bias"), args.layer_norm_eps, f"{layer}.output.LayerNorm")
        progress(Progress("build", "building the encoder layers", i + 1, args.num_hidden_layers))
    return graph.encoder_model(inp, x, "bert", arrays=shared(fetched))
