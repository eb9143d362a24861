"""Building blocks of a decoder-only transformer as an OpenVINO graph.

The shapes here are not arbitrary: each block is written in the form that the CPU plugin fuses
(``RMS``, ``RoPE``, ``ScaledDotProductAttentionWithKVCache``, compressed ``FullyConnected``) and
that GenAI's ``SDPAToPagedAttention`` pass rewrites into paged attention. A change of op order here
can silently cost a fusion, so tests/test_convert_graph.py compiles a model and checks the fused
layer types, and that the paged-attention pass keeps each layer's sliding window.

Float weights stay in their stored precision (f32, f16 or bf16 Constants that share the
checkpoint's memory where it is contiguous) and are widened by a ``Convert`` that the plugin folds
into its consumer, and that NNCF recognises as a float weight to compress. Weights kept from a
quantized GGUF arrive already in NNCF's compressed form (see ``weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.op.util import Variable, VariableInfo

from ovchat.convert.tensors import QuantizedWeight, Weight
from ovchat.errors import CheckpointError, UnsupportedArchitectureError

_FLOAT_TYPES = {"f32": ov.Type.f32, "f16": ov.Type.f16, "bf16": ov.Type.bf16}
_FOUR_BIT = {"u4": ov.Type.u4, "i4": ov.Type.i4}
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
    return _named(ops.constant(tensor, shared_memory=shared), name)


def _named(node: ov.Node, name: str) -> ov.Node:
    node.set_friendly_name(name)
    node.output(0).set_names({name})
    return node


def as_f32(const: ov.Node) -> ov.Output:
    """The weight as f32 for its consumer: a Convert the plugin folds and NNCF recognises."""
    if const.get_element_type() == ov.Type.f32:
        return const.output(0)
    return ops.convert(const, ov.Type.f32).output(0)


def _decompressed(w: QuantizedWeight, name: str) -> ov.Output:
    """A kept GGUF weight as f32: Constant(q) -> Convert -> [Subtract(zero point)] ->
    Multiply(scale) -> Reshape [rows, cols] (-> Convert to f32 after an f16 scale).

    This is the chain NNCF writes for its own compressed weights, so the CPU plugin fuses it
    into a compressed FullyConnected (or Gather) that keeps the integers as they are; a
    Multiply followed by an Add of the offset would not fuse and would be unpacked to f32 at
    load. The integers are copied into the Constant (packed two to a byte for 4-bit types).
    """
    if w.element in ("u8", "i8"):
        q = _named(ops.constant(w.packed(), shared_memory=False), name)
    else:  # a 4-bit Tensor is built from its packed bytes: two values a byte, low nibble first
        q = _named(ops.constant(ov.Tensor(w.packed(), list(w.q.shape), _FOUR_BIT[w.element]), shared_memory=False),
                   name)
    scale_type = ov.Type.f16 if w.scale.dtype == np.float16 and w.zero_point is None else ov.Type.f32
    x = ops.convert(q, scale_type)
    scale = _named(ops.constant(w.scale), f"{name}/scale")
    if w.zero_point is not None:
        x = ops.subtract(x, _named(ops.constant(w.zero_point.astype(np.float32)), f"{name}/zero_point"))
        if w.scale.dtype == np.float16:  # an f16 scale beside an f32 zero point: widened by a Convert
            scale = ops.convert(scale, ov.Type.f32)
    x = ops.multiply(x, scale)
    x = ops.reshape(x, _i64(list(w.shape)), special_zero=False)
    return x.output(0) if scale_type == ov.Type.f32 else ops.convert(x, ov.Type.f32).output(0)


def weight(w: "Weight | QuantizedWeight", name: str) -> ov.Output:
    """The weight as an f32 value for MatMul or Gather: float weights through a Convert, kept
    GGUF weights through their decompression."""
    if isinstance(w, QuantizedWeight):
        return _decompressed(w, name)
    return as_f32(constant(w, name))


def linear(x: ov.Output, w: "Weight | QuantizedWeight | ov.Output", name: str,
           bias: Optional[Weight] = None) -> ov.Output:
    """x @ W.T with W as stored by Hugging Face ([out, in]), the layout NNCF compresses per row.

    ``w`` may be an existing weight value (tied embeddings share the table's)."""
    w_f32 = w if isinstance(w, ov.Output) else weight(w, f"{name}.weight")
    y = ops.matmul(x, w_f32, transpose_a=False, transpose_b=True, name=name)
    if bias is not None:
        y = ops.add(y, weight(bias, f"{name}.bias"))
    return y.output(0)


def embedding(input_ids: ov.Node, table: ov.Output, name: str, scale: Optional[float] = None) -> ov.Output:
    """Rows of ``table`` for ``input_ids``; Gemma multiplies them by sqrt(hidden_size)."""
    x = ops.gather(table, input_ids, _i64(0), name=name)
    return (x if scale is None else ops.multiply(x, _f32(scale))).output(0)


def softcap(logits: ov.Output, cap: float) -> ov.Output:
    """cap * tanh(logits / cap), as Divide -> Tanh -> Multiply: the one form after the lm_head
    MatMul that GenAI still sees through when it slices prefill logits to the last token."""
    return ops.multiply(ops.tanh(ops.divide(logits, _f32(cap))), _f32(cap)).output(0)


# --- normalisation and MLP ----------------------------------------------------------------------

def rms_norm(x: ov.Output, gamma: Weight, eps: float, name: str, offset: float = 0.0) -> ov.Output:
    """x / sqrt(mean(x^2) + eps) * (offset + gamma), op for op as the CPU plugin's RMS fusion
    expects. Gemma's norms multiply by 1 + gamma: that sum is taken here, in numpy."""
    if offset:
        # A new array, which no caller holds: the Constant gets its own copy.
        scale = _named(ops.constant((gamma.to_float32().astype(np.float64) + offset).astype(np.float32)),
                       f"{name}.weight").output(0)
    else:
        scale = weight(gamma, f"{name}.weight")
    var = ops.reduce_mean(ops.power(x, _f32(2.0)), _i64([-1]), keep_dims=True)
    inv = ops.divide(_f32(1.0), ops.sqrt(ops.add(var, _f32(eps))))
    return ops.multiply(ops.multiply(x, inv), scale, name=name).output(0)


def gated_mlp(x: ov.Output, w: Mapping[str, Weight], name: str, activation: str = "silu") -> ov.Output:
    """down(act(gate(x)) * up(x)); ``w`` maps gate/up/down (and optional ``<p>_bias``) to weights.
    ``activation``: silu (SwiGLU: Llama, Qwen, Phi) or gelu_tanh (GeGLU: Gemma)."""
    g = linear(x, w["gate"], f"{name}.gate_proj", w.get("gate_bias"))
    u = linear(x, w["up"], f"{name}.up_proj", w.get("up_bias"))
    act = ops.swish(g) if activation == "silu" else ops.gelu(g, approximation_mode="tanh")
    return linear(ops.multiply(act, u).output(0), w["down"], f"{name}.down_proj", w.get("down_bias"))


# --- rotary position embedding ------------------------------------------------------------------

@dataclass(frozen=True)
class Rotary:
    """cos and sin [B, 1, L, dims] for one RoPE, computed once and shared by the layers using it.
    ``dims`` < head_dim is a partial rotary embedding (Phi-4-mini): only the first ``dims``
    channels of each head rotate."""

    cos: ov.Output
    sin: ov.Output
    dims: int


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
    def from_config(cls, config: dict, head_dim: int, *, theta: Optional[float] = None,
                    scaled: bool = True) -> "Rope":
        """Read RoPE settings from either config style: ``rope_theta`` + ``rope_scaling`` or the
        newer ``rope_parameters`` (which also carries ``rope_theta``).

        ``theta`` overrides the base and ``scaled=False`` ignores the scaling: Gemma 3's local
        layers use base ``rope_local_base_freq`` and no scaling.
        """
        params = dict(config.get("rope_scaling") or {}) if scaled else {}
        nested = config.get("rope_parameters") or {}
        # transformers 5 may nest the parameters per layer type; here the full-attention ones.
        if scaled:
            params.update(nested.get("full_attention", nested) if isinstance(nested, dict) else {})
        if theta is None:
            theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "su":  # the name early Phi-3 128k configs used for LongRoPE
            kind = "longrope"
        if kind not in cls.SUPPORTED:
            raise UnsupportedArchitectureError(
                f"RoPE type {kind!r} is not supported; supported: {', '.join(cls.SUPPORTED)}")
        partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
        dims = int(head_dim * partial)  # as transformers rounds it
        if not 0 < dims <= head_dim or dims % 2:
            raise UnsupportedArchitectureError(
                f"partial_rotary_factor {partial} gives {dims} rotary channels of {head_dim}; need an even number")
        exponents = np.arange(0, dims, 2, dtype=np.float64) / dims
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

    def cos_sin(self, position_ids: ov.Node) -> Rotary:
        """cos and sin of shape [B, 1, L, dims], computed once and shared by every layer."""
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
        return Rotary(ops.unsqueeze(cos, _i64([1])).output(0), ops.unsqueeze(sin, _i64([1])).output(0),
                      2 * len(self.inv_freq))


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


def apply_rope(x: ov.Output, rotary: Rotary) -> ov.Output:
    """x * cos + rotate_half(x) * sin on [B, H, L, head_dim] (the RoPE fusion's GPT-NeoX form).

    A partial rotary embedding rotates x[..., :dims] and concatenates the rest unchanged, the
    slicing form the plugin's RoPE fusion also accepts."""
    dims, half = rotary.dims, rotary.dims // 2
    if x.get_partial_shape()[3].is_static and x.get_partial_shape()[3].get_length() != dims:
        rotated = apply_rope(ops.slice(x, _i64([0]), _i64([dims]), _i64([1]), _i64([3])).output(0), rotary)
        rest = ops.slice(x, _i64([dims]), _i64([_INT64_MAX]), _i64([1]), _i64([3]))
        return ops.concat([rotated, rest], -1).output(0)
    first = ops.slice(x, _i64([0]), _i64([half]), _i64([1]), _i64([3]))
    second = ops.slice(x, _i64([half]), _i64([_INT64_MAX]), _i64([1]), _i64([3]))
    rotated = ops.concat([ops.multiply(second, _f32(-1.0)), first], -1)
    return ops.add(ops.multiply(x, rotary.cos), ops.multiply(rotated, rotary.sin)).output(0)


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
              rotary: Optional[Rotary], mask: ov.Output, layer: int, name: str,
              q_norm: Optional[Tuple[Weight, float, float]] = None,
              k_norm: Optional[Tuple[Weight, float, float]] = None,
              scale: Optional[float] = None) -> Tuple[ov.Output, List[ov.Node]]:
    """Self-attention over projected q/k/v [B, L, heads*head_dim]; returns the context
    [B, L, heads*head_dim] (before o_proj) and the two Assign sinks of this layer's cache.

    ``rotary`` None: no position embedding in this layer (SmolLM3's every fourth). ``q_norm`` and
    ``k_norm`` (gamma, eps, offset): an RMSNorm over each head before RoPE (Qwen3, Gemma 3).
    ``scale``: the factor of q.k when it is not 1/sqrt(head_dim) (Gemma 3's query_pre_attn_scalar).
    """
    q = _split_heads(q, shape.heads, shape.head_dim)
    k = _split_heads(k, shape.kv_heads, shape.head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm[0], q_norm[1], f"{name}.q_norm", offset=q_norm[2])
    if k_norm is not None:
        k = rms_norm(k, k_norm[0], k_norm[1], f"{name}.k_norm", offset=k_norm[2])
    if rotary is not None:
        q, k = apply_rope(q, rotary), apply_rope(k, rotary)
    v = _split_heads(v, shape.kv_heads, shape.head_dim)
    k, k_assign = _kv_cache(k, inp, shape, layer, "key")
    v, v_assign = _kv_cache(v, inp, shape, layer, "value")
    if scale is None:
        context = ops.scaled_dot_product_attention(q, _repeat_kv(k, shape), _repeat_kv(v, shape), mask,
                                                   causal=False, name=f"{name}/sdpa")
    else:
        context = ops.scaled_dot_product_attention(q, _repeat_kv(k, shape), _repeat_kv(v, shape), mask,
                                                   _f32(scale), causal=False, name=f"{name}/sdpa")
    context = ops.transpose(context, _i64([0, 2, 1, 3]))
    return ops.reshape(context, _i64([0, 0, -1]), special_zero=True).output(0), [k_assign, v_assign]


