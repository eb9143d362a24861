"""Mistral: Llama's wiring with a sliding window (``sliding_window``; null in v0.2 and later)."""

from __future__ import annotations

import openvino as ov

from ovchat.convert.models import llama
from ovchat.progress import ProgressCallback, ignore

ModelArgs = llama.ModelArgs  # the same fields; sliding_window is honoured by every layer


def build(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    return llama.decoder(checkpoint, ModelArgs.from_config(checkpoint.config), progress=progress)
