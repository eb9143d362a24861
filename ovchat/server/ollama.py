"""The ollama API of `ovchat serve`, for the clients appliances already use (Home Assistant's
Ollama integration, Open WebUI, LangChain's ChatOllama, Continue, the official ``ollama`` package).

Requests are translated into the same ``GenerationRequest`` the OpenAI routes build (ollama's
``options`` mapped onto the sampling fields, ``format`` onto JSON output, ``tools`` and tool
calls, ``think``, ``keep_alive``), so generation, tools and limits behave identically; replies are
ollama's objects, streamed as newline-delimited JSON by default, with its durations in
nanoseconds. Errors are ``{"error": "..."}`` (404 for an unknown model), as ollama sends them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ovchat import __version__
from ovchat.errors import InvalidRequestError, OvchatError
from ovchat.server.http import TOKENS, Stream, read_json, unless_client_leaves
from ovchat.server.relay import Started, embed as run_embed, start
from ovchat.server.schema import parse_chat, parse_completion, parse_embeddings
from ovchat.units import parse_duration

# ollama's options -> the OpenAI field parse_chat reads (the rest are load-time settings of
# llama.cpp that have no meaning here and are ignored, as ollama ignores unknown ones).
_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "repeat_penalty": "repetition_penalty"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _keep_alive(body: Mapping[str, Any]) -> Any:
    """ollama's keep_alive in seconds (None: forever), or "default" when not given."""
    if body.get("keep_alive") is None:
        return "default"
    try:
        return parse_duration(body["keep_alive"], what="'keep_alive'")
    except OvchatError as e:
        raise InvalidRequestError(str(e), "keep_alive") from None


def _openai_fields(body: Mapping[str, Any]) -> Dict[str, Any]:
    """The OpenAI request fields of an ollama body's options, format and stream."""
    out: Dict[str, Any] = {"model": body.get("model"), "stream": body.get("stream", True)}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequestError("'options' must be an object", "options")
    for name, field in _OPTIONS.items():
        if options.get(name) is not None:
            out[field] = options[name]
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] < 0:
        del out["max_tokens"]  # -1 (until it stops) and -2 (fill the window): the window bounds it
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidRequestError("'format' must be \"json\" or a JSON schema", "format")
    return out


def _extras(body: Mapping[str, Any]) -> Dict[str, Any]:
    """What ollama's body sets beyond the OpenAI fields: num_ctx, min_p, think."""
    options = body.get("options") or {}
    extras: Dict[str, Any] = {}
    num_ctx = options.get("num_ctx")
    if num_ctx is not None:
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 1:
            raise InvalidRequestError("'options.num_ctx' must be a positive number of tokens", "options.num_ctx")
        extras["context_limit"] = num_ctx
    min_p = options.get("min_p")
    if min_p is not None:
        if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
            raise InvalidRequestError("'options.min_p' must be a number from 0 to 1", "options.min_p")
        extras["extra_settings"] = {"min_p": float(min_p)}
    think = body.get("think")
    if think is not None:
        if think not in (True, False, "high", "medium", "low"):
            raise InvalidRequestError("'think' must be true or false", "think")
        extras["think"] = bool(think)
    return extras


def _messages(messages: Any) -> List[Dict[str, Any]]:
    """ollama's messages as OpenAI's: tool calls get ids, and a tool result answers the call of
    its ``tool_name`` (else the last call still unanswered)."""
    if not isinstance(messages, list):
        raise InvalidRequestError("'messages' must be an array of messages", "messages")
    out: List[Dict[str, Any]] = []
    open_calls: List[Dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if m.get("images"):
            raise InvalidRequestError("images are not supported: the models served here read text", f"messages[{i}]")
        message = {"role": m.get("role"), "content": m.get("content") if m.get("content") is not None else ""}
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            message["tool_calls"] = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise InvalidRequestError(f"messages[{i}].tool_calls[{j}] must be {{'function': {{'name', "
                                              "'arguments'}}}", f"messages[{i}].tool_calls")
                call_id = call.get("id") or f"call_{i}_{j}"
                message["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": function.get("name"), "arguments": function.get("arguments") or {}}})
                open_calls.append({"id": call_id, "name": function.get("name")})
        if m.get("role") == "tool":
            name = m.get("tool_name") or m.get("name")
            match = next((c for c in open_calls if c["name"] == name), open_calls[-1] if open_calls else None)
            message["tool_call_id"] = m.get("tool_call_id") or (match["id"] if match else f"call_{i}")
            if match in open_calls:
                open_calls.remove(match)
        out.append(message)
    return out


