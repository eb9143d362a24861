"""Building blocks of a decoder-only transformer as an OpenVINO graph.

The shapes here are not arbitrary: each block is written in the form that the CPU plugin fuses
(``RMS``, ``RoPE``, ``ScaledDotProductAttentionWithKVCache``) and that GenAI's
``SDPAToPagedAttention`` pass rewrites into paged attention. See
shared/notes/openvino-model-contract.md for the patterns; a change of op order here can silently
cost a fusion, so tests/test_convert_graph.py compiles a model and checks the fused layer types.

Weights stay in their stored precision (f32, f16 or bf16 Constants that share the checkpoint's
memory where it is contiguous) and are widened by a ``Convert`` that the plugin folds into its
consumer, and that NNCF recognises as a float weight to compress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.op.util import Variable, VariableInfo

from ovchat.convert.safetensors import Weight
from ovchat.errors import CheckpointError, UnsupportedArchitectureError

_FLOAT_TYPES = {"f32": ov.Type.f32, "f16": ov.Type.f16, "bf16": ov.Type.bf16}
_INT64_MAX = np.iinfo(np.int64).max
# Additive mask value: finite so a row with no visible key (a padded query) gives a uniform
# softmax rather than NaN.
_MASKED = np.float32(np.finfo(np.float32).min)


def _i64(values) -> ov.Node:
    return ops.constant(np.array(values, dtype=np.int64))


def _f32(value) -> ov.Node:
    return ops.constant(np.array(value, dtype=np.float32))


# --- inputs and outputs -------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """The four inputs LLMPipeline feeds, plus the batch size every cache init needs."""

    input_ids: ov.Node
    attention_mask: ov.Node
    position_ids: ov.Node
    beam_idx: ov.Node
    batch: ov.Output  # i64 [1]

    @property
    def parameters(self) -> List[ov.Node]:
        return [self.input_ids, self.attention_mask, self.position_ids, self.beam_idx]


def inputs() -> Inputs:
    def parameter(name: str, dtype: ov.Type, rank: int) -> ov.Node:
        p = ops.parameter(ov.PartialShape([-1] * rank), dtype, name=name)
        p.output(0).set_names({name})
        return p

    input_ids = parameter("input_ids", ov.Type.i64, 2)
    batch = ops.gather(ops.shape_of(input_ids, "i64"), _i64([0]), _i64(0)).output(0)
    return Inputs(input_ids=input_ids,
                  attention_mask=parameter("attention_mask", ov.Type.i64, 2),
                  position_ids=parameter("position_ids", ov.Type.i64, 2),
                  beam_idx=parameter("beam_idx", ov.Type.i32, 1),
                  batch=batch)


def model(inp: Inputs, logits: ov.Output, sinks: Sequence[ov.Node], name: str,
          arrays: Sequence[np.ndarray] = ()) -> ov.Model:
    """The stateful model; it holds ``arrays`` (the weights its Constants share) while it lives."""
    logits.get_node().set_friendly_name("logits")
    result = ops.result(logits)
    result.output(0).set_names({"logits"})
    logits.set_names({"logits"})
    built = ov.Model([result], list(sinks), inp.parameters, name)
    built._ovchat_shared_arrays = list(arrays)
    return built


# --- weights ------------------------------------------------------------------------------------

def constant(w: Weight, name: str) -> ov.Node:
    """A named Constant in the stored precision that shares ``w.array``'s memory when it is
    contiguous (a memory-mapped checkpoint then stays on disk until the model is saved).

    Such a Constant does not keep its numpy array alive by itself (numpy-backed Constants that
    do need writeable arrays, and a memory map is read-only): the caller must, for as long as the
    model lives (``model()`` attaches the arrays it is given to the model object).
    """
    if w.dtype not in _FLOAT_TYPES:
        raise CheckpointError(f"tensor {name} has dtype {w.dtype}; only f32, f16 and bf16 weights can be converted")
    shared = w.array.flags.c_contiguous
    tensor = ov.Tensor(np.ascontiguousarray(w.array), list(w.array.shape), _FLOAT_TYPES[w.dtype])
    const = ops.constant(tensor, shared_memory=shared)
    const.set_friendly_name(name)
    const.output(0).set_names({name})
    return const


def as_f32(const: ov.Node) -> ov.Output:
    """The weight as f32 for its consumer: a Convert the plugin folds and NNCF recognises."""
    if const.get_element_type() == ov.Type.f32:
        return const.output(0)
    return ops.convert(const, ov.Type.f32).output(0)


def weight(w: Weight, name: str) -> ov.Output:
    return as_f32(constant(w, name))


def linear(x: ov.Output, w: "Weight | ov.Node", name: str, bias: Optional[Weight] = None) -> ov.Output:
    """x @ W.T with W as stored by Hugging Face ([out, in]), the layout NNCF compresses per row.

    ``w`` may be an existing Constant (tied embeddings share one)."""
    w_f32 = as_f32(w) if isinstance(w, ov.Node) else weight(w, f"{name}.weight")
    y = ops.matmul(x, w_f32, transpose_a=False, transpose_b=True, name=name)
    if bias is not None:
        y = ops.add(y, weight(bias, f"{name}.bias"))
    return y.output(0)


def embedding(input_ids: ov.Node, table: ov.Output, name: str) -> ov.Output:
    return ops.gather(table, input_ids, _i64(0), name=name).output(0)


# --- normalisation and MLP ----------------------------------------------------------------------

def rms_norm(x: ov.Output, gamma: Weight, eps: float, name: str) -> ov.Output:
    """x / sqrt(mean(x^2) + eps) * gamma, op for op as the CPU plugin's RMS fusion expects."""
    var = ops.reduce_mean(ops.power(x, _f32(2.0)), _i64([-1]), keep_dims=True)
    inv = ops.divide(_f32(1.0), ops.sqrt(ops.add(var, _f32(eps))))
    return ops.multiply(ops.multiply(x, inv), weight(gamma, f"{name}.weight"), name=name).output(0)