# --- encoders (sentence embeddings) -------------------------------------------------------------
# A sentence encoder reads a whole padded batch at once and attends both ways: no KV cache, no
# causal mask. Its IR is what openvino_genai.TextEmbeddingPipeline (and ovchat.embeddings) take:
# input_ids and attention_mask (and token_type_ids where the model has token types), i64
# [B, L]; the output "last_hidden_state" [B, L, hidden], pooled and normalized afterwards.

@dataclass(frozen=True)
class EncoderInputs:
    input_ids: ov.Node
    attention_mask: ov.Node
    token_type_ids: Optional[ov.Node]

    @property
    def parameters(self) -> List[ov.Node]:
        return [p for p in (self.input_ids, self.attention_mask, self.token_type_ids) if p is not None]

    def length(self) -> ov.Output:
        """L, the padded length, as i64 [1]."""
        return ops.gather(ops.shape_of(self.input_ids, "i64"), _i64([1]), _i64(0)).output(0)


def encoder_inputs(token_types: bool = False) -> EncoderInputs:
    def parameter(name: str) -> ov.Node:
        p = ops.parameter(ov.PartialShape([-1, -1]), ov.Type.i64, name=name)
        p.output(0).set_names({name})
        return p

    return EncoderInputs(parameter("input_ids"), parameter("attention_mask"),
                         parameter("token_type_ids") if token_types else None)


