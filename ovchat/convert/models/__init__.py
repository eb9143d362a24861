"""One module per architecture; ``build_model`` picks it from the checkpoint's config
(through the registry, ``ovchat.convert.families``)."""

from __future__ import annotations

from importlib import import_module

import openvino as ov

from ovchat.convert.families import family_of
from ovchat.progress import ProgressCallback, ignore

def build_model(checkpoint, *, progress: ProgressCallback = ignore) -> ov.Model:
    """The float, stateful OpenVINO model of ``checkpoint`` (see ovchat.convert.graph).

    Its Constants share the checkpoint's (memory-mapped) arrays without owning them; the returned
    Python object holds them. Keep it alive while the model, or anything compiled from it, is
    used (``convert`` keeps it until the compressed model is saved; saving it and reading the IR
    back, as ``convert`` does for GGUF sources, ends that dependence).
    """
    module = import_module(f"{__name__}.{family_of(checkpoint.config).module}")
    return module.build(checkpoint, progress=progress)
