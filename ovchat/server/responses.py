"""OpenAI's response objects, built from the engine's token stream: one ``Choice`` per output.

A choice turns token ids into text incrementally (``IncrementalText``), splits off the model's
reasoning (text between its thinking tags, as ``reasoning_content``) and its tool calls (parsed
from its own format, or forced by a grammar), and keeps the chosen tokens' log-probabilities.
``Renderer`` wraps choices into ``chat.completion``/``text_completion`` objects and stream chunks.
Nothing here knows about HTTP or the engine process.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ovchat.toolcalls import Splitter, ToolCall, ToolPlan

# A text piece ending in U+FFFD is a multi-byte character cut between tokens: wait for the rest.
_PARTIAL_CHARACTER = "\ufffd"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class IncrementalText:
    """One reply's token ids turned into text piece by piece.

    A short window of already-sent tokens is decoded with and without the new ones and only the
    difference is sent (as vLLM does), so the tokenizer's spacing comes out as in a whole decode,
    a multi-byte character cut between tokens waits for its rest, and the cost per step does not
    grow with the reply.
    """

    def __init__(self, decode: Callable[[List[int]], str]):
        self._decode = decode
        self.ids: List[int] = []
        # ids[prefix:read] were sent already and give the window its context; ids[read:] were not.
        self._prefix = 0
        self._read = 0

    def add(self, ids: List[int]) -> None:
        self.ids.extend(ids)

    def take(self, *, final: bool = False) -> str:
        """The text the unsent ids add: "" while it ends in a cut character, unless ``final``."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(self.ids[self._prefix:])
        if not final and (len(after) <= len(before) or after.endswith(_PARTIAL_CHARACTER)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        piece = after[len(before):]
        # The reply ended inside a character (cut by max_tokens): drop the half, not show U+FFFD.
        return piece.rstrip(_PARTIAL_CHARACTER) if final else piece


class Reasoning:
    """Splits text into reasoning (inside the thinking tags) and content (after them).

    ``thinking``: the prompt already opened the tags (some templates end the generation prompt
    with <think>). A tag cut between pieces is held back until it is clear what it is, and the
    line breaks right after </think> are dropped, as the tags' own layout.
    """

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self._pending = ""
        self._started = thinking  # past the point where a <think> could still open
        self._after_close = False

    def feed(self, piece: str) -> Dict[str, str]:
        out = {"reasoning_content": "", "content": ""}
        text = self._pending + piece
        self._pending = ""
        while text:
            if self.thinking:
                at = text.find(THINK_CLOSE)
                if at < 0:
                    keep = max((k for k in range(1, len(THINK_CLOSE)) if text.endswith(THINK_CLOSE[:k])), default=0)
                    out["reasoning_content"] += text[:len(text) - keep]
                    self._pending = text[len(text) - keep:]
                    break
                out["reasoning_content"] += text[:at]
                text = text[at + len(THINK_CLOSE):]
                self.thinking, self._after_close = False, True
                continue
            if self._after_close:
                text = text.lstrip("\n")
                if not text:
                    break
                self._after_close = False
            if not self._started:
                stripped = text.lstrip()
                if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                    self._pending = text  # "<thi": wait for the rest
                    break
                self._started = True
                if stripped.startswith(THINK_OPEN):
                    self.thinking = True
                    text = stripped[len(THINK_OPEN):]
                    continue
            out["content"] += text
            break
        return {k: v for k, v in out.items() if v}

    def flush(self) -> Dict[str, str]:
        text, self._pending = self._pending, ""
        return {("reasoning_content" if self.thinking else "content"): text} if text else {}


@dataclass
class Choice:
    """One output of a request, from tokens to OpenAI's choice."""

    index: int
    decode: Callable[[List[int]], str]
    tools: ToolPlan
    template: str = ""
    reasoning: Optional[Reasoning] = None
    logprobs: Optional[List[tuple]] = None  # (token id, logprob), when asked for
    finish_reason: Optional[str] = None
    text: IncrementalText = field(init=False)
    calls: List[ToolCall] = field(default_factory=list)
    _splitter: Optional[Splitter] = field(default=None, init=False)
    _forced_text: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.text = IncrementalText(self.decode)
        self._splitter = self.tools.splitter(self.template)

    @property
    def tokens(self) -> int:
        return len(self.text.ids)

    def add(self, ids: List[int], logprobs: List[float], finish: Optional[str]) -> Dict[str, Any]:
        """Take new tokens; return the delta to stream now ({"content", "reasoning_content",
        "tool_calls"}, possibly empty) and, with ``finish``, end the choice."""
        start = len(self.text.ids)
        self.text.add(ids)
        if self.logprobs is not None:
            self.logprobs.extend(zip(ids, logprobs or [0.0] * len(ids)))
        piece = self.text.take(final=finish is not None)
        delta = self._route(piece)
        if finish is not None:
            delta = _merge(delta, self._finish(finish))
        if self.logprobs is not None and (delta or finish is not None):
            delta["_logprobs"] = self.logprobs[start:]
        return delta

    def _route(self, piece: str) -> Dict[str, Any]:
        if self.tools.forced:
            self._forced_text += piece
            return {}
        parts = self.reasoning.feed(piece) if self.reasoning is not None else ({"content": piece} if piece else {})
        if self._splitter is not None and parts.get("content"):
            passed = self._splitter.feed(parts["content"])
            parts = {k: v for k, v in {**parts, "content": passed}.items() if v}
        return parts

    def _finish(self, reason: str) -> Dict[str, Any]:
        delta: Dict[str, Any] = {}
        if self.reasoning is not None:
            rest = self.reasoning.flush()
            if "content" in rest and self._splitter is not None:
                rest["content"] = self._splitter.feed(rest["content"])
            delta = _merge(delta, {k: v for k, v in rest.items() if v})
        if self.tools.forced:
            text, self.calls = self.tools.finish(self._forced_text, self.template)
            if text:
                delta = _merge(delta, {"content": text})
        elif self._splitter is not None:
            text, self.calls = self._splitter.finish()
            if text:
                delta = _merge(delta, {"content": text})
        if not self.tools.parallel:
            self.calls = self.calls[:1]
        if self.calls:
            delta["tool_calls"] = [c.as_openai(i) for i, c in enumerate(self.calls)]
            reason = "tool_calls"
        self.finish_reason = reason
        return delta


def _merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, "") + v if isinstance(v, str) else v
    return out