def swiglu(x: ov.Output, w: Mapping[str, Weight], name: str) -> ov.Output:
    """down(silu(gate(x)) * up(x)); ``w`` maps gate/up/down (and optional ``<p>_bias``) to weights."""
    g = linear(x, w["gate"], f"{name}.gate_proj", w.get("gate_bias"))
    u = linear(x, w["up"], f"{name}.up_proj", w.get("up_bias"))
    return linear(ops.multiply(ops.swish(g), u).output(0), w["down"], f"{name}.down_proj", w.get("down_bias"))


# --- rotary position embedding ------------------------------------------------------------------

@dataclass(frozen=True)
class Rope:
    """Inverse frequencies of a rotate-half RoPE, and what scales them.

    ``long_inv_freq`` (LongRoPE) replaces ``inv_freq`` when max(position_ids) + 1 exceeds
    ``original_max_position_embeddings``, as Hugging Face decides per forward pass.
    """

    inv_freq: np.ndarray
    attention_factor: float = 1.0
    long_inv_freq: Optional[np.ndarray] = None
    original_max_position_embeddings: int = 0

    SUPPORTED = ("default", "linear", "llama3", "longrope")

    @classmethod
    def from_config(cls, config: dict, head_dim: int) -> "Rope":
        """Read RoPE settings from either config style: ``rope_theta`` + ``rope_scaling`` or the
        newer ``rope_parameters`` (which also carries ``rope_theta``)."""
        params = dict(config.get("rope_scaling") or {})
        nested = config.get("rope_parameters") or {}
        # transformers 5 may nest the parameters per layer type; the decoders here have one RoPE.
        params.update(nested.get("full_attention", nested) if isinstance(nested, dict) else {})
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "su":  # the name early Phi-3 128k configs used for LongRoPE
            kind = "longrope"
        if kind not in cls.SUPPORTED:
            raise UnsupportedArchitectureError(
                f"RoPE type {kind!r} is not supported; supported: {', '.join(cls.SUPPORTED)}")
        partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        if partial != 1.0:
            raise UnsupportedArchitectureError(
                f"partial_rotary_factor {partial} is not supported; only full rotary embeddings are")
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        inv_freq = 1.0 / theta ** exponents

        if kind == "linear":
            inv_freq = inv_freq / float(params["factor"])
        elif kind == "llama3":
            inv_freq = _llama3_scaling(inv_freq, params)
        elif kind == "longrope":
            original = int(config.get("original_max_position_embeddings")
                           or params.get("original_max_position_embeddings")
                           or config["max_position_embeddings"])
            factor = params.get("factor") or config["max_position_embeddings"] / original
            attention_factor = params.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            base = theta ** exponents
            return cls(inv_freq=(1.0 / (np.asarray(params["short_factor"], np.float64) * base)).astype(np.float32),
                       attention_factor=float(attention_factor),
                       long_inv_freq=(1.0 / (np.asarray(params["long_factor"], np.float64) * base)).astype(np.float32),
                       original_max_position_embeddings=original)
        return cls(inv_freq=inv_freq.astype(np.float32))

    def cos_sin(self, position_ids: ov.Node) -> Tuple[ov.Output, ov.Output]:
        """cos and sin of shape [B, 1, L, head_dim], computed once and shared by every layer."""
        inv_freq = _f32(self.inv_freq.reshape(1, 1, -1)).output(0)
        if self.long_inv_freq is not None:
            seq_len = ops.add(ops.reduce_max(position_ids, _i64([0, 1]), keep_dims=False), _i64(1))
            use_long = ops.greater(seq_len, _i64(self.original_max_position_embeddings))
            inv_freq = ops.select(use_long, _f32(self.long_inv_freq.reshape(1, 1, -1)), inv_freq).output(0)
        pos = ops.unsqueeze(ops.convert(position_ids, ov.Type.f32), _i64([-1]))
        freqs = ops.multiply(pos, inv_freq)
        emb = ops.concat([freqs, freqs], -1)
        cos, sin = ops.cos(emb).output(0), ops.sin(emb).output(0)
        if self.attention_factor != 1.0:
            cos = ops.multiply(cos, _f32(self.attention_factor)).output(0)
            sin = ops.multiply(sin, _f32(self.attention_factor)).output(0)
        return ops.unsqueeze(cos, _i64([1])).output(0), ops.unsqueeze(sin, _i64([1])).output(0)


