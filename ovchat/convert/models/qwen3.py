"""Qwen3 (0.6B to 32B dense): Qwen2's wiring with an RMSNorm over each query and key head.

q_norm and k_norm normalise every head's q and k over ``head_dim`` before RoPE. Unlike Qwen2,
Qwen3 has no q/k/v biases (``attention_bias`` false); it has an explicit ``head_dim`` (128, not
hidden_size / heads in every size) and tied embeddings in the small sizes. Sliding windows, where
a config enables them, follow Qwen2's rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import openvino as ov

from ovchat.convert.models import llama, qwen2
from ovchat.progress import ProgressCallback, ignore


@dataclass
class ModelArgs(qwen2.ModelArgs):
    qk_norm = True


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    return llama.decoder(checkpoint, ModelArgs.from_config(checkpoint.config), progress=progress)
