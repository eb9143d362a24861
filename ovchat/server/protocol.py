"""What the HTTP process and an engine process say to each other, as small frozen dataclasses.

    HTTP -> engine   Add(rid, prompt_ids, settings)   Embed(rid, inputs, dimensions)   Cancel(rid)   Stop()
    engine -> HTTP   Ready(load_s, device, pid)   Fatal(message)   Step(updates, stats)

An ``Update`` carries, for one request that made progress, its new tokens per output (with their
log-probabilities when asked for), the outputs that finished and why, or the ``Failure`` that
ended it. Failures are domain codes with a message; only the HTTP layer knows statuses. The
messages are pickled over a ``multiprocessing`` pipe, so they hold plain data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from ovchat.options import GenerationSettings

# Why a request failed inside the engine.
INVALID = "invalid_request"            # GenAI refused its settings
KV_CACHE_EXCEEDED = "kv_cache_exceeded"  # it cannot fit in the KV cache even alone
ENGINE_FAILED = "engine_failed"          # a generation step failed


# -- HTTP -> engine -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Add:
    rid: int
    prompt_ids: Tuple[int, ...]
    settings: GenerationSettings


@dataclass(frozen=True)
class Embed:
    """Texts (or token-id tuples) for an embedding model; ``dimensions`` cuts each vector."""

    rid: int
    inputs: Tuple[object, ...]
    dimensions: Optional[int] = None


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Stop:
    pass


# -- engine -> HTTP -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    load_s: float
    device: str
    pid: int


@dataclass(frozen=True)
class Fatal:
    """The model could not be loaded; the engine process ends."""

    message: str


@dataclass(frozen=True)
class Failure:
    code: str
    message: str = ""


@dataclass(frozen=True)
class Tokens:
    ids: Tuple[int, ...]
    logprobs: Tuple[float, ...] = ()


@dataclass(frozen=True)
class Embedded:
    """An Embed request's answer: ``vectors`` [n, dimensions] float32, each input's tokens, and
    which inputs were longer than the model's window (and cut)."""

    vectors: object  # numpy array
    tokens: Tuple[int, ...]
    truncated: Tuple[bool, ...]


@dataclass(frozen=True)
class Update:
    """News of one request: new tokens by output index, outputs finished (``stop``/``length``),
    an embedding request's answer, or the failure that ended the whole request."""

    rid: int
    outputs: Dict[int, Tokens] = field(default_factory=dict)
    finished: Dict[int, str] = field(default_factory=dict)
    failure: Optional[Failure] = None
    embedded: Optional[Embedded] = None


@dataclass(frozen=True)
class Stats:
    running: int = 0            # requests the scheduler ran in the last step
    requests: int = 0           # requests the pipeline holds
    kv_cache_usage: float = 0.0  # share of the KV cache in use, 0..1
    active: int = 0             # requests the engine is tracking
    kv_cache_bytes: int = 0     # what the KV cache holds now (it grows with the work)


@dataclass(frozen=True)
class Step:
    updates: Tuple[Update, ...]
    stats: Stats

