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

from ovchat.devices import NPU_DEFAULT_WINDOW, DeviceChoice, choose_device, compile_properties, npu_window
from ovchat.errors import InputError, OvchatError
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

        return compile_properties(device or self.device, compile_cache_dir(), context_limit=self.context_limit)

    def prompt_limit(self, device: Optional[DeviceChoice] = None) -> Optional[int]:
        """The longest prompt ``device`` takes, where it is less than the window: the NPU's
        MAX_PROMPT_LEN (its shapes are compiled in); None elsewhere."""
        if (device or self.device).family != "NPU":
            return None
        return npu_window(self.context_limit)[0]


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
    choice = choose_device(device, available_devices, npu_ready=_converted_for_npu(path))
    window = max_context or context_length(path)
    if choice.family == "NPU" and not max_context:  # static shapes: a bounded window unless asked for more
        window = min(window or NPU_DEFAULT_WINDOW, NPU_DEFAULT_WINDOW)
    return LoadPlan(model_path=path, device=choice, context_limit=window)


def _converted_for_npu(path: Path) -> bool:
    from ovchat.modelfiles import MANIFEST, read_manifest

    if Path(path).is_file() or not (Path(path) / MANIFEST).is_file():
        return False
    try:
        return (read_manifest(path).get("recipe") or {}).get("target") == "NPU"
    except OvchatError:
        return False