def _metrics(started: Started, reason: Optional[str]) -> Dict[str, Any]:
    """ollama's closing fields: why it stopped, and its counts and durations (nanoseconds)."""
    relay = started.relay
    times = relay.timings()
    model = started.lease.model
    load_ns = int((model.client.load_s or 0) * 1e9) if model.client and model.loaded_at and \
        model.loaded_at >= time.time() - times["total_s"] else 0
    return {"done": True, "done_reason": "stop" if reason in ("stop", "tool_calls") else reason or "stop",
            "total_duration": int(times["total_s"] * 1e9), "load_duration": load_ns,
            "prompt_eval_count": relay.prompt_tokens, "prompt_eval_duration": int(times["prompt_s"] * 1e9),
            "eval_count": relay.completion_tokens, "eval_duration": int(times["eval_s"] * 1e9)}


def _calls(choice: Any) -> List[Dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in choice.calls]


async def chat(request: Request) -> Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if not body.get("messages"):
        return await _load_or_unload(request, body, {"message": {"role": "assistant", "content": ""}})
    fields = {**_openai_fields(body), "messages": _messages(body["messages"])}
    if body.get("tools") is not None:
        fields["tools"] = body["tools"]
    parsed = parse_chat(fields)
    return await _reply(request, body, replace(parsed, **_extras(body)), "chat")


async def generate(request: Request) -> Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if body.get("images"):
        raise InvalidRequestError("images are not supported: the models served here read text", "images")
    if body.get("suffix"):
        raise InvalidRequestError("'suffix' (fill-in-the-middle) is not supported", "suffix")
    if body.get("template"):
        raise InvalidRequestError("'template' is not supported: the model's own chat template is used", "template")
    prompt = body.get("prompt")
    if prompt in (None, ""):
        return await _load_or_unload(request, body, {"response": ""})
    if body.get("raw"):
        parsed = parse_completion({**_openai_fields(body), "prompt": prompt})
    else:
        messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + \
            [{"role": "user", "content": prompt}]
        parsed = parse_chat({**_openai_fields(body), "messages": messages})
    return await _reply(request, body, replace(parsed, **_extras(body)), "generate")


async def _load_or_unload(request: Request, body: Mapping[str, Any], empty: Dict[str, Any]) -> Response:
    """ollama's way to load a model (an empty prompt) or unload it (the same with keep_alive 0)."""
    server = request.app.state.server
    name = body.get("model")
    keep_alive = _keep_alive(body)
    if keep_alive == 0:
        await server.pool.unload(str(name))
        return JSONResponse({"model": name, "created_at": _now(), **empty, "done": True, "done_reason": "unload"})
    lease = await unless_client_leaves(request, server.pool.acquire(str(name), keep_alive_s=keep_alive))
    lease.release()
    return JSONResponse({"model": name, "created_at": _now(), **empty, "done": True, "done_reason": "load"})


async def _reply(request: Request, body: Mapping[str, Any], parsed: Any, kind: str) -> Response:
    started = await start(request, parsed, keep_alive=_keep_alive(body))
    relay = started.relay
    name = body.get("model")
    choice = relay.choices[0]
    handed_over = False

    def piece(content: str = "", thinking: str = "", calls: Optional[list] = None) -> Dict[str, Any]:
        if kind == "chat":
            message: Dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            return {"model": name, "created_at": _now(), "message": message}
        out = {"model": name, "created_at": _now(), "response": content}
        if thinking:
            out["thinking"] = thinking
        return out

    try:
        if not parsed.stream:
            texts = await unless_client_leaves(request, relay.whole())
            request.scope[TOKENS] = (relay.prompt_tokens, relay.completion_tokens)
            got = texts[0]
            return JSONResponse({**piece(got.get("content", ""), got.get("reasoning_content", ""), _calls(choice)),
                                 **_metrics(started, choice.finish_reason)})
        deltas = relay.deltas()
        first = await unless_client_leaves(request, deltas.__anext__())

        async def lines() -> AsyncIterator[Dict[str, Any]]:
            item: Optional[tuple] = first
            while item is not None:
                _, delta, finish = item
                request.scope[TOKENS] = (relay.prompt_tokens, relay.completion_tokens)
                if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                    yield {**piece(delta.get("content", ""), delta.get("reasoning_content", ""),
                                   _calls(choice) if delta.get("tool_calls") else None), "done": False}
                if finish is not None:
                    yield {**piece(), **_metrics(started, finish)}
                item = await deltas.__anext__() if not relay.finished else None

        response = Stream(lines(), on_close=started.release, kind="ndjson", path=request.url.path)
        handed_over = True
        return response
    finally:
        if not handed_over:
            await relay.aclose()
            started.release()


# -- embeddings -----------------------------------------------------------------------------------

async def embed(request: Request) -> Response:
    """ollama's /api/embed: ``input`` a string or a list; ``truncate`` (default true) cuts inputs
    longer than the window, false makes them an error."""
    body = await read_json(request)
    parsed = parse_embeddings(body if isinstance(body, dict) else {})
    started = time.perf_counter()
    name, result = await run_embed(request, parsed, keep_alive=_keep_alive(body))
    return JSONResponse({"model": body.get("model"), "embeddings": [[float(x) for x in v] for v in result.vectors],
                         "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
                         "prompt_eval_count": sum(result.tokens)})