def _llama3_scaling(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled)


def apply_rope(x: ov.Output, cos: ov.Output, sin: ov.Output, head_dim: int) -> ov.Output:
    """x * cos + rotate_half(x) * sin on [B, H, L, head_dim] (the RoPE fusion's GPT-NeoX form)."""
    half = head_dim // 2
    first = ops.slice(x, _i64([0]), _i64([half]), _i64([1]), _i64([3]))
    second = ops.slice(x, _i64([half]), _i64([_INT64_MAX]), _i64([1]), _i64([3]))
    rotated = ops.concat([ops.multiply(second, _f32(-1.0)), first], -1)
    return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin)).output(0)


# --- attention ----------------------------------------------------------------------------------

def attention_mask(inp: Inputs, sliding_window: Optional[int] = None) -> ov.Output:
    """Additive mask [B, 1, L, T] from attention_mask and cache positions, shared by the layers.

    Query l of this call sits at cache index T - L + l (T = attention_mask's length). A key j is
    visible when j <= that index, attention_mask[b, j] is set, and (with a window W)
    j > index - W, as Hugging Face's sliding_window_overlay. SDPA's own ``causal`` flag is
    top-left aligned and wrong once a cache precedes the queries, hence the explicit mask.

    With a window the boolean terms form the chain SDPAToPagedAttention reads a sliding window
    from (its gpt-oss pattern: Greater(kv, q + (-W)) inside four BitwiseAnd, then Broadcast,
    Select, Slice into SDPA; it passes W on to PagedAttention). Without that exact chain paged
    attention would silently attend to the whole context.
    """
    total = ops.gather(ops.shape_of(inp.attention_mask, "i64"), _i64(1), _i64(0))
    length = ops.gather(ops.shape_of(inp.input_ids, "i64"), _i64(1), _i64(0))
    kv_idx = ops.range(_i64(0), total, _i64(1), "i64")                                  # [T]
    q_idx = ops.unsqueeze(ops.range(ops.subtract(total, length), total, _i64(1), "i64"), _i64([1]))  # [L, 1]
    visible = ops.less_equal(kv_idx, q_idx)                                             # [L, T]
    padding = ops.unsqueeze(ops.convert(inp.attention_mask, ov.Type.boolean), _i64([1, 2]))  # [B,1,1,T]
    if sliding_window is not None:
        in_window = ops.greater(kv_idx, ops.add(q_idx, _i64(-int(sliding_window))))
        visible = ops.bitwise_and(visible, in_window)
        visible = ops.bitwise_and(visible, padding)
        # The pattern has four ANDs; the last two are with an all-true constant.
        always = ops.constant(np.ones((1, 1, 1, 1), dtype=np.bool_))
        visible = ops.bitwise_and(always, visible)
        visible = ops.bitwise_and(visible, always)
    else:
        visible = ops.bitwise_and(visible, padding)
    shape = ops.concat([inp.batch, _i64([1]), ops.unsqueeze(length, _i64([0])),
                        ops.unsqueeze(total, _i64([0]))], 0)
    visible = ops.broadcast(visible, shape)
    mask = ops.select(visible, _f32(0.0), _f32(_MASKED))
    return ops.slice(mask, _i64([0]), ops.unsqueeze(total, _i64([0])), _i64([1]), _i64([3])).output(0)


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int


