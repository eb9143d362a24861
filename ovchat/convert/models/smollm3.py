"""SmolLM3: Llama's wiring in which some layers use no position embedding at all ("NoPE").

``no_rope_layers`` has one entry per layer, 1 where the layer applies RoPE and 0 where it does
not; the released models skip it in every fourth layer (``no_rope_layer_interval`` 4), which is
what a config without the list gets. With ``use_sliding_window`` only the layers ``layer_types``
calls sliding attend within the window; without the list, as transformers derives it, those
are the NoPE layers (no released model sets the flag, but the config is legal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import openvino as ov

from ovchat.convert.models import llama
from ovchat.progress import ProgressCallback, ignore


@dataclass
class ModelArgs(llama.ModelArgs):
    no_rope_layers: Optional[List[int]] = None
    no_rope_layer_interval: int = 4
    use_sliding_window: bool = False
    layer_types: Optional[List[str]] = None

    def layer_window(self, layer: int) -> Optional[int]:
        if not self.use_sliding_window or not self.sliding_window:
            return None
        if self.layer_types is not None:
            sliding = self.layer_types[layer] == "sliding_attention"
        else:
            sliding = not self.layer_rotates(layer)
        return self.sliding_window if sliding else None

    def layer_rotates(self, layer: int) -> bool:
        if self.no_rope_layers is not None:
            return bool(self.no_rope_layers[layer])
        return (layer + 1) % self.no_rope_layer_interval != 0


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    return llama.decoder(checkpoint, ModelArgs.from_config(checkpoint.config), progress=progress)
