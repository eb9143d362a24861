"""One request's generation on its way to the client, in either API's shape.

``start`` takes the model a request names from the pool (loading it if need be), prepares the
request, waits for a slot and starts generating. A ``Relay`` sends a prepared request to the model's engine and turns the tokens that come back
into each choice's text, reasoning and tool calls (``responses.Choice``), timing them for
/metrics. The OpenAI and the ollama routes consume the same ``deltas`` and only dress them
differently. Closing it (or leaving its iteration early) cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Dict, Optional, Tuple

from starlette.requests import Request

from ovchat.server.http import MODEL, TOKENS, unless_client_leaves
from ovchat.server.metrics import Metrics
from ovchat.server.prepare import Prepared, prepare
from ovchat.server.responses import Choice, Reasoning
from ovchat.server.schema import GenerationRequest

Delta = Dict[str, Any]  # "content", "reasoning_content", "tool_calls", "_logprobs"


class Relay:
    def __init__(self, client: Any, prepared: Prepared, *, n: int = 1, logprobs: bool = False,
                 metrics: Optional[Metrics] = None, arrived: Optional[float] = None):
        self.prepared = prepared
        self.choices = [Choice(i, client.tokenizer.decode, prepared.plan, prepared.template,
                               Reasoning(prepared.thinking) if prepared.thinking is not None else None,
                               [] if logprobs else None) for i in range(n)]
        self._outputs = client.generate(prepared.ids, prepared.settings)
        self._metrics = metrics
        self.arrived = arrived if arrived is not None else time.perf_counter()
        self.first: Optional[float] = None  # when the first token came
        self.last: Optional[float] = None
        self._after_first = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.ids)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def deltas(self) -> AsyncIterator[Tuple[int, Delta, Optional[str]]]:
        """(choice index, what it adds now, its finish reason once it has ended) until every
        choice has ended. The first is awaited before a stream's 200 goes out, so a request the
        engine refuses still gets its status."""
        async with contextlib.aclosing(self._outputs) as outputs:
            async for out in outputs:
                self._tick(len(out.ids))
                choice = self.choices[out.index]
                delta = choice.add(out.ids, out.logprobs, out.finish)
                yield out.index, delta, choice.finish_reason if out.finish is not None else None
                if self.finished:
                    break
        self._done()

    async def whole(self) -> Dict[int, Dict[str, str]]:
        """Each choice's whole text and reasoning (its tool calls are on the choice)."""
        texts: Dict[int, Dict[str, str]] = {c.index: {} for c in self.choices}
        async for index, delta, _ in self.deltas():
            for key in ("content", "reasoning_content"):
                if delta.get(key):
                    texts[index][key] = texts[index].get(key, "") + delta[key]
        return texts

    async def aclose(self) -> None:
        await self._outputs.aclose()

    def _tick(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.first is None and tokens:
            self.first = now
            if self._metrics is not None:
                self._metrics.first_token(now - self.arrived)
            tokens -= 1
        self._after_first += tokens
        self.last = now

    def _done(self) -> None:
        if self.first is not None and self._metrics is not None:
            self._metrics.tokens_after_first(self._after_first, time.perf_counter() - self.first)

    def timings(self) -> Dict[str, float]:
        """Seconds from arrival to the first token (prompt evaluation) and from there to the last."""
        first = self.first or time.perf_counter()
        return {"prompt_s": first - self.arrived, "eval_s": (self.last or first) - first,
                "total_s": time.perf_counter() - self.arrived}


class Started:
    """A generation under way: the model's lease, the slot, the relay; released once."""

    def __init__(self, lease: Any, slot: Any, relay: Relay):
        self.lease, self.slot, self.relay = lease, slot, relay

    def release(self) -> None:
        self.slot.release()
        self.lease.release()


async def start(request: Request, parsed: GenerationRequest, keep_alive: Any = "default") -> Started:
    """Take the model (loading it if need be), prepare the request, wait for a slot, and start
    generating; the caller releases what it returns (the route, or the stream once it ends)."""
    server = request.app.state.server
    arrived = time.perf_counter()
    server.pool.require(parsed.model, "chat")
    lease = await unless_client_leaves(request, server.pool.acquire(parsed.model, keep_alive_s=keep_alive))
    try:
        model = lease.model
        request.scope[MODEL] = model.name
        client = model.client
        prepared = await asyncio.to_thread(prepare, parsed, client.tokenizer, model.name,
                                           context_limit=model.context_limit, speculation=client.spec.speculation)
        request.scope[TOKENS] = (len(prepared.ids), 0)
        slot = await unless_client_leaves(request, model.admission.acquire())
    except BaseException:
        lease.release()
        raise
    return Started(lease, slot, Relay(client, prepared, n=parsed.n, logprobs=parsed.logprobs,
                                      metrics=server.metrics, arrived=arrived))


async def embed(request: Request, parsed: Any, keep_alive: Any = "default") -> Tuple[str, Any]:
    """An embeddings request answered by the embedding model it names (loaded if need be):
    (the model's name, protocol.Embedded)."""
    from ovchat.errors import InvalidRequestError

    server = request.app.state.server
    server.pool.require(parsed.model, "embedding")
    lease = await unless_client_leaves(request, server.pool.acquire(parsed.model, keep_alive_s=keep_alive))
    try:
        model = lease.model
        request.scope[MODEL] = model.name
        slot = await unless_client_leaves(request, model.admission.acquire())
        try:
            result = await unless_client_leaves(request, model.client.embed(parsed.inputs, parsed.dimensions))
        finally:
            slot.release()
    finally:
        lease.release()
    request.scope[TOKENS] = (sum(result.tokens), 0)
    if not parsed.truncate and any(result.truncated):
        first = result.truncated.index(True)
        raise InvalidRequestError(f"input {first} is longer than the model's window; shorten it or allow truncate",
                                  "input", "context_length_exceeded")
    return model.name, result
