"""A request made ready for a model's engine, whichever API it came through.

``prepare`` templates and tokenizes the request with the model's own tokenizer (a chat through
its chat template, with the tool plan's tools shown; a raw prompt with its BOS), fits it in the
context window, and says how to generate it (``GenerationSettings``: the options, the reply's
budget, a grammar where the reply must be JSON or a call). The OpenAI and the ollama routes both
call it, so a request means the same in either dialect. Domain errors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from ovchat import structured
from ovchat.errors import InvalidRequestError, NoChatTemplateError, summary
from ovchat.options import GenerationOptions, GenerationSettings
from ovchat.server.responses import THINK_CLOSE, THINK_OPEN
from ovchat.server.schema import GenerationRequest
from ovchat.toolcalls import ToolPlan


@dataclass(frozen=True)
class Prepared:
    """A request made ready for the engine."""

    ids: List[int]
    settings: GenerationSettings
    plan: ToolPlan
    template: str
    thinking: Optional[bool]  # None: the model has no thinking tags; else whether the prompt opened them


def prompt_ids(parsed: GenerationRequest, tokenizer: Any, model: str) -> Tuple[List[int], Optional[bool]]:
    """The prompt's token ids (a chat through the template, with the plan's tools shown), and
    whether the prompt opened the model's thinking tags (None: it has none)."""
    template = tokenizer.chat_template or ""
    if parsed.messages is None:
        return _ids(tokenizer.encode(parsed.prompt, add_special_tokens=True)), None
    if not template:
        raise NoChatTemplateError(model)
    plan = ToolPlan(parsed.tools, parsed.tool_choice, parallel=parsed.parallel_tool_calls)
    plan.check(template, model)
    extra = {"enable_thinking": parsed.think} if parsed.think is not None else None
    try:
        text = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=parsed.add_generation_prompt,
                                             tools=plan.template_tools(template), extra_context=extra)
    except RuntimeError as e:
        # Templates may refuse some orders of roles (e.g. two user messages in a row).
        raise InvalidRequestError(f"the model's chat template refused the messages: {summary(e)}",
                                  "messages") from None
    thinking = None
    if THINK_OPEN in template or THINK_CLOSE in template:  # a reasoning model's template
        thinking = text.rstrip().endswith(THINK_OPEN)
    return _ids(tokenizer.encode(text, add_special_tokens=False)), thinking


def prepare(parsed: GenerationRequest, tokenizer: Any, model: str, *, context_limit: Optional[int],
            speculation: Any = None) -> Prepared:
    """Template and tokenize (call it in a worker thread), fit the window, say how to generate."""
    check_speculation(parsed, speculation)
    plan = ToolPlan(parsed.tools, parsed.tool_choice, parallel=parsed.parallel_tool_calls)
    ids, thinking = prompt_ids(parsed, tokenizer, model)
    limit = min(x for x in (context_limit, parsed.context_limit) if x) if (context_limit or parsed.context_limit) \
        else None
    max_new = reply_budget(len(ids), parsed.max_tokens, limit, parsed)
    settings = parsed.options.settings(
        max_new, presence_penalty=parsed.penalties.get("presence_penalty", 0.0),
        frequency_penalty=parsed.penalties.get("frequency_penalty", 0.0), logprobs=parsed.logprobs, n=parsed.n,
        **parsed.speculation, **parsed.extra_settings, **structured.settings(parsed.response_format, plan))
    return Prepared(ids, settings, plan, tokenizer.chat_template or "", thinking)


def _ids(encoded: Any) -> List[int]:
    return [int(i) for i in encoded.input_ids.data[0]]


def reply_budget(prompt_tokens: int, requested: Optional[int], limit: Optional[int],
                 parsed: GenerationRequest) -> int:
    """The most tokens a reply may have: what was asked, cut to the window; a prompt that leaves
    no room for a single token is refused (OpenAI's code)."""
    if limit is None:
        return requested or GenerationOptions().max_new_tokens
    room = limit - prompt_tokens
    if room < 1:
        raise InvalidRequestError(f"the prompt has {prompt_tokens} tokens, but the model's context window is {limit}; "
                                  "shorten it", "messages" if parsed.messages is not None else "prompt",
                                  "context_length_exceeded")
    return min(requested or room, room)


def check_speculation(parsed: GenerationRequest, lever: Any) -> None:
    """A request's own speculation settings fit only the lever the server was started with."""
    if not parsed.speculation:
        return
    field_name = next(iter(parsed.speculation))
    if lever is None:
        raise InvalidRequestError(f"'{field_name}' needs a server started with --prompt-lookup or --draft-model",
                                  field_name)
    if "max_ngram_size" in parsed.speculation and lever.kind != "prompt-lookup":
        raise InvalidRequestError("'max_ngram_size' applies to prompt lookup; this server speculates with a draft "
                                  "model", "max_ngram_size")