def encoder_model(inp: EncoderInputs, hidden: ov.Output, name: str, arrays: Sequence[np.ndarray] = ()) -> ov.Model:
    hidden.get_node().set_friendly_name("last_hidden_state")
    result = ops.result(hidden)
    result.output(0).set_names({"last_hidden_state"})
    hidden.set_names({"last_hidden_state"})
    built = ov.Model([result], inp.parameters, name)
    built._ovchat_shared_arrays = list(arrays)
    return built


def layer_norm(x: ov.Output, gamma: Weight, beta: Weight, eps: float, name: str) -> ov.Output:
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis: MVN with the epsilon inside
    the root, which the CPU plugin runs as one normalisation kernel."""
    normalized = ops.mvn(x, _i64([-1]), normalize_variance=True, eps=float(eps), eps_mode="inside_sqrt")
    return ops.add(ops.multiply(normalized, weight(gamma, f"{name}.weight")), weight(beta, f"{name}.bias"),
                   name=name).output(0)


def padding_bias(attention_mask: ov.Node) -> ov.Output:
    """[B, 1, 1, L]: 0 where a key is a token, a large negative where it is padding."""
    keep = ops.unsqueeze(ops.convert(attention_mask, ov.Type.boolean), _i64([1, 2]))
    return ops.select(keep, _f32(0.0), _f32(_MASKED)).output(0)


def encoder_attention(x: ov.Output, w: Mapping[str, Weight], *, heads: int, head_dim: int, bias: ov.Output,
                      name: str, rotary: Optional[Rotary] = None) -> ov.Output:
    """Bidirectional self-attention: q, k, v projections (with their biases where ``w`` has
    ``q_bias``...), an optional RoPE, SDPA with the additive ``bias`` (padding, plus MPNet's
    relative positions), and the output projection."""
    q = _split_heads(linear(x, w["q"], f"{name}.q", w.get("q_bias")), heads, head_dim)
    k = _split_heads(linear(x, w["k"], f"{name}.k", w.get("k_bias")), heads, head_dim)
    v = _split_heads(linear(x, w["v"], f"{name}.v", w.get("v_bias")), heads, head_dim)
    if rotary is not None:
        q, k = apply_rope(q, rotary), apply_rope(k, rotary)
    context = ops.scaled_dot_product_attention(q, k, v, bias, causal=False, name=f"{name}/sdpa")
    context = ops.reshape(ops.transpose(context, _i64([0, 2, 1, 3])), _i64([0, 0, -1]), special_zero=True)
    return linear(context.output(0), w["o"], f"{name}.o", w.get("o_bias"))


_GELU = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def gelu_mlp(x: ov.Output, w: Mapping[str, Weight], name: str, activation: str = "gelu") -> ov.Output:
    """BERT's feed-forward: out(gelu(in(x))), biases on both; ``activation`` is the config's
    hidden_act: "gelu" is the exact (erf) GELU, "gelu_new" and kin the tanh approximation."""
    if activation not in _GELU:
        raise UnsupportedArchitectureError(f"hidden_act {activation!r} is not supported; supported: "
                                           f"{', '.join(_GELU)}")
    h = ops.gelu(linear(x, w["in"], f"{name}.in", w.get("in_bias")), approximation_mode=_GELU[activation])
    return linear(h.output(0), w["out"], f"{name}.out", w.get("out_bias"))


def positions(inp: EncoderInputs) -> ov.Node:
    """0..L-1 as i64 [1, L], the absolute positions of a right-padded batch."""
    return ops.unsqueeze(ops.range(_i64(0), ops.squeeze(inp.length(), _i64([0])), _i64(1), "i64"), _i64([0]))
