"""The load plan: which model file, on which device, with which properties and context window.

Every way of running a model (``ChatSession``, ``ovchat serve``, ``ovchat bench``) takes the
same three steps before compiling anything: resolve the model argument to a path (pulling a
known name on first use), choose the device, and find the context window. ``plan`` takes them
once, in that order, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from ovchat.devices import DeviceChoice, choose_device, compile_properties
from ovchat.errors import InputError
from ovchat.modelfiles import context_length
from ovchat.progress import ProgressCallback, ignore


@dataclass(frozen=True)
class LoadPlan:
    """What to compile: ``model_path`` on ``device``; ``context_limit`` is the window in tokens
    (None where the model does not say and none was given)."""

    model_path: Path
    device: DeviceChoice
    context_limit: Optional[int]

    def properties(self, device: Optional[DeviceChoice] = None) -> Dict[str, str]:
        """Compile properties for ``device`` (the planned one, or the CPU a fallback chose)."""
        from ovchat.store import compile_cache_dir

        return compile_properties(device or self.device, compile_cache_dir())


def check_max_context(max_context: Optional[int]) -> None:
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):
        raise InputError(f"max_context must be a positive number of tokens, not {max_context!r}")


def plan(model: Optional[str | Path] = None, *, device: str = "auto", max_context: Optional[int] = None,
         available_devices: Optional[Sequence[str]] = None, progress: ProgressCallback = ignore) -> LoadPlan:
    """Resolve ``model`` (a store name, a known name, a directory, a .gguf; None: the default),
    choose ``device`` (auto, CPU, GPU, GPU.N, NPU) and the context window (``max_context``, else
    the model's own)."""
    from ovchat.store import resolve_model

    check_max_context(max_context)
    path = resolve_model(None if model is None else str(model), progress=progress)
    from ovchat.templatecheck import vet_model

    vet_model(path)
    choice = choose_device(device, available_devices)
    return LoadPlan(model_path=path, device=choice, context_limit=max_context or context_length(path))
