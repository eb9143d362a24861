"""The ``ovchat convert`` and ``ovchat info`` commands (registered on the group in ovchat.cli).

Conventions of ovchat.cli: the docstring is the help, heavy imports happen inside the command,
progress goes to stderr, and OvchatError becomes a one-line ``click.ClickException``. That happens
in ``OvchatGroup.invoke`` and, so that the commands also stand alone (scripts/convert_model.py),
in ``_one_line_errors`` here.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from ovchat.errors import OvchatError


def _one_line_errors(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except OvchatError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _notice(message: str) -> None:
    click.echo(f"ovchat: {message}", err=True)


def format_bitwidths(table: dict) -> str:
    """NNCF's bitwidth distribution table, indented under its heading."""
    from ovchat.convert.compress import format_distribution

    return "\n".join("  " + line for line in format_distribution(table).splitlines())


@click.command("convert")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@click.option("--weight-format", type=click.Choice(["int4", "int8", "fp16"]), default="int4", show_default=True,
              help="int4: NNCF int4 with int8 backup; int8: int8 everywhere; fp16: no compression.")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric or asymmetric int4 quantization.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Weights per int4 quantization group (-1: one group per row).")
@click.option("--ratio", type=click.FloatRange(0.0, 1.0), default=0.6, show_default=True,
              help="Share of the eligible weights in int4; the rest stay in the int8 backup.")
@click.option("--group-size-fallback", type=click.Choice(["adjust", "ignore", "error"]), default="adjust",
              show_default=True,
              help="For layers the group size does not divide: pick a smaller group, leave them in "
                   "the backup precision, or fail.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new model is complete).")
@_one_line_errors
def convert_cmd(source, output, weight_format, sym, group_size, ratio, group_size_fallback, force):
    """Convert SOURCE to an OpenVINO model directory OUTPUT, without PyTorch.

    SOURCE is a Hugging Face model directory (config.json, *.safetensors, tokenizer.json), a .gguf
    file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), or an OpenVINO IR directory with
    float weights (compressed only). The default recipe is int4, symmetric, group size 128,
    ratio 0.6, with an int8 backup for embeddings, the output layer and the remaining weights.
    """
    from ovchat.convert import convert
    from ovchat.convert.compress import Recipe
    from ovchat.render import ProgressPrinter

    recipe = Recipe(weight_format=weight_format, sym=sym, group_size=group_size, ratio=ratio,
                    group_size_fallback=group_size_fallback)
    if weight_format == "int4":
        _notice(f"recipe: int4 {'sym' if sym else 'asym'}, group size {group_size}, ratio {ratio}, int8 backup; "
                f"layers the group size does not divide: {group_size_fallback}")
    else:
        _notice(f"recipe: {weight_format}")
    try:
        out = convert(source, output, recipe=recipe, force=force, progress=ProgressPrinter())
    except KeyboardInterrupt as e:
        # Also SIGTERM, which convert() raises as an interrupt once it has cleaned up.
        what = "terminated" if str(e) == "SIGTERM" else "interrupted"
        click.echo(f"Error: conversion {what}; nothing was written to {output}", err=True)
        sys.exit(143 if what == "terminated" else 130)
    from ovchat.convert import read_manifest

    manifest = read_manifest(out)
    table = manifest.get("bitwidth_distribution") or {}
    click.echo("bitwidth distribution:", err=True)
    click.echo(format_bitwidths(table), err=True)
    click.echo(str(out))


@click.command("info")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_one_line_errors
def info_cmd(model, as_json):
    """Show how MODEL (a directory written by `ovchat convert`) was made: its ovchat.json manifest."""
    from ovchat.convert import read_manifest

    m = read_manifest(model)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    src = m.get("source", {})
    recipe = m.get("recipe") or {}
    versions = m.get("versions") or {}
    lines = [
        f"model:         {model}",
        f"architecture:  {m.get('architecture')} ({m.get('model_type')})",
        f"context:       {m.get('context_length')} tokens",
        f"source:        {src.get('path')} ({src.get('kind')})",
    ]
    for f in src.get("files", []):
        lines.append(f"  {f.get('sha256', '')[:16]}  {f.get('size', 0):>12}  {f.get('path')}")
    lines.append("recipe:        " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    lines.append("bitwidths:")
    lines.append(format_bitwidths(m.get("bitwidth_distribution") or {}))
    lines.append("versions:      " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    lines.append(f"created:       {m.get('created')} (in {m.get('conversion_seconds')} s)")
    click.echo("\n".join(lines))
