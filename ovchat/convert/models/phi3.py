"""Phi-3 (mini/small 4k, the 128k LongRoPE variants) and Phi-4-mini: Llama's wiring over fused weights.

``qkv_proj`` holds q, k and v rows one after the other and ``gate_up_proj`` the gate rows then
the up rows. They are split here into row ranges (views of the checkpoint's memory, or of a GGUF's
kept blocks), so the graph and NNCF see ordinary separate MatMul weights. The sliding window
(2047 in the 4k models) is honoured; LongRoPE's tables come from ``rope_scaling``. Phi-4-mini adds
grouped-query attention, tied embeddings and a partial rotary embedding (``partial_rotary_factor``
0.75: 96 of 128 channels per head rotate), all of which the shared blocks handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import openvino as ov

from ovchat.convert.models import llama
from ovchat.progress import ProgressCallback, ignore


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-5
    original_max_position_embeddings: Optional[int] = None
    partial_rotary_factor: float = 1.0


def attention_weights(get, prefix: str, args: ModelArgs) -> llama.LayerWeights:
    qkv = get(f"{prefix}.self_attn.qkv_proj.weight")
    q_rows = args.num_attention_heads * args.head_size
    kv_rows = args.kv_heads * args.head_size
    return {"q": qkv.rows(0, q_rows),
            "k": qkv.rows(q_rows, q_rows + kv_rows),
            "v": qkv.rows(q_rows + kv_rows, q_rows + 2 * kv_rows),
            "o": get(f"{prefix}.self_attn.o_proj.weight")}


def mlp_weights(get, prefix: str, args: ModelArgs) -> llama.LayerWeights:
    gate_up = get(f"{prefix}.mlp.gate_up_proj.weight")
    n = args.intermediate_size
    return {"gate": gate_up.rows(0, n), "up": gate_up.rows(n, 2 * n),
            "down": get(f"{prefix}.mlp.down_proj.weight")}


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    return llama.decoder(checkpoint, ModelArgs.from_config(checkpoint.config), progress=progress,
                         attention_weights=attention_weights, mlp_weights=mlp_weights)
