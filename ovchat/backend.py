"""What ChatSession asks of the model it talks to, wherever that model runs.

Two backends implement it: ``ovchat.local.LocalBackend``, an ``LLMPipeline`` in this process, and
``ovchat.remote.RemoteBackend``, a running `ovchat serve` (the warm path), as vLLM's engine client
has an in-process and a multiprocess implementation. ChatSession keeps everything a
conversation is (the messages, the window policy, the tool plan, what is recorded); a backend
only counts tokens and generates, and reports how a generation ended as an ``Outcome``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

from ovchat.devices import DeviceChoice
from ovchat.options import GenerationOptions
from ovchat.structured import ResponseFormat
from ovchat.toolcalls import ToolCall, ToolPlan


@dataclass(frozen=True)
class Request:
    """One generation: a chat turn (``messages``, shaped by ``plan`` and ``response_format``) or
    the continuation of a plain text (``prompt``), of at most ``max_new_tokens`` tokens."""

    options: GenerationOptions
    max_new_tokens: int
    messages: Optional[List[Dict[str, Any]]] = None
    prompt: Optional[str] = None
    plan: ToolPlan = field(default_factory=ToolPlan)
    response_format: Optional[ResponseFormat] = None


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: its text outside tool calls, the calls, and what it cost.
    ``finish_reason``: stop, length or cancelled. Times in seconds."""

    text: str
    tool_calls: Tuple[ToolCall, ...] = ()
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    generate_s: float = 0.0
    # Tokens per call of the model after the first: 1 without speculative decoding (None: unknown).
    tokens_per_step: Optional[float] = None


class Backend(Protocol):
    model_path: Path
    device: DeviceChoice
    context_limit: Optional[int]  # the model's window in tokens (None: unknown)
    prompt_limit: Optional[int]  # a shorter bound on the prompt alone (the NPU's MAX_PROMPT_LEN), or None
    load_s: float
    has_chat_template: bool

    def count(self, messages: List[Dict[str, Any]], plan: ToolPlan, *, add_generation_prompt: bool = True) -> int:
        """Tokens of ``messages`` through the chat template (with the plan's tools shown)."""

    def count_text(self, text: str) -> int:
        """Tokens of a plain text as a raw completion's prompt (with the model's BOS)."""

    def generate(self, request: Request, cancel: threading.Event,
                 done: Callable[[Outcome], None]) -> Iterator[str]:
        """Stream the reply's text (tool calls held back). ``done`` is called exactly once when
        the generation ends, however it ends: exhausted, closed early, cancelled, or failed (then
        with what was generated, before the GenerationError is raised). ``cancel`` set from any
        thread stops it at the next token."""
