"""Qwen2 / Qwen2.5: Llama's wiring with q/k/v biases and an optional per-layer sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import openvino as ov

from ovchat.convert.models import llama
from ovchat.progress import ProgressCallback, ignore


@dataclass
class ModelArgs(llama.ModelArgs):
    use_sliding_window: bool = False
    max_window_layers: int = 0
    layer_types: Optional[List[str]] = None

    def layer_window(self, layer: int) -> Optional[int]:
        if not self.use_sliding_window or not self.sliding_window:
            return None
        if self.layer_types:
            sliding = self.layer_types[layer] == "sliding_attention"
        else:
            sliding = layer >= self.max_window_layers
        return self.sliding_window if sliding else None


def attention_weights(get, prefix: str, args: ModelArgs) -> llama.LayerWeights:
    w = llama.attention_weights(get, prefix, args)
    for p in ("q", "k", "v"):
        w[f"{p}_bias"] = get(f"{prefix}.self_attn.{p}_proj.bias")
    return w


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    return llama.decoder(checkpoint, ModelArgs.from_config(checkpoint.config), progress=progress,
                         attention_weights=attention_weights)