def _split_heads(x: ov.Output, heads: int, head_dim: int) -> ov.Output:
    x = ops.reshape(x, _i64([0, 0, heads, head_dim]), special_zero=True)
    return ops.transpose(x, _i64([0, 2, 1, 3])).output(0)


def _kv_cache(current: ov.Output, inp: Inputs, shape: AttentionShape, layer: int, kind: str
              ) -> Tuple[ov.Output, ov.Node]:
    """Past + current keys (or values) through a ReadValue/Assign pair: the chain ReadValue ->
    Gather(beam_idx) -> Concat that the plugin's stateful SDPA fusion and the paged-attention pass
    both match. The init value has a 0-length sequence axis, as LLMPipeline requires."""
    var_id = f"past_key_values.{layer}.{kind}present.{layer}.{kind}"
    info = VariableInfo()
    info.variable_id = var_id
    info.data_type = ov.Type.f32
    info.data_shape = ov.PartialShape([-1, shape.kv_heads, -1, shape.head_dim])
    variable = Variable(info)
    init_shape = ops.concat([inp.batch, _i64([shape.kv_heads, 0, shape.head_dim])], 0)
    init = ops.broadcast(_f32(0.0), init_shape)
    past = ops.read_value(init, variable)
    past.output(0).set_names({f"past_key_values.{layer}.{kind}"})
    past = ops.gather(past, inp.beam_idx, _i64(0))
    full = ops.concat([past, current], 2)
    return full.output(0), ops.assign(full, variable)


def _repeat_kv(x: ov.Output, shape: AttentionShape) -> ov.Output:
    """Grouped-query heads as Unsqueeze -> Broadcast -> Reshape (the form both passes expect)."""
    groups = shape.heads // shape.kv_heads
    if groups == 1:
        return x
    x = ops.unsqueeze(x, _i64([2]))
    x = ops.broadcast(x, _i64([1, 1, groups, 1, 1]), broadcast_spec="BIDIRECTIONAL")
    return ops.reshape(x, _i64([0, shape.heads, -1, shape.head_dim]), special_zero=True).output(0)


def attention(q: ov.Output, k: ov.Output, v: ov.Output, *, inp: Inputs, shape: AttentionShape,
              cos: ov.Output, sin: ov.Output, mask: ov.Output, layer: int, name: str
              ) -> Tuple[ov.Output, List[ov.Node]]:
    """Self-attention over projected q/k/v [B, L, heads*head_dim]; returns the context
    [B, L, heads*head_dim] (before o_proj) and the two Assign sinks of this layer's cache."""
    q = apply_rope(_split_heads(q, shape.heads, shape.head_dim), cos, sin, shape.head_dim)
    k = apply_rope(_split_heads(k, shape.kv_heads, shape.head_dim), cos, sin, shape.head_dim)
    v = _split_heads(v, shape.kv_heads, shape.head_dim)
    k, k_assign = _kv_cache(k, inp, shape, layer, "key")
    v, v_assign = _kv_cache(v, inp, shape, layer, "value")
    context = ops.scaled_dot_product_attention(q, _repeat_kv(k, shape), _repeat_kv(v, shape), mask,
                                               causal=False, name=f"{name}/sdpa")
    context = ops.transpose(context, _i64([0, 2, 1, 3]))
    return ops.reshape(context, _i64([0, 0, -1]), special_zero=True).output(0), [k_assign, v_assign]
