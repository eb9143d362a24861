"""ovchat: chat with a local LLM through OpenVINO GenAI, without PyTorch.

Public API::

    from ovchat import ChatSession
    session = ChatSession()            # the default model, on the best device
    print(session.send("Hello!"))

    from ovchat import Embedder
    vectors = Embedder("all-mpnet-base-v2").encode(["Hello!"])

    from ovchat.convert import convert  # needs the convert extra
    convert("model.gguf", "out/model")

Heavy modules (OpenVINO, NNCF) are imported on first use, so importing ovchat is instant.
(``convert`` is not re-exported here: the name belongs to the ``ovchat.convert`` package, which
Python binds to ``ovchat.convert`` as soon as it is imported.)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "ChatSession": "ovchat.session",
    "Response": "ovchat.session",
    "Reply": "ovchat.session",
    "TurnMetrics": "ovchat.session",
    "GenerationOptions": "ovchat.options",
    "OvchatError": "ovchat.errors",
    "Embedder": "ovchat.embeddings",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from ovchat.session import ChatSession, Reply, Response, TurnMetrics
    from ovchat.embeddings import Embedder
    from ovchat.errors import OvchatError
    from ovchat.options import GenerationOptions


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ovchat' has no attribute {name!r}")
