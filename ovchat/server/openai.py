"""The OpenAI API of `ovchat serve`: chat and text completions, models, and vLLM's /tokenize.

Each generation route parses its body (``schema``), takes the model it names from the pool
(loading it if need be), prepares the request (``prepare``), waits for a slot (``admission``),
and relays the engine's tokens (``relay``) as OpenAI's objects (``responses.Renderer``), whole or
as server-sent events.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ovchat.server.http import TOKENS, Stream, read_json, unless_client_leaves
from ovchat.server.prepare import prompt_ids
from ovchat.server.relay import Relay, embed, start
from ovchat.server.responses import Renderer, usage
from ovchat.server.schema import GenerationRequest, parse_chat, parse_completion, parse_embeddings, parse_tokenize


async def chat_completions(request: Request) -> Response:
    return await generate(request, parse_chat(await read_json(request)), "chat")


async def completions(request: Request) -> Response:
    return await generate(request, parse_completion(await read_json(request)), "text")


async def generate(request: Request, parsed: GenerationRequest, kind: str) -> Response:
    started = await start(request, parsed)
    relay = started.relay
    renderer = Renderer(kind, started.lease.model.name, lambda t: started.lease.model.client.tokenizer.decode([t]))
    handed_over = False
    try:
        if not parsed.stream:
            texts = await unless_client_leaves(request, relay.whole())
            request.scope[TOKENS] = (relay.prompt_tokens, relay.completion_tokens)
            return JSONResponse(renderer.whole(relay.choices, texts,
                                               usage(relay.prompt_tokens, relay.completion_tokens)))
        deltas = relay.deltas()
        # The first tokens come before the 200, so a request the engine refuses still gets its
        # status; they are also where a long prompt's prefill is spent.
        first = await unless_client_leaves(request, deltas.__anext__())

        def count() -> None:
            request.scope[TOKENS] = (relay.prompt_tokens, relay.completion_tokens)

        response = Stream(_events(renderer, first, deltas, relay, parsed.include_usage, count),
                          on_close=started.release, path=request.url.path)
        handed_over = True
        return response
    finally:
        if not handed_over:
            await relay.aclose()
            started.release()


async def _events(renderer: Renderer, first: tuple, deltas: AsyncIterator[tuple], relay: Relay, include_usage: bool,
                  count: Callable[[], None]) -> AsyncIterator[Dict[str, Any]]:
    """The events of a streamed reply: a role chunk per choice (chat), deltas, finish chunks, usage."""
    if renderer.chat:
        for c in relay.choices:
            yield renderer.chunk(c.index, {}, None, include_usage, first=True)
    item: Optional[tuple] = first
    while item is not None:
        index, delta, finish = item
        count()
        if any(v for k, v in delta.items() if k != "_logprobs") or (delta.get("_logprobs") and finish is None):
            calls = delta.pop("tool_calls", None)
            if any(v for k, v in delta.items() if k != "_logprobs"):
                yield renderer.chunk(index, delta, None, include_usage)
            if calls:
                yield renderer.chunk(index, {"tool_calls": calls}, None, include_usage)
        if finish is not None:
            yield renderer.chunk(index, {}, finish, include_usage)
        item = await deltas.__anext__() if not relay.finished else None
    if include_usage:
        yield renderer.usage_chunk(usage(relay.prompt_tokens, relay.completion_tokens))


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: the prompt's tokens as a generation would see them (a chat through the
    template, or a plain text), with the window; `ovchat run` on the warm path counts its turns here."""
    parsed = parse_tokenize(await read_json(request))
    server = request.app.state.server
    server.pool.require(parsed.model, "chat")
    lease = await unless_client_leaves(request, server.pool.acquire(parsed.model))
    try:
        model = lease.model
        ids, _ = await asyncio.to_thread(prompt_ids, parsed, model.client.tokenizer, model.name)
    finally:
        lease.release()
    return JSONResponse({"count": len(ids), "max_model_len": model.context_limit, "tokens": ids})


async def embeddings(request: Request) -> Response:
    """OpenAI's /v1/embeddings; each item also says whether its input was truncated to the
    model's window (an ovchat field beside OpenAI's)."""
    import base64

    parsed = parse_embeddings(await read_json(request))
    name, result = await embed(request, parsed)
    data = []
    for i, (vector, cut) in enumerate(zip(result.vectors, result.truncated)):
        value = base64.b64encode(vector.astype("<f4").tobytes()).decode() if parsed.base64 else \
            [float(x) for x in vector]
        data.append({"object": "embedding", "index": i, "embedding": value, "truncated": cut})
    tokens = sum(result.tokens)
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def models(request: Request) -> Response:
    server = request.app.state.server
    return JSONResponse({"object": "list", "data": [model_card(server, s.name) for s in server.pool.sources()]})


async def model(request: Request) -> Response:
    server = request.app.state.server
    name = request.path_params["model"]
    server.pool.source(name)  # model_not_found for anything else
    return JSONResponse(model_card(server, name))


def model_card(server: Any, name: str) -> Dict[str, Any]:
    """OpenAI's model object, with vLLM's max_model_len and what ovchat knows (loaded or not)."""
    source = server.pool.source(name)
    served = server.pool.served(source.name)
    facts = server.pool.facts(source)
    return {"id": source.name, "object": "model", "created": int(facts.modified), "owned_by": "ovchat",
            "max_model_len": facts.context_limit,
            "ovchat": {"loaded": served.client is not None, "state": served.state, "kind": server.pool.kind(source),
                       "chat_template": bool(facts.chat_template)}}


ROUTES: List[Route] = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model, methods=["GET"]),
]