class Renderer:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, kind: str, model_id: str, token_text: Callable[[int], str]):
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.model = model_id
        self.created = int(time.time())
        self._token_text = token_text

    def envelope(self, obj: str, choices: list, **extra: Any) -> Dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def logprobs(self, pairs: Optional[List[tuple]], offset: int = 0) -> Optional[Dict[str, Any]]:
        """The chosen tokens' log-probabilities, in the chat or the completions shape."""
        if pairs is None:
            return None
        texts = [self._token_text(t) for t, _ in pairs]
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
                                for s, (_, lp) in zip(texts, pairs)]}
        offsets, at = [], offset
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {"tokens": texts, "token_logprobs": [lp for _, lp in pairs], "top_logprobs": None,
                "text_offset": offsets}

    def whole(self, choices: List["Choice"], texts: Dict[int, Dict[str, str]], usage: Dict[str, int]) -> Dict[str, Any]:
        out = []
        for c in choices:
            got = texts[c.index]
            if self.chat:
                message: Dict[str, Any] = {"role": "assistant", "content": got.get("content", "") or
                                           (None if c.calls else "")}
                if got.get("reasoning_content"):
                    message["reasoning_content"] = got["reasoning_content"]
                if c.calls:
                    message["tool_calls"] = [call.as_openai() for call in c.calls]
                out.append({"index": c.index, "message": message, "logprobs": self.logprobs(c.logprobs),
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": c.index, "text": got.get("content", ""), "logprobs": self.logprobs(c.logprobs),
                            "finish_reason": c.finish_reason})
        return self.envelope("chat.completion" if self.chat else "text_completion", out, usage=usage)

    def chunk(self, index: int, delta: Dict[str, Any], finish: Optional[str], include_usage: bool,
              first: bool = False) -> Dict[str, Any]:
        pairs = delta.pop("_logprobs", None)
        if self.chat:
            body: Dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            body.update({k: v for k, v in delta.items() if v})
            choice = {"index": index, "delta": body, "logprobs": self.logprobs(pairs), "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta.get("content", ""), "logprobs": self.logprobs(pairs),
                      "finish_reason": finish}
            obj = "text_completion"
        return self.envelope(obj, [choice], **({"usage": None} if include_usage else {}))

    def usage_chunk(self, usage: Dict[str, int]) -> Dict[str, Any]:
        return self.envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)


def usage(prompt: int, completion: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