async def embeddings(request: Request) -> Response:
    """ollama's older /api/embeddings: one ``prompt``, one ``embedding`` (not normalized again)."""
    body = await read_json(request)
    parsed = parse_embeddings(body if isinstance(body, dict) else {}, field_name="prompt")
    _, result = await run_embed(request, parsed, keep_alive=_keep_alive(body))
    return JSONResponse({"embedding": [float(x) for x in result.vectors[0]]})


# -- the models -----------------------------------------------------------------------------------

def _details(facts: Any) -> Dict[str, Any]:
    from ovchat.convert.recipe import short_label

    manifest = facts.manifest
    family = manifest.get("model_type") or ""
    parameters = manifest.get("parameters")
    return {"parent_model": "", "format": "openvino" if manifest else "gguf", "family": family,
            "families": [family] if family else None,
            "parameter_size": _parameter_size(parameters) if parameters else "",
            "quantization_level": short_label(manifest.get("recipe") or {}, manifest.get("kept")) if manifest else ""}


def _parameter_size(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def _digest(facts: Any) -> str:
    files = facts.manifest.get("files") or {}
    digest = (files.get("openvino_model.bin") or {}).get("sha256")
    return digest or ""


def _modified(facts: Any) -> str:
    return datetime.fromtimestamp(facts.modified, timezone.utc).isoformat().replace("+00:00", "Z")


async def tags(request: Request) -> Response:
    pool = request.app.state.server.pool
    models = []
    for source in pool.sources():
        facts = pool.facts(source)
        models.append({"name": f"{source.name}:latest", "model": f"{source.name}:latest",
                       "modified_at": _modified(facts), "size": facts.weights_bytes, "digest": _digest(facts),
                       "details": _details(facts)})
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    body = await read_json(request)
    pool = request.app.state.server.pool
    name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
    source = pool.source(name)
    facts = pool.facts(source)
    manifest = facts.manifest
    arch = manifest.get("model_type") or "unknown"
    capabilities = ["embedding"] if manifest.get("kind") == "embedding" else ["completion"]
    if "tools" in facts.chat_template:
        capabilities.append("tools")
    if "<think>" in facts.chat_template:
        capabilities.append("thinking")
    info = {"general.architecture": arch, "general.parameter_count": manifest.get("parameters"),
            f"{arch}.context_length": facts.context_limit}
    return JSONResponse({"modelfile": f"# converted by ovchat\nFROM {source.path}\n", "parameters": "",
                         "template": facts.chat_template, "details": _details(facts), "model_info": info,
                         "capabilities": capabilities, "modified_at": _modified(facts)})


async def ps(request: Request) -> Response:
    pool = request.app.state.server.pool
    models = []
    for row in pool.status():
        facts = pool.facts(pool.source(row["name"]))
        expires = row["expires_at"]
        models.append({"name": f"{row['name']}:latest", "model": f"{row['name']}:latest", "size": row["memory_bytes"],
                       "digest": _digest(facts), "details": _details(facts),
                       "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat().replace("+00:00", "Z")
                       if expires is not None else "2318-01-01T00:00:00Z" if row["keep_alive_s"] is None else None,
                       "size_vram": 0, "context_length": row["context_limit"],
                       "ovchat": {"state": row["state"], "device": row["device"], "requests": row["requests"]}})
    return JSONResponse({"models": models})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def pull(request: Request) -> Response:
    """Pull a known name, a Hugging Face repo or a path into the store, with NDJSON progress."""
    from ovchat import store

    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    source = body.get("model") or body.get("name")
    if not isinstance(source, str) or not source:
        raise InvalidRequestError("'model' must name what to pull", "model")
    source = source[:-len(":latest")] if source.endswith(":latest") else source
    loop = asyncio.get_running_loop()
    events: "asyncio.Queue[Any]" = asyncio.Queue()

    def progress(report: Any) -> None:
        event: Dict[str, Any] = {"status": report.message}
        if report.total:
            event.update(completed=report.done, total=report.total)
        loop.call_soon_threadsafe(events.put_nowait, event)

    def work() -> None:
        try:
            store.pull(source, progress=progress)
            loop.call_soon_threadsafe(events.put_nowait, {"status": "success"})
        except OvchatError as e:
            loop.call_soon_threadsafe(events.put_nowait, InvalidRequestError(str(e), "model"))

    task = loop.run_in_executor(None, work)

    async def lines() -> AsyncIterator[Dict[str, Any]]:
        while True:
            event = await events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if event.get("status") == "success":
                return

    if body.get("stream", True) is False:
        last: Dict[str, Any] = {}
        async for event in lines():
            last = event
        await task
        return JSONResponse(last)
    return Stream(lines(), on_close=lambda: None, kind="ndjson", path=request.url.path)


ROUTES: List[Route] = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embeddings, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/pull", pull, methods=["POST"]),
]
